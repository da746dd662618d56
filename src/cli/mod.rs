//! `kmsbastion`, the bastion administrator's command: check the configuration against KMS and
//! the targets, list and import KMS secrets as host accounts, pin host keys, show and dry-run
//! grants, and enable or disable the bastion wiring.
//!
//! Every subcommand returns an [`Outcome`] or a [`CliError`]; [`run`] maps them to the
//! documented exit codes in one place ([`CliError::exit_code`]).
#![forbid(unsafe_code)]

mod catalog;
mod check;
mod edit;
mod explain;
mod grants;
mod import;
mod index;
mod keyscan;
mod output;
mod secrets;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::kms::{KmsClient, KmsError};

pub use edit::{ConfigDocument, EditError, NewAccount};
pub use keyscan::{HostKeyScanner, ScannedKey, SshKeyscan};

/// Everything went as asked; `check` found nothing; `explain`: the login would be allowed.
pub const EXIT_OK: u8 = 0;
/// Findings or a refusal: `check` found problems, `explain` says the login would be refused,
/// `import` refused a secret, `keyscan` was not confirmed.
pub const EXIT_FINDINGS: u8 = 1;
/// Usage or configuration error: bad arguments, an unknown host or engineer, a configuration
/// that does not load (the message names file and line).
pub const EXIT_USAGE: u8 = 2;
/// KMS error: unreachable, throttled, bad credentials, no permission, clock skew.
pub const EXIT_KMS: u8 = 3;
/// Local system error: a file could not be written, `ssh-keyscan` could not run, `enable`
/// or `disable` failed.
pub const EXIT_SYSTEM: u8 = 4;

