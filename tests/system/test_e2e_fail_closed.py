"""End to end: every failure closes the door and says why, in exactly one line.

The lines are DESIGN.md's failure table; the exit statuses are kmsbastion-connect's
(src/session.rs). Refused logins (no grant, wrong source, expired grant) never reach PAM's
session stage: no broker starts and KMS is never asked.
"""

import time

import pytest

from world import CREDENTIALS_PATH, SERVICE_USER, _write

WEB01 = "acs/ecs/web-01/root"
GONE_LINE = f"root@web-01: its secret {WEB01} no longer exists in KMS; ask your secret administrator"
UNAVAILABLE_LINE = "KMS unavailable, try again"


def gets(world):
    return world.kms_stats().get("GetSecretValue", 0)


def assert_line(r, line, status):
    assert line in r.stderr.splitlines(), f"expected the line {line!r} on stderr, got {r.stderr!r}"
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stdout == ""


def assert_refused_at_login(world, r, before_gets):
    assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
    assert "Permission denied" in r.stderr
    assert r.stdout == ""
    assert gets(world) == before_gets, "a refused login must not reach KMS"


def test_secret_pending_deletion_then_restored(world):
    world.kms.delete_secret(WEB01, recovery_window_days=7)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, GONE_LINE, 66)
    finally:
        world.kms.restore_secret(WEB01)
    r = world.ssh(world.login("alice", "web-01"), "id -un")
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr


def test_secret_deleted_for_good(world):
    world.kms.delete_secret(WEB01, force=True)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, GONE_LINE, 66)
        # Other accounts are unaffected.
        assert world.ssh(world.login("alice", "web-02"), "true").returncode == 0
    finally:
        world.create_secret("web-01")
        world.apply_current_credential("web-01")
    assert world.ssh(world.login("alice", "web-01"), "true").returncode == 0


def test_throttling_is_retried_to_success(world):
    before = gets(world)
    world.kms.add_fault("GetSecretValue", code="Rejected.Throttling", count=2)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id -un")
    finally:
        world.kms.clear_faults()
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr
    assert gets(world) - before == 3


@pytest.mark.parametrize("code", ["ServiceUnavailableTemporary", "InternalFailure", "Rejected.Throttling"])
def test_persistent_kms_failure_says_unavailable_within_the_deadline(world, code):
    before = gets(world)
    world.kms.add_fault("GetSecretValue", code=code, count=1000)
    try:
        t0 = time.monotonic()
        r = world.ssh(world.login("alice", "web-01"), "id")
        elapsed = time.monotonic() - t0
    finally:
        world.kms.clear_faults()
    assert_line(r, UNAVAILABLE_LINE, 69)
    assert gets(world) - before >= 2, "retryable errors must be retried"
    deadline = world.kms_deadline_ms / 1000
    assert elapsed < deadline + 3, f"took {elapsed:.1f}s with a {deadline}s deadline"


def test_bad_kms_credentials_say_misconfigured(world):
    good = CREDENTIALS_PATH.read_text()
    _write(CREDENTIALS_PATH, 'access_key_id = "LTAInot-a-key"\naccess_key_secret = "nope"\n', 0o600, SERVICE_USER)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
    finally:
        _write(CREDENTIALS_PATH, good, 0o600, SERVICE_USER)
    assert_line(r, "bastion misconfigured (KMS: InvalidAccessKeyId.NotFound)", 78)


def test_engineer_without_a_grant_is_refused(world):
    before = gets(world)
    r = world.ssh(world.login("bob", "web-01"), "id")
    assert_refused_at_login(world, r, before)
    assert world.broker_pids() == []


def test_expired_grant_is_refused(world):
    before = gets(world)
    r = world.ssh(world.login("carol", "web-01"), "id")
    assert_refused_at_login(world, r, before)


def test_grant_from_another_network_is_refused_from_here(world):
    before = gets(world)
    r = world.ssh(world.login("dave", "web-01"), "id")
    assert_refused_at_login(world, r, before)
    # The same grant works from its own network (10.0.0.0/8): the refusal was the source.
    r = world.ssh(world.login("dave", "web-01"), "id -un", host=world.jump_foreign_addr,
                  bind_address=world.foreign_client_addr)
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr


def test_alice_from_a_source_outside_her_grant_is_refused(world):
    before = gets(world)
    r = world.ssh(world.login("alice", "web-01"), "id", host=world.jump_foreign_addr,
                  bind_address=world.foreign_client_addr)
    assert_refused_at_login(world, r, before)


def test_changed_target_host_key_is_refused(world, audit_mark):
    with world.host_key_changed("web-01"):
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, "host key of web-01 changed; refusing", 76)
    assert world.ssh(world.login("alice", "web-01"), "true").returncode == 0
    ends = [e for e in world.audit_since(audit_mark) if e.get("event") == "connect-end"]
    assert ends[0]["result"] == "host-key-changed"


def test_target_rejecting_every_version_is_reported(world):
    keys = world.targets["web-01"].authorized_keys
    keys.write_text("")  # web-01 accepts no key at all
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
    finally:
        world.apply_current_credential("web-01")
    assert_line(r, "web-01 rejected the credential", 77)


def test_slow_kms_is_cut_off_at_the_deadline(world):
    """KMS answers, but too late: the deadline bounds the wait (last: the emulator may still
    be sleeping on those requests)."""
    world.kms.add_fault("GetSecretValue", latency_ms=int(world.kms_deadline_ms * 1.6), count=3)
    try:
        t0 = time.monotonic()
        r = world.ssh(world.login("alice", "web-01"), "id")
        elapsed = time.monotonic() - t0
    finally:
        world.kms.clear_faults()
    assert_line(r, UNAVAILABLE_LINE, 69)
    assert elapsed < world.kms_deadline_ms / 1000 + 3
