//! The blocking KMS client: one signed POST per attempt, retried inside one deadline.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use serde_json::Value;
use zeroize::Zeroizing;

use super::credentials::{Credentials, CredentialsProvider};
use super::endpoint::Endpoint;
use super::error::{KmsError, KmsErrorKind};
use super::model::{
    self, Fields, Filter, SecretDescription, SecretStage, SecretSummary, SecretValue, SecretVersion,
};
use super::retry::{self, RetryPolicy, SystemClock};
use super::sign::{self, RpcRequest, SigningMoment};
use crate::config::{KmsSettings, SignatureAlgorithm};

/// KMS API version.
pub const API_VERSION: &str = "2016-01-20";
/// `ListSecrets` page size (the API maximum).
pub const LIST_PAGE_SIZE: u64 = 100;
/// Longest time one connection attempt may take, so that a black-holed address leaves room
/// for another attempt inside the deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response body read (a full ListSecrets page with tags is far below this).
const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
/// Upper bound on ListSecrets pages, whatever `TotalCount` claims.
const MAX_LIST_PAGES: u64 = 1000;

/// A KMS client for one endpoint and one identity. Blocking; cheap to share by reference.
#[derive(Debug)]
pub struct KmsClient {
    http: reqwest::blocking::Client,
    endpoint: Endpoint,
    signature: SignatureAlgorithm,
    credentials: CredentialsProvider,
    retry: RetryPolicy,
}

/// Everything a [`KmsClient`] needs, resolved (files read, credentials found) but without
/// the HTTP client yet: building that (TLS roots, its I/O thread) takes a few milliseconds
/// and needs no privilege, so the broker resolves this as root and builds later, off the
/// login's path ([`PreparedClient::build`]).
#[derive(Debug)]
pub struct PreparedClient {
    endpoint: Endpoint,
    credentials: CredentialsProvider,
    signature: SignatureAlgorithm,
    deadline: Duration,
    /// Certificates of `[kms] ca_file` (replacing the system roots), if set.
    ca: Option<Vec<reqwest::Certificate>>,
}

impl PreparedClient {
    /// Resolves the endpoint, the TLS trust and the credentials chain from `[kms]`.
    pub fn from_settings(settings: &KmsSettings) -> Result<Self, KmsError> {
        let endpoint = Endpoint::from_settings(settings)?;
        let credentials = CredentialsProvider::from_settings(settings)?;
        Self::new(settings, endpoint, credentials)
    }

    fn new(
        settings: &KmsSettings,
        endpoint: Endpoint,
        credentials: CredentialsProvider,
    ) -> Result<Self, KmsError> {
        let deadline = Duration::from_millis(settings.deadline_ms);
        if deadline.is_zero() {
            return Err(KmsError::new(
                KmsErrorKind::Config,
                "[kms] deadline_ms must be positive (default 5000)",
            ));
        }
        let ca = match &settings.ca_file {
            None => None,
            Some(ca) => {
                let shown = ca.display();
                let pem = std::fs::read(ca).map_err(|e| {
                    KmsError::new(
                        KmsErrorKind::Config,
                        format!("cannot read [kms] ca_file {shown}: {e}"),
                    )
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    KmsError::new(
                        KmsErrorKind::Config,
                        format!("[kms] ca_file {shown} is not a PEM certificate bundle: {e}"),
                    )
                })?;
                if certs.is_empty() {
                    return Err(KmsError::new(
                        KmsErrorKind::Config,
                        format!("[kms] ca_file {shown} holds no PEM certificate"),
                    ));
                }
                Some(certs)
            }
        };
        Ok(Self {
            endpoint,
            credentials,
            signature: settings.signature,
            deadline,
            ca,
        })
    }

