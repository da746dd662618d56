"""pam_kmsbastion.so through real libpam (pamtester, and libpam via ctypes for sessions).

Self-contained: a private pam.d service and configuration written by the fixture, restored on
the way out. Runs only inside ``tests/ns/run-in-ns`` (``KMSB_NS=1``); the namespace's /etc is a
private copy, so nothing on the host changes.

The account stack used to make PAM_IGNORE observable::

    account [success=1 ignore=ignore default=die] pam_kmsbastion.so config=…
    account required pam_exec.so /usr/bin/touch MARKER   # reached only on PAM_IGNORE
    account required pam_permit.so

granted → success, no marker; not ours → success *and* marker; denied → failure, no marker.
"""

import ctypes
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "target/release/libpam_kmsbastion.so"
BROKER = ROOT / "target/release/kmsbastion-broker"
WORK = Path("/tmp/kmsb-pamtest")
CONFIG = WORK / "kmsbastion.toml"
AUDIT = WORK / "audit.log"
MARKER = WORK / "ignored"
RUNTIME = Path("/run/kmsbastion-pamtest")
SERVICE = "kmsb-pamtest"
SERVICE_BAD_ARG = "kmsb-pamtest-badarg"
SERVICE_BROKEN_CONFIG = "kmsb-pamtest-broken"
SERVICE_SESSION = "kmsb-pamtest-session"
SNAPSHOT = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"]
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

CONFIG_TEXT = f"""
[kms]
endpoint = "http://127.0.0.1:9"
credentials = "file"
credentials_file = "{WORK}/credentials"

[bastion]
broker = "{BROKER}"
runtime_dir = "{RUNTIME}"

[audit]
file = "{AUDIT}"
syslog = false

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"

[[host]]
name = "web-02"
address = "127.0.0.3"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "deploy"
  secret = "acs/ecs/web-02/deploy"

[[engineer]]
name = "alice"
uid = 64001
keys = ["{HOST_KEY} alice@laptop"]

[[engineer]]
name = "bob"
uid = 64002
keys = []

[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
from = ["127.0.0.0/8"]

[[grant]]
engineers = ["alice"]
accounts = ["deploy@web-02"]
not_after = "2020-01-01T00:00:00Z"
"""


def account_stack(args: str) -> str:
    return (
        f"account [success=1 ignore=ignore default=die] {MODULE} {args}\n"
        f"account required pam_exec.so quiet /usr/bin/touch {MARKER}\n"
        "account required pam_permit.so\n"
    )


@pytest.fixture(scope="module")
def pam_env():
    if os.environ.get("KMSB_NS") != "1":
        pytest.fail("test_pam runs only inside tests/ns/run-in-ns (KMSB_NS=1)", pytrace=False)
    for artefact in (MODULE, BROKER):
        if not artefact.is_file():
            pytest.fail(f"{artefact} is missing: run `make build`", pytrace=False)
    if shutil.which("pamtester") is None:
        pytest.fail("pamtester is not installed (tests/install-deps.sh)", pytrace=False)
    saved = {p: Path(p).read_bytes() for p in SNAPSHOT if Path(p).exists()}
    written = []
    WORK.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(CONFIG_TEXT)
    creds = WORK / "credentials"
    creds.write_text("access_key_id = AKIDPAMTEST\naccess_key_secret = not-used-no-kms-call\n")
    creds.chmod(0o600)
    (WORK / "broken.toml").write_text("[kms]\nendpoint = \n")
    pamd = Path("/etc/pam.d")
    for name, text in [
        (SERVICE, account_stack(f"config={CONFIG}")),
        (SERVICE_BAD_ARG, account_stack(f"config={CONFIG} debgu")),
        (SERVICE_BROKEN_CONFIG, account_stack(f"config={WORK / 'broken.toml'}")),
        (
            SERVICE_SESSION,
            account_stack(f"config={CONFIG}")
            + f"session required {MODULE} config={CONFIG} debug\n"
            + "session optional pam_permit.so\n",
        ),
    ]:
        (pamd / name).write_text(text)
        written.append(pamd / name)
    created_user = False
    try:
        pwd.getpwnam("kmsbastion")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "kmsbastion"],
            check=True,
        )
        created_user = True
    try:
        yield
    finally:
        for p in written:
            p.unlink(missing_ok=True)
        if created_user:
            for p, data in saved.items():
                Path(p).write_bytes(data)
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.rmtree(RUNTIME, ignore_errors=True)


