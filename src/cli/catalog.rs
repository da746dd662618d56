//! The KMS view the admin commands need, in one place: the ECS secret names (ListSecrets),
//! their metadata (DescribeSecret) and, for `import` only, the user name inside a value.
//!
//! [`SecretCatalog`] is implemented for the real [`KmsClient`]; the adapter functions below are
//! the only code that knows the client's response types.
#![forbid(unsafe_code)]

use serde::Deserialize;
use zeroize::Zeroize;

use crate::kms::{KmsClient, KmsError, SecretStage};

/// What DescribeSecret says about one secret (never its value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretMeta {
    /// SecretName.
    pub name: String,
    /// SecretType (`ECS`, `Generic`, …).
    pub secret_type: String,
    /// ExtendedConfig.InstanceId (ECS secrets).
    pub instance_id: Option<String>,
    /// ExtendedConfig.SecretSubType (`Password`, `SSHKey`).
    pub subtype: Option<String>,
    /// `Enabled`, `Disabled`, `Invalid` (or absent for Generic).
    pub automatic_rotation: Option<String>,
    /// e.g. `604800s`.
    pub rotation_interval: Option<String>,
    /// When the next rotation is due.
    pub next_rotation_date: Option<String>,
    /// Set when the secret is pending deletion.
    pub planned_delete_time: Option<String>,
    /// A user name carried in metadata (ExtendedConfig `UserName` or `CustomData.UserName`).
    pub user_name_hint: Option<String>,
}

impl SecretMeta {
    /// Whether the secret is scheduled for deletion.
    pub fn pending_deletion(&self) -> bool {
        self.planned_delete_time
            .as_deref()
            .is_some_and(|t| !t.is_empty())
    }

    /// `Enabled (every 7d, next 2026-…)`, `Disabled`, or `-`.
    pub fn rotation_summary(&self) -> String {
        match self.automatic_rotation.as_deref() {
            Some("Enabled") => {
                let mut s = "on".to_string();
                if let Some(i) = &self.rotation_interval {
                    s.push_str(&format!(" every {}", human_interval(i)));
                }
                s
            }
            Some("Disabled") => "off".to_string(),
            Some(other) => other.to_lowercase(),
            None => "-".to_string(),
        }
    }
}

/// `604800s` → `7d`, `3600s` → `1h`; anything else as is.
pub fn human_interval(i: &str) -> String {
    match i.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()) {
        Some(secs) if secs % 86_400 == 0 => format!("{}d", secs / 86_400),
        Some(secs) if secs % 3_600 == 0 => format!("{}h", secs / 3_600),
        Some(secs) if secs % 60 == 0 => format!("{}m", secs / 60),
        _ => i.to_string(),
    }
}

/// The KMS calls the admin commands make.
pub trait SecretCatalog {
    /// Names of every ECS secret (ListSecrets, SecretType=ECS, all pages).
    fn list_ecs(&self) -> Result<Vec<String>, KmsError>;
    /// DescribeSecret.
    fn describe(&self, name: &str) -> Result<SecretMeta, KmsError>;
    /// The `UserName` inside the ACSCurrent value; nothing else of the value is kept.
    fn user_name(&self, name: &str) -> Result<Option<String>, KmsError>;
}

/// Reads the ExtendedConfig fields we use from whatever form the client hands over (a JSON
/// object, or the JSON string KMS sends).
pub fn extended_fields(
    ext: Option<&serde_json::Value>,
) -> (Option<String>, Option<String>, Option<String>) {
    let parsed;
    let obj = match ext {
        Some(serde_json::Value::String(s)) => {
            parsed = serde_json::from_str::<serde_json::Value>(s).ok();
            parsed.as_ref()
        }
        other => other,
    };
    let get = |k: &str| {
        obj.and_then(|o| o.get(k))
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let user = get("UserName").or_else(|| {
        obj.and_then(|o| o.get("CustomData"))
            .and_then(|c| c.get("UserName"))
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    });
    (get("InstanceId"), get("SecretSubType"), user)
}

/// Only the `UserName` field of an ECS/Generic secret value; every other field is skipped by
/// the parser without being copied.
#[derive(Deserialize)]
struct UserNameOnly {
    #[serde(rename = "UserName")]
    user_name: Option<String>,
}

/// Extracts `UserName` from secret value bytes.
pub fn user_name_of(value: &[u8]) -> Option<String> {
    serde_json::from_slice::<UserNameOnly>(value)
        .ok()
        .and_then(|u| u.user_name)
        .filter(|u| !u.is_empty())
}

impl SecretCatalog for KmsClient {
    fn list_ecs(&self) -> Result<Vec<String>, KmsError> {
        let filters = [crate::kms::Filter::new("SecretType", ["ECS"])];
        Ok(self
            .list_secrets(&filters)?
            .into_iter()
            .map(|s| s.secret_name)
            .collect())
    }

    fn describe(&self, name: &str) -> Result<SecretMeta, KmsError> {
        let d = self.describe_secret(name)?;
        let (instance_id, subtype, user_name_hint) = extended_fields(d.extended_config.as_ref());
        Ok(SecretMeta {
            name: d.secret_name,
            secret_type: d.secret_type,
            instance_id,
            subtype,
            automatic_rotation: d.automatic_rotation,
            rotation_interval: d.rotation_interval,
            next_rotation_date: d.next_rotation_date,
            planned_delete_time: d.planned_delete_time,
            user_name_hint,
        })
    }

    fn user_name(&self, name: &str) -> Result<Option<String>, KmsError> {
        // The value lives in a SecretBytes (zeroized on drop) and goes out of scope at the
        // end of this function; only the user name leaves it.
        let value = self.get_secret_value(name, SecretStage::Current)?;
        let mut user = user_name_of(value.secret_data.expose());
        drop(value);
        if let Some(u) = user.as_mut() {
            if u.len() > 256 {
                u.zeroize();
                return Ok(None);
            }
        }
        Ok(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_extended_config_as_string_or_object() {
        let s = serde_json::Value::String(
            r#"{"SecretSubType":"SSHKey","RegionId":"cn-hangzhou","InstanceId":"i-web01","CustomData":{"UserName":"root"}}"#.into(),
        );
        assert_eq!(
            extended_fields(Some(&s)),
            (
                Some("i-web01".into()),
                Some("SSHKey".into()),
                Some("root".into())
            )
        );
        let o = serde_json::json!({"InstanceId": "i-2", "SecretSubType": "Password"});
        assert_eq!(
            extended_fields(Some(&o)),
            (Some("i-2".into()), Some("Password".into()), None)
        );
        assert_eq!(extended_fields(None), (None, None, None));
    }

    #[test]
    fn user_name_only_from_values() {
        assert_eq!(
            user_name_of(br#"{"UserName":"deploy","Password":"p\"w"}"#),
            Some("deploy".into())
        );
        assert_eq!(user_name_of(br#"{"Password":"x"}"#), None);
        assert_eq!(user_name_of(b"not json"), None);
    }

    #[test]
    fn rotation_summary_reads_like_a_person_would_say_it() {
        let m = SecretMeta {
            automatic_rotation: Some("Enabled".into()),
            rotation_interval: Some("604800s".into()),
            ..SecretMeta::default()
        };
        assert_eq!(m.rotation_summary(), "on every 7d");
        assert_eq!(human_interval("3600s"), "1h");
        assert_eq!(human_interval("90s"), "90s");
    }
}
