//! Fuzzes the configuration parser: nothing may panic, and every error names the file.
#![no_main]

use kmsbastion::config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("/fuzz/kmsbastion.toml");
    match Config::parse(text, origin) {
        Ok(cfg) => {
            for w in cfg.warnings() {
                assert!(w.to_string().starts_with("/fuzz/kmsbastion.toml"));
            }
        }
        Err(e) => assert!(e.to_string().starts_with("/fuzz/kmsbastion.toml")),
    }
});
