//! KMS credentials and where they come from.
//!
//! Sources, as `[kms] credentials` selects them:
//! * `chain` (default): the environment, then `credentials_file` if configured, then the ECS
//!   instance RAM role; the first source that is present wins. A source that is present but
//!   broken (half the environment, an unreadable or group-readable file) is an error, never
//!   silently skipped: a typo must not send the bastion off to another identity.
//! * `env`: `ALIBABA_CLOUD_ACCESS_KEY_ID`, `ALIBABA_CLOUD_ACCESS_KEY_SECRET`, optional
//!   `ALIBABA_CLOUD_SECURITY_TOKEN`.
//! * `file`: `key = value` lines (`access_key_id`, `access_key_secret`, optional
//!   `security_token`; `#` comments); the file must not be accessible by group or others.
//! * `ecs-ram-role`: STS credentials of the instance's RAM role from the metadata service
//!   (hardened mode: a session token first), refreshed 15 minutes before they expire.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use super::error::{KmsError, KmsErrorKind};
use super::utc;
use crate::config::{CredentialSource, KmsSettings};
use crate::sensitive::SecretString;

/// Environment variable holding the AccessKey id.
pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
/// Environment variable holding the AccessKey secret.
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
/// Environment variable holding an STS security token (optional).
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";

/// The ECS instance metadata service.
pub const METADATA_BASE_URL: &str = "http://100.100.100.200";
/// Lifetime asked for the metadata session token (the maximum, 6 h).
pub const METADATA_TOKEN_TTL_SECONDS: u32 = 21_600;
/// Connect and read timeout towards the metadata service (it is link-local and fast).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(1);
/// RAM-role credentials are refreshed this long before they expire.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(15 * 60);
/// Largest credentials file accepted.
const MAX_CREDENTIALS_FILE: u64 = 64 * 1024;

/// One set of credentials to sign with. `Debug` never shows the secret or the token.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// AccessKey id (`STS.…` for temporary credentials). Not secret: it names the key.
    pub access_key_id: String,
    /// AccessKey secret.
    pub access_key_secret: SecretString,
    /// STS security token, for temporary credentials (ECS RAM role, env with a token).
    pub security_token: Option<SecretString>,
}

fn config_err(message: String) -> KmsError {
    KmsError::new(KmsErrorKind::Config, message)
}

fn cred_err(message: String) -> KmsError {
    KmsError::new(KmsErrorKind::BadCredentials, message)
}

/// Where signing credentials come from for the life of a client.
#[derive(Debug)]
pub enum CredentialsProvider {
    /// Fixed credentials (environment, file, or given by the caller).
    Static(Credentials),
    /// The ECS instance RAM role, refreshed before expiry.
    EcsRamRole(EcsRamRole),
}

impl CredentialsProvider {
    /// Resolves the source `settings.credentials` selects (see the module documentation).
    /// For the RAM role this fetches the first credentials, so a missing role is reported
    /// here rather than at the first KMS call.
    pub fn from_settings(settings: &KmsSettings) -> Result<Self, KmsError> {
        Self::resolve(
            settings,
            &|name| std::env::var(name).ok(),
            &metadata_base_url(),
        )
    }

