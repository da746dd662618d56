//! `kmsbastion check`: is this jump host ready? The configuration loads, KMS answers with our
//! credentials, every host account's secret exists and belongs to its host (DescribeSecret
//! only, never a value), and every host's sshd still offers a pinned host key.
#![forbid(unsafe_code)]

use super::catalog::SecretCatalog;
use super::keyscan::{compare, parse_scan, HostKeyScanner};
use super::output::{print_json, Progress};
use super::{Cli, CliError, Outcome};
use crate::config::{Config, Host, HostAccount};
use crate::kms::{KmsClient, KmsError, KmsErrorKind};

/// The verdict on one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub status: Status,
    /// What was checked: `config`, `kms`, `root@web-01`, `host web-01`.
    pub subject: String,
    pub detail: String,
    pub data: serde_json::Value,
}

impl Finding {
    fn new(status: Status, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            subject: subject.into(),
            detail: detail.into(),
            data: serde_json::Value::Null,
        }
    }
}

/// `kmsbastion check`.
pub fn run(
    cli: &Cli,
    host_keys: bool,
    json: bool,
    scanner: &dyn HostKeyScanner,
) -> Result<Outcome, CliError> {
    let cfg = Config::load(&cli.config)?;
    let mut findings = Vec::new();
    let accounts: usize = cfg.hosts.iter().map(|h| h.accounts.len()).sum();
    findings.push(Finding::new(
        Status::Ok,
        "config",
        format!(
            "{} loads: {} host(s), {} account(s), {} engineer(s), {} grant(s)",
            cli.config.display(),
            cfg.hosts.len(),
            accounts,
            cfg.engineers.len(),
            cfg.grants.len()
        ),
    ));
    for w in cfg.warnings() {
        findings.push(Finding::new(Status::Warn, "config", w.to_string()));
    }
    findings.push(match super::index::status(&cli.config) {
        Ok(line) => Finding::new(Status::Ok, "index", line),
        Err(line) => Finding::new(Status::Warn, "index", line),
    });

    let kms_down: Option<KmsError> = match KmsClient::from_settings(&cfg.kms) {
        Err(e) => {
            findings.push(Finding::new(
                Status::Fail,
                "kms",
                format!("cannot set up the KMS client: {e}"),
            ));
            Some(e)
        }
        Ok(kms) => {
            findings.push(Finding::new(
                Status::Ok,
                "kms",
                format!("endpoint {}, credentials resolved", kms.endpoint().url),
            ));
            check_secrets(&cfg, &kms, &mut findings)
        }
    };

    if host_keys {
        let mut progress = Progress::new();
        for (i, host) in cfg.hosts.iter().enumerate() {
            progress.step(i + 1, cfg.hosts.len(), &format!("scanning {}", host.name));
            findings.push(check_host_key(host, scanner));
        }
    }

    let fails = findings.iter().filter(|f| f.status == Status::Fail).count();
    let warns = findings.iter().filter(|f| f.status == Status::Warn).count();
    if json {
        print_json(&serde_json::json!({
            "config": cli.config,
            "ok": fails == 0,
            "failures": fails,
            "warnings": warns,
            "findings": findings.iter().map(|f| serde_json::json!({
                "status": f.status.label().to_lowercase(),
                "subject": f.subject,
                "detail": f.detail,
                "data": f.data,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for f in &findings {
            println!("{:<4}  {}: {}", f.status.label(), f.subject, f.detail);
        }
        println!("check: {} failure(s), {} warning(s)", fails, warns);
    }
    if let Some(e) = kms_down {
        return Err(CliError::kms("cannot check the secrets", e));
    }
    Ok(if fails == 0 {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

/// DescribeSecret for every host account. Returns the error when KMS itself is unusable
/// (credentials, reachability, permissions): then every secret check would say the same.
fn check_secrets(cfg: &Config, kms: &KmsClient, findings: &mut Vec<Finding>) -> Option<KmsError> {
    let all: Vec<(&Host, &HostAccount)> = cfg
        .hosts
        .iter()
        .flat_map(|h| h.accounts.iter().map(move |a| (h, a)))
        .collect();
    if all.is_empty() {
        // Nothing to describe: prove KMS answers with a listing instead.
        return match kms.list_ecs() {
            Ok(names) => {
                findings.push(Finding::new(
                    Status::Ok,
                    "kms",
                    format!(
                        "reachable; {} ECS secret(s) listed, no host accounts configured yet",
                        names.len()
                    ),
                ));
                None
            }
            Err(e) => {
                findings.push(Finding::new(
                    Status::Fail,
                    "kms",
                    format!("ListSecrets: {e}"),
                ));
                Some(e)
            }
        };
    }
    let mut progress = Progress::new();
    for (i, (host, account)) in all.iter().enumerate() {
        let subject = format!("{}@{}", account.name, host.name);
        progress.step(i + 1, all.len(), &format!("describing {}", account.secret));
        match kms.describe(&account.secret) {
            Ok(meta) => {
                let mut status = Status::Ok;
                let mut notes = Vec::new();
                if meta.pending_deletion() {
                    status = Status::Fail;
                    notes.push(format!(
                        "pending deletion (planned {}): logins fail; restore it in KMS or import another secret",
                        meta.planned_delete_time.as_deref().unwrap_or("?")
                    ));
                }
                match meta.secret_type.as_str() {
                    "ECS" => {
                        if let (Some(theirs), Some(ours)) = (&meta.instance_id, &host.instance_id) {
                            if theirs != ours {
                                status = Status::Fail;
                                notes.push(format!("belongs to instance {theirs}, not {ours}"));
                            }
                        }
                    }
                    "Generic" => {}
                    other => {
                        status = Status::Fail;
                        notes.push(format!("type {other} does not hold host credentials"));
                    }
                }
                if meta.automatic_rotation.as_deref() == Some("Invalid") {
                    if status == Status::Ok {
                        status = Status::Warn;
                    }
                    notes.push("rotation is in an abnormal state (Invalid): check the last rotation in KMS".into());
                }
                let mut detail = format!(
                    "{} ({}{}), rotation {}",
                    account.secret,
                    meta.secret_type,
                    meta.subtype.as_deref().map(|s| format!("/{s}")).unwrap_or_default(),
                    meta.rotation_summary()
                );
                if let Some(next) = &meta.next_rotation_date {
                    detail.push_str(&format!(", next {next}"));
                }
                for n in notes {
                    detail.push_str("; ");
                    detail.push_str(&n);
                }
                let mut f = Finding::new(status, subject, detail);
                f.data = serde_json::json!({
                    "secret": account.secret,
                    "type": meta.secret_type,
                    "subtype": meta.subtype,
                    "instance_id": meta.instance_id,
                    "automatic_rotation": meta.automatic_rotation,
                    "rotation_interval": meta.rotation_interval,
                    "next_rotation_date": meta.next_rotation_date,
                    "planned_delete_time": meta.planned_delete_time,
                });
                findings.push(f);
            }
            Err(e) if e.kind == KmsErrorKind::NotFound => findings.push(Finding::new(
                Status::Fail,
                subject,
                format!(
                    "its secret {} no longer exists in KMS: logins fail; ask the secret administrator or import another secret",
                    account.secret
                ),
            )),
            Err(e) if e.kind == KmsErrorKind::PendingDeletion => findings.push(Finding::new(
                Status::Fail,
                subject,
                format!("its secret {} is pending deletion: logins fail; restore it in KMS", account.secret),
            )),
            Err(e) => {
                findings.push(Finding::new(Status::Fail, subject, format!("DescribeSecret {}: {e}", account.secret)));
                return Some(e);
            }
        }
    }
    None
}

/// Scans `host` and compares with its pins.
fn check_host_key(host: &Host, scanner: &dyn HostKeyScanner) -> Finding {
    let subject = format!("host {}", host.name);
    if host.host_keys.is_empty() {
        return Finding::new(
            Status::Fail,
            subject,
            format!(
                "no pinned host key: onward connections are refused; run `kmsbastion keyscan {}`",
                host.name
            ),
        );
    }
    let scanned = match scanner
        .scan(&host.address, host.port)
        .and_then(|raw| parse_scan(&raw))
    {
        Ok(k) => k,
        Err(e) => {
            return Finding::new(
                Status::Fail,
                subject,
                format!(
                    "cannot fetch its host keys ({} port {}): {e}",
                    host.address, host.port
                ),
            )
        }
    };
    let cmp = compare(&host.host_keys, &scanned);
    let offered: Vec<String> = scanned.iter().map(|k| k.fingerprint.clone()).collect();
    let mut f = if !cmp.trusted() {
        Finding::new(
            Status::Fail,
            subject,
            format!(
                "host key of {} changed: none of the offered keys ({}) is pinned; confirm out of band, then `kmsbastion keyscan {}`",
                host.name,
                offered.join(", "),
                host.name
            ),
        )
    } else if !cmp.unchanged() {
        Finding::new(
            Status::Warn,
            subject,
            format!(
                "pinned key matches ({}); {} offered key(s) not pinned, {} pinned key(s) not offered",
                cmp.matching.iter().map(|k| k.fingerprint.as_str()).collect::<Vec<_>>().join(", "),
                cmp.new.len(),
                cmp.gone.len()
            ),
        )
    } else {
        Finding::new(
            Status::Ok,
            subject,
            format!(
                "{} port {}: host key pinned ({})",
                host.address,
                host.port,
                offered.join(", ")
            ),
        )
    };
    f.data = serde_json::json!({"address": host.address, "port": host.port, "offered": offered});
    f
}
