//! Configuration tests: the example parses, every error names file and line.

use super::*;

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop";
const KEY_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo bob";
const HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=";

fn base() -> String {
    format!(
        r#"[kms]
endpoint = "http://127.0.0.1:9100"
credentials = "file"
credentials_file = "/etc/kmsbastion/credentials"

[bastion]
group = "kmsbastion-engineers"
gid = 64000
uid_min = 64001
uid_max = 64999

[audit]
file = "/var/log/kmsbastion/audit.log"

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"

[[engineer]]
name = "alice"
uid = 64001
keys = ["{KEY_A}"]
groups = ["ops"]

[[grant]]
groups = ["ops"]
accounts = ["root@web-01"]
"#
    )
}

const P: &str = "/etc/kmsbastion/kmsbastion.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(P))
}

/// Replaces `from` (which must occur exactly once) in the base config.
fn with(from: &str, to: &str) -> String {
    let b = base();
    assert_eq!(
        b.matches(from).count(),
        1,
        "{from:?} must occur once in the base config"
    );
    b.replace(from, to)
}

/// Asserts that `text` fails with a problem on `line` whose message contains `needle`,
/// and that Display prints it as `path:line: …`.
#[track_caller]
fn fails_at(text: &str, line: usize, needle: &str) -> ConfigError {
    let err = parse(text).expect_err("must fail");
    let shown = err.to_string();
    assert!(
        err.problems
            .iter()
            .any(|p| p.line == Some(line) && p.message.contains(needle)),
        "want line {line} containing {needle:?}, got:\n{shown}"
    );
    assert!(shown.contains(&format!("{P}:{line}: ")), "{shown}");
    err
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1
}

#[test]
fn base_parses_with_defaults() {
    let c = parse(&base()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.bastion.shell, Path::new(DEFAULT_SHELL));
    assert_eq!(c.bastion.home, Path::new("/"));
    assert_eq!(c.bastion.connect_timeout_s, DEFAULT_CONNECT_TIMEOUT_S);
    assert_eq!(c.hosts[0].port, 22);
    assert_eq!(c.hosts[0].instance_id, None);
    assert_eq!(c.kms.credentials, CredentialSource::File);
    assert_eq!(c.kms.deadline_ms, DEFAULT_KMS_DEADLINE_MS);
    assert!(c.audit.syslog);
    assert_eq!(c.grants[0].line, 31);
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    assert_eq!(c.engineer("alice").map(|e| e.uid), Some(64001));
    assert_eq!(
        c.engineer_by_uid(64001).map(|e| e.name.as_str()),
        Some("alice")
    );
    assert!(c.engineer_by_uid(64002).is_none());
    let (h, a) = c.account("web-01", "root").unwrap();
    assert_eq!(
        (h.address.as_str(), a.secret.as_str()),
        ("127.0.0.2", "acs/ecs/web-01/root")
    );
    assert!(c.account("web-01", "nobody").is_none());
    assert!(c.host("web-02").is_none());
    assert_eq!(
        c.engineers[0].public_keys()[0].comment.as_deref(),
        Some("alice@laptop")
    );
}

#[test]
fn example_config_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/kmsbastion.toml"
    ))
    .unwrap();
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.engineers.is_empty() && !c.hosts.is_empty() && !c.grants.is_empty());
}

#[test]
fn syntax_errors_name_the_line() {
    fails_at(
        &with("gid = 64000", "gid = 64000\ncolour = \"blue\""),
        9,
        "unknown field `colour`",
    );
    fails_at(
        &with("name = \"web-01\"", "name = \"web-01\"\nadress = \"x\""),
        17,
        "unknown field `adress`",
    );
    fails_at(
        &with(
            "  secret = \"acs/ecs/web-01/root\"",
            "  secret = \"acs/ecs/web-01/root\"\n  password = \"x\"",
        ),
        22,
        "unknown field `password`",
    );
    fails_at(
        &with("credentials = \"file\"", "credentials = \"files\""),
        3,
        "unknown variant `files`",
    );
    fails_at(
        &with(
            "credentials = \"file\"",
            "credentials = \"file\"\nsecret_key = \"x\"",
        ),
        4,
        "unknown field `secret_key`",
    );
    fails_at(&with("uid = 64001", "uid = -1"), 25, "invalid value");
    fails_at(&with("uid = 64001", "uid = \"64001\""), 25, "invalid type");
    fails_at(
        &with("[audit]", "[audit]\nsyslog = \"yes\""),
        13,
        "invalid type",
    );
    fails_at(
        &with("[[grant]]", "[[grant]]\nenginers = [\"alice\"]"),
        30,
        "unknown field `enginers`",
    );
    fails_at(&with("[[grant]]", "[grant]"), 29, "");
    fails_at(&with("gid = 64000", "gid = 64000\ngid = 1"), 9, "duplicate");
    fails_at(
        &format!("{}\n[surprise]\n", base()),
        33,
        "unknown field `surprise`",
    );
    let e = parse("this is not toml").unwrap_err();
    assert_eq!(e.kind, ConfigErrorKind::Syntax);
    assert!(e.to_string().starts_with(&format!("{P}:1: ")), "{e}");
}

