"""End to end: a hostile engineer. Every attempt must fail safely.

The jump host and each target have separate /tmp directories (the targets' sshd run in their
own mount namespaces), so a marker file tells WHERE a command ran: a marker in the jump
host's /tmp means something ran on the jump host, which must never happen; a marker in a
target's /tmp means the target account's own shell ran it, which is what ssh does.

The last test searches the whole namespace for the credentials after all of this.
"""

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from world import BASTION_GID

LOGIN_TARGET = "web-01"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_jump(name):
    return Path("/tmp") / name


def on_target(world, name, target=LOGIN_TARGET):
    return world.target_path(target, f"/tmp/{name}")


def gets(world):
    return world.kms_stats().get("GetSecretValue", 0)


def no_brokers_left(world, timeout=10):
    world.wait_for(lambda: not world.broker_pids(), timeout=timeout, what="every broker to exit")


def wait_listening(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"ssh never listened on {port}")


def recv_some(sock, timeout=3.0):
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


# ---------------------------------------------------------------------------------------------
# forwarding
# ---------------------------------------------------------------------------------------------


def test_local_forwarding_reaches_nothing(world):
    port = free_port()
    login = world.login("alice", LOGIN_TARGET)
    proc = subprocess.Popen(world.ssh_argv(login, "sleep 4", extra_opts=["-L", f"127.0.0.1:{port}:127.0.0.3:22"]),
                            env=world.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        with socket.create_connection(("127.0.0.1", port)) as s:
            assert b"SSH-" not in recv_some(s), "a -L forward reached web-02's sshd"
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0  # the session itself ran ("sleep 4")
    # The jump sshd refused the channel itself (DisableForwarding), before anything connected.
    assert "refused local port forward: originator 127.0.0.1 port " in (world.log_dir / "sshd-jump.log").read_text()


def test_dynamic_forwarding_reaches_nothing(world):
    port = free_port()
    proc = subprocess.Popen(world.ssh_argv(world.login("alice", LOGIN_TARGET), "sleep 4", extra_opts=["-D", f"127.0.0.1:{port}"]),
                            env=world.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x05\x01\x00")
            assert recv_some(s, 5)[:2] == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.3") + struct.pack(">H", 22))
            reply = recv_some(s)
            assert b"SSH-" not in reply, "a SOCKS forward reached web-02's sshd"
            assert reply[:2] != b"\x05\x00", f"SOCKS CONNECT succeeded: {reply!r}"
    finally:
        proc.wait(timeout=30)


def test_remote_forwarding_is_refused(world):
    port = free_port()
    r = world.ssh(world.login("alice", LOGIN_TARGET), "sleep 1",
                  extra_opts=["-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{port}:127.0.0.3:22"])
    assert r.returncode == 255, (r.returncode, r.stderr)
    assert "remote port forwarding failed" in r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_stdio_forwarding_is_refused(world):
    r = world.ssh(world.login("alice", LOGIN_TARGET), extra_opts=["-W", "127.0.0.3:22"], text=False, timeout=20)
    assert r.returncode == 255, r
    assert b"SSH-" not in r.stdout


def test_agent_and_x11_forwarding_do_not_reach_the_target(world):
    agent_sock = world.root / "client" / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        world.wait_for(agent_sock.exists, what="ssh-agent socket")
        subprocess.run(["ssh-add", str(world.admin_key)], env={"SSH_AUTH_SOCK": str(agent_sock)},
                       check=True, capture_output=True)
        r = world.ssh(world.login("alice", LOGIN_TARGET), 'echo "agent=[$SSH_AUTH_SOCK] display=[$DISPLAY]"',
                      extra_opts=["-o", f"ForwardAgent={agent_sock}", "-X", "-o", "ForwardX11Trusted=no"],
                      env=world.client_env(DISPLAY=":0"))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "agent=[] display=[]\n"


def test_n_session_runs_nothing_and_leaves_nothing(world, audit_mark):
    before = gets(world)
    proc = subprocess.Popen(world.ssh_argv(world.login("alice", LOGIN_TARGET), extra_opts=["-N"]),
                            env=world.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(2.5)
    assert proc.poll() is None, proc.communicate()
    proc.terminate()
    proc.wait(timeout=10)
    assert gets(world) == before, "an -N session must not fetch a credential"
    assert not [e for e in world.audit_since(audit_mark) if e.get("event") == "connect-start"]
    no_brokers_left(world)


# ---------------------------------------------------------------------------------------------
# command and environment injection
# ---------------------------------------------------------------------------------------------

# Each command, run by the TARGET account's shell, creates its marker on the target, as the
# same command given to ssh directly would; nothing may run on the jump host.
SHELL_INJECTIONS = {
    "semicolon": "true; touch /tmp/inj-semicolon",
    "backticks": "echo `touch /tmp/inj-backticks`",
    "dollar": "echo $(touch /tmp/inj-dollar)",
    "newline": "true\ntouch /tmp/inj-newline",
    "and": "false || touch /tmp/inj-and",
    "pipe": "echo | touch /tmp/inj-pipe",
}


@pytest.mark.parametrize("name", sorted(SHELL_INJECTIONS))
def test_shell_metacharacters_reach_only_the_targets_shell(world, name):
    r = world.ssh(world.login("alice", LOGIN_TARGET), SHELL_INJECTIONS[name])
    assert r.returncode == 0, r.stderr
    assert on_target(world, f"inj-{name}").exists(), "the target's shell did not see the command as given"
    assert not on_jump(f"inj-{name}").exists(), "the command ran ON THE JUMP HOST"


def test_command_is_interpreted_exactly_as_a_direct_login_would(world):
    cmd = """printf '[%s]' "a;b" $(echo sub) `echo tick` 'q"uote' x\\ y; echo; echo $((6*7)) "$0" ${HOME}"""
    via = world.ssh(world.login("alice", LOGIN_TARGET), cmd)
    direct = world.direct_ssh(LOGIN_TARGET, cmd)
    assert via.returncode == direct.returncode == 0, (via.stderr, direct.stderr)
    assert via.stdout == direct.stdout
    assert via.stdout.startswith("[a;b][sub][tick][q\"uote][x y]\n42 ")


@pytest.mark.parametrize("cmd", [
    "-oProxyCommand=touch /tmp/opt-proxy",
    "-oLocalCommand=touch /tmp/opt-local -oPermitLocalCommand=yes",
    "-F /tmp/opt-config",
    "--help; touch /tmp/opt-help",
])
def test_commands_that_look_like_ssh_options_are_not_options(world, cmd):
    """If the broker put the command into the onward ssh's argv without a `--`, ssh would
    take these as its own options and run them on the jump host."""
    Path("/tmp/opt-config").write_text("Host *\n  ProxyCommand touch /tmp/opt-config-ran\n")
    r = world.ssh(world.login("alice", LOGIN_TARGET), cmd)
    for marker in ("opt-proxy", "opt-local", "opt-config-ran"):
        assert not on_jump(marker).exists(), f"{cmd!r} ran on the jump host"
    # The target's shell got it as a command (and has no such program), like a direct login.
    direct = world.direct_ssh(LOGIN_TARGET, cmd)
    assert r.returncode == direct.returncode, (r.stderr, direct.stderr)


def test_hostile_environment_is_inert(world):
    Path("/tmp/env-evil.sh").write_text("touch /tmp/env-bash-env-ran\n")
    env = world.client_env(
        LANG="C.UTF-8$(touch /tmp/env-lang)",
        LC_KMSB="`touch /tmp/env-lc`",
        BASH_ENV="/tmp/env-evil.sh",
        LD_PRELOAD="/tmp/env-evil.so",
    )
    r = world.ssh(world.login("alice", LOGIN_TARGET), 'echo "ok $BASH_ENV $LD_PRELOAD"',
                  extra_opts=["-o", "SendEnv=LANG LC_KMSB BASH_ENV LD_PRELOAD",
                              "-o", "SetEnv=LC_SET=$(id>/tmp/env-set) BASH_ENV=/tmp/env-evil.sh"],
                  env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok"], "BASH_ENV/LD_PRELOAD reached the target's shell"
    for marker in ("env-lang", "env-lc", "env-set", "env-bash-env-ran"):
        assert not on_jump(marker).exists(), f"{marker}: ran on the jump host"
        assert not on_target(world, marker).exists(), f"{marker}: an environment value was executed"


@pytest.mark.parametrize("term", [
    "xterm$(touch /tmp/term-dollar)",
    "xterm`touch /tmp/term-tick`",
    "xterm\n-oProxyCommand=touch /tmp/term-proxy",
    "../../../../tmp/term-path",
    "x" * 5000,
])
def test_hostile_term_is_inert(world, term):
    r = world.ssh(world.login("alice", LOGIN_TARGET), "echo TERM-OK", tty=True, env=world.client_env(TERM=term), timeout=30)
    # Either the session runs (the broker replaced or passed the TERM as data) or it is
    # refused with one line; it never runs anything on the jump host.
    assert r.returncode in (0, 79), (r.returncode, r.stdout, r.stderr)
    if r.returncode == 0:
        assert "TERM-OK" in r.stdout
    for marker in ("term-dollar", "term-tick", "term-proxy"):
        assert not on_jump(marker).exists()
        assert not on_target(world, marker).exists()


# ---------------------------------------------------------------------------------------------
# brokers, sockets, other targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("login", [
    "alice@deploy@web-01",     # an account of another host
    "alice@root@web-03",       # a host not in the inventory
    "alice@root@127.0.0.2",    # an address instead of an inventory name
    "alice@root@web-01;id",
    "alice@root@web-01@web-02",
    "alice@@web-01",
    "bob@root@web-01",         # another engineer's name with alice's key
])
def test_only_inventory_accounts_of_ones_own_grant_can_be_asked_for(world, login):
    before = gets(world)
    r = world.ssh(login, "touch /tmp/other-target; id -un", key=world.engineers["alice"].key)
    assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert gets(world) == before
    for t in world.targets:
        assert not on_target(world, "other-target", t).exists()


@pytest.mark.parametrize("cmd", [
    "-oHostName=127.0.0.3 -l deploy id -un",
    "id -un -oHostName=127.0.0.3 -l deploy; echo $SSH_CONNECTION | cut -d' ' -f3,4",
    "-p 2222 -l deploy 127.0.0.3 id -un",
])
def test_a_command_cannot_redirect_the_onward_connection(world, cmd):
    """Whatever the command says, the onward connection goes to this login's host and
    account, and the target's shell sees the command exactly as on a direct login (bash
    itself parses a leading `-o…` as its own options)."""
    r = world.ssh(world.login("alice", LOGIN_TARGET), cmd)
    direct = world.direct_ssh(LOGIN_TARGET, cmd)
    assert "deploy" not in r.stdout
    assert (r.returncode, r.stdout) == (direct.returncode, direct.stdout), (r, direct)


@pytest.fixture
def alice_session(world):
    """An open interactive session of alice@root@web-01 and its broker socket."""
    no_brokers_left(world)  # sessions of earlier tests may still be shutting down
    before = {s["pid"] for s in world.sessions()}
    child = world.spawn_ssh(world.login("alice", LOGIN_TARGET))
    try:
        child.sendline("echo OPEN-$((2*3))")
        child.expect("OPEN-6")
        sessions = [s for s in world.sessions() if s["pid"] not in before]
        assert len(sessions) == 1 and sessions[0]["socket"], sessions
        assert sessions[0]["uid"] == world.engineers["alice"].uid
        yield sessions[0]
    finally:
        child.sendline("exit")
        child.close()


def assert_knock_refused(world, report, marker):
    """The broker did nothing for the knocker: the socket could not be opened, or the broker
    hung up or answered "refused" (79), and the command ran nowhere."""
    reply = report["reply"] or {}
    refused = (report["connect_error"] is not None or reply.get("closed") or "error" in reply
               or reply.get("failed") == 79)
    assert refused, report
    assert "root" not in report["stdout"], report
    assert not on_target(world, marker).exists()
    assert not on_jump(marker).exists()


def test_another_engineer_cannot_use_a_sessions_broker(world, alice_session):
    before = gets(world)
    bob = world.engineers["bob"].uid
    report = world.knock(alice_session["socket"], "touch /tmp/knock-bob; id -un", uid=bob, gid=BASTION_GID)
    assert_knock_refused(world, report, "knock-bob")
    # Nor can the kmsbastion service user's neighbours: a plain local account.
    admin = int(subprocess.run(["id", "-u", "admin"], capture_output=True, text=True).stdout)
    report = world.knock(alice_session["socket"], "touch /tmp/knock-admin; id -un", uid=admin, gid=admin)
    assert_knock_refused(world, report, "knock-admin")
    assert gets(world) == before


def test_the_same_engineer_outside_the_session_cannot_use_its_broker(world, alice_session):
    before = gets(world)
    report = world.knock(alice_session["socket"], "touch /tmp/knock-alice; id -un",
                         uid=world.engineers["alice"].uid, gid=BASTION_GID)
    assert_knock_refused(world, report, "knock-alice")
    assert gets(world) == before


def test_each_session_has_its_own_broker_socket(world, alice_session):
    """A second session of the same engineer gets a broker and a socket of its own (so one
    session's peer check can never be satisfied by another session's processes)."""
    other = world.spawn_ssh(world.login("alice", "web-02"))
    try:
        other.sendline("echo SECOND-$((3*3))")
        other.expect("SECOND-9")
        sockets = {s["socket"] for s in world.sessions() if s["uid"] == world.engineers["alice"].uid}
        assert alice_session["socket"] in sockets and len(sockets) == 2, sockets
        assert len(world.broker_pids()) >= 2
    finally:
        other.sendline("exit")
        other.close()


def test_no_broker_outlives_its_session(world):
    no_brokers_left(world)
    child = world.spawn_ssh(world.login("alice", LOGIN_TARGET))
    child.sendline("echo LIVE-$((4*4))")
    child.expect("LIVE-16")
    assert world.broker_pids(), "no broker while a session is open"
    child.sendline("exit")
    child.close()
    no_brokers_left(world)
    # An abruptly killed client: sshd sees the connection drop, the session ends, and with it
    # the broker and its onward ssh (the target's command is cut off too).
    proc = subprocess.Popen(world.ssh_argv(world.login("alice", LOGIN_TARGET), "sleep 60"), env=world.client_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    world.wait_for(world.broker_pids, timeout=15, what="a broker for the sleeping session")
    world.wait_for(lambda: [p for p in world.pids_of("/usr/bin/ssh") if os.stat(f"/proc/{p}").st_uid != 0],
                   timeout=15, what="the onward ssh")
    proc.kill()
    proc.wait()
    no_brokers_left(world, timeout=15)
    world.wait_for(lambda: not [p for p in world.pids_of("/usr/bin/ssh") if os.stat(f"/proc/{p}").st_uid != 0],
                   timeout=15, what="the onward ssh to exit")


# ---------------------------------------------------------------------------------------------
# finally: is the credential anywhere it should not be?
# ---------------------------------------------------------------------------------------------


def needles_for(world):
    needles = []
    for target in world.targets:
        for data in world.secret_values(target):
            if "Password" in data:
                needles.append(data["Password"].encode())
            if "PrivateKey" in data:
                body = [l for l in data["PrivateKey"].splitlines() if l and not l.startswith("-----")]
                # Two distinctive lines of the PEM body (a line is 64 base64 characters).
                needles += [body[1].encode(), body[len(body) // 2].encode()]
    return needles


def test_the_leak_scan_finds_planted_bytes(world):
    """Positive control for the scan below: it does see files, environments and argv."""
    needle = os.urandom(12).hex().encode()
    planted = world.log_dir / "planted.txt"
    planted.write_bytes(b"x" + needle + b"y")
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 30", needle.decode()[::-1]], env={"PLANTED": needle.decode()})
    try:
        hits = world.scan_for([needle, needle[::-1]])
    finally:
        proc.kill()
        proc.wait()
        planted.unlink()
    assert f"{planted}: needle 0" in hits
    assert f"/proc/{proc.pid}/environ: needle 0" in hits
    assert f"/proc/{proc.pid}/cmdline: needle 1" in hits


def test_the_credential_is_nowhere_on_the_jump_host(world):
    # Use both credential types, rotate both (so ACSPrevious exists too), and keep a session
    # open while searching (a live broker, a live onward ssh).
    for target in world.targets:
        assert world.ssh(world.login("alice", target), "true").returncode == 0
        world.rotate(target)
        assert world.ssh(world.login("alice", target), "true").returncode == 0
    needles = needles_for(world)
    assert len(needles) == 6  # 2 passwords, 2 × 2 key lines
    children = [world.spawn_ssh(world.login("alice", target)) for target in world.targets]
    try:
        for child in children:
            child.sendline("echo SCAN-$((5*5))")
            child.expect("SCAN-25")
        assert len(world.broker_pids()) >= 2
        hits = world.scan_for(needles)
    finally:
        for child in children:
            child.sendline("exit")
            child.close()
    assert hits == [], f"credential bytes found: {hits}"
    # The audit log is part of the scan; say so explicitly since it is the likeliest leak.
    audit = world.audit_log.read_bytes()
    assert audit and not any(n in audit for n in needles)
    no_brokers_left(world)
    assert world.scan_for(needles) == []
