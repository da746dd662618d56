//! What `kmsbastion-keys` (sshd's AuthorizedKeysCommand) prints, computed from the
//! configuration. Pure: the binary only reads the file and the clock.
//!
//! * Composite login (`alice@root@web-01`) with a live grant: one line per engineer key and
//!   per allowing rule, `restrict,pty[,from="…"][,expiry-time="…"] type base64`. sshd tries
//!   every line whose key matches, so several rules with different restrictions behave as
//!   "any rule allows". The source address comes from the rule's `from=` (sshd enforces it
//!   against the connection; the AuthorizedKeysCommand is not told the address in `%u %t %k`),
//!   the end of the window from `expiry-time=` (so a grant that ends while sshd is between
//!   the key check and the session still refuses).
//! * Plain engineer login (`alice`): the engineer's keys with `restrict,pty` and nothing else,
//!   so `ssh alice@jump` can list what alice may reach. The listing needs no grant; its shell
//!   (`kmsbastion-connect`) only prints and never connects onward.
//! * Anyone else (local users, unknown names, composite logins without a live grant): nothing.
#![forbid(unsafe_code)]

use crate::config::{format_ssh_expiry, Config, PublicKeyLine};
use crate::grant::{key_restrictions, KeyRestriction};
use crate::login::Login;
use std::time::SystemTime;

/// Options on every key line: no forwarding of any kind, no `~/.ssh/rc`, but a pty for
/// interactive sessions.
pub const BASE_OPTIONS: &str = "restrict,pty";

/// The key sshd offers (`%t %k`): only matching keys are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferedKey<'a> {
    /// Key type as sshd names it (`%t`, e.g. `ssh-ed25519`).
    pub key_type: &'a str,
    /// Base64 of the key blob (`%k`).
    pub base64: &'a str,
}

fn matches(key: &PublicKeyLine, offered: Option<OfferedKey<'_>>) -> bool {
    offered.is_none_or(|o| o.key_type == key.key_type && o.base64 == key.base64)
}

/// The sshd options string for one allowing rule.
pub fn options_for(r: &KeyRestriction) -> String {
    let mut opts = String::from(BASE_OPTIONS);
    if !r.from.is_empty() {
        // A single address prints as the address: `from=` takes both forms.
        let nets: Vec<String> = r
            .from
            .iter()
            .map(|n| {
                if n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                }
            })
            .collect();
        opts.push_str(&format!(",from=\"{}\"", nets.join(",")));
    }
    if let Some(t) = r.not_after {
        opts.push_str(&format!(",expiry-time=\"{}\"", format_ssh_expiry(t)));
    }
    opts
}

