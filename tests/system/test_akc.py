"""The built AuthorizedKeysCommand, target/release/kmsbastion-keys (issue 3, step 2 of
DESIGN.md), against configurations with granted, ungranted, expired, not-yet-valid and
source-restricted grants, plain engineers and local users.

Runs inside tests/ns/run-in-ns only (it mounts a private tmpfs over /etc/kmsbastion to test the
default path, and runs the command as an unprivileged user like sshd does).

    cargo build --release -p kmsbastion --bin kmsbastion-keys
    tests/ns/run-in-ns build/venv/bin/pytest -q tests/system/test_akc.py
"""

import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AKC = ROOT / "target" / "release" / "kmsbastion-keys"
CONF_DIR = Path("/etc/kmsbastion")

ALICE_T, ALICE_K = "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z"
ALICE2_T, ALICE2_K = ("ecdsa-sha2-nistp256",
                      "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=")
BOB_T, BOB_K = "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMtAgrpxiL8c1XqJROtVCZDVMf2AFKljEZHnEdb/M5j9"

ALICE = f"{ALICE_T} {ALICE_K}"
ALICE2 = f"{ALICE2_T} {ALICE2_K}"
BOB = f"{BOB_T} {BOB_K}"


def rfc3339(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


NOW = datetime.now(timezone.utc).replace(microsecond=0)
PAST = NOW - timedelta(days=1)
SOON = NOW + timedelta(days=1)
FUTURE = NOW + timedelta(days=30)

CONFIG = f"""
[kms]
endpoint = "http://127.0.0.1:9100"

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"
  [[host.account]]
  name = "deploy"
  secret = "acs/ecs/web-01/deploy"
  [[host.account]]
  name = "old"
  secret = "acs/ecs/web-01/old"
  [[host.account]]
  name = "later"
  secret = "acs/ecs/web-01/later"
  [[host.account]]
  name = "temp"
  secret = "acs/ecs/web-01/temp"

[[engineer]]
name = "alice"
uid = 64001
keys = ["{ALICE} alice@laptop", "{ALICE2} alice@phone"]
groups = ["ops"]

[[engineer]]
name = "bob"
uid = 64002
keys = ["{BOB} bob"]

[[grant]]
groups = ["ops"]
accounts = ["root@web-01"]

[[grant]]
engineers = ["alice"]
accounts = ["deploy@web-01"]
from = ["10.0.0.0/8", "127.0.0.1"]

[[grant]]
engineers = ["alice"]
accounts = ["old@web-01"]
not_after = "{rfc3339(PAST)}"

[[grant]]
engineers = ["alice"]
accounts = ["later@web-01"]
not_before = "{rfc3339(FUTURE)}"

[[grant]]
engineers = ["alice", "bob"]
accounts = ["temp@web-01"]
not_before = "{rfc3339(PAST)}"
not_after = "{rfc3339(SOON)}"
"""


def _require_namespace():
    if os.environ.get("KMSB_NS") != "1":
        pytest.fail("test_akc.py must run inside tests/ns/run-in-ns (KMSB_NS=1 is not set)")


@pytest.fixture(scope="module")
def akc():
    _require_namespace()
    if not AKC.is_file():
        pytest.fail(f"{AKC} is missing: build it first (`make build` or "
                    "`cargo build --release -p kmsbastion --bin kmsbastion-keys`)")
    work = Path(tempfile.mkdtemp(prefix="kmsb-akc-"))
    os.chmod(work, 0o755)
    # sshd runs the command from a root-owned path; copy it out of the (possibly
    # non-traversable) checkout so the unprivileged runs below can execute it.
    binary = work / "kmsbastion-keys"
    shutil.copy(AKC, binary)
    os.chmod(binary, 0o755)
    conf = work / "kmsbastion.toml"
    conf.write_text(CONFIG)
    os.chmod(conf, 0o644)
    yield Akc(binary, conf, work)
    shutil.rmtree(work, ignore_errors=True)


class Akc:
    def __init__(self, binary, conf, work):
        self.binary = binary
        self.conf = conf
        self.work = work  # 0755, so the unprivileged runs can read files placed here

    def run(self, *args, config=True, user="nobody"):
        argv = [str(self.binary)]
        if config:
            argv += ["--config", str(self.conf)]
        argv += list(args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, user=user,
                              env={"PATH": "/usr/bin:/bin"})

    def lines(self, *args, **kw):
        r = self.run(*args, **kw)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        return r.stdout.splitlines()


def test_granted_login_gets_all_keys_restricted(akc):
    assert akc.lines("alice@root@web-01") == [f"restrict,pty {ALICE}", f"restrict,pty {ALICE2}"]


def test_offered_key_selects_one_line(akc):
    assert akc.lines("alice@root@web-01", ALICE2_T, ALICE2_K) == [f"restrict,pty {ALICE2}"]
    assert akc.lines("alice@root@web-01", ALICE_T, ALICE_K) == [f"restrict,pty {ALICE}"]
    # bob's key offered for alice's login: nothing
    assert akc.lines("alice@root@web-01", BOB_T, BOB_K) == []
    # right blob, wrong type name
    assert akc.lines("alice@root@web-01", "ssh-rsa", ALICE_K) == []


def test_ungranted_engineer_gets_nothing(akc):
    assert akc.lines("bob@root@web-01") == []
    assert akc.lines("bob@deploy@web-01", BOB_T, BOB_K) == []


def test_refusals_are_audited_but_key_mismatches_are_not(akc):
    """A known engineer whose login no grant allows never reaches PAM: the AKC is the one
    place that can record why. A key that is not the engineer's is only a mismatch (clients
    offer several keys in turn) and must not produce a refusal."""
    import json
    log = akc.work / "audit.log"
    log.write_text("")
    os.chmod(log, 0o666)  # the command runs as nobody here (kmsbastion under sshd)
    conf = akc.work / "audited.toml"
    conf.write_text(CONFIG + f'\n[audit]\nfile = "{log}"\nsyslog = false\n')
    os.chmod(conf, 0o644)

    def events():
        return [json.loads(line) for line in log.read_text().splitlines()]

    def lines(*args):
        r = akc.run("--config", str(conf), *args, config=False)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return r.stdout.splitlines()

    assert lines("bob@root@web-01", BOB_T, BOB_K) == []
    [ev] = events()
    assert (ev["event"], ev["engineer"], ev["account"], ev["host"], ev["result"]) == \
        ("refused", "bob", "root", "web-01", "deny")
    assert "bob@root@web-01" in ev["reason"] and "grant" in ev["reason"], ev["reason"]
    assert lines("alice@old@web-01", ALICE_T, ALICE_K) == []
    assert "expired" in events()[-1]["reason"] or "not_after" in events()[-1]["reason"], events()[-1]
    count = len(events())
    # Mismatches and granted logins: nothing is audited.
    assert lines("alice@root@web-01", BOB_T, BOB_K) == []
    assert lines("alice@deploy@web-01", BOB_T, BOB_K) == []
    assert lines("alice@root@web-01", ALICE_T, ALICE_K) != []
    assert lines("alice@deploy@web-01", ALICE_T, ALICE_K) != []
    # Unknown engineers (any scanner can try names) and local users are not audited either.
    assert lines("mallory@root@web-01") == []
    assert lines("root") == []
    assert len(events()) == count, events()[count:]


def test_from_restriction_is_emitted(akc):
    assert akc.lines("alice@deploy@web-01", ALICE_T, ALICE_K) == [
        f'restrict,pty,from="10.0.0.0/8,127.0.0.1" {ALICE}']


def test_expired_and_not_yet_valid_grants_give_nothing(akc):
    assert akc.lines("alice@old@web-01") == []
    assert akc.lines("alice@later@web-01") == []


def test_live_window_sets_expiry_time(akc):
    want = SOON.strftime("%Y%m%d%H%M%S") + "Z"
    assert akc.lines("bob@temp@web-01") == [f'restrict,pty,expiry-time="{want}" {BOB}']


def test_plain_engineer_gets_keys_for_listing(akc):
    assert akc.lines("alice") == [f"restrict,pty {ALICE}", f"restrict,pty {ALICE2}"]
    assert akc.lines("bob", BOB_T, BOB_K) == [f"restrict,pty {BOB}"]


@pytest.mark.parametrize("user", [
    "root", "nobody", "carol", "carol@root@web-01", "alice@root@web-02", "alice@nope@web-01",
    "alice@root", "alice@root@web-01@x", "alice\nroot", "alice@root@../etc", "a" * 5000, "",
])
def test_everyone_else_gets_nothing(akc, user):
    r = akc.run(user)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), user


