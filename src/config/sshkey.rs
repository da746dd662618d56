//! Structural check of OpenSSH public key lines (`type base64 [comment]`), without the
//! client crypto crates: the base64 must decode to an SSH wire blob whose first string is the
//! declared key type. Enough to catch pasted private keys, truncated keys and typos; the
//! cryptographic check happens in sshd (engineer keys) and ssh (host keys).
#![forbid(unsafe_code)]

use base64::Engine as _;

/// Key types accepted in `keys` and `host_keys`.
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest key line accepted (an RSA-16384 key is about 2.8 KB of base64).
const MAX_KEY_LINE: usize = 8192;

/// A checked public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyLine {
    /// Key type, one of [`KEY_TYPES`].
    pub key_type: String,
    /// The base64 of the wire blob, exactly as given.
    pub base64: String,
    /// Optional comment (printable ASCII, may contain spaces).
    pub comment: Option<String>,
}

impl PublicKeyLine {
    /// `type base64` (the comment dropped): the form compared against sshd's `%t %k`.
    pub fn key(&self) -> String {
        format!("{} {}", self.key_type, self.base64)
    }
}

fn read_u32(b: &[u8]) -> Option<(usize, &[u8])> {
    let len: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some((u32::from_be_bytes(len) as usize, b.get(4..)?))
}

/// Parses and checks one public key line.
pub fn parse_public_key(line: &str) -> Result<PublicKeyLine, String> {
    if line.len() > MAX_KEY_LINE {
        return Err(format!("public key is longer than {MAX_KEY_LINE} bytes"));
    }
    if line.contains("PRIVATE KEY") {
        return Err("this is a PRIVATE key; put only public keys (the .pub file) here".into());
    }
    if let Some(c) = line.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "public key contains {c:?}; expected one line `type base64 [comment]` of printable ASCII"
        ));
    }
    let mut parts = line.trim().splitn(3, ' ');
    let key_type = parts.next().unwrap_or_default();
    let b64 = parts.next().unwrap_or_default().trim();
    let comment = parts
        .next()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned);
    if !KEY_TYPES.contains(&key_type) {
        return Err(format!(
            "unsupported public key type {key_type:?} (expected one of {}; key options are not allowed here)",
            KEY_TYPES.join(", ")
        ));
    }
    if b64.is_empty() {
        return Err(format!("public key of type {key_type} has no base64 data"));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("public key data is not valid base64 ({e})"))?;
    let declared = read_u32(&blob).and_then(|(n, rest)| rest.get(..n));
    if declared != Some(key_type.as_bytes()) {
        return Err(format!(
            "public key data does not encode a {key_type} key (truncated or mixed-up key?)"
        ));
    }
    // At least one more length-prefixed field must follow the type name.
    let after = blob.get(4 + key_type.len()..).unwrap_or_default();
    match read_u32(after) {
        Some((n, rest)) if n > 0 && n <= rest.len() => {}
        _ => return Err(format!("public key data of type {key_type} is truncated")),
    }
    Ok(PublicKeyLine {
        key_type: key_type.to_owned(),
        base64: b64.to_owned(),
        comment,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Real keys made with `ssh-keygen -t ed25519 -N '' -C alice@laptop` (and `-t rsa -b 1024`,
    /// `-t ecdsa`), public halves only.
    pub const ED25519_ALICE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop";
    pub const ED25519_BOB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo bob";
    pub const ECDSA_HOST: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=";

    #[test]
    fn accepts_real_keys() {
        let k = parse_public_key(ED25519_ALICE).unwrap();
        assert_eq!(k.key_type, "ssh-ed25519");
        assert_eq!(k.comment.as_deref(), Some("alice@laptop"));
        assert!(k.key().starts_with("ssh-ed25519 AAAAC3"));
        assert!(parse_public_key(ED25519_BOB).is_ok());
        assert!(parse_public_key(ECDSA_HOST).unwrap().comment.is_none());
    }

    #[test]
    fn rejects_broken_keys() {
        for (bad, why) in [
            ("ssh-ed25519", "no base64"),
            ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unsupported"),
            ("ssh-ed25519 !!!notbase64", "base64"),
            ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z", "does not encode"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "truncated"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "PRIVATE"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z a\nb", "contains"),
            ("restrict ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z", "options"),
        ] {
            let err = parse_public_key(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
