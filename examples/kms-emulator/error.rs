//! The KMS error envelope: one type for every refusal the emulator answers with, and the
//! constructors that pin each situation to the code and HTTP status real KMS uses
//! (`shared/reference/kms-api.md` §5.2).
#![forbid(unsafe_code)]

use std::fmt;

/// One error response: HTTP status, the POP `Code` and a `Message` for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status line code.
    pub status: u16,
    /// The `Code` field (`Forbidden.ResourceNotFound`, `SignatureDoesNotMatch`, ...).
    pub code: String,
    /// The `Message` field.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit status, code and message.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// 404 `Forbidden.ResourceNotFound`: no such secret (never created, force-deleted,
    /// or its recovery window has passed) or no such version / stage.
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            404,
            "Forbidden.ResourceNotFound",
            format!("The resource is not found. ({what})"),
        )
    }

    /// The refusal for any read or write of a secret that is pending deletion.
    ///
    /// This is the ONE place that decides it. Real KMS does not document the code for
    /// GetSecretValue/PutSecretValue inside the recovery window; the only code it documents
    /// for that state is 409 `Rejected.ResourceInDeleteWindow` ("The secret is planned to be
    /// deleted.", CreateSecret with the name of a secret pending deletion). We use it for every
    /// operation that needs a live secret because (a) it is a real KMS code, (b) it is a 4xx
    /// that no client retries, and (c) it lets a client tell "deleted, but restorable" apart
    /// from "gone" (404) and tell the administrator so, while both still refuse the login.
    pub fn pending_deletion(name: &str) -> ApiError {
        ApiError::new(
            409,
            "Rejected.ResourceInDeleteWindow",
            format!("The secret is planned to be deleted. ({name})"),
        )
    }

    /// 409 `Rejected.ResourceExist`.
    pub fn exists(what: &str) -> ApiError {
        ApiError::new(
            409,
            "Rejected.ResourceExist",
            format!("The resource already exists. ({what})"),
        )
    }

    /// 400 `InvalidParameter` with the reason appended to the KMS text.
    pub fn invalid(detail: impl fmt::Display) -> ApiError {
        ApiError::new(
            400,
            "InvalidParameter",
            format!("The specified parameter is invalid. ({detail})"),
        )
    }

    /// 400 `MissingParameter` naming the parameter, in the POP gateway's wording.
    pub fn missing(param: &str) -> ApiError {
        ApiError::new(
            400,
            "MissingParameter",
            format!(
                "The input parameter \"{param}\" that is mandatory for processing this request is not supplied."
            ),
        )
    }

    /// 400 `Rejected.LimitExceeded`.
    pub fn limit(detail: &str) -> ApiError {
        ApiError::new(400, "Rejected.LimitExceeded", detail.to_owned())
    }

    /// 400 `Rejected.RotationFailed`: the rotation hook (the stand-in for Cloud Assistant)
    /// failed, so the new version was not applied to the instance and no stage moved. The code
    /// is ours: real KMS rotates asynchronously and reports failures only as events.
    pub fn rotation_failed(detail: impl fmt::Display) -> ApiError {
        ApiError::new(
            400,
            "Rejected.RotationFailed",
            format!("The secret rotation failed; no version stage was changed. ({detail})"),
        )
    }

    /// 500 `InternalFailure`: something broke inside the emulator itself (state file I/O).
    pub fn internal(detail: impl fmt::Display) -> ApiError {
        ApiError::new(
            500,
            "InternalFailure",
            format!("Internal Failure ({detail})"),
        )
    }

    /// The HTTP status KMS answers with for a code, used for injected faults.
    /// Codes the table does not know are client errors (400).
    pub fn status_for_code(code: &str) -> u16 {
        match code {
            "Rejected.Throttling" => 429,
            "InternalFailure" => 500,
            "ServiceUnavailableTemporary" | "ServiceUnavailable" => 503,
            "Forbidden.ResourceNotFound"
            | "Forbidden.KeyNotFound"
            | "InvalidAccessKeyId.NotFound"
            | "InvalidAction.NotFound" => 404,
            "Forbidden.NoPermission" | "Forbidden.InDebt" | "Forbidden.InDebtOverdue" => 403,
            "Rejected.ResourceExist" | "Rejected.ResourceInDeleteWindow" => 409,
            _ => 400,
        }
    }

    /// The usual message for a code, used for injected faults.
    pub fn from_code(code: &str) -> ApiError {
        let message = match code {
            "Rejected.Throttling" => "QPS Limit Exceeded",
            "InternalFailure" => "Internal Failure",
            "ServiceUnavailableTemporary" => "Service Unavailable Temporary.",
            "Forbidden.ResourceNotFound" => "The resource is not found.",
            "Forbidden.NoPermission" => "This operation is forbidden by permission system.",
            "InvalidAccessKeyId.NotFound" => "Specified access key is not found.",
            "Rejected.ResourceInDeleteWindow" => "The secret is planned to be deleted.",
            _ => "Injected fault.",
        };
        ApiError::new(ApiError::status_for_code(code), code, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_codes_get_their_kms_status() {
        assert_eq!(ApiError::from_code("Rejected.Throttling").status, 429);
        assert_eq!(
            ApiError::from_code("ServiceUnavailableTemporary").status,
            503
        );
        assert_eq!(ApiError::from_code("InternalFailure").status, 500);
        assert_eq!(ApiError::from_code("Forbidden.NoPermission").status, 403);
        assert_eq!(ApiError::from_code("Whatever.Else").status, 400);
    }
}
