//! Every accept and reject path of [`TargetSecret::parse`], on the fixtures in
//! `tests/fixtures/secrets/` (see its README for the command that made each).

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/secrets/",
            $name
        ))
    };
}

const RSA2048_PKCS1: &str = fixture!("rsa2048_pkcs1");
const RSA2048_PKCS1_PUB: &str = fixture!("rsa2048_pkcs1.pub");
const RSA2048_PKCS8: &str = fixture!("rsa2048_pkcs8");
const RSA2048_PKCS8_PUB: &str = fixture!("rsa2048_pkcs8.pub");
const RSA3072_OPENSSH: &str = fixture!("rsa3072_openssh");
const RSA3072_OPENSSH_PUB: &str = fixture!("rsa3072_openssh.pub");
const RSA1024_PKCS1: &str = fixture!("rsa1024_pkcs1");
const ED25519_OPENSSH: &str = fixture!("ed25519_openssh");
const ED25519_OPENSSH_PUB: &str = fixture!("ed25519_openssh.pub");
const ED25519_PKCS8: &str = fixture!("ed25519_pkcs8");
const ED25519_PKCS8_PUB: &str = fixture!("ed25519_pkcs8.pub");
const P256_OPENSSH: &str = fixture!("p256_openssh");
const P256_OPENSSH_PUB: &str = fixture!("p256_openssh.pub");
const P256_SEC1: &str = fixture!("p256_sec1");
const P256_SEC1_PUB: &str = fixture!("p256_sec1.pub");
const P384_PKCS8: &str = fixture!("p384_pkcs8");
const P384_PKCS8_PUB: &str = fixture!("p384_pkcs8.pub");
const P384_OPENSSH: &str = fixture!("p384_openssh");
const P384_OPENSSH_PUB: &str = fixture!("p384_openssh.pub");
const P521_OPENSSH: &str = fixture!("p521_openssh");
const ED25519_ENCRYPTED: &str = fixture!("ed25519_encrypted");
const RSA2048_PKCS1_ENCRYPTED: &str = fixture!("rsa2048_pkcs1_encrypted");

/// A key secret as KMS stores it (serde_json does the escaping, like KMS's own JSON).
fn key_secret(private: &str, public: Option<&str>) -> Vec<u8> {
    let mut object = serde_json::Map::new();
    object.insert("UserName".into(), "root".into());
    if let Some(public) = public {
        object.insert("PublicKey".into(), public.into());
    }
    object.insert("PrivateKey".into(), private.into());
    serde_json::to_vec(&object).unwrap()
}

fn parse_err(data: &[u8]) -> SecretError {
    TargetSecret::parse(data).unwrap_err()
}

