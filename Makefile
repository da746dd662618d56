# kmsbastion — top-level tasks. `make lab` runs the demo, `make test` runs every test.
# Both install the system packages they need (Debian 12, as root).
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_DIR := target/release

.PHONY: all deps venv build build-ffi test test-unit test-system test-sdk lint lab lab-shell \
        bench man package package-test clean

all: build

deps:
	tests/install-deps.sh

venv: deps
	tests/venv.sh

# The binaries with the KMS client, then the FFI crates built on their own so that feature
# unification never links the HTTP client into the PAM or NSS module.
build: deps
	$(CARGO) build --release --locked -p kmsbastion --bins --examples
	$(CARGO) build --release --locked -p pam_kmsbastion -p nss_kmsbastion

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	# The core as the PAM and NSS modules link it (no client feature) runs inside sshd and every
	# process that resolves users: no unwrap, expect, panic or panicking index there.
	$(CARGO) clippy --locked -p kmsbastion --no-default-features --lib -- -D warnings \
		-D clippy::unwrap_used -D clippy::expect_used -D clippy::panic -D clippy::indexing_slicing
	tests/check-licenses.py

# The client and CLI integration tests drive the real emulator binary; `cargo test` only builds
# the example as a test harness (its own unit tests), so build the binary first.
test-unit: deps
	$(CARGO) build --locked --example kms-emulator
	$(CARGO) test --locked --workspace

test-sdk: venv build
	tests/sdk/run

test-system: venv build
	tests/system/run

test: lint test-unit test-sdk test-system

lab: venv build
	examples/lab/run

lab-shell: venv build
	examples/lab/run --shell

bench: venv build
	bench/run

man: deps
	packaging/man/build

package: build man
	packaging/build

package-test: package
	packaging/test/run

clean:
	$(CARGO) clean
	rm -rf build