def test_default_config_path(akc):
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kmsb-akc-test", str(CONF_DIR)], check=True)
    try:
        (CONF_DIR / "kmsbastion.toml").write_text(CONFIG)
        os.chmod(CONF_DIR / "kmsbastion.toml", 0o644)
        assert akc.lines("alice@root@web-01", ALICE_T, ALICE_K, config=False) == [f"restrict,pty {ALICE}"]
    finally:
        subprocess.run(["umount", str(CONF_DIR)], check=True)


def test_bad_config_exits_1_with_file_and_line(akc):
    bad = akc.work / "bad.toml"
    bad.write_text(CONFIG.replace('name = "bob"', 'name = "bob"\nshell = "/bin/sh"'))
    os.chmod(bad, 0o644)
    r = akc.run("--config", str(bad), "alice@root@web-01", config=False)
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"{bad}:" in r.stderr and "unknown field `shell`" in r.stderr
    line = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if l.startswith("shell"))
    assert f"{bad}:{line}: " in r.stderr


def test_missing_or_unreadable_config_exits_1(akc):
    r = akc.run("--config", str(akc.work / "nope.toml"), "alice", config=False)
    assert r.returncode == 1 and "cannot read the configuration" in r.stderr
    secret = akc.work / "private.toml"
    secret.write_text(CONFIG)
    os.chmod(secret, 0o600)
    r = akc.run("--config", str(secret), "alice", config=False)  # as nobody
    assert r.returncode == 1 and "cannot read the configuration" in r.stderr


