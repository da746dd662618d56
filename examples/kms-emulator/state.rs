//! The secrets store and its state machine: secrets, versions, version stages, rotation
//! settings and deletion windows, as KMS moves them (`shared/reference/kms-api.md` §3, §4).
//!
//! Pure: no I/O and no clock. Every operation takes `now` (Unix seconds) so the tests can
//! walk a secret through its whole life, and the HTTP layer (`actions.rs`) only parses
//! parameters and shapes responses.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The stage KMS gives the version that `GetSecretValue` returns by default.
pub const ACS_CURRENT: &str = "ACSCurrent";
/// The stage the former `ACSCurrent` version gets when a new version becomes current.
pub const ACS_PREVIOUS: &str = "ACSPrevious";
/// Versions kept per secret; beyond it the oldest version without a stage is dropped.
pub const MAX_VERSIONS: usize = 10;
/// Distinct stage labels per secret.
pub const MAX_STAGES: usize = 8;
/// Largest `SecretData` KMS stores (30 KB).
pub const MAX_SECRET_DATA: usize = 30_720;
/// Longest `VersionId`.
pub const MAX_VERSION_ID: usize = 64;
/// Longest secret name.
pub const MAX_NAME: usize = 192;
/// Most tags per secret.
pub const MAX_TAGS: usize = 20;
/// Default and bounds of `RecoveryWindowInDays` (days).
pub const DEFAULT_RECOVERY_DAYS: u64 = 30;
/// Shortest recovery window KMS accepts (days).
pub const MIN_RECOVERY_DAYS: u64 = 7;
/// Longest recovery window KMS accepts (days).
pub const MAX_RECOVERY_DAYS: u64 = 30;
/// Rotation interval bounds (seconds): 1 hour to 365 days.
pub const MIN_ROTATION_INTERVAL: u64 = 3_600;
/// See [`MIN_ROTATION_INTERVAL`].
pub const MAX_ROTATION_INTERVAL: u64 = 365 * DAY;
const DAY: u64 = 86_400;

/// The secret types the emulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretType {
    /// Free-form value, versions and custom stages managed by the caller.
    Generic,
    /// Password or SSH key of one OS user on one ECS instance; rotated by KMS.
    #[serde(rename = "ECS")]
    Ecs,
}

impl SecretType {
    /// The wire name (`Generic`, `ECS`).
    pub fn as_str(self) -> &'static str {
        match self {
            SecretType::Generic => "Generic",
            SecretType::Ecs => "ECS",
        }
    }

    /// Parses a `SecretType` parameter or filter value (case-insensitive). Other KMS types
    /// (Rds, Redis, RAMCredentials, PolarDB) are refused: the emulator does not model them.
    pub fn parse(s: &str) -> Result<SecretType, ApiError> {
        if s.eq_ignore_ascii_case("Generic") {
            Ok(SecretType::Generic)
        } else if s.eq_ignore_ascii_case("ECS") {
            Ok(SecretType::Ecs)
        } else {
            Err(ApiError::invalid(format!(
                "SecretType {s:?}: this emulator serves Generic and ECS secrets"
            )))
        }
    }
}

/// The kind of credential an ECS secret holds (`ExtendedConfig.SecretSubType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EcsSubType {
    /// `{"UserName","Password"}`.
    Password,
    /// `{"UserName","PublicKey","PrivateKey"}`.
    SshKey,
}

impl EcsSubType {
    /// The wire name (`Password`, `SSHKey`).
    pub fn as_str(self) -> &'static str {
        match self {
            EcsSubType::Password => "Password",
            EcsSubType::SshKey => "SSHKey",
        }
    }

    fn parse(s: &str) -> Option<EcsSubType> {
        match s {
            "Password" => Some(EcsSubType::Password),
            "SSHKey" => Some(EcsSubType::SshKey),
            _ => None,
        }
    }
}

/// One resource tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// `TagKey`.
    #[serde(rename = "TagKey")]
    pub key: String,
    /// `TagValue`.
    #[serde(rename = "TagValue")]
    pub value: String,
}

/// One stored version of a secret value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// `VersionId`, unique within the secret.
    pub id: String,
    /// `SecretData` exactly as stored.
    pub data: String,
    /// `SecretDataType`: `text` or `binary`.
    pub data_type: String,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Stage labels on this version; empty means deprecated.
    pub stages: Vec<String>,
}

/// One secret with all its versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Secret {
    /// `SecretName`.
    pub name: String,
    /// `SecretType`.
    pub secret_type: SecretType,
    /// `Description` (empty when none was given).
    pub description: String,
    /// Tags in the order given.
    pub tags: Vec<Tag>,
    /// Creation time (Unix seconds).
    pub created: u64,
    /// Last change of value, stages or settings (Unix seconds).
    pub updated: u64,
    /// Creation order, for stable listing.
    pub seq: u64,
    /// `ExtendedConfig` of an ECS secret (with `RegionId` filled in).
    pub extended_config: Option<Map<String, Value>>,
    /// Automatic rotation switched on.
    pub rotation_enabled: bool,
    /// Rotation interval (seconds).
    pub rotation_interval: Option<u64>,
    /// Last successful rotation (Unix seconds).
    pub last_rotation: Option<u64>,
    /// End of the recovery window when deletion is pending (Unix seconds).
    pub planned_delete: Option<u64>,
    /// `EncryptionKeyId` as given.
    pub encryption_key_id: Option<String>,
    /// `DKMSInstanceId` as given.
    pub dkms_instance_id: Option<String>,
    /// Versions, oldest first.
    pub versions: Vec<Version>,
}

impl Secret {
    /// The version carrying `stage`, if any.
    pub fn version_with_stage(&self, stage: &str) -> Option<&Version> {
        self.versions
            .iter()
            .find(|v| v.stages.iter().any(|s| s == stage))
    }

