//! ECS secret rotation: a new value as KMS makes one (a 32-character password with every
//! character class, or an RSA-2048 key pair: PKCS#1 PEM private key and OpenSSH public key),
//! and the rotation hook that stands in for Cloud Assistant applying it to the instance.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use rand::rngs::OsRng;
use rand::seq::SliceRandom;
use rand::Rng;
use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::json;

use crate::state::{EcsSubType, RotationPlan};

/// Length of a generated password (what KMS generates).
pub const PASSWORD_LEN: usize = 32;
/// RSA modulus size of a generated SSH key.
pub const RSA_BITS: usize = 2048;
/// How long the hook may run before it is killed and the rotation fails.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const DIGITS: &[u8] = b"0123456789";
// No quotes, backslash, colon, slash, backtick or space: safe in chpasswd input, JSON and shells.
const SPECIAL: &[u8] = b"!#$%&()*+,-.;<=>?@[]^_{|}~";

/// A random password of [`PASSWORD_LEN`] characters with at least one upper-case letter,
/// lower-case letter, digit and special character.
pub fn generate_password() -> String {
    let mut rng = OsRng;
    let classes = [UPPER, LOWER, DIGITS, SPECIAL];
    let all: Vec<u8> = classes.concat();
    let mut out: Vec<u8> = classes
        .iter()
        .filter_map(|c| c.get(rng.gen_range(0..c.len())).copied())
        .collect();
    while out.len() < PASSWORD_LEN {
        if let Some(&b) = all.get(rng.gen_range(0..all.len())) {
            out.push(b);
        }
    }
    out.shuffle(&mut rng);
    out.into_iter().map(char::from).collect()
}

/// A new RSA-2048 key pair: (PKCS#1 PEM private key, `ssh-rsa AAAA… comment` public key).
pub fn generate_ssh_key(comment: &str) -> Result<(String, String), String> {
    let key = RsaPrivateKey::new(&mut OsRng, RSA_BITS)
        .map_err(|e| format!("RSA key generation failed: {e}"))?;
    let pem = key
        .to_pkcs1_pem(LineEnding::LF)
        .map_err(|e| format!("PEM encoding failed: {e}"))?;
    let mut blob = Vec::new();
    ssh_string(&mut blob, b"ssh-rsa");
    ssh_mpint(&mut blob, &key.e().to_bytes_be());
    ssh_mpint(&mut blob, &key.n().to_bytes_be());
    let public = format!(
        "ssh-rsa {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    );
    Ok((pem.to_string(), public))
}

fn ssh_string(out: &mut Vec<u8>, data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// RFC 4251 mpint of a non-negative big-endian magnitude.
fn ssh_mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let trimmed: &[u8] = match magnitude.iter().position(|&b| b != 0) {
        Some(i) => magnitude.get(i..).unwrap_or_default(),
        None => &[],
    };
    if trimmed.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut padded = Vec::with_capacity(trimmed.len() + 1);
        padded.push(0);
        padded.extend_from_slice(trimmed);
        ssh_string(out, &padded);
    } else {
        ssh_string(out, trimmed);
    }
}

/// The new `SecretData` for a rotation plan.
pub fn new_secret_data(plan: &RotationPlan) -> Result<String, String> {
    let value = match plan.subtype {
        EcsSubType::Password => json!({
            "UserName": plan.user_name,
            "Password": generate_password(),
        }),
        EcsSubType::SshKey => {
            let comment = format!("{}@{}", plan.user_name, plan.instance_id);
            let (private, public) = generate_ssh_key(&comment)?;
            json!({
                "UserName": plan.user_name,
                "PublicKey": public,
                "PrivateKey": private,
            })
        }
    };
    Ok(value.to_string())
}

