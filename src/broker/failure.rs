//! The one mapping from everything that can go wrong in an onward connection to the line the
//! engineer sees (`session::Failure`) and the detail the jump host logs.
#![forbid(unsafe_code)]

use crate::kms::{KmsError, KmsErrorKind};
use crate::secret::SecretError;
use crate::session::Failure;

/// What went wrong, with everything the log needs.
#[derive(Debug)]
pub enum OnwardError {
    /// A KMS call failed (`stage` is `ACSCurrent` or `ACSPrevious`).
    Kms {
        error: KmsError,
        stage: &'static str,
    },
    /// The secret value failed a check (VersionId of the version that did).
    Secret {
        error: SecretError,
        version_id: String,
    },
    /// ssh refused the target's host key. `presented`: the fingerprint ssh saw, if it said.
    HostKey {
        presented: Option<String>,
        pinned: Vec<String>,
    },
    /// The target rejected every version tried.
    Rejected { version_ids: Vec<String> },
    /// ssh could not connect (or the host cannot be used). `reason` is the short text the
    /// engineer sees (never an internal address: see `onward::short_connect_reason`);
    /// `detail` is ssh's own line, for the jump host's log only.
    Unreachable { reason: String, detail: String },
    /// The peer or its request is not acceptable.
    Refused(String),
    /// Our own failure (files, processes).
    Internal(String),
}

/// The target an onward connection is for.
#[derive(Debug, Clone)]
pub struct Target {
    pub account: String,
    pub host: String,
    pub secret: String,
}

/// A short code for a KMS failure that came without a KMS `Code`.
fn kms_code(e: &KmsError) -> String {
    if let Some(c) = &e.code {
        return c.clone();
    }
    match e.kind {
        KmsErrorKind::BadCredentials => "NoCredentials",
        KmsErrorKind::Signature => "SignatureDoesNotMatch",
        KmsErrorKind::Clock => "ClockSkew",
        KmsErrorKind::Forbidden => "Forbidden",
        KmsErrorKind::Transport => "Transport",
        KmsErrorKind::Config => "Config",
        KmsErrorKind::Malformed => "MalformedResponse",
        KmsErrorKind::NotFound => "NotFound",
        KmsErrorKind::PendingDeletion => "PendingDeletion",
        KmsErrorKind::Throttled => "Throttling",
        KmsErrorKind::Unavailable => "Unavailable",
    }
    .to_owned()
}

/// THE mapping: what the engineer sees for `err`.
pub fn failure_for(err: &OnwardError, t: &Target) -> Failure {
    match err {
        OnwardError::Kms { error, .. } => match error.kind {
            KmsErrorKind::NotFound | KmsErrorKind::PendingDeletion => Failure::SecretGone {
                account: t.account.clone(),
                host: t.host.clone(),
                secret: t.secret.clone(),
            },
            KmsErrorKind::Throttled | KmsErrorKind::Unavailable | KmsErrorKind::Malformed => {
                Failure::KmsUnavailable
            }
            KmsErrorKind::Forbidden
            | KmsErrorKind::BadCredentials
            | KmsErrorKind::Signature
            | KmsErrorKind::Clock
            | KmsErrorKind::Transport
            | KmsErrorKind::Config => Failure::Misconfigured {
                code: kms_code(error),
            },
        },
        OnwardError::Secret { .. } => Failure::SecretUnusable {
            account: t.account.clone(),
            host: t.host.clone(),
        },
        OnwardError::HostKey { .. } => Failure::HostKeyChanged {
            host: t.host.clone(),
        },
        OnwardError::Rejected { .. } => Failure::CredentialRejected {
            host: t.host.clone(),
        },
        OnwardError::Unreachable { reason, .. } => Failure::Unreachable {
            host: t.host.clone(),
            reason: reason.clone(),
        },
        OnwardError::Refused(_) => Failure::Refused,
        OnwardError::Internal(_) => Failure::Internal,
    }
}

