//! kmsbastion core library: every decision lives here, testable without root.
//!
//! The FFI crates (`pam/`, `nss/`) build this crate without the `client` feature, so
//! nothing loaded into sshd or into every process that resolves users links an HTTP
//! stack or a crypto library.

pub mod sensitive;

// Local policy: configuration, login strings, grants, NSS entries, authorized keys.
pub mod authorized_keys;
pub mod config;
pub mod grant;
pub mod login;
pub mod passwd;

// The login session: audit events, the connect<->broker protocol, the PAM decisions.
pub mod audit;
pub mod connect;
pub mod pam_session;
pub mod session;

// Client side: KMS, secrets, the in-memory agent, the broker, the admin CLI.
#[cfg(feature = "client")]
pub mod agent;
#[cfg(feature = "client")]
pub mod broker;
#[cfg(feature = "client")]
pub mod cli;
#[cfg(feature = "client")]
pub mod enable;
#[cfg(feature = "client")]
pub mod kms;
#[cfg(feature = "client")]
pub mod secret;
