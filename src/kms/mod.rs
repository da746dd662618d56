//! Alibaba Cloud KMS client (API 2016-01-20, the secrets operations kmsbastion needs).
//!
//! * [`client`]: [`KmsClient`], blocking (reqwest + rustls): `GetSecretValue`,
//!   `ListSecrets`, `DescribeSecret`, and [`KmsClient::call_raw`] for any other action.
//! * [`sign`]: V3 `ACS3-HMAC-SHA256` and V1 `HMAC-SHA1` request signatures (also used by the
//!   KMS emulator to verify requests).
//! * [`model`]: typed responses ([`SecretValue`], [`SecretSummary`], [`SecretDescription`]).
//! * [`error`]: [`KmsError`] / [`KmsErrorKind`], the one code → kind table.
//! * [`retry`]: jittered exponential backoff inside one deadline.
//! * [`endpoint`]: region / explicit endpoint resolution.
//! * [`credentials`]: environment, credentials file, ECS RAM role.
#![forbid(unsafe_code)]

pub mod client;
pub mod credentials;
pub mod endpoint;
pub mod error;
pub mod model;
pub mod retry;
pub mod sign;
pub mod utc;

pub use client::{KmsClient, PreparedClient};
pub use credentials::Credentials;
pub use endpoint::Endpoint;
pub use error::{KmsError, KmsErrorKind};
pub use model::{
    Filter, SecretDescription, SecretStage, SecretSummary, SecretValue, SecretVersion, Tag,
};
