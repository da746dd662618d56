//! Typed KMS responses.
//!
//! Responses are parsed into a JSON object first and the fields kmsbastion uses are then
//! taken one by one: unknown fields are ignored (KMS adds fields over time), while a missing or
//! ill-typed field we need is a [`KmsErrorKind::Malformed`] error that names the field. Derived
//! serde errors would not name the field for a type mismatch and could quote the offending
//! value, which for `SecretData` is the secret itself.
#![forbid(unsafe_code)]

use serde_json::{Map, Value};

use super::error::{KmsError, KmsErrorKind};
use crate::sensitive::SecretBytes;

/// A version stage KMS moves on rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretStage {
    /// `ACSCurrent`: the version to use.
    Current,
    /// `ACSPrevious`: the version before the last rotation.
    Previous,
}

impl SecretStage {
    /// The wire name, `ACSCurrent` / `ACSPrevious`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "ACSCurrent",
            Self::Previous => "ACSPrevious",
        }
    }
}

impl std::fmt::Display for SecretStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which version of a secret to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretVersion {
    /// The version carrying this stage.
    Stage(SecretStage),
    /// A version by id (ignored by KMS for ECS and other managed secret types, which serve
    /// only ACSCurrent/ACSPrevious).
    Id(String),
}

/// One secret version as `GetSecretValue` returns it. `Debug` redacts the value.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretValue {
    /// `SecretName`.
    pub secret_name: String,
    /// `VersionId` of the version returned (logged, never the value).
    pub version_id: String,
    /// The version's stages, e.g. `["ACSCurrent"]`.
    pub version_stages: Vec<String>,
    /// `SecretType`: `Generic`, `ECS`, `Rds`, …
    pub secret_type: String,
    /// `SecretData`: the value (the UTF-8 bytes of the JSON string KMS returns).
    pub secret_data: SecretBytes,
    /// `ExtendedConfig` parsed from its JSON string (ECS: `SecretSubType`, `InstanceId`, …);
    /// only for non-Generic secrets, when asked for.
    pub extended_config: Option<Value>,
    /// `RequestId` of the call.
    pub request_id: String,
}

/// One `ListSecrets` filter: `{"Key": key, "Values": values}` (values of one key are OR-ed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `SecretName`, `Description`, `TagKey`, `TagValue`, `SecretType`, `DKMSInstanceId`,
    /// `Creator`.
    pub key: String,
    /// Up to 10 values.
    pub values: Vec<String>,
}

impl Filter {
    /// A filter on `key` with `values`.
    pub fn new(
        key: impl Into<String>,
        values: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            key: key.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// The `Filters` parameter: a compact JSON array.
    pub fn to_param(filters: &[Filter]) -> String {
        Value::Array(
            filters
                .iter()
                .map(|f| {
                    let mut o = Map::new();
                    o.insert("Key".to_owned(), Value::String(f.key.clone()));
                    o.insert(
                        "Values".to_owned(),
                        Value::Array(f.values.iter().cloned().map(Value::String).collect()),
                    );
                    Value::Object(o)
                })
                .collect(),
        )
        .to_string()
    }
}

/// A resource tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// `TagKey`.
    pub key: String,
    /// `TagValue`.
    pub value: String,
}

/// One entry of `ListSecrets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSummary {
    /// `SecretName`.
    pub secret_name: String,
    /// `SecretType`.
    pub secret_type: String,
    /// `CreateTime`.
    pub create_time: Option<String>,
    /// `UpdateTime`.
    pub update_time: Option<String>,
    /// `PlannedDeleteTime`: present when the secret is scheduled for deletion.
    pub planned_delete_time: Option<String>,
    /// `Tags` (the client asks for them).
    pub tags: Vec<Tag>,
}

/// `DescribeSecret`: the secret's metadata (never its value).
#[derive(Debug, Clone, PartialEq)]
pub struct SecretDescription {
    /// `SecretName`.
    pub secret_name: String,
    /// `SecretType`.
    pub secret_type: String,
    /// `Arn`.
    pub arn: Option<String>,
    /// `Description`.
    pub description: Option<String>,
    /// `CreateTime`.
    pub create_time: Option<String>,
    /// `UpdateTime`.
    pub update_time: Option<String>,
    /// `PlannedDeleteTime`: present when the secret is scheduled for deletion.
    pub planned_delete_time: Option<String>,
    /// `AutomaticRotation`: `Enabled`, `Disabled`, `Invalid`.
    pub automatic_rotation: Option<String>,
    /// `RotationInterval`, e.g. `604800s`.
    pub rotation_interval: Option<String>,
    /// `LastRotationDate`.
    pub last_rotation_date: Option<String>,
    /// `NextRotationDate`.
    pub next_rotation_date: Option<String>,
    /// `ExtendedConfig` parsed from its JSON string.
    pub extended_config: Option<Value>,
    /// `Tags`.
    pub tags: Vec<Tag>,
    /// `RequestId`.
    pub request_id: String,
}

