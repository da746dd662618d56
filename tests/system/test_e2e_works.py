"""End to end through real OpenSSH: what an engineer does every day works through the bastion.

Every test logs in as ``engineer@account@host`` at the jump sshd (NSS module, AuthorizedKeysCommand,
PAM module, broker, login shell, onward ssh) and checks what happened ON THE TARGET: the targets'
sshd run in their own mount namespaces, so files they write are in their private /tmp.
"""

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pexpect

from world import BIN_DIR, SSHD


def connect_ends(world, mark, **fields):
    """The ``connect-end`` audit events after ``mark`` that match ``fields``."""
    return [e for e in world.audit_since(mark)
            if e.get("event") == "connect-end" and all(e.get(k) == v for k, v in fields.items())]


def test_sshd_applies_the_shipped_dropin_to_engineers_only(world):
    """`sshd -T` for an engineer shows the drop-in's Match block; a local account is untouched."""
    eng = world.sshd_effective("alice@root@web-01")
    assert eng["forcecommand"] == f"{BIN_DIR}/kmsbastion-connect"
    assert eng["authorizedkeyscommand"] == f"{BIN_DIR}/kmsbastion-keys %u %t %k"
    assert eng["authorizedkeyscommanduser"] == "kmsbastion"
    assert eng["authorizedkeysfile"] == "none"
    assert eng["disableforwarding"] == "yes"
    assert eng["permittty"] == "yes"
    assert eng["permituserrc"] == "no"
    assert eng["permittunnel"] == "no"
    admin = world.sshd_effective("admin")
    assert admin["forcecommand"] == "none"
    assert admin["authorizedkeyscommand"] == "none"
    assert admin["disableforwarding"] == "no"
    # The main file's later lines are still in force (the drop-in's Match did not swallow them).
    assert admin["subsystem"].startswith("sftp ")


def test_command_runs_on_the_target_as_the_account(world, audit_mark):
    r = world.ssh(world.login("alice", "web-01"), 'id -un; echo "$SSH_CONNECTION"; pwd')
    assert r.returncode == 0, r.stderr
    user, conn, cwd = r.stdout.splitlines()
    assert user == "root"
    # The target saw a connection to its own address: the onward ssh, not the engineer.
    assert conn.split()[2:] == ["127.0.0.2", "22"]
    assert cwd == "/root"
    ends = connect_ends(world, audit_mark, engineer="alice", account="root", host="web-01")
    assert ends, world.audit_since(audit_mark)
    end = ends[-1]
    assert end["secret"] == "acs/ecs/web-01/root"
    assert end["result"] == "ok"
    assert end["exit_status"] == 0
    assert end["version_id"] == world.kms.get_secret_value("acs/ecs/web-01/root")["VersionId"]
    assert end["fingerprint"].startswith("SHA256:")
    assert "duration_ms" in end


