//! Fault injection and call statistics, for the reliability tests and the benchmark.
//!
//! A fault rule applies to the next COUNT calls of one action (or `*`, every action): it
//! adds latency and/or answers with an error code instead of doing the action. Rules are
//! consumed first-in first-out per action. Stats count every call that named an action,
//! including refused and faulted ones.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// One fault rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The action it applies to, or `*`.
    pub action: String,
    /// The error answered instead of the action; `None` = latency only.
    pub error: Option<ApiError>,
    /// Calls left; `None` = every call until the faults are cleared.
    pub remaining: Option<u64>,
    /// Delay before answering.
    pub latency: Duration,
}

impl FaultRule {
    fn new(
        action: &str,
        code: Option<&str>,
        status: Option<u16>,
        count: u64,
        latency_ms: u64,
    ) -> Result<FaultRule, String> {
        if action.is_empty() {
            return Err(
                "the action is empty (use an action name such as GetSecretValue, or *)".into(),
            );
        }
        let error = code.filter(|c| !c.is_empty() && *c != "-").map(|c| {
            let mut e = ApiError::from_code(c);
            if let Some(s) = status {
                e.status = s;
            }
            e
        });
        if let Some(s) = status {
            if !(400..=599).contains(&s) {
                return Err(format!("status {s} is not an HTTP error status (400-599)"));
            }
        }
        Ok(FaultRule {
            action: action.to_owned(),
            error,
            remaining: (count > 0).then_some(count),
            latency: Duration::from_millis(latency_ms),
        })
    }

    /// Parses `--fault ACTION:CODE:COUNT[:LATENCY_MS]`. An empty CODE (or `-`) means latency
    /// only; COUNT 0 means every call.
    pub fn parse_flag(spec: &str) -> Result<FaultRule, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (action, code, count, latency) = match parts.as_slice() {
            [a, c, n] => (*a, *c, *n, "0"),
            [a, c, n, l] => (*a, *c, *n, *l),
            _ => {
                return Err(format!(
                    "--fault {spec:?}: expected ACTION:CODE:COUNT[:LATENCY_MS], e.g. GetSecretValue:Rejected.Throttling:2"
                ))
            }
        };
        let count: u64 = count
            .parse()
            .map_err(|_| format!("--fault {spec:?}: COUNT {count:?} is not a number"))?;
        let latency: u64 = latency
            .parse()
            .map_err(|_| format!("--fault {spec:?}: LATENCY_MS {latency:?} is not a number"))?;
        FaultRule::new(action, Some(code), None, count, latency)
            .map_err(|e| format!("--fault {spec:?}: {e}"))
    }

    /// Parses the body of `POST /__admin/faults`:
    /// `{"action":"GetSecretValue","code":"Rejected.Throttling","count":2,"latency_ms":0}`
    /// (`code` optional: latency only; `count` default 1, 0 = every call; optional `status`
    /// overrides the code's usual HTTP status).
    pub fn parse_admin(body: &[u8]) -> Result<FaultRule, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            action: String,
            code: Option<String>,
            count: Option<u64>,
            latency_ms: Option<u64>,
            status: Option<u16>,
        }
        let raw: Raw = serde_json::from_slice(body).map_err(|e| {
            format!("fault body must be JSON {{\"action\",\"code\",\"count\",\"latency_ms\",\"status\"}}: {e}")
        })?;
        FaultRule::new(
            &raw.action,
            raw.code.as_deref(),
            raw.status,
            raw.count.unwrap_or(1),
            raw.latency_ms.unwrap_or(0),
        )
    }
}

/// What to do to one call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Injection {
    /// Sleep this long first.
    pub latency: Duration,
    /// Then answer with this error instead of doing the action.
    pub error: Option<ApiError>,
}

/// The fault rules and the call counters.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
    calls: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    injected: u64,
}

