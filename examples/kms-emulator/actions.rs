//! The secrets API: one function per action, each decoding its parameters, calling the
//! state machine and shaping the response exactly as KMS does (field names, POP list
//! nesting `{"VersionStage":[...]}`, integers for paging fields; `kms-api.md` §3).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use kmsbastion::kms::utc;

use crate::error::ApiError;
use crate::rotation;
use crate::server::Emulator;
use crate::state::{self, NewSecret, RotationStart, Secret, SecretType, Version};

/// The actions this emulator serves.
pub const ACTIONS: &[&str] = &[
    "CreateSecret",
    "GetSecretValue",
    "ListSecrets",
    "DescribeSecret",
    "PutSecretValue",
    "UpdateSecretVersionStage",
    "ListSecretVersionIds",
    "RotateSecret",
    "UpdateSecretRotationPolicy",
    "DeleteSecret",
    "RestoreSecret",
];

/// The API version every action belongs to.
pub const API_VERSION: &str = "2016-01-20";

/// Decoded request parameters (query and form body merged).
pub struct Params<'a>(pub &'a BTreeMap<String, String>);

impl Params<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn required(&self, k: &str) -> Result<&str, ApiError> {
        self.get(k).ok_or_else(|| ApiError::missing(k))
    }

    /// Booleans: the Python SDK sends `True`/`False`, others `true`/`false`.
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid(format!("{k} {v:?}: true or false"))),
        }
    }

    fn int(&self, k: &str, default: u64, min: u64, max: u64) -> Result<u64, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(default);
        };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "{k} {v:?}: an integer from {min} to {max}"
            ))),
        }
    }
}

/// Response fields (everything but `RequestId`, which the server adds).
pub type Fields = Map<String, Value>;

fn time(secs: u64) -> Value {
    Value::String(utc::format(UNIX_EPOCH + Duration::from_secs(secs)))
}

fn stages(v: &Version) -> Value {
    json!({ "VersionStage": v.stages })
}

fn tags(s: &Secret) -> Value {
    json!({ "Tag": s.tags })
}

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Rotation fields of a rotatable (non-Generic) secret, as GetSecretValue, DescribeSecret
/// and CreateSecret show them.
fn rotation_fields(s: &Secret, out: &mut Fields) {
    if s.secret_type == SecretType::Generic {
        return;
    }
    let status = if s.rotation_enabled {
        "Enabled"
    } else {
        "Disabled"
    };
    out.insert("AutomaticRotation".into(), status.into());
    if s.rotation_enabled {
        if let Some(i) = s.rotation_interval {
            out.insert("RotationInterval".into(), format!("{i}s").into());
        }
        if let Some(t) = s.next_rotation() {
            out.insert("NextRotationDate".into(), time(t));
        }
    }
    if let Some(t) = s.last_rotation {
        out.insert("LastRotationDate".into(), time(t));
    }
}

fn extended_config_field(s: &Secret) -> Option<Value> {
    s.extended_config
        .as_ref()
        .map(|c| Value::String(Value::Object(c.clone()).to_string()))
}

/// Runs one action. `action` is one of [`ACTIONS`].
pub fn dispatch(emu: &Emulator, action: &str, p: &Params<'_>) -> Result<Fields, ApiError> {
    match action {
        "CreateSecret" => create_secret(emu, p),
        "GetSecretValue" => get_secret_value(emu, p),
        "ListSecrets" => list_secrets(emu, p),
        "DescribeSecret" => describe_secret(emu, p),
        "PutSecretValue" => put_secret_value(emu, p),
        "UpdateSecretVersionStage" => update_secret_version_stage(emu, p),
        "ListSecretVersionIds" => list_secret_version_ids(emu, p),
        "RotateSecret" => rotate_secret(emu, p),
        "UpdateSecretRotationPolicy" => update_secret_rotation_policy(emu, p),
        "DeleteSecret" => delete_secret(emu, p),
        "RestoreSecret" => restore_secret(emu, p),
        other => Err(ApiError::new(
            404,
            "InvalidAction.NotFound",
            format!("Specified api is not found, please check your url and method. ({other})"),
        )),
    }
}