    /// The version with id `id`, if any.
    pub fn version(&self, id: &str) -> Option<&Version> {
        self.versions.iter().find(|v| v.id == id)
    }

    /// The ECS subtype, for ECS secrets.
    pub fn ecs_subtype(&self) -> Option<EcsSubType> {
        let cfg = self.extended_config.as_ref()?;
        EcsSubType::parse(cfg.get("SecretSubType")?.as_str()?)
    }

    /// `ExtendedConfig.InstanceId`, for ECS secrets.
    pub fn instance_id(&self) -> Option<&str> {
        self.extended_config.as_ref()?.get("InstanceId")?.as_str()
    }

    /// When the next automatic rotation is due: the last rotation (or creation) plus the
    /// interval, while rotation is enabled.
    pub fn next_rotation(&self) -> Option<u64> {
        if !self.rotation_enabled {
            return None;
        }
        let base = self.last_rotation.unwrap_or(self.created);
        Some(base.saturating_add(self.rotation_interval?))
    }

    /// Whether deletion is pending (inside the recovery window).
    pub fn pending_deletion(&self) -> bool {
        self.planned_delete.is_some()
    }

    fn stage_labels(&self) -> Vec<&str> {
        let mut labels: Vec<&str> = self
            .versions
            .iter()
            .flat_map(|v| v.stages.iter().map(String::as_str))
            .collect();
        labels.sort_unstable();
        labels.dedup();
        labels
    }

    /// Puts `stage` on version `target` and takes it off whichever version had it. Moving
    /// `ACSCurrent` gives `ACSPrevious` to the version that was current (what PutSecretValue
    /// and rotation document), so a client can always fall back one version.
    fn attach_stage(&mut self, stage: &str, target: &str) {
        let holder = self.version_with_stage(stage).map(|v| v.id.clone());
        if holder.as_deref() == Some(target) {
            return;
        }
        for v in &mut self.versions {
            if v.id == target {
                v.stages.push(stage.to_owned());
            } else {
                v.stages.retain(|s| s != stage);
            }
        }
        if stage == ACS_CURRENT {
            if let Some(old) = holder {
                self.attach_stage(ACS_PREVIOUS, &old);
            }
        }
    }

    fn detach_stage(&mut self, stage: &str) {
        for v in &mut self.versions {
            v.stages.retain(|s| s != stage);
        }
    }

    /// Drops the oldest deprecated (stage-less) versions beyond [`MAX_VERSIONS`].
    fn enforce_version_cap(&mut self) {
        while self.versions.len() > MAX_VERSIONS {
            match self.versions.iter().position(|v| v.stages.is_empty()) {
                Some(i) => {
                    self.versions.remove(i);
                }
                None => break,
            }
        }
    }
}

/// Everything `CreateSecret` needs, already decoded from the request.
#[derive(Clone, Debug, Default)]
pub struct NewSecret {
    /// `SecretName`.
    pub name: String,
    /// `VersionId` of the first version.
    pub version_id: String,
    /// `SecretData`.
    pub data: String,
    /// `SecretDataType` (`text` when absent).
    pub data_type: Option<String>,
    /// `SecretType` (Generic when absent).
    pub secret_type: Option<SecretType>,
    /// `ExtendedConfig`, parsed.
    pub extended_config: Option<Map<String, Value>>,
    /// `EnableAutomaticRotation`.
    pub rotation_enabled: bool,
    /// `RotationInterval` in seconds.
    pub rotation_interval: Option<u64>,
    /// `Description`.
    pub description: String,
    /// `Tags`.
    pub tags: Vec<Tag>,
    /// `EncryptionKeyId`.
    pub encryption_key_id: Option<String>,
    /// `DKMSInstanceId`.
    pub dkms_instance_id: Option<String>,
}

/// One `ListSecrets` filter: values of one key are OR-ed, keys are AND-ed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Which attribute to match.
    pub key: FilterKey,
    /// Accepted values.
    pub values: Vec<String>,
}

/// The attributes `ListSecrets` filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKey {
    /// Substring of the name.
    SecretName,
    /// Substring of the description.
    Description,
    /// Exact secret type (case-insensitive).
    SecretType,
    /// Exact tag key.
    TagKey,
    /// Exact tag value.
    TagValue,
    /// Exact KMS instance id.
    DkmsInstanceId,
}

impl Filter {
    fn matches(&self, s: &Secret) -> bool {
        self.values.iter().any(|want| match self.key {
            FilterKey::SecretName => s.name.contains(want.as_str()),
            FilterKey::Description => s.description.contains(want.as_str()),
            FilterKey::SecretType => s.secret_type.as_str().eq_ignore_ascii_case(want),
            FilterKey::TagKey => s.tags.iter().any(|t| &t.key == want),
            FilterKey::TagValue => s.tags.iter().any(|t| &t.value == want),
            FilterKey::DkmsInstanceId => s.dkms_instance_id.as_deref() == Some(want.as_str()),
        })
    }
}

