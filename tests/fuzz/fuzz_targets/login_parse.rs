//! Fuzzes login-string parsing: nothing may panic, every accepted string formats back to
//! exactly itself and fits the grammar's limits.
#![no_main]

use kmsbastion::login::{Login, MAX_LOGIN_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Login::parse(s) {
        Ok(login) => {
            assert_eq!(login.to_string(), s);
            assert!(s.len() <= MAX_LOGIN_LEN);
            assert!(!s.contains(':') && !s.contains("..") && !s.contains('/'));
            assert!(s.bytes().all(|b| b.is_ascii_graphic()));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
