//! Target private keys: parsing every format a secret may hold, the SSH public key blob,
//! fingerprints, and the matching check against a secret's `PublicKey`.
//!
//! Keys are held in the crypto crates' own types (`rsa`, `ed25519-dalek`, `p256`, `p384`),
//! which wipe their secret parts when dropped. `ssh-key` is used only to read the OpenSSH
//! container: its RSA signing is broken with `rsa` 0.9 (it passes prime p twice), so RSA
//! keys are rebuilt here from their components.
#![forbid(unsafe_code)]

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use rsa::BigUint;
use sha2::{Digest as _, Sha256};
use ssh_key::private::{EcdsaKeypair, KeypairData};
use zeroize::Zeroizing;

use super::SecretError;

/// The smallest RSA modulus we accept, in bits (ECS rotation makes 2048-bit keys).
pub const RSA_MIN_BITS: usize = 2048;
/// The largest RSA modulus we accept, in bits (OpenSSH's own limit).
pub const RSA_MAX_BITS: usize = 16384;

/// The kind of a [`PrivateKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA with a modulus of `bits` bits; signs with rsa-sha2-256 or rsa-sha2-512.
    Rsa {
        /// Modulus size.
        bits: usize,
    },
    /// Ed25519 (`ssh-ed25519`).
    Ed25519,
    /// ECDSA on NIST P-256 (`ecdsa-sha2-nistp256`).
    EcdsaP256,
    /// ECDSA on NIST P-384 (`ecdsa-sha2-nistp384`).
    EcdsaP384,
}

impl KeyAlgorithm {
    /// The SSH name of the public key type (`ssh-rsa`, `ssh-ed25519`, `ecdsa-sha2-nistp256`…).
    pub fn ssh_name(&self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa { .. } => "ssh-rsa",
            KeyAlgorithm::Ed25519 => "ssh-ed25519",
            KeyAlgorithm::EcdsaP256 => "ecdsa-sha2-nistp256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-sha2-nistp384",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlgorithm::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyAlgorithm::Ed25519 => f.write_str("Ed25519"),
            KeyAlgorithm::EcdsaP256 => f.write_str("ECDSA-P256"),
            KeyAlgorithm::EcdsaP384 => f.write_str("ECDSA-P384"),
        }
    }
}

/// The secret half of a key, in the type of the crate that signs with it.
pub(crate) enum KeyMaterial {
    Rsa(Box<rsa::RsaPrivateKey>),
    Ed25519(Box<ed25519_dalek::SigningKey>),
    EcdsaP256(Box<p256::ecdsa::SigningKey>),
    EcdsaP384(Box<p384::ecdsa::SigningKey>),
}

/// A target private key taken from a secret: one of RSA (≥ 2048 bits), Ed25519, ECDSA
/// P-256/P-384. Its secret parts are wiped when it is dropped; `Debug` shows only the
/// algorithm and the public fingerprint.
pub struct PrivateKey {
    material: KeyMaterial,
    algorithm: KeyAlgorithm,
    public_blob: Vec<u8>,
}