    /// Builds the HTTP client.
    pub fn build(self) -> Result<KmsClient, KmsError> {
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .https_only(self.endpoint.url.scheme() == "https")
            .connect_timeout(CONNECT_TIMEOUT.min(self.deadline))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kmsbastion/", env!("CARGO_PKG_VERSION")));
        if self.endpoint.url.scheme() == "http" {
            // Loopback only (checked by Endpoint): never through a proxy.
            builder = builder.no_proxy();
        }
        if let Some(certs) = self.ca {
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| {
            KmsError::new(
                KmsErrorKind::Config,
                format!("cannot set up the HTTPS client: {e}"),
            )
        })?;
        Ok(KmsClient {
            http,
            endpoint: self.endpoint,
            signature: self.signature,
            credentials: self.credentials,
            retry: RetryPolicy::with_deadline(self.deadline),
        })
    }
}

impl KmsClient {
    /// Resolves the endpoint, the TLS trust and the credentials chain from `[kms]`.
    pub fn from_settings(settings: &KmsSettings) -> Result<Self, KmsError> {
        PreparedClient::from_settings(settings)?.build()
    }

    /// Like [`from_settings`](Self::from_settings) but signing with the given credentials
    /// instead of looking for some (tests, tools that already hold a key).
    pub fn with_credentials(
        settings: &KmsSettings,
        credentials: Credentials,
    ) -> Result<Self, KmsError> {
        let endpoint = Endpoint::from_settings(settings)?;
        PreparedClient::new(settings, endpoint, CredentialsProvider::Static(credentials))?.build()
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The retry policy in use (its `deadline` bounds every operation).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// `GetSecretValue` of the version carrying `stage`, with `FetchExtendedConfig`.
    pub fn get_secret_value(
        &self,
        name: &str,
        stage: SecretStage,
    ) -> Result<SecretValue, KmsError> {
        self.get_secret_value_with(name, &SecretVersion::Stage(stage), true)
    }

    /// `GetSecretValue` of version `version_id`, with `FetchExtendedConfig`.
    pub fn get_secret_value_by_id(
        &self,
        name: &str,
        version_id: &str,
    ) -> Result<SecretValue, KmsError> {
        self.get_secret_value_with(name, &SecretVersion::Id(version_id.to_owned()), true)
    }

    /// `GetSecretValue` with every option.
    pub fn get_secret_value_with(
        &self,
        name: &str,
        version: &SecretVersion,
        fetch_extended_config: bool,
    ) -> Result<SecretValue, KmsError> {
        let mut query = BTreeMap::new();
        query.insert("SecretName".to_owned(), name.to_owned());
        match version {
            SecretVersion::Stage(stage) => {
                query.insert("VersionStage".to_owned(), stage.as_str().to_owned())
            }
            SecretVersion::Id(id) => query.insert("VersionId".to_owned(), id.clone()),
        };
        if fetch_extended_config {
            query.insert("FetchExtendedConfig".to_owned(), "true".to_owned());
        }
        let fields = self.call("GetSecretValue", &query, &BTreeMap::new())?;
        model::secret_value(fields)
    }

    /// `ListSecrets` with `filters` (empty: all secrets) and tags, every page (100 a page) up
    /// to `TotalCount`. Each page is one call with its own deadline.
    pub fn list_secrets(&self, filters: &[Filter]) -> Result<Vec<SecretSummary>, KmsError> {
        let mut all = Vec::new();
        let mut page_number: u64 = 1;
        loop {
            let mut query = BTreeMap::new();
            query.insert("FetchTags".to_owned(), "true".to_owned());
            query.insert("PageNumber".to_owned(), page_number.to_string());
            query.insert("PageSize".to_owned(), LIST_PAGE_SIZE.to_string());
            if !filters.is_empty() {
                query.insert("Filters".to_owned(), Filter::to_param(filters));
            }
            let fields = self.call("ListSecrets", &query, &BTreeMap::new())?;
            let page = model::secret_page(&fields)?;
            let got = page.secrets.len() as u64;
            all.extend(page.secrets);
            // TotalCount decides, not a short page: a server may cap PageSize below ours.
            if got == 0 || all.len() as u64 >= page.total_count {
                return Ok(all);
            }
            if page_number >= MAX_LIST_PAGES {
                return Err(KmsError::malformed(
                    "ListSecrets",
                    "TotalCount",
                    &format!("promises more than {MAX_LIST_PAGES} pages"),
                    fields.request_id().ok(),
                    Some(200),
                ));
            }
            page_number += 1;
        }
    }

    /// `DescribeSecret` (with tags).
    pub fn describe_secret(&self, name: &str) -> Result<SecretDescription, KmsError> {
        let mut query = BTreeMap::new();
        query.insert("SecretName".to_owned(), name.to_owned());
        query.insert("FetchTags".to_owned(), "true".to_owned());
        let fields = self.call("DescribeSecret", &query, &BTreeMap::new())?;
        model::secret_description(&fields)
    }

    /// Any KMS action: `query` parameters in the URL, `body` parameters (`SecretData`) in the
    /// form body, signed, retried like every call, the JSON response returned as is. For
    /// administration and tests (CreateSecret, PutSecretValue, DeleteSecret, …).
    pub fn call_raw(
        &self,
        action: &str,
        query: &BTreeMap<String, String>,
        body: &BTreeMap<String, String>,
    ) -> Result<Value, KmsError> {
        Ok(self.call(action, query, body)?.into_value())
    }

    fn call(
        &self,
        action: &str,
        query: &BTreeMap<String, String>,
        body: &BTreeMap<String, String>,
    ) -> Result<Fields, KmsError> {
        let request = RpcRequest {
            action: action.to_owned(),
            version: API_VERSION.to_owned(),
            host: self.endpoint.host_header.clone(),
            query: query.clone(),
            body: body.clone(),
        };
        let mut rng = rand::thread_rng();
        let mut unit = || rand::Rng::gen::<f64>(&mut rng);
        retry::run(&self.retry, &SystemClock, &mut unit, |left| {
            self.attempt(&request, left)
        })
    }

    /// One signed request, with a fresh timestamp and nonce, bounded by `timeout`.
    fn attempt(&self, request: &RpcRequest, timeout: Duration) -> Result<Fields, KmsError> {
        let creds = self.credentials.credentials()?;
        let moment = SigningMoment::now();
        let signed = match self.signature {
            SignatureAlgorithm::V3 => sign::sign_v3(request, &creds, &moment),
            SignatureAlgorithm::V1 => sign::sign_v1(request, &creds, &moment),
        };
        let mut url = self.endpoint.url.clone();
        url.set_query((!signed.query_string.is_empty()).then_some(signed.query_string.as_str()));
        let mut builder = self.http.post(url).timeout(timeout);
        for (name, value) in &signed.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let response = builder
            .body(signed.body)
            .send()
            .map_err(|e| transport_error(&request.action, e, timeout))?;
        let status = response.status().as_u16();
        let header_request_id = response
            .headers()
            .get("x-acs-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Zeroizing::new(Vec::new());
        response
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| {
                KmsError::new(
                    KmsErrorKind::Unavailable,
                    format!("{}: reading the KMS response failed: {e}", request.action),
                )
            })?;
        if body.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(KmsError {
                request_id: header_request_id,
                http_status: Some(status),
                ..KmsError::new(
                    KmsErrorKind::Malformed,
                    format!(
                        "{} response is larger than {MAX_RESPONSE_BYTES} bytes",
                        request.action
                    ),
                )
            });
        }
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        if (200..300).contains(&status) {
            let Some(value) = parsed else {
                return Err(KmsError {
                    request_id: header_request_id,
                    http_status: Some(status),
                    ..KmsError::new(
                        KmsErrorKind::Malformed,
                        format!("{} response is not JSON", request.action),
                    )
                });
            };
            return Fields::new(&request.action, value, Some(status), header_request_id);
        }
        Err(error_response(parsed.as_ref(), header_request_id, status))
    }
}