#[test]
fn bastion_errors() {
    fails_at(&with("gid = 64000", "gid = 0"), 8, "gid must not be 0");
    fails_at(&with("uid_min = 64001", "uid_min = 500"), 9, "below 1000");
    fails_at(
        &with("uid_max = 64999", "uid_max = 64000"),
        10,
        "below uid_min",
    );
    fails_at(
        &with("uid_max = 64999", "uid_max = 3000000000"),
        10,
        "above",
    );
    fails_at(
        &with("group = \"kmsbastion-engineers\"", "group = \"Engineers!\""),
        7,
        "not a valid group name",
    );
    fails_at(
        &with("gid = 64000", "gid = 64000\nshell = \"bin/sh\""),
        9,
        "absolute path",
    );
    fails_at(
        &with("gid = 64000", "gid = 64000\nhome = \"/home/a:b\""),
        9,
        "without ':'",
    );
    fails_at(
        &with("gid = 64000", "gid = 64000\nconnect_timeout_s = 0"),
        9,
        "connect_timeout_s",
    );
    fails_at(
        &with("gid = 64000", "gid = 64000\nservice_user = \"-x\""),
        9,
        "service_user",
    );
    fails_at(
        &with(
            "file = \"/var/log/kmsbastion/audit.log\"",
            "file = \"audit.log\"",
        ),
        13,
        "absolute path",
    );
}

#[test]
fn kms_errors() {
    fails_at(
        &with(
            "endpoint = \"http://127.0.0.1:9100\"",
            "endpoint = \"127.0.0.1:9100\"",
        ),
        1,
        "must start with https://",
    );
    fails_at(
        &with(
            "endpoint = \"http://127.0.0.1:9100\"",
            "region = \"cn-hangzhou\"\ndeadline_ms = 0",
        ),
        1,
        "deadline_ms",
    );
    fails_at(
        &with("endpoint = \"http://127.0.0.1:9100\"", "network = \"vpc\""),
        1,
        "needs `region`",
    );
    fails_at(
        &with(
            "endpoint = \"http://127.0.0.1:9100\"",
            "region = \"CN Hangzhou\"",
        ),
        1,
        "region",
    );
    let c = parse(&with(
        "endpoint = \"http://127.0.0.1:9100\"",
        "region = \"cn-hangzhou\"\nnetwork = \"vpc\"",
    ))
    .unwrap();
    assert_eq!(c.kms.network, Network::Vpc);
}

#[test]
fn host_errors() {
    fails_at(
        &with("name = \"web-01\"", "name = \"web_01\""),
        16,
        "login grammar",
    );
    fails_at(
        &with("address = \"127.0.0.2\"", "address = \"-oProxyCommand=x\""),
        17,
        "must not start with '-'",
    );
    fails_at(
        &with("address = \"127.0.0.2\"", "address = \"web 01\""),
        17,
        "neither an IP address nor a DNS name",
    );
    fails_at(
        &with(
            "address = \"127.0.0.2\"",
            "address = \"127.0.0.2\"\nport = 0",
        ),
        18,
        "port",
    );
    fails_at(
        &with(
            "address = \"127.0.0.2\"",
            "address = \"127.0.0.2\"\nport = 70000",
        ),
        18,
        "invalid value",
    );
    fails_at(&with(HOST_KEY, "ssh-ed25519 AAAA"), 18, "host_keys");
    fails_at(
        &with(
            "address = \"127.0.0.2\"",
            "address = \"127.0.0.2\"\ninstance_id = \"i x\"",
        ),
        18,
        "instance_id",
    );
    fails_at(
        &with("  name = \"root\"", "  name = \"Root\""),
        20,
        "login grammar",
    );
    fails_at(
        &with(
            "  secret = \"acs/ecs/web-01/root\"",
            "  secret = \"acs ecs\"",
        ),
        21,
        "secret name",
    );
    let dup = format!(
        "{}\n[[host]]\nname = \"web-01\"\naddress = \"127.0.0.9\"\n",
        base()
    );
    fails_at(&dup, 34, "defined twice (first on line 16)");
    let dup_acct = with("  secret = \"acs/ecs/web-01/root\"", "  secret = \"acs/ecs/web-01/root\"\n  [[host.account]]\n  name = \"root\"\n  secret = \"x\"");
    fails_at(&dup_acct, 23, "defined twice on host");
    let host_key_line = line_of(&base(), "host_keys");
    assert_eq!(host_key_line, 18);
}