/// Parses the `Filters` JSON of ListSecrets: `[{"Key":"SecretName","Values":["a","b"]}]`.
pub fn parse_filters(json: &str) -> Result<Vec<Filter>, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "Values")]
        values: Vec<String>,
    }
    let raw: Vec<Raw> = serde_json::from_str(json).map_err(|e| {
        ApiError::invalid(format!(
            "Filters must be a JSON array of {{\"Key\",\"Values\"}}: {e}"
        ))
    })?;
    if raw.len() > 10 {
        return Err(ApiError::invalid("Filters: at most 10 keys"));
    }
    raw.into_iter()
        .map(|r| {
            let key = match r.key.as_str() {
                "SecretName" => FilterKey::SecretName,
                "Description" => FilterKey::Description,
                "SecretType" => FilterKey::SecretType,
                "TagKey" => FilterKey::TagKey,
                "TagValue" => FilterKey::TagValue,
                "DKMSInstanceId" => FilterKey::DkmsInstanceId,
                other => {
                    return Err(ApiError::invalid(format!(
                        "Filters: unsupported Key {other:?} (SecretName, Description, SecretType, TagKey, TagValue, DKMSInstanceId)"
                    )))
                }
            };
            if r.values.is_empty() || r.values.len() > 10 {
                return Err(ApiError::invalid(format!(
                    "Filters: {} needs 1 to 10 Values",
                    r.key
                )));
            }
            Ok(Filter {
                key,
                values: r.values,
            })
        })
        .collect()
}

/// Parses the `Tags` JSON of CreateSecret: `[{"TagKey":"k","TagValue":"v"}]`.
pub fn parse_tags(json: &str) -> Result<Vec<Tag>, ApiError> {
    let tags: Vec<Tag> = serde_json::from_str(json).map_err(|e| {
        ApiError::invalid(format!(
            "Tags must be a JSON array of {{\"TagKey\",\"TagValue\"}}: {e}"
        ))
    })?;
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(format!("Tags: at most {MAX_TAGS}")));
    }
    for t in &tags {
        if t.key.is_empty() || t.key.len() > 128 || t.value.len() > 128 {
            return Err(ApiError::invalid(
                "Tags: keys 1-128 and values 0-128 characters",
            ));
        }
        if t.key.starts_with("aliyun") || t.key.starts_with("acs:") {
            return Err(ApiError::invalid(
                "Tags: a TagKey must not start with \"aliyun\" or \"acs:\"",
            ));
        }
    }
    Ok(tags)
}

/// Parses `RotationInterval`: an integer with unit `d`, `h`, `m` or `s` (`7d`, `604800s`),
/// 1 hour to 365 days. Returns seconds.
pub fn parse_interval(s: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "RotationInterval {s:?}: expected an integer with unit d, h, m or s (e.g. 7d), between 1h and 365d"
        ))
    };
    let unit = match s.chars().last() {
        Some('d') => DAY,
        Some('h') => 3_600,
        Some('m') => 60,
        Some('s') => 1,
        _ => return Err(bad()),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = n.checked_mul(unit).ok_or_else(bad)?;
    if !(MIN_ROTATION_INTERVAL..=MAX_ROTATION_INTERVAL).contains(&secs) {
        return Err(bad());
    }
    Ok(secs)
}

/// Accepts a secret name or its ARN (`acs:kms:<region>:<account>:secret/<name>`).
pub fn normalize_name(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix("acs:kms:") {
        if let Some((_, n)) = rest.split_once(":secret/") {
            return n;
        }
    }
    name
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_/+=.@-".contains(c);
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok_char) {
        return Err(ApiError::invalid(format!(
            "SecretName {name:?}: 1-{MAX_NAME} characters of A-Z a-z 0-9 _ / + = . @ -"
        )));
    }
    Ok(())
}

fn validate_version_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_VERSION_ID {
        return Err(ApiError::invalid(format!(
            "VersionId: 1-{MAX_VERSION_ID} characters"
        )));
    }
    Ok(())
}

fn validate_data(data: &str) -> Result<(), ApiError> {
    if data.is_empty() || data.len() > MAX_SECRET_DATA {
        return Err(ApiError::invalid(format!(
            "SecretData: 1-{MAX_SECRET_DATA} bytes"
        )));
    }
    Ok(())
}

fn validate_data_type(t: Option<&str>) -> Result<String, ApiError> {
    match t {
        None => Ok("text".to_owned()),
        Some(t @ ("text" | "binary")) => Ok(t.to_owned()),
        Some(other) => Err(ApiError::invalid(format!(
            "SecretDataType {other:?}: text or binary"
        ))),
    }
}

fn validate_stage(stage: &str) -> Result<(), ApiError> {
    if stage.is_empty() || stage.len() > 64 {
        return Err(ApiError::invalid("VersionStage: 1-64 characters"));
    }
    Ok(())
}

/// Checks an ECS secret value against its subtype and returns the `UserName`.
pub fn ecs_user_name(data: &str, subtype: EcsSubType) -> Result<String, ApiError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|_| ApiError::invalid("SecretData of an ECS secret must be a JSON object"))?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let user = field("UserName")
        .ok_or_else(|| ApiError::invalid("SecretData of an ECS secret needs a UserName"))?;
    match subtype {
        EcsSubType::Password if field("Password").is_none() => Err(ApiError::invalid(
            "SecretData of a Password ECS secret needs a Password",
        )),
        EcsSubType::SshKey if field("PrivateKey").is_none() => Err(ApiError::invalid(
            "SecretData of an SSHKey ECS secret needs a PrivateKey",
        )),
        _ => Ok(user.to_owned()),
    }
}

/// What rotating an ECS secret needs: filled in under the store lock, used outside it
/// (key generation and the hook may take a while), committed under the lock again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationPlan {
    /// The secret (normalized name).
    pub name: String,
    /// The new version's id.
    pub version_id: String,
    /// Password or SSH key.
    pub subtype: EcsSubType,
    /// The OS user, from the current version.
    pub user_name: String,
    /// `ExtendedConfig.InstanceId`.
    pub instance_id: String,
}

/// The outcome of starting a rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationStart {
    /// The `VersionId` exists already: RotateSecret is idempotent, nothing to do.
    AlreadyDone,
    /// Generate a value, run the hook, then [`Store::commit_rotation`].
    Plan(RotationPlan),
}

