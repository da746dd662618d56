//! Target-account secrets as KMS stores them, parsed and validated.
//!
//! An ECS secret value (and a Generic secret of the same shape) is a JSON object:
//! `{"UserName":"root","Password":"…"}` or
//! `{"UserName":"root","PublicKey":"ssh-rsa AAAA…","PrivateKey":"-----BEGIN RSA PRIVATE KEY-----…"}`.
//! [`TargetSecret::parse`] checks everything the broker relies on before it touches the
//! network: size, JSON shape, the account name, exactly one credential, a private key we can
//! sign with, and a `PublicKey` that belongs to it. Each rejection names the failed check and
//! never any part of the value, so it can go to logs as is.
//!
//! Every buffer that holds part of the value is wiped when dropped: the JSON is decoded by a
//! small reader straight into [`Zeroizing`] strings (see `json.rs` for why not serde_json),
//! the password lives in a [`SecretString`], and keys in types that zeroize themselves.
#![forbid(unsafe_code)]

mod json;
mod key;

use zeroize::Zeroizing;

use crate::sensitive::SecretString;

pub use key::{fingerprint_of_blob, KeyAlgorithm, PrivateKey, RSA_MAX_BITS, RSA_MIN_BITS};
#[allow(unused_imports)] // used by the agent
pub(crate) use key::{put_mpint, put_string, KeyMaterial};

/// The largest secret value KMS stores (30 KB, `SecretData` limit).
pub const MAX_SECRET_BYTES: usize = 30_720;

/// The longest account name we accept (Linux `useradd` allows 32).
pub const MAX_USER_NAME_LEN: usize = 32;

/// One target account's credential, as held in a KMS secret.
#[derive(Debug)]
pub struct TargetSecret {
    /// The OS account on the target (`UserName`); the broker checks it equals the account
    /// the engineer asked for.
    pub user_name: String,
    /// The password or private key to log in with.
    pub credential: Credential,
}

/// How to authenticate as the target account.
#[derive(Debug)]
pub enum Credential {
    /// A password (answered to ssh through the broker's askpass).
    Password(SecretString),
    /// A private key (served by the broker's in-memory agent).
    Key(PrivateKey),
}

