//! Grant evaluation: may this engineer reach `account@host` now, from this address?
//!
//! A rule applies when it names the engineer (directly or through one of its groups) and one
//! of its `account@host` patterns matches. An applicable rule allows when the time window
//! holds (`not_before <= now < not_after`) and, if it lists source networks, the source
//! address lies in one of them (an unknown source never satisfies a `from` list). The first
//! allowing rule wins; when none allows, the reason is the first applicable rule's failed
//! check (or "no rule"). Pure: the caller passes the clock and the source address.
#![forbid(unsafe_code)]

use crate::config::{format_rfc3339_utc, Config};
use crate::login::LoginString;
use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by rule number `rule` (0-based index into `Config::grants`).
    Allow {
        /// Index of the allowing rule.
        rule: usize,
        /// When that rule stops allowing, if ever.
        not_after: Option<SystemTime>,
    },
    /// Refused, and why.
    Deny(DenyReason),
}

impl Decision {
    /// Whether the login is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Which check refused a login. `Display` is for logs (names the rule by index and line);
/// [`DenyReason::engineer_message`] is what the engineer may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No `[[engineer]]` with this name.
    UnknownEngineer,
    /// No `[[host]]` with this name.
    UnknownHost,
    /// The host exists but has no such account.
    UnknownAccount,
    /// No rule names this engineer (or its groups) together with this account.
    NoRule,
    /// The applicable rule's `not_before` lies in the future.
    NotYetValid {
        /// rule index
        rule: usize,
        /// rule line in the configuration
        line: usize,
        /// the rule's `not_before`
        not_before: SystemTime,
    },
    /// The applicable rule's `not_after` has passed.
    Expired {
        /// rule index
        rule: usize,
        /// rule line in the configuration
        line: usize,
        /// the rule's `not_after`
        not_after: SystemTime,
    },
    /// The applicable rule lists source networks and the source address is unknown.
    SourceUnknown {
        /// rule index
        rule: usize,
        /// rule line in the configuration
        line: usize,
    },
    /// The source address is outside the applicable rule's networks.
    SourceNotAllowed {
        /// rule index
        rule: usize,
        /// rule line in the configuration
        line: usize,
        /// the refused address
        source: IpAddr,
    },
}

impl DenyReason {
    /// One line for the engineer: says which kind of check failed, never reveals the
    /// inventory (unknown host, account and missing rule read the same).
    pub fn engineer_message(&self) -> &'static str {
        match self {
            DenyReason::UnknownEngineer => "login refused",
            DenyReason::UnknownHost | DenyReason::UnknownAccount | DenyReason::NoRule => {
                "login refused: you have no grant for this account@host"
            }
            DenyReason::NotYetValid { .. } => {
                "login refused: your grant for this account@host is not valid yet"
            }
            DenyReason::Expired { .. } => {
                "login refused: your grant for this account@host has expired"
            }
            DenyReason::SourceUnknown { .. } | DenyReason::SourceNotAllowed { .. } => {
                "login refused: your grant for this account@host does not allow your source address"
            }
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::UnknownEngineer => f.write_str("unknown engineer"),
            DenyReason::UnknownHost => f.write_str("unknown host"),
            DenyReason::UnknownAccount => f.write_str("unknown account on this host"),
            DenyReason::NoRule => f.write_str("no grant rule for this engineer and account"),
            DenyReason::NotYetValid {
                rule,
                line,
                not_before,
            } => write!(
                f,
                "outside the grant window: grant #{rule} (line {line}) starts at not_before {}",
                format_rfc3339_utc(*not_before)
            ),
            DenyReason::Expired {
                rule,
                line,
                not_after,
            } => write!(
                f,
                "outside the grant window: grant #{rule} (line {line}) ended at not_after {}",
                format_rfc3339_utc(*not_after)
            ),
            DenyReason::SourceUnknown { rule, line } => {
                write!(
                    f,
                    "source address unknown but grant #{rule} (line {line}) restricts sources"
                )
            }
            DenyReason::SourceNotAllowed { rule, line, source } => {
                write!(
                    f,
                    "source {source} not allowed by grant #{rule} (line {line})"
                )
            }
        }
    }
}