def test_password_target(world, audit_mark):
    r = world.ssh(world.login("alice", "web-02"), "id -un; pwd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["deploy", "/home/deploy"]
    end = connect_ends(world, audit_mark, account="deploy", host="web-02")[-1]
    assert end["secret"] == "acs/ecs/web-02/deploy"
    assert end["result"] == "ok"
    assert "fingerprint" not in end


def test_exit_status_is_propagated(world):
    assert world.ssh(world.login("alice", "web-01"), "exit 7").returncode == 7
    assert world.ssh(world.login("alice", "web-02"), "exit 42").returncode == 42
    r = world.ssh(world.login("alice", "web-01"), "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_interactive_pty_tty_and_window_resize(world):
    child = world.spawn_ssh(world.login("alice", "web-01"), dimensions=(24, 80))
    try:
        child.sendline("echo READY-$((6*7))")
        child.expect("READY-42")
        child.sendline("tty")
        child.expect(r"/dev/pts/\d+")
        child.sendline("echo SIZE-$(stty size | tr ' ' x)")
        child.expect(r"SIZE-24x80")
        child.setwinsize(40, 132)
        deadline = time.monotonic() + 10
        while True:
            child.sendline("echo SIZE-$(stty size | tr ' ' x)")
            i = child.expect([r"SIZE-40x132", r"SIZE-\d+x\d+"])
            if i == 0:
                break
            assert time.monotonic() < deadline, "the window change never reached the target's pty"
            time.sleep(0.2)
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


def test_stdin_and_stdout_stream_binary_data(world):
    data = os.urandom(3 * 1024 * 1024 + 17)
    login = world.login("alice", "web-01")
    r = world.ssh(login, "cat > /tmp/kmsb-stream && sha256sum /tmp/kmsb-stream", input=data, text=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # The file is on the target (its private /tmp), not on the jump host.
    assert world.target_path("web-01", "/tmp/kmsb-stream").read_bytes() == data
    assert not Path("/tmp/kmsb-stream").exists()
    back = world.ssh(login, "cat /tmp/kmsb-stream", text=False)
    assert back.returncode == 0 and back.stdout == data


def _client_opts(world, login):
    e = world.engineers[login.split("@")[0]]
    return ["-F", "none", "-i", str(e.key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={world.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"User={login}"]


def _run(argv, world, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=world.client_env(),
                          stdin=subprocess.DEVNULL, **kw)


def test_scp_both_protocols(world, tmp_path):
    login = world.login("alice", "web-01")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(200_000))
    for flag, name in (([], "scp-sftp"), (["-O"], "scp-legacy")):
        up = _run(["scp", *flag, *_client_opts(world, login), "-P", "22", str(src), f"{world.jump_addr}:/tmp/{name}"], world)
        assert up.returncode == 0, f"{name} upload: {up.stderr}"
        assert world.target_path("web-01", f"/tmp/{name}").read_bytes() == src.read_bytes()
        down = tmp_path / f"{name}.down"
        r = _run(["scp", *flag, *_client_opts(world, login), "-P", "22", f"{world.jump_addr}:/tmp/{name}", str(down)], world)
        assert r.returncode == 0, f"{name} download: {r.stderr}"
        assert down.read_bytes() == src.read_bytes()


def test_sftp(world, tmp_path):
    login = world.login("alice", "web-02")
    src = tmp_path / "sftp.bin"
    src.write_bytes(os.urandom(100_000))
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} /tmp/sftp-up\nget /tmp/sftp-up {tmp_path}/sftp.down\nls -l /tmp/sftp-up\npwd\n")
    r = _run(["sftp", *_client_opts(world, login), "-P", "22", "-b", str(batch), world.jump_addr], world)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sftp.down").read_bytes() == src.read_bytes()
    assert world.target_path("web-02", "/tmp/sftp-up").read_bytes() == src.read_bytes()
    assert "/home/deploy" in r.stdout  # pwd: the target account's home


def test_rsync_over_ssh(world, tmp_path):
    login = world.login("alice", "web-01")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(20):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(5000 + i))
    ssh_cmd = " ".join(["ssh", *_client_opts(world, login)])
    r = _run(["rsync", "-a", "-e", ssh_cmd, f"{tree}/", f"{world.jump_addr}:/tmp/rsync-tree/"], world)
    assert r.returncode == 0, r.stderr
    for i in range(20):
        assert world.target_path("web-01", f"/tmp/rsync-tree/sub/f{i}").read_bytes() == (tree / "sub" / f"f{i}").read_bytes()
    back = tmp_path / "back"
    r = _run(["rsync", "-a", "-e", ssh_cmd, f"{world.jump_addr}:/tmp/rsync-tree/", f"{back}/"], world)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (back / "sub").iterdir()) == sorted(f"f{i}" for i in range(20))


def test_two_channels_over_one_multiplexed_connection(world, audit_mark):
    login = world.login("alice", "web-01")
    control_dir = world.root / "client" / "mux"
    control_dir.mkdir(mode=0o700, exist_ok=True)
    path = control_dir / "cm"
    before = world.kms_stats().get("GetSecretValue", 0)
    master = subprocess.Popen(world.ssh_argv(login, extra_opts=["-M", "-S", str(path), "-N", "-o", "ControlPersist=no"]),
                              env=world.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        world.wait_for(lambda: subprocess.run(["ssh", "-S", str(path), "-O", "check", "x"], capture_output=True).returncode == 0,
                       timeout=15, what="the control master")
        mux = ["-S", str(path), "-o", "ControlMaster=no"]
        one = subprocess.Popen(world.ssh_argv(login, "sleep 1; echo one; exit 11", extra_opts=mux), env=world.client_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        two = subprocess.Popen(world.ssh_argv(login, "echo two; exit 12", extra_opts=mux), env=world.client_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out1, err1 = one.communicate(timeout=60)
        out2, err2 = two.communicate(timeout=60)
        assert (one.returncode, out1) == (11, "one\n"), err1
        assert (two.returncode, out2) == (12, "two\n"), err2
    finally:
        subprocess.run(["ssh", "-S", str(path), "-O", "exit", "x"], capture_output=True)
        master.wait(timeout=15)
    # Each channel got its own onward connection and its own fresh KMS fetch.
    assert world.kms_stats().get("GetSecretValue", 0) - before == 2
    assert sorted(e["exit_status"] for e in connect_ends(world, audit_mark, engineer="alice")) == [11, 12]


def test_first_request_rides_the_connection_prepared_at_login(world, audit_mark):
    """While sshd is still setting up the session, the broker already connects to the target
    and verifies its host key; the first request fetches the credential, which authenticates
    that connection, and runs as its one session: still one KMS fetch at request time, one
    onward connection, the same audit record."""
    before = world.kms_stats().get("GetSecretValue", 0)
    r = world.ssh(world.login("alice", "web-01"), "echo $SSH_CONNECTION; exit 5")
    assert r.returncode == 5, r.stderr
    assert r.stdout.split()[2:] == ["127.0.0.2", "22"]
    assert world.kms_stats().get("GetSecretValue", 0) - before == 1
    events = world.audit_since(audit_mark)
    assert [e["result"] for e in events if e.get("event") == "preconnect"] == ["used"], events
    end = connect_ends(world, audit_mark, engineer="alice")[-1]
    assert end["result"] == "ok" and end["exit_status"] == 5
    assert end["version_id"] == world.kms.get_secret_value("acs/ecs/web-01/root")["VersionId"]
    assert end["fingerprint"].startswith("SHA256:")
    # The password target the same way.
    r = world.ssh(world.login("alice", "web-02"), "id -un")
    assert (r.returncode, r.stdout) == (0, "deploy\n"), r.stderr
    assert [e["result"] for e in world.audit_since(audit_mark) if e.get("event") == "preconnect"] == ["used", "used"]


def test_the_targets_pre_login_banner_still_reaches_the_engineer(world):
    """A legal-warning ``Banner`` of the target is shown before the session, as plain ssh
    shows it, although the prepared connection authenticated without a terminal."""
    t = world.targets["web-01"]
    banner = t.dir / "banner.txt"
    banner.write_text("AUTHORIZED USE ONLY: activity on web-01 is recorded\n")
    with world.target_sshd_with("web-01", f"Banner {banner}\n"):
        r = world.ssh(world.login("alice", "web-01"), "echo session")
    assert (r.returncode, r.stdout) == (0, "session\n"), r.stderr
    assert "AUTHORIZED USE ONLY: activity on web-01 is recorded" in r.stderr


def test_a_prepared_connection_nobody_uses_is_closed(world, audit_mark):
    """A login that never asks for a session (``ssh -N``) leaves the prepared connection
    waiting for a credential it never gets (nothing is fetched): the broker closes it after
    5 s and says so."""
    before = world.kms_stats().get("GetSecretValue", 0)
    login = world.login("alice", "web-02")
    idle = subprocess.Popen(world.ssh_argv(login, extra_opts=["-N"]), env=world.client_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def closed():
            return [e for e in world.audit_since(audit_mark) if e.get("event") == "preconnect"]
        world.wait_for(lambda: closed(), timeout=40, what="the idle prepared connection to be closed")
        assert [e["result"] for e in closed()] == ["unused"]
        assert not connect_ends(world, audit_mark, engineer="alice")
        assert world.kms_stats().get("GetSecretValue", 0) == before
        assert idle.poll() is None, "the engineer's own connection stays up"
    finally:
        idle.terminate()
        idle.wait(timeout=15)


def test_plain_login_lists_what_the_engineer_may_reach(world):
    r = world.ssh("alice")
    out = r.stdout + r.stderr
    assert "root@web-01" in out and "deploy@web-02" in out, out
    assert "alice@root@web-01@" in out and "alice@deploy@web-02@" in out, out


def test_local_admin_logs_in_normally(world, audit_mark):
    r = world.ssh("admin", 'id -un; echo "$HOME"; echo "$SSH_CONNECTION"')
    assert r.returncode == 0, r.stderr
    user, home, conn = r.stdout.splitlines()
    assert (user, home) == ("admin", "/home/admin")
    assert conn.split()[2:] == [world.jump_addr, "22"]  # a shell on the jump host itself
    # Not a bastion login: no broker, no audit event.
    assert world.audit_since(audit_mark) == []


def test_sshd_config_of_jump_is_valid_with_the_dropin(world):
    r = subprocess.run([SSHD, "-t", "-f", str(world.root / "jump" / "sshd_config")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