/// Administer a kmsbastion jump host.
#[derive(Debug, Parser)]
#[command(
    name = "kmsbastion",
    version,
    about = "Administer a kmsbastion jump host: KMS secrets as host accounts, pinned host keys, grants",
    after_help = "Exit status: 0 ok, 1 findings or refusal, 2 usage or configuration error, 3 KMS error, 4 local system error.\nSee kmsbastion(8)."
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// `--json` for listings.
#[derive(Debug, Clone, Copy, Args)]
pub struct JsonFlag {
    /// Print JSON on stdout instead of a table (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration, reach KMS, describe every host account's secret and check
    /// every pinned host key. Never fetches a secret value.
    Check {
        /// Skip connecting to the targets' sshd to compare host keys.
        #[arg(long)]
        no_host_keys: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// KMS secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Add host accounts to the configuration from KMS ECS secrets of the host's instance
    /// ("Import KMS Secret"). Idempotent; keeps the file's comments and layout.
    Import {
        /// The inventory host (`[[host]] name`) to import into.
        #[arg(long, value_name = "HOST")]
        host: String,
        /// Import only these secrets (default: every ECS secret of the host's instance_id).
        #[arg(long = "secret", value_name = "NAME")]
        secrets: Vec<String>,
        /// Show what would change without writing the file.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Fetch a host's sshd host keys, show their fingerprints and pin them in the
    /// configuration on confirmation.
    Keyscan {
        /// The inventory host.
        host: String,
        /// Pin without asking.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Who may reach what, with time windows and source networks.
    Grants {
        /// Only this engineer.
        engineer: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Dry-run every check a login would pass and say which one refuses it.
    Explain {
        /// The SSH user name, e.g. `alice@root@web-01` (or `alice`).
        login: String,
        /// The engineer's source address (`PAM_RHOST`); unknown when absent.
        #[arg(long, value_name = "ADDR")]
        from: Option<std::net::IpAddr>,
        /// Evaluate at this time (RFC 3339 UTC, e.g. 2026-07-01T09:00:00Z) instead of now.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Skip the KMS DescribeSecret step.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Wire sshd, PAM and NSS for kmsbastion (verified with `sshd -t`/`sshd -T`, rolled back
    /// on failure).
    Enable {
        #[command(flatten)]
        args: EnableArgs,
        /// Never set sshd's MaxStartups: install the drop-in without its `MaxStartups
        /// 100:30:200` (enable leaves it out anyway when a file already sets MaxStartups).
        #[arg(long)]
        keep_max_startups: bool,
    },
    /// Revert exactly what `enable` changed.
    Disable(EnableArgs),
    /// Rebuild the lookup index of the configuration (as root), so that sshd's helpers and
    /// the NSS module do not parse a large inventory on every call.
    Index {
        /// Only report whether the index is fresh (exit 1 if it is not used).
        #[arg(long)]
        check: bool,
    },
}

/// `secrets` subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// List the ECS secrets in KMS (all pages), optionally only those of one instance.
    List {
        /// Only secrets of this inventory host's instance_id.
        #[arg(long, value_name = "HOST", conflicts_with = "instance_id")]
        host: Option<String>,
        /// Only secrets whose ExtendedConfig names this ECS instance.
        #[arg(long, value_name = "ID")]
        instance_id: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// Options of `enable` and `disable`.
#[derive(Debug, Clone, Args)]
pub struct EnableArgs {
    /// Show the changes (a diff) without making them.
    #[arg(long)]
    pub dry_run: bool,
    /// Operate on a system image mounted here instead of `/` (packaging tests).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// The sshd binary used to verify the effective configuration.
    #[arg(long, value_name = "PATH", default_value = crate::enable::DEFAULT_SSHD)]
    pub sshd: PathBuf,
}

/// A subcommand that ran to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All is well.
    Ok,
    /// Ran, and found problems or refused (exit 1); the details are already printed.
    Findings,
}

/// Why a subcommand could not do its job. `Display` is the one line printed after
/// `kmsbastion: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or an unknown name (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The configuration does not load (exit 2).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A refusal that the administrator must resolve (exit 1).
    #[error("{0}")]
    Refused(String),
    /// KMS failed (exit 3).
    #[error("KMS: {context}: {error}")]
    Kms {
        /// What was being done (`ListSecrets`, `DescribeSecret NAME`).
        context: String,
        /// The client's error (code and RequestId, never a value).
        error: KmsError,
    },
    /// A local operation failed (exit 4).
    #[error("{0}")]
    System(String),
}

impl CliError {
    /// The documented exit code of this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config(_) => EXIT_USAGE,
            CliError::Refused(_) => EXIT_FINDINGS,
            CliError::Kms { .. } => EXIT_KMS,
            CliError::System(_) => EXIT_SYSTEM,
        }
    }

    pub(crate) fn kms(context: impl Into<String>, error: KmsError) -> CliError {
        CliError::Kms {
            context: context.into(),
            error,
        }
    }
}

impl From<EditError> for CliError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::Syntax { .. } | EditError::Shape { .. } => CliError::Usage(e.to_string()),
            EditError::Read { .. } | EditError::Write { .. } | EditError::Raced { .. } => {
                CliError::System(e.to_string())
            }
        }
    }
}

/// Loads the configuration quietly (warnings are `check`'s business).
pub(crate) fn load_config_quiet(cli: &Cli) -> Result<Config, CliError> {
    Ok(Config::load(&cli.config)?)
}

/// Checks an edited configuration exactly as a later load would (including the checks
/// against local users and groups), before it is written.
pub(crate) fn validate_edited(text: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    match crate::config::LocalDb::system() {
        Ok(local) => Config::parse_checked(text, path, &local).map(|_| ()),
        Err(_) => Config::parse(text, path).map(|_| ()),
    }
}

/// The KMS client for the configured endpoint and credentials.
pub(crate) fn kms_client(cfg: &Config) -> Result<KmsClient, CliError> {
    KmsClient::from_settings(&cfg.kms).map_err(|e| CliError::kms("cannot set up the KMS client", e))
}

