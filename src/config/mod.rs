//! `kmsbastion.toml`: the bastion's configuration.
//!
//! One world-readable file without secrets: the KMS settings, the inventory (hosts and their
//! accounts with the KMS secret names), the engineers and the grants. Parsing is strict: an
//! unknown key, a bad value or a failed consistency check is an error that names the file and
//! the line (`/etc/kmsbastion/kmsbastion.toml:12: …`), and every problem found is reported at
//! once. Things that are legal but probably not what the administrator wants (a host without a
//! pinned key, a grant pattern that matches nothing) are [`ConfigWarning`]s.
//!
//! [`Config::parse`] is pure. [`Config::load`] reads the file and also checks the bastion's
//! names and ids against the local `/etc/passwd` and `/etc/group` ([`LocalDb`]), so that an
//! engineer can never shadow or share an id with a local account.
#![forbid(unsafe_code)]

pub mod index;
mod kms;
mod local;
mod raw;
mod sshkey;
mod time;
mod validate;

pub use index::Scope;
pub use kms::*;
pub use local::{LocalDb, LOCAL_GROUP_PATH, LOCAL_PASSWD_PATH};
pub use sshkey::{parse_public_key, PublicKeyLine, KEY_TYPES};
pub use time::{format_rfc3339_utc, format_ssh_expiry, parse_rfc3339_utc};

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where the configuration lives on a jump host. The NSS module always reads this path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kmsbastion/kmsbastion.toml";
/// Default name of the bastion group (primary group of every engineer entry).
pub const DEFAULT_BASTION_GROUP: &str = "kmsbastion-engineers";
/// Default gid of the bastion group.
pub const DEFAULT_BASTION_GID: u32 = 64_000;
/// Default lowest engineer uid.
pub const DEFAULT_UID_MIN: u32 = 64_001;
/// Default highest engineer uid.
pub const DEFAULT_UID_MAX: u32 = 64_999;
/// Lowest `uid_min` accepted: engineer uids never overlap system accounts.
pub const LOWEST_UID_MIN: u32 = 1_000;
/// Highest `uid_max` accepted (ids above look negative to some tools).
pub const HIGHEST_UID_MAX: u32 = 2_147_483_647;
/// Default home directory of engineer entries: fixed and not writable by engineers.
pub const DEFAULT_HOME: &str = "/";
/// Default login shell of engineer entries.
pub const DEFAULT_SHELL: &str = "/usr/libexec/kmsbastion/kmsbastion-connect";
/// Default path of the per-login broker.
pub const DEFAULT_BROKER: &str = "/usr/libexec/kmsbastion/kmsbastion-broker";
/// Default system user the brokers run as (also the `AuthorizedKeysCommandUser`).
pub const DEFAULT_SERVICE_USER: &str = "kmsbastion";
/// Default onward ssh client.
pub const DEFAULT_SSH: &str = "/usr/bin/ssh";
/// Default directory of broker sockets.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/kmsbastion";
/// Default onward ssh `ConnectTimeout`, seconds.
pub const DEFAULT_CONNECT_TIMEOUT_S: u32 = 10;
/// Longest onward `ConnectTimeout` accepted, seconds.
pub const MAX_CONNECT_TIMEOUT_S: u32 = 300;
/// Default ssh port of a host.
pub const DEFAULT_SSH_PORT: u16 = 22;
/// Audit events go to syslog unless `[audit] syslog = false`.
pub const DEFAULT_AUDIT_SYSLOG: bool = true;

/// `[bastion]`: identity and paths on the jump host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BastionSettings {
    /// The bastion group's name (NSS-provided; primary group of every engineer entry).
    pub group: String,
    /// The bastion group's gid.
    pub gid: u32,
    /// Engineer uids lie in `[uid_min, uid_max]`, a range no local user occupies.
    pub uid_min: u32,
    /// See `uid_min`.
    pub uid_max: u32,
    /// Home directory of every engineer entry.
    pub home: PathBuf,
    /// Login shell of every engineer entry (`kmsbastion-connect`).
    pub shell: PathBuf,
    /// The per-login broker executable.
    pub broker: PathBuf,
    /// The system user brokers run as.
    pub service_user: String,
    /// The onward ssh client.
    pub ssh: PathBuf,
    /// Directory of broker sockets.
    pub runtime_dir: PathBuf,
    /// Onward ssh `ConnectTimeout`, seconds.
    pub connect_timeout_s: u32,
}

impl Default for BastionSettings {
    fn default() -> Self {
        BastionSettings {
            group: DEFAULT_BASTION_GROUP.into(),
            gid: DEFAULT_BASTION_GID,
            uid_min: DEFAULT_UID_MIN,
            uid_max: DEFAULT_UID_MAX,
            home: DEFAULT_HOME.into(),
            shell: DEFAULT_SHELL.into(),
            broker: DEFAULT_BROKER.into(),
            service_user: DEFAULT_SERVICE_USER.into(),
            ssh: DEFAULT_SSH.into(),
            runtime_dir: DEFAULT_RUNTIME_DIR.into(),
            connect_timeout_s: DEFAULT_CONNECT_TIMEOUT_S,
        }
    }
}