/// Decides whether `login` is allowed now from `source`.
pub fn evaluate(
    cfg: &Config,
    login: &LoginString,
    source: Option<IpAddr>,
    now: SystemTime,
) -> Decision {
    let Some(engineer) = cfg.engineer(&login.engineer) else {
        return Decision::Deny(DenyReason::UnknownEngineer);
    };
    let Some(host) = cfg.host(&login.host) else {
        return Decision::Deny(DenyReason::UnknownHost);
    };
    if host.account(&login.account).is_none() {
        return Decision::Deny(DenyReason::UnknownAccount);
    }
    let mut first_failure: Option<DenyReason> = None;
    for (i, rule) in cfg.grants.iter().enumerate() {
        if !rule.applies_to(engineer) || !rule.covers(&login.account, &login.host) {
            continue;
        }
        let failure = if let Some(nb) = rule.not_before.filter(|nb| now < *nb) {
            Some(DenyReason::NotYetValid {
                rule: i,
                line: rule.line,
                not_before: nb,
            })
        } else if let Some(na) = rule.not_after.filter(|na| now >= *na) {
            Some(DenyReason::Expired {
                rule: i,
                line: rule.line,
                not_after: na,
            })
        } else if rule.from.is_empty() {
            None
        } else {
            match source {
                None => Some(DenyReason::SourceUnknown {
                    rule: i,
                    line: rule.line,
                }),
                Some(ip) if source_allowed(&rule.from, ip) => None,
                Some(ip) => Some(DenyReason::SourceNotAllowed {
                    rule: i,
                    line: rule.line,
                    source: ip,
                }),
            }
        };
        match failure {
            None => {
                return Decision::Allow {
                    rule: i,
                    not_after: rule.not_after,
                }
            }
            Some(f) => {
                first_failure.get_or_insert(f);
            }
        }
    }
    Decision::Deny(first_failure.unwrap_or(DenyReason::NoRule))
}

/// Whether `ip` lies in one of `nets` (IPv4-mapped IPv6 sources match IPv4 networks).
pub fn source_allowed(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// Every `(account, host)` the engineer may reach now from `source`, in inventory order
/// (for the plain login's listing).
pub fn reachable(
    cfg: &Config,
    engineer: &str,
    source: Option<IpAddr>,
    now: SystemTime,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if cfg.engineer(engineer).is_none() {
        return out;
    }
    for host in &cfg.hosts {
        for account in &host.accounts {
            let login = LoginString {
                engineer: engineer.to_owned(),
                account: account.name.clone(),
                host: host.name.clone(),
            };
            if evaluate(cfg, &login, source, now).is_allowed() {
                out.push((account.name.clone(), host.name.clone()));
            }
        }
    }
    out
}

/// Restrictions sshd must enforce for one rule that allows a login apart from the source
/// address (which the AuthorizedKeysCommand does not know).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRestriction {
    /// Index of the rule.
    pub rule: usize,
    /// Source networks (`from=`), empty for any.
    pub from: Vec<ipnet::IpNet>,
    /// End of the rule's window (`expiry-time=`).
    pub not_after: Option<SystemTime>,
}

