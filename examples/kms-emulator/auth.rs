//! Request authentication, as the KMS gateway does it: V3 `ACS3-HMAC-SHA256` (header
//! signature, the SDK default) and V1 `HMAC-SHA1` (`Signature` parameter), the AccessKey,
//! the optional STS token, timestamp skew and nonce replay. The signature arithmetic is the
//! library's (`kmsbastion::kms::sign`); this file decides what is checked and which code a
//! failure gets (`shared/reference/kms-api.md` §2, §5.2, §9).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmsbastion::kms::sign;
use kmsbastion::kms::utc;
use kmsbastion::kms::Credentials;

use crate::error::ApiError;

/// Default allowed difference between the request time and ours (15 minutes).
pub const DEFAULT_SKEW: Duration = Duration::from_secs(15 * 60);

/// A request as far as authentication needs it.
#[derive(Debug, Clone, Copy)]
pub struct SignedParts<'a> {
    /// HTTP method as sent.
    pub method: &'a str,
    /// URL path as sent (the canonical URI of V3).
    pub path: &'a str,
    /// Decoded query parameters.
    pub query: &'a BTreeMap<String, String>,
    /// Decoded form-body parameters.
    pub body_params: &'a BTreeMap<String, String>,
    /// Headers, names lower-case, repeated headers joined with `,`.
    pub headers: &'a BTreeMap<String, String>,
    /// The body bytes exactly as received.
    pub raw_body: &'a [u8],
}

/// Which signature a request carried (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `ACS3-HMAC-SHA256` in `Authorization`.
    V3,
    /// `HMAC-SHA1` `Signature` parameter.
    V1,
}

/// Checks requests against the one AccessKey the emulator accepts.
pub struct Verifier {
    creds: Credentials,
    skew: Duration,
    nonces: Mutex<NonceCache>,
}

#[derive(Default)]
struct NonceCache {
    seen: HashMap<String, SystemTime>,
    last_prune: Option<SystemTime>,
}

impl NonceCache {
    /// Records `nonce`; false if it was already used within `window`.
    fn fresh(&mut self, nonce: &str, now: SystemTime, window: Duration) -> bool {
        let due = self
            .last_prune
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() > Duration::from_secs(10));
        if due {
            self.seen
                .retain(|_, t| now.duration_since(*t).unwrap_or_default() <= window);
            self.last_prune = Some(now);
        }
        match self.seen.get(nonce) {
            Some(t) if now.duration_since(*t).unwrap_or_default() <= window => false,
            _ => {
                self.seen.insert(nonce.to_owned(), now);
                true
            }
        }
    }
}

fn incomplete(detail: &str) -> ApiError {
    ApiError::new(
        400,
        "IncompleteSignature",
        format!("The request signature does not conform to Aliyun standards. ({detail})"),
    )
}

fn mismatch(string_to_sign: &str) -> ApiError {
    ApiError::new(
        400,
        "SignatureDoesNotMatch",
        format!(
            "Specified signature is not matched with our calculation. server string to sign is:{string_to_sign}"
        ),
    )
}

fn unknown_key(id: &str) -> ApiError {
    ApiError::new(
        404,
        "InvalidAccessKeyId.NotFound",
        format!("Specified access key is not found. ({id})"),
    )
}

impl Verifier {
    /// A verifier for one AccessKey pair (and STS token, when set) and a skew tolerance.
    /// Nonces are remembered for twice the tolerance: a request dated up to `skew` in the
    /// future stays acceptable that long.
    pub fn new(creds: Credentials, skew: Duration) -> Verifier {
        Verifier {
            creds,
            skew,
            nonces: Mutex::new(NonceCache::default()),
        }
    }

    /// Authenticates one request. The order follows the gateway: who (AccessKey), when
    /// (timestamp), what (signature), then token and nonce, so a forged request can neither
    /// learn the token check nor burn a nonce.
    pub fn verify(&self, req: &SignedParts<'_>, now: SystemTime) -> Result<Scheme, ApiError> {
        if let Some(auth) = req.headers.get("authorization") {
            self.verify_v3(req, auth, now)?;
            Ok(Scheme::V3)
        } else if req.query.contains_key("Signature") || req.body_params.contains_key("Signature") {
            self.verify_v1(req, now)?;
            Ok(Scheme::V1)
        } else {
            Err(incomplete(
                "neither an Authorization header (ACS3-HMAC-SHA256) nor a Signature parameter (HMAC-SHA1)",
            ))
        }
    }