fn create_secret(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let secret_type = p.get("SecretType").map(SecretType::parse).transpose()?;
    let extended_config = match (secret_type, p.get("ExtendedConfig")) {
        (Some(SecretType::Ecs), Some(json)) => match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => Some(m),
            _ => return Err(ApiError::invalid("ExtendedConfig must be a JSON object")),
        },
        // Ignored for Generic secrets, as KMS documents.
        _ => None,
    };
    let rotation_interval = p
        .get("RotationInterval")
        .map(state::parse_interval)
        .transpose()?;
    let new = NewSecret {
        name: p.required("SecretName")?.to_owned(),
        version_id: p.required("VersionId")?.to_owned(),
        data: p.required("SecretData")?.to_owned(),
        data_type: p.get("SecretDataType").map(str::to_owned),
        secret_type,
        extended_config,
        rotation_enabled: p.bool("EnableAutomaticRotation")?.unwrap_or(false),
        rotation_interval,
        description: p.get("Description").unwrap_or_default().to_owned(),
        tags: p
            .get("Tags")
            .map(state::parse_tags)
            .transpose()?
            .unwrap_or_default(),
        encryption_key_id: p.get("EncryptionKeyId").map(str::to_owned),
        dkms_instance_id: p.get("DKMSInstanceId").map(str::to_owned),
    };
    emu.mutate(|st, now| {
        let s = st.create(new, now, emu.region())?;
        let mut out = fields(json!({
            "Arn": emu.arn(&s.name),
            "SecretName": s.name,
            "SecretType": s.secret_type.as_str(),
            "VersionId": s.versions.first().map(|v| v.id.clone()),
        }));
        rotation_fields(s, &mut out);
        if let Some(c) = extended_config_field(s) {
            out.insert("ExtendedConfig".into(), c);
        }
        if let Some(id) = &s.dkms_instance_id {
            out.insert("DKMSInstanceId".into(), id.clone().into());
        }
        Ok(out)
    })
}

fn get_secret_value(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let fetch_config = p.bool("FetchExtendedConfig")?.unwrap_or(false);
    if p.bool("DryRun")? == Some(true) {
        return Err(ApiError::new(
            400,
            "DryRunOperationError",
            "Request would have succeeded, but the DryRun parameter was set.",
        ));
    }
    emu.read(|st, now| {
        let (s, v) = st.get_value(name, p.get("VersionId"), p.get("VersionStage"), now)?;
        let mut out = fields(json!({
            "SecretName": s.name,
            "VersionId": v.id,
            "SecretData": v.data,
            "SecretDataType": v.data_type,
            "SecretType": s.secret_type.as_str(),
            "VersionStages": stages(v),
            "CreateTime": time(v.created),
        }));
        rotation_fields(s, &mut out);
        if fetch_config {
            if let Some(c) = extended_config_field(s) {
                out.insert("ExtendedConfig".into(), c);
            }
        }
        Ok(out)
    })
}

fn list_secrets(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let fetch_tags = p.bool("FetchTags")?.unwrap_or(false);
    let page = p.int("PageNumber", 1, 1, u64::from(u32::MAX))?;
    let size = p.int("PageSize", 10, 1, 100)?;
    let filters = p
        .get("Filters")
        .map(state::parse_filters)
        .transpose()?
        .unwrap_or_default();
    emu.read(|st, now| {
        let all = st.list(&filters, now);
        let total = all.len();
        let skip = usize::try_from((page - 1).saturating_mul(size)).unwrap_or(usize::MAX);
        let take = usize::try_from(size).unwrap_or(usize::MAX);
        let list: Vec<Value> = all
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|s| {
                let mut item = fields(json!({
                    "SecretName": s.name,
                    "SecretType": s.secret_type.as_str(),
                    "CreateTime": time(s.created),
                    "UpdateTime": time(s.updated),
                }));
                if let Some(t) = s.planned_delete {
                    item.insert("PlannedDeleteTime".into(), time(t));
                }
                if fetch_tags {
                    item.insert("Tags".into(), tags(s));
                }
                Value::Object(item)
            })
            .collect();
        Ok(fields(json!({
            "PageNumber": page,
            "PageSize": size,
            "TotalCount": total,
            "SecretList": { "Secret": list },
        })))
    })
}