/// Runs the rotation hook: `/bin/sh -c CMD` with the new SecretData on stdin and the
/// secret's identity in `KMS_*` variables. Its stdout and stderr go to the emulator's
/// stderr (never to stdout, whose first line tools read), and it inherits the emulator's
/// environment minus the AccessKey variables. Ok only if it exits 0 in time.
pub fn run_hook(cmd: &str, plan: &RotationPlan, data: &str) -> Result<(), String> {
    let err_fd = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot pass stderr to the rotation hook: {e}"))?;
    let out_fd = err_fd
        .try_clone()
        .map_err(|e| format!("cannot pass stderr to the rotation hook: {e}"))?;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        // The hook acts for Cloud Assistant, not as the KMS account: it gets no AccessKey.
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .env("KMS_SECRET_NAME", &plan.name)
        .env("KMS_INSTANCE_ID", &plan.instance_id)
        .env("KMS_USER_NAME", &plan.user_name)
        .env("KMS_SECRET_SUBTYPE", plan.subtype.as_str())
        .env("KMS_VERSION_ID", &plan.version_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_fd))
        .stderr(Stdio::from(err_fd))
        .spawn()
        .map_err(|e| format!("cannot start the rotation hook: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its input is fine: ignore EPIPE.
        let _ = stdin.write_all(data.as_bytes());
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("the rotation hook failed ({status})")),
            Ok(None) if started.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the rotation hook ran longer than {} s and was killed",
                    HOOK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for the rotation hook: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(subtype: EcsSubType) -> RotationPlan {
        RotationPlan {
            name: "acs/ecs/web-01/root".into(),
            version_id: "v2".into(),
            subtype,
            user_name: "root".into(),
            instance_id: "i-web01".into(),
        }
    }

    #[test]
    fn passwords_have_every_class() {
        for _ in 0..50 {
            let p = generate_password();
            assert_eq!(p.len(), PASSWORD_LEN);
            let b = p.as_bytes();
            for class in [UPPER, LOWER, DIGITS, SPECIAL] {
                assert!(b.iter().any(|c| class.contains(c)), "{p}");
            }
        }
        assert_ne!(generate_password(), generate_password());
    }

    #[test]
    fn mpint_encoding() {
        let mut v = Vec::new();
        ssh_mpint(&mut v, &[0x00, 0x80, 0x01]);
        assert_eq!(v, [0, 0, 0, 3, 0, 0x80, 0x01]);
        let mut v = Vec::new();
        ssh_mpint(&mut v, &[0x01, 0x00, 0x01]);
        assert_eq!(v, [0, 0, 0, 3, 1, 0, 1]);
    }

    #[test]
    fn ssh_key_pair_matches() {
        // Key generation is slow without optimisation; one key covers the format.
        let data = new_secret_data(&plan(EcsSubType::SshKey)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["UserName"], "root");
        let private = v["PrivateKey"].as_str().unwrap();
        assert!(private.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        let public = v["PublicKey"].as_str().unwrap();
        assert!(public.starts_with("ssh-rsa AAAAB3NzaC1yc2E"));
        assert!(public.ends_with(" root@i-web01"));
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let key = RsaPrivateKey::from_pkcs1_pem(private).unwrap();
        assert_eq!(key.size() * 8, RSA_BITS);
        let mut blob = Vec::new();
        ssh_string(&mut blob, b"ssh-rsa");
        ssh_mpint(&mut blob, &key.e().to_bytes_be());
        ssh_mpint(&mut blob, &key.n().to_bytes_be());
        let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
        assert_eq!(public.split(' ').nth(1), Some(b64.as_str()));
    }

    #[test]
    fn hook_sees_value_and_environment_and_its_status_counts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let cmd = format!(
            "cat > {0}.json; echo \"$KMS_SECRET_NAME|$KMS_INSTANCE_ID|$KMS_USER_NAME|$KMS_SECRET_SUBTYPE|$KMS_VERSION_ID\" > {0}.env",
            out.display()
        );
        let p = plan(EcsSubType::Password);
        let data = new_secret_data(&p).unwrap();
        run_hook(&cmd, &p, &data).unwrap();
        let got = std::fs::read_to_string(out.with_extension("json")).unwrap();
        assert_eq!(got, data);
        let env = std::fs::read_to_string(out.with_extension("env")).unwrap();
        assert_eq!(env.trim(), "acs/ecs/web-01/root|i-web01|root|Password|v2");
        let err = run_hook("exit 3", &p, &data).unwrap_err();
        assert!(err.contains("exit status: 3"), "{err}");
        // A hook that ignores its input still counts by its exit status.
        run_hook("true", &p, &data).unwrap();
    }
}
