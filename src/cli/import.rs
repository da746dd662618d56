//! `kmsbastion import --host H [--secret NAME …]`: the "Import KMS Secret" step. Adds one
//! `[[host.account]]` per ECS secret of the host's instance (or per named secret), with the
//! account name taken from the secret's `UserName`.
//!
//! Where the user name comes from: KMS ECS secrets carry `UserName` only inside the secret
//! value (`{"UserName","Password"}` / `{"UserName","PublicKey","PrivateKey"}`); neither
//! DescribeSecret nor ListSecrets returns it, and ExtendedConfig holds only the instance, the
//! subtype and optional CustomData. So: a `UserName` in ExtendedConfig (top level or
//! CustomData) is used when present; otherwise this is the one admin command that calls
//! GetSecretValue, keeps only `UserName` (the value stays in a zeroizing buffer that is dropped
//! at once) and never prints or stores anything else. The alternatives were worse: guessing the
//! user from the secret name would import accounts the broker then refuses (it checks that
//! `UserName` equals the account), and asking the administrator to type it repeats what KMS
//! already knows. The broker's role needs GetSecretValue anyway, so no extra permission.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use super::catalog::{SecretCatalog, SecretMeta};
use super::edit::{ConfigDocument, EditError, NewAccount, SaveError};
use super::output::{print_json, Progress};
use super::{find_host, kms_client, load_config_quiet, validate_edited, Cli, CliError, Outcome};
use crate::config::Host;
use crate::kms::KmsErrorKind;
use crate::login::{check_user_name, LoginPart};

/// What happened to one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new `[[host.account]]`.
    Added { account: String, secret: String },
    /// Already imported with the same secret.
    Unchanged { account: String, secret: String },
}

/// `kmsbastion import`.
pub fn run(
    cli: &Cli,
    host_name: &str,
    named: &[String],
    dry_run: bool,
    json: bool,
) -> Result<Outcome, CliError> {
    let cfg = load_config_quiet(cli)?;
    let host = find_host(&cfg, host_name)?.clone();
    let kms = kms_client(&cfg)?;
    let changes = plan_and_apply(cli, &host, named, dry_run, &kms)?;

    let added = changes
        .iter()
        .filter(|c| matches!(c, Change::Added { .. }))
        .count();
    if json {
        print_json(&serde_json::json!({
            "host": host.name,
            "dry_run": dry_run,
            "written": added > 0 && !dry_run,
            "changes": changes.iter().map(|c| match c {
                Change::Added { account, secret } => serde_json::json!({"account": account, "secret": secret, "change": "added"}),
                Change::Unchanged { account, secret } => serde_json::json!({"account": account, "secret": secret, "change": "unchanged"}),
            }).collect::<Vec<_>>(),
        }));
    } else {
        for c in &changes {
            match c {
                Change::Added { account, secret } => println!(
                    "{}: {account}@{} <- {secret}",
                    if dry_run { "would add" } else { "added" },
                    host.name
                ),
                Change::Unchanged { account, secret } => {
                    println!(
                        "unchanged: {account}@{} <- {secret} (already imported)",
                        host.name
                    )
                }
            }
        }
        match (added, dry_run) {
            (0, _) if changes.is_empty() => {}
            (0, _) => println!("{}: nothing to change", cli.config.display()),
            (n, true) => println!(
                "dry run: {n} account(s) would be added to {}",
                cli.config.display()
            ),
            (n, false) => println!("{}: {n} account(s) added", cli.config.display()),
        }
    }
    if changes.is_empty() {
        eprintln!(
            "kmsbastion: no ECS secret in KMS names instance {}; nothing imported",
            host.instance_id.as_deref().unwrap_or("?")
        );
        return Ok(Outcome::Findings);
    }
    Ok(Outcome::Ok)
}