    /// [`from_settings`](Self::from_settings) with the environment and the metadata service
    /// given (tests).
    fn resolve(
        settings: &KmsSettings,
        env: &dyn Fn(&str) -> Option<String>,
        metadata_base: &str,
    ) -> Result<Self, KmsError> {
        let ecs = || -> Result<Self, KmsError> {
            let role = EcsRamRole::new(metadata_base.to_owned(), settings.ram_role.clone())?;
            role.credentials()?;
            Ok(Self::EcsRamRole(role))
        };
        match settings.credentials {
            CredentialSource::Env => from_env(env)?.map(Self::Static).ok_or_else(|| {
                cred_err(format!(
                    "[kms] credentials = \"env\" but {ENV_ACCESS_KEY_ID} and \
                     {ENV_ACCESS_KEY_SECRET} are not set"
                ))
            }),
            CredentialSource::File => match &settings.credentials_file {
                Some(path) => Ok(Self::Static(from_file(path)?)),
                None => Err(config_err(
                    "[kms] credentials = \"file\" needs credentials_file = \"/etc/kmsbastion/credentials\""
                        .to_owned(),
                )),
            },
            CredentialSource::EcsRamRole => ecs(),
            CredentialSource::Chain => {
                if let Some(c) = from_env(env)? {
                    return Ok(Self::Static(c));
                }
                if let Some(path) = &settings.credentials_file {
                    return Ok(Self::Static(from_file(path)?));
                }
                ecs().map_err(|e| KmsError {
                    message: format!(
                        "no KMS credentials: {ENV_ACCESS_KEY_ID}/{ENV_ACCESS_KEY_SECRET} are not \
                         set, no credentials_file is configured, and the ECS RAM role failed ({})",
                        e.message
                    ),
                    ..e
                })
            }
        }
    }

    /// Credentials to sign the next request with (refreshing RAM-role credentials when they
    /// are within [`REFRESH_BEFORE_EXPIRY`] of expiring).
    pub fn credentials(&self) -> Result<Credentials, KmsError> {
        match self {
            Self::Static(c) => Ok(c.clone()),
            Self::EcsRamRole(r) => r.credentials(),
        }
    }
}

/// The metadata base URL: fixed, except that test builds may point it elsewhere through
/// `KMSBASTION_TEST_METADATA_URL` (never in release builds: an environment variable must not
/// be able to redirect where a root service fetches its credentials from).
fn metadata_base_url() -> String {
    #[cfg(any(test, feature = "test-metadata-override"))]
    if let Ok(url) = std::env::var("KMSBASTION_TEST_METADATA_URL") {
        return url;
    }
    METADATA_BASE_URL.to_owned()
}

