//! Typed KMS errors: what went wrong (a [`KmsErrorKind`] the caller decides on) plus what
//! KMS said (Code, Message, RequestId, HTTP status) for the logs.
//!
//! Every KMS error code kmsbastion knows is mapped to a kind in ONE table, [`CODE_KINDS`];
//! [`kind_for`] is the only place that reads it. Messages never contain secret values: the
//! client builds them from codes, field names and counts, and server messages that echo the
//! request (the "server string to sign is: …" of `SignatureDoesNotMatch`) are cut.
#![forbid(unsafe_code)]

use std::fmt;

/// What kind of failure a KMS call ended in: what the caller (broker, CLI) decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsErrorKind {
    /// The secret (or version/stage) does not exist or was deleted for good.
    NotFound,
    /// The secret is scheduled for deletion (inside its recovery window).
    PendingDeletion,
    /// The credentials are valid but not allowed to do this (RAM policy, overdue account).
    Forbidden,
    /// KMS throttled the request (`Rejected.Throttling`). Retryable.
    Throttled,
    /// KMS is temporarily unavailable, failed internally, timed out or could not be reached.
    /// Retryable.
    Unavailable,
    /// The AccessKey or STS token is unknown, disabled or expired, or no credentials could
    /// be found.
    BadCredentials,
    /// KMS rejected the request signature (or a reused nonce).
    Signature,
    /// The request timestamp is too far from KMS's clock: fix the host's time.
    Clock,
    /// KMS (or whatever answered) sent a response that is not what the API promises.
    Malformed,
    /// The HTTP exchange failed for a reason retrying will not fix (TLS, certificate, a
    /// redirect, an unreadable response).
    Transport,
    /// kmsbastion's own `[kms]` settings or the request are wrong (endpoint, CA file,
    /// credentials file, an invalid parameter or unknown action reported by KMS).
    Config,
}

impl KmsErrorKind {
    /// A short description for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotFound => "secret not found in KMS",
            Self::PendingDeletion => "secret is scheduled for deletion in KMS",
            Self::Forbidden => "KMS refused: no permission",
            Self::Throttled => "KMS throttled the request",
            Self::Unavailable => "KMS unavailable",
            Self::BadCredentials => "KMS credentials rejected or missing",
            Self::Signature => "KMS rejected the request signature",
            Self::Clock => "clock skew: KMS rejected the request time",
            Self::Malformed => "malformed KMS response",
            Self::Transport => "KMS connection failed",
            Self::Config => "KMS client misconfigured",
        }
    }
}

/// The KMS error codes kmsbastion distinguishes, with their kinds (kms-api.md §5.2).
/// Codes not listed fall back on the HTTP status, see [`kind_for`].
pub const CODE_KINDS: &[(&str, KmsErrorKind)] = &[
    ("Forbidden.ResourceNotFound", KmsErrorKind::NotFound),
    ("Forbidden.KeyNotFound", KmsErrorKind::NotFound),
    (
        "Rejected.ResourceInDeleteWindow",
        KmsErrorKind::PendingDeletion,
    ),
    ("Forbidden.NoPermission", KmsErrorKind::Forbidden),
    ("Forbidden.RAM", KmsErrorKind::Forbidden),
    ("Forbidden.InDebt", KmsErrorKind::Forbidden),
    ("Forbidden.InDebtOverdue", KmsErrorKind::Forbidden),
    ("Rejected.Throttling", KmsErrorKind::Throttled),
    ("Throttling", KmsErrorKind::Throttled),
    ("ServiceUnavailableTemporary", KmsErrorKind::Unavailable),
    ("ServiceUnavailable", KmsErrorKind::Unavailable),
    ("InternalFailure", KmsErrorKind::Unavailable),
    ("InternalError", KmsErrorKind::Unavailable),
    ("InvalidAccessKeyId.NotFound", KmsErrorKind::BadCredentials),
    ("InvalidAccessKeyId.Inactive", KmsErrorKind::BadCredentials),
    ("InvalidAccessKeyId", KmsErrorKind::BadCredentials),
    ("InvalidSecurityToken.Expired", KmsErrorKind::BadCredentials),
    (
        "InvalidSecurityToken.Malformed",
        KmsErrorKind::BadCredentials,
    ),
    (
        "InvalidSecurityToken.MismatchWithAccessKey",
        KmsErrorKind::BadCredentials,
    ),
    ("SignatureDoesNotMatch", KmsErrorKind::Signature),
    ("IncompleteSignature", KmsErrorKind::Signature),
    ("SignatureNonceUsed", KmsErrorKind::Signature),
    ("InvalidTimeStamp.Expired", KmsErrorKind::Clock),
    ("IllegalTimestamp", KmsErrorKind::Config),
    ("InvalidParameter", KmsErrorKind::Config),
    ("MissingParameter", KmsErrorKind::Config),
    ("InvalidAction.NotFound", KmsErrorKind::Config),
    ("InvalidVersion", KmsErrorKind::Config),
    ("Rejected.ResourceExist", KmsErrorKind::Config),
    ("Rejected.LimitExceeded", KmsErrorKind::Config),
];

