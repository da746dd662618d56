#!/bin/bash
# Install the system packages that building, testing, the lab and packaging need.
# Idempotent and quick when everything is present; needs root on Debian 12 (bookworm).
set -euo pipefail

PACKAGES=(
    build-essential pkg-config            # cc for -sys crates, the cdylib link
    openssh-server openssh-client openssh-sftp-server  # real sshd/ssh for the system tests and lab
    libpam0g-dev pamtester                # real libpam
    iproute2 util-linux procps psmisc     # ip, unshare, ps
    python3 python3-venv                  # system tests and the SDK compatibility test
    rsync                                 # rsync -e ssh through the bastion
    passwd                                # useradd/chpasswd inside the test namespace
    pandoc                                # man pages from markdown
    lintian rpm debootstrap dpkg-dev      # packaging and its tests
    ca-certificates curl
    openssl                               # test CA/certificates for the KMS client's HTTPS test
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "install-deps: missing packages (${missing[*]}); run as root or install them" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    for c in "$HOME/.cargo/bin/cargo" /root/.cargo/bin/cargo; do
        [[ -x "$c" ]] && { echo "install-deps: cargo is at $c; add $(dirname "$c") to PATH" >&2; exit 1; }
    done
    echo "install-deps: no Rust toolchain found. kmsbastion needs Rust >= 1.88 (Debian 12's rustc" >&2
    echo "  is too old); install it with rustup (https://rustup.rs) and run this again." >&2
    exit 1
fi
