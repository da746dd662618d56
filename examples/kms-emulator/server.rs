//! The HTTP side: decoding a request (query and form body, GET or POST, V1 `Action` or V3
//! `x-acs-action`), authentication, fault injection, dispatch, and the JSON response or
//! error envelope with a `RequestId`. Also the unsigned admin endpoints.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde_json::{json, Map, Value};
use tiny_http::{Method, Request};

use kmsbastion::kms::sign;

use crate::actions::{self, Params, API_VERSION};
use crate::auth::{self, SignedParts, Verifier};
use crate::error::ApiError;
use crate::faults::{FaultRule, Faults};
use crate::persist::StateDir;
use crate::state::Store;

/// Largest request body accepted (SecretData is at most 30 KB; the rest is headroom).
const MAX_BODY: u64 = 1024 * 1024;

/// Everything the request handlers share.
pub struct Emulator {
    store: Mutex<Store>,
    state_dir: StateDir,
    verifier: Verifier,
    faults: Mutex<Faults>,
    hook: Option<String>,
    region: String,
    account: String,
    admin: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A handler that panicked mid-update cannot leave the store half-written on disk
    // (saves are atomic), so carrying on with the in-memory value is the useful choice.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> (SystemTime, u64) {
    let t = SystemTime::now();
    (t, auth::unix(t))
}

impl Emulator {
    /// A new emulator over a loaded store.
    pub fn new(
        store: Store,
        state_dir: StateDir,
        verifier: Verifier,
        faults: Faults,
        hook: Option<String>,
        region: String,
        admin: bool,
    ) -> Emulator {
        Emulator {
            store: Mutex::new(store),
            state_dir,
            verifier,
            faults: Mutex::new(faults),
            hook,
            region,
            account: "1234567890123456".to_owned(),
            admin,
        }
    }

    /// The region in ARNs and the default `ExtendedConfig.RegionId`.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// `acs:kms:<region>:<account>:secret/<name>`.
    pub fn arn(&self, name: &str) -> String {
        format!("acs:kms:{}:{}:secret/{name}", self.region, self.account)
    }

    /// The `--rotation-hook` command.
    pub fn rotation_hook(&self) -> Option<&str> {
        self.hook.as_deref()
    }

    /// Runs `f` on the store without saving (reads; purging expired secrets needs `&mut`).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&mut Store, u64) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut store = lock(&self.store);
        f(&mut store, now().1)
    }

    /// Runs `f` on the store and saves it atomically; if the save fails the change is
    /// undone and the caller gets `InternalFailure`.
    pub fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Store, u64) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut store = lock(&self.store);
        let before = store.clone();
        let out = f(&mut store, now().1)?;
        if let Err(e) = self.state_dir.save(&store) {
            *store = before;
            eprintln!("kms-emulator: cannot save state: {e}");
            return Err(ApiError::internal(format!("cannot save state: {e}")));
        }
        Ok(out)
    }

    /// Saves the store (at shutdown).
    pub fn flush(&self) -> std::io::Result<()> {
        let store = lock(&self.store);
        self.state_dir.save(&store)
    }

    /// Serves one HTTP request.
    pub fn handle(&self, mut req: Request) {
        let started = Instant::now();
        let request_id = new_request_id();
        let path = req.url().split('?').next().unwrap_or("/").to_owned();
        if path.starts_with("/__admin/") {
            let (status, body) = if self.admin {
                self.admin(&mut req, &path)
            } else {
                let e = "admin endpoints are served only on a loopback listen address";
                (404, json!({ "error": e }))
            };
            respond(req, status, &body, &request_id);
            return;
        }
        let (label, result) = self.api(&mut req, &path);
        let (status, body) = match result {
            Ok(mut fields) => {
                fields.insert("RequestId".into(), request_id.clone().into());
                (200, Value::Object(fields))
            }
            Err(e) => {
                lock(&self.faults).count_error(&e.code);
                (e.status, self.error_body(&e, &req, &request_id))
            }
        };
        let code = body.get("Code").and_then(Value::as_str).unwrap_or("");
        eprintln!(
            "kms-emulator: {} {label} {status} {code} {:.1}ms",
            req.method(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        respond(req, status, &body, &request_id);
    }

    fn error_body(&self, e: &ApiError, req: &Request, request_id: &str) -> Value {
        let host =
            header(req, "host").unwrap_or_else(|| format!("kms.{}.aliyuncs.com", self.region));
        json!({
            "RequestId": request_id,
            "HostId": host,
            "Code": e.code,
            "Message": e.message,
            "Recommend": format!(
                "https://api.aliyun.com/troubleshoot?q={}&product=Kms&requestId={request_id}",
                e.code
            ),
        })
    }

    /// The API proper. Returns a label for the log line (the action) and the outcome.
    fn api(&self, req: &mut Request, path: &str) -> (String, Result<Map<String, Value>, ApiError>) {
        let method = req.method().as_str().to_ascii_uppercase();
        if !matches!(req.method(), Method::Get | Method::Post) {
            return (
                "-".into(),
                Err(ApiError::new(
                    404,
                    "InvalidAction.NotFound",
                    "Specified api is not found, please check your url and method.",
                )),
            );
        }
        let decoded = match decode(req) {
            Ok(d) => d,
            Err(e) => return ("-".into(), Err(e)),
        };
        let mut params = decoded.query.clone();
        for (k, v) in &decoded.body_params {
            params.insert(k.clone(), v.clone());
        }
        let action = decoded
            .headers
            .get("x-acs-action")
            .or_else(|| params.get("Action"))
            .cloned();
        let Some(action) = action else {
            return ("-".into(), Err(ApiError::missing("Action")));
        };
        lock(&self.faults).count_call(&action);
        let result = (|| {
            let version = decoded
                .headers
                .get("x-acs-version")
                .or_else(|| params.get("Version"))
                .ok_or_else(|| ApiError::missing("Version"))?;
            if version != API_VERSION {
                return Err(ApiError::new(
                    400,
                    "InvalidVersion",
                    format!("Specified parameter Version is not valid. ({version}; KMS is {API_VERSION})"),
                ));
            }
            if !actions::ACTIONS.contains(&action.as_str()) {
                return actions::dispatch(self, &action, &Params(&params));
            }
            let (t, _) = now();
            self.verifier.verify(
                &SignedParts {
                    method: &method,
                    path,
                    query: &decoded.query,
                    body_params: &decoded.body_params,
                    headers: &decoded.headers,
                    raw_body: &decoded.raw_body,
                },
                t,
            )?;
            let injection = lock(&self.faults).take(&action);
            if let Some(inj) = injection {
                if !inj.latency.is_zero() {
                    std::thread::sleep(inj.latency);
                }
                if let Some(e) = inj.error {
                    return Err(e);
                }
            }
            actions::dispatch(self, &action, &Params(&params))
        })();
        (action, result)
    }

    /// `/__admin/*`: fault rules and call statistics (unsigned; loopback listeners only).
    fn admin(&self, req: &mut Request, path: &str) -> (u16, Value) {
        let mut body = Vec::new();
        if let Err(e) = req.as_reader().take(MAX_BODY).read_to_end(&mut body) {
            return (
                400,
                json!({ "error": format!("cannot read the body: {e}") }),
            );
        }
        match (req.method(), path) {
            (Method::Post, "/__admin/faults") => match FaultRule::parse_admin(&body) {
                Ok(rule) => {
                    lock(&self.faults).add(rule);
                    (200, json!({ "ok": true }))
                }
                Err(e) => (400, json!({ "error": e })),
            },
            (Method::Delete, "/__admin/faults") => {
                lock(&self.faults).clear();
                (200, json!({ "ok": true }))
            }
            (Method::Get, "/__admin/stats") => (200, lock(&self.faults).stats_json()),
            (Method::Post, "/__admin/stats/reset") => {
                lock(&self.faults).reset_stats();
                (200, json!({ "ok": true }))
            }
            _ => (
                404,
                json!({ "error": "unknown admin endpoint: POST/DELETE /__admin/faults, GET /__admin/stats, POST /__admin/stats/reset" }),
            ),
        }
    }
}

struct Decoded {
    query: BTreeMap<String, String>,
    body_params: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    raw_body: Vec<u8>,
}

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_owned())
}