/// The codes retried inside the deadline (what the official secrets-manager clients retry).
/// Everything else with a code is final: not-found, permission and credential errors above
/// all must never be retried.
pub const RETRYABLE_CODES: &[&str] = &[
    "Rejected.Throttling",
    "ServiceUnavailableTemporary",
    "InternalFailure",
];

/// The kind of a KMS error response: by code from [`CODE_KINDS`], else by HTTP status
/// (429 throttled, 5xx unavailable, 401/403 forbidden, 404 not found is NOT assumed for an
/// unknown code — an unknown action also answers 404 — so other statuses are `Config`).
pub fn kind_for(code: Option<&str>, http_status: Option<u16>) -> KmsErrorKind {
    if let Some(code) = code {
        if let Some((_, kind)) = CODE_KINDS.iter().find(|(c, _)| *c == code) {
            return *kind;
        }
    }
    match http_status {
        Some(429) => KmsErrorKind::Throttled,
        Some(s) if s >= 500 => KmsErrorKind::Unavailable,
        Some(401 | 403) => KmsErrorKind::Forbidden,
        _ => KmsErrorKind::Config,
    }
}

/// A failed KMS operation. `Display` gives the kind, the KMS Code and the RequestId, and
/// never a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsError {
    /// What the caller decides on.
    pub kind: KmsErrorKind,
    /// The KMS error `Code`, when KMS answered with one.
    pub code: Option<String>,
    /// What happened (KMS's `Message`, or ours), and for our own errors what to do.
    pub message: String,
    /// KMS `RequestId` (to quote to Alibaba Cloud support), when there was a response.
    pub request_id: Option<String>,
    /// HTTP status, when there was a response.
    pub http_status: Option<u16>,
}

impl KmsError {
    /// An error found on our side (no response from KMS involved).
    pub fn new(kind: KmsErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: None,
            message: message.into(),
            request_id: None,
            http_status: None,
        }
    }

    /// An error response from KMS, classified through [`kind_for`].
    pub fn from_response(
        code: Option<String>,
        message: Option<&str>,
        request_id: Option<String>,
        http_status: u16,
    ) -> Self {
        let kind = kind_for(code.as_deref(), Some(http_status));
        let message = match message {
            Some(m) if !m.trim().is_empty() => sanitize_server_message(m),
            _ => kind.describe().to_owned(),
        };
        Self {
            kind,
            code,
            message,
            request_id,
            http_status: Some(http_status),
        }
    }

    /// A response that does not match the API: `field` names what was missing or ill-typed
    /// (never its value).
    pub fn malformed(
        action: &str,
        field: &str,
        problem: &str,
        request_id: Option<String>,
        http_status: Option<u16>,
    ) -> Self {
        Self {
            kind: KmsErrorKind::Malformed,
            code: None,
            message: format!("{action} response: field `{field}` {problem}"),
            request_id,
            http_status,
        }
    }

    /// Whether the call may succeed if repeated: `Rejected.Throttling`,
    /// `ServiceUnavailableTemporary`, `InternalFailure`, timeouts and connection errors (and a
    /// 429/5xx without a KMS error body, which comes from whatever fronts KMS). Never a
    /// not-found, permission, credential, signature or clock error.
    pub fn is_retryable(&self) -> bool {
        match &self.code {
            Some(code) => RETRYABLE_CODES.contains(&code.as_str()),
            None => matches!(
                self.kind,
                KmsErrorKind::Throttled | KmsErrorKind::Unavailable
            ),
        }
    }
}