#[test]
fn engineer_errors() {
    fails_at(
        &with("name = \"alice\"", "name = \"Alice\""),
        24,
        "login grammar",
    );
    fails_at(&with("uid = 64001", "uid = 70000"), 25, "outside");
    fails_at(&with(KEY_A, "ssh-rsa AAAA"), 26, "keys");
    fails_at(
        &with(KEY_A, "-----BEGIN OPENSSH PRIVATE KEY-----"),
        26,
        "PRIVATE",
    );
    fails_at(
        &with("groups = [\"ops\"]\n\n", "groups = [\"o p\"]\n\n"),
        27,
        "group name",
    );
    let dup = format!("{}\n[[engineer]]\nname = \"alice\"\nuid = 64002\n", base());
    fails_at(&dup, 34, "defined twice (first on line 24)");
    let dup_uid = format!("{}\n[[engineer]]\nname = \"bob\"\nuid = 64001\n", base());
    fails_at(&dup_uid, 35, "already used by engineer \"alice\"");
    let shared_key = format!(
        "{}\n[[engineer]]\nname = \"bob\"\nuid = 64002\nkeys = [\"{KEY_A}\"]\n",
        base()
    );
    fails_at(&shared_key, 36, "already belongs to engineer \"alice\"");
    let ok = format!(
        "{}\n[[engineer]]\nname = \"bob\"\nuid = 64002\nkeys = [\"{KEY_B}\"]\n",
        base()
    );
    assert!(parse(&ok).is_ok());
}

#[test]
fn grant_errors() {
    fails_at(
        &with(
            "groups = [\"ops\"]\naccounts",
            "groups = [\"nope\"]\naccounts",
        ),
        30,
        "unknown group \"nope\"",
    );
    fails_at(
        &with(
            "groups = [\"ops\"]\naccounts",
            "engineers = [\"carol\"]\naccounts",
        ),
        30,
        "unknown engineer \"carol\"",
    );
    fails_at(
        &with("groups = [\"ops\"]\naccounts", "accounts"),
        30,
        "needs `engineers` or `groups`",
    );
    fails_at(
        &with("accounts = [\"root@web-01\"]", "accounts = []"),
        31,
        "`accounts` is empty",
    );
    fails_at(
        &with("accounts = [\"root@web-01\"]", "accounts = [\"root\"]"),
        31,
        "must look like \"account@host\"",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web@01\"]",
        ),
        31,
        "must look like",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-02\"]",
        ),
        31,
        "is not a host account",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"ro/ot@web-01\"]",
        ),
        31,
        "not allowed in the account part",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-01\"]\nfrom = []",
        ),
        32,
        "`from` is empty",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-01\"]\nfrom = [\"10.0.0.1/8\"]",
        ),
        32,
        "did you mean \"10.0.0.0/8\"",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-01\"]\nfrom = [\"10.0.0.0/33\"]",
        ),
        32,
        "not an address or a CIDR",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-01\"]\nnot_before = \"2026-01-01\"",
        ),
        32,
        "RFC 3339",
    );
    fails_at(
        &with("accounts = [\"root@web-01\"]", "accounts = [\"root@web-01\"]\nnot_before = \"2026-01-01T00:00:00Z\"\nnot_after = \"2026-01-01T00:00:00Z\""),
        33,
        "not_after must be later than not_before",
    );
    fails_at(
        &with(
            "accounts = [\"root@web-01\"]",
            "accounts = [\"root@web-01\"]\nnot_after = 2026-01-01T00:00:00Z",
        ),
        32,
        "invalid type",
    );
    let ok = with(
        "accounts = [\"root@web-01\"]",
        "accounts = [\"root@web-01\"]\nfrom = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]",
    );
    let c = parse(&ok).unwrap();
    assert_eq!(c.grants[0].from.len(), 3);
}