def test_usage_errors_exit_2(akc):
    assert akc.run(config=False).returncode == 2
    assert akc.run("alice", "ssh-ed25519").returncode == 2
    assert akc.run("--frobnicate", "alice").returncode == 2


def test_output_is_accepted_by_ssh_keygen(akc, tmp_path):
    # ssh-keygen parses authorized_keys lines (options included) when fingerprinting
    path = tmp_path / "authorized_keys"
    lines = akc.lines("alice@deploy@web-01") + akc.lines("bob@temp@web-01")
    path.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(lines)


def test_runs_fast(akc):
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        akc.run("alice@root@web-01", ALICE_T, ALICE_K, user=None)
    per_run = (time.perf_counter() - t0) / n
    print(f"\nkmsbastion-keys: {per_run * 1e3:.2f} ms per run (process start included)")
    assert per_run < 0.05


# --- the lookup index (src/config/index.rs, `kmsbastion index`) ---------------------------

KMSBASTION = ROOT / "target" / "release" / "kmsbastion"
PAM_MODULE = ROOT / "target" / "release" / "libpam_kmsbastion.so"
INDEX_DIR = Path("/run/kmsbastion/index")


def _index_path(conf: Path) -> Path:
    import hashlib

    return INDEX_DIR / (hashlib.sha256(os.path.abspath(conf).encode()).hexdigest()[:16] + ".idx")


def _cli(conf: Path, *args):
    return subprocess.run([str(KMSBASTION), "--config", str(conf), *args], capture_output=True,
                          text=True, timeout=60)