/// An HTTP error response: the KMS envelope `{"Code","Message","RequestId",…}` if there is
/// one, else the status alone (a proxy or load balancer answered).
fn error_response(
    body: Option<&Value>,
    header_request_id: Option<String>,
    status: u16,
) -> KmsError {
    let field = |name: &str| {
        body.and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let request_id = field("RequestId").map(str::to_owned).or(header_request_id);
    match field("Code") {
        Some(code) => {
            KmsError::from_response(Some(code.to_owned()), field("Message"), request_id, status)
        }
        None => KmsError::from_response(
            None,
            Some(&format!("HTTP {status} without a KMS error body")),
            request_id,
            status,
        ),
    }
}

/// Classifies a failed exchange: timeouts and connection failures are `Unavailable`
/// (retried); certificate/TLS and other failures are `Transport` (not retried). The URL is
/// dropped from the message: with V1 signatures it carries the STS token.
fn transport_error(action: &str, e: reqwest::Error, timeout: Duration) -> KmsError {
    let e = e.without_url();
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    let lower = chain.to_ascii_lowercase();
    let tls = ["certificate", "tls", "handshake", "x509", "unknownissuer"]
        .iter()
        .any(|w| lower.contains(w));
    if e.is_timeout() {
        KmsError::new(
            KmsErrorKind::Unavailable,
            format!(
                "{action}: KMS did not answer within {:.1} s",
                timeout.as_secs_f64()
            ),
        )
    } else if tls {
        KmsError::new(
            KmsErrorKind::Transport,
            format!(
                "{action}: TLS with KMS failed ({chain}); check the endpoint and [kms] ca_file"
            ),
        )
    } else if e.is_connect() || e.is_request() || e.is_body() {
        KmsError::new(
            KmsErrorKind::Unavailable,
            format!("{action}: cannot reach KMS: {chain}"),
        )
    } else {
        KmsError::new(KmsErrorKind::Transport, format!("{action}: {chain}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_envelopes() {
        let body = json!({"RequestId": "r1", "HostId": "kms", "Code": "Forbidden.ResourceNotFound",
                          "Message": "The resource is not found.", "Recommend": "https://..."});
        let e = error_response(Some(&body), Some("hdr".into()), 404);
        assert_eq!(e.kind, KmsErrorKind::NotFound);
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert_eq!(e.code.as_deref(), Some("Forbidden.ResourceNotFound"));
        let e = error_response(None, Some("hdr".into()), 502);
        assert_eq!(e.kind, KmsErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert_eq!(e.request_id.as_deref(), Some("hdr"));
        let e = error_response(Some(&json!({"Code": "Rejected.Throttling"})), None, 429);
        assert_eq!(e.kind, KmsErrorKind::Throttled);
        assert!(e.is_retryable());
    }

    fn settings(text: &str) -> KmsSettings {
        toml::from_str(text).expect("settings parse")
    }

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "id".into(),
            access_key_secret: "secret".into(),
            security_token: None,
        }
    }

    #[test]
    fn construction_checks() {
        let c = KmsClient::with_credentials(&settings("region = \"cn-hangzhou\""), creds())
            .expect("builds");
        assert_eq!(c.endpoint().host_header, "kms.cn-hangzhou.aliyuncs.com");
        assert_eq!(c.retry_policy().deadline, Duration::from_secs(5));
        let e = KmsClient::with_credentials(
            &settings("endpoint = \"http://127.0.0.1:1\"\ndeadline_ms = 0"),
            creds(),
        )
        .expect_err("zero deadline");
        assert_eq!(e.kind, KmsErrorKind::Config);
        let dir = tempfile::tempdir().expect("tmp");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let e = KmsClient::with_credentials(
            &settings(&format!("region = \"cn-hangzhou\"\nca_file = {:?}", ca)),
            creds(),
        )
        .expect_err("bad ca");
        assert_eq!(e.kind, KmsErrorKind::Config);
        assert!(e.message.contains("ca_file"), "{}", e.message);
    }

    #[test]
    fn unreachable_endpoint_is_unavailable_within_the_deadline() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = dead.local_addr().expect("addr");
        drop(dead);
        let c = KmsClient::with_credentials(
            &settings(&format!("endpoint = \"http://{addr}\"\ndeadline_ms = 600")),
            creds(),
        )
        .expect("builds");
        let started = std::time::Instant::now();
        let e = c
            .get_secret_value("acs/ecs/x", SecretStage::Current)
            .expect_err("nothing listens");
        let took = started.elapsed();
        assert_eq!(e.kind, KmsErrorKind::Unavailable, "{e}");
        assert!(e.message.contains("gave up after"), "{e}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }
}