/// Cuts the part of a server message that echoes the request back: the V1 string to sign
/// contains every parameter, including `SecretData` of a PutSecretValue.
fn sanitize_server_message(m: &str) -> String {
    let lower = m.to_ascii_lowercase();
    let cut = ["string to sign", "stringtosign", "canonical request"]
        .iter()
        .filter_map(|needle| lower.find(needle))
        .min();
    let kept = match cut {
        Some(at) => format!(
            "{} [request echo removed]",
            m.get(..at).unwrap_or("").trim_end()
        ),
        None => m.to_owned(),
    };
    // One line, bounded: this goes to syslog.
    let one_line: String = kept
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    one_line
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.describe())?;
        if let Some(code) = &self.code {
            write!(f, " (KMS {code})")?;
        }
        write!(f, ": {}", self.message)?;
        let mut extra = Vec::new();
        if let Some(status) = self.http_status {
            extra.push(format!("HTTP {status}"));
        }
        if let Some(id) = &self.request_id {
            extra.push(format!("RequestId {id}"));
        }
        if !extra.is_empty() {
            write!(f, " [{}]", extra.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for KmsError {}

#[cfg(test)]
mod tests {
    use super::*;
    use KmsErrorKind::*;

    /// Every row of the table, plus the status fallbacks, with the retry decision.
    #[test]
    fn code_table() {
        let expected: &[(&str, u16, KmsErrorKind, bool)] = &[
            ("Forbidden.ResourceNotFound", 404, NotFound, false),
            ("Forbidden.KeyNotFound", 404, NotFound, false),
            (
                "Rejected.ResourceInDeleteWindow",
                409,
                PendingDeletion,
                false,
            ),
            ("Forbidden.NoPermission", 403, Forbidden, false),
            ("Forbidden.RAM", 403, Forbidden, false),
            ("Forbidden.InDebt", 403, Forbidden, false),
            ("Forbidden.InDebtOverdue", 403, Forbidden, false),
            ("Rejected.Throttling", 429, Throttled, true),
            ("Throttling", 400, Throttled, false),
            ("ServiceUnavailableTemporary", 503, Unavailable, true),
            ("ServiceUnavailable", 503, Unavailable, false),
            ("InternalFailure", 500, Unavailable, true),
            ("InternalError", 500, Unavailable, false),
            ("InvalidAccessKeyId.NotFound", 404, BadCredentials, false),
            ("InvalidAccessKeyId.Inactive", 400, BadCredentials, false),
            ("InvalidAccessKeyId", 400, BadCredentials, false),
            ("InvalidSecurityToken.Expired", 400, BadCredentials, false),
            ("InvalidSecurityToken.Malformed", 400, BadCredentials, false),
            (
                "InvalidSecurityToken.MismatchWithAccessKey",
                400,
                BadCredentials,
                false,
            ),
            ("SignatureDoesNotMatch", 400, Signature, false),
            ("IncompleteSignature", 400, Signature, false),
            ("SignatureNonceUsed", 400, Signature, false),
            ("InvalidTimeStamp.Expired", 400, Clock, false),
            ("IllegalTimestamp", 400, Config, false),
            ("InvalidParameter", 400, Config, false),
            ("MissingParameter", 400, Config, false),
            ("InvalidAction.NotFound", 404, Config, false),
            ("InvalidVersion", 400, Config, false),
            ("Rejected.ResourceExist", 409, Config, false),
            ("Rejected.LimitExceeded", 400, Config, false),
        ];
        assert_eq!(
            expected.len(),
            CODE_KINDS.len(),
            "every table row is tested"
        );
        for (code, status, kind, retry) in expected {
            let e = KmsError::from_response(Some((*code).to_owned()), Some("m"), None, *status);
            assert_eq!(e.kind, *kind, "{code}");
            assert_eq!(e.is_retryable(), *retry, "{code}");
        }
        // Unknown codes: by status, and never retried (only the listed codes are).
        for (status, kind) in [
            (429, Throttled),
            (500, Unavailable),
            (503, Unavailable),
            (403, Forbidden),
            (404, Config),
            (400, Config),
        ] {
            let e = KmsError::from_response(Some("Something.New".into()), None, None, status);
            assert_eq!(e.kind, kind, "{status}");
            assert!(!e.is_retryable(), "{status}");
        }
        // No KMS envelope at all (a proxy's 502/503/429): retried; other statuses not.
        for (status, retry) in [
            (502, true),
            (503, true),
            (429, true),
            (404, false),
            (400, false),
        ] {
            let e = KmsError::from_response(None, None, None, status);
            assert_eq!(e.is_retryable(), retry, "{status}");
        }
    }

    #[test]
    fn display_has_code_and_request_id() {
        let e = KmsError::from_response(
            Some("Forbidden.ResourceNotFound".into()),
            Some("The resource is not found."),
            Some("6a3e9c36-1150".into()),
            404,
        );
        let s = e.to_string();
        assert_eq!(
            s,
            "secret not found in KMS (KMS Forbidden.ResourceNotFound): The resource is not found. [HTTP 404, RequestId 6a3e9c36-1150]"
        );
    }

    #[test]
    fn server_echo_of_the_request_is_cut() {
        let e = KmsError::from_response(
            Some("SignatureDoesNotMatch".into()),
            Some("Specified signature is not matched with our calculation. server string to sign is:POST&%2F&SecretData%3Dhunter2"),
            None,
            400,
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.message.contains("not matched"));
        let e = KmsError::from_response(None, Some("a\nb"), None, 500);
        assert_eq!(e.message, "a b");
    }
}