def _akc_traced(akc, conf: Path, *args):
    """Runs the AKC as nobody under strace; returns (stdout lines, files it opened)."""
    trace = akc.work / "akc.trace"
    trace.unlink(missing_ok=True)
    # strace as root, the traced AKC as nobody (as sshd's AuthorizedKeysCommandUser).
    argv = ["strace", "-f", "-qq", "-u", "nobody", "-e", "trace=openat", "-o", str(trace),
            str(akc.binary), "--config", str(conf), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    opened = [line.split('"')[1] for line in trace.read_text().splitlines()
              if "openat(" in line and '"' in line and "= -1" not in line]
    return r.stdout.splitlines(), opened


def test_index_answers_only_while_fresh_and_trustworthy(akc):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    conf = akc.work / "indexed.toml"
    conf.write_text(CONFIG)
    os.chmod(conf, 0o644)
    idx = _index_path(conf)
    granted = [f"restrict,pty {ALICE}", f"restrict,pty {ALICE2}"]

    # No index yet: the full parse answers.
    lines, opened = _akc_traced(akc, conf, "alice@root@web-01")
    assert lines == granted and str(conf) in opened and str(idx) not in opened
    assert _cli(conf, "index", "--check").returncode == 1

    # `kmsbastion index` writes it (root-owned, 0644, in a root-owned 0755 directory) and the
    # AKC then answers from it without opening the configuration.
    r = _cli(conf, "index")
    assert r.returncode == 0 and f"index: wrote {idx}" in r.stdout, r
    st = idx.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
    assert (INDEX_DIR.stat().st_uid, INDEX_DIR.stat().st_mode & 0o7777) == (0, 0o755)
    assert _cli(conf, "index", "--check").returncode == 0
    lines, opened = _akc_traced(akc, conf, "alice@root@web-01")
    assert lines == granted and str(idx) in opened and str(conf) not in opened, opened
    lines, opened = _akc_traced(akc, conf, "bob@root@web-01")
    assert lines == [] and str(conf) not in opened

    # An edit that revokes alice's grant: the stale index is ignored, the new file answers.
    revoked = CONFIG.replace('groups = ["ops"]\naccounts = ["root@web-01"]',
                             'engineers = ["bob"]\naccounts = ["root@web-01"]')
    assert revoked != CONFIG
    conf.write_text(revoked)
    lines, opened = _akc_traced(akc, conf, "alice@root@web-01")
    assert lines == [] and str(conf) in opened
    lines, _ = _akc_traced(akc, conf, "bob@root@web-01")
    assert lines == [f"restrict,pty {BOB}"]
    r = _cli(conf, "index", "--check")
    assert r.returncode == 1 and "stale" in r.stdout, r

    # Rebuilt: fresh again, and it says what the new file says.
    assert _cli(conf, "index").returncode == 0
    lines, opened = _akc_traced(akc, conf, "alice@root@web-01")
    assert lines == [] and str(idx) in opened and str(conf) not in opened
    lines, opened = _akc_traced(akc, conf, "bob@root@web-01")
    assert lines == [f"restrict,pty {BOB}"] and str(conf) not in opened

    # Wrong mode, wrong owner, a link, damage: ignored (the file answers), `--check` says why.
    good = idx.read_bytes()

    def expect_fallback(what):
        lines, opened = _akc_traced(akc, conf, "bob@root@web-01")
        assert lines == [f"restrict,pty {BOB}"] and str(conf) in opened, what
        r = _cli(conf, "index", "--check")
        assert r.returncode == 1, (what, r)
        return r.stdout

    os.chmod(idx, 0o666)
    assert "writable by group or others" in expect_fallback("mode 0666")
    os.chmod(idx, 0o644)
    os.chown(idx, 65534, 65534)
    assert "owned by uid 65534" in expect_fallback("owner nobody")
    os.chown(idx, 0, 0)
    damaged = bytearray(good)
    damaged[300] ^= 0x40  # inside the directory, covered by the header checksum
    idx.write_bytes(bytes(damaged))
    assert "corrupt" in expect_fallback("bit flip")
    idx.write_bytes(good[: len(good) // 2])
    assert "corrupt" in expect_fallback("truncated")
    idx.unlink()
    real = akc.work / "copy.idx"
    real.write_bytes(good)
    os.symlink(real, idx)
    assert "symbolic link" in expect_fallback("symlink")
    idx.unlink()
    idx.write_bytes(good)
    os.chmod(idx, 0o644)
    assert _cli(conf, "index", "--check").returncode == 0

    # A configuration that no longer loads: no index is written, the old one is removed and
    # the AKC refuses as before.
    conf.write_text(revoked + "\nbogus = 1\n")
    r = _cli(conf, "index")
    assert r.returncode == 2 and "bogus" in r.stderr, r
    assert not idx.exists()
    r = akc.run("--config", str(conf), "bob@root@web-01", config=False)
    assert r.returncode == 1 and r.stdout == ""


def test_a_bastion_login_through_pam_rebuilds_a_stale_index(akc):
    if shutil.which("pamtester") is None:
        pytest.skip("pamtester is not installed")
    conf = akc.work / "pam-indexed.toml"
    conf.write_text(CONFIG)
    os.chmod(conf, 0o644)
    idx = _index_path(conf)
    idx.unlink(missing_ok=True)
    service = Path("/etc/pam.d/kmsb-index-test")
    service.write_text(f"account required {PAM_MODULE} config={conf}\n")
    try:
        time.sleep(0.3)  # the index is only written from inputs that have settled
        r = subprocess.run(["pamtester", "-I", "rhost=127.0.0.1", service.name, "alice@root@web-01",
                            "acct_mgmt"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r
        assert _cli(conf, "index", "--check").returncode == 0, "the login did not write the index"
        assert idx.stat().st_uid == 0
        # After an edit the next login parses the file once and refreshes the index.
        conf.write_text(CONFIG + "\n# edited\n")
        assert _cli(conf, "index", "--check").returncode == 1
        time.sleep(0.3)
        r = subprocess.run(["pamtester", "-I", "rhost=127.0.0.1", service.name, "alice@root@web-01",
                            "acct_mgmt"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r
        assert _cli(conf, "index", "--check").returncode == 0
        # A local user's login is not ours: it never writes an index.
        idx.unlink()
        r = subprocess.run(["pamtester", service.name, "root", "acct_mgmt"], capture_output=True,
                           text=True, timeout=30)
        assert not idx.exists()
    finally:
        service.unlink(missing_ok=True)
