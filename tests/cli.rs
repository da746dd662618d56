//! The `kmsbastion` admin CLI, run as a binary against the real KMS emulator
//! (`examples/kms-emulator`, built by `cargo test` with the other examples).
//!
//! Every test starts its own emulator on a free loopback port with its own state directory
//! (killed by pid when the test ends) and its own configuration file, creates ECS secrets
//! through the signed API (`KmsClient::call_raw`), then runs `target/<profile>/kmsbastion`
//! and checks exit code, output and the configuration file byte for byte.
//! `keyscan` against a real sshd needs a network namespace: its parsing and pinning are unit
//! tests in `src/cli/keyscan.rs`, and `make lab` runs it against real targets.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use kmsbastion::config::KmsSettings;
use kmsbastion::kms::KmsClient;
use serde_json::Value;

const AK_ID: &str = "LTAI5tCliTestKeyId";
const AK_SECRET: &str = "cli-test-access-key-secret";
const ALICE_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGM55JCfXuIE0FPMKbcyPJCzdwvaKan9ffNJ8Qxe7XDE alice@laptop";
const BOB_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaxS3kl9mJSR9qnefRkfjzCu25IpvSswAGu1Nzn2p9D bob@laptop";
const WEB01_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIObC5Ry7yVluV/N47AfsknQL2gSP40rg8qoRALg5VFw5";

/// A running emulator plus a scratch directory with the credentials file and the config.
struct Lab {
    emulator: common::Emulator,
    url: String,
}

impl Lab {
    fn start() -> Self {
        let emulator = common::Emulator::start(AK_ID, AK_SECRET, None);
        let url = emulator.url.clone();
        let dir = &emulator.dir;
        let creds = dir.path().join("credentials");
        let mut f = std::fs::File::create(&creds).expect("create credentials");
        writeln!(
            f,
            "access_key_id = {AK_ID}\naccess_key_secret = {AK_SECRET}"
        )
        .expect("write");
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Lab { emulator, url }
    }

    fn credentials(&self) -> PathBuf {
        self.emulator.dir.path().join("credentials")
    }

    fn config_path(&self) -> PathBuf {
        self.emulator.dir.path().join("kmsbastion.toml")
    }

    /// The `[kms]` section pointing at this emulator (or at `endpoint`).
    fn kms_section(&self, endpoint: &str) -> String {
        format!(
            "[kms]\nendpoint = {endpoint:?}\ncredentials = \"file\"\ncredentials_file = {:?}\ndeadline_ms = 1500\n",
            self.credentials()
        )
    }

    /// Writes the standard configuration: web-01 (i-web01, pinned key, maybe accounts),
    /// web-02 (i-web02), db-01 (no instance id), engineers alice and bob.
    fn write_config(&self, accounts_web01: &str, grants: &str) -> String {
        let text = format!(
            "# kmsbastion test configuration (tests/cli.rs)\n{kms}\n\
             [[host]]\nname = \"web-01\"   # front end\naddress = \"127.0.0.2\"\nhost_keys = [\"{WEB01_HOST_KEY}\"]\ninstance_id = \"i-web01\"\n{accounts_web01}\n\
             # the second front end\n[[host]]\nname = \"web-02\"\naddress = \"127.0.0.3\"\ninstance_id = \"i-web02\"\n\n\
             [[host]]\nname = \"db-01\"\naddress = \"127.0.0.4\"\n\n\
             [[engineer]]\nname = \"alice\"\nuid = 64001\nkeys = [\"{ALICE_KEY}\"]\ngroups = [\"ops\"]\n\n\
             [[engineer]]\nname = \"bob\"\nuid = 64002\nkeys = [\"{BOB_KEY}\"]\n\n{grants}",
            kms = self.kms_section(&self.url)
        );
        std::fs::write(self.config_path(), &text).expect("write config");
        text
    }

    fn client(&self) -> KmsClient {
        let settings: KmsSettings = toml::from_str(&format!(
            "endpoint = {:?}\ncredentials = \"file\"\ncredentials_file = {:?}\n",
            self.url,
            self.credentials()
        ))
        .expect("settings");
        KmsClient::from_settings(&settings).expect("client")
    }