/// Decides every change, refusing the whole import on the first bad secret, then writes the
/// file once (unless `dry_run`). On any error nothing is written.
pub fn plan_and_apply(
    cli: &Cli,
    host: &Host,
    named: &[String],
    dry_run: bool,
    kms: &dyn SecretCatalog,
) -> Result<Vec<Change>, CliError> {
    let candidates = candidates(host, named, kms)?;
    let mut doc = ConfigDocument::load(&cli.config)?;
    let mut changes = Vec::new();
    let mut seen_accounts = BTreeSet::new();
    for meta in candidates {
        let account = account_name(&meta, kms)?;
        if !seen_accounts.insert(account.clone()) {
            return Err(CliError::Refused(format!(
                "two secrets hold user {account:?} for {}; import one of them with --secret",
                host.name
            )));
        }
        let new = NewAccount {
            name: account.clone(),
            secret: meta.name.clone(),
        };
        match doc.add_account(&host.name, &new) {
            Ok(true) => changes.push(Change::Added {
                account,
                secret: meta.name,
            }),
            Ok(false) => changes.push(Change::Unchanged {
                account,
                secret: meta.name,
            }),
            Err(EditError::Shape { message, .. }) if message.contains("already uses secret") => {
                return Err(CliError::Refused(message))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !dry_run {
        match doc.save(validate_edited) {
            Ok(true) => super::index::refresh_after_edit(&cli.config),
            Ok(false) => {}
            Err(SaveError::Invalid(e)) => {
                return Err(CliError::Usage(format!(
                    "the configuration would not load after the import; nothing written:\n{e}"
                )))
            }
            Err(SaveError::Edit(e)) => return Err(e.into()),
        }
    }
    Ok(changes)
}

/// The secrets to import, described, each checked to belong to `host`.
fn candidates(
    host: &Host,
    named: &[String],
    kms: &dyn SecretCatalog,
) -> Result<Vec<SecretMeta>, CliError> {
    if !named.is_empty() {
        let mut out = Vec::new();
        for name in named {
            let meta = kms.describe(name).map_err(|e| match e.kind {
                KmsErrorKind::NotFound => {
                    CliError::Refused(format!("secret {name} does not exist in KMS"))
                }
                _ => CliError::kms(format!("DescribeSecret {name}"), e),
            })?;
            check_belongs(host, &meta, true)?;
            out.push(meta);
        }
        return Ok(out);
    }
    let instance = host.instance_id.as_deref().ok_or_else(|| {
        CliError::Usage(format!(
            "host {} has no instance_id in the configuration: set instance_id = \"i-…\" in its [[host]], or name the secrets with --secret",
            host.name
        ))
    })?;
    let names = kms
        .list_ecs()
        .map_err(|e| CliError::kms("ListSecrets", e))?;
    let mut progress = Progress::new();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        progress.step(i + 1, names.len(), &format!("describing {name}"));
        let meta = match kms.describe(name) {
            Ok(m) => m,
            // Deleted between the listing and now: not ours to import.
            Err(e) if e.kind == KmsErrorKind::NotFound => continue,
            Err(e) => return Err(CliError::kms(format!("DescribeSecret {name}"), e)),
        };
        if meta.instance_id.as_deref() != Some(instance) {
            continue;
        }
        if meta.pending_deletion() {
            eprintln!(
                "kmsbastion: skipping {name}: pending deletion (planned {})",
                meta.planned_delete_time.as_deref().unwrap_or("?")
            );
            continue;
        }
        out.push(meta);
    }
    Ok(out)
}

/// Refuses a secret that cannot serve `host`.
fn check_belongs(host: &Host, meta: &SecretMeta, named: bool) -> Result<(), CliError> {
    if meta.pending_deletion() {
        return Err(CliError::Refused(format!(
            "secret {} is pending deletion in KMS (planned {}); restore it first",
            meta.name,
            meta.planned_delete_time.as_deref().unwrap_or("?")
        )));
    }
    match meta.secret_type.as_str() {
        "ECS" => match (&meta.instance_id, &host.instance_id) {
            (Some(theirs), Some(ours)) if theirs != ours => Err(CliError::Refused(format!(
                "secret {} belongs to instance {theirs}, not {} ({ours})",
                meta.name, host.name
            ))),
            (Some(theirs), None) => Err(CliError::Refused(format!(
                "secret {} belongs to instance {theirs}, but host {} has no instance_id; set instance_id = \"{theirs}\" in its [[host]] if that is the same machine",
                meta.name, host.name
            ))),
            (None, _) => Err(CliError::Refused(format!(
                "secret {} is an ECS secret without an InstanceId in its ExtendedConfig; cannot tell which host it belongs to",
                meta.name
            ))),
            _ => Ok(()),
        },
        // Generic secrets with the ECS value shape serve targets outside ECS; only by name.
        "Generic" if named => Ok(()),
        other => Err(CliError::Refused(format!(
            "secret {} is of type {other}; only ECS secrets (or Generic ones named with --secret) hold host credentials",
            meta.name
        ))),
    }
}

/// The target account name for a secret: metadata first, else the value's `UserName`.
fn account_name(meta: &SecretMeta, kms: &dyn SecretCatalog) -> Result<String, CliError> {
    let user = match &meta.user_name_hint {
        Some(u) => u.clone(),
        None => kms
            .user_name(&meta.name)
            .map_err(|e| {
                CliError::kms(
                    format!("GetSecretValue {} (for its UserName)", meta.name),
                    e,
                )
            })?
            .ok_or_else(|| {
                CliError::Refused(format!(
                    "secret {} has no UserName in its value; it is not an ECS-shaped secret",
                    meta.name
                ))
            })?,
    };
    check_user_name(&user, LoginPart::Account).map_err(|e| {
        CliError::Refused(format!(
            "secret {}: its UserName cannot be used as an account name: {e}",
            meta.name
        ))
    })?;
    Ok(user)
}