    fn check_key(&self, id: &str) -> Result<(), ApiError> {
        if id == self.creds.access_key_id {
            Ok(())
        } else {
            Err(unknown_key(id))
        }
    }

    fn check_time(&self, value: Option<&str>, what: &str, now: SystemTime) -> Result<(), ApiError> {
        let Some(value) = value else {
            return Err(ApiError::new(
                400,
                "IllegalTimestamp",
                format!(
                    "The input parameter \"{what}\" that is mandatory for processing this request is not supplied."
                ),
            ));
        };
        let t = utc::parse(value).ok_or_else(|| {
            ApiError::new(
                400,
                "IllegalTimestamp",
                format!("The input parameter \"{what}\" is not in yyyy-MM-ddTHH:mm:ssZ (UTC): {value:?}"),
            )
        })?;
        let diff = match now.duration_since(t) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        if diff > self.skew {
            return Err(ApiError::new(
                400,
                "InvalidTimeStamp.Expired",
                format!(
                    "Specified time stamp or date value is expired. ({what} {value}, server time {}, tolerance {} s)",
                    utc::format(now),
                    self.skew.as_secs()
                ),
            ));
        }
        Ok(())
    }

    fn check_token(&self, sent: Option<&str>) -> Result<(), ApiError> {
        match (self.creds.security_token.as_ref(), sent) {
            (None, None) => Ok(()),
            (Some(want), Some(got)) if sign::signatures_match(want.expose(), got) => Ok(()),
            (Some(_), Some(_)) => Err(ApiError::new(
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
                "Specified SecurityToken mismatch with the AccessKey.",
            )),
            (Some(_), None) => Err(ApiError::new(
                400,
                "InvalidSecurityToken.Malformed",
                "This AccessKey needs a SecurityToken (STS credentials) and none was sent.",
            )),
            (None, Some(_)) => Err(ApiError::new(
                400,
                "InvalidSecurityToken.Malformed",
                "A SecurityToken was sent for an AccessKey that has none.",
            )),
        }
    }

    fn check_nonce(
        &self,
        nonce: Option<&str>,
        what: &str,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        let nonce = nonce
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::missing(what))?;
        let window = self.skew * 2;
        let fresh = match self.nonces.lock() {
            Ok(mut cache) => cache.fresh(nonce, now, window),
            Err(poisoned) => poisoned.into_inner().fresh(nonce, now, window),
        };
        if fresh {
            Ok(())
        } else {
            Err(ApiError::new(
                400,
                "SignatureNonceUsed",
                "Specified signature nonce was used already.",
            ))
        }
    }

    fn verify_v1(&self, req: &SignedParts<'_>, now: SystemTime) -> Result<(), ApiError> {
        let mut params: BTreeMap<String, String> = req.query.clone();
        for (k, v) in req.body_params {
            params.insert(k.clone(), v.clone());
        }
        let signature = params.remove("Signature").unwrap_or_default();
        let get = |k: &str| params.get(k).map(String::as_str);
        match get("SignatureMethod") {
            Some("HMAC-SHA1") => {}
            Some(other) => {
                return Err(incomplete(&format!(
                    "SignatureMethod {other:?} is not HMAC-SHA1"
                )))
            }
            None => return Err(ApiError::missing("SignatureMethod")),
        }
        match get("SignatureVersion") {
            Some("1.0") => {}
            Some(other) => {
                return Err(incomplete(&format!(
                    "SignatureVersion {other:?} is not 1.0"
                )))
            }
            None => return Err(ApiError::missing("SignatureVersion")),
        }
        let id = get("AccessKeyId").ok_or_else(|| ApiError::missing("AccessKeyId"))?;
        self.check_key(id)?;
        self.check_time(get("Timestamp"), "Timestamp", now)?;
        let string_to_sign =
            sign::v1_string_to_sign(req.method, &sign::v1_canonical_query(&params));
        let expected = sign::v1_signature(self.creds.access_key_secret.expose(), &string_to_sign);
        if !sign::signatures_match(&expected, &signature) {
            return Err(mismatch(&string_to_sign));
        }
        self.check_token(get("SecurityToken"))?;
        self.check_nonce(get("SignatureNonce"), "SignatureNonce", now)
    }

    fn verify_v3(
        &self,
        req: &SignedParts<'_>,
        auth: &str,
        now: SystemTime,
    ) -> Result<(), ApiError> {
        let auth = sign::V3Authorization::parse(auth).ok_or_else(|| {
            incomplete("Authorization must be ACS3-HMAC-SHA256 Credential=...,SignedHeaders=...,Signature=...")
        })?;
        self.check_key(&auth.credential)?;
        if let Some(id) = req.headers.get("x-acs-accesskey-id") {
            if id != &auth.credential {
                return Err(incomplete("x-acs-accesskey-id differs from the Credential"));
            }
        }
        // Every header that carries request meaning must be covered by the signature.
        let must_sign = req.headers.keys().filter(|h| {
            h.as_str() == "host" || h.as_str() == "content-type" || h.starts_with("x-acs-")
        });
        for h in must_sign {
            if !auth.signed_headers.iter().any(|s| s == h) {
                return Err(incomplete(&format!("header {h} is not in SignedHeaders")));
            }
        }
        let mut signed = BTreeMap::new();
        for name in &auth.signed_headers {
            let value = req
                .headers
                .get(name.as_str())
                .ok_or_else(|| incomplete(&format!("signed header {name} is missing")))?;
            signed.insert(name.clone(), value.clone());
        }
        self.check_time(
            req.headers.get("x-acs-date").map(String::as_str),
            "x-acs-date",
            now,
        )?;
        let body_hash = sign::sha256_hex(req.raw_body);
        match req.headers.get("x-acs-content-sha256") {
            Some(h) if h.eq_ignore_ascii_case(&body_hash) => {}
            Some(_) => return Err(ApiError::new(
                400,
                "SignatureDoesNotMatch",
                "The x-acs-content-sha256 header does not match the SHA-256 of the request body.",
            )),
            None => return Err(incomplete("header x-acs-content-sha256 is missing")),
        }
        let canonical =
            sign::v3_canonical_request(req.method, req.path, req.query, &signed, &body_hash);
        let string_to_sign = sign::v3_string_to_sign(&canonical);
        let expected = sign::v3_signature(self.creds.access_key_secret.expose(), &string_to_sign);
        if !sign::signatures_match(&expected, &auth.signature) {
            return Err(mismatch(&string_to_sign));
        }
        self.check_token(req.headers.get("x-acs-security-token").map(String::as_str))?;
        self.check_nonce(
            req.headers.get("x-acs-signature-nonce").map(String::as_str),
            "x-acs-signature-nonce",
            now,
        )
    }
}

