"""End to end: the fixes of the security review of the broker (issue 4).

* root never works in a directory the ``kmsbastion`` user can write: ``runtime_dir`` must be
  root-only, each session directory is root-owned 0711, nothing is left after a session;
* grants are re-checked for every onward connection, so client-side connection sharing
  (ControlMaster) cannot outlive an expired or removed grant;
* per-login limits: onward connections per minute, and sshd's ``MaxSessions`` in the drop-in;
* the audit file is opened without blocking and only if it is a regular file;
* an unreachable target is reported by its inventory name, never by its internal address.
"""

import datetime
import os
import pwd
import re
import shutil
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from world import RUNTIME_DIR, SERVICE_USER, SSHD

LOGIN_TARGET = "web-01"
EXPIRED_LINE = "login refused: your grant for this account@host has expired"
NO_GRANT_LINE = "login refused: you have no grant for this account@host"
EXIT_REFUSED = 79
EXIT_UNREACHABLE = 75
ALICE_GRANT = '[[grant]]\nengineers = ["alice"]\naccounts = ["root@web-01", "deploy@web-02"]\nfrom = ["127.0.0.0/8"]\n'


def gets(world):
    return world.kms_stats().get("GetSecretValue", 0)


def session_dirs():
    return sorted(p for p in RUNTIME_DIR.iterdir() if p.name.startswith("s-"))


def ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def sweepers(world):
    """The PAM module's detached session-directory sweepers: copies of an sshd process whose
    parent is not an sshd (the jump and target daemons themselves excepted)."""
    sshds = set(world.pids_of(SSHD))
    daemons = {d.process.pid for d in world.daemons.values()}
    return [p for p in sshds - daemons if ppid(p) not in sshds]


def no_sessions_left(world, timeout=15):
    world.wait_for(lambda: not world.broker_pids(), timeout=timeout, what="every broker to exit")
    world.wait_for(lambda: not session_dirs(), timeout=timeout, what="every session directory to go")
    world.wait_for(lambda: not sweepers(world), timeout=timeout, what="every sweeper to exit")


def as_service_user(*argv):
    return subprocess.run(["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--clear-groups",
                           "--", *argv], capture_output=True, text=True, timeout=30)


def refused_events(world, mark):
    return [e for e in world.audit_since(mark) if e.get("event") == "refused"]


@contextmanager
def config(world, text):
    """The jump host's configuration replaced by ``text`` for the block; restored after."""
    world.write_config(text)
    try:
        yield
    finally:
        world.write_config()


