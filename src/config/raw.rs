//! The file as serde sees it: every value that validation may complain about carries its
//! span, so problems can name the line.
#![forbid(unsafe_code)]

use super::KmsSettings;
use serde::Deserialize;
use toml::Spanned;

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub kms: Option<S<KmsSettings>>,
    #[serde(default)]
    pub bastion: RawBastion,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub host: Vec<RawHost>,
    #[serde(default)]
    pub engineer: Vec<RawEngineer>,
    #[serde(default)]
    pub grant: Vec<RawGrant>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBastion {
    pub group: Option<S<String>>,
    pub gid: Option<S<u32>>,
    pub uid_min: Option<S<u32>>,
    pub uid_max: Option<S<u32>>,
    pub home: Option<S<String>>,
    pub shell: Option<S<String>>,
    pub broker: Option<S<String>>,
    pub service_user: Option<S<String>>,
    pub ssh: Option<S<String>>,
    pub runtime_dir: Option<S<String>>,
    pub connect_timeout_s: Option<S<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub file: Option<S<String>>,
    pub syslog: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    pub name: S<String>,
    pub address: S<String>,
    pub port: Option<S<u16>>,
    #[serde(default)]
    pub host_keys: Vec<S<String>>,
    pub instance_id: Option<S<String>>,
    #[serde(default)]
    pub account: Vec<RawAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub name: S<String>,
    pub secret: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngineer {
    pub name: S<String>,
    pub uid: S<u32>,
    #[serde(default)]
    pub keys: Vec<S<String>>,
    #[serde(default)]
    pub groups: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrant {
    pub engineers: Option<S<Vec<S<String>>>>,
    pub groups: Option<S<Vec<S<String>>>>,
    pub accounts: S<Vec<S<String>>>,
    pub from: Option<S<Vec<S<String>>>>,
    pub not_before: Option<S<String>>,
    pub not_after: Option<S<String>>,
}