impl PrivateKey {
    /// Parses a private key in RSA PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`, what ECS rotation
    /// produces), PKCS#8 PEM (`BEGIN PRIVATE KEY`), SEC1 PEM (`BEGIN EC PRIVATE KEY`) or the
    /// OpenSSH format (`BEGIN OPENSSH PRIVATE KEY`), unencrypted.
    pub fn from_text(text: &str) -> Result<PrivateKey, SecretError> {
        // Keys pasted on Windows carry CRLF line ends, which not every decoder takes.
        let mut unix = Zeroizing::new(String::with_capacity(text.len()));
        unix.extend(text.chars().filter(|&c| c != '\r'));
        let text = unix.trim();
        let label = text
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.split_once("-----"))
            .map(|(label, _)| label)
            .ok_or(SecretError::PrivateKeyUnsupported)?;
        let material = match label {
            "RSA PRIVATE KEY" => {
                if text.contains("Proc-Type: 4,ENCRYPTED") {
                    return Err(SecretError::PrivateKeyEncrypted);
                }
                let key = rsa::RsaPrivateKey::from_pkcs1_pem(text)
                    .map_err(|_| SecretError::PrivateKeyMalformed)?;
                KeyMaterial::Rsa(Box::new(key))
            }
            "PRIVATE KEY" => pkcs8(text)?,
            "EC PRIVATE KEY" => {
                if text.contains("Proc-Type: 4,ENCRYPTED") {
                    return Err(SecretError::PrivateKeyEncrypted);
                }
                sec1(text)?
            }
            "ENCRYPTED PRIVATE KEY" => return Err(SecretError::PrivateKeyEncrypted),
            "OPENSSH PRIVATE KEY" => openssh(text)?,
            _ => return Err(SecretError::PrivateKeyUnsupported),
        };
        PrivateKey::from_material(material)
    }

    pub(crate) fn from_material(material: KeyMaterial) -> Result<PrivateKey, SecretError> {
        let (algorithm, public_blob) = match &material {
            KeyMaterial::Rsa(key) => {
                let bits = key.n().bits();
                if bits < RSA_MIN_BITS {
                    return Err(SecretError::RsaKeyTooSmall { bits });
                }
                if bits > RSA_MAX_BITS {
                    return Err(SecretError::RsaKeyTooLarge { bits });
                }
                let mut blob = Vec::new();
                put_string(&mut blob, b"ssh-rsa");
                put_mpint(&mut blob, &key.e().to_bytes_be());
                put_mpint(&mut blob, &key.n().to_bytes_be());
                (KeyAlgorithm::Rsa { bits }, blob)
            }
            KeyMaterial::Ed25519(key) => {
                let mut blob = Vec::new();
                put_string(&mut blob, b"ssh-ed25519");
                put_string(&mut blob, key.verifying_key().as_bytes());
                (KeyAlgorithm::Ed25519, blob)
            }
            KeyMaterial::EcdsaP256(key) => {
                let mut blob = Vec::new();
                put_string(&mut blob, b"ecdsa-sha2-nistp256");
                put_string(&mut blob, b"nistp256");
                put_string(
                    &mut blob,
                    key.verifying_key().to_encoded_point(false).as_bytes(),
                );
                (KeyAlgorithm::EcdsaP256, blob)
            }
            KeyMaterial::EcdsaP384(key) => {
                let mut blob = Vec::new();
                put_string(&mut blob, b"ecdsa-sha2-nistp384");
                put_string(&mut blob, b"nistp384");
                put_string(
                    &mut blob,
                    key.verifying_key().to_encoded_point(false).as_bytes(),
                );
                (KeyAlgorithm::EcdsaP384, blob)
            }
        };
        Ok(PrivateKey {
            material,
            algorithm,
            public_blob,
        })
    }

    /// The key's algorithm (and size, for RSA).
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The SSH wire encoding of the public key (what `authorized_keys` carries in base64).
    pub fn public_key_blob(&self) -> &[u8] {
        &self.public_blob
    }

    /// The public key as one `authorized_keys` line without a comment, e.g. `ssh-rsa AAAA…`.
    pub fn public_key_openssh(&self) -> String {
        format!(
            "{} {}",
            self.algorithm.ssh_name(),
            STANDARD.encode(&self.public_blob)
        )
    }

    /// `SHA256:<base64 without padding>` of the public key blob, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_blob(&self.public_blob)
    }

    /// Checks a secret's `PublicKey` (one OpenSSH line, `<type> <base64> [comment]`) against
    /// this key.
    pub fn check_public_key_line(&self, line: &str) -> Result<(), SecretError> {
        let mut words = line.split_ascii_whitespace();
        let (Some(kind), Some(data)) = (words.next(), words.next()) else {
            return Err(SecretError::PublicKeyMalformed);
        };
        let blob = STANDARD
            .decode(data)
            .map_err(|_| SecretError::PublicKeyMalformed)?;
        let blob_kind = read_string(&blob).ok_or(SecretError::PublicKeyMalformed)?;
        if blob_kind != kind.as_bytes() {
            return Err(SecretError::PublicKeyMalformed);
        }
        if blob != self.public_blob {
            return Err(SecretError::PublicKeyMismatch);
        }
        Ok(())
    }

    pub(crate) fn material(&self) -> &KeyMaterial {
        &self.material
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &self.fingerprint())
            .field("secret", &format_args!("[redacted]"))
            .finish()
    }
}

/// `SHA256:<base64 without padding>` of an SSH public key blob.
pub fn fingerprint_of_blob(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

/// PKCS#8 `PrivateKeyInfo`: the algorithm decides the type; try each one we support.
fn pkcs8(text: &str) -> Result<KeyMaterial, SecretError> {
    if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
        return Ok(KeyMaterial::Rsa(Box::new(key)));
    }
    if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
        return Ok(KeyMaterial::Ed25519(Box::new(key)));
    }
    if let Ok(key) = p256::SecretKey::from_pkcs8_pem(text) {
        return Ok(KeyMaterial::EcdsaP256(Box::new(key.into())));
    }
    if let Ok(key) = p384::SecretKey::from_pkcs8_pem(text) {
        return Ok(KeyMaterial::EcdsaP384(Box::new(key.into())));
    }
    Err(SecretError::PrivateKeyUnsupported)
}