fn decode(req: &mut Request) -> Result<Decoded, ApiError> {
    let bad = |what: &str| ApiError::invalid(format!("{what} is not valid UTF-8 form encoding"));
    let query_text = req.url().split_once('?').map_or("", |(_, q)| q).to_owned();
    let query = sign::parse_form(&query_text)
        .ok_or_else(|| bad("the query string"))?
        .into_iter()
        .collect();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for h in req.headers() {
        let name = h.field.as_str().as_str().to_ascii_lowercase();
        let value = h.value.as_str().to_owned();
        headers
            .entry(name)
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let mut raw_body = Vec::new();
    req.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut raw_body)
        .map_err(|e| ApiError::invalid(format!("cannot read the body: {e}")))?;
    if raw_body.len() as u64 > MAX_BODY {
        return Err(ApiError::invalid("the request body is larger than 1 MiB"));
    }
    let is_form = headers.get("content-type").is_none_or(|ct| {
        ct.to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    let body_params = if is_form && !raw_body.is_empty() {
        let text = std::str::from_utf8(&raw_body).map_err(|_| bad("the body"))?;
        sign::parse_form(text)
            .ok_or_else(|| bad("the body"))?
            .into_iter()
            .collect()
    } else {
        BTreeMap::new()
    };
    Ok(Decoded {
        query,
        body_params,
        headers,
        raw_body,
    })
}

fn new_request_id() -> String {
    let b: [u8; 16] = rand::random();
    let part = |r: std::ops::Range<usize>| b.get(r).map(hex::encode_upper).unwrap_or_default();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..4),
        part(4..6),
        part(6..8),
        part(8..10),
        part(10..16)
    )
}

/// Sends the JSON answer, written by hand with `Connection: close`.
///
/// Why by hand: tiny_http 0.12 serves each connection as one task of a thread pool whose
/// hand-off can leave a new connection queued behind tasks that never end while their
/// keep-alive connections sit idle (seen as a 60 s stall with 50 concurrent SDK clients), and
/// it drops any `Connection` header set on a `Response`. A client told `Connection: close`
/// hangs up after one exchange, so every task ends promptly and the pool keeps moving.
fn respond(req: Request, status: u16, body: &Value, request_id: &str) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json;charset=utf-8\r\nContent-Length: {}\r\nx-acs-request-id: {request_id}\r\nConnection: close\r\n\r\n",
        tiny_http::StatusCode(status).default_reason_phrase(),
        body.len()
    );
    let mut writer = req.into_writer();
    let sent = writer
        .write_all(head.as_bytes())
        .and_then(|()| writer.write_all(body.as_bytes()))
        .and_then(|()| writer.flush());
    if let Err(e) = sent {
        eprintln!("kms-emulator: cannot send the response: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_kms_ones() {
        let id = new_request_id();
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_ne!(id, new_request_id());
    }
}