/// The `<type> <base64>` part of a `.pub` file, without the comment.
fn without_comment(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn accepts_a_password_secret() {
    let secret =
        TargetSecret::parse(br#"{"UserName":"ecs-user","Password":"H5as\"d\\asd"}"#).unwrap();
    assert_eq!(secret.user_name, "ecs-user");
    match &secret.credential {
        Credential::Password(p) => assert_eq!(p.expose(), "H5as\"d\\asd"),
        Credential::Key(_) => panic!("expected a password"),
    }
    assert_eq!(secret.fingerprint(), None);
    assert_eq!(secret.public_key_openssh(), None);
    assert!(secret.ensure_user("ecs-user").is_ok());
    assert_eq!(
        secret.ensure_user("root"),
        Err(SecretError::UserNameMismatch)
    );
}

#[test]
fn accepts_every_supported_key_format_with_its_public_key() {
    let cases: &[(&str, &str, &str, KeyAlgorithm)] = &[
        (
            RSA2048_PKCS1,
            RSA2048_PKCS1_PUB,
            "SHA256:8txwnhZMOnKXBBn5WanR7ogcB8OTMeOdGZWcf2S7o2I",
            KeyAlgorithm::Rsa { bits: 2048 },
        ),
        (
            RSA2048_PKCS8,
            RSA2048_PKCS8_PUB,
            "SHA256:ry6MVGy0Wv8vWGBSZvhHyUkbXY+R25kZhI4y38mVmnM",
            KeyAlgorithm::Rsa { bits: 2048 },
        ),
        (
            RSA3072_OPENSSH,
            RSA3072_OPENSSH_PUB,
            "SHA256:KAx9ORjPTqoLpKZcv0pTwZkZDivu82OLGh3/+0EzSlo",
            KeyAlgorithm::Rsa { bits: 3072 },
        ),
        (
            ED25519_OPENSSH,
            ED25519_OPENSSH_PUB,
            "SHA256:62FHjSyCLJz2ZSAVfB8OtAmJpC9jWx3W8Oe8MU2A8GY",
            KeyAlgorithm::Ed25519,
        ),
        (
            ED25519_PKCS8,
            ED25519_PKCS8_PUB,
            "SHA256:WOFkCJ7Mmr8rnohnk1pjNXyoQb2K1podjHrn8OjXadE",
            KeyAlgorithm::Ed25519,
        ),
        (
            P256_OPENSSH,
            P256_OPENSSH_PUB,
            "SHA256:NBoHPPatwtg3YJCbUrlRvr3nc2FEQLrFpqjRLI8S2GI",
            KeyAlgorithm::EcdsaP256,
        ),
        (
            P256_SEC1,
            P256_SEC1_PUB,
            "SHA256:7mar6BE5OphA5mbnbyVP6NsYxveoX5O9CH3Wl0bHFbs",
            KeyAlgorithm::EcdsaP256,
        ),
        (
            P384_PKCS8,
            P384_PKCS8_PUB,
            "SHA256:duoGKcYMgtkDM/MDE4B5br1ijyJKA210Gtopv5I8lyg",
            KeyAlgorithm::EcdsaP384,
        ),
        (
            P384_OPENSSH,
            P384_OPENSSH_PUB,
            "SHA256:E+eyjdzwz+GW3ySO4fsQvER2VQlWKzSbHVq3MLRbLBg",
            KeyAlgorithm::EcdsaP384,
        ),
    ];
    for (private, public, fingerprint, algorithm) in cases {
        for with_public in [true, false] {
            let data = key_secret(private, with_public.then_some(*public));
            let secret = TargetSecret::parse(&data)
                .unwrap_or_else(|e| panic!("{fingerprint} rejected: {e}"));
            assert_eq!(secret.user_name, "root");
            assert_eq!(secret.fingerprint().as_deref(), Some(*fingerprint));
            assert_eq!(
                secret.public_key_openssh(),
                Some(without_comment(public)),
                "{fingerprint}"
            );
            let Credential::Key(key) = &secret.credential else {
                panic!("expected a key");
            };
            assert_eq!(key.algorithm(), *algorithm);
        }
    }
}

#[test]
fn accepts_crlf_line_endings_and_surrounding_whitespace() {
    for (private, public) in [
        (RSA2048_PKCS1, RSA2048_PKCS1_PUB),
        (ED25519_OPENSSH, ED25519_OPENSSH_PUB),
        (P256_SEC1, P256_SEC1_PUB),
    ] {
        let crlf = format!("\n {} \n", private.replace('\n', "\r\n"));
        let secret = TargetSecret::parse(&key_secret(&crlf, Some(public))).unwrap();
        assert_eq!(secret.public_key_openssh(), Some(without_comment(public)));
    }
}

#[test]
fn ignores_unknown_fields() {
    let data = br#"{"Extra":{"a":[1,2,null]},"UserName":"root","Password":"x","Note":"n"}"#;
    assert!(TargetSecret::parse(data).is_ok());
}

#[test]
fn rejects_oversized_values() {
    let padding = "a".repeat(MAX_SECRET_BYTES);
    let data = format!(r#"{{"UserName":"root","Password":"{padding}"}}"#);
    assert_eq!(
        parse_err(data.as_bytes()),
        SecretError::TooLarge { len: data.len() }
    );
    assert!(parse_err(data.as_bytes())
        .to_string()
        .contains("secret larger than 30720 bytes"));
    // Exactly at the limit is fine.
    let fill = MAX_SECRET_BYTES - r#"{"UserName":"root","Password":""}"#.len();
    let data = format!(r#"{{"UserName":"root","Password":"{}"}}"#, "b".repeat(fill));
    assert_eq!(data.len(), MAX_SECRET_BYTES);
    assert!(TargetSecret::parse(data.as_bytes()).is_ok());
}

#[test]
fn rejects_non_utf8_and_non_json() {
    assert_eq!(
        parse_err(b"{\"UserName\":\"r\xffoot\",\"Password\":\"x\"}"),
        SecretError::NotUtf8
    );
    assert_eq!(parse_err(b""), SecretError::NotJson { offset: 0 });
    assert_eq!(
        parse_err(b"UserName=root"),
        SecretError::NotJson { offset: 0 }
    );
    assert_eq!(parse_err(b" 42 "), SecretError::NotObject);
    assert!(matches!(
        parse_err(br#"{"UserName":"root","Password":"x""#),
        SecretError::NotJson { .. }
    ));
    assert_eq!(parse_err(br#"["root","x"]"#), SecretError::NotObject);
    let deep = format!(
        r#"{{"UserName":"root","Password":"x","a":{}{}}}"#,
        "[".repeat(64),
        "]".repeat(64)
    );
    assert_eq!(parse_err(deep.as_bytes()), SecretError::TooDeep);
}

#[test]
fn rejects_duplicate_and_non_string_fields() {
    assert_eq!(
        parse_err(br#"{"UserName":"root","UserName":"admin","Password":"x"}"#),
        SecretError::DuplicateField("UserName")
    );
    assert_eq!(
        parse_err(br#"{"UserName":"root","Password":"x","Password":"y"}"#),
        SecretError::DuplicateField("Password")
    );
    assert_eq!(
        parse_err(br#"{"UserName":0,"Password":"x"}"#),
        SecretError::NotString("UserName")
    );
    assert_eq!(
        parse_err(br#"{"UserName":"root","Password":null}"#),
        SecretError::NotString("Password")
    );
    assert_eq!(
        parse_err(br#"{"UserName":"root","PrivateKey":["x"]}"#),
        SecretError::NotString("PrivateKey")
    );
    assert_eq!(
        parse_err(br#"{"UserName":"root","PrivateKey":"x","PublicKey":1}"#),
        SecretError::NotString("PublicKey")
    );
}

#[test]
fn user_name_checks() {
    assert_eq!(
        parse_err(br#"{"Password":"x"}"#),
        SecretError::UserNameMissing
    );
    assert_eq!(
        parse_err(br#"{"username":"root","Password":"x"}"#),
        SecretError::UserNameMissing,
        "field names are case-sensitive"
    );
    for bad in [
        "",
        "-root",
        ".",
        "..",
        "ro ot",
        "root@web",
        "root:x",
        "root\\n",
        "ro/ot",
        "r\u{e9}",
        "$(id)",
        "abcdefghijklmnopqrstuvwxyz0123456",
    ] {
        let data = serde_json::json!({"UserName": bad, "Password": "x"}).to_string();
        assert_eq!(
            parse_err(data.as_bytes()),
            SecretError::UserNameInvalid,
            "{bad:?}"
        );
    }
    for good in [
        "root",
        "ecs-user",
        "Administrator",
        "deploy_2",
        "a.b",
        "_svc",
        "abcdefghijklmnopqrstuvwxyz012345",
    ] {
        let data = serde_json::json!({"UserName": good, "Password": "x"}).to_string();
        assert_eq!(
            TargetSecret::parse(data.as_bytes()).unwrap().user_name,
            good
        );
    }
}

#[test]
fn credential_presence_checks() {
    assert_eq!(
        parse_err(br#"{"UserName":"root"}"#),
        SecretError::NoCredential
    );
    assert_eq!(
        parse_err(br#"{"UserName":"root","PublicKey":"ssh-ed25519 AAAA"}"#),
        SecretError::NoCredential
    );
    let both = serde_json::json!({"UserName":"root","Password":"x","PrivateKey": ED25519_OPENSSH})
        .to_string();
    assert_eq!(parse_err(both.as_bytes()), SecretError::BothCredentials);
    let stray =
        serde_json::json!({"UserName":"root","Password":"x","PublicKey": ED25519_OPENSSH_PUB})
            .to_string();
    assert_eq!(
        parse_err(stray.as_bytes()),
        SecretError::PublicKeyWithoutPrivateKey
    );
}

#[test]
fn password_checks() {
    assert_eq!(
        parse_err(br#"{"UserName":"root","Password":""}"#),
        SecretError::PasswordEmpty
    );
    for bad in ["a\nb", "a\rb", "a\u{0}b"] {
        let data = serde_json::json!({"UserName":"root","Password": bad}).to_string();
        assert_eq!(parse_err(data.as_bytes()), SecretError::PasswordUnusable);
    }
    // Spaces, quotes, non-ASCII are all fine.
    let data = serde_json::json!({"UserName":"root","Password":" p'a\"ss w\u{f6}rd "}).to_string();
    assert!(TargetSecret::parse(data.as_bytes()).is_ok());
}

#[test]
fn private_key_checks() {
    assert_eq!(
        parse_err(&key_secret("", None)),
        SecretError::PrivateKeyEmpty
    );
    assert_eq!(
        parse_err(&key_secret("  \n ", None)),
        SecretError::PrivateKeyEmpty
    );
    assert_eq!(
        parse_err(&key_secret("not a key", None)),
        SecretError::PrivateKeyUnsupported
    );
    assert_eq!(
        parse_err(&key_secret(P521_OPENSSH, None)),
        SecretError::PrivateKeyUnsupported
    );
    assert_eq!(
        parse_err(&key_secret(
            "-----BEGIN DSA PRIVATE KEY-----\nAAAA\n-----END DSA PRIVATE KEY-----\n",
            None
        )),
        SecretError::PrivateKeyUnsupported
    );
    assert_eq!(
        parse_err(&key_secret(RSA1024_PKCS1, None)),
        SecretError::RsaKeyTooSmall { bits: 1024 }
    );
    assert_eq!(
        parse_err(&key_secret(ED25519_ENCRYPTED, None)),
        SecretError::PrivateKeyEncrypted
    );
    assert_eq!(
        parse_err(&key_secret(RSA2048_PKCS1_ENCRYPTED, None)),
        SecretError::PrivateKeyEncrypted
    );
    assert_eq!(
        parse_err(&key_secret(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            None
        )),
        SecretError::PrivateKeyEncrypted
    );
    // Right header, damaged body.
    let damaged = RSA2048_PKCS1.replacen("MII", "MIJ", 1);
    assert_eq!(
        parse_err(&key_secret(&damaged, None)),
        SecretError::PrivateKeyMalformed
    );
    let truncated: String = ED25519_OPENSSH
        .lines()
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        parse_err(&key_secret(&truncated, None)),
        SecretError::PrivateKeyMalformed
    );
    // PKCS#8 wrapping that is not a key we support (a P-256 key labelled as RSA PKCS#1).
    let mislabelled = P384_PKCS8.replace("PRIVATE KEY", "RSA PRIVATE KEY");
    assert_eq!(
        parse_err(&key_secret(&mislabelled, None)),
        SecretError::PrivateKeyMalformed
    );
}

#[test]
fn public_key_checks() {
    // Another key's public half.
    assert_eq!(
        parse_err(&key_secret(RSA2048_PKCS1, Some(RSA2048_PKCS8_PUB))),
        SecretError::PublicKeyMismatch
    );
    assert_eq!(
        parse_err(&key_secret(ED25519_OPENSSH, Some(P256_OPENSSH_PUB))),
        SecretError::PublicKeyMismatch
    );
    // Without a comment is fine; so is a trailing newline.
    let bare = without_comment(ED25519_OPENSSH_PUB);
    assert!(TargetSecret::parse(&key_secret(ED25519_OPENSSH, Some(&bare))).is_ok());
    for malformed in [
        "",
        "ssh-ed25519",
        "ssh-ed25519 !!!notbase64",
        // The type word disagrees with the blob.
        &ED25519_OPENSSH_PUB.replace("ssh-ed25519", "ssh-rsa"),
        // A PEM public key is not the OpenSSH form.
        "-----BEGIN PUBLIC KEY----- MCowBQYDK2VwAyEA -----END PUBLIC KEY-----",
    ] {
        assert_eq!(
            parse_err(&key_secret(ED25519_OPENSSH, Some(malformed))),
            SecretError::PublicKeyMalformed,
            "{malformed:?}"
        );
    }
}

#[test]
fn errors_and_debug_never_show_the_value() {
    let password = "Sup3r-S3cret-Pw";
    let data = serde_json::json!({"UserName":"root","Password": password}).to_string();
    let secret = TargetSecret::parse(data.as_bytes()).unwrap();
    assert!(!format!("{secret:?}").contains(password));

    let key = TargetSecret::parse(&key_secret(RSA2048_PKCS1, None)).unwrap();
    let debug = format!("{key:?}");
    assert!(debug.contains("SHA256:8txwnhZMOnKXBBn5WanR7ogcB8OTMeOdGZWcf2S7o2I"));
    assert!(debug.contains("[redacted]"));
    let body_line = RSA2048_PKCS1.lines().nth(5).unwrap();
    assert!(!debug.contains(body_line));

    // Every rejection of a value that contains the password is free of it.
    let rejects = [
        format!(r#"{{"UserName":"root","Password":"{password}""#),
        format!(r#"{{"UserName":"{password}!","Password":"x"}}"#),
        format!(r#"{{"UserName":"root","Password":"{password}","PrivateKey":"{password}"}}"#),
        format!(r#"{{"UserName":"root","PrivateKey":"{password}"}}"#),
        format!(r#"{{"UserName":"root","Password":["{password}"]}}"#),
    ];
    for data in rejects {
        let err = parse_err(data.as_bytes());
        assert!(!err.to_string().contains(password), "{err}");
        assert!(!format!("{err:?}").contains(password), "{err:?}");
    }
}

#[test]
fn from_text_reports_algorithm_and_fingerprint() {
    let key = PrivateKey::from_text(P256_OPENSSH).unwrap();
    assert_eq!(key.algorithm(), KeyAlgorithm::EcdsaP256);
    assert_eq!(key.algorithm().ssh_name(), "ecdsa-sha2-nistp256");
    assert_eq!(key.algorithm().to_string(), "ECDSA-P256");
    assert_eq!(
        key.fingerprint(),
        fingerprint_of_blob(key.public_key_blob())
    );
    assert_eq!(key.public_key_openssh(), without_comment(P256_OPENSSH_PUB));
}