    /// CreateSecret of type ECS (secret administrator).
    fn create_ecs(&self, name: &str, instance: &str, user: &str, rotation: bool) {
        let ext = format!(
            r#"{{"SecretSubType":"Password","RegionId":"cn-hangzhou","InstanceId":"{instance}"}}"#
        );
        let data = format!(r#"{{"UserName":"{user}","Password":"Pw-{name}-initial"}}"#);
        let mut q = params(&[
            ("SecretName", name),
            ("VersionId", "v1"),
            ("SecretType", "ECS"),
            ("ExtendedConfig", &ext),
        ]);
        if rotation {
            q.insert("EnableAutomaticRotation".into(), "true".into());
            q.insert("RotationInterval".into(), "7d".into());
        }
        self.client()
            .call_raw("CreateSecret", &q, &params(&[("SecretData", &data)]))
            .expect("CreateSecret");
    }

    fn delete(&self, name: &str) {
        self.client()
            .call_raw(
                "DeleteSecret",
                &params(&[("SecretName", name), ("RecoveryWindowInDays", "7")]),
                &BTreeMap::new(),
            )
            .expect("DeleteSecret");
    }

    fn calls(&self, action: &str) -> u64 {
        let client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("admin client");
        let body = client
            .get(format!("{}/__admin/stats", self.url))
            .send()
            .and_then(|r| r.text())
            .expect("GET /__admin/stats");
        let v: Value = serde_json::from_str(&body).expect("stats JSON");
        v["calls"][action].as_u64().unwrap_or(0)
    }

    /// Runs `kmsbastion --config <config> ARGS…`.
    fn run(&self, args: &[&str]) -> Run {
        run_with(&self.config_path(), args)
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.config_path()).expect("read config")
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// One finished `kmsbastion` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run_with(config: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_kmsbastion"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .stdin(Stdio::null())
        .output()
        .expect("run kmsbastion");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const WEB01_ROOT: &str =
    "\n  [[host.account]]\n  name = \"root\"\n  secret = \"acs/ecs/web-01/root\"\n";
const ALICE_GRANT: &str = "[[grant]]\nengineers = [\"alice\"]\naccounts = [\"root@web-01\"]\nfrom = [\"127.0.0.0/8\"]\nnot_after = \"2099-01-01T00:00:00Z\"\n";

// ------------------------------------------------------------------------------------------
// secrets list
// ------------------------------------------------------------------------------------------

#[test]
fn secrets_list_shows_every_ecs_secret_and_filters_by_instance() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", true);
    lab.create_ecs("acs/ecs/web-02/deploy", "i-web02", "deploy", false);
    lab.write_config(WEB01_ROOT, "");

    let all = lab.run(&["secrets", "list"]);
    assert_eq!(all.code, 0, "{all:?}");
    assert!(all.stdout.contains("acs/ecs/web-01/root"), "{all:?}");
    assert!(all.stdout.contains("acs/ecs/web-02/deploy"), "{all:?}");
    assert!(
        all.stdout.contains("root@web-01"),
        "imported-as column: {all:?}"
    );
    assert!(
        all.stdout.contains("on every 7d"),
        "rotation column: {all:?}"
    );

    let web02 = lab.run(&["secrets", "list", "--host", "web-02", "--json"]);
    assert_eq!(web02.code, 0, "{web02:?}");
    let v = web02.json();
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 1, "{web02:?}");
    assert_eq!(list[0]["name"], "acs/ecs/web-02/deploy");
    assert_eq!(list[0]["instance_id"], "i-web02");
    assert_eq!(list[0]["imported_as"], serde_json::json!([]));

    let by_id = lab.run(&["secrets", "list", "--instance-id", "i-web01", "--json"]);
    assert_eq!(
        by_id.json()[0]["imported_as"][0],
        "root@web-01",
        "{by_id:?}"
    );

    let none = lab.run(&["secrets", "list", "--instance-id", "i-nothing", "--json"]);
    assert_eq!(none.json(), serde_json::json!([]));
}

