//! `kmsbastion.toml`: the bastion's configuration.
#![forbid(unsafe_code)]

mod kms;
pub use kms::*;
