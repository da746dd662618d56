//! The KMS client against the real KMS emulator (`examples/kms-emulator`), over HTTP on
//! loopback: both signature versions, STS tokens, every action the client has, typed errors,
//! and the retry behaviour (throttled then success, persistent 503 within the deadline,
//! not-found never retried) checked with the emulator's call counters.
//!
//! The emulator binary is built by `cargo test` (examples are compiled with the tests); each
//! test starts its own emulator on a free port with its own state directory and kills it
//! (by pid) when done.
#![cfg(feature = "client")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kmsbastion::config::KmsSettings;
mod common;

use kmsbastion::kms::{Filter, KmsClient, KmsError, KmsErrorKind, SecretStage};
use serde_json::{json, Value};

const AK_ID: &str = "LTAI5tTestAccessKeyId";
const AK_SECRET: &str = "test-access-key-secret";

/// A running emulator; killed by pid on drop.
struct Emulator {
    inner: common::Emulator,
    url: String,
    admin: reqwest::blocking::Client,
}

impl Emulator {
    fn start() -> Self {
        Self::start_with_token(None)
    }

    fn start_with_token(token: Option<&str>) -> Self {
        let inner = common::Emulator::start(AK_ID, AK_SECRET, token);
        let url = inner.url.clone();
        let admin = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("admin client");
        Self { inner, url, admin }
    }