#[test]
fn secrets_list_unknown_host_or_host_without_instance_is_a_usage_error() {
    let lab = Lab::start();
    lab.write_config("", "");
    let r = lab.run(&["secrets", "list", "--host", "web-99"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no host \"web-99\""), "{r:?}");
    assert!(
        r.stderr.contains("known hosts: web-01, web-02, db-01"),
        "{r:?}"
    );

    let r = lab.run(&["secrets", "list", "--host", "db-01"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("db-01 has no instance_id"), "{r:?}");
}

// ------------------------------------------------------------------------------------------
// import
// ------------------------------------------------------------------------------------------

#[test]
fn import_adds_accounts_in_place_and_is_idempotent() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", true);
    // The account name comes from the secret's UserName, not from its name.
    lab.create_ecs("acs/ecs/web-01/app-credential", "i-web01", "app", false);
    lab.create_ecs("acs/ecs/web-02/deploy", "i-web02", "deploy", false);
    let before = lab.write_config("", "");

    let r = lab.run(&["import", "--host", "web-01"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("added: root@web-01 <- acs/ecs/web-01/root"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("added: app@web-01 <- acs/ecs/web-01/app-credential"),
        "{r:?}"
    );
    assert!(
        !r.stdout.contains("web-02/deploy"),
        "other instance imported: {r:?}"
    );
    assert!(!r.stdout.contains("Pw-"), "a value was printed: {r:?}");

    let after = lab.config();
    // Exactly the two account tables were inserted after web-01's keys; the rest (comments,
    // spacing, other hosts) is byte for byte what it was.
    let inserted = "\n  [[host.account]]\n  name = \"app\"\n  secret = \"acs/ecs/web-01/app-credential\"\n\n  [[host.account]]\n  name = \"root\"\n  secret = \"acs/ecs/web-01/root\"\n";
    let inserted_other_order = "\n  [[host.account]]\n  name = \"root\"\n  secret = \"acs/ecs/web-01/root\"\n\n  [[host.account]]\n  name = \"app\"\n  secret = \"acs/ecs/web-01/app-credential\"\n";
    let anchor = "instance_id = \"i-web01\"\n";
    let expect_a = before.replacen(anchor, &format!("{anchor}{inserted}"), 1);
    let expect_b = before.replacen(anchor, &format!("{anchor}{inserted_other_order}"), 1);
    assert!(
        after == expect_a || after == expect_b,
        "unexpected layout:\n{after}"
    );
    assert!(!after.contains("Pw-"), "a value was stored");

    // Again: nothing changes, not even a byte.
    let again = lab.run(&["import", "--host", "web-01"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("unchanged: root@web-01"), "{again:?}");
    assert!(again.stdout.contains("nothing to change"), "{again:?}");
    assert_eq!(lab.config(), after);

    // The imported configuration is valid for the rest of the tooling.
    let grants_ok = lab.run(&["grants"]);
    assert_eq!(grants_ok.code, 0, "{grants_ok:?}");
}

#[test]
fn import_named_secret_and_dry_run() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-02/deploy", "i-web02", "deploy", false);
    let before = lab.write_config("", "");

    let dry = lab.run(&[
        "import",
        "--host",
        "web-02",
        "--secret",
        "acs/ecs/web-02/deploy",
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(dry.stdout.contains("would add: deploy@web-02"), "{dry:?}");
    assert_eq!(lab.config(), before, "--dry-run wrote the file");

    let r = lab.run(&[
        "import",
        "--host",
        "web-02",
        "--secret",
        "acs/ecs/web-02/deploy",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["written"], true);
    assert_eq!(v["changes"][0]["account"], "deploy");
    assert_eq!(v["changes"][0]["change"], "added");
    assert!(lab.config().contains("secret = \"acs/ecs/web-02/deploy\""));
}

#[test]
fn import_refuses_a_secret_of_another_instance_and_leaves_the_file_unchanged() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", false);
    lab.create_ecs("acs/ecs/web-02/deploy", "i-web02", "deploy", false);
    let before = lab.write_config("", "");

    // One good and one foreign secret: all or nothing.
    let r = lab.run(&[
        "import",
        "--host",
        "web-01",
        "--secret",
        "acs/ecs/web-01/root",
        "--secret",
        "acs/ecs/web-02/deploy",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("secret acs/ecs/web-02/deploy belongs to instance i-web02, not web-01"),
        "{r:?}"
    );
    assert_eq!(
        lab.config(),
        before,
        "the file changed after a refused import"
    );

    let missing = lab.run(&[
        "import",
        "--host",
        "web-01",
        "--secret",
        "acs/ecs/web-01/nope",
    ]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains("does not exist in KMS"),
        "{missing:?}"
    );
    assert_eq!(lab.config(), before);

    // A secret whose account is already bound to another secret.
    lab.create_ecs("acs/ecs/web-01/root-2", "i-web01", "root", false);
    lab.write_config(WEB01_ROOT, "");
    let bound = lab.config();
    let r = lab.run(&[
        "import",
        "--host",
        "web-01",
        "--secret",
        "acs/ecs/web-01/root-2",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("already uses secret"), "{r:?}");
    assert_eq!(lab.config(), bound);

    // A pending-deletion secret is refused too.
    lab.delete("acs/ecs/web-01/root-2");
    let r = lab.run(&[
        "import",
        "--host",
        "web-01",
        "--secret",
        "acs/ecs/web-01/root-2",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("pending deletion"), "{r:?}");
    assert_eq!(lab.config(), bound);
}

#[test]
fn import_unknown_host_and_host_without_instance() {
    let lab = Lab::start();
    let before = lab.write_config("", "");
    let r = lab.run(&["import", "--host", "web-99"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no host \"web-99\""), "{r:?}");
    let r = lab.run(&["import", "--host", "db-01"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("has no instance_id"), "{r:?}");
    let r = lab.run(&["import", "--host", "web-02"]);
    assert_eq!(r.code, 1, "no secrets for the instance is a finding: {r:?}");
    assert!(
        r.stderr
            .contains("no ECS secret in KMS names instance i-web02"),
        "{r:?}"
    );
    assert_eq!(lab.config(), before);
}

#[test]
fn import_reads_only_user_names_and_reports_secret_values_nowhere() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", false);
    lab.write_config("", "");
    let r = lab.run(&["import", "--host", "web-01"]);
    assert_eq!(r.code, 0, "{r:?}");
    // One GetSecretValue per imported secret (for its UserName), never more.
    assert_eq!(lab.calls("GetSecretValue"), 1);
    for text in [&r.stdout, &r.stderr, &lab.config()] {
        assert!(!text.contains("Pw-acs"), "value leaked: {text}");
    }
}

// ------------------------------------------------------------------------------------------
// malformed configuration, KMS down
// ------------------------------------------------------------------------------------------

#[test]
fn a_malformed_config_is_exit_2_with_file_and_line_for_every_command() {
    let lab = Lab::start();
    let text = format!(
        "{}\n[[host]]\nname = \"web-01\"\naddres = \"127.0.0.2\"\n",
        lab.kms_section(&lab.url)
    );
    std::fs::write(lab.config_path(), &text).expect("write");
    let path = lab.config_path();
    let needle = format!("{}:", path.display());
    for args in [
        &["check"][..],
        &["secrets", "list"],
        &["import", "--host", "web-01"],
        &["keyscan", "web-01", "--yes"],
        &["grants"],
        &["explain", "alice@root@web-01"],
    ] {
        let r = lab.run(args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains(&needle),
            "{args:?} does not name the file: {r:?}"
        );
        assert!(
            r.stderr.lines().any(|l| l.contains(&needle)
                && l[l.find(&needle).unwrap_or(0) + needle.len()..]
                    .starts_with(|c: char| c.is_ascii_digit())),
            "{args:?} does not name the line: {r:?}"
        );
        assert_eq!(lab.config(), text, "{args:?} changed a malformed file");
    }
    let missing = run_with(&lab.emulator.dir.path().join("nope.toml"), &["grants"]);
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("nope.toml"), "{missing:?}");
}

/// A loopback port nobody listens on.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn kms_down_is_a_clear_exit_3_and_the_file_is_unchanged() {
    let lab = Lab::start();
    let text = lab
        .write_config(WEB01_ROOT, "")
        .replace(&lab.url, &dead_endpoint());
    std::fs::write(lab.config_path(), &text).expect("write");

    for args in [
        &["secrets", "list"][..],
        &["import", "--host", "web-01"],
        &["check", "--no-host-keys"],
        &["explain", "alice@root@web-01", "--from", "127.0.0.1"],
    ] {
        let r = lab.run(args);
        assert_eq!(r.code, 3, "{args:?}: {r:?}");
        assert!(r.stderr.contains("kmsbastion: KMS: "), "{args:?}: {r:?}");
        assert_eq!(lab.config(), text, "{args:?} changed the file");
    }
    // Offline commands still work.
    assert_eq!(lab.run(&["grants"]).code, 0);
}

#[test]
fn wrong_credentials_are_a_kms_error_with_the_code() {
    let lab = Lab::start();
    lab.write_config("", "");
    std::fs::write(
        lab.credentials(),
        format!("access_key_id = {AK_ID}\naccess_key_secret = wrong\n"),
    )
    .expect("write");
    let r = lab.run(&["secrets", "list"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("SignatureDoesNotMatch"), "{r:?}");
}

// ------------------------------------------------------------------------------------------
// check
// ------------------------------------------------------------------------------------------

#[test]
fn check_describes_every_account_and_flags_deleted_secrets() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", true);
    lab.write_config(WEB01_ROOT, ALICE_GRANT);

    let ok = lab.run(&["check", "--no-host-keys"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    assert!(
        ok.stdout.contains(
            "root@web-01: acs/ecs/web-01/root (ECS/Password), rotation on every 7d, next "
        ),
        "{ok:?}"
    );
    assert!(ok.stdout.contains("check: 0 failure(s)"), "{ok:?}");
    assert_eq!(lab.calls("GetSecretValue"), 0, "check fetched a value");

    lab.delete("acs/ecs/web-01/root");
    let bad = lab.run(&["check", "--no-host-keys", "--json"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    let v = bad.json();
    assert_eq!(v["ok"], false);
    let f = v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["subject"] == "root@web-01")
        .expect("finding for root@web-01")
        .clone();
    assert_eq!(f["status"], "fail");
    assert!(
        f["detail"]
            .as_str()
            .unwrap_or("")
            .contains("pending deletion"),
        "{f}"
    );
    assert_eq!(lab.calls("GetSecretValue"), 0, "check fetched a value");
}

#[test]
fn check_reports_unreachable_sshd_and_missing_pins() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", false);
    // web-01 is pinned but nothing listens at 127.0.0.2:<dead port>; web-02 has no pins.
    let port = dead_endpoint().rsplit(':').next().unwrap_or("1").to_owned();
    let text = lab.write_config(WEB01_ROOT, "").replace(
        "address = \"127.0.0.2\"",
        &format!("address = \"127.0.0.1\"\nport = {port}"),
    );
    std::fs::write(lab.config_path(), text).expect("write");
    let r = lab.run(&["check"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("FAIL  host web-01: cannot fetch its host keys"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("FAIL  host web-02: no pinned host key"),
        "{r:?}"
    );
    assert!(r.stdout.contains("kmsbastion keyscan web-02"), "{r:?}");
}

// ------------------------------------------------------------------------------------------
// keyscan (the real-sshd path is in `make lab`; parsing and pinning are unit tests)
// ------------------------------------------------------------------------------------------

#[test]
fn keyscan_failures_leave_the_file_unchanged() {
    let lab = Lab::start();
    let port = dead_endpoint().rsplit(':').next().unwrap_or("1").to_owned();
    let text = lab.write_config("", "").replace(
        "address = \"127.0.0.3\"",
        &format!("address = \"127.0.0.1\"\nport = {port}"),
    );
    std::fs::write(lab.config_path(), &text).expect("write");
    let r = lab.run(&["keyscan", "web-02", "--yes"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("keyscan web-02"), "{r:?}");
    assert_eq!(lab.config(), text);

    let r = lab.run(&["keyscan", "web-99", "--yes"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no host \"web-99\""), "{r:?}");
    assert_eq!(lab.config(), text);
}

// ------------------------------------------------------------------------------------------
// grants, explain
// ------------------------------------------------------------------------------------------

#[test]
fn grants_lists_targets_rules_sources_and_windows() {
    let lab = Lab::start();
    let grants = format!(
        "{ALICE_GRANT}\n[[grant]]\ngroups = [\"ops\"]\naccounts = [\"root@web-*\"]\nnot_before = \"2098-01-01T00:00:00Z\"\n"
    );
    lab.write_config(WEB01_ROOT, &grants);
    let r = lab.run(&["grants"]);
    assert_eq!(r.code, 0, "{r:?}");
    let alice: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("alice"))
        .collect();
    assert_eq!(alice.len(), 2, "{r:?}");
    assert!(
        alice[0].contains("root@web-01")
            && alice[0].contains("127.0.0.0/8")
            && alice[0].contains("2099-01-01T00:00:00Z")
            && alice[0].ends_with("active"),
        "{r:?}"
    );
    assert!(
        alice[1].contains("group ops") && alice[1].ends_with("not yet"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("bob") && l.ends_with("no grant")),
        "{r:?}"
    );

    let j = lab.run(&["grants", "alice", "--json"]);
    assert_eq!(j.code, 0, "{j:?}");
    let v = j.json();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[0]["target"], "root@web-01");
    assert_eq!(v[0]["from"][0], "127.0.0.0/8");
    assert_eq!(v[0]["via"], "engineer");

    let unknown = lab.run(&["grants", "mallory"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(
        unknown.stderr.contains("no engineer \"mallory\""),
        "{unknown:?}"
    );
}

#[test]
fn explain_walks_every_decision_and_names_the_refusing_one() {
    let lab = Lab::start();
    lab.create_ecs("acs/ecs/web-01/root", "i-web01", "root", true);
    lab.write_config(WEB01_ROOT, ALICE_GRANT);

    let ok = lab.run(&["explain", "alice@root@web-01", "--from", "127.0.0.1"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    for step in [
        "login string",
        "NSS entry",
        "keys (AKC)",
        "grant (PAM)",
        "secret",
        "host key",
    ] {
        assert!(ok.stdout.contains(step), "missing step {step}: {ok:?}");
    }
    assert!(ok.stdout.contains("result: allowed"), "{ok:?}");

    let foreign = lab.run(&[
        "explain",
        "alice@root@web-01",
        "--from",
        "10.0.0.5",
        "--json",
    ]);
    assert_eq!(foreign.code, 1, "{foreign:?}");
    let v = foreign.json();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["refused_by"], "keys (AKC)");

    let bob = lab.run(&["explain", "bob@root@web-01", "--from", "127.0.0.1"]);
    assert_eq!(bob.code, 1, "{bob:?}");
    assert!(
        bob.stdout
            .contains("result: refused at step 3 (keys (AKC))"),
        "{bob:?}"
    );

    let later = lab.run(&[
        "explain",
        "alice@root@web-01",
        "--from",
        "127.0.0.1",
        "--at",
        "2100-01-01T00:00:00Z",
        "--offline",
    ]);
    assert_eq!(later.code, 1, "{later:?}");
    assert!(
        later.stdout.contains("grant (PAM)") && later.stdout.contains("not_after"),
        "{later:?}"
    );

    let nohost = lab.run(&["explain", "alice@root@web-77", "--offline"]);
    assert_eq!(nohost.code, 1, "{nohost:?}");
    assert!(nohost.stdout.contains("no host \"web-77\""), "{nohost:?}");

    let garbage = lab.run(&["explain", "alice@@web-01"]);
    assert_eq!(garbage.code, 1, "{garbage:?}");
    assert!(garbage.stdout.contains("not a valid login"), "{garbage:?}");

    lab.delete("acs/ecs/web-01/root");
    let gone = lab.run(&["explain", "alice@root@web-01", "--from", "127.0.0.1"]);
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(
        gone.stdout.contains("the engineer sees: root@web-01: its secret acs/ecs/web-01/root no longer exists in KMS; ask your secret administrator"),
        "{gone:?}"
    );

    let bad_time = lab.run(&["explain", "alice@root@web-01", "--at", "yesterday"]);
    assert_eq!(bad_time.code, 2, "{bad_time:?}");
}

#[test]
fn usage_errors_exit_2_and_help_lists_every_command() {
    let lab = Lab::start();
    lab.write_config("", "");
    let r = lab.run(&["frobnicate"]);
    assert_eq!(r.code, 2, "{r:?}");
    let help = lab.run(&["--help"]);
    assert_eq!(help.code, 0, "{help:?}");
    for cmd in [
        "check", "secrets", "import", "keyscan", "grants", "explain", "enable", "disable",
    ] {
        assert!(help.stdout.contains(cmd), "--help lacks {cmd}: {help:?}");
    }
    assert!(help.stdout.contains("Exit status"), "{help:?}");
}

#[test]
fn enable_and_disable_are_wired_to_the_enable_module() {
    // An empty system image: nothing to disable, and nothing installed to enable.
    let root = tempfile::tempdir().expect("tempdir");
    let config = root.path().join("kmsbastion.toml");
    let root_arg = root.path().to_str().expect("utf-8 path");
    let off = run_with(&config, &["disable", "--dry-run", "--root", root_arg]);
    assert_eq!(off.code, 0, "{off:?}");
    assert!(off.stdout.contains("nothing to change"), "{off:?}");
    let on = run_with(&config, &["enable", "--dry-run", "--root", root_arg]);
    assert_eq!(on.code, 4, "{on:?}");
    assert!(
        on.stderr.starts_with("kmsbastion: enable failed: "),
        "{on:?}"
    );
    assert!(on.stderr.contains("is not installed"), "{on:?}");
    assert_eq!(
        std::fs::read_dir(root.path()).expect("read_dir").count(),
        0,
        "a dry run wrote files"
    );
}
