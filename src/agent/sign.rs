//! Signatures in SSH wire form for each key type the agent holds.
#![forbid(unsafe_code)]

use rsa::Pkcs1v15Sign;
use sha2::{Digest as _, Sha256, Sha512};

use super::proto::{SSH_AGENT_RSA_SHA2_256, SSH_AGENT_RSA_SHA2_512};
use crate::secret::{put_mpint, put_string, KeyMaterial, PrivateKey};

/// Why a sign request is answered with failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// RSA without SHA-2 flags would mean ssh-rsa (SHA-1), which we never produce.
    Sha1,
    /// The crypto library failed (should not happen with a validated key).
    Failed,
}

/// Signs `data` as an SSH agent would, returning the signature blob
/// (`string algorithm, string signature`).
pub(crate) fn sign(key: &PrivateKey, data: &[u8], flags: u32) -> Result<Vec<u8>, Refusal> {
    let mut blob = Vec::new();
    match key.material() {
        KeyMaterial::Rsa(rsa_key) => {
            // Same precedence as OpenSSH's ssh-agent: SHA-256 wins when both bits are set.
            let (name, padding, digest) = if flags & SSH_AGENT_RSA_SHA2_256 != 0 {
                (
                    "rsa-sha2-256",
                    Pkcs1v15Sign::new::<Sha256>(),
                    Sha256::digest(data).to_vec(),
                )
            } else if flags & SSH_AGENT_RSA_SHA2_512 != 0 {
                (
                    "rsa-sha2-512",
                    Pkcs1v15Sign::new::<Sha512>(),
                    Sha512::digest(data).to_vec(),
                )
            } else {
                return Err(Refusal::Sha1);
            };
            // With an RNG the private-key operation is blinded (no timing side channel).
            let signature = rsa_key
                .sign_with_rng(&mut rand::rngs::OsRng, padding, &digest)
                .map_err(|_| Refusal::Failed)?;
            put_string(&mut blob, name.as_bytes());
            put_string(&mut blob, &signature);
        }
        KeyMaterial::Ed25519(signing) => {
            use ed25519_dalek::Signer as _;
            let signature = signing.try_sign(data).map_err(|_| Refusal::Failed)?;
            put_string(&mut blob, b"ssh-ed25519");
            put_string(&mut blob, &signature.to_bytes());
        }
        KeyMaterial::EcdsaP256(signing) => {
            use p256::ecdsa::signature::Signer as _;
            // RFC 6979 deterministic nonce, SHA-256 for nistp256 (RFC 5656).
            let signature: p256::ecdsa::Signature =
                signing.try_sign(data).map_err(|_| Refusal::Failed)?;
            let (r, s) = signature.split_bytes();
            ecdsa_blob(&mut blob, "ecdsa-sha2-nistp256", &r, &s);
        }
        KeyMaterial::EcdsaP384(signing) => {
            use p384::ecdsa::signature::Signer as _;
            // SHA-384 for nistp384 (RFC 5656).
            let signature: p384::ecdsa::Signature =
                signing.try_sign(data).map_err(|_| Refusal::Failed)?;
            let (r, s) = signature.split_bytes();
            ecdsa_blob(&mut blob, "ecdsa-sha2-nistp384", &r, &s);
        }
    }
    Ok(blob)
}

/// RFC 5656 §3.1.2: the signature is `string(mpint r, mpint s)`.
fn ecdsa_blob(blob: &mut Vec<u8>, name: &str, r: &[u8], s: &[u8]) {
    let mut inner = Vec::new();
    put_mpint(&mut inner, r);
    put_mpint(&mut inner, s);
    put_string(blob, name.as_bytes());
    put_string(blob, &inner);
}