/// SEC1 `ECPrivateKey` (what `ssh-keygen -m PEM -t ecdsa` writes).
fn sec1(text: &str) -> Result<KeyMaterial, SecretError> {
    if let Ok(key) = p256::SecretKey::from_sec1_pem(text) {
        return Ok(KeyMaterial::EcdsaP256(Box::new(key.into())));
    }
    if let Ok(key) = p384::SecretKey::from_sec1_pem(text) {
        return Ok(KeyMaterial::EcdsaP384(Box::new(key.into())));
    }
    Err(SecretError::PrivateKeyUnsupported)
}

/// The OpenSSH private key container. The public key stored next to the private one must be
/// the one the private part derives (a file edited by hand could disagree).
fn openssh(text: &str) -> Result<KeyMaterial, SecretError> {
    let key =
        ssh_key::PrivateKey::from_openssh(text).map_err(|_| SecretError::PrivateKeyMalformed)?;
    if key.is_encrypted() {
        return Err(SecretError::PrivateKeyEncrypted);
    }
    match key.key_data() {
        KeypairData::Rsa(pair) => {
            let int = |m: &ssh_key::Mpint| {
                m.as_positive_bytes()
                    .map(BigUint::from_bytes_be)
                    .ok_or(SecretError::PrivateKeyMalformed)
            };
            let rsa_key = rsa::RsaPrivateKey::from_components(
                int(&pair.public.n)?,
                int(&pair.public.e)?,
                int(&pair.private.d)?,
                vec![int(&pair.private.p)?, int(&pair.private.q)?],
            )
            .map_err(|_| SecretError::PrivateKeyMalformed)?;
            Ok(KeyMaterial::Rsa(Box::new(rsa_key)))
        }
        KeypairData::Ed25519(pair) => {
            let seed = Zeroizing::new(pair.private.to_bytes());
            let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
            if signing.verifying_key().as_bytes() != &pair.public.0 {
                return Err(SecretError::PrivateKeyMalformed);
            }
            Ok(KeyMaterial::Ed25519(Box::new(signing)))
        }
        KeypairData::Ecdsa(EcdsaKeypair::NistP256 { public, private }) => {
            let secret = p256::SecretKey::from_slice(private.as_slice())
                .map_err(|_| SecretError::PrivateKeyMalformed)?;
            if secret.public_key().to_encoded_point(false).as_bytes() != public.as_bytes() {
                return Err(SecretError::PrivateKeyMalformed);
            }
            Ok(KeyMaterial::EcdsaP256(Box::new(secret.into())))
        }
        KeypairData::Ecdsa(EcdsaKeypair::NistP384 { public, private }) => {
            let secret = p384::SecretKey::from_slice(private.as_slice())
                .map_err(|_| SecretError::PrivateKeyMalformed)?;
            if secret.public_key().to_encoded_point(false).as_bytes() != public.as_bytes() {
                return Err(SecretError::PrivateKeyMalformed);
            }
            Ok(KeyMaterial::EcdsaP384(Box::new(secret.into())))
        }
        _ => Err(SecretError::PrivateKeyUnsupported),
    }
}

/// SSH `string`: a u32 big-endian length, then the bytes.
pub(crate) fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths here are bounded by the frame and key sizes, far below u32::MAX.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// SSH `mpint` of a non-negative big-endian magnitude: no leading zero bytes, plus one zero
/// byte when the top bit is set (so it does not read as negative); zero is the empty string.
pub(crate) fn put_mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let first = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let digits = magnitude.get(first..).unwrap_or_default();
    if digits.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut padded = Vec::with_capacity(digits.len() + 1);
        padded.push(0);
        padded.extend_from_slice(digits);
        put_string(out, &padded);
    } else {
        put_string(out, digits);
    }
}

/// The first SSH `string` of a blob (the key type name).
fn read_string(blob: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?);
    blob.get(4..4 + usize::try_from(len).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpint_encoding_matches_rfc4251_examples() {
        let enc = |m: &[u8]| {
            let mut v = Vec::new();
            put_mpint(&mut v, m);
            v
        };
        assert_eq!(enc(&[]), [0, 0, 0, 0]);
        assert_eq!(enc(&[0, 0]), [0, 0, 0, 0]);
        assert_eq!(
            enc(&[0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]),
            [0, 0, 0, 8, 0x09, 0xa3, 0x78, 0xf9, 0xb2, 0xe3, 0x32, 0xa7]
        );
        assert_eq!(enc(&[0x80]), [0, 0, 0, 2, 0x00, 0x80]);
        assert_eq!(enc(&[0, 0, 0x7f]), [0, 0, 0, 1, 0x7f]);
    }

    #[test]
    fn read_string_bounds() {
        assert_eq!(
            read_string(&[0, 0, 0, 2, b'a', b'b', b'c']),
            Some(&b"ab"[..])
        );
        assert_eq!(read_string(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(read_string(&[0, 0]), None);
        assert_eq!(read_string(&[0xff, 0xff, 0xff, 0xff]), None);
    }
}