/// Why a secret value is unusable. The message names the failed check and never contains
/// any part of the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Over [`MAX_SECRET_BYTES`].
    #[error("secret larger than 30720 bytes ({len} bytes)")]
    TooLarge {
        /// Actual size of the value.
        len: usize,
    },
    /// Not UTF-8 text.
    #[error("secret value is not valid UTF-8 text")]
    NotUtf8,
    /// Not JSON.
    #[error("secret value is not valid JSON (syntax error at byte {offset})")]
    NotJson {
        /// Where the JSON syntax breaks.
        offset: usize,
    },
    /// JSON, but not an object.
    #[error("secret value is not a JSON object")]
    NotObject,
    /// Ignored fields nest too deeply.
    #[error("secret value nests too deeply")]
    TooDeep,
    /// A field appears twice.
    #[error("{0} appears more than once")]
    DuplicateField(&'static str),
    /// A field is not a JSON string.
    #[error("{0} is not a JSON string")]
    NotString(&'static str),
    /// No `UserName`.
    #[error("UserName missing")]
    UserNameMissing,
    /// `UserName` is not a plausible account name.
    #[error("UserName is not a valid account name (1-32 characters of A-Z a-z 0-9 _ . -, not starting with -)")]
    UserNameInvalid,
    /// `UserName` differs from the account the secret was configured for.
    #[error("UserName does not match the host account this secret is configured for")]
    UserNameMismatch,
    /// Neither `Password` nor `PrivateKey`.
    #[error("secret has neither Password nor PrivateKey")]
    NoCredential,
    /// Both `Password` and `PrivateKey`.
    #[error("secret has both Password and PrivateKey (exactly one is allowed)")]
    BothCredentials,
    /// `Password` is the empty string.
    #[error("Password is empty")]
    PasswordEmpty,
    /// `Password` contains a character ssh's askpass cannot carry.
    #[error("Password contains a NUL or line-break character, which ssh cannot take from askpass")]
    PasswordUnusable,
    /// A password secret with a `PublicKey`.
    #[error("PublicKey is present but PrivateKey is not")]
    PublicKeyWithoutPrivateKey,
    /// `PrivateKey` is the empty string.
    #[error("PrivateKey is empty")]
    PrivateKeyEmpty,
    /// `PrivateKey` is of a kind or format we do not support.
    #[error("PrivateKey is not a supported key (RSA PKCS#1/PKCS#8/OpenSSH, Ed25519, ECDSA)")]
    PrivateKeyUnsupported,
    /// `PrivateKey` is passphrase-protected.
    #[error("PrivateKey is encrypted with a passphrase (store it unencrypted in KMS)")]
    PrivateKeyEncrypted,
    /// `PrivateKey` has a supported header but does not decode to a consistent key.
    #[error("PrivateKey is malformed or internally inconsistent")]
    PrivateKeyMalformed,
    /// RSA key below [`RSA_MIN_BITS`].
    #[error("PrivateKey is an RSA key of {bits} bits; at least 2048 are required")]
    RsaKeyTooSmall {
        /// Modulus size.
        bits: usize,
    },
    /// RSA key above [`RSA_MAX_BITS`].
    #[error("PrivateKey is an RSA key of {bits} bits; at most 16384 are supported")]
    RsaKeyTooLarge {
        /// Modulus size.
        bits: usize,
    },
    /// `PublicKey` is not an OpenSSH public key line.
    #[error("PublicKey is not an OpenSSH public key (\"<type> <base64> [comment]\")")]
    PublicKeyMalformed,
    /// `PublicKey` belongs to another key.
    #[error("PublicKey does not match PrivateKey")]
    PublicKeyMismatch,
}

const USER_NAME: &str = "UserName";
const PASSWORD: &str = "Password";
const PUBLIC_KEY: &str = "PublicKey";
const PRIVATE_KEY: &str = "PrivateKey";

impl TargetSecret {
    /// Parses and validates a secret value (KMS `SecretData`).
    pub fn parse(data: &[u8]) -> Result<TargetSecret, SecretError> {
        if data.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge { len: data.len() });
        }
        let text = std::str::from_utf8(data).map_err(|_| SecretError::NotUtf8)?;
        let fields = json::object_fields(text, &[USER_NAME, PASSWORD, PUBLIC_KEY, PRIVATE_KEY])
            .map_err(|e| match e {
                json::JsonError::Syntax { offset } => SecretError::NotJson { offset },
                json::JsonError::NotObject => SecretError::NotObject,
                json::JsonError::Duplicate(name) => SecretError::DuplicateField(name),
                json::JsonError::NotString(name) => SecretError::NotString(name),
                json::JsonError::TooDeep => SecretError::TooDeep,
            })?;
        let mut fields = fields.into_iter();
        let mut next = || fields.next().flatten();
        let (user_name, password, public_key, private_key) = (next(), next(), next(), next());

        let user_name = user_name.ok_or(SecretError::UserNameMissing)?;
        if !valid_user_name(&user_name) {
            return Err(SecretError::UserNameInvalid);
        }
        let credential = match (password, private_key) {
            (Some(_), Some(_)) => return Err(SecretError::BothCredentials),
            (None, None) => return Err(SecretError::NoCredential),
            (Some(password), None) => {
                if public_key.is_some() {
                    return Err(SecretError::PublicKeyWithoutPrivateKey);
                }
                Credential::Password(password_credential(password)?)
            }
            (None, Some(private_key)) => Credential::Key(key_credential(
                &private_key,
                public_key.as_ref().map(|s| s.as_str()),
            )?),
        };
        Ok(TargetSecret {
            user_name: user_name.as_str().to_owned(),
            credential,
        })
    }

    /// Checks that `UserName` is the account this secret is configured for.
    pub fn ensure_user(&self, account: &str) -> Result<(), SecretError> {
        if self.user_name == account {
            Ok(())
        } else {
            Err(SecretError::UserNameMismatch)
        }
    }

    /// The private key's fingerprint (`SHA256:…`, as `ssh-keygen -l` prints it), for logs
    /// and audit; `None` for a password.
    pub fn fingerprint(&self) -> Option<String> {
        match &self.credential {
            Credential::Key(key) => Some(key.fingerprint()),
            Credential::Password(_) => None,
        }
    }

    /// The public key as an `authorized_keys` line (`ssh-ed25519 AAAA…`); `None` for a
    /// password.
    pub fn public_key_openssh(&self) -> Option<String> {
        match &self.credential {
            Credential::Key(key) => Some(key.public_key_openssh()),
            Credential::Password(_) => None,
        }
    }
}

/// A conservative account name: what `useradd` accepts by default, plus upper case (Windows
/// accounts such as `Administrator`). Nothing that a shell, ssh or our `@`-separated login
/// strings would read specially.
fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_NAME_LEN
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn password_credential(mut password: Zeroizing<String>) -> Result<SecretString, SecretError> {
    if password.is_empty() {
        return Err(SecretError::PasswordEmpty);
    }
    if password.contains(['\0', '\n', '\r']) {
        return Err(SecretError::PasswordUnusable);
    }
    // Move the buffer (no copy) into the SecretString, which wipes it on drop.
    Ok(SecretString::new(std::mem::take(&mut *password)))
}

fn key_credential(private_key: &str, public_key: Option<&str>) -> Result<PrivateKey, SecretError> {
    if private_key.trim().is_empty() {
        return Err(SecretError::PrivateKeyEmpty);
    }
    let key = PrivateKey::from_text(private_key)?;
    if let Some(line) = public_key {
        key.check_public_key_line(line)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests;