fn describe_secret(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let fetch_tags = p.bool("FetchTags")?.unwrap_or(false);
    emu.read(|st, now| {
        let s: &Secret = st.find(name, now)?;
        let mut out = fields(json!({
            "Arn": emu.arn(&s.name),
            "SecretName": s.name,
            "SecretType": s.secret_type.as_str(),
            "Description": s.description,
            "CreateTime": time(s.created),
            "UpdateTime": time(s.updated),
        }));
        if let Some(k) = &s.encryption_key_id {
            out.insert("EncryptionKeyId".into(), k.clone().into());
        }
        if let Some(k) = &s.dkms_instance_id {
            out.insert("DKMSInstanceId".into(), k.clone().into());
        }
        if let Some(t) = s.planned_delete {
            out.insert("PlannedDeleteTime".into(), time(t));
        }
        rotation_fields(s, &mut out);
        if let Some(c) = extended_config_field(s) {
            out.insert("ExtendedConfig".into(), c);
        }
        if fetch_tags {
            out.insert("Tags".into(), tags(s));
        }
        Ok(out)
    })
}

/// `VersionStages` of PutSecretValue: a JSON array `["ACSCurrent","x"]` (what current
/// clients send) or the older `{"VersionStage":[...]}` shape.
fn parse_version_stages(json: &str) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("VersionStages must be a JSON array of stage names");
    let v: Value = serde_json::from_str(json).map_err(|_| bad())?;
    let list = match &v {
        Value::Array(a) => a,
        Value::Object(m) => match m.get("VersionStage") {
            Some(Value::Array(a)) => a,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    list.iter()
        .map(|s| s.as_str().map(str::to_owned).ok_or_else(bad))
        .collect()
}

fn put_secret_value(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let version_id = p.required("VersionId")?;
    let data = p.required("SecretData")?.to_owned();
    let stages_in = p
        .get("VersionStages")
        .map(parse_version_stages)
        .transpose()?;
    emu.mutate(|st, now| {
        let stages = st.put_value(
            name,
            version_id,
            data,
            p.get("SecretDataType"),
            stages_in,
            now,
        )?;
        Ok(fields(json!({
            "SecretName": state::normalize_name(name),
            "VersionId": version_id,
            "VersionStages": { "VersionStage": stages },
        })))
    })
}

fn update_secret_version_stage(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let stage = p.required("VersionStage")?;
    emu.mutate(|st, now| {
        st.update_stage(
            name,
            stage,
            p.get("MoveToVersion"),
            p.get("RemoveFromVersion"),
            now,
        )?;
        Ok(fields(json!({ "SecretName": state::normalize_name(name) })))
    })
}

fn list_secret_version_ids(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let include = p.bool("IncludeDeprecated")?.unwrap_or(false);
    let page = p.int("PageNumber", 1, 1, u64::from(u32::MAX))?;
    let size = p.int("PageSize", 20, 1, 100)?;
    emu.read(|st, now| {
        let (s, versions) = st.list_versions(name, include, now)?;
        let total = versions.len();
        let skip = usize::try_from((page - 1).saturating_mul(size)).unwrap_or(usize::MAX);
        let take = usize::try_from(size).unwrap_or(usize::MAX);
        let list: Vec<Value> = versions
            .into_iter()
            .skip(skip)
            .take(take)
            .map(|v| {
                json!({
                    "VersionId": v.id,
                    "CreateTime": time(v.created),
                    "VersionStages": stages(v),
                })
            })
            .collect();
        Ok(fields(json!({
            "SecretName": s.name,
            "TotalCount": total,
            "PageNumber": page,
            "PageSize": size,
            "VersionIds": { "VersionId": list },
        })))
    })
}

fn rotate_secret(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = state::normalize_name(p.required("SecretName")?).to_owned();
    let version_id = p.required("VersionId")?.to_owned();
    let start = emu.read(|st, now| st.start_rotation(&name, &version_id, now))?;
    if let RotationStart::Plan(plan) = start {
        // Outside the store lock: key generation and the hook may take a while.
        let data = rotation::new_secret_data(&plan).map_err(ApiError::internal)?;
        if let Some(hook) = emu.rotation_hook() {
            if let Err(e) = rotation::run_hook(hook, &plan, &data) {
                eprintln!("kms-emulator: rotation of {name} to {version_id} refused: {e}");
                return Err(ApiError::rotation_failed(e));
            }
        }
        emu.mutate(|st, now| st.commit_rotation(&plan, data, now))?;
        eprintln!("kms-emulator: rotated {name}: {version_id} is ACSCurrent");
    }
    Ok(fields(json!({
        "Arn": emu.arn(&name),
        "SecretName": name,
        "VersionId": version_id,
    })))
}

fn update_secret_rotation_policy(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let enabled = p
        .bool("EnableAutomaticRotation")?
        .ok_or_else(|| ApiError::missing("EnableAutomaticRotation"))?;
    let interval = if enabled {
        p.get("RotationInterval")
            .map(state::parse_interval)
            .transpose()?
    } else {
        None
    };
    emu.mutate(|st, now| {
        st.update_rotation_policy(name, enabled, interval, now)?;
        Ok(fields(json!({ "SecretName": state::normalize_name(name) })))
    })
}

fn delete_secret(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    let force = p.bool("ForceDeleteWithoutRecovery")?.unwrap_or(false);
    let window = match p.get("RecoveryWindowInDays") {
        Some(_) => Some(p.int("RecoveryWindowInDays", 0, 0, u64::from(u32::MAX))?),
        None => None,
    };
    emu.mutate(|st, now| {
        let planned = st.delete(name, window, force, now)?;
        Ok(fields(json!({
            "SecretName": state::normalize_name(name),
            "PlannedDeleteTime": time(planned),
        })))
    })
}

fn restore_secret(emu: &Emulator, p: &Params<'_>) -> Result<Fields, ApiError> {
    let name = p.required("SecretName")?;
    emu.mutate(|st, now| {
        let name = st.restore(name, now)?;
        Ok(fields(json!({ "SecretName": name })))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_stages_accept_both_shapes() {
        assert_eq!(
            parse_version_stages(r#"["ACSCurrent","x"]"#).unwrap(),
            ["ACSCurrent", "x"]
        );
        assert_eq!(
            parse_version_stages(r#"{"VersionStage":["ACSCurrent"]}"#).unwrap(),
            ["ACSCurrent"]
        );
        assert!(parse_version_stages("ACSCurrent").is_err());
        assert!(parse_version_stages("[1]").is_err());
    }

    #[test]
    fn booleans_and_integers() {
        let mut m = BTreeMap::new();
        m.insert("A".to_owned(), "True".to_owned());
        m.insert("B".to_owned(), "false".to_owned());
        m.insert("C".to_owned(), "yes".to_owned());
        m.insert("N".to_owned(), "101".to_owned());
        let p = Params(&m);
        assert_eq!(p.bool("A").unwrap(), Some(true));
        assert_eq!(p.bool("B").unwrap(), Some(false));
        assert!(p.bool("C").is_err());
        assert_eq!(p.bool("Z").unwrap(), None);
        assert!(p.int("N", 10, 1, 100).is_err());
        assert_eq!(p.int("Z", 10, 1, 100).unwrap(), 10);
        assert_eq!(p.required("Z").unwrap_err().code, "MissingParameter");
    }
}
