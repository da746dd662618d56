//! Types for values that must never be printed, logged or left in memory: KMS secret
//! values, passwords, private keys, AccessKey secrets and STS tokens.
//!
//! They zeroize on drop, their `Debug`/`Display` print `[redacted]`, and they have no
//! `Serialize`: getting the bytes out is an explicit `expose()` at the one place that needs it.
#![forbid(unsafe_code)]

use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// Secret bytes (a KMS `SecretData` value, a private key in PEM, an agent signature input).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    /// The bytes themselves; call only where they are used, never to log.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A secret UTF-8 string (a password, an AccessKey secret, an STS token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
    /// The string itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for SecretString {
    fn from(s: &str) -> Self {
        Self::new(s.to_owned())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Zeroize a buffer we do not own the type of (a `String` taken out of serde, say).
pub fn wipe<T: Zeroize>(value: &mut T) {
    value.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = SecretString::from("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        let b = SecretBytes::new(b"-----BEGIN".to_vec());
        assert_eq!(format!("{b:?}"), "[redacted]");
        assert_eq!(b.expose(), b"-----BEGIN");
    }
}
