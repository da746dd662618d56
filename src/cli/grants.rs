//! `kmsbastion grants [ENGINEER]`: who may reach what, through which rule, from where, when.
#![forbid(unsafe_code)]

use std::time::SystemTime;

use super::output::{print_json, table};
use super::{load_config_quiet, Cli, CliError, Outcome};
use crate::config::{format_rfc3339_utc, Config, Engineer, GrantRule};

/// One engineer → account@host pair allowed by one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub engineer: String,
    /// `account@host`, or empty for an engineer without grants.
    pub target: String,
    /// 0-based rule index.
    pub rule: Option<usize>,
    /// The rule's line in the configuration.
    pub line: Option<usize>,
    /// `engineer` or `group ops`.
    pub via: String,
    /// Source networks, empty for any.
    pub from: Vec<String>,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// `active`, `not yet`, `expired`, or `no grant`.
    pub state: &'static str,
}

/// Every (engineer, account@host, rule) the configuration allows, in file order.
pub fn rows(cfg: &Config, only: Option<&str>, now: SystemTime) -> Vec<GrantRow> {
    let mut out = Vec::new();
    for engineer in cfg
        .engineers
        .iter()
        .filter(|e| only.is_none_or(|o| e.name == o))
    {
        let before = out.len();
        for (i, rule) in cfg.grants.iter().enumerate() {
            if !rule.applies_to(engineer) {
                continue;
            }
            for host in &cfg.hosts {
                for account in &host.accounts {
                    if rule.covers(&account.name, &host.name) {
                        out.push(row(
                            engineer,
                            rule,
                            i,
                            format!("{}@{}", account.name, host.name),
                            now,
                        ));
                    }
                }
            }
        }
        if out.len() == before {
            out.push(GrantRow {
                engineer: engineer.name.clone(),
                target: String::new(),
                rule: None,
                line: None,
                via: String::new(),
                from: Vec::new(),
                not_before: None,
                not_after: None,
                state: "no grant",
            });
        }
    }
    out
}

fn row(
    engineer: &Engineer,
    rule: &GrantRule,
    index: usize,
    target: String,
    now: SystemTime,
) -> GrantRow {
    let via = if rule.engineers.contains(&engineer.name) {
        "engineer".to_string()
    } else {
        let groups: Vec<&str> = rule
            .groups
            .iter()
            .filter(|g| engineer.groups.contains(g))
            .map(String::as_str)
            .collect();
        format!("group {}", groups.join(","))
    };
    let state = match (rule.not_before, rule.not_after) {
        (Some(nb), _) if now < nb => "not yet",
        (_, Some(na)) if now >= na => "expired",
        _ => "active",
    };
    GrantRow {
        engineer: engineer.name.clone(),
        target,
        rule: Some(index),
        line: Some(rule.line),
        via,
        from: rule.from.iter().map(ToString::to_string).collect(),
        not_before: rule.not_before,
        not_after: rule.not_after,
        state,
    }
}

/// `kmsbastion grants [ENGINEER]`.
pub fn run(cli: &Cli, engineer: Option<&str>, json: bool) -> Result<Outcome, CliError> {
    let cfg = load_config_quiet(cli)?;
    if let Some(name) = engineer {
        if cfg.engineer(name).is_none() {
            return Err(CliError::Usage(format!(
                "no engineer {name:?} in {}",
                cfg.origin().display()
            )));
        }
    }
    let rows = rows(&cfg, engineer, SystemTime::now());
    let time = |t: Option<SystemTime>| t.map(format_rfc3339_utc);
    if json {
        print_json(&serde_json::Value::Array(
            rows.iter()
                .map(|r| {
                    serde_json::json!({
                        "engineer": r.engineer,
                        "target": if r.target.is_empty() { None } else { Some(&r.target) },
                        "rule": r.rule,
                        "line": r.line,
                        "via": r.via,
                        "from": r.from,
                        "not_before": time(r.not_before),
                        "not_after": time(r.not_after),
                        "state": r.state,
                    })
                })
                .collect(),
        ));
        return Ok(Outcome::Ok);
    }
    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_string());
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.engineer.clone(),
                if r.target.is_empty() {
                    "-".into()
                } else {
                    r.target.clone()
                },
                r.line.map_or("-".into(), |l| format!("line {l}")),
                if r.via.is_empty() {
                    "-".into()
                } else {
                    r.via.clone()
                },
                if r.rule.is_none() {
                    "-".into()
                } else if r.from.is_empty() {
                    "any".into()
                } else {
                    r.from.join(",")
                },
                dash(time(r.not_before)),
                dash(time(r.not_after)),
                r.state.to_string(),
            ]
        })
        .collect();
    if table_rows.is_empty() {
        println!("no engineers in {}", cfg.origin().display());
    } else {
        print!(
            "{}",
            table(
                &[
                    "ENGINEER",
                    "ACCOUNT@HOST",
                    "RULE",
                    "VIA",
                    "FROM",
                    "NOT BEFORE",
                    "NOT AFTER",
                    "STATE"
                ],
                &table_rows
            )
        );
    }
    Ok(Outcome::Ok)
}