def pamtester(service: str, user: str, *ops: str, rhost: str = "127.0.0.1"):
    MARKER.unlink(missing_ok=True)
    p = subprocess.run(
        ["pamtester", "-I", f"rhost={rhost}", service, user, *ops],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return p.returncode, p.stdout + p.stderr, MARKER.exists()


def audit_events():
    if not AUDIT.exists():
        return []
    return [json.loads(line) for line in AUDIT.read_text().splitlines() if line.strip()]


def test_granted_login_is_allowed(pam_env):
    rc, out, ignored = pamtester(SERVICE, "alice@root@web-01", "acct_mgmt")
    assert rc == 0, out
    assert not ignored, "a granted composite login must be decided by the module, not ignored"
    last = audit_events()[-1]
    assert last["event"] == "login" and last["result"] == "allow"
    assert (last["engineer"], last["account"], last["host"]) == ("alice", "root", "web-01")


@pytest.mark.parametrize(
    "user,rhost,why",
    [
        ("bob@root@web-01", "127.0.0.1", "no grant"),
        ("alice@root@web-01", "10.9.8.7", "wrong source"),
        ("alice@deploy@web-02", "127.0.0.1", "expired grant"),
        ("alice@root@web-99", "127.0.0.1", "unknown host"),
        ("alice@@web-01", "127.0.0.1", "malformed login string"),
    ],
)
def test_refused_logins_are_permission_denied(pam_env, user, rhost, why):
    rc, out, ignored = pamtester(SERVICE, user, "acct_mgmt", rhost=rhost)
    assert rc != 0, f"{why}: {out}"
    assert "Permission denied" in out, f"{why}: {out}"
    assert not ignored
    last = audit_events()[-1]
    assert last["event"] == "login" and last["result"] == "deny", last
    assert last.get("reason"), last


def test_local_user_is_ignored(pam_env):
    rc, out, ignored = pamtester(SERVICE, "root", "acct_mgmt")
    assert rc == 0, out
    assert ignored, "a local account must get PAM_IGNORE (the rest of the stack decides)"


def test_plain_engineer_is_allowed_to_list(pam_env):
    rc, out, ignored = pamtester(SERVICE, "alice", "acct_mgmt")
    assert rc == 0, out
    assert not ignored


def test_unknown_module_argument_is_a_service_error(pam_env):
    for user in ("alice@root@web-01", "root"):
        rc, out, _ = pamtester(SERVICE_BAD_ARG, user, "acct_mgmt")
        assert rc != 0, out
        assert "Error in service module" in out, out


def test_broken_config_fails_closed_for_composite_only(pam_env):
    rc, out, _ = pamtester(SERVICE_BROKEN_CONFIG, "alice@root@web-01", "acct_mgmt")
    assert rc != 0 and "Error in service module" in out, out
    rc, out, ignored = pamtester(SERVICE_BROKEN_CONFIG, "root", "acct_mgmt")
    assert rc == 0 and ignored, out


# --- sessions, through libpam in this process (pamtester cannot keep a session open) ---------

class PamSession:
    """Minimal libpam driver: pam_start, set PAM_RHOST, acct_mgmt, open/close, getenv."""

    PAM_RHOST = 4

    def __init__(self, service: str, user: str, rhost: str = "127.0.0.1"):
        self.lib = ctypes.CDLL("libpam.so.0")
        self.lib.pam_getenv.restype = ctypes.c_char_p

        class Conv(ctypes.Structure):
            _fields_ = [("conv", ctypes.c_void_p), ("appdata_ptr", ctypes.c_void_p)]

        cb_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
        )
        self._cb = cb_type(lambda n, m, r, d: 19)  # PAM_CONV_ERR: the module never converses
        self._conv = Conv(ctypes.cast(self._cb, ctypes.c_void_p), None)
        self.h = ctypes.c_void_p()
        rc = self.lib.pam_start(service.encode(), user.encode(), ctypes.byref(self._conv), ctypes.byref(self.h))
        assert rc == 0, rc
        self.lib.pam_set_item(self.h, self.PAM_RHOST, rhost.encode())

    def acct(self) -> int:
        return self.lib.pam_acct_mgmt(self.h, 0)

    def open(self) -> int:
        return self.lib.pam_open_session(self.h, 0)

    def close(self) -> int:
        return self.lib.pam_close_session(self.h, 0)

    def getenv(self, name: str):
        v = self.lib.pam_getenv(self.h, name.encode())
        return v.decode() if v else None

    def end(self):
        self.lib.pam_end(self.h, 0)