/// All secrets. Serialized as-is into the state directory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Store {
    /// Secrets by name.
    pub secrets: BTreeMap<String, Secret>,
    /// Next creation sequence number.
    pub next_seq: u64,
}

impl Store {
    /// Drops every secret whose recovery window has ended.
    pub fn purge_expired(&mut self, now: u64) -> bool {
        let before = self.secrets.len();
        self.secrets
            .retain(|_, s| s.planned_delete.is_none_or(|t| t > now));
        before != self.secrets.len()
    }

    /// A secret that exists (pending deletion or not).
    pub fn find(&mut self, name: &str, now: u64) -> Result<&mut Secret, ApiError> {
        let name = normalize_name(name);
        if let Some(t) = self.secrets.get(name).and_then(|s| s.planned_delete) {
            if t <= now {
                self.secrets.remove(name);
            }
        }
        self.secrets
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(&format!("secret {name}")))
    }

    /// A secret that exists and is not pending deletion: what reading a value and every
    /// change except DeleteSecret/RestoreSecret require.
    pub fn find_live(&mut self, name: &str, now: u64) -> Result<&mut Secret, ApiError> {
        let s = self.find(name, now)?;
        if s.pending_deletion() {
            return Err(ApiError::pending_deletion(&s.name));
        }
        Ok(s)
    }

    /// CreateSecret.
    pub fn create(&mut self, new: NewSecret, now: u64, region: &str) -> Result<&Secret, ApiError> {
        validate_name(&new.name)?;
        validate_version_id(&new.version_id)?;
        validate_data(&new.data)?;
        if new.description.len() > 256 {
            return Err(ApiError::invalid("Description: at most 256 characters"));
        }
        let secret_type = new.secret_type.unwrap_or(SecretType::Generic);
        let data_type = validate_data_type(new.data_type.as_deref())?;
        if let Ok(existing) = self.find(&new.name, now) {
            return Err(if existing.pending_deletion() {
                ApiError::pending_deletion(&new.name)
            } else {
                ApiError::exists(&format!("secret {}", new.name))
            });
        }
        let (extended_config, rotation_enabled, rotation_interval) = match secret_type {
            SecretType::Generic => {
                if new.name.starts_with("acs/") {
                    return Err(ApiError::invalid(
                        "SecretName: a Generic secret's name must not start with acs/",
                    ));
                }
                (None, false, None)
            }
            SecretType::Ecs => {
                if !new.name.starts_with("acs/ecs/") {
                    return Err(ApiError::invalid(
                        "SecretName: an ECS secret's name must start with acs/ecs/",
                    ));
                }
                if data_type != "text" {
                    return Err(ApiError::invalid(
                        "SecretDataType of an ECS secret must be text",
                    ));
                }
                let mut cfg = new
                    .extended_config
                    .clone()
                    .ok_or_else(|| ApiError::missing("ExtendedConfig"))?;
                let subtype = cfg
                    .get("SecretSubType")
                    .and_then(Value::as_str)
                    .and_then(EcsSubType::parse)
                    .ok_or_else(|| {
                        ApiError::invalid("ExtendedConfig.SecretSubType must be Password or SSHKey")
                    })?;
                if cfg
                    .get("InstanceId")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(ApiError::invalid("ExtendedConfig.InstanceId is required"));
                }
                if !cfg.contains_key("RegionId") {
                    cfg.insert("RegionId".to_owned(), Value::String(region.to_owned()));
                }
                ecs_user_name(&new.data, subtype)?;
                if new.rotation_enabled && new.rotation_interval.is_none() {
                    return Err(ApiError::missing("RotationInterval"));
                }
                (Some(cfg), new.rotation_enabled, new.rotation_interval)
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let secret = Secret {
            name: new.name.clone(),
            secret_type,
            description: new.description,
            tags: new.tags,
            created: now,
            updated: now,
            seq,
            extended_config,
            rotation_enabled,
            rotation_interval,
            last_rotation: None,
            planned_delete: None,
            encryption_key_id: new.encryption_key_id,
            dkms_instance_id: new.dkms_instance_id,
            versions: vec![Version {
                id: new.version_id,
                data: new.data,
                data_type,
                created: now,
                stages: vec![ACS_CURRENT.to_owned()],
            }],
        };
        Ok(self.secrets.entry(new.name).or_insert(secret))
    }

    /// GetSecretValue: by `VersionId` and/or `VersionStage` (default `ACSCurrent`). ECS
    /// secrets ignore `VersionId` and serve only ACSCurrent and ACSPrevious, as KMS does.
    pub fn get_value(
        &mut self,
        name: &str,
        version_id: Option<&str>,
        stage: Option<&str>,
        now: u64,
    ) -> Result<(&Secret, &Version), ApiError> {
        let s: &Secret = self.find_live(name, now)?;
        let version = match (s.secret_type, version_id) {
            (SecretType::Generic, Some(id)) => {
                let v = s
                    .version(id)
                    .ok_or_else(|| ApiError::not_found(&format!("version {id} of {}", s.name)))?;
                if let Some(stage) = stage {
                    if !v.stages.iter().any(|x| x == stage) {
                        return Err(ApiError::not_found(&format!(
                            "version {id} of {} with stage {stage}",
                            s.name
                        )));
                    }
                }
                v
            }
            (secret_type, _) => {
                let stage = stage.unwrap_or(ACS_CURRENT);
                if secret_type == SecretType::Ecs && stage != ACS_CURRENT && stage != ACS_PREVIOUS {
                    return Err(ApiError::invalid(
                        "VersionStage of an ECS secret must be ACSCurrent or ACSPrevious",
                    ));
                }
                s.version_with_stage(stage)
                    .ok_or_else(|| ApiError::not_found(&format!("stage {stage} of {}", s.name)))?
            }
        };
        Ok((s, version))
    }

    /// ListSecrets (all matches, in creation order; the caller pages).
    pub fn list(&mut self, filters: &[Filter], now: u64) -> Vec<&Secret> {
        self.purge_expired(now);
        let mut out: Vec<&Secret> = self
            .secrets
            .values()
            .filter(|s| filters.iter().all(|f| f.matches(s)))
            .collect();
        out.sort_by_key(|s| s.seq);
        out
    }

    /// PutSecretValue (Generic only). Returns the version's stages.
    pub fn put_value(
        &mut self,
        name: &str,
        version_id: &str,
        data: String,
        data_type: Option<&str>,
        stages: Option<Vec<String>>,
        now: u64,
    ) -> Result<Vec<String>, ApiError> {
        validate_version_id(version_id)?;
        validate_data(&data)?;
        let data_type = validate_data_type(data_type)?;
        let s = self.find_live(name, now)?;
        if s.secret_type != SecretType::Generic {
            return Err(ApiError::invalid(
                "PutSecretValue is for Generic secrets; rotate an ECS secret with RotateSecret",
            ));
        }
        if let Some(v) = s.version(version_id) {
            // Same VersionId: a retry of the same call succeeds, different data is a conflict.
            return if v.data == data {
                Ok(v.stages.clone())
            } else {
                Err(ApiError::exists(&format!(
                    "version {version_id} of {} with different data",
                    s.name
                )))
            };
        }
        let stages = stages.unwrap_or_else(|| vec![ACS_CURRENT.to_owned()]);
        for st in &stages {
            validate_stage(st)?;
        }
        let mut labels = s.stage_labels();
        labels.extend(stages.iter().map(String::as_str));
        if stages.iter().any(|x| x == ACS_CURRENT) {
            labels.push(ACS_PREVIOUS);
        }
        labels.sort_unstable();
        labels.dedup();
        if labels.len() > MAX_STAGES {
            return Err(ApiError::limit(
                "A secret carries at most 8 version stages.",
            ));
        }
        s.versions.push(Version {
            id: version_id.to_owned(),
            data,
            data_type,
            created: now,
            stages: Vec::new(),
        });
        for st in &stages {
            s.attach_stage(st, version_id);
        }
        s.enforce_version_cap();
        s.updated = now;
        Ok(s.version(version_id)
            .map(|v| v.stages.clone())
            .unwrap_or_default())
    }

    /// UpdateSecretVersionStage (Generic only): add, remove or move one stage label.
    pub fn update_stage(
        &mut self,
        name: &str,
        stage: &str,
        move_to: Option<&str>,
        remove_from: Option<&str>,
        now: u64,
    ) -> Result<(), ApiError> {
        validate_stage(stage)?;
        let s = self.find_live(name, now)?;
        if s.secret_type != SecretType::Generic {
            return Err(ApiError::invalid(
                "UpdateSecretVersionStage is for Generic secrets",
            ));
        }
        let builtin = stage == ACS_CURRENT || stage == ACS_PREVIOUS;
        match (move_to, remove_from) {
            (None, None) => return Err(ApiError::missing("MoveToVersion")),
            (None, Some(_)) if builtin => {
                return Err(ApiError::invalid(format!(
                    "{stage} cannot be removed, only moved: give MoveToVersion"
                )))
            }
            _ => {}
        }
        if let Some(from) = remove_from {
            let holder = s.version_with_stage(stage).map(|v| v.id.as_str());
            if holder != Some(from) {
                return Err(ApiError::invalid(format!(
                    "RemoveFromVersion {from} does not carry stage {stage}"
                )));
            }
        }
        match move_to {
            Some(to) => {
                if s.version(to).is_none() {
                    return Err(ApiError::not_found(&format!("version {to} of {}", s.name)));
                }
                if s.version_with_stage(stage).is_none() {
                    let mut labels = s.stage_labels();
                    labels.push(stage);
                    labels.dedup();
                    if labels.len() > MAX_STAGES {
                        return Err(ApiError::limit(
                            "A secret carries at most 8 version stages.",
                        ));
                    }
                }
                s.attach_stage(stage, to);
            }
            None => s.detach_stage(stage),
        }
        s.enforce_version_cap();
        s.updated = now;
        Ok(())
    }

    /// ListSecretVersionIds (all matches, oldest first; the caller pages). Deprecated
    /// (stage-less) versions only when asked for.
    pub fn list_versions(
        &mut self,
        name: &str,
        include_deprecated: bool,
        now: u64,
    ) -> Result<(&Secret, Vec<&Version>), ApiError> {
        let s: &Secret = self.find(name, now)?;
        let versions = s
            .versions
            .iter()
            .filter(|v| include_deprecated || !v.stages.is_empty())
            .collect();
        Ok((s, versions))
    }

    /// RotateSecret, first half: checks and what the new value must be.
    pub fn start_rotation(
        &mut self,
        name: &str,
        version_id: &str,
        now: u64,
    ) -> Result<RotationStart, ApiError> {
        validate_version_id(version_id)?;
        let s = self.find_live(name, now)?;
        if s.secret_type == SecretType::Generic {
            return Err(ApiError::invalid(
                "RotateSecret does not support Generic secrets; store a new version with PutSecretValue",
            ));
        }
        if s.version(version_id).is_some() {
            return Ok(RotationStart::AlreadyDone);
        }
        let subtype = s
            .ecs_subtype()
            .ok_or_else(|| ApiError::internal("ECS secret without SecretSubType"))?;
        let current = s
            .version_with_stage(ACS_CURRENT)
            .ok_or_else(|| ApiError::internal("ECS secret without ACSCurrent"))?;
        let user_name = ecs_user_name(&current.data, subtype)?;
        Ok(RotationStart::Plan(RotationPlan {
            name: s.name.clone(),
            version_id: version_id.to_owned(),
            subtype,
            user_name,
            instance_id: s.instance_id().unwrap_or_default().to_owned(),
        }))
    }

    /// RotateSecret, second half (after the hook succeeded): the new version becomes
    /// ACSCurrent, the old current ACSPrevious, the old previous loses its stage.
    pub fn commit_rotation(
        &mut self,
        plan: &RotationPlan,
        data: String,
        now: u64,
    ) -> Result<(), ApiError> {
        let s = self.find_live(&plan.name, now)?;
        if s.version(&plan.version_id).is_some() {
            // A concurrent RotateSecret with the same VersionId won: idempotent success.
            return Ok(());
        }
        s.versions.push(Version {
            id: plan.version_id.clone(),
            data,
            data_type: "text".to_owned(),
            created: now,
            stages: Vec::new(),
        });
        s.attach_stage(ACS_CURRENT, &plan.version_id);
        s.enforce_version_cap();
        s.last_rotation = Some(now);
        s.updated = now;
        Ok(())
    }

    /// UpdateSecretRotationPolicy (not for Generic).
    pub fn update_rotation_policy(
        &mut self,
        name: &str,
        enabled: bool,
        interval: Option<u64>,
        now: u64,
    ) -> Result<(), ApiError> {
        let s = self.find_live(name, now)?;
        if s.secret_type == SecretType::Generic {
            return Err(ApiError::invalid(
                "UpdateSecretRotationPolicy does not support Generic secrets",
            ));
        }
        if enabled {
            let interval = interval.ok_or_else(|| ApiError::missing("RotationInterval"))?;
            s.rotation_interval = Some(interval);
        }
        s.rotation_enabled = enabled;
        s.updated = now;
        Ok(())
    }

    /// DeleteSecret: schedule deletion after a recovery window (default 30 days), or remove
    /// at once with `force`. Returns the planned deletion time.
    pub fn delete(
        &mut self,
        name: &str,
        window_days: Option<u64>,
        force: bool,
        now: u64,
    ) -> Result<u64, ApiError> {
        let s = self.find(name, now)?;
        if force {
            let key = s.name.clone();
            self.secrets.remove(&key);
            return Ok(now);
        }
        if s.pending_deletion() {
            return Err(ApiError::pending_deletion(&s.name));
        }
        let days = window_days.unwrap_or(DEFAULT_RECOVERY_DAYS);
        if !(MIN_RECOVERY_DAYS..=MAX_RECOVERY_DAYS).contains(&days) {
            return Err(ApiError::invalid(format!(
                "RecoveryWindowInDays: {MIN_RECOVERY_DAYS} to {MAX_RECOVERY_DAYS}"
            )));
        }
        let planned = now + days * DAY;
        s.planned_delete = Some(planned);
        s.updated = now;
        Ok(planned)
    }

    /// RestoreSecret: cancels a pending deletion. A secret that is not pending deletion is
    /// left as it is (success).
    pub fn restore(&mut self, name: &str, now: u64) -> Result<String, ApiError> {
        let s = self.find(name, now)?;
        if s.planned_delete.take().is_some() {
            s.updated = now;
        }
        Ok(s.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn generic(name: &str, version: &str, data: &str) -> NewSecret {
        NewSecret {
            name: name.into(),
            version_id: version.into(),
            data: data.into(),
            ..NewSecret::default()
        }
    }

    fn ecs(name: &str, subtype: &str, data: &str) -> NewSecret {
        let cfg = serde_json::json!({"SecretSubType": subtype, "InstanceId": "i-web01"});
        NewSecret {
            name: name.into(),
            version_id: "v1".into(),
            data: data.into(),
            secret_type: Some(SecretType::Ecs),
            extended_config: cfg.as_object().cloned(),
            rotation_enabled: true,
            rotation_interval: Some(7 * DAY),
            ..NewSecret::default()
        }
    }

    fn stages(store: &mut Store, name: &str) -> Vec<(String, Vec<String>)> {
        let (_, vs) = store.list_versions(name, true, T0).unwrap();
        vs.into_iter()
            .map(|v| (v.id.clone(), v.stages.clone()))
            .collect()
    }

    fn value(store: &mut Store, name: &str, id: Option<&str>, stage: Option<&str>) -> String {
        store.get_value(name, id, stage, T0).unwrap().1.data.clone()
    }

    #[test]
    fn put_moves_current_to_previous_and_deprecates_the_rest() {
        let mut st = Store::default();
        st.create(generic("app/db", "v1", "one"), T0, "r").unwrap();
        assert_eq!(value(&mut st, "app/db", None, None), "one");
        st.put_value("app/db", "v2", "two".into(), None, None, T0)
            .unwrap();
        st.put_value("app/db", "v3", "three".into(), None, None, T0)
            .unwrap();
        assert_eq!(
            stages(&mut st, "app/db"),
            vec![
                ("v1".into(), vec![]),
                ("v2".into(), vec![ACS_PREVIOUS.into()]),
                ("v3".into(), vec![ACS_CURRENT.into()]),
            ]
        );
        assert_eq!(value(&mut st, "app/db", None, Some(ACS_PREVIOUS)), "two");
        assert_eq!(value(&mut st, "app/db", Some("v1"), None), "one");
        let err = st
            .get_value("app/db", Some("v1"), Some(ACS_CURRENT), T0)
            .unwrap_err();
        assert_eq!(err.code, "Forbidden.ResourceNotFound");
        // Deprecated versions are hidden unless asked for.
        let (_, vs) = st.list_versions("app/db", false, T0).unwrap();
        assert_eq!(vs.len(), 2);
    }

    #[test]
    fn put_is_idempotent_for_same_data_and_conflicts_otherwise() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        let s = st
            .put_value("a", "v2", "two".into(), None, None, T0)
            .unwrap();
        assert_eq!(s, vec![ACS_CURRENT.to_owned()]);
        let again = st
            .put_value("a", "v2", "two".into(), None, None, T0)
            .unwrap();
        assert_eq!(again, s);
        let err = st
            .put_value("a", "v2", "other".into(), None, None, T0)
            .unwrap_err();
        assert_eq!(
            (err.status, err.code.as_str()),
            (409, "Rejected.ResourceExist")
        );
    }

    #[test]
    fn put_with_custom_stages_leaves_current_alone() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        st.put_value(
            "a",
            "v2",
            "two".into(),
            None,
            Some(vec!["Pending".into()]),
            T0,
        )
        .unwrap();
        assert_eq!(value(&mut st, "a", None, None), "one");
        assert_eq!(value(&mut st, "a", None, Some("Pending")), "two");
    }

    #[test]
    fn version_cap_drops_oldest_deprecated() {
        let mut st = Store::default();
        st.create(generic("a", "v0", "d0"), T0, "r").unwrap();
        for i in 1..15 {
            st.put_value("a", &format!("v{i}"), format!("d{i}"), None, None, T0)
                .unwrap();
        }
        let all = stages(&mut st, "a");
        assert_eq!(all.len(), MAX_VERSIONS);
        assert_eq!(all[0].0, "v5");
        assert_eq!(value(&mut st, "a", None, None), "d14");
    }

    #[test]
    fn update_stage_moves_adds_and_removes() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        st.put_value("a", "v2", "two".into(), None, None, T0)
            .unwrap();
        // Roll back: ACSCurrent to v1, so v2 becomes ACSPrevious.
        st.update_stage("a", ACS_CURRENT, Some("v1"), Some("v2"), T0)
            .unwrap();
        assert_eq!(
            stages(&mut st, "a"),
            vec![
                ("v1".into(), vec![ACS_CURRENT.into()]),
                ("v2".into(), vec![ACS_PREVIOUS.into()]),
            ]
        );
        st.update_stage("a", "Blue", Some("v2"), None, T0).unwrap();
        assert_eq!(value(&mut st, "a", None, Some("Blue")), "two");
        st.update_stage("a", "Blue", None, Some("v2"), T0).unwrap();
        assert!(st.get_value("a", None, Some("Blue"), T0).is_err());
        // Built-in stages cannot be removed, and RemoveFromVersion must be the holder.
        assert!(st
            .update_stage("a", ACS_CURRENT, None, Some("v1"), T0)
            .is_err());
        assert!(st
            .update_stage("a", ACS_CURRENT, Some("v2"), Some("v2"), T0)
            .is_err());
        assert_eq!(
            st.update_stage("a", "X", Some("nope"), None, T0)
                .unwrap_err()
                .status,
            404
        );
    }

    #[test]
    fn ecs_rotation_moves_stages_and_is_idempotent() {
        let mut st = Store::default();
        st.create(
            ecs(
                "acs/ecs/web-01/root",
                "Password",
                r#"{"UserName":"root","Password":"p1"}"#,
            ),
            T0,
            "cn-hangzhou",
        )
        .unwrap();
        let s = st.find("acs/ecs/web-01/root", T0).unwrap();
        assert_eq!(s.next_rotation(), Some(T0 + 7 * DAY));
        let cfg = s.extended_config.as_ref().unwrap();
        assert_eq!(cfg["RegionId"], "cn-hangzhou");
        let RotationStart::Plan(plan) = st.start_rotation("acs/ecs/web-01/root", "v2", T0).unwrap()
        else {
            panic!("expected a plan")
        };
        assert_eq!(plan.user_name, "root");
        assert_eq!(plan.instance_id, "i-web01");
        assert_eq!(plan.subtype, EcsSubType::Password);
        let new = r#"{"UserName":"root","Password":"p2"}"#.to_owned();
        st.commit_rotation(&plan, new.clone(), T0 + 10).unwrap();
        assert_eq!(value(&mut st, "acs/ecs/web-01/root", None, None), new);
        assert!(value(&mut st, "acs/ecs/web-01/root", None, Some(ACS_PREVIOUS)).contains("p1"));
        // ECS ignores VersionId and serves only the two built-in stages.
        assert_eq!(value(&mut st, "acs/ecs/web-01/root", Some("v1"), None), new);
        assert!(st
            .get_value("acs/ecs/web-01/root", None, Some("X"), T0)
            .is_err());
        assert_eq!(
            st.start_rotation("acs/ecs/web-01/root", "v2", T0).unwrap(),
            RotationStart::AlreadyDone
        );
        let s = st.find("acs/ecs/web-01/root", T0).unwrap();
        assert_eq!(s.last_rotation, Some(T0 + 10));
        assert_eq!(s.next_rotation(), Some(T0 + 10 + 7 * DAY));
        // Generic secrets are rotated with PutSecretValue.
        st.create(generic("g", "v1", "x"), T0, "r").unwrap();
        assert_eq!(
            st.start_rotation("g", "v2", T0).unwrap_err().code,
            "InvalidParameter"
        );
    }

    #[test]
    fn ecs_creation_is_validated() {
        let mut st = Store::default();
        let pw = r#"{"UserName":"root","Password":"p"}"#;
        let bad_prefix = ecs("web/root", "Password", pw);
        assert!(st.create(bad_prefix, T0, "r").is_err());
        let wrong_shape = ecs("acs/ecs/x/root", "SSHKey", pw);
        assert!(st.create(wrong_shape, T0, "r").is_err());
        let mut no_interval = ecs("acs/ecs/x/root", "Password", pw);
        no_interval.rotation_interval = None;
        assert_eq!(
            st.create(no_interval, T0, "r").unwrap_err().code,
            "MissingParameter"
        );
        assert!(st.create(generic("acs/foo", "v1", "x"), T0, "r").is_err());
        st.create(ecs("acs/ecs/x/root", "Password", pw), T0, "r")
            .unwrap();
        let dup = st
            .create(ecs("acs/ecs/x/root", "Password", pw), T0, "r")
            .unwrap_err();
        assert_eq!(
            (dup.status, dup.code.as_str()),
            (409, "Rejected.ResourceExist")
        );
    }

    #[test]
    fn deletion_window_refuses_reads_and_restore_brings_it_back() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        let planned = st.delete("a", None, false, T0).unwrap();
        assert_eq!(planned, T0 + 30 * DAY);
        let err = st.get_value("a", None, None, T0).unwrap_err();
        assert_eq!(err, ApiError::pending_deletion("a"));
        assert_eq!(err.status, 409);
        assert!(st.put_value("a", "v2", "x".into(), None, None, T0).is_err());
        // Metadata stays visible; a second scheduled delete and a re-create are refused.
        assert_eq!(st.list(&[], T0).len(), 1);
        assert_eq!(st.delete("a", Some(7), false, T0).unwrap_err().status, 409);
        let again = st.create(generic("a", "v1", "x"), T0, "r").unwrap_err();
        assert_eq!(again.code, "Rejected.ResourceInDeleteWindow");
        st.restore("a", T0).unwrap();
        assert_eq!(value(&mut st, "a", None, None), "one");
        // The window runs out: gone for good.
        st.delete("a", Some(7), false, T0).unwrap();
        let later = T0 + 7 * DAY;
        assert_eq!(
            st.get_value("a", None, None, later).unwrap_err().status,
            404
        );
        assert!(st.list(&[], later).is_empty());
        assert!(st.delete("a", None, false, T0).is_err());
        // Window bounds.
        st.create(generic("b", "v1", "x"), T0, "r").unwrap();
        assert_eq!(
            st.delete("b", Some(3), false, T0).unwrap_err().code,
            "InvalidParameter"
        );
    }

    #[test]
    fn force_delete_is_immediate_even_when_pending() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        st.delete("a", None, false, T0).unwrap();
        st.delete("a", None, true, T0).unwrap();
        assert_eq!(st.get_value("a", None, None, T0).unwrap_err().status, 404);
        assert_eq!(st.restore("a", T0).unwrap_err().status, 404);
        // The name is free again.
        st.create(generic("a", "v1", "new"), T0, "r").unwrap();
    }

    #[test]
    fn filters_and_with_or_within_a_key() {
        let mut st = Store::default();
        let mut a = generic("app/one", "v1", "x");
        a.tags = vec![Tag {
            key: "env".into(),
            value: "prod".into(),
        }];
        a.description = "primary database".into();
        st.create(a, T0, "r").unwrap();
        st.create(generic("app/two", "v1", "x"), T0, "r").unwrap();
        let pw = r#"{"UserName":"root","Password":"p"}"#;
        st.create(ecs("acs/ecs/web/root", "Password", pw), T0, "r")
            .unwrap();
        let names = |st: &mut Store, json: &str| -> Vec<String> {
            let f = parse_filters(json).unwrap();
            st.list(&f, T0)
                .into_iter()
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(
            names(&mut st, r#"[{"Key":"SecretType","Values":["ECS"]}]"#),
            ["acs/ecs/web/root"]
        );
        assert_eq!(
            names(&mut st, r#"[{"Key":"SecretName","Values":["app/"]}]"#),
            ["app/one", "app/two"]
        );
        assert_eq!(
            names(
                &mut st,
                r#"[{"Key":"SecretName","Values":["app/"]},{"Key":"TagKey","Values":["env"]}]"#
            ),
            ["app/one"]
        );
        assert_eq!(
            names(&mut st, r#"[{"Key":"TagValue","Values":["dev","prod"]}]"#),
            ["app/one"]
        );
        assert_eq!(
            names(&mut st, r#"[{"Key":"Description","Values":["database"]}]"#),
            ["app/one"]
        );
        assert!(parse_filters(r#"[{"Key":"Nope","Values":["x"]}]"#).is_err());
        assert!(parse_filters("not json").is_err());
    }

    #[test]
    fn intervals_tags_and_names() {
        assert_eq!(parse_interval("7d").unwrap(), 604_800);
        assert_eq!(parse_interval("604800s").unwrap(), 604_800);
        assert_eq!(parse_interval("1h").unwrap(), 3_600);
        assert_eq!(parse_interval("365d").unwrap(), 365 * DAY);
        for bad in ["", "d", "7", "7w", "59m", "366d", "-1d", "1.5d"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        assert!(parse_tags(r#"[{"TagKey":"acs:x","TagValue":"v"}]"#).is_err());
        assert_eq!(
            parse_tags(r#"[{"TagKey":"k","TagValue":"v"}]"#)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            normalize_name("acs:kms:cn-hangzhou:123:secret/acs/ecs/a"),
            "acs/ecs/a"
        );
        assert_eq!(normalize_name("plain"), "plain");
        assert!(validate_name("bad name").is_err());
        assert!(validate_name(&"a".repeat(193)).is_err());
    }

    #[test]
    fn store_round_trips_through_json() {
        let mut st = Store::default();
        st.create(generic("a", "v1", "one"), T0, "r").unwrap();
        let pw = r#"{"UserName":"root","Password":"p"}"#;
        st.create(ecs("acs/ecs/x/root", "Password", pw), T0, "r")
            .unwrap();
        let json = serde_json::to_string(&st).unwrap();
        let back: Store = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
    }
}
