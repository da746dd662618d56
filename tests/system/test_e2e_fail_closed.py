"""End to end: every failure closes the door and says why, in exactly one line.

The lines are DESIGN.md's failure table; the exit statuses are kmsbastion-connect's
(src/session.rs). Refused logins (no grant, wrong source, expired grant) never reach PAM's
session stage: no broker starts and KMS is never asked.
"""

import base64
import hashlib
import re
import time

import pytest

from world import CREDENTIALS_PATH, SERVICE_USER, _write

WEB01 = "acs/ecs/web-01/root"
GONE_LINE = f"root@web-01: its secret {WEB01} no longer exists in KMS; ask your secret administrator"
UNAVAILABLE_LINE = "KMS unavailable, try again"
REQUEST_ID = r"RequestId [0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"


def fingerprint(public_key):
    """SHA256:… of an ``ssh-ed25519 AAAA…`` public key line, as ssh-keygen -l prints it."""
    raw = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def gets(world):
    return world.kms_stats().get("GetSecretValue", 0)


def assert_line(r, line, status):
    assert line in r.stderr.splitlines(), f"expected the line {line!r} on stderr, got {r.stderr!r}"
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stdout == ""


def assert_logged(world, mark, result, *fragments):
    """The jump host logged the failure (DESIGN.md's right-hand column): a ``connect-end``
    audit event with this ``result`` whose reason has every fragment, and the same reason
    on syslog."""
    ends = [e for e in world.audit_since(mark) if e.get("event") == "connect-end" and e.get("result") == result]
    assert ends, [e for e in world.audit_since(mark)]
    reason = ends[-1].get("reason", "")
    for fragment in fragments:
        assert re.search(fragment, reason), f"{fragment!r} not in the audit reason {reason!r}"
    world.wait_for(lambda: any(reason in line for line in world.syslog.lines()), timeout=5,
                   what=f"the reason on syslog: {reason!r}")


def assert_refused_at_login(world, r, before_gets):
    assert r.returncode == 255, (r.returncode, r.stdout, r.stderr)
    assert "Permission denied" in r.stderr
    assert r.stdout == ""
    assert gets(world) == before_gets, "a refused login must not reach KMS"


def test_secret_pending_deletion_then_restored(world, audit_mark):
    world.kms.delete_secret(WEB01, recovery_window_days=7)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, GONE_LINE, 66)
        assert_logged(world, audit_mark, "secret-gone", "Rejected.ResourceInDeleteWindow", REQUEST_ID)
    finally:
        world.kms.restore_secret(WEB01)
    r = world.ssh(world.login("alice", "web-01"), "id -un")
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr


def test_secret_deleted_for_good(world, audit_mark):
    world.kms.delete_secret(WEB01, force=True)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, GONE_LINE, 66)
        assert_logged(world, audit_mark, "secret-gone", "Forbidden.ResourceNotFound", REQUEST_ID)
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
def test_persistent_kms_failure_says_unavailable_within_the_deadline(world, code, audit_mark):
    before = gets(world)
    world.kms.add_fault("GetSecretValue", code=code, count=1000)
    try:
        t0 = time.monotonic()
        r = world.ssh(world.login("alice", "web-01"), "id")
        elapsed = time.monotonic() - t0
    finally:
        world.kms.clear_faults()
    assert_line(r, UNAVAILABLE_LINE, 69)
    assert_logged(world, audit_mark, "kms-unavailable", re.escape(code), REQUEST_ID, r"gave up after \d+ attempts")
    assert gets(world) - before >= 2, "retryable errors must be retried"
    deadline = world.kms_deadline_ms / 1000
    assert elapsed < deadline + 3, f"took {elapsed:.1f}s with a {deadline}s deadline"


def test_bad_kms_credentials_say_misconfigured(world, audit_mark):
    good = CREDENTIALS_PATH.read_text()
    _write(CREDENTIALS_PATH, 'access_key_id = "LTAInot-a-key"\naccess_key_secret = "nope"\n', 0o600, SERVICE_USER)
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
    finally:
        _write(CREDENTIALS_PATH, good, 0o600, SERVICE_USER)
    assert_line(r, "bastion misconfigured (KMS: InvalidAccessKeyId.NotFound)", 78)
    assert_logged(world, audit_mark, "misconfigured", "InvalidAccessKeyId.NotFound", REQUEST_ID)


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
    with world.host_key_changed("web-01") as presented:
        r = world.ssh(world.login("alice", "web-01"), "id")
        assert_line(r, "host key of web-01 changed; refusing", 76)
        assert_logged(world, audit_mark, "host-key-changed", re.escape(fingerprint(presented)),
                      re.escape(fingerprint(world.targets["web-01"].pinned_host_key)))
    assert world.ssh(world.login("alice", "web-01"), "true").returncode == 0
    ends = [e for e in world.audit_since(audit_mark) if e.get("event") == "connect-end"]
    assert ends[0]["result"] == "host-key-changed"


def test_target_rejecting_every_version_is_reported(world, audit_mark):
    keys = world.targets["web-01"].authorized_keys
    keys.write_text("")  # web-01 accepts no key at all
    try:
        r = world.ssh(world.login("alice", "web-01"), "id")
    finally:
        world.apply_current_credential("web-01")
    assert_line(r, "web-01 rejected the credential", 77)
    version = world.kms.get_secret_value(WEB01)["VersionId"]
    assert_logged(world, audit_mark, "credential-rejected", re.escape(version))


def test_slow_kms_is_cut_off_at_the_deadline(world, audit_mark):
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
    assert_logged(world, audit_mark, "kms-unavailable", "did not answer within")
    assert elapsed < world.kms_deadline_ms / 1000 + 3


@pytest.mark.parametrize("engineer, why", [("bob", "no grant"), ("carol", "expired grant"), ("dave", "wrong source")])
def test_refused_logins_are_logged_with_their_reason(world, audit_mark, engineer, why):
    """DESIGN.md: "no grant / outside window / wrong source → the jump host logs: reason,
    rule". Such logins end at the AuthorizedKeysCommand (no key offered is accepted), so it is
    the one that can say why: an audit event for the engineer (``refused``, or a ``deny``
    result) or a kmsbastion syslog line naming the login."""
    login = world.login(engineer, "web-01")
    syslog_before = len(world.syslog.lines())
    r = world.ssh(login, "id")
    assert r.returncode == 255
    time.sleep(0.5)
    audited = [e for e in world.audit_since(audit_mark)
               if e.get("engineer") == engineer and (e.get("event") == "refused" or e.get("result") == "deny")]
    logged = [line for line in world.syslog.lines()[syslog_before:]
              if login in line and " sshd" not in line and "sshd[" not in line]
    # sshd itself names the reason when the AKC's key options (from the grant) refuse it.
    logged += [line for line in (world.log_dir / "sshd-jump.log").read_text().splitlines()
               if login in line and "not from a permitted host" in line]
    assert audited or logged, f"nothing on the jump host says why {login} was refused ({why})"
