"""The official Python SDK (alibabacloud-kms20160120 3.3.1) against the KMS emulator.

Every test talks to a real emulator process (the release build, started on a free port)
through the unmodified SDK, once with its default ACS3-HMAC-SHA256 signature and once with
signature_algorithm='v2' (HMAC-SHA1), and asserts values, version stages and error codes.
Run with tests/sdk/run.
"""

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alibabacloud_kms20160120 import models as kms
from alibabacloud_kms20160120.client import Client
from alibabacloud_tea_openapi.exceptions import ClientException
from alibabacloud_tea_openapi.utils_models import Config

BIN = os.environ.get("KMS_EMULATOR_BIN") or str(
    Path(__file__).resolve().parents[2] / "target/release/examples/kms-emulator"
)
AK_ID = "LTAI-sdk-test-id"
AK_SECRET = "sdk-test-secret/+=~*"
SIGNATURES = ["v3", "v1"]


class Emulator:
    """One emulator process: its port, state dir and stderr log."""

    def __init__(self, state_dir, log_path, *flags, token=None):
        if not os.access(BIN, os.X_OK):
            pytest.fail(f"emulator binary {BIN} is missing: build it with "
                        "'cargo build --release --example kms-emulator'")
        env = dict(os.environ)
        env["ALIBABA_CLOUD_ACCESS_KEY_ID"] = AK_ID
        env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] = AK_SECRET
        env.pop("ALIBABA_CLOUD_SECURITY_TOKEN", None)
        env.pop("KMS_EMULATOR_BIN", None)
        if token is not None:
            env["ALIBABA_CLOUD_SECURITY_TOKEN"] = token
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [BIN, "--listen", "127.0.0.1:0", "--state", str(state_dir), *flags],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30):
            self.stop(check=False)
            pytest.fail(f"emulator printed nothing in 30 s; log: {self.log_text()}")
        line = self.proc.stdout.readline().decode()
        self.startup_s = time.monotonic() - self.started
        m = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
        if not m:
            self.stop(check=False)
            pytest.fail(f"unexpected first line {line!r}; log: {self.log_text()}")
        self.port = int(m.group(1))

    def log_text(self):
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, check=True):
        """SIGTERM by pid; the emulator must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    pytest.fail("emulator ignored SIGTERM for 15 s")
        self.log.close()
        if check:
            assert self.proc.returncode == 0, self.log_text()

    def client(self, sig, ak=AK_ID, secret=AK_SECRET, token=None):
        cfg = Config(access_key_id=ak, access_key_secret=secret, security_token=token,
                     protocol="HTTP", endpoint=f"127.0.0.1:{self.port}",
                     region_id="cn-hangzhou", read_timeout=60000, connect_timeout=5000)
        if sig == "v1":
            cfg.signature_algorithm = "v2"
        return Client(cfg)

    def admin(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())


HOOK = """#!/bin/sh
# Records what the emulator hands a rotation hook; fails while $dir/fail exists.
dir='{dir}'
n=$(date +%s%N)
cat > "$dir/$n.stdin"
env | grep -E '^(KMS_|ALIBABA_CLOUD_)' | sort > "$dir/$n.env"
[ ! -e "$dir/fail" ]
"""


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hook")
    script = d / "hook.sh"
    script.write_text(HOOK.format(dir=d))
    script.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def emu(tmp_path_factory, hook_dir):
    base = tmp_path_factory.mktemp("emulator")
    e = Emulator(base / "state", base / "emulator.log",
                 "--rotation-hook", str(hook_dir / "hook.sh"))
    yield e
    e.stop()


def hook_calls(hook_dir):
    """(stdin JSON, env dict) of every hook run, oldest first."""
    out = []
    for f in sorted(hook_dir.glob("*.stdin"), key=lambda p: int(p.stem)):
        env = dict(line.split("=", 1) for line in
                   f.with_suffix(".env").read_text().splitlines())
        out.append((json.loads(f.read_text()), env))
    return out


def error_of(fn):
    with pytest.raises(ClientException) as ei:
        fn()
    e = ei.value
    status = getattr(e, "status_code", None)
    if status is None and isinstance(getattr(e, "data", None), dict):
        status = e.data.get("statusCode")
    return e.code, status


def get(c, name, **kw):
    return c.get_secret_value(kms.GetSecretValueRequest(secret_name=name, **kw)).body


def parse_time(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


# --- the lifecycle, once per signature -----------------------------------------------------

@pytest.mark.parametrize("sig", SIGNATURES)
def test_generic_secret_versions_and_stages(emu, sig):
    c = emu.client(sig)
    name = f"{sig}/app/db"
    value1 = "p@ss w/rd+*~ é&=%"
    r = c.create_secret(kms.CreateSecretRequest(
        secret_name=name, version_id="v1", secret_data=value1, description="primary db",
        tags=json.dumps([{"TagKey": "env", "TagValue": f"prod-{sig}"}]))).body
    assert r.secret_name == name and r.version_id == "v1" and r.secret_type == "Generic"
    assert r.arn == f"acs:kms:cn-hangzhou:1234567890123456:secret/{name}"
    assert r.request_id
    assert error_of(lambda: c.create_secret(kms.CreateSecretRequest(
        secret_name=name, version_id="v1", secret_data="x"))) == ("Rejected.ResourceExist", 409)

    b = get(c, name)
    assert (b.secret_data, b.version_id, b.secret_type, b.secret_data_type) == \
        (value1, "v1", "Generic", "text")
    assert b.version_stages.version_stage == ["ACSCurrent"]
    assert abs(parse_time(b.create_time) - datetime.now(timezone.utc)) < timedelta(minutes=1)

    p = c.put_secret_value(kms.PutSecretValueRequest(
        secret_name=name, version_id="v2", secret_data="two")).body
    assert (p.version_id, p.version_stages.version_stage) == ("v2", ["ACSCurrent"])
    assert get(c, name).secret_data == "two"
    prev = get(c, name, version_stage="ACSPrevious")
    assert (prev.secret_data, prev.version_id, prev.version_stages.version_stage) == \
        (value1, "v1", ["ACSPrevious"])
    assert get(c, name, version_id="v1").secret_data == value1
    assert error_of(lambda: get(c, name, version_id="v1", version_stage="ACSCurrent")) == \
        ("Forbidden.ResourceNotFound", 404)
    assert error_of(lambda: get(c, name, version_id="nope")) == \
        ("Forbidden.ResourceNotFound", 404)

    # Same VersionId: same data is an idempotent retry, other data a conflict.
    again = c.put_secret_value(kms.PutSecretValueRequest(
        secret_name=name, version_id="v2", secret_data="two")).body
    assert again.version_stages.version_stage == ["ACSCurrent"]
    assert error_of(lambda: c.put_secret_value(kms.PutSecretValueRequest(
        secret_name=name, version_id="v2", secret_data="other"))) == \
        ("Rejected.ResourceExist", 409)

    # A version with a custom stage leaves ACSCurrent where it is.
    c.put_secret_value(kms.PutSecretValueRequest(
        secret_name=name, version_id="v3", secret_data="three",
        version_stages=json.dumps(["Blue"])))
    assert get(c, name).version_id == "v2"
    assert get(c, name, version_stage="Blue").secret_data == "three"

    # Roll back: ACSCurrent to v1; v2 becomes ACSPrevious.
    c.update_secret_version_stage(kms.UpdateSecretVersionStageRequest(
        secret_name=name, version_stage="ACSCurrent", move_to_version="v1",
        remove_from_version="v2"))
    assert get(c, name).secret_data == value1
    assert get(c, name, version_stage="ACSPrevious").version_id == "v2"
    assert error_of(lambda: c.update_secret_version_stage(kms.UpdateSecretVersionStageRequest(
        secret_name=name, version_stage="ACSCurrent", remove_from_version="v1"))) == \
        ("InvalidParameter", 400)
    c.update_secret_version_stage(kms.UpdateSecretVersionStageRequest(
        secret_name=name, version_stage="Blue", remove_from_version="v3"))

    ids = c.list_secret_version_ids(kms.ListSecretVersionIdsRequest(secret_name=name)).body
    assert ids.secret_name == name and ids.total_count == 2
    got = {v.version_id: v.version_stages.version_stage for v in ids.version_ids.version_id}
    assert got == {"v1": ["ACSCurrent"], "v2": ["ACSPrevious"]}
    ids = c.list_secret_version_ids(kms.ListSecretVersionIdsRequest(
        secret_name=name, include_deprecated="true", page_size=2, page_number=2)).body
    assert (ids.total_count, ids.page_number, ids.page_size) == (3, 2, 2)
    assert [v.version_id for v in ids.version_ids.version_id] == ["v3"]
    assert ids.version_ids.version_id[0].version_stages.version_stage == []

    assert error_of(lambda: c.rotate_secret(kms.RotateSecretRequest(
        secret_name=name, version_id="v9"))) == ("InvalidParameter", 400)
    assert error_of(lambda: get(c, f"{sig}/no/such")) == ("Forbidden.ResourceNotFound", 404)


def ecs_password_secret(c, name, instance="i-web01"):
    return c.create_secret(kms.CreateSecretRequest(
        secret_name=name, version_id="v1", secret_type="ECS",
        secret_data=json.dumps({"UserName": "root", "Password": "Initial-Passw0rd!"}),
        extended_config={"SecretSubType": "Password", "InstanceId": instance,
                         "RegionId": "cn-hangzhou"},
        enable_automatic_rotation=True, rotation_interval="7d",
        tags=json.dumps([{"TagKey": "host", "TagValue": "web-01"}]))).body


@pytest.mark.parametrize("sig", SIGNATURES)
def test_ecs_password_rotation_with_hook(emu, hook_dir, sig):
    c = emu.client(sig)
    name = f"acs/ecs/{sig}-web-01/root"
    r = ecs_password_secret(c, name)
    assert (r.secret_type, r.automatic_rotation, r.rotation_interval) == \
        ("ECS", "Enabled", "604800s")
    assert json.loads(r.extended_config)["SecretSubType"] == "Password"
    created = parse_time(r.next_rotation_date) - timedelta(days=7)
    assert abs(created - datetime.now(timezone.utc)) < timedelta(minutes=1)

    b = get(c, name, fetch_extended_config=True)
    cfg = json.loads(b.extended_config)
    assert (cfg["SecretSubType"], cfg["InstanceId"], cfg["RegionId"]) == \
        ("Password", "i-web01", "cn-hangzhou")
    assert (b.automatic_rotation, b.rotation_interval) == ("Enabled", "604800s")
    assert get(c, name).extended_config is None

    before = len(hook_calls(hook_dir))
    rr = c.rotate_secret(kms.RotateSecretRequest(secret_name=name, version_id="v2")).body
    assert (rr.secret_name, rr.version_id) == (name, "v2")
    assert rr.arn.endswith(f":secret/{name}")
    calls = hook_calls(hook_dir)
    assert len(calls) == before + 1
    data, env = calls[-1]
    assert env == {"KMS_SECRET_NAME": name, "KMS_INSTANCE_ID": "i-web01",
                   "KMS_USER_NAME": "root", "KMS_SECRET_SUBTYPE": "Password",
                   "KMS_VERSION_ID": "v2"}
    assert set(data) == {"UserName", "Password"} and data["UserName"] == "root"
    pw = data["Password"]
    assert len(pw) == 32
    assert re.search("[A-Z]", pw) and re.search("[a-z]", pw) and re.search("[0-9]", pw)
    assert re.search("[^A-Za-z0-9]", pw)

    cur = get(c, name)
    assert (cur.version_id, json.loads(cur.secret_data)) == ("v2", data)
    assert cur.version_stages.version_stage == ["ACSCurrent"]
    assert cur.last_rotation_date is not None
    prev = get(c, name, version_stage="ACSPrevious")
    assert json.loads(prev.secret_data)["Password"] == "Initial-Passw0rd!"
    # ECS secrets ignore VersionId: only ACSCurrent/ACSPrevious are served.
    assert get(c, name, version_id="v1").version_id == "v2"

    # RotateSecret is idempotent on VersionId: no second hook run, no change.
    c.rotate_secret(kms.RotateSecretRequest(secret_name=name, version_id="v2"))
    assert len(hook_calls(hook_dir)) == before + 1

    # A failing hook (Cloud Assistant could not apply it): error, no stage moves.
    (hook_dir / "fail").touch()
    try:
        assert error_of(lambda: c.rotate_secret(kms.RotateSecretRequest(
            secret_name=name, version_id="v3"))) == ("Rejected.RotationFailed", 400)
    finally:
        (hook_dir / "fail").unlink()
    assert len(hook_calls(hook_dir)) == before + 2
    assert get(c, name).version_id == "v2"
    ids = c.list_secret_version_ids(kms.ListSecretVersionIdsRequest(
        secret_name=name, include_deprecated="true")).body
    assert [v.version_id for v in ids.version_ids.version_id] == ["v1", "v2"]

    # The next rotation works again; the old ACSPrevious is deprecated.
    c.rotate_secret(kms.RotateSecretRequest(secret_name=name, version_id="v4"))
    assert get(c, name).version_id == "v4"
    assert get(c, name, version_stage="ACSPrevious").version_id == "v2"
    # PutSecretValue and custom stages are for Generic secrets only.
    assert error_of(lambda: c.put_secret_value(kms.PutSecretValueRequest(
        secret_name=name, version_id="v5", secret_data="{}"))) == ("InvalidParameter", 400)
    assert error_of(lambda: get(c, name, version_stage="Blue")) == ("InvalidParameter", 400)

    # Rotation policy.
    c.update_secret_rotation_policy(kms.UpdateSecretRotationPolicyRequest(
        secret_name=name, enable_automatic_rotation=False))
    d = c.describe_secret(kms.DescribeSecretRequest(secret_name=name)).body
    assert d.automatic_rotation == "Disabled" and d.next_rotation_date is None
    c.update_secret_rotation_policy(kms.UpdateSecretRotationPolicyRequest(
        secret_name=name, enable_automatic_rotation=True, rotation_interval="1d"))
    d = c.describe_secret(kms.DescribeSecretRequest(secret_name=name, fetch_tags="true")).body
    assert (d.automatic_rotation, d.rotation_interval) == ("Enabled", "86400s")
    assert parse_time(d.next_rotation_date) - parse_time(d.last_rotation_date) == \
        timedelta(days=1)
    assert (d.secret_type, d.secret_name) == ("ECS", name)
    assert json.loads(d.extended_config)["InstanceId"] == "i-web01"
    assert [(t.tag_key, t.tag_value) for t in d.tags.tag] == [("host", "web-01")]
    assert error_of(lambda: c.update_secret_rotation_policy(
        kms.UpdateSecretRotationPolicyRequest(secret_name=name,
                                              enable_automatic_rotation=True,
                                              rotation_interval="10m"))) == \
        ("InvalidParameter", 400)


@pytest.mark.parametrize("sig", SIGNATURES)
def test_ecs_ssh_key_rotation(emu, hook_dir, sig):
    c = emu.client(sig)
    name = f"acs/ecs/{sig}-db-01/deploy"
    c.create_secret(kms.CreateSecretRequest(
        secret_name=name, version_id="k1", secret_type="ECS",
        secret_data=json.dumps({"UserName": "deploy", "PublicKey": "ssh-rsa AAAA old",
                                "PrivateKey": "-----BEGIN RSA PRIVATE KEY-----\nold\n"}),
        extended_config={"SecretSubType": "SSHKey", "InstanceId": "i-db01",
                         "RegionId": "cn-hangzhou"}))
    assert get(c, name).automatic_rotation == "Disabled"
    c.rotate_secret(kms.RotateSecretRequest(secret_name=name, version_id="k2"))
    data, env = hook_calls(hook_dir)[-1]
    assert (env["KMS_SECRET_SUBTYPE"], env["KMS_USER_NAME"], env["KMS_INSTANCE_ID"]) == \
        ("SSHKey", "deploy", "i-db01")
    cur = json.loads(get(c, name).secret_data)
    assert cur == data
    assert set(cur) == {"UserName", "PublicKey", "PrivateKey"}
    assert cur["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    assert cur["PublicKey"].startswith("ssh-rsa AAAA")
    keygen = shutil.which("ssh-keygen")
    if keygen:
        key = hook_dir / f"{sig}-key"
        key.write_text(cur["PrivateKey"])
        key.chmod(0o600)
        derived = subprocess.run([keygen, "-y", "-f", str(key)], check=True,
                                 capture_output=True, text=True).stdout.split()
        assert derived[:2] == cur["PublicKey"].split()[:2]
        bits = subprocess.run([keygen, "-l", "-f", str(key)], check=True,
                              capture_output=True, text=True).stdout.split()[0]
        assert bits == "2048"


@pytest.mark.parametrize("sig", SIGNATURES)
def test_list_secrets_filters_and_paging(emu, sig):
    c = emu.client(sig)
    prefix = f"list-{sig}/"
    for i in range(5):
        c.create_secret(kms.CreateSecretRequest(
            secret_name=f"{prefix}s{i}", version_id="v1", secret_data=f"d{i}",
            description="odd one" if i % 2 else "even one",
            tags=json.dumps([{"TagKey": "idx", "TagValue": str(i)}])))

    def names(filters, **kw):
        out, page = [], 1
        while True:
            b = c.list_secrets(kms.ListSecretsRequest(
                filters=json.dumps(filters), page_number=page, page_size=2, **kw)).body
            assert (b.page_number, b.page_size) == (page, 2)
            out += [s.secret_name for s in b.secret_list.secret]
            if page * 2 >= b.total_count:
                assert len(out) == b.total_count
                return out, b
            page += 1

    by_name = [{"Key": "SecretName", "Values": [prefix]}]
    got, _ = names(by_name)
    assert got == [f"{prefix}s{i}" for i in range(5)]
    got, _ = names(by_name + [{"Key": "Description", "Values": ["odd"]}])
    assert got == [f"{prefix}s1", f"{prefix}s3"]
    got, _ = names(by_name + [{"Key": "TagValue", "Values": ["0", "4"]}])
    assert got == [f"{prefix}s0", f"{prefix}s4"]
    got, _ = names(by_name + [{"Key": "TagKey", "Values": ["nope"]}])
    assert got == []
    got, _ = names([{"Key": "SecretType", "Values": ["ECS"]},
                    {"Key": "SecretName", "Values": [prefix]}])
    assert got == []

    b = c.list_secrets(kms.ListSecretsRequest(
        filters=json.dumps(by_name), fetch_tags="true", page_size=1, page_number=3)).body
    assert b.total_count == 5
    [s] = b.secret_list.secret
    assert (s.secret_name, s.secret_type) == (f"{prefix}s2", "Generic")
    assert [(t.tag_key, t.tag_value) for t in s.tags.tag] == [("idx", "2")]
    assert s.create_time and s.update_time and s.planned_delete_time is None
    b = c.list_secrets(kms.ListSecretsRequest(filters=json.dumps(by_name))).body
    assert b.page_size == 10 and len(b.secret_list.secret) == 5
    assert b.secret_list.secret[0].tags is None
    assert error_of(lambda: c.list_secrets(kms.ListSecretsRequest(page_size=101))) == \
        ("InvalidParameter", 400)
    assert error_of(lambda: c.list_secrets(kms.ListSecretsRequest(filters="[oops"))) == \
        ("InvalidParameter", 400)


@pytest.mark.parametrize("sig", SIGNATURES)
def test_delete_window_restore_and_force(emu, sig):
    c = emu.client(sig)
    name = f"acs/ecs/{sig}-del-01/root"
    ecs_password_secret(c, name, instance="i-del01")
    d = c.delete_secret(kms.DeleteSecretRequest(secret_name=name,
                                                recovery_window_in_days="7")).body
    assert d.secret_name == name
    planned = parse_time(d.planned_delete_time)
    assert abs(planned - (datetime.now(timezone.utc) + timedelta(days=7))) < \
        timedelta(minutes=1)
    # Pending deletion: reads and changes are refused; metadata stays visible.
    assert error_of(lambda: get(c, name)) == ("Rejected.ResourceInDeleteWindow", 409)
    assert error_of(lambda: c.rotate_secret(kms.RotateSecretRequest(
        secret_name=name, version_id="v2"))) == ("Rejected.ResourceInDeleteWindow", 409)
    assert error_of(lambda: ecs_password_secret(c, name)) == \
        ("Rejected.ResourceInDeleteWindow", 409)
    desc = c.describe_secret(kms.DescribeSecretRequest(secret_name=name)).body
    assert desc.planned_delete_time == d.planned_delete_time
    listed = c.list_secrets(kms.ListSecretsRequest(filters=json.dumps(
        [{"Key": "SecretName", "Values": [name]}]))).body.secret_list.secret
    assert [s.planned_delete_time for s in listed] == [d.planned_delete_time]
    r = c.restore_secret(kms.RestoreSecretRequest(secret_name=name)).body
    assert r.secret_name == name
    assert json.loads(get(c, name).secret_data)["UserName"] == "root"
    assert c.describe_secret(kms.DescribeSecretRequest(secret_name=name)).body \
        .planned_delete_time is None

    # Default window is 30 days; out-of-range windows are refused.
    d = c.delete_secret(kms.DeleteSecretRequest(secret_name=name)).body
    assert abs(parse_time(d.planned_delete_time) -
               (datetime.now(timezone.utc) + timedelta(days=30))) < timedelta(minutes=1)
    c.restore_secret(kms.RestoreSecretRequest(secret_name=name))
    assert error_of(lambda: c.delete_secret(kms.DeleteSecretRequest(
        secret_name=name, recovery_window_in_days="3"))) == ("InvalidParameter", 400)

    c.delete_secret(kms.DeleteSecretRequest(secret_name=name,
                                            force_delete_without_recovery="true"))
    assert error_of(lambda: get(c, name)) == ("Forbidden.ResourceNotFound", 404)
    assert error_of(lambda: c.describe_secret(kms.DescribeSecretRequest(
        secret_name=name))) == ("Forbidden.ResourceNotFound", 404)
    assert error_of(lambda: c.restore_secret(kms.RestoreSecretRequest(
        secret_name=name))) == ("Forbidden.ResourceNotFound", 404)
    assert error_of(lambda: c.delete_secret(kms.DeleteSecretRequest(
        secret_name=name))) == ("Forbidden.ResourceNotFound", 404)


@pytest.mark.parametrize("sig", SIGNATURES)
def test_bad_credentials_are_refused(emu, sig):
    name = f"{sig}/auth/probe"
    emu.client(sig).create_secret(kms.CreateSecretRequest(
        secret_name=name, version_id="v1", secret_data="x"))
    wrong_secret = emu.client(sig, secret="not-the-secret")
    assert error_of(lambda: get(wrong_secret, name)) == ("SignatureDoesNotMatch", 400)
    unknown = emu.client(sig, ak="LTAI-unknown")
    assert error_of(lambda: get(unknown, name)) == ("InvalidAccessKeyId.NotFound", 404)
    # A token where none is expected is refused too.
    sts = emu.client(sig, token="some-token")
    assert error_of(lambda: get(sts, name)) == ("InvalidSecurityToken.Malformed", 400)
    assert get(emu.client(sig), name).secret_data == "x"


# --- STS, faults, persistence: their own emulator processes --------------------------------

@pytest.mark.parametrize("sig", SIGNATURES)
def test_sts_token_must_match(tmp_path, sig):
    e = Emulator(tmp_path / "state", tmp_path / "emulator.log", token="sts-token-value")
    try:
        ok = e.client(sig, token="sts-token-value")
        ok.create_secret(kms.CreateSecretRequest(secret_name="s", version_id="v1",
                                                 secret_data="x"))
        assert get(ok, "s").secret_data == "x"
        assert error_of(lambda: get(e.client(sig, token="other"), "s")) == \
            ("InvalidSecurityToken.MismatchWithAccessKey", 400)
        assert error_of(lambda: get(e.client(sig), "s")) == \
            ("InvalidSecurityToken.Malformed", 400)
    finally:
        e.stop()


def test_faults_and_stats(tmp_path):
    e = Emulator(tmp_path / "state", tmp_path / "emulator.log",
                 "--fault", "DescribeSecret:InternalFailure:1")
    try:
        c = e.client("v3")
        c.create_secret(kms.CreateSecretRequest(secret_name="f", version_id="v1",
                                                secret_data="x"))
        # The flag's fault: one 500, then normal service.
        with pytest.raises(Exception) as ei:
            c.describe_secret(kms.DescribeSecretRequest(secret_name="f"))
        assert getattr(ei.value, "code", None) == "InternalFailure"
        assert c.describe_secret(kms.DescribeSecretRequest(secret_name="f")).body.secret_name == "f"

        e.admin("POST", "/__admin/stats/reset", {})
        e.admin("POST", "/__admin/faults", {"action": "GetSecretValue",
                                            "code": "Rejected.Throttling", "count": 2})
        for _ in range(2):
            assert error_of(lambda: get(c, "f")) == ("Rejected.Throttling", 429)
        assert get(c, "f").secret_data == "x"
        e.admin("POST", "/__admin/faults", {"action": "GetSecretValue", "latency_ms": 300})
        t0 = time.monotonic()
        assert get(c, "f").secret_data == "x"
        assert time.monotonic() - t0 >= 0.3
        e.admin("POST", "/__admin/faults", {"action": "*", "code": "ServiceUnavailableTemporary",
                                            "count": 0})
        for _ in range(3):
            with pytest.raises(Exception) as ei:
                get(c, "f")
            assert getattr(ei.value, "code", None) == "ServiceUnavailableTemporary"
        e.admin("DELETE", "/__admin/faults")
        assert get(c, "f").secret_data == "x"
        stats = e.admin("GET", "/__admin/stats")
        assert stats["calls"] == {"GetSecretValue": 8}
        assert stats["errors"] == {"Rejected.Throttling": 2, "ServiceUnavailableTemporary": 3}
    finally:
        e.stop()


def test_state_survives_restart(tmp_path):
    state = tmp_path / "state"
    e = Emulator(state, tmp_path / "emulator.log")
    try:
        c = e.client("v3")
        c.create_secret(kms.CreateSecretRequest(secret_name="keep/me", version_id="v1",
                                                secret_data="one"))
        c.put_secret_value(kms.PutSecretValueRequest(secret_name="keep/me", version_id="v2",
                                                     secret_data="two"))
        c.create_secret(kms.CreateSecretRequest(secret_name="gone/soon", version_id="v1",
                                                secret_data="x"))
        c.delete_secret(kms.DeleteSecretRequest(secret_name="gone/soon"))
    finally:
        e.stop()
    assert oct((state / "secrets.json").stat().st_mode & 0o777) == "0o600"
    e = Emulator(state, tmp_path / "emulator2.log")
    try:
        c = e.client("v1")
        assert get(c, "keep/me").secret_data == "two"
        assert get(c, "keep/me", version_stage="ACSPrevious").secret_data == "one"
        assert error_of(lambda: get(c, "gone/soon")) == ("Rejected.ResourceInDeleteWindow", 409)
    finally:
        e.stop()


def test_refuses_to_start_without_an_access_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    p = subprocess.run([BIN, "--listen", "127.0.0.1:0", "--state", str(tmp_path / "s")],
                       env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert p.stdout == ""
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" in p.stderr


def test_help_documents_every_flag():
    out = subprocess.run([BIN, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ["--listen", "--state", "--rotation-hook", "--fault", "--clock-skew-tolerance",
                 "--region", "--workers", "ALIBABA_CLOUD_ACCESS_KEY_ID", "/__admin/faults"]:
        assert flag in out, flag


def test_fifty_concurrent_sdk_clients(tmp_path):
    """The benchmark starts 50 logins at once: 50 fresh SDK clients, one call each."""
    import concurrent.futures
    e = Emulator(tmp_path / "state", tmp_path / "emulator.log")
    try:
        e.client("v3").create_secret(kms.CreateSecretRequest(
            secret_name="acs/ecs/c-01/root", version_id="v1", secret_type="ECS",
            secret_data=json.dumps({"UserName": "root", "Password": "pw"}),
            extended_config={"SecretSubType": "Password", "InstanceId": "i-c01"}))
        e.admin("POST", "/__admin/stats/reset", {})

        def login(i):
            c = e.client(SIGNATURES[i % 2])
            c._read_timeout = 10000
            return json.loads(get(c, "acs/ecs/c-01/root").secret_data)["Password"]

        for _ in range(3):
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                assert list(pool.map(login, range(50))) == ["pw"] * 50
        assert e.admin("GET", "/__admin/stats")["calls"] == {"GetSecretValue": 150}
    finally:
        e.stop()


def v1_signed_url(port, params, method="GET", secret=AK_SECRET):
    """An HMAC-SHA1 (signature 1.0) request built with the stdlib, independent of the SDK."""
    import base64
    import hashlib
    import hmac
    from urllib.parse import quote
    pct = lambda s: quote(s, safe="~")  # noqa: E731
    canonical = "&".join(f"{pct(k)}={pct(v)}" for k, v in sorted(params.items()))
    sts = f"{method}&%2F&{pct(canonical)}"
    sig = base64.b64encode(hmac.new((secret + "&").encode(), sts.encode(),
                                    hashlib.sha1).digest()).decode()
    return f"http://127.0.0.1:{port}/?{canonical}&Signature={pct(sig)}"


def raw(url, method="GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_v1_get_requests_timestamps_and_nonces(emu):
    """GET with every parameter in the query (older SDKs), checked by an independent signer."""
    import uuid
    emu.client("v3").create_secret(kms.CreateSecretRequest(
        secret_name="raw/get+me=@.x", version_id="v1", secret_data="via GET"))

    def params(ts=None, nonce=None, **extra):
        p = {"Action": "GetSecretValue", "Version": "2016-01-20", "Format": "JSON",
             "AccessKeyId": AK_ID, "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0",
             "SignatureNonce": nonce or uuid.uuid4().hex, "SecretName": "raw/get+me=@.x",
             "Timestamp": ts or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        p.update(extra)
        return p

    status, body = raw(v1_signed_url(emu.port, params()))
    assert status == 200 and body["SecretData"] == "via GET" and body["RequestId"]
    # The method is signed: a GET signature sent with POST does not match.
    status, body = raw(v1_signed_url(emu.port, params()), method="POST")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")
    # Replayed nonce, stale timestamp, missing and malformed parts.
    p = params()
    assert raw(v1_signed_url(emu.port, p))[0] == 200
    status, body = raw(v1_signed_url(emu.port, p))
    assert (status, body["Code"]) == (400, "SignatureNonceUsed")
    old = (datetime.now(timezone.utc) - timedelta(minutes=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status, body = raw(v1_signed_url(emu.port, params(ts=old)))
    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")
    status, body = raw(v1_signed_url(emu.port, params(Version="2014-05-26")))
    assert (status, body["Code"]) == (400, "InvalidVersion")
    status, body = raw(v1_signed_url(emu.port, params(Action="Encrypt")))
    assert (status, body["Code"]) == (404, "InvalidAction.NotFound")
    status, body = raw(f"http://127.0.0.1:{emu.port}/?Action=GetSecretValue&Version=2016-01-20")
    assert (status, body["Code"]) == (400, "IncompleteSignature")
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
