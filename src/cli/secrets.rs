//! `kmsbastion secrets list [--host H | --instance-id ID]`: the ECS secrets KMS holds, with
//! their instance, rotation and whether the configuration already imports them.
#![forbid(unsafe_code)]

use super::catalog::{SecretCatalog, SecretMeta};
use super::output::{print_json, table, Progress};
use super::{find_host, kms_client, load_config_quiet, Cli, CliError, Outcome};
use crate::config::Config;
use crate::kms::KmsErrorKind;

/// `kmsbastion secrets list`.
pub fn list(
    cli: &Cli,
    host: Option<&str>,
    instance_id: Option<&str>,
    json: bool,
) -> Result<Outcome, CliError> {
    let cfg = load_config_quiet(cli)?;
    let instance = match host {
        Some(name) => {
            let h = find_host(&cfg, name)?;
            Some(h.instance_id.clone().ok_or_else(|| {
                CliError::Usage(format!(
                    "host {name} has no instance_id in {}; set it, or use --instance-id",
                    cfg.origin().display()
                ))
            })?)
        }
        None => instance_id.map(str::to_string),
    };
    let kms = kms_client(&cfg)?;
    let secrets = collect(&kms, instance.as_deref())?;
    print_listing(&cfg, &secrets, json);
    Ok(Outcome::Ok)
}

/// Lists and describes the ECS secrets, keeping those of `instance` when given.
pub fn collect(
    kms: &dyn SecretCatalog,
    instance: Option<&str>,
) -> Result<Vec<SecretMeta>, CliError> {
    let names = kms
        .list_ecs()
        .map_err(|e| CliError::kms("ListSecrets", e))?;
    let mut progress = Progress::new();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        progress.step(i + 1, names.len(), &format!("describing {name}"));
        match kms.describe(name) {
            Ok(meta) => {
                if instance.is_none() || meta.instance_id.as_deref() == instance {
                    out.push(meta);
                }
            }
            Err(e) if e.kind == KmsErrorKind::NotFound => continue,
            Err(e) => return Err(CliError::kms(format!("DescribeSecret {name}"), e)),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `account@host` entries of the configuration that use `secret`.
fn imported_as(cfg: &Config, secret: &str) -> Vec<String> {
    cfg.hosts
        .iter()
        .flat_map(|h| {
            h.accounts
                .iter()
                .filter(move |a| a.secret == secret)
                .map(move |a| format!("{}@{}", a.name, h.name))
        })
        .collect()
}

fn print_listing(cfg: &Config, secrets: &[SecretMeta], json: bool) {
    if json {
        print_json(&serde_json::Value::Array(
            secrets
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "type": s.secret_type,
                        "instance_id": s.instance_id,
                        "subtype": s.subtype,
                        "automatic_rotation": s.automatic_rotation,
                        "rotation_interval": s.rotation_interval,
                        "next_rotation_date": s.next_rotation_date,
                        "planned_delete_time": s.planned_delete_time,
                        "imported_as": imported_as(cfg, &s.name),
                    })
                })
                .collect(),
        ));
        return;
    }
    if secrets.is_empty() {
        println!("no ECS secrets found");
        return;
    }
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|s| {
            let imported = imported_as(cfg, &s.name);
            vec![
                s.name.clone(),
                s.instance_id.clone().unwrap_or_else(|| "-".into()),
                s.subtype.clone().unwrap_or_else(|| "-".into()),
                s.rotation_summary(),
                s.next_rotation_date.clone().unwrap_or_else(|| "-".into()),
                if s.pending_deletion() {
                    format!(
                        "pending deletion ({})",
                        s.planned_delete_time.as_deref().unwrap_or("?")
                    )
                } else {
                    "active".into()
                },
                if imported.is_empty() {
                    "-".into()
                } else {
                    imported.join(",")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "SECRET",
                "INSTANCE",
                "SUBTYPE",
                "ROTATION",
                "NEXT ROTATION",
                "STATE",
                "IMPORTED AS"
            ],
            &rows
        )
    );
}