/// `[audit]`: where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// JSON-lines audit file, if any.
    pub file: Option<PathBuf>,
    /// Also send events to syslog (authpriv).
    pub syslog: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            file: None,
            syslog: DEFAULT_AUDIT_SYSLOG,
        }
    }
}

/// `[[host]]`: one target host of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Inventory name used in login strings.
    pub name: String,
    /// Address or DNS name the jump host connects to.
    pub address: String,
    /// ssh port.
    pub port: u16,
    /// Pinned host public keys (`type base64`); a host without any is unusable.
    pub host_keys: Vec<String>,
    /// ECS instance id, if the host is an ECS instance.
    pub instance_id: Option<String>,
    /// The accounts reachable on this host.
    pub accounts: Vec<HostAccount>,
}

impl Host {
    /// The account with this name on this host.
    pub fn account(&self, name: &str) -> Option<&HostAccount> {
        self.accounts.iter().find(|a| a.name == name)
    }
}

/// `[[host.account]]`: one target OS account and the KMS secret holding its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAccount {
    /// Target OS account name.
    pub name: String,
    /// KMS secret name (never the secret itself).
    pub secret: String,
}

/// `[[engineer]]`: a person who logs in through the bastion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engineer {
    /// Login name.
    pub name: String,
    /// uid of the engineer's NSS entries (plain and composite logins).
    pub uid: u32,
    /// OpenSSH public keys (`type base64 [comment]`), checked structurally.
    pub keys: Vec<String>,
    /// Engineer groups used by grants.
    pub groups: Vec<String>,
}

impl Engineer {
    /// The engineer's keys, parsed (they were checked when the configuration was loaded).
    pub fn public_keys(&self) -> Vec<PublicKeyLine> {
        self.keys
            .iter()
            .filter_map(|k| parse_public_key(k).ok())
            .collect()
    }
}

/// `[[grant]]`: engineers or groups → `account@host` patterns, optionally limited by source
/// address and time window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRule {
    /// Engineers this rule applies to.
    pub engineers: Vec<String>,
    /// Engineer groups this rule applies to.
    pub groups: Vec<String>,
    /// `account@host` patterns; `*` matches any run of characters within one side of the `@`.
    pub accounts: Vec<String>,
    /// Allowed source networks; empty means any source.
    pub from: Vec<ipnet::IpNet>,
    /// The rule applies from this instant on (inclusive).
    pub not_before: Option<SystemTime>,
    /// The rule applies until this instant (exclusive).
    pub not_after: Option<SystemTime>,
    /// Line of the rule in the configuration file (for logs).
    pub line: usize,
}

impl GrantRule {
    /// Whether this rule names the engineer directly or through one of its groups.
    pub fn applies_to(&self, engineer: &Engineer) -> bool {
        self.engineers.contains(&engineer.name)
            || self
                .groups
                .iter()
                .any(|g| engineer.groups.iter().any(|eg| eg == g))
    }

    /// Whether one of the `account@host` patterns matches.
    pub fn covers(&self, account: &str, host: &str) -> bool {
        self.accounts
            .iter()
            .any(|p| pattern_matches(p, account, host))
    }
}

/// Whether an `account@host` pattern matches (`*` never crosses the `@`).
pub fn pattern_matches(pattern: &str, account: &str, host: &str) -> bool {
    match pattern.split_once('@') {
        Some((pa, ph)) => {
            glob(pa.as_bytes(), account.as_bytes()) && glob(ph.as_bytes(), host.as_bytes())
        }
        None => false,
    }
}

/// `*`-only glob, iterative (no recursion, linear backtracking on the last star).
fn glob(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if Some(c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pat.get(p..).unwrap_or_default().iter().all(|&c| c == b'*')
}

/// The whole configuration. World-readable, no secret fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[kms]`.
    pub kms: KmsSettings,
    /// `[bastion]`.
    pub bastion: BastionSettings,
    /// `[audit]`.
    pub audit: AuditSettings,
    /// `[[host]]`, in file order.
    pub hosts: Vec<Host>,
    /// `[[engineer]]`, in file order.
    pub engineers: Vec<Engineer>,
    /// `[[grant]]`, in file order (the first allowing rule wins).
    pub grants: Vec<GrantRule>,
    warnings: Vec<ConfigWarning>,
    origin: PathBuf,
}