#[test]
fn every_problem_is_reported() {
    let text =
        with("uid = 64001", "uid = 1").replace("address = \"127.0.0.2\"", "address = \"-x\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.kind, ConfigErrorKind::Invalid);
    assert_eq!(e.problems.len(), 2, "{e}");
    assert_eq!(e.to_string().lines().count(), 2);
}

#[test]
fn warnings_are_listed() {
    let text = with(&format!("host_keys = [\"{HOST_KEY}\"]"), "")
        .replace(&format!("keys = [\"{KEY_A}\"]"), "")
        + "\n[[host]]\nname = \"empty\"\naddress = \"db.example.com\"\nhost_keys = [\""
        + HOST_KEY
        + "\"]\n"
        + "\n[[grant]]\nengineers = [\"alice\"]\naccounts = [\"admin@*\"]\n";
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = c.warnings().iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter()
            .any(|w| w.starts_with(&format!("{P}:16: warning:")) && w.contains("unusable")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains(":24: warning:") && w.contains("no keys")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("\"empty\" has no [[host.account]]")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("\"admin@*\" matches no host account")),
        "{w:?}"
    );
    assert!(!Config::host_is_usable(c.host("web-01").unwrap()));
}

#[test]
fn local_accounts_are_checked() {
    let local = LocalDb::from_texts(
        "root:x:0:0::/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
        "root:x:0:\nadmin:x:1000:\n",
    );
    let ok = Config::parse_checked(&base(), Path::new(P), &local);
    assert!(ok.is_ok(), "{:?}", ok.err());

    let check = |passwd: &str, group: &str, line: usize, needle: &str| {
        let db = LocalDb::from_texts(passwd, group);
        let e = Config::parse_checked(&base(), Path::new(P), &db).expect_err("must fail");
        assert!(
            e.problems
                .iter()
                .any(|p| p.line == Some(line) && p.message.contains(needle)),
            "{needle}: {e}"
        );
    };
    check(
        "squatter:x:64500:100::/:/bin/sh\n",
        "",
        9,
        "contains local users: squatter (64500)",
    );
    check(
        "",
        "games:x:64000:\n",
        8,
        "already used by the local group \"games\"",
    );
    check(
        "",
        "kmsbastion-engineers:x:5000:\n",
        7,
        "exists as a local group",
    );
    check(
        "alice:x:1001:1001::/home/alice:/bin/sh\n",
        "",
        24,
        "name of a local user",
    );
    check(
        "alice@root@web-01:x:1001:1001::/:/bin/sh\n",
        "",
        24,
        "looks like a login of engineer",
    );
}

#[test]
fn load_reports_missing_and_unreadable_files() {
    let e = Config::load(Path::new("/nonexistent/kmsbastion.toml")).unwrap_err();
    assert_eq!(e.kind, ConfigErrorKind::Missing);
    assert!(
        e.to_string()
            .starts_with("/nonexistent/kmsbastion.toml: cannot read"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.toml");
    std::fs::write(&p, b"[bastion]\ngid = \xff\n").unwrap();
    let e = Config::load(&p).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
}

#[test]
fn glob_patterns() {
    assert!(pattern_matches("root@web-01", "root", "web-01"));
    assert!(pattern_matches("*@web-*", "deploy", "web-01"));
    assert!(pattern_matches("*@*", "a", "b"));
    assert!(pattern_matches("d*y@w*1", "deploy", "web-01"));
    assert!(!pattern_matches("root@web-*", "root", "db-01"));
    assert!(!pattern_matches("root@web", "root", "web-01"));
    assert!(!pattern_matches("*", "root", "web"));
    assert!(pattern_matches(
        "a*a*a*a*b@h",
        &format!("{}b", "ab".repeat(15)),
        "h"
    ));
    assert!(!pattern_matches(
        "a*a*a*a*b@h",
        &"ab".repeat(15).replace('b', "a"),
        "h"
    ));
    assert!(!pattern_matches(
        &format!("{}b@h", "*a".repeat(20)),
        &"a".repeat(32),
        "h"
    ));
}
