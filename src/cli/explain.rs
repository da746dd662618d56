//! `kmsbastion explain LOGIN [--from ADDR] [--at TIME]`: every decision a login would pass, in
//! the order sshd and kmsbastion take them, and the first one that refuses it.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::time::SystemTime;

use super::catalog::SecretCatalog;
use super::keyscan::parse_key;
use super::output::print_json;
use super::{kms_client, load_config_quiet, Cli, CliError, Outcome};
use crate::config::{format_rfc3339_utc, parse_rfc3339_utc, Config};
use crate::grant::{self, Decision};
use crate::kms::KmsErrorKind;
use crate::login::{Login, LoginString};

/// One decision.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    /// `None`: not evaluated (skipped).
    pub passed: Option<bool>,
    pub detail: String,
}

impl Step {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: Some(true),
            detail: detail.into(),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: Some(false),
            detail: detail.into(),
        }
    }
    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: None,
            detail: detail.into(),
        }
    }
}

/// `kmsbastion explain`.
pub fn run(
    cli: &Cli,
    login: &str,
    from: Option<IpAddr>,
    at: Option<&str>,
    offline: bool,
    json: bool,
) -> Result<Outcome, CliError> {
    let cfg = load_config_quiet(cli)?;
    let now = match at {
        Some(t) => parse_rfc3339_utc(t).map_err(|e| {
            CliError::Usage(format!(
                "--at {t:?}: {e} (use RFC 3339 UTC, e.g. 2026-07-01T09:00:00Z)"
            ))
        })?,
        None => SystemTime::now(),
    };
    let mut steps = Vec::new();
    let mut engineer_sees = None;
    let parsed = Login::parse(login);
    match parsed {
        Err(e) => {
            steps.push(Step::fail(
                "login string",
                format!("{login:?} is not a valid login: {e}; sshd finds no such user"),
            ));
            engineer_sees = Some("Permission denied (publickey).".to_string());
        }
        Ok(Login::Plain(engineer)) => plain(&cfg, &engineer, from, now, &mut steps),
        Ok(Login::Composite(ls)) => {
            steps.push(Step::pass(
                "login string",
                format!(
                    "engineer {}, account {}, host {}",
                    ls.engineer, ls.account, ls.host
                ),
            ));
            engineer_sees = composite(&cfg, &ls, from, now, offline, &mut steps)?;
        }
    }

    let refused_at = steps.iter().position(|s| s.passed == Some(false));
    if json {
        print_json(&serde_json::json!({
            "login": login,
            "from": from.map(|a| a.to_string()),
            "at": format_rfc3339_utc(now),
            "allowed": refused_at.is_none(),
            "refused_by": refused_at.and_then(|i| steps.get(i)).map(|s| s.name),
            "engineer_sees": if refused_at.is_some() { engineer_sees.clone() } else { None },
            "steps": steps.iter().map(|s| serde_json::json!({
                "step": s.name,
                "result": match s.passed { Some(true) => "pass", Some(false) => "fail", None => "skipped" },
                "detail": s.detail,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "explain {login} from {} at {}:",
            from.map_or("an unknown address".to_string(), |a| a.to_string()),
            format_rfc3339_utc(now)
        );
        for (i, s) in steps.iter().enumerate() {
            let mark = match s.passed {
                Some(true) => "ok",
                Some(false) => "FAIL",
                None => "skip",
            };
            println!("  {}. {:<4}  {:<13} {}", i + 1, mark, s.name, s.detail);
        }
        match refused_at.and_then(|i| steps.get(i).map(|s| (i, s))) {
            None => println!("result: allowed"),
            Some((i, s)) => {
                println!("result: refused at step {} ({})", i + 1, s.name);
                if let Some(msg) = &engineer_sees {
                    println!("the engineer sees: {msg}");
                }
            }
        }
    }
    Ok(if refused_at.is_none() {
        Outcome::Ok
    } else {
        Outcome::Findings
    })
}

/// A plain `alice` login: the listing of what alice may reach.
fn plain(
    cfg: &Config,
    engineer: &str,
    from: Option<IpAddr>,
    now: SystemTime,
    steps: &mut Vec<Step>,
) {
    let Some(e) = cfg.engineer(engineer) else {
        steps.push(Step::fail(
            "login string",
            format!("no engineer {engineer:?}: sshd finds no such user"),
        ));
        return;
    };
    steps.push(Step::pass(
        "login string",
        format!(
            "plain login of engineer {}: lists what {} may reach",
            e.name, e.name
        ),
    ));
    let reach = grant::reachable(cfg, engineer, from, now);
    if reach.is_empty() {
        steps.push(Step::pass("reachable", "nothing (the listing is empty)"));
    } else {
        let list: Vec<String> = reach
            .iter()
            .map(|(a, h)| format!("{e}@{a}@{h}", e = e.name))
            .collect();
        steps.push(Step::pass("reachable", list.join(", ")));
    }
}

/// A composite login: NSS, keys, grant, secret, host key. Returns what the engineer would see
/// at the first refusal.
fn composite(
    cfg: &Config,
    ls: &LoginString,
    from: Option<IpAddr>,
    now: SystemTime,
    offline: bool,
    steps: &mut Vec<Step>,
) -> Result<Option<String>, CliError> {
    let denied_pubkey = Some("Permission denied (publickey).".to_string());
    // 1. NSS: the entry exists when engineer, host and account are all known.
    let engineer = cfg.engineer(&ls.engineer);
    let target = cfg.account(&ls.host, &ls.account);
    let (Some(engineer), Some((host, account))) = (engineer, target) else {
        let why = if engineer.is_none() {
            format!("no engineer {:?}", ls.engineer)
        } else if cfg.host(&ls.host).is_none() {
            format!("no host {:?}", ls.host)
        } else {
            format!("host {} has no account {:?}", ls.host, ls.account)
        };
        steps.push(Step::fail(
            "NSS entry",
            format!("{why}: sshd finds no such user"),
        ));
        return Ok(denied_pubkey);
    };
    // What the NSS module serves for this name (the same function it calls).
    match crate::passwd::passwd_by_name(cfg, &ls.to_string()) {
        Some(p) => steps.push(Step::pass(
            "NSS entry",
            format!(
                "{}:{}:{}:{}:{}:{}:{}",
                p.name, p.passwd, p.uid, p.gid, p.gecos, p.dir, p.shell
            ),
        )),
        None => {
            steps.push(Step::fail(
                "NSS entry",
                "the NSS module serves no entry for this name",
            ));
            return Ok(denied_pubkey);
        }
    }

    // 2. AuthorizedKeysCommand: the engineer's keys with the restrictions of the live rules.
    let restrictions = grant::key_restrictions(cfg, ls, now);
    let mut first_refusal: Option<String> = None;
    if restrictions.is_empty() || engineer.keys.is_empty() {
        let why = if engineer.keys.is_empty() {
            format!("engineer {} has no keys configured", engineer.name)
        } else {
            "no grant allows this login at this time: no keys offered".to_string()
        };
        steps.push(Step::fail("keys (AKC)", why));
        first_refusal = denied_pubkey.clone();
    } else if let Some(ip) = from.filter(|ip| {
        !restrictions
            .iter()
            .any(|r| r.from.is_empty() || grant::source_allowed(&r.from, *ip))
    }) {
        let nets: Vec<String> = restrictions
            .iter()
            .flat_map(|r| r.from.iter().map(ToString::to_string))
            .collect();
        steps.push(Step::fail(
            "keys (AKC)",
            format!(
                "keys are offered only with from=\"{}\": sshd refuses them from {ip}",
                nets.join(",")
            ),
        ));
        first_refusal = denied_pubkey.clone();
    } else {
        let fps: Vec<String> = engineer
            .keys
            .iter()
            .map(|k| {
                parse_key(k)
                    .map(|p| p.fingerprint)
                    .unwrap_or_else(|_| "?".into())
            })
            .collect();
        let opts: Vec<String> = restrictions
            .iter()
            .map(crate::authorized_keys::options_for)
            .collect();
        steps.push(Step::pass(
            "keys (AKC)",
            format!(
                "{} key(s) [{}] offered with {}",
                fps.len(),
                fps.join(", "),
                opts.join(" | ")
            ),
        ));
    }

    // 3. PAM account: the grant decision with the source address.
    match grant::evaluate(cfg, ls, from, now) {
        Decision::Allow { rule, not_after } => steps.push(Step::pass(
            "grant (PAM)",
            format!(
                "allowed by grant #{rule} (line {}){}",
                cfg.grants.get(rule).map_or(0, |g| g.line),
                not_after.map_or(String::new(), |t| format!(
                    " until {}",
                    format_rfc3339_utc(t)
                ))
            ),
        )),
        Decision::Deny(reason) => {
            steps.push(Step::fail("grant (PAM)", reason.to_string()));
            if first_refusal.is_none() {
                first_refusal = Some(reason.engineer_message().to_string());
            }
        }
    }

    // 4. The secret's metadata (DescribeSecret: never the value).
    if offline {
        steps.push(Step::skip(
            "secret",
            format!("{} (not asked: --offline)", account.secret),
        ));
    } else {
        let kms = kms_client(cfg)?;
        match kms.describe(&account.secret) {
            Ok(meta) if meta.pending_deletion() => {
                steps.push(Step::fail(
                    "secret",
                    format!(
                        "{} is pending deletion (planned {})",
                        account.secret,
                        meta.planned_delete_time.as_deref().unwrap_or("?")
                    ),
                ));
                first_refusal.get_or_insert_with(|| gone_message(ls, &account.secret));
            }
            Ok(meta) => steps.push(Step::pass(
                "secret",
                format!(
                    "{} exists ({}{}), rotation {}",
                    account.secret,
                    meta.secret_type,
                    meta.subtype
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    meta.rotation_summary()
                ),
            )),
            Err(e)
                if matches!(
                    e.kind,
                    KmsErrorKind::NotFound | KmsErrorKind::PendingDeletion
                ) =>
            {
                steps.push(Step::fail(
                    "secret",
                    format!("{} no longer exists in KMS ({e})", account.secret),
                ));
                first_refusal.get_or_insert_with(|| gone_message(ls, &account.secret));
            }
            Err(e) => {
                return Err(CliError::kms(
                    format!("DescribeSecret {}", account.secret),
                    e,
                ))
            }
        }
    }

    // 5. The target's host key must be pinned for the onward ssh.
    if host.host_keys.is_empty() {
        steps.push(Step::fail(
            "host key",
            format!(
                "{} has no pinned host key; run `kmsbastion keyscan {}`",
                host.name, host.name
            ),
        ));
        first_refusal.get_or_insert_with(|| format!("host key of {} changed; refusing", host.name));
    } else {
        steps.push(Step::pass(
            "host key",
            format!("{} key(s) pinned for {}", host.host_keys.len(), host.name),
        ));
    }
    Ok(first_refusal)
}

fn gone_message(ls: &LoginString, secret: &str) -> String {
    format!(
        "{}@{}: its secret {secret} no longer exists in KMS; ask your secret administrator",
        ls.account, ls.host
    )
}
