//! The `[kms]` section: how the broker and the admin CLI reach KMS. Plain data, always
//! compiled (the NSS/PAM builds parse the whole file too, they just never use this part).
#![forbid(unsafe_code)]

use serde::Deserialize;
use std::path::PathBuf;

/// Default overall deadline for one KMS operation, retries included.
pub const DEFAULT_KMS_DEADLINE_MS: u64 = 5_000;

/// Where KMS credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialSource {
    /// environment, then `credentials_file` (if set), then the ECS RAM role.
    #[default]
    Chain,
    /// only `ALIBABA_CLOUD_ACCESS_KEY_ID` / `_SECRET` / `_SECURITY_TOKEN`.
    Env,
    /// only `credentials_file`.
    File,
    /// only the ECS instance RAM role (instance metadata service).
    EcsRamRole,
}

/// Which endpoint family a region maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    #[default]
    Public,
    Vpc,
}

/// Request signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureAlgorithm {
    /// ACS3-HMAC-SHA256, what the official SDKs send.
    #[default]
    V3,
    /// HMAC-SHA1 signature version 1.0 (RPC).
    V1,
}

/// `[kms]` of `kmsbastion.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSettings {
    /// Region id, e.g. `cn-hangzhou`; gives `kms[-vpc].<region>.aliyuncs.com`.
    pub region: Option<String>,
    /// `public` or `vpc` (only with `region`).
    #[serde(default)]
    pub network: Network,
    /// Explicit endpoint URL (`https://…`, or `http://` to a loopback address only).
    pub endpoint: Option<String>,
    #[serde(default)]
    pub credentials: CredentialSource,
    /// AccessKey file (`access_key_id = …`, `access_key_secret = …`, optional
    /// `security_token = …`); refused if group- or world-readable.
    pub credentials_file: Option<PathBuf>,
    /// RAM role name for the ECS metadata service; discovered when absent.
    pub ram_role: Option<String>,
    /// Overall deadline for one KMS operation, retries included.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// PEM bundle to trust instead of the system roots (KMS instance gateways).
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub signature: SignatureAlgorithm,
}

impl Default for KmsSettings {
    /// An absent `[kms]` section: region/endpoint unset (the admin CLI and the broker report
    /// that when they need KMS), the credentials chain, the default deadline.
    fn default() -> Self {
        KmsSettings {
            region: None,
            network: Network::default(),
            endpoint: None,
            credentials: CredentialSource::default(),
            credentials_file: None,
            ram_role: None,
            deadline_ms: DEFAULT_KMS_DEADLINE_MS,
            ca_file: None,
            signature: SignatureAlgorithm::default(),
        }
    }
}

fn default_deadline_ms() -> u64 {
    DEFAULT_KMS_DEADLINE_MS
}