def broker_pids():
    """Pids of running kmsbastion-broker processes in this namespace."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "exe").endswith("kmsbastion-broker"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_session_starts_and_ends_the_broker(pam_env):
    before = set(broker_pids())
    s = PamSession(SERVICE_SESSION, "alice@root@web-01")
    try:
        assert s.acct() == 0
        assert s.open() == 0
        sock = s.getenv("KMSBASTION_SOCKET")
        assert sock and sock.startswith(str(RUNTIME) + "/s-"), sock
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert st.st_uid == 64001, "only the engineer's uid may open the socket"
        assert stat.S_IMODE(st.st_mode) == 0o600
        new = set(broker_pids()) - before
        assert len(new) == 1, new
        (pid,) = new
        status = Path(f"/proc/{pid}/status").read_text()
        svc = pwd.getpwnam("kmsbastion")
        uids = next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1:]
        assert uids == [str(svc.pw_uid)] * 4, f"broker must run as kmsbastion for good: {uids}"
        assert "CapEff:\t0000000000000000" in status
        # Another uid cannot use the socket (root bypasses permissions, so try as nobody).
        probe = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c",
             f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({sock!r})"],
            capture_output=True, text=True,
        )
        assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe.stderr
        assert s.close() == 0
        deadline = time.time() + 5
        while pid in broker_pids() and time.time() < deadline:
            time.sleep(0.05)
        assert pid not in broker_pids(), "the broker must not outlive its session"
        assert not os.path.exists(sock)
        assert not os.path.exists(os.path.dirname(sock))
        events = [e for e in audit_events() if e["event"] == "session-open"]
        assert events and events[-1]["pid"] == pid
    finally:
        s.end()


def test_broker_ends_when_sshd_goes_away(pam_env):
    """The lifetime pipe: when the process holding the PAM handle exits, the broker follows."""
    code = f"""
import ctypes, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_pam import PamSession
s = PamSession({SERVICE_SESSION!r}, "alice@root@web-01")
assert s.acct() == 0 and s.open() == 0
print(s.getenv("KMSBASTION_SOCKET"), flush=True)
os._exit(0)   # no close_session, no pam_end: like an sshd that died
"""
    before = set(broker_pids())
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    sock = p.stdout.strip()
    assert sock.startswith(str(RUNTIME)), p.stdout
    deadline = time.time() + 5
    while set(broker_pids()) - before and time.time() < deadline:
        time.sleep(0.05)
    assert not set(broker_pids()) - before, "broker survived the end of its sshd session"
    # The socket directory is removed by the module's root sweeper, which also waits for the
    # lifetime pipe to end: it may finish a moment after the broker.
    while os.path.exists(sock) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(sock), "the session's socket outlived it"
    assert not os.path.exists(os.path.dirname(sock)), "the session's directory outlived it"


def test_plain_and_local_logins_get_no_broker(pam_env):
    for user in ("alice", "root"):
        before = set(broker_pids())
        s = PamSession(SERVICE_SESSION, user)
        try:
            assert s.acct() == 0
            assert s.open() == 0
            assert s.getenv("KMSBASTION_SOCKET") is None
            assert set(broker_pids()) == before
            assert s.close() == 0
        finally:
            s.end()


def test_denied_login_gets_no_session(pam_env):
    before = set(broker_pids())
    s = PamSession(SERVICE_SESSION, "bob@root@web-01")
    try:
        assert s.acct() != 0
        assert s.open() != 0, "open_session must refuse a composite login without a grant"
        assert s.getenv("KMSBASTION_SOCKET") is None
        assert set(broker_pids()) == before
    finally:
        s.end()