    /// Writes a 0600 credentials file and returns `[kms]` settings that use it.
    fn settings(&self, extra: &str, secret: &str, token: Option<&str>) -> KmsSettings {
        let path = self
            .inner
            .dir
            .path()
            .join(format!("creds-{}", rand::random::<u64>()));
        let mut f = std::fs::File::create(&path).expect("create creds");
        writeln!(f, "access_key_id = {AK_ID}\naccess_key_secret = {secret}").expect("write");
        if let Some(t) = token {
            writeln!(f, "security_token = {t}").expect("write");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = format!(
            "endpoint = {:?}\ncredentials = \"file\"\ncredentials_file = {:?}\n{extra}",
            self.url, path
        );
        toml::from_str(&text).expect("settings")
    }

    /// A client through `KmsClient::from_settings` with the emulator's key.
    fn client(&self, extra: &str) -> KmsClient {
        KmsClient::from_settings(&self.settings(extra, AK_SECRET, None)).expect("client")
    }

    fn admin_post(&self, path: &str, body: Value) {
        let r = self
            .admin
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .expect("admin POST");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
    }

    fn fault(&self, body: Value) {
        self.admin_post("/__admin/faults", body);
    }

    fn reset_stats(&self) {
        self.admin_post("/__admin/stats/reset", json!({}));
    }

    /// How many calls of `action` the emulator received (errors included).
    fn calls(&self, action: &str) -> u64 {
        let v: Value = self
            .admin
            .get(format!("{}/__admin/stats", self.url))
            .send()
            .expect("admin GET")
            .text()
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("stats JSON");
        v["calls"][action].as_u64().unwrap_or(0)
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn create_secret(c: &KmsClient, extra: &[(&str, &str)], data: &str) -> Value {
    c.call_raw(
        "CreateSecret",
        &params(extra),
        &params(&[("SecretData", data)]),
    )
    .expect("CreateSecret")
}

fn put_secret_value(c: &KmsClient, name: &str, version: &str, data: &str) {
    c.call_raw(
        "PutSecretValue",
        &params(&[("SecretName", name), ("VersionId", version)]),
        &params(&[("SecretData", data)]),
    )
    .expect("PutSecretValue");
}

const TRICKY_DATA: &str = "{\"UserName\":\"root\",\"Password\":\"p@ss w/rd~*&=+%20 é 😀\"}";

/// Create, put, read by stage and by id, extended config: everything through one signature.
fn round_trip(signature: &str) {
    let emu = Emulator::start();
    let c = emu.client(&format!("signature = \"{signature}\""));
    let name = "app/db+primary=1@x.y-z_";
    create_secret(
        &c,
        &[
            ("SecretName", name),
            ("VersionId", "v1"),
            ("Description", "db creds"),
        ],
        "first value",
    );
    put_secret_value(&c, name, "v2", TRICKY_DATA);

    let cur = c
        .get_secret_value(name, SecretStage::Current)
        .expect("current");
    assert_eq!(cur.secret_name, name);
    assert_eq!(cur.version_id, "v2");
    assert_eq!(cur.secret_data.expose(), TRICKY_DATA.as_bytes());
    assert!(
        cur.version_stages.iter().any(|s| s == "ACSCurrent"),
        "{:?}",
        cur.version_stages
    );
    assert_eq!(cur.secret_type, "Generic");
    assert!(!cur.request_id.is_empty());
    assert!(
        cur.extended_config.is_none(),
        "Generic secrets have no ExtendedConfig"
    );

    let prev = c
        .get_secret_value(name, SecretStage::Previous)
        .expect("previous");
    assert_eq!(prev.version_id, "v1");
    assert_eq!(prev.secret_data.expose(), b"first value");
    assert_eq!(prev.version_stages, vec!["ACSPrevious"]);

    let by_id = c.get_secret_value_by_id(name, "v1").expect("by id");
    assert_eq!(by_id.secret_data.expose(), b"first value");

    // An ECS secret with its ExtendedConfig.
    let ecs = "acs/ecs/web-01/root";
    create_secret(
        &c,
        &[
            ("SecretName", ecs),
            ("VersionId", "v1"),
            ("SecretType", "ECS"),
            (
                "ExtendedConfig",
                r#"{"SecretSubType":"Password","RegionId":"cn-hangzhou","InstanceId":"i-web01"}"#,
            ),
        ],
        r#"{"UserName":"root","Password":"Passw0rd!"}"#,
    );
    let v = c.get_secret_value(ecs, SecretStage::Current).expect("ecs");
    assert_eq!(v.secret_type, "ECS");
    let cfg = v.extended_config.expect("ExtendedConfig fetched");
    assert_eq!(cfg["InstanceId"], "i-web01");
    assert_eq!(cfg["SecretSubType"], "Password");
    // Debug never shows the value.
    assert!(!format!("{:?}", c.get_secret_value(ecs, SecretStage::Current)).contains("Passw0rd"));
}

#[test]
fn round_trip_acs3_hmac_sha256() {
    round_trip("v3");
}

#[test]
fn round_trip_hmac_sha1_v1() {
    round_trip("v1");
}

#[test]
fn list_secrets_with_filters_and_paging() {
    let emu = Emulator::start();
    let c = emu.client("");
    for i in 0..130 {
        let name = format!("bulk/s-{i:03}");
        let tags = if i % 10 == 0 {
            r#"[{"TagKey":"team","TagValue":"ops"}]"#
        } else {
            r#"[{"TagKey":"team","TagValue":"dev"}]"#
        };
        create_secret(
            &c,
            &[("SecretName", &name), ("VersionId", "v1"), ("Tags", tags)],
            "x",
        );
    }
    create_secret(
        &c,
        &[
            ("SecretName", "acs/ecs/web-02/deploy"),
            ("VersionId", "v1"),
            ("SecretType", "ECS"),
            (
                "ExtendedConfig",
                r#"{"SecretSubType":"Password","RegionId":"cn-hangzhou","InstanceId":"i-web02"}"#,
            ),
        ],
        r#"{"UserName":"deploy","Password":"x"}"#,
    );

    emu.reset_stats();
    let all = c.list_secrets(&[]).expect("list all");
    assert_eq!(all.len(), 131);
    let mut names: Vec<&str> = all.iter().map(|s| s.secret_name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 131, "no duplicates across pages");
    assert_eq!(emu.calls("ListSecrets"), 2, "131 secrets at 100 a page");
    let tagged = all
        .iter()
        .find(|s| s.secret_name == "bulk/s-010")
        .expect("listed");
    assert_eq!(tagged.tags.len(), 1);
    assert_eq!(
        (tagged.tags[0].key.as_str(), tagged.tags[0].value.as_str()),
        ("team", "ops")
    );

    let ops = c
        .list_secrets(&[Filter::new("TagValue", ["ops"])])
        .expect("tag filter");
    assert_eq!(ops.len(), 13);
    let ecs = c
        .list_secrets(&[Filter::new("SecretType", ["ECS"])])
        .expect("type filter");
    assert_eq!(ecs.len(), 1);
    assert_eq!(ecs[0].secret_name, "acs/ecs/web-02/deploy");
    assert_eq!(ecs[0].secret_type, "ECS");
    let two = c
        .list_secrets(&[Filter::new("SecretName", ["bulk/s-007", "bulk/s-129"])])
        .expect("name filter");
    let mut got: Vec<&str> = two.iter().map(|s| s.secret_name.as_str()).collect();
    got.sort_unstable();
    assert_eq!(got, vec!["bulk/s-007", "bulk/s-129"]);
    let none = c
        .list_secrets(&[Filter::new("SecretName", ["no-such-secret"])])
        .expect("empty result");
    assert!(none.is_empty());
}

#[test]
fn describe_secret_metadata() {
    let emu = Emulator::start();
    let c = emu.client("");
    let name = "acs/ecs/web-01/root";
    create_secret(
        &c,
        &[
            ("SecretName", name),
            ("VersionId", "v1"),
            ("SecretType", "ECS"),
            ("Description", "root on web-01"),
            ("EnableAutomaticRotation", "true"),
            ("RotationInterval", "7d"),
            ("Tags", r#"[{"TagKey":"env","TagValue":"prod"}]"#),
            (
                "ExtendedConfig",
                r#"{"SecretSubType":"SSHKey","RegionId":"cn-hangzhou","InstanceId":"i-web01"}"#,
            ),
        ],
        r#"{"UserName":"root","PublicKey":"ssh-ed25519 AAAA","PrivateKey":"-----BEGIN"}"#,
    );
    let d = c.describe_secret(name).expect("describe");
    assert_eq!(d.secret_name, name);
    assert_eq!(d.secret_type, "ECS");
    assert_eq!(d.description.as_deref(), Some("root on web-01"));
    assert_eq!(d.rotation_interval.as_deref(), Some("604800s"));
    assert_eq!(d.automatic_rotation.as_deref(), Some("Enabled"));
    assert!(d.planned_delete_time.is_none());
    assert!(
        d.arn
            .as_deref()
            .is_some_and(|a| a.ends_with(":secret/acs/ecs/web-01/root")),
        "{:?}",
        d.arn
    );
    let cfg = d.extended_config.expect("extended config");
    assert_eq!(cfg["SecretSubType"], "SSHKey");
    assert_eq!(cfg["InstanceId"], "i-web01");
    assert_eq!(d.tags.len(), 1);
    assert_eq!(d.tags[0].key, "env");

    let e = c.describe_secret("acs/ecs/nope").expect_err("unknown");
    assert_eq!(e.kind, KmsErrorKind::NotFound);
}

#[test]
fn not_found_is_typed_and_never_retried() {
    let emu = Emulator::start();
    let c = emu.client("");
    emu.reset_stats();
    let started = Instant::now();
    let e = c
        .get_secret_value("acs/ecs/gone/root", SecretStage::Current)
        .expect_err("no such secret");
    assert_eq!(e.kind, KmsErrorKind::NotFound, "{e}");
    assert_eq!(e.code.as_deref(), Some("Forbidden.ResourceNotFound"));
    assert_eq!(e.http_status, Some(404));
    let rid = e.request_id.clone().expect("RequestId");
    let shown = e.to_string();
    assert!(
        shown.contains("Forbidden.ResourceNotFound") && shown.contains(&rid),
        "{shown}"
    );
    assert!(!e.is_retryable());
    assert_eq!(
        emu.calls("GetSecretValue"),
        1,
        "not-found must not be retried"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn pending_deletion_and_forced_deletion() {
    let emu = Emulator::start();
    let c = emu.client("");
    for name in ["app/soon-gone", "app/gone-now"] {
        create_secret(&c, &[("SecretName", name), ("VersionId", "v1")], "value");
    }
    c.call_raw(
        "DeleteSecret",
        &params(&[
            ("SecretName", "app/soon-gone"),
            ("RecoveryWindowInDays", "7"),
        ]),
        &BTreeMap::new(),
    )
    .expect("scheduled deletion");
    c.call_raw(
        "DeleteSecret",
        &params(&[
            ("SecretName", "app/gone-now"),
            ("ForceDeleteWithoutRecovery", "true"),
        ]),
        &BTreeMap::new(),
    )
    .expect("forced deletion");

    emu.reset_stats();
    let e = c
        .get_secret_value("app/soon-gone", SecretStage::Current)
        .expect_err("pending deletion");
    assert_eq!(e.kind, KmsErrorKind::PendingDeletion, "{e}");
    assert!(e.request_id.is_some());
    assert_eq!(emu.calls("GetSecretValue"), 1, "never retried");
    let d = c.describe_secret("app/soon-gone").expect("still described");
    assert!(d.planned_delete_time.is_some());
    let listed = c
        .list_secrets(&[Filter::new("SecretName", ["app/soon-gone"])])
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].planned_delete_time.is_some());

    let e = c
        .get_secret_value("app/gone-now", SecretStage::Current)
        .expect_err("deleted");
    assert_eq!(e.kind, KmsErrorKind::NotFound, "{e}");

    c.call_raw(
        "RestoreSecret",
        &params(&[("SecretName", "app/soon-gone")]),
        &BTreeMap::new(),
    )
    .expect("restore");
    c.get_secret_value("app/soon-gone", SecretStage::Current)
        .expect("readable again");
}

#[test]
fn sts_token_is_signed_in_both_versions() {
    let token = "CAIS+sts/token==with&odd=chars";
    let emu = Emulator::start_with_token(Some(token));
    for sig in ["v3", "v1"] {
        let extra = format!("signature = \"{sig}\"");
        let c = KmsClient::from_settings(&emu.settings(&extra, AK_SECRET, Some(token)))
            .expect("client");
        create_secret(
            &c,
            &[("SecretName", &format!("sts/{sig}")), ("VersionId", "v1")],
            sig,
        );
        let v = c
            .get_secret_value(&format!("sts/{sig}"), SecretStage::Current)
            .expect("read with STS credentials");
        assert_eq!(v.secret_data.expose(), sig.as_bytes());

        let no_token =
            KmsClient::from_settings(&emu.settings(&extra, AK_SECRET, None)).expect("client");
        let e = no_token
            .get_secret_value("sts/v3", SecretStage::Current)
            .expect_err("token required");
        assert_eq!(e.kind, KmsErrorKind::BadCredentials, "{sig}: {e}");

        let wrong = KmsClient::from_settings(&emu.settings(&extra, AK_SECRET, Some("other")))
            .expect("client");
        let e = wrong
            .get_secret_value("sts/v3", SecretStage::Current)
            .expect_err("wrong token");
        assert_eq!(e.kind, KmsErrorKind::BadCredentials, "{sig}: {e}");
        assert!(!e.to_string().contains(token));
    }
}

#[test]
fn wrong_secret_and_unknown_key_are_not_retried() {
    let emu = Emulator::start();
    for sig in ["v3", "v1"] {
        let extra = format!("signature = \"{sig}\"");
        let c = KmsClient::from_settings(&emu.settings(&extra, "not-the-secret", None))
            .expect("client");
        emu.reset_stats();
        let e = c
            .get_secret_value("x", SecretStage::Current)
            .expect_err("bad signature");
        assert_eq!(e.kind, KmsErrorKind::Signature, "{sig}: {e}");
        assert_eq!(e.code.as_deref(), Some("SignatureDoesNotMatch"));
        assert!(!e.to_string().contains("not-the-secret"));
        assert_eq!(emu.calls("GetSecretValue"), 1, "{sig}: not retried");
    }
    let other = KmsClient::with_credentials(
        &emu.settings("", AK_SECRET, None),
        kmsbastion::kms::Credentials {
            access_key_id: "LTAIunknown".into(),
            access_key_secret: AK_SECRET.into(),
            security_token: None,
        },
    )
    .expect("client");
    let e = other
        .get_secret_value("x", SecretStage::Current)
        .expect_err("unknown key");
    assert_eq!(e.kind, KmsErrorKind::BadCredentials, "{e}");
    assert_eq!(e.code.as_deref(), Some("InvalidAccessKeyId.NotFound"));
}

fn emulator_with_secret() -> (Emulator, KmsClient) {
    let emu = Emulator::start();
    let c = emu.client("");
    create_secret(
        &c,
        &[
            ("SecretName", "acs/ecs/web-01/root"),
            ("VersionId", "v1"),
            ("SecretType", "ECS"),
            (
                "ExtendedConfig",
                r#"{"SecretSubType":"Password","RegionId":"cn-hangzhou","InstanceId":"i-web01"}"#,
            ),
        ],
        r#"{"UserName":"root","Password":"pw"}"#,
    );
    emu.reset_stats();
    (emu, c)
}

#[test]
fn throttled_twice_then_success() {
    let (emu, c) = emulator_with_secret();
    emu.fault(json!({"action": "GetSecretValue", "code": "Rejected.Throttling", "count": 2}));
    let started = Instant::now();
    let v = c
        .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
        .expect("succeeds on the third attempt");
    assert_eq!(v.version_id, "v1");
    assert_eq!(emu.calls("GetSecretValue"), 3);
    // Two backoffs of at most 100 ms and 200 ms.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn internal_failure_is_retried() {
    let (emu, c) = emulator_with_secret();
    emu.fault(json!({"action": "GetSecretValue", "code": "InternalFailure", "count": 1}));
    c.get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
        .expect("second attempt succeeds");
    assert_eq!(emu.calls("GetSecretValue"), 2);
}

/// The acceptance case: persistent 503 with the default 5 s deadline.
#[test]
fn persistent_unavailable_fails_clearly_within_the_deadline() {
    let (emu, c) = emulator_with_secret();
    assert_eq!(c.retry_policy().deadline, Duration::from_secs(5));
    emu.fault(
        json!({"action": "GetSecretValue", "code": "ServiceUnavailableTemporary", "count": 0}),
    );
    let started = Instant::now();
    let e: KmsError = c
        .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
        .expect_err("never succeeds");
    let took = started.elapsed();
    eprintln!("persistent 503: {took:?}: {e}");
    assert_eq!(e.kind, KmsErrorKind::Unavailable, "{e}");
    assert_eq!(e.code.as_deref(), Some("ServiceUnavailableTemporary"));
    assert_eq!(e.http_status, Some(503));
    assert!(e.request_id.is_some());
    let calls = emu.calls("GetSecretValue");
    assert!(
        e.message
            .contains(&format!("gave up after {calls} attempts")),
        "attempt count in the message matches the emulator's ({calls}): {e}"
    );
    assert!(calls >= 5, "retried within the deadline: {calls}");
    assert!(
        took <= Duration::from_millis(5300),
        "not much beyond the deadline: {took:?}"
    );
    assert!(
        took >= Duration::from_millis(3500),
        "used the deadline: {took:?}"
    );
}

/// A hanging KMS: the attempt's timeout is the time left, so the call ends at the deadline.
#[test]
fn slow_kms_times_out_at_the_deadline() {
    let (emu, c0) = emulator_with_secret();
    drop(c0);
    let c = emu.client("deadline_ms = 1000");
    emu.fault(json!({"action": "GetSecretValue", "latency_ms": 3000, "count": 0}));
    let started = Instant::now();
    let e = c
        .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
        .expect_err("times out");
    let took = started.elapsed();
    eprintln!("latency 3 s, deadline 1 s: {took:?}: {e}");
    assert_eq!(e.kind, KmsErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("did not answer within"), "{e}");
    assert!(took < Duration::from_millis(1400), "{took:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[test]
fn persistent_throttling_ends_as_throttled() {
    let (emu, c0) = emulator_with_secret();
    drop(c0);
    let c = emu.client("deadline_ms = 1500");
    emu.fault(json!({"action": "GetSecretValue", "code": "Rejected.Throttling", "count": 0}));
    let started = Instant::now();
    let e = c
        .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
        .expect_err("throttled");
    assert_eq!(e.kind, KmsErrorKind::Throttled, "{e}");
    assert!(e.message.contains("gave up after"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(1800));
    assert!(emu.calls("GetSecretValue") >= 3);
}

/// A TLS-terminating proxy in front of the emulator (Python's `ssl` + `http.server`), so the
/// client's HTTPS path and `[kms] ca_file` are exercised for real. Headers and body pass
/// through untouched, so the emulator still verifies the signatures (Host included).
const TLS_PROXY_PY: &str = r#"
import http.client, http.server, ssl, sys
cert, key, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        up = http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
        up.putrequest("POST", self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in ("connection", "content-length"):
                up.putheader(k, v)
        up.putheader("Content-Length", str(len(body)))
        up.endheaders(body)
        r = up.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening on https://127.0.0.1:%d" % srv.server_address[1], flush=True)
srv.serve_forever()
"#;

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install openssl and python3): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `<name>-ca.pem` and, signed by it, a server certificate for IP 127.0.0.1.
fn make_ca_and_server_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=kmsbastion test CA",
            ])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(p("srv.key"))
            .arg("-out")
            .arg(p("srv.csr")),
    );
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("srv.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext"))
            .arg("-out")
            .arg(p("srv.pem")),
    );
    (p("ca.pem"), p("srv.pem"), p("srv.key"))
}

/// The proxy process; killed by pid on drop.
struct TlsProxy {
    child: Child,
    url: String,
}

impl TlsProxy {
    fn start(dir: &Path, cert: &Path, key: &Path, upstream: &str) -> Self {
        let script = dir.join("tls_proxy.py");
        std::fs::write(&script, TLS_PROXY_PY).expect("write proxy");
        let port = upstream.rsplit(':').next().expect("port");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(cert)
            .arg(key)
            .arg(port)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the HTTPS test");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(line)) if line.starts_with("listening on https://") => Self {
                url: line.trim_start_matches("listening on ").to_owned(),
                child,
            },
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("TLS proxy did not start: {other:?}");
            }
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_with_configured_ca_file() {
    let (emu, plain) = emulator_with_secret();
    drop(plain);
    let (ca, cert, key) = make_ca_and_server_cert(emu.inner.dir.path(), "good");
    let (other_ca, _, _) = make_ca_and_server_cert(emu.inner.dir.path(), "other");
    let proxy = TlsProxy::start(emu.inner.dir.path(), &cert, &key, &emu.url);

    let https_settings = |extra: &str| {
        let mut s = emu.settings(extra, AK_SECRET, None);
        s.endpoint = Some(proxy.url.clone());
        s
    };
    for sig in ["v3", "v1"] {
        let c = KmsClient::from_settings(&https_settings(&format!(
            "signature = \"{sig}\"\nca_file = {ca:?}"
        )))
        .expect("client");
        let v = c
            .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
            .expect("GetSecretValue over HTTPS");
        assert_eq!(
            v.secret_data.expose(),
            br#"{"UserName":"root","Password":"pw"}"#
        );
    }

    // The system roots and an unrelated CA do not trust the test certificate: a TLS error,
    // reported as such and not retried.
    emu.reset_stats();
    for extra in [String::new(), format!("ca_file = {other_ca:?}")] {
        let c = KmsClient::from_settings(&https_settings(&extra)).expect("client");
        let started = Instant::now();
        let e = c
            .get_secret_value("acs/ecs/web-01/root", SecretStage::Current)
            .expect_err("untrusted certificate");
        eprintln!("untrusted certificate: {e}");
        assert_eq!(e.kind, KmsErrorKind::Transport, "{extra}: {e}");
        assert!(!e.is_retryable());
        assert!(e.message.contains("ca_file"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "not retried");
    }
    assert_eq!(emu.calls("GetSecretValue"), 0, "nothing reached KMS");
}
