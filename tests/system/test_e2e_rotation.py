"""End to end: KMS rotation never breaks access.

RotateSecret makes the emulator generate a new credential (RSA-2048 key pair or 32-character
password) and run the rotation hook, which applies it to the target as Cloud Assistant would.
"""

import json

import pexpect
import pytest

from world import KmsApiError


def connect_ends(world, mark, **fields):
    return [e for e in world.audit_since(mark)
            if e.get("event") == "connect-end" and all(e.get(k) == v for k, v in fields.items())]


def current_version(world, target):
    return world.kms.get_secret_value(world.targets[target].secret_name)["VersionId"]


@pytest.mark.parametrize("target", ["web-01", "web-02"])
def test_next_connection_uses_the_new_version(world, target):
    login = world.login("alice", target)
    mark = world.audit_mark()
    assert world.ssh(login, "true").returncode == 0
    old = connect_ends(world, mark, host=target)[-1]["version_id"]
    new = world.rotate(target)
    assert new != old and current_version(world, target) == new
    mark = world.audit_mark()
    r = world.ssh(login, "id -un")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == world.targets[target].account
    end = connect_ends(world, mark, host=target)[-1]
    assert end["version_id"] == new
    assert end["version_ids"] == [new], "no fallback should be needed after a clean rotation"


def test_an_open_session_survives_rotation(world):
    child = world.spawn_ssh(world.login("alice", "web-01"))
    try:
        child.sendline("echo BEFORE-$((1+1))")
        child.expect("BEFORE-2")
        new = world.rotate("web-01")
        # web-01 no longer accepts the key this session authenticated with ...
        previous = json.loads(world.kms.get_secret_value("acs/ecs/web-01/root", "ACSPrevious")["SecretData"])
        assert previous["PublicKey"].split()[1] not in world.targets["web-01"].authorized_keys.read_text()
        child.sendline("echo AFTER-$((2+2))")
        child.expect("AFTER-4")
        child.sendline("exit 0")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # ... and a new connection uses the new version.
    mark = world.audit_mark()
    assert world.ssh(world.login("alice", "web-01"), "true").returncode == 0
    assert connect_ends(world, mark, host="web-01")[-1]["version_id"] == new


@pytest.mark.parametrize("target", ["web-01", "web-02"])
def test_rotation_race_falls_back_to_previous(world, target):
    """The hook reports success but the target still has the old credential (Cloud Assistant
    has not run yet): ACSCurrent is rejected, ACSPrevious connects."""
    login = world.login("alice", target)
    previous = current_version(world, target)
    new = world.rotate(target, hook_mode="skip")
    try:
        assert current_version(world, target) == new
        before = world.kms_stats().get("GetSecretValue", 0)
        mark = world.audit_mark()
        r = world.ssh(login, "id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == world.targets[target].account
        end = connect_ends(world, mark, host=target)[-1]
        assert end["version_ids"] == [new, previous]
        assert end["version_id"] == previous
        assert world.kms_stats().get("GetSecretValue", 0) - before == 2
    finally:
        world.apply_current_credential(target)
    # Once the target has caught up, ACSCurrent works again without a fallback.
    mark = world.audit_mark()
    assert world.ssh(login, "true").returncode == 0
    assert connect_ends(world, mark, host=target)[-1]["version_ids"] == [new]


def test_failed_rotation_keeps_the_current_version(world):
    """The hook fails: stages do not move, logins keep using the old version."""
    before = current_version(world, "web-01")
    with pytest.raises(KmsApiError):
        world.rotate("web-01", hook_mode="fail")
    assert current_version(world, "web-01") == before
    mark = world.audit_mark()
    assert world.ssh(world.login("alice", "web-01"), "true").returncode == 0
    assert connect_ends(world, mark, host="web-01")[-1]["version_id"] == before