impl Config {
    /// Reads and parses `path`, then checks it against the local `/etc/passwd` and
    /// `/etc/group` (read directly, never through NSS).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_text(path)?;
        let local = LocalDb::system().map_err(|e| ConfigError::local_unreadable(path, &e))?;
        Config::parse_checked(&text, path, &local)
    }

    /// Parses and validates `text` (as if read from `origin`, which error messages name).
    /// Pure: no local-account checks (see [`Config::parse_checked`]).
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        validate::build(text, origin, None)
    }

    /// [`Config::parse`] plus the checks against local users and groups: the uid range and
    /// the gid hold no local id, and no engineer or the bastion group shadows a local name.
    pub fn parse_checked(
        text: &str,
        origin: &Path,
        local: &LocalDb,
    ) -> Result<Config, ConfigError> {
        validate::build(text, origin, Some(local))
    }

    /// Legal but suspicious things found while parsing (e.g. hosts without a pinned key).
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    /// The file this configuration was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The host with this inventory name.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The engineer with this name.
    pub fn engineer(&self, name: &str) -> Option<&Engineer> {
        self.engineers.iter().find(|e| e.name == name)
    }

    /// The engineer with this uid.
    pub fn engineer_by_uid(&self, uid: u32) -> Option<&Engineer> {
        self.engineers.iter().find(|e| e.uid == uid)
    }

    /// The host and its account, if both exist.
    pub fn account(&self, host: &str, account: &str) -> Option<(&Host, &HostAccount)> {
        let h = self.host(host)?;
        Some((h, h.account(account)?))
    }

    /// Whether a host has at least one pinned host key (otherwise onward connections are
    /// refused).
    pub fn host_is_usable(host: &Host) -> bool {
        !host.host_keys.is_empty()
    }
}

/// Largest configuration file read (a guard against pointing `--config` at a device).
pub const MAX_CONFIG_SIZE: u64 = 4 * 1024 * 1024;

fn read_config_text(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| ConfigError::unreadable(path, &e))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ConfigError::unreadable(path, &e))?;
    if bytes.len() as u64 > MAX_CONFIG_SIZE {
        return Err(ConfigError::invalid(
            path,
            vec![Problem::file(format!(
                "larger than {MAX_CONFIG_SIZE} bytes"
            ))],
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        ConfigError::invalid(path, vec![Problem::file("not valid UTF-8 text".to_owned())])
    })
}

/// One problem in the configuration, with its line when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    pub(crate) fn at(line: Option<usize>, message: String) -> Problem {
        Problem { line, message }
    }
    pub(crate) fn file(message: String) -> Problem {
        Problem {
            line: None,
            message,
        }
    }
}

/// What kind of failure a [`ConfigError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file (or `/etc/passwd`, `/etc/group`) does not exist.
    Missing,
    /// The file exists but could not be read.
    Unreadable,
    /// Not valid TOML, unknown keys, wrong value types.
    Syntax,
    /// Parsed, but failed validation.
    Invalid,
}

/// The configuration could not be used. `Display` prints one `path:line: message` per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// What kind of failure.
    pub kind: ConfigErrorKind,
    /// The configuration file.
    pub path: PathBuf,
    /// Every problem found (at least one).
    pub problems: Vec<Problem>,
}

impl ConfigError {
    fn unreadable(path: &Path, e: &io::Error) -> ConfigError {
        let kind = if e.kind() == io::ErrorKind::NotFound {
            ConfigErrorKind::Missing
        } else {
            ConfigErrorKind::Unreadable
        };
        ConfigError {
            kind,
            path: path.to_owned(),
            problems: vec![Problem::file(format!(
                "cannot read the configuration: {e} (it must exist and be readable by every user)"
            ))],
        }
    }

    fn local_unreadable(path: &Path, e: &io::Error) -> ConfigError {
        ConfigError {
            kind: ConfigErrorKind::Unreadable,
            path: path.to_owned(),
            problems: vec![Problem::file(format!(
                "cannot read {LOCAL_PASSWD_PATH} or {LOCAL_GROUP_PATH} to check for conflicts with local accounts: {e}"
            ))],
        }
    }

    pub(crate) fn syntax(path: &Path, problem: Problem) -> ConfigError {
        ConfigError {
            kind: ConfigErrorKind::Syntax,
            path: path.to_owned(),
            problems: vec![problem],
        }
    }

    pub(crate) fn invalid(path: &Path, problems: Vec<Problem>) -> ConfigError {
        ConfigError {
            kind: ConfigErrorKind::Invalid,
            path: path.to_owned(),
            problems,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, p.message)?,
                None => write!(f, "{}: {}", self.path.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Something legal but probably unintended. `Display`: `path:line: warning: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The configuration file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: Option<usize>,
    /// What looks wrong and what it means.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: warning: {}",
                self.path.display(),
                line,
                self.message
            ),
            None => write!(f, "{}: warning: {}", self.path.display(), self.message),
        }
    }
}

#[cfg(test)]
mod tests;