/// Reads the environment source through `get`. `Ok(None)` when neither variable is set; an
/// error when only one of the pair is.
fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Credentials>, KmsError> {
    let id = get(ENV_ACCESS_KEY_ID).filter(|v| !v.is_empty());
    let secret = get(ENV_ACCESS_KEY_SECRET)
        .filter(|v| !v.is_empty())
        .map(SecretString::new);
    let token = get(ENV_SECURITY_TOKEN)
        .filter(|v| !v.is_empty())
        .map(SecretString::new);
    match (id, secret) {
        (Some(access_key_id), Some(access_key_secret)) => Ok(Some(Credentials {
            access_key_id,
            access_key_secret,
            security_token: token,
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(cred_err(format!(
            "{ENV_ACCESS_KEY_ID} is set but {ENV_ACCESS_KEY_SECRET} is not; set both or neither"
        ))),
        (None, Some(_)) => Err(cred_err(format!(
            "{ENV_ACCESS_KEY_SECRET} is set but {ENV_ACCESS_KEY_ID} is not; set both or neither"
        ))),
    }
}

/// Reads a credentials file. Refused unless it is a regular file without any group or other
/// permission bits (checked on the opened file, so the check and the read see the same file).
pub fn from_file(path: &Path) -> Result<Credentials, KmsError> {
    let shown = path.display();
    let file = File::open(path)
        .map_err(|e| config_err(format!("cannot open credentials file {shown}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| config_err(format!("cannot stat credentials file {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(config_err(format!(
            "credentials file {shown} is not a regular file"
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(config_err(format!(
            "credentials file {shown} is accessible by group or others (mode {mode:04o}); \
             run `chmod 600 {shown}`"
        )));
    }
    if meta.len() > MAX_CREDENTIALS_FILE {
        return Err(config_err(format!(
            "credentials file {shown} is larger than {MAX_CREDENTIALS_FILE} bytes"
        )));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_CREDENTIALS_FILE)
        .read_to_string(&mut text)
        .map_err(|e| config_err(format!("cannot read credentials file {shown}: {e}")))?;
    parse_credentials_file(&text)
        .map_err(|(line, why)| config_err(format!("{shown}:{line}: {why}")))
}

/// Parses `key = value` lines; values may be wrapped in double quotes. Errors carry the
/// 1-based line number and never the value.
fn parse_credentials_file(text: &str) -> Result<Credentials, (usize, String)> {
    let mut id: Option<String> = None;
    let mut secret: Option<SecretString> = None;
    let mut token: Option<SecretString> = None;
    let mut last_line = 0;
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        last_line = line_no;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((line_no, "expected `key = value`".to_owned()));
        };
        let key = key.trim();
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if value.is_empty() {
            return Err((line_no, format!("`{key}` is empty")));
        }
        let slot_taken = match key {
            "access_key_id" => id.replace(value.to_owned()).is_some(),
            "access_key_secret" => secret.replace(SecretString::from(value)).is_some(),
            "security_token" => token.replace(SecretString::from(value)).is_some(),
            other => {
                return Err((
                    line_no,
                    format!(
                        "unknown key `{other}` (expected access_key_id, access_key_secret, \
                         security_token)"
                    ),
                ))
            }
        };
        if slot_taken {
            return Err((line_no, format!("`{key}` given twice")));
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(access_key_secret)) => Ok(Credentials {
            access_key_id,
            access_key_secret,
            security_token: token,
        }),
        (None, _) => Err((last_line, "access_key_id is missing".to_owned())),
        (_, None) => Err((last_line, "access_key_secret is missing".to_owned())),
    }
}

/// STS credentials of the ECS instance's RAM role, from the instance metadata service.
#[derive(Debug)]
pub struct EcsRamRole {
    base: String,
    role: Option<String>,
    http: reqwest::blocking::Client,
    cache: Mutex<Option<(Credentials, SystemTime)>>,
}

impl EcsRamRole {
    /// Talks to `base` (always [`METADATA_BASE_URL`] outside test builds); `role` is
    /// discovered from the metadata service when `None`.
    fn new(base: String, role: Option<String>) -> Result<Self, KmsError> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(METADATA_TIMEOUT)
            .timeout(METADATA_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| {
                KmsError::new(
                    KmsErrorKind::Transport,
                    format!("cannot build the metadata HTTP client: {e}"),
                )
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            role,
            http,
            cache: Mutex::new(None),
        })
    }

    /// A test-build constructor pointing at a local metadata server.
    #[cfg(any(test, feature = "test-metadata-override"))]
    pub fn with_base_url(base: &str, role: Option<String>) -> Result<Self, KmsError> {
        Self::new(base.to_owned(), role)
    }

    /// Cached credentials, or fresh ones when the cache is empty or within
    /// [`REFRESH_BEFORE_EXPIRY`] of expiring. If a refresh fails while the cached credentials
    /// have not expired yet, those are used (the next call tries again).
    pub fn credentials(&self) -> Result<Credentials, KmsError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = SystemTime::now();
        if let Some((creds, expiry)) = cache.as_ref() {
            if now + REFRESH_BEFORE_EXPIRY < *expiry {
                return Ok(creds.clone());
            }
        }
        match self.fetch() {
            Ok((creds, expiry)) => {
                *cache = Some((creds.clone(), expiry));
                Ok(creds)
            }
            Err(e) => match cache.as_ref() {
                Some((creds, expiry)) if now < *expiry => Ok(creds.clone()),
                _ => Err(e),
            },
        }
    }

    fn meta_err(&self, what: &str, detail: impl std::fmt::Display) -> KmsError {
        cred_err(format!(
            "ECS RAM role: {what} from the instance metadata service {} failed: {detail}",
            self.base
        ))
    }

    fn fetch(&self) -> Result<(Credentials, SystemTime), KmsError> {
        let token = self
            .http
            .put(format!("{}/latest/api/token", self.base))
            .header(
                "X-aliyun-ecs-metadata-token-ttl-seconds",
                METADATA_TOKEN_TTL_SECONDS.to_string(),
            )
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .map_err(|e| self.meta_err("getting a session token", e))?;
        let token = SecretString::new(token.trim().to_owned());
        if token.is_empty() {
            return Err(self.meta_err("getting a session token", "empty token"));
        }
        let get = |path: &str| {
            self.http
                .get(format!(
                    "{}/latest/meta-data/ram/security-credentials/{path}",
                    self.base
                ))
                .header("X-aliyun-ecs-metadata-token", token.expose())
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.text())
                .map(Zeroizing::new)
        };
        let role = match &self.role {
            Some(r) => r.clone(),
            None => {
                let listing = get("").map_err(|e| {
                    self.meta_err(
                        "discovering the RAM role (is one attached to this instance?)",
                        e,
                    )
                })?;
                listing
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        self.meta_err(
                            "discovering the RAM role",
                            "no role is attached to this instance",
                        )
                    })?
            }
        };
        if role.is_empty() || role.contains(['/', '?', '#']) {
            return Err(cred_err(format!("invalid RAM role name {role:?}")));
        }
        let body = get(&role)
            .map_err(|e| self.meta_err(&format!("getting credentials of RAM role {role}"), e))?;
        parse_role_credentials(&body)
            .map_err(|why| self.meta_err(&format!("getting credentials of RAM role {role}"), why))
    }
}

/// Parses the metadata service's credentials JSON: `Code` must be `Success`; `AccessKeyId`,
/// `AccessKeySecret`, `SecurityToken` and `Expiration` (`yyyy-MM-ddTHH:mm:ssZ`) are needed.
fn parse_role_credentials(body: &str) -> Result<(Credentials, SystemTime), String> {
    let mut v: serde_json::Value =
        serde_json::from_str(body).map_err(|_| "the answer is not JSON".to_owned())?;
    let mut take = |field: &str| -> Result<String, String> {
        match v.get_mut(field).map(serde_json::Value::take) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
            Some(_) => Err(format!("field `{field}` is not a non-empty string")),
            None => Err(format!("field `{field}` is missing")),
        }
    };
    let code = take("Code")?;
    if code != "Success" {
        return Err(format!("Code is {code:?}, not \"Success\""));
    }
    let access_key_id = take("AccessKeyId")?;
    let access_key_secret = SecretString::new(take("AccessKeySecret")?);
    let security_token = SecretString::new(take("SecurityToken")?);
    let expiration = take("Expiration")?;
    let expiry = utc::parse(&expiration)
        .ok_or_else(|| format!("field `Expiration` is not a UTC timestamp: {expiration:?}"))?;
    Ok((
        Credentials {
            access_key_id,
            access_key_secret,
            security_token: Some(security_token),
        },
        expiry,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::{Arc, Mutex as StdMutex};

    #[test]
    fn env_source() {
        let vars: HashMap<&str, &str> = [
            (ENV_ACCESS_KEY_ID, "LTAIid"),
            (ENV_ACCESS_KEY_SECRET, "s3cret"),
            (ENV_SECURITY_TOKEN, "tok"),
        ]
        .into();
        let get = |k: &str| vars.get(k).map(|v| (*v).to_owned());
        let c = from_env(&get).expect("ok").expect("present");
        assert_eq!(c.access_key_id, "LTAIid");
        assert_eq!(c.access_key_secret.expose(), "s3cret");
        assert_eq!(
            c.security_token.as_ref().map(SecretString::expose),
            Some("tok")
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("tok\""), "{dbg}");

        let none = |_: &str| None;
        assert!(from_env(&none).expect("ok").is_none());
        let half = |k: &str| (k == ENV_ACCESS_KEY_ID).then(|| "id".to_owned());
        let e = from_env(&half).expect_err("half");
        assert_eq!(e.kind, KmsErrorKind::BadCredentials);
        assert!(e.message.contains(ENV_ACCESS_KEY_SECRET));
    }

    fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn file_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_file(
            dir.path(),
            "ok",
            "# kms\naccess_key_id = LTAIid\naccess_key_secret = \"s3 cret\"\n\nsecurity_token=t0k\n",
            0o600,
        );
        let c = from_file(&p).expect("reads");
        assert_eq!(c.access_key_id, "LTAIid");
        assert_eq!(c.access_key_secret.expose(), "s3 cret");
        assert_eq!(
            c.security_token.as_ref().map(SecretString::expose),
            Some("t0k")
        );

        for mode in [0o640, 0o604, 0o660, 0o644, 0o610] {
            let p = write_file(
                dir.path(),
                &format!("m{mode:o}"),
                "access_key_id=a\naccess_key_secret=b\n",
                mode,
            );
            let e = from_file(&p).expect_err("mode refused");
            assert_eq!(e.kind, KmsErrorKind::Config);
            assert!(e.message.contains("chmod 600"), "{}", e.message);
        }
        let p = write_file(
            dir.path(),
            "r",
            "access_key_id=a\naccess_key_secret=b\n",
            0o400,
        );
        assert!(from_file(&p).is_ok());

        for (text, expect) in [
            ("access_key_id=a\n", "access_key_secret is missing"),
            ("access_key_secret=hunter2\n", "access_key_id is missing"),
            (
                "access_key_id=a\naccess_key_secret=b\nregion=x\n",
                ":3: unknown key `region`",
            ),
            ("access_key_id a\n", ":1: expected `key = value`"),
            (
                "access_key_id=a\naccess_key_id=b\naccess_key_secret=c\n",
                ":2: `access_key_id` given twice",
            ),
        ] {
            let p = write_file(dir.path(), "bad", text, 0o600);
            let e = from_file(&p).expect_err(text);
            assert!(e.message.contains(expect), "{text:?}: {}", e.message);
            assert!(!e.message.contains("hunter2"));
        }
        let e = from_file(&dir.path().join("missing")).expect_err("missing");
        assert_eq!(e.kind, KmsErrorKind::Config);
        let e = from_file(dir.path()).expect_err("a directory");
        assert!(
            e.message.contains("not a regular file") || e.message.contains("chmod"),
            "{}",
            e.message
        );
    }

    /// One request seen by the metadata server: method, path, token header, ttl header.
    type Seen = (String, String, Option<String>, Option<String>);

    /// A tiny metadata service that records every request.
    struct MetadataServer {
        url: String,
        log: Arc<StdMutex<Vec<Seen>>>,
        _thread: std::thread::JoinHandle<()>,
    }

    fn metadata_server(
        role: &'static str,
        expiration: String,
        code: &'static str,
    ) -> MetadataServer {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", server.server_addr().to_ip().expect("ip"));
        let log = Arc::new(StdMutex::new(Vec::new()));
        let log2 = Arc::clone(&log);
        let thread = std::thread::spawn(move || {
            for req in server.incoming_requests() {
                let header = |name: &str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                        .map(|h| h.value.as_str().to_owned())
                };
                let token = header("X-aliyun-ecs-metadata-token");
                let ttl = header("X-aliyun-ecs-metadata-token-ttl-seconds");
                let method = req.method().as_str().to_owned();
                let path = req.url().to_owned();
                log2.lock().expect("log").push((
                    method.clone(),
                    path.clone(),
                    token.clone(),
                    ttl.clone(),
                ));
                let creds_path = format!("/latest/meta-data/ram/security-credentials/{role}");
                let (status, body) = match (method.as_str(), path.as_str()) {
                    ("PUT", "/latest/api/token") if ttl.as_deref() == Some("21600") => {
                        (200, "tok-123".to_owned())
                    }
                    ("GET", _) if token.as_deref() != Some("tok-123") => (401, String::new()),
                    ("GET", "/latest/meta-data/ram/security-credentials/") => {
                        (200, role.to_owned())
                    }
                    ("GET", p) if p == creds_path => (
                        200,
                        format!(
                            r#"{{"AccessKeyId":"STS.id","AccessKeySecret":"sts-secret","Expiration":"{expiration}","SecurityToken":"sts-token","LastUpdated":"2017-10-31T23:20:01Z","Code":"{code}"}}"#
                        ),
                    ),
                    _ => (404, String::new()),
                };
                let _ =
                    req.respond(tiny_http::Response::from_string(body).with_status_code(status));
            }
        });
        MetadataServer {
            url,
            log,
            _thread: thread,
        }
    }

    #[test]
    fn ecs_ram_role_flow_with_discovery_and_caching() {
        let expiry = utc::format(SystemTime::now() + Duration::from_secs(6 * 3600));
        let srv = metadata_server("bastion-role", expiry, "Success");
        let role = EcsRamRole::with_base_url(&srv.url, None).expect("client");
        let c = role.credentials().expect("credentials");
        assert_eq!(c.access_key_id, "STS.id");
        assert_eq!(c.access_key_secret.expose(), "sts-secret");
        assert_eq!(
            c.security_token.as_ref().map(SecretString::expose),
            Some("sts-token")
        );
        let log = srv.log.lock().expect("log").clone();
        let seen: Vec<(&str, &str)> = log
            .iter()
            .map(|(m, p, _, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("PUT", "/latest/api/token"),
                ("GET", "/latest/meta-data/ram/security-credentials/"),
                (
                    "GET",
                    "/latest/meta-data/ram/security-credentials/bastion-role"
                ),
            ]
        );
        assert_eq!(log[0].3.as_deref(), Some("21600"));
        assert!(log[1..]
            .iter()
            .all(|(_, _, t, _)| t.as_deref() == Some("tok-123")));
        // Valid for hours: served from the cache.
        role.credentials().expect("cached");
        assert_eq!(srv.log.lock().expect("log").len(), 3);
    }

    #[test]
    fn ecs_ram_role_refreshes_near_expiry_and_uses_configured_role() {
        // Expires in 10 minutes: inside the 15-minute window, so every call refreshes.
        let expiry = utc::format(SystemTime::now() + Duration::from_secs(600));
        let srv = metadata_server("r1", expiry, "Success");
        let role = EcsRamRole::with_base_url(&srv.url, Some("r1".into())).expect("client");
        role.credentials().expect("first");
        role.credentials().expect("second");
        let log = srv.log.lock().expect("log").clone();
        let paths: Vec<&str> = log.iter().map(|(_, p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "/latest/api/token",
                "/latest/meta-data/ram/security-credentials/r1",
                "/latest/api/token",
                "/latest/meta-data/ram/security-credentials/r1",
            ],
            "no discovery when the role is configured; refetched near expiry"
        );
    }

    #[test]
    fn ecs_ram_role_errors() {
        let expiry = utc::format(SystemTime::now() + Duration::from_secs(6 * 3600));
        let srv = metadata_server("r1", expiry, "Failed");
        let role = EcsRamRole::with_base_url(&srv.url, None).expect("client");
        let e = role.credentials().expect_err("Code != Success");
        assert_eq!(e.kind, KmsErrorKind::BadCredentials);
        assert!(e.message.contains("Success"), "{}", e.message);

        let expiry = utc::format(SystemTime::now() + Duration::from_secs(6 * 3600));
        let srv = metadata_server("r1", expiry, "Success");
        let role = EcsRamRole::with_base_url(&srv.url, Some("other".into())).expect("client");
        let e = role.credentials().expect_err("unknown role");
        assert!(e.message.contains("RAM role other"), "{}", e.message);

        // Nothing listening: fails fast (1 s timeouts), naming the metadata service.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", dead.local_addr().expect("addr"));
        drop(dead);
        let started = std::time::Instant::now();
        let role = EcsRamRole::with_base_url(&url, None).expect("client");
        let e = role.credentials().expect_err("unreachable");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(e.message.contains("session token"), "{}", e.message);
    }

    #[test]
    fn chain_order_and_single_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_file(
            dir.path(),
            "creds",
            "access_key_id = FILEid\naccess_key_secret = f\n",
            0o600,
        );
        let expiry = utc::format(SystemTime::now() + Duration::from_secs(6 * 3600));
        let srv = metadata_server("role", expiry, "Success");
        let settings = |text: &str| -> KmsSettings { toml::from_str(text).expect("settings") };
        let with_env = |k: &str| match k {
            ENV_ACCESS_KEY_ID => Some("ENVid".to_owned()),
            ENV_ACCESS_KEY_SECRET => Some("e".to_owned()),
            _ => None,
        };
        let no_env = |_: &str| None;
        let id = |p: Result<CredentialsProvider, KmsError>| {
            p.expect("resolves")
                .credentials()
                .expect("credentials")
                .access_key_id
        };
        let file_line = format!("credentials_file = {file:?}");

        // chain: env, then file, then the RAM role
        let chain_file = settings(&file_line);
        assert_eq!(
            id(CredentialsProvider::resolve(
                &chain_file,
                &with_env,
                &srv.url
            )),
            "ENVid"
        );
        assert_eq!(
            id(CredentialsProvider::resolve(&chain_file, &no_env, &srv.url)),
            "FILEid"
        );
        let chain = settings("");
        assert_eq!(
            id(CredentialsProvider::resolve(&chain, &no_env, &srv.url)),
            "STS.id"
        );
        // chain with nothing reachable: one error that lists what was tried
        let e = CredentialsProvider::resolve(&chain, &no_env, "http://127.0.0.1:1")
            .expect_err("nothing");
        assert_eq!(e.kind, KmsErrorKind::BadCredentials);
        assert!(e.message.contains("no KMS credentials"), "{}", e.message);

        // single sources never fall through
        let only_file = settings(&format!("credentials = \"file\"\n{file_line}"));
        assert_eq!(
            id(CredentialsProvider::resolve(
                &only_file, &with_env, &srv.url
            )),
            "FILEid"
        );
        let file_no_path = settings("credentials = \"file\"");
        assert_eq!(
            CredentialsProvider::resolve(&file_no_path, &with_env, &srv.url)
                .expect_err("no path")
                .kind,
            KmsErrorKind::Config
        );
        let only_env = settings(&format!("credentials = \"env\"\n{file_line}"));
        assert_eq!(
            id(CredentialsProvider::resolve(&only_env, &with_env, &srv.url)),
            "ENVid"
        );
        assert!(CredentialsProvider::resolve(&only_env, &no_env, &srv.url).is_err());
        let only_ecs = settings(&format!("credentials = \"ecs-ram-role\"\n{file_line}"));
        assert_eq!(
            id(CredentialsProvider::resolve(&only_ecs, &with_env, &srv.url)),
            "STS.id"
        );
    }

    #[test]
    fn role_credentials_json() {
        let ok = r#"{"Code":"Success","AccessKeyId":"STS.a","AccessKeySecret":"b","SecurityToken":"c","Expiration":"2017-11-01T05:20:01Z","Extra":1}"#;
        let (c, exp) = parse_role_credentials(ok).expect("parses");
        assert_eq!(c.access_key_id, "STS.a");
        assert_eq!(utc::format(exp), "2017-11-01T05:20:01Z");
        let e = parse_role_credentials(
            r#"{"Code":"Success","AccessKeyId":"a","AccessKeySecret":"hunter2","Expiration":"x"}"#,
        )
        .expect_err("no token");
        assert!(e.contains("SecurityToken") && !e.contains("hunter2"), "{e}");
        assert!(parse_role_credentials("nope").is_err());
    }
}