/// One page of `ListSecrets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecretPage {
    pub total_count: u64,
    pub secrets: Vec<SecretSummary>,
}

/// A successful response's JSON object, read field by field.
pub(crate) struct Fields {
    action: String,
    obj: Map<String, Value>,
    http_status: Option<u16>,
    request_id: Option<String>,
}

impl Fields {
    /// Wraps a parsed response body; `Malformed` unless it is a JSON object.
    pub fn new(
        action: &str,
        body: Value,
        http_status: Option<u16>,
        header_request_id: Option<String>,
    ) -> Result<Self, KmsError> {
        let Value::Object(obj) = body else {
            return Err(KmsError {
                kind: KmsErrorKind::Malformed,
                code: None,
                message: format!("{action} response is not a JSON object"),
                request_id: header_request_id,
                http_status,
            });
        };
        let request_id = match obj.get("RequestId") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => header_request_id,
        };
        Ok(Self {
            action: action.to_owned(),
            obj,
            http_status,
            request_id,
        })
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.obj)
    }

    fn bad(&self, field: &str, problem: &str) -> KmsError {
        KmsError::malformed(
            &self.action,
            field,
            problem,
            self.request_id.clone(),
            self.http_status,
        )
    }

    /// `RequestId`, required.
    pub fn request_id(&self) -> Result<String, KmsError> {
        self.request_id
            .clone()
            .ok_or_else(|| self.bad("RequestId", "is missing"))
    }

    pub fn string(&self, field: &str) -> Result<String, KmsError> {
        match self.obj.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(self.bad(field, "is empty")),
            Some(_) => Err(self.bad(field, "is not a string")),
            None => Err(self.bad(field, "is missing")),
        }
    }

    pub fn opt_string(&self, field: &str) -> Result<Option<String>, KmsError> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(field, "is not a string")),
        }
    }

    /// Moves a secret string out of the object (no copy left in the parsed tree).
    pub fn take_secret(&mut self, field: &str) -> Result<SecretBytes, KmsError> {
        match self.obj.remove(field) {
            Some(Value::String(s)) => Ok(SecretBytes::new(s.into_bytes())),
            Some(_) => Err(self.bad(field, "is not a string")),
            None => Err(self.bad(field, "is missing")),
        }
    }

    pub fn u64(&self, field: &str) -> Result<u64, KmsError> {
        match self.obj.get(field) {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.bad(field, "is not a non-negative integer")),
            None => Err(self.bad(field, "is missing")),
        }
    }

    /// A POP list `{"<inner>": [...]}` (a bare array is accepted too); absent means empty.
    fn list<'a>(&'a self, field: &str, inner: &str) -> Result<&'a [Value], KmsError> {
        let problem = "is not a list";
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(Value::Object(o)) => match o.get(inner) {
                None | Some(Value::Null) => Ok(&[]),
                Some(Value::Array(a)) => Ok(a),
                Some(_) => Err(self.bad(&format!("{field}.{inner}"), problem)),
            },
            Some(_) => Err(self.bad(field, problem)),
        }
    }

    pub fn string_list(&self, field: &str, inner: &str) -> Result<Vec<String>, KmsError> {
        self.list(field, inner)?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.bad(&format!("{field}.{inner}"), "holds a non-string"))
            })
            .collect()
    }

    /// Sub-objects of a POP list, each wrapped as `Fields` for the same action.
    pub fn object_list(&self, field: &str, inner: &str) -> Result<Vec<Fields>, KmsError> {
        self.list(field, inner)?
            .iter()
            .map(|v| match v {
                Value::Object(o) => Ok(Fields {
                    action: format!("{} {field}.{inner}[]", self.action),
                    obj: o.clone(),
                    http_status: self.http_status,
                    request_id: self.request_id.clone(),
                }),
                _ => Err(self.bad(&format!("{field}.{inner}"), "holds a non-object")),
            })
            .collect()
    }

    /// `ExtendedConfig`: a JSON string holding an object (an object is accepted as is).
    pub fn extended_config(&self) -> Result<Option<Value>, KmsError> {
        match self.obj.get("ExtendedConfig") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => Ok(Some(v)),
                _ => Err(self.bad("ExtendedConfig", "is not a JSON object string")),
            },
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(_) => Err(self.bad("ExtendedConfig", "is not a JSON object string")),
        }
    }

    pub fn tags(&self) -> Result<Vec<Tag>, KmsError> {
        self.object_list("Tags", "Tag")?
            .iter()
            .map(|t| {
                Ok(Tag {
                    key: t.string("TagKey")?,
                    value: t.opt_string("TagValue")?.unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// `GetSecretValue` response.
pub(crate) fn secret_value(mut f: Fields) -> Result<SecretValue, KmsError> {
    let secret_data = f.take_secret("SecretData")?;
    Ok(SecretValue {
        secret_name: f.string("SecretName")?,
        version_id: f.string("VersionId")?,
        version_stages: f.string_list("VersionStages", "VersionStage")?,
        secret_type: f.string("SecretType")?,
        secret_data,
        extended_config: f.extended_config()?,
        request_id: f.request_id()?,
    })
}

/// `ListSecrets` response (one page).
pub(crate) fn secret_page(f: &Fields) -> Result<SecretPage, KmsError> {
    let secrets = f
        .object_list("SecretList", "Secret")?
        .iter()
        .map(|s| {
            Ok(SecretSummary {
                secret_name: s.string("SecretName")?,
                secret_type: s.string("SecretType")?,
                create_time: s.opt_string("CreateTime")?,
                update_time: s.opt_string("UpdateTime")?,
                planned_delete_time: s.opt_string("PlannedDeleteTime")?,
                tags: s.tags()?,
            })
        })
        .collect::<Result<Vec<_>, KmsError>>()?;
    Ok(SecretPage {
        total_count: f.u64("TotalCount")?,
        secrets,
    })
}

/// `DescribeSecret` response.
pub(crate) fn secret_description(f: &Fields) -> Result<SecretDescription, KmsError> {
    Ok(SecretDescription {
        secret_name: f.string("SecretName")?,
        secret_type: f.string("SecretType")?,
        arn: f.opt_string("Arn")?,
        description: f.opt_string("Description")?,
        create_time: f.opt_string("CreateTime")?,
        update_time: f.opt_string("UpdateTime")?,
        planned_delete_time: f.opt_string("PlannedDeleteTime")?,
        automatic_rotation: f.opt_string("AutomaticRotation")?,
        rotation_interval: f.opt_string("RotationInterval")?,
        last_rotation_date: f.opt_string("LastRotationDate")?,
        next_rotation_date: f.opt_string("NextRotationDate")?,
        extended_config: f.extended_config()?,
        tags: f.tags()?,
        request_id: f.request_id()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(action: &str, v: Value) -> Fields {
        Fields::new(action, v, Some(200), None).expect("object")
    }

    #[test]
    fn get_secret_value_sample_with_unknown_fields() {
        let v = json!({
            "RequestId": "6a3e9c36", "SecretName": "acs/ecs/web-01/root", "VersionId": "v1",
            "SecretData": "{\"UserName\":\"root\",\"Password\":\"hunter2\"}", "SecretDataType": "text",
            "SecretType": "ECS", "VersionStages": {"VersionStage": ["ACSCurrent"]},
            "CreateTime": "2020-07-23T11:56:29Z", "AutomaticRotation": "Enabled",
            "ExtendedConfig": "{\"SecretSubType\":\"Password\",\"InstanceId\":\"i-web01\"}",
            "SomethingNew": {"x": [1, 2]}
        });
        let s = secret_value(fields("GetSecretValue", v)).expect("parses");
        assert_eq!(s.secret_name, "acs/ecs/web-01/root");
        assert_eq!(s.version_stages, vec!["ACSCurrent"]);
        assert_eq!(
            s.secret_data.expose(),
            br#"{"UserName":"root","Password":"hunter2"}"#
        );
        assert_eq!(
            s.extended_config
                .as_ref()
                .and_then(|e| e["InstanceId"].as_str()),
            Some("i-web01")
        );
        assert_eq!(s.request_id, "6a3e9c36");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn missing_or_ill_typed_fields_are_named_never_quoted() {
        let base = json!({
            "RequestId": "r", "SecretName": "n", "VersionId": "v1", "SecretData": "hunter2",
            "SecretType": "Generic", "VersionStages": {"VersionStage": ["ACSCurrent"]}
        });
        for (field, value, expect) in [
            ("SecretData", json!(12345), "`SecretData` is not a string"),
            ("SecretData", Value::Null, "`SecretData` is not a string"),
            ("VersionId", json!(null), "`VersionId` is not a string"),
            (
                "SecretName",
                json!(["hunter2"]),
                "`SecretName` is not a string",
            ),
            (
                "VersionStages",
                json!({"VersionStage": "ACSCurrent"}),
                "`VersionStages.VersionStage` is not a list",
            ),
            (
                "VersionStages",
                json!({"VersionStage": [1]}),
                "`VersionStages.VersionStage` holds a non-string",
            ),
            (
                "ExtendedConfig",
                json!("{not json"),
                "`ExtendedConfig` is not a JSON object string",
            ),
        ] {
            let mut v = base.clone();
            v[field] = value;
            let e = secret_value(fields("GetSecretValue", v)).expect_err(field);
            assert_eq!(e.kind, KmsErrorKind::Malformed);
            assert!(e.message.contains(expect), "{field}: {}", e.message);
            assert!(!e.to_string().contains("hunter2"));
            assert_eq!(e.request_id.as_deref(), Some("r"));
        }
        for field in [
            "SecretName",
            "VersionId",
            "SecretData",
            "SecretType",
            "RequestId",
        ] {
            let mut v = base.clone();
            v.as_object_mut().expect("object").remove(field);
            let e = secret_value(fields("GetSecretValue", v)).expect_err(field);
            assert!(
                e.message.contains(&format!("`{field}` is missing")),
                "{}",
                e.message
            );
        }
        assert!(Fields::new("X", json!([1]), None, None).is_err());
    }

    #[test]
    fn list_page_and_describe() {
        let page = json!({
            "RequestId": "r", "PageNumber": 1, "PageSize": 2, "TotalCount": 55,
            "SecretList": {"Secret": [
                {"SecretName": "a", "SecretType": "ECS", "CreateTime": "t", "Tags": {"Tag": [{"TagKey": "env", "TagValue": "prod"}]}},
                {"SecretName": "b", "SecretType": "Generic", "PlannedDeleteTime": "p", "OwingService": "x"}
            ]}
        });
        let p = secret_page(&fields("ListSecrets", page)).expect("parses");
        assert_eq!(p.total_count, 55);
        assert_eq!(p.secrets.len(), 2);
        assert_eq!(
            p.secrets[0].tags,
            vec![Tag {
                key: "env".into(),
                value: "prod".into()
            }]
        );
        assert_eq!(p.secrets[1].planned_delete_time.as_deref(), Some("p"));
        let e = secret_page(&fields(
            "ListSecrets",
            json!({"RequestId": "r", "TotalCount": "55"}),
        ))
        .expect_err("string count");
        assert!(
            e.message
                .contains("`TotalCount` is not a non-negative integer"),
            "{}",
            e.message
        );
        let e = secret_page(&fields(
            "ListSecrets",
            json!({"TotalCount": 1, "SecretList": {"Secret": [{"SecretType": "ECS"}]}}),
        ))
        .expect_err("no name");
        assert!(
            e.message.contains("SecretList.Secret[]")
                && e.message.contains("`SecretName` is missing"),
            "{}",
            e.message
        );
        assert!(secret_page(&fields(
            "ListSecrets",
            json!({"TotalCount": 0, "SecretList": {}})
        ))
        .expect("empty")
        .secrets
        .is_empty());

        let d = json!({
            "RequestId": "r", "SecretName": "acs/ecs/x", "SecretType": "ECS", "Arn": "acs:kms:cn:1:secret/acs/ecs/x",
            "ExtendedConfig": "{\"SecretSubType\":\"SSHKey\",\"InstanceId\":\"i-1\"}", "RotationInterval": "604800s",
            "Tags": {"Tag": []}
        });
        let d = secret_description(&fields("DescribeSecret", d)).expect("parses");
        assert_eq!(d.rotation_interval.as_deref(), Some("604800s"));
        assert_eq!(
            d.extended_config
                .and_then(|e| e["SecretSubType"].as_str().map(str::to_owned))
                .as_deref(),
            Some("SSHKey")
        );
    }

    #[test]
    fn filters_param() {
        let f = [
            Filter::new("SecretName", ["a", "b"]),
            Filter::new("TagKey", ["env"]),
        ];
        assert_eq!(
            Filter::to_param(&f),
            r#"[{"Key":"SecretName","Values":["a","b"]},{"Key":"TagKey","Values":["env"]}]"#
        );
    }
}