impl Faults {
    /// Adds a rule after the existing ones.
    pub fn add(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    /// Removes every rule.
    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// Counts a call of `action`.
    pub fn count_call(&mut self, action: &str) {
        *self.calls.entry(action.to_owned()).or_default() += 1;
    }

    /// Counts an error answer by code.
    pub fn count_error(&mut self, code: &str) {
        *self.errors.entry(code.to_owned()).or_default() += 1;
    }

    /// Consumes the first rule matching `action`, if any.
    pub fn take(&mut self, action: &str) -> Option<Injection> {
        let i = self
            .rules
            .iter()
            .position(|r| r.action == action || r.action == "*")?;
        let rule = self.rules.get_mut(i)?;
        let injection = Injection {
            latency: rule.latency,
            error: rule.error.clone(),
        };
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.rules.remove(i);
            }
        }
        self.injected += 1;
        Some(injection)
    }

    /// `GET /__admin/stats`.
    pub fn stats_json(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| {
                json!({
                    "action": r.action,
                    "code": r.error.as_ref().map(|e| e.code.clone()),
                    "remaining": r.remaining,
                    "latency_ms": u64::try_from(r.latency.as_millis()).unwrap_or(u64::MAX),
                })
            })
            .collect();
        json!({
            "calls": self.calls,
            "errors": self.errors,
            "faults_injected": self.injected,
            "faults_pending": rules,
        })
    }

    /// `POST /__admin/stats/reset`: zeroes the counters (rules stay).
    pub fn reset_stats(&mut self) {
        self.calls.clear();
        self.errors.clear();
        self.injected = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_rules_fire_count_times_in_order() {
        let mut f = Faults::default();
        f.add(FaultRule::parse_flag("GetSecretValue:Rejected.Throttling:2").unwrap());
        f.add(FaultRule::parse_flag("GetSecretValue::1:250").unwrap());
        assert_eq!(f.take("ListSecrets"), None);
        for _ in 0..2 {
            let i = f.take("GetSecretValue").unwrap();
            let e = i.error.unwrap();
            assert_eq!((e.status, e.code.as_str()), (429, "Rejected.Throttling"));
        }
        let i = f.take("GetSecretValue").unwrap();
        assert_eq!(i.error, None);
        assert_eq!(i.latency, Duration::from_millis(250));
        assert_eq!(f.take("GetSecretValue"), None);
    }

    #[test]
    fn count_zero_is_persistent_until_cleared() {
        let mut f = Faults::default();
        f.add(FaultRule::parse_flag("*:ServiceUnavailableTemporary:0").unwrap());
        for _ in 0..5 {
            assert_eq!(f.take("DescribeSecret").unwrap().error.unwrap().status, 503);
        }
        f.clear();
        assert_eq!(f.take("DescribeSecret"), None);
    }

    #[test]
    fn admin_body_and_bad_specs() {
        let r = FaultRule::parse_admin(
            br#"{"action":"GetSecretValue","code":"InternalFailure","count":3,"latency_ms":5}"#,
        )
        .unwrap();
        assert_eq!(r.remaining, Some(3));
        assert_eq!(r.error.unwrap().status, 500);
        let r = FaultRule::parse_admin(br#"{"action":"GetSecretValue","latency_ms":5}"#).unwrap();
        assert_eq!((r.error, r.remaining), (None, Some(1)));
        assert!(FaultRule::parse_admin(br#"{"action":"X","bogus":1}"#).is_err());
        assert!(FaultRule::parse_flag("GetSecretValue:Rejected.Throttling").is_err());
        assert!(FaultRule::parse_flag("GetSecretValue:X:two").is_err());
    }

    #[test]
    fn stats_count_calls_and_reset() {
        let mut f = Faults::default();
        f.count_call("GetSecretValue");
        f.count_call("GetSecretValue");
        f.count_error("Rejected.Throttling");
        let s = f.stats_json();
        assert_eq!(s["calls"]["GetSecretValue"], 2);
        assert_eq!(s["errors"]["Rejected.Throttling"], 1);
        f.reset_stats();
        assert_eq!(f.stats_json()["calls"], json!({}));
    }
}