/// What the jump host logs for `err` (never a value).
pub fn log_detail(err: &OnwardError) -> String {
    match err {
        OnwardError::Kms { error, stage } => format!(
            "GetSecretValue({stage}) failed: {error} (code {}, RequestId {})",
            error.code.as_deref().unwrap_or("-"),
            error.request_id.as_deref().unwrap_or("-")
        ),
        OnwardError::Secret { error, version_id } => {
            format!("secret version {version_id} unusable: {error}")
        }
        OnwardError::HostKey { presented, pinned } => format!(
            "host key verification failed: target presented {}, pinned {}",
            presented.as_deref().unwrap_or("(not reported by ssh)"),
            if pinned.is_empty() {
                "(none)".to_owned()
            } else {
                pinned.join(", ")
            }
        ),
        OnwardError::Rejected { version_ids } => {
            format!(
                "target rejected the credential; VersionIds tried: {}",
                version_ids.join(", ")
            )
        }
        OnwardError::Unreachable { reason, detail } => {
            format!("onward connection failed: {reason} ({detail})")
        }
        OnwardError::Refused(why) => format!("request refused: {why}"),
        OnwardError::Internal(why) => format!("internal error: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Target {
        Target {
            account: "root".into(),
            host: "web-01".into(),
            secret: "acs/ecs/web-01/root".into(),
        }
    }

    fn kms(kind: KmsErrorKind, code: Option<&str>) -> OnwardError {
        let mut error = KmsError::new(kind, "x");
        error.code = code.map(str::to_owned);
        error.request_id = Some("RID-1".into());
        OnwardError::Kms {
            error,
            stage: "ACSCurrent",
        }
    }

    #[test]
    fn the_table() {
        let gone = "root@web-01: its secret acs/ecs/web-01/root no longer exists in KMS; ask your secret administrator";
        let cases: Vec<(OnwardError, &str)> = vec![
            (
                kms(KmsErrorKind::NotFound, Some("Forbidden.ResourceNotFound")),
                gone,
            ),
            (
                kms(
                    KmsErrorKind::PendingDeletion,
                    Some("Rejected.ResourceInUse"),
                ),
                gone,
            ),
            (
                kms(KmsErrorKind::Throttled, Some("Rejected.Throttling")),
                "KMS unavailable, try again",
            ),
            (
                kms(KmsErrorKind::Unavailable, None),
                "KMS unavailable, try again",
            ),
            (
                kms(KmsErrorKind::Malformed, None),
                "KMS unavailable, try again",
            ),
            (
                kms(
                    KmsErrorKind::BadCredentials,
                    Some("InvalidAccessKeyId.NotFound"),
                ),
                "bastion misconfigured (KMS: InvalidAccessKeyId.NotFound)",
            ),
            (
                kms(KmsErrorKind::BadCredentials, None),
                "bastion misconfigured (KMS: NoCredentials)",
            ),
            (
                kms(KmsErrorKind::Forbidden, Some("Forbidden.NoPermission")),
                "bastion misconfigured (KMS: Forbidden.NoPermission)",
            ),
            (
                kms(KmsErrorKind::Clock, Some("IllegalTimestamp")),
                "bastion misconfigured (KMS: IllegalTimestamp)",
            ),
            (
                OnwardError::Secret {
                    error: SecretError::UserNameMismatch,
                    version_id: "v1".into(),
                },
                "secret for root@web-01 is unusable",
            ),
            (
                OnwardError::HostKey {
                    presented: Some("SHA256:a".into()),
                    pinned: vec!["SHA256:b".into()],
                },
                "host key of web-01 changed; refusing",
            ),
            (
                OnwardError::Rejected {
                    version_ids: vec!["v2".into(), "v1".into()],
                },
                "web-01 rejected the credential",
            ),
            (
                OnwardError::Unreachable {
                    reason: "connection refused".into(),
                    detail: "ssh: connect to host 10.1.2.3 port 22: Connection refused".into(),
                },
                "cannot connect to web-01: connection refused",
            ),
        ];
        for (err, line) in cases {
            assert_eq!(failure_for(&err, &t()).message(), line, "{err:?}");
        }
    }

    #[test]
    fn log_details_name_codes_and_versions() {
        let d = log_detail(&kms(KmsErrorKind::Throttled, Some("Rejected.Throttling")));
        assert!(
            d.contains("Rejected.Throttling") && d.contains("RID-1"),
            "{d}"
        );
        let d = log_detail(&OnwardError::Rejected {
            version_ids: vec!["v2".into(), "v1".into()],
        });
        assert!(d.contains("v2, v1"), "{d}");
        let d = log_detail(&OnwardError::HostKey {
            presented: Some("SHA256:new".into()),
            pinned: vec!["SHA256:old".into()],
        });
        assert!(d.contains("SHA256:new") && d.contains("SHA256:old"), "{d}");
        // The engineer gets the short reason; the log keeps ssh's own line (with the address).
        let err = OnwardError::Unreachable {
            reason: "timed out".into(),
            detail: "ssh: connect to host 10.1.2.3 port 22: Connection timed out".into(),
        };
        assert!(log_detail(&err).contains("10.1.2.3"));
        assert!(!failure_for(&err, &t()).message().contains("10.1.2.3"));
    }
}