/// The host named `name`, or a usage error listing the known ones.
pub(crate) fn find_host<'a>(
    cfg: &'a Config,
    name: &str,
) -> Result<&'a crate::config::Host, CliError> {
    cfg.host(name).ok_or_else(|| {
        let known: Vec<&str> = cfg.hosts.iter().map(|h| h.name.as_str()).collect();
        CliError::Usage(format!(
            "no host {name:?} in {} (known hosts: {})",
            cfg.origin().display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// Runs one parsed command line.
pub fn execute(cli: &Cli) -> Result<Outcome, CliError> {
    match &cli.command {
        Command::Check { no_host_keys, json } => {
            check::run(cli, !*no_host_keys, json.json, &SshKeyscan::default())
        }
        Command::Secrets(SecretsCommand::List {
            host,
            instance_id,
            json,
        }) => secrets::list(cli, host.as_deref(), instance_id.as_deref(), json.json),
        Command::Import {
            host,
            secrets,
            dry_run,
            json,
        } => import::run(cli, host, secrets, *dry_run, json.json),
        Command::Keyscan { host, yes, json } => {
            keyscan::run(cli, host, *yes, json.json, &SshKeyscan::default())
        }
        Command::Grants { engineer, json } => grants::run(cli, engineer.as_deref(), json.json),
        Command::Explain {
            login,
            from,
            at,
            offline,
            json,
        } => explain::run(cli, login, *from, at.as_deref(), *offline, json.json),
        Command::Enable {
            args,
            keep_max_startups,
        } => enable(cli, args, Some(*keep_max_startups)),
        Command::Disable(args) => enable(cli, args, None),
        Command::Index { check } => index::run(cli, *check),
    }
}

/// `enable` (`keep_max_startups` is `Some`) or `disable` (`None`).
fn enable(
    cli: &Cli,
    args: &EnableArgs,
    keep_max_startups: Option<bool>,
) -> Result<Outcome, CliError> {
    let on = keep_max_startups.is_some();
    let options = crate::enable::EnableOptions {
        root: args.root.clone(),
        dry_run: args.dry_run,
        sshd: args.sshd.clone(),
        config: cli.config.clone(),
        keep_max_startups: keep_max_startups.unwrap_or(false),
    };
    let result = if on {
        crate::enable::enable(&options)
    } else {
        crate::enable::disable(&options)
    };
    match result {
        Ok(report) => {
            print!("{report}");
            Ok(Outcome::Ok)
        }
        Err(e) => Err(CliError::System(format!(
            "{} failed: {e}",
            if on { "enable" } else { "disable" }
        ))),
    }
}

/// The `kmsbastion` binary: parse, run, print the error, exit with its code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(&cli) {
        Ok(Outcome::Ok) => ExitCode::from(EXIT_OK),
        Ok(Outcome::Findings) => ExitCode::from(EXIT_FINDINGS),
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("kmsbastion: {line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_error_maps_to_its_documented_exit_code() {
        let kms = KmsError::new(crate::kms::KmsErrorKind::Unavailable, "down");
        let table: [(CliError, u8); 4] = [
            (CliError::Usage("x".into()), 2),
            (CliError::Refused("x".into()), 1),
            (CliError::kms("ListSecrets", kms), 3),
            (CliError::System("x".into()), 4),
        ];
        for (err, code) in table {
            assert_eq!(err.exit_code(), code, "{err}");
        }
        let raced = CliError::from(EditError::Raced { path: "/x".into() });
        assert_eq!(raced.exit_code(), EXIT_SYSTEM);
    }

    #[test]
    fn secrets_list_host_and_instance_id_are_exclusive() {
        let r = Cli::try_parse_from([
            "kmsbastion",
            "secrets",
            "list",
            "--host",
            "a",
            "--instance-id",
            "i",
        ]);
        assert!(r.is_err());
        let c = Cli::try_parse_from([
            "kmsbastion",
            "import",
            "--host",
            "web-01",
            "--secret",
            "a",
            "--secret",
            "b",
        ])
        .unwrap();
        match c.command {
            Command::Import { secrets, .. } => {
                assert_eq!(secrets, vec!["a".to_string(), "b".to_string()])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.config, PathBuf::from(DEFAULT_CONFIG_PATH));
    }
}