/// Unix seconds of `t` (0 before the epoch).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsbastion::kms::sign::{RpcRequest, SignedRequest, SigningMoment};
    use kmsbastion::sensitive::SecretString;

    fn creds(secret: &str, token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "testid".into(),
            access_key_secret: SecretString::from(secret),
            security_token: token.map(SecretString::from),
        }
    }

    fn request() -> RpcRequest {
        let mut query = BTreeMap::new();
        query.insert("SecretName".to_owned(), "acs/ecs/web 01/root".to_owned());
        let mut body = BTreeMap::new();
        body.insert("SecretData".to_owned(), "{\"a\":\"b c+d\"}".to_owned());
        RpcRequest {
            action: "PutSecretValue".into(),
            version: "2016-01-20".into(),
            host: "127.0.0.1:9100".into(),
            query,
            body,
        }
    }

    struct Wire {
        query: BTreeMap<String, String>,
        body_params: BTreeMap<String, String>,
        headers: BTreeMap<String, String>,
        body: Vec<u8>,
    }

    fn wire(s: &SignedRequest) -> Wire {
        let body = s.body.clone();
        let text = String::from_utf8(body.clone()).unwrap();
        Wire {
            query: sign::parse_form(&s.query_string)
                .unwrap()
                .into_iter()
                .collect(),
            body_params: sign::parse_form(&text).unwrap().into_iter().collect(),
            headers: s.headers.iter().cloned().collect(),
            body,
        }
    }

    fn check(v: &Verifier, w: &Wire, now: SystemTime) -> Result<Scheme, ApiError> {
        v.verify(
            &SignedParts {
                method: "POST",
                path: "/",
                query: &w.query,
                body_params: &w.body_params,
                headers: &w.headers,
                raw_body: &w.body,
            },
            now,
        )
    }

    fn code(r: Result<Scheme, ApiError>) -> String {
        r.map(|_| "ok".to_owned())
            .unwrap_or_else(|e| format!("{} {}", e.status, e.code))
    }

    #[test]
    fn both_schemes_verify_and_replays_are_refused() {
        let now = SystemTime::now();
        let v = Verifier::new(creds("testsecret", None), DEFAULT_SKEW);
        let m = SigningMoment::now();
        let w3 = wire(&sign::sign_v3(&request(), &creds("testsecret", None), &m));
        assert_eq!(check(&v, &w3, now).unwrap(), Scheme::V3);
        assert_eq!(code(check(&v, &w3, now)), "400 SignatureNonceUsed");
        let w1 = wire(&sign::sign_v1(
            &request(),
            &creds("testsecret", None),
            &SigningMoment::now(),
        ));
        assert_eq!(check(&v, &w1, now).unwrap(), Scheme::V1);
        assert_eq!(code(check(&v, &w1, now)), "400 SignatureNonceUsed");
    }

    #[test]
    fn wrong_secret_unknown_key_skew_and_tampering() {
        let now = SystemTime::now();
        let v = Verifier::new(creds("testsecret", None), DEFAULT_SKEW);
        for signer in [sign::sign_v3, sign::sign_v1] {
            let w = wire(&signer(
                &request(),
                &creds("wrong", None),
                &SigningMoment::now(),
            ));
            assert_eq!(code(check(&v, &w, now)), "400 SignatureDoesNotMatch");
            let other = Credentials {
                access_key_id: "someone".into(),
                ..creds("testsecret", None)
            };
            let w = wire(&signer(&request(), &other, &SigningMoment::now()));
            assert_eq!(code(check(&v, &w, now)), "404 InvalidAccessKeyId.NotFound");
            let old = SigningMoment::at(now - Duration::from_secs(16 * 60), sign::new_nonce());
            let w = wire(&signer(&request(), &creds("testsecret", None), &old));
            assert_eq!(code(check(&v, &w, now)), "400 InvalidTimeStamp.Expired");
            let mut w = wire(&signer(
                &request(),
                &creds("testsecret", None),
                &SigningMoment::now(),
            ));
            w.query.insert("SecretName".into(), "other".into());
            assert_eq!(code(check(&v, &w, now)), "400 SignatureDoesNotMatch");
        }
    }

    #[test]
    fn v3_body_hash_and_unsigned_headers() {
        let now = SystemTime::now();
        let v = Verifier::new(creds("testsecret", None), DEFAULT_SKEW);
        let mut w = wire(&sign::sign_v3(
            &request(),
            &creds("testsecret", None),
            &SigningMoment::now(),
        ));
        w.body = b"SecretData=evil".to_vec();
        assert_eq!(code(check(&v, &w, now)), "400 SignatureDoesNotMatch");
        let mut w = wire(&sign::sign_v3(
            &request(),
            &creds("testsecret", None),
            &SigningMoment::now(),
        ));
        w.headers.insert("x-acs-extra".into(), "1".into());
        assert_eq!(code(check(&v, &w, now)), "400 IncompleteSignature");
        let mut w = wire(&sign::sign_v3(
            &request(),
            &creds("testsecret", None),
            &SigningMoment::now(),
        ));
        w.headers.remove("authorization");
        assert_eq!(code(check(&v, &w, now)), "400 IncompleteSignature");
    }

    #[test]
    fn sts_token_is_required_when_configured() {
        let now = SystemTime::now();
        let v = Verifier::new(creds("testsecret", Some("tok")), DEFAULT_SKEW);
        for signer in [sign::sign_v3, sign::sign_v1] {
            let ok = wire(&signer(
                &request(),
                &creds("testsecret", Some("tok")),
                &SigningMoment::now(),
            ));
            assert!(check(&v, &ok, now).is_ok());
            let bad = wire(&signer(
                &request(),
                &creds("testsecret", Some("nope")),
                &SigningMoment::now(),
            ));
            assert_eq!(
                code(check(&v, &bad, now)),
                "400 InvalidSecurityToken.MismatchWithAccessKey"
            );
            let none = wire(&signer(
                &request(),
                &creds("testsecret", None),
                &SigningMoment::now(),
            ));
            assert_eq!(
                code(check(&v, &none, now)),
                "400 InvalidSecurityToken.Malformed"
            );
        }
    }

    #[test]
    fn nonce_cache_forgets_after_the_window() {
        let mut c = NonceCache::default();
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let w = Duration::from_secs(60);
        assert!(c.fresh("n", t, w));
        assert!(!c.fresh("n", t + Duration::from_secs(59), w));
        assert!(c.fresh("n", t + Duration::from_secs(200), w));
    }
}