/// The authorized_keys lines for `user` at `now` (empty for anyone who is not ours or has no
/// live grant).
pub fn authorized_keys(
    cfg: &Config,
    user: &str,
    offered: Option<OfferedKey<'_>>,
    now: SystemTime,
) -> Vec<String> {
    let Ok(login) = Login::parse(user) else {
        return Vec::new();
    };
    let Some(engineer) = cfg.engineer(login.engineer()) else {
        return Vec::new();
    };
    let keys: Vec<PublicKeyLine> = engineer
        .public_keys()
        .into_iter()
        .filter(|k| matches(k, offered))
        .collect();
    if keys.is_empty() {
        return Vec::new();
    }
    let option_sets: Vec<String> = match &login {
        Login::Plain(_) => vec![BASE_OPTIONS.to_owned()],
        Login::Composite(l) => key_restrictions(cfg, l, now)
            .iter()
            .map(options_for)
            .collect(),
    };
    let mut out = Vec::with_capacity(option_sets.len() * keys.len());
    for opts in &option_sets {
        for k in &keys {
            out.push(format!("{opts} {}", k.key()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rfc3339_utc;
    use std::path::Path;

    const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop";
    const KEY_A2: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo bob";

    fn cfg() -> Config {
        let text = format!(
            r#"
[kms]
region = "cn-hangzhou"
[[host]]
name = "web-01"
address = "127.0.0.2"
  [[host.account]]
  name = "root"
  secret = "s1"
  [[host.account]]
  name = "deploy"
  secret = "s2"
  [[host.account]]
  name = "old"
  secret = "s3"
[[engineer]]
name = "alice"
uid = 64001
keys = ["{KEY_A}", "{KEY_A2}"]
[[engineer]]
name = "bob"
uid = 64002
keys = ["{KEY_B}"]
[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
[[grant]]
engineers = ["alice", "bob"]
accounts = ["deploy@web-01"]
from = ["127.0.0.0/8", "10.1.2.3"]
not_after = "2027-01-01T00:00:00Z"
[[grant]]
engineers = ["alice"]
accounts = ["deploy@web-01"]
not_before = "2026-01-01T00:00:00Z"
not_after = "2026-03-01T12:30:05Z"
[[grant]]
engineers = ["alice"]
accounts = ["old@web-01"]
not_after = "2026-01-01T00:00:00Z"
"#
        );
        Config::parse(&text, Path::new("/t.toml")).unwrap()
    }

    fn now() -> SystemTime {
        parse_rfc3339_utc("2026-02-01T00:00:00Z").unwrap()
    }

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z";
    const A2: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=";

    #[test]
    fn granted_login_gets_restricted_keys() {
        let c = cfg();
        assert_eq!(
            authorized_keys(&c, "alice@root@web-01", None, now()),
            vec![format!("restrict,pty {A}"), format!("restrict,pty {A2}")]
        );
        let lines = authorized_keys(&c, "alice@deploy@web-01", None, now());
        assert_eq!(
            lines,
            vec![
                format!("restrict,pty,from=\"10.1.2.3,127.0.0.0/8\",expiry-time=\"20270101000000Z\" {A}"),
                format!("restrict,pty,from=\"10.1.2.3,127.0.0.0/8\",expiry-time=\"20270101000000Z\" {A2}"),
                format!("restrict,pty,expiry-time=\"20260301123005Z\" {A}"),
                format!("restrict,pty,expiry-time=\"20260301123005Z\" {A2}"),
            ]
        );
    }

    #[test]
    fn offered_key_filters() {
        let c = cfg();
        let offered = OfferedKey {
            key_type: "ecdsa-sha2-nistp256",
            base64: A2.split(' ').nth(1).unwrap(),
        };
        assert_eq!(
            authorized_keys(&c, "alice@root@web-01", Some(offered), now()),
            vec![format!("restrict,pty {A2}")]
        );
        let wrong_type = OfferedKey {
            key_type: "ssh-rsa",
            ..offered
        };
        assert!(authorized_keys(&c, "alice@root@web-01", Some(wrong_type), now()).is_empty());
        let bobs = OfferedKey {
            key_type: "ssh-ed25519",
            base64: KEY_B.split(' ').nth(1).unwrap(),
        };
        assert!(authorized_keys(&c, "alice@root@web-01", Some(bobs), now()).is_empty());
    }

    #[test]
    fn plain_ungranted_expired_local() {
        let c = cfg();
        assert_eq!(
            authorized_keys(&c, "alice", None, now()),
            vec![format!("restrict,pty {A}"), format!("restrict,pty {A2}")]
        );
        assert_eq!(authorized_keys(&c, "bob", None, now()).len(), 1);
        // bob has no grant for root
        assert!(authorized_keys(&c, "bob@root@web-01", None, now()).is_empty());
        // expired grant
        assert!(authorized_keys(&c, "alice@old@web-01", None, now()).is_empty());
        // not yet valid: the deploy window rule starts 2026-01-01
        let early = parse_rfc3339_utc("2025-06-01T00:00:00Z").unwrap();
        assert_eq!(
            authorized_keys(&c, "alice@deploy@web-01", None, early).len(),
            2
        );
        for u in [
            "root",
            "carol",
            "carol@root@web-01",
            "alice@root@web-02",
            "alice@nope@web-01",
            "alice\n",
            "",
        ] {
            assert!(authorized_keys(&c, u, None, now()).is_empty(), "{u:?}");
        }
    }
}
