//! Fuzzes the secret-value parser (JSON reader, key formats): nothing may panic, and no
//! rejection may quote the input.
#![no_main]

use kmsbastion::secret::TargetSecret;
use libfuzzer_sys::fuzz_target;

/// A value no error message contains: if the input holds it, the message must not.
const MARKER: &str = "Zq7-fuzz-secret-marker";

fuzz_target!(|data: &[u8]| {
    match TargetSecret::parse(data) {
        Ok(secret) => {
            let _ = secret.fingerprint();
            assert!(!format!("{secret:?}").contains(MARKER) || secret.user_name.contains(MARKER));
        }
        Err(err) => {
            assert!(!err.to_string().contains(MARKER));
            assert!(!format!("{err:?}").contains(MARKER));
        }
    }
});