@contextmanager
def control_master(world, login):
    """A client ControlMaster connection (no session of its own); yields the ``-S`` options
    that run further sessions over it."""
    control_dir = world.root / "client" / "mux-hardening"
    control_dir.mkdir(mode=0o700, exist_ok=True)
    path = control_dir / f"cm-{login.split('@')[0]}"
    master = subprocess.Popen(world.ssh_argv(login, extra_opts=["-M", "-S", str(path), "-N", "-o", "ControlPersist=no"]),
                              env=world.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        world.wait_for(lambda: subprocess.run(["ssh", "-S", str(path), "-O", "check", "x"],
                                              capture_output=True).returncode == 0,
                       timeout=15, what="the control master")
        yield ["-S", str(path), "-o", "ControlMaster=no"]
    finally:
        subprocess.run(["ssh", "-S", str(path), "-O", "exit", "x"], capture_output=True)
        try:
            master.wait(timeout=15)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()


# ---------------------------------------------------------------------------------------------
# the runtime directory: root works only where nobody else can write
# ---------------------------------------------------------------------------------------------


def test_session_directory_is_root_only_and_gone_after_the_session(world):
    no_sessions_left(world)
    rt = os.stat(RUNTIME_DIR)
    assert rt.st_uid == 0 and rt.st_mode & 0o022 == 0, oct(rt.st_mode)
    svc = pwd.getpwnam(SERVICE_USER)
    alice = world.engineers["alice"].uid
    child = world.spawn_ssh(world.login("alice", LOGIN_TARGET))
    try:
        child.sendline("echo LIVE-$((5*5))")
        child.expect("LIVE-25")
        [sdir] = session_dirs()
        assert len(sweepers(world)) == 1, "one sweeper per session"
        st = os.lstat(sdir)
        assert (stat.S_ISDIR(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (True, 0, 0, 0o711)
        p = os.lstat(sdir / "p")
        assert (stat.S_ISDIR(p.st_mode), p.st_uid, stat.S_IMODE(p.st_mode)) == (True, svc.pw_uid, 0o700)
        sock = os.lstat(sdir / "connect.sock")
        assert (stat.S_ISSOCK(sock.st_mode), sock.st_uid, stat.S_IMODE(sock.st_mode)) == (True, alice, 0o600)
        # The service user (what every broker, onward ssh and the AKC run as) can plant nothing
        # where root works: not in the runtime directory, not in a session directory.
        for where in (RUNTIME_DIR / "planted", sdir / "planted", sdir / "connect.sock"):
            r = as_service_user("ln", "-sf", "/etc/shadow", str(where))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (where, r.stdout, r.stderr)
        assert not (RUNTIME_DIR / "planted").exists() and not (sdir / "planted").exists()
        assert stat.S_ISSOCK(os.lstat(sdir / "connect.sock").st_mode)
    finally:
        child.sendline("exit")
        child.close()
    no_sessions_left(world)
    assert os.stat("/etc/shadow").st_uid == 0


def test_nothing_is_left_when_the_client_vanishes(world):
    no_sessions_left(world)
    proc = subprocess.Popen(world.ssh_argv(world.login("alice", LOGIN_TARGET), "sleep 60"), env=world.client_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    world.wait_for(session_dirs, timeout=15, what="the session directory")
    world.wait_for(lambda: [p for p in world.pids_of("/usr/bin/ssh") if os.stat(f"/proc/{p}").st_uid != 0],
                   timeout=15, what="the onward ssh")
    proc.kill()
    proc.wait()
    no_sessions_left(world)


def test_a_runtime_dir_others_can_write_is_refused(world):
    no_sessions_left(world)
    login = world.login("alice", LOGIN_TARGET)
    before = gets(world)
    try:
        for how, fix in (("owner", lambda: shutil.chown(RUNTIME_DIR, SERVICE_USER, SERVICE_USER)),
                         ("mode", lambda: os.chmod(RUNTIME_DIR, 0o1777))):
            fix()
            r = world.ssh(login, "echo should-not-run")
            assert r.returncode != 0 and "should-not-run" not in r.stdout, (how, r.returncode, r.stdout, r.stderr)
            want = "is owned by uid" if how == "owner" else "is writable by group or others"
            world.wait_for(lambda: any(f"runtime directory {RUNTIME_DIR} {want}" in line
                                       for line in world.syslog.lines()),
                           timeout=5, what=f"the refusal ({how}) on syslog")
            os.chown(RUNTIME_DIR, 0, 0)
            os.chmod(RUNTIME_DIR, 0o755)
            assert not session_dirs()
    finally:
        os.chown(RUNTIME_DIR, 0, 0)
        os.chmod(RUNTIME_DIR, 0o755)
    assert gets(world) == before, "no broker may have served anything"
    r = world.ssh(login, "echo back")
    assert (r.returncode, r.stdout) == (0, "back\n"), r.stderr
    no_sessions_left(world)


# ---------------------------------------------------------------------------------------------
# grants: re-checked for every onward connection
# ---------------------------------------------------------------------------------------------


def test_an_expired_grant_ends_new_sessions_over_a_shared_connection(world, audit_mark):
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = (now + datetime.timedelta(seconds=12)).replace(microsecond=0)
    text = world.config_text() + (
        '\n[[grant]]\nengineers = ["bob"]\naccounts = ["root@web-01"]\n'
        f'not_after = "{not_after.strftime("%Y-%m-%dT%H:%M:%SZ")}"\n')
    login = world.login("bob", LOGIN_TARGET)
    with config(world, text), control_master(world, login) as mux:
        r = world.ssh(login, "echo first", extra_opts=mux)
        assert (r.returncode, r.stdout) == (0, "first\n"), r.stderr
        wait = (not_after - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 1.5
        assert wait > 0, "the first command took longer than the grant's window"
        time.sleep(wait)
        before = gets(world)
        r = world.ssh(login, "echo second", extra_opts=mux)
        assert r.returncode == EXIT_REFUSED, (r.returncode, r.stdout, r.stderr)
        assert EXPIRED_LINE in r.stderr.splitlines(), r.stderr
        assert r.stdout == ""
        assert gets(world) == before, "a refused request must not reach KMS"
    refused = refused_events(world, audit_mark)
    assert refused and refused[-1]["engineer"] == "bob", refused
    assert "not_after" in refused[-1]["reason"], refused[-1]


def test_a_removed_grant_ends_new_sessions_over_a_shared_connection(world, audit_mark):
    text = world.config_text()
    assert ALICE_GRANT in text, "the inventory's grant for alice changed; update ALICE_GRANT"
    login = world.login("alice", LOGIN_TARGET)
    with control_master(world, login) as mux:
        r = world.ssh(login, "echo granted", extra_opts=mux)
        assert (r.returncode, r.stdout) == (0, "granted\n"), r.stderr
        with config(world, text.replace(ALICE_GRANT, "")):
            before = gets(world)
            r = world.ssh(login, "echo revoked", extra_opts=mux)
            assert r.returncode == EXIT_REFUSED, (r.returncode, r.stdout, r.stderr)
            assert NO_GRANT_LINE in r.stderr.splitlines(), r.stderr
            assert r.stdout == ""
            assert gets(world) == before
        # Granted again: the same shared connection works again.
        r = world.ssh(login, "echo regranted", extra_opts=mux)
        assert (r.returncode, r.stdout) == (0, "regranted\n"), r.stderr
    refused = refused_events(world, audit_mark)
    assert refused and "no grant rule" in refused[-1]["reason"], refused


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------


def test_onward_connections_per_login_are_rate_limited(world, audit_mark):
    login = world.login("alice", LOGIN_TARGET)
    with control_master(world, login) as mux:
        before = gets(world)
        for i in range(30):
            r = world.ssh(login, "true", extra_opts=mux)
            assert r.returncode == 0, (i, r.stderr)
        r = world.ssh(login, "echo one-too-many", extra_opts=mux)
        assert r.returncode == EXIT_REFUSED, (r.returncode, r.stdout, r.stderr)
        assert re.search(r"^too many connections to root@web-01 \(at most 30 a minute\); try again in \d+ s$",
                         r.stderr, re.M), r.stderr
        assert r.stdout == ""
        assert gets(world) - before == 30
    # Another login (its own broker) is not affected.
    r = world.ssh(login, "echo fresh")
    assert (r.returncode, r.stdout) == (0, "fresh\n"), r.stderr
    assert any("rate limit" in e.get("reason", "") for e in refused_events(world, audit_mark))


def test_the_dropin_caps_sessions_per_connection(world):
    assert world.sshd_effective(world.login("alice", LOGIN_TARGET)).get("maxsessions") == "10"


# ---------------------------------------------------------------------------------------------
# the audit file
# ---------------------------------------------------------------------------------------------


def test_a_fifo_in_place_of_the_audit_file_does_not_hang_logins(world):
    audit = world.audit_log
    saved = audit.with_name("audit.log.saved")
    os.rename(audit, saved)
    try:
        os.mkfifo(audit, 0o640)
        started = time.monotonic()
        r = world.ssh(world.login("alice", LOGIN_TARGET), "echo through", timeout=30)
        assert (r.returncode, r.stdout) == (0, "through\n"), r.stderr
        assert time.monotonic() - started < 20
        # No reader: the non-blocking open fails at once (ENXIO); with one it is refused as not
        # a regular file. Either way the event still reaches syslog.
        world.wait_for(lambda: any(f"cannot open audit file {audit}" in line for line in world.syslog.lines()),
                       timeout=5, what="the refusal of the FIFO on syslog")
    finally:
        if audit.exists() and not audit.is_file():
            audit.unlink()
        os.rename(saved, audit)
    assert stat.S_ISREG(os.lstat(audit).st_mode)


# ---------------------------------------------------------------------------------------------
# what the engineer sees of an unreachable target
# ---------------------------------------------------------------------------------------------


def test_an_unreachable_target_is_named_not_addressed(world, audit_mark):
    text = world.config_text()
    address = world.targets[LOGIN_TARGET].address
    assert f'address = "{address}"' in text
    hidden = "127.0.0.99"  # on loopback, nothing listens: connection refused at once
    with config(world, text.replace(f'address = "{address}"', f'address = "{hidden}"')):
        r = world.ssh(world.login("alice", LOGIN_TARGET), "echo unreachable")
    assert r.returncode == EXIT_UNREACHABLE, (r.returncode, r.stdout, r.stderr)
    assert "cannot connect to web-01: connection refused" in r.stderr.splitlines(), r.stderr
    assert hidden not in r.stderr
    ends = [e for e in world.audit_since(audit_mark) if e.get("event") == "connect-end"]
    assert ends and ends[-1]["result"] == "unreachable", ends
    assert hidden in ends[-1]["reason"], "the jump host's log keeps ssh's own line"


# ---------------------------------------------------------------------------------------------
# a busy target
# ---------------------------------------------------------------------------------------------


def test_a_target_that_turns_connections_away_before_its_banner_is_tried_again(world, audit_mark):
    """sshd's MaxStartups drops new connections before the SSH banner while too many are
    starting: nothing was sent, so the broker tries again (jittered, doubling pauses) instead
    of failing the login. Here one stalled connection fills the target's only startup slot for
    0.6 s; the login still works, with one KMS fetch."""
    import socket

    with world.target_sshd_with(LOGIN_TARGET, "MaxStartups 1\n") as t:
        def take_the_slot():
            # The reload's own probe may still hold the slot for a moment.
            s = socket.create_connection((t.address, t.port), timeout=5)
            if s.recv(64).startswith(b"SSH-2.0-"):
                return s
            s.close()
            return None
        hog = world.wait_for(take_the_slot, timeout=10, what="the target's only startup slot")
        try:
            # While the hog holds the slot, the target really does turn connections away.
            probe = socket.create_connection((t.address, t.port), timeout=5)
            assert not probe.recv(64).startswith(b"SSH-2.0-"), "the target should drop a second startup"
            probe.close()
            before = gets(world)
            releaser = threading.Timer(0.6, hog.close)
            releaser.start()
            r = world.ssh(world.login("alice", LOGIN_TARGET), "echo through")
            releaser.join()
        finally:
            hog.close()
    assert (r.returncode, r.stdout) == (0, "through\n"), r.stderr
    assert gets(world) - before == 1
    log = (world.log_dir / "syslog.log").read_text()
    assert re.search(r"root@web-01: the target dropped the connection before its SSH banner .*; trying again in \d+ ms", log), log[-3000:]


def test_prepared_connections_per_target_are_capped(world, audit_mark):
    """Logins that never ask for a session (``ssh -N``) cannot crowd a target's sshd with
    waiting connections: at most 8 prepared connections per host wait at a time, jump host
    wide; the ninth login prepares nothing (it would connect when asked), and once they are
    gone the next login prepares one again."""
    login = world.login("alice", "web-02")
    procs = [subprocess.Popen(world.ssh_argv(login, extra_opts=["-N"]), env=world.client_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(9)]
    try:
        def unused():
            return [e for e in world.audit_since(audit_mark) if e.get("event") == "preconnect"]
        world.wait_for(lambda: len(unused()) >= 8, timeout=40, what="the idle prepared connections to close")
        time.sleep(1)
        assert [e["result"] for e in unused()] == ["unused"] * 8
        log = (world.log_dir / "syslog.log").read_text()
        assert "8 prepared connections to web-02 already wait; this login connects when its request comes" in log
        assert all(p.poll() is None for p in procs), "the engineers' own connections stay up"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
    mark = world.audit_mark()
    r = world.ssh(login, "echo again")
    assert (r.returncode, r.stdout) == (0, "again\n"), r.stderr
    assert [e["result"] for e in world.audit_since(mark) if e.get("event") == "preconnect"] == ["used"]