/// The rules that allow `login` at `now` for some source address, each with the source and
/// expiry restrictions sshd has to enforce. Rules with identical restrictions are merged.
pub fn key_restrictions(cfg: &Config, login: &LoginString, now: SystemTime) -> Vec<KeyRestriction> {
    let mut out: Vec<KeyRestriction> = Vec::new();
    let Some(engineer) = cfg.engineer(&login.engineer) else {
        return out;
    };
    if cfg.account(&login.host, &login.account).is_none() {
        return out;
    }
    for (i, rule) in cfg.grants.iter().enumerate() {
        let live =
            rule.not_before.is_none_or(|nb| now >= nb) && rule.not_after.is_none_or(|na| now < na);
        if !live || !rule.applies_to(engineer) || !rule.covers(&login.account, &login.host) {
            continue;
        }
        let mut from = rule.from.clone();
        from.sort();
        from.dedup();
        // An unrestricted rule without expiry makes every other rule redundant.
        if from.is_empty() && rule.not_after.is_none() {
            return vec![KeyRestriction {
                rule: i,
                from,
                not_after: None,
            }];
        }
        if !out
            .iter()
            .any(|r| r.from == from && r.not_after == rule.not_after)
        {
            out.push(KeyRestriction {
                rule: i,
                from,
                not_after: rule.not_after,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rfc3339_utc;
    use std::path::Path;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop";
    const KEY2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo bob";

    fn cfg(grants: &str) -> Config {
        let text = format!(
            r#"
[kms]
endpoint = "http://127.0.0.1:9100"

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["{KEY2}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"
  [[host.account]]
  name = "deploy"
  secret = "acs/ecs/web-01/deploy"

[[host]]
name = "db-01"
address = "127.0.0.3"
host_keys = ["{KEY2}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/db-01/root"

[[engineer]]
name = "alice"
uid = 64001
keys = ["{KEY}"]
groups = ["ops"]

[[engineer]]
name = "bob"
uid = 64002
keys = ["{KEY2}"]
groups = ["dev"]
{grants}"#
        );
        Config::parse(&text, Path::new("/t.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn t(s: &str) -> SystemTime {
        parse_rfc3339_utc(s).unwrap()
    }
    fn l(e: &str, a: &str, h: &str) -> LoginString {
        LoginString::new(e, a, h).unwrap()
    }
    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const NOW: &str = "2026-06-01T12:00:00Z";

    #[test]
    fn evaluation_table() {
        let c = cfg(r#"
[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
not_before = "2026-01-01T00:00:00Z"
not_after = "2027-01-01T00:00:00Z"

[[grant]]
groups = ["ops"]
accounts = ["deploy@web-*"]
from = ["10.0.0.0/8", "127.0.0.1"]

[[grant]]
engineers = ["bob"]
accounts = ["root@db-01"]
not_before = "2026-07-01T00:00:00Z"

[[grant]]
engineers = ["bob"]
accounts = ["*@web-01"]
not_after = "2026-05-01T00:00:00Z"
"#);
        let now = t(NOW);
        let rows: Vec<(LoginString, Option<IpAddr>, Decision)> = vec![
            (
                l("alice", "root", "web-01"),
                None,
                Decision::Allow {
                    rule: 0,
                    not_after: Some(t("2027-01-01T00:00:00Z")),
                },
            ),
            (
                l("alice", "deploy", "web-01"),
                ip("10.1.2.3"),
                Decision::Allow {
                    rule: 1,
                    not_after: None,
                },
            ),
            (
                l("alice", "deploy", "web-01"),
                ip("127.0.0.1"),
                Decision::Allow {
                    rule: 1,
                    not_after: None,
                },
            ),
            (
                l("alice", "deploy", "web-01"),
                ip("::ffff:10.1.2.3"),
                Decision::Allow {
                    rule: 1,
                    not_after: None,
                },
            ),
            (
                l("alice", "deploy", "web-01"),
                ip("192.168.1.1"),
                Decision::Deny(DenyReason::SourceNotAllowed {
                    rule: 1,
                    line: 44,
                    source: "192.168.1.1".parse().unwrap(),
                }),
            ),
            (
                l("alice", "deploy", "web-01"),
                None,
                Decision::Deny(DenyReason::SourceUnknown { rule: 1, line: 44 }),
            ),
            (
                l("alice", "root", "db-01"),
                None,
                Decision::Deny(DenyReason::NoRule),
            ),
            (
                l("bob", "root", "db-01"),
                None,
                Decision::Deny(DenyReason::NotYetValid {
                    rule: 2,
                    line: 49,
                    not_before: t("2026-07-01T00:00:00Z"),
                }),
            ),
            (
                l("bob", "root", "web-01"),
                None,
                Decision::Deny(DenyReason::Expired {
                    rule: 3,
                    line: 54,
                    not_after: t("2026-05-01T00:00:00Z"),
                }),
            ),
            (
                l("carol", "root", "web-01"),
                None,
                Decision::Deny(DenyReason::UnknownEngineer),
            ),
            (
                l("alice", "root", "web-02"),
                None,
                Decision::Deny(DenyReason::UnknownHost),
            ),
            (
                l("alice", "admin", "web-01"),
                None,
                Decision::Deny(DenyReason::UnknownAccount),
            ),
        ];
        for (login, src, want) in rows {
            assert_eq!(evaluate(&c, &login, src, now), want, "{login} from {src:?}");
        }
        // window bounds: not_before inclusive, not_after exclusive
        let a = l("alice", "root", "web-01");
        assert!(evaluate(&c, &a, None, t("2026-01-01T00:00:00Z")).is_allowed());
        assert!(!evaluate(&c, &a, None, t("2025-12-31T23:59:59Z")).is_allowed());
        assert!(!evaluate(&c, &a, None, t("2027-01-01T00:00:00Z")).is_allowed());
        assert!(evaluate(&c, &a, None, t("2026-12-31T23:59:59Z")).is_allowed());
    }

    #[test]
    fn first_allowing_rule_wins_and_first_failure_explains() {
        let c = cfg(r#"
[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
from = ["10.0.0.0/8"]

[[grant]]
groups = ["ops"]
accounts = ["root@*"]
not_after = "2026-12-01T00:00:00Z"
"#);
        let now = t(NOW);
        let a = l("alice", "root", "web-01");
        assert_eq!(
            evaluate(&c, &a, ip("10.0.0.1"), now),
            Decision::Allow {
                rule: 0,
                not_after: None
            }
        );
        assert_eq!(
            evaluate(&c, &a, ip("192.0.2.1"), now),
            Decision::Allow {
                rule: 1,
                not_after: Some(t("2026-12-01T00:00:00Z"))
            }
        );
        let later = t("2027-01-01T00:00:00Z");
        let d = evaluate(&c, &a, ip("192.0.2.1"), later);
        assert!(
            matches!(
                d,
                Decision::Deny(DenyReason::SourceNotAllowed { rule: 0, .. })
            ),
            "{d:?}"
        );
    }

    #[test]
    fn deny_reasons_are_explained() {
        let r = DenyReason::Expired {
            rule: 3,
            line: 49,
            not_after: t("2026-05-01T00:00:00Z"),
        };
        assert_eq!(
            r.to_string(),
            "outside the grant window: grant #3 (line 49) ended at not_after 2026-05-01T00:00:00Z"
        );
        assert!(r.engineer_message().contains("expired"));
        let r = DenyReason::NotYetValid {
            rule: 0,
            line: 5,
            not_before: t("2026-05-01T00:00:00Z"),
        };
        assert!(r.to_string().contains("not_before 2026-05-01T00:00:00Z"));
        assert_eq!(
            DenyReason::UnknownHost.engineer_message(),
            DenyReason::NoRule.engineer_message()
        );
        let r = DenyReason::SourceNotAllowed {
            rule: 1,
            line: 9,
            source: "192.0.2.1".parse().unwrap(),
        };
        assert_eq!(
            r.to_string(),
            "source 192.0.2.1 not allowed by grant #1 (line 9)"
        );
    }

    #[test]
    fn reachable_lists_allowed_targets() {
        let c = cfg(r#"
[[grant]]
groups = ["ops"]
accounts = ["*@web-01"]

[[grant]]
engineers = ["alice"]
accounts = ["root@db-01"]
from = ["10.0.0.0/8"]
"#);
        let now = t(NOW);
        assert_eq!(
            reachable(&c, "alice", None, now),
            vec![
                ("root".to_owned(), "web-01".to_owned()),
                ("deploy".to_owned(), "web-01".to_owned())
            ]
        );
        assert_eq!(reachable(&c, "alice", ip("10.9.9.9"), now).len(), 3);
        assert!(reachable(&c, "bob", None, now).is_empty());
        assert!(reachable(&c, "nobody", None, now).is_empty());
    }

    #[test]
    fn key_restrictions_per_rule() {
        let c = cfg(r#"
[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
from = ["10.0.0.0/8"]

[[grant]]
groups = ["ops"]
accounts = ["root@*"]
from = ["10.0.0.0/8"]

[[grant]]
groups = ["ops"]
accounts = ["root@web-01"]
not_after = "2026-12-01T00:00:00Z"

[[grant]]
groups = ["ops"]
accounts = ["root@web-01"]
not_before = "2026-12-01T00:00:00Z"

[[grant]]
engineers = ["bob"]
accounts = ["root@web-01"]
"#);
        let now = t(NOW);
        let r = key_restrictions(&c, &l("alice", "root", "web-01"), now);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].rule, 0);
        assert_eq!(
            r[0].from,
            vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(
            r[1],
            KeyRestriction {
                rule: 2,
                from: vec![],
                not_after: Some(t("2026-12-01T00:00:00Z"))
            }
        );
        // bob: one unrestricted rule
        let r = key_restrictions(&c, &l("bob", "root", "web-01"), now);
        assert_eq!(
            r,
            vec![KeyRestriction {
                rule: 4,
                from: vec![],
                not_after: None
            }]
        );
        assert!(key_restrictions(&c, &l("bob", "root", "db-01"), now).is_empty());
        assert!(key_restrictions(&c, &l("alice", "nope", "web-01"), now).is_empty());
    }
}
