//! `kmsbastion-keys`: sshd's AuthorizedKeysCommand.
//!
//! ```text
//! AuthorizedKeysCommand /usr/libexec/kmsbastion/kmsbastion-keys %u %t %k
//! AuthorizedKeysCommandUser kmsbastion
//! ```
//!
//! Prints the authorized_keys lines for a bastion login (see `kmsbastion::authorized_keys`)
//! and nothing for anyone else. Local files only, no network. Exit status: 0 (also when
//! nothing is printed), 1 when the configuration cannot be used (sshd then accepts no key
//! from this command; local users' own authorized_keys files still work), 2 on bad usage.
#![forbid(unsafe_code)]

use kmsbastion::audit::{Audit, Event};
use kmsbastion::authorized_keys::{authorized_keys, OfferedKey};
use kmsbastion::config::{Config, DEFAULT_CONFIG_PATH};
use kmsbastion::grant::{self, Decision, DenyReason};
use kmsbastion::login::Login;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

const USAGE: &str = "usage: kmsbastion-keys [--config PATH] USER [KEYTYPE KEY]\n\
    sshd_config: AuthorizedKeysCommand /usr/libexec/kmsbastion/kmsbastion-keys %u %t %k";

struct Args {
    config: PathBuf,
    user: String,
    offered: Option<(String, String)>,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let mut positional = Vec::new();
    while let Some(a) = argv.next() {
        if a == "--config" {
            config = argv.next().ok_or("--config needs a path")?.into();
        } else if let Some(p) = a.strip_prefix("--config=") {
            config = p.into();
        } else if a == "-h" || a == "--help" {
            return Err(String::new());
        } else if a == "--" {
            positional.extend(argv.by_ref());
        } else if a.starts_with("--") {
            return Err(format!("unknown option {a:?}"));
        } else {
            positional.push(a);
        }
    }
    let mut pos = positional.into_iter();
    let user = pos.next().ok_or("missing USER")?;
    let offered = match (pos.next(), pos.next()) {
        (None, _) => None,
        (Some(t), Some(k)) => Some((t, k)),
        (Some(_), None) => return Err("KEYTYPE given without KEY".into()),
    };
    if pos.next().is_some() {
        return Err("too many arguments".into());
    }
    Ok(Args {
        config,
        user,
        offered,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("kmsbastion-keys: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if e.is_empty() { 0 } else { 2 });
        }
    };
    // Only the records this login needs: from the index when it is fresh, else the whole
    // file (see `kmsbastion::config::index`).
    let cfg = match Config::load_for_user(&args.config, &args.user) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "kmsbastion-keys: no keys for {:?}: the configuration is unusable:\n{e}",
                args.user
            );
            return ExitCode::from(1);
        }
    };
    let offered = args.offered.as_ref().map(|(t, k)| OfferedKey {
        key_type: t,
        base64: k,
    });
    let now = SystemTime::now();
    let lines = authorized_keys(&cfg, &args.user, offered, now);
    if lines.is_empty() {
        audit_refusal(&cfg, &args.user, args.offered.as_ref(), now);
        return ExitCode::SUCCESS;
    }
    let mut out = lines.join("\n");
    out.push('\n');
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsbastion-keys: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

/// A bastion login whose grant refuses it ends here: sshd never reaches PAM, so this is the
/// one place that can record why (DESIGN.md: "no grant / outside window / wrong source → the
/// jump host logs reason, rule"). Wrong-source refusals are not seen here (the keys then carry
/// the grant's `from=` and sshd logs the mismatch itself); unknown engineers are not audited
/// (any scanner can try names).
fn audit_refusal(cfg: &Config, user: &str, offered: Option<&(String, String)>, now: SystemTime) {
    let Ok(Login::Composite(login)) = Login::parse(user) else {
        return;
    };
    let Some(engineer) = cfg.engineer(&login.engineer) else {
        return;
    };
    let keys = engineer.public_keys();
    if keys.is_empty() {
        return;
    }
    // Clients offer several keys in turn: one that is not the engineer's is a mismatch, not a
    // refusal (the engineer's own key, offered next, may well be accepted).
    if let Some((key_type, base64)) = offered {
        if !keys
            .iter()
            .any(|k| &k.key_type == key_type && &k.base64 == base64)
        {
            return;
        }
    }
    let reason = match grant::evaluate(cfg, &login, None, now) {
        // Only refusals that hold whatever the source address: a rule that is live now but
        // restricted by `from` printed its keys with `from=` and sshd judges the address.
        Decision::Allow { .. } | Decision::Deny(DenyReason::SourceUnknown { .. }) => return,
        Decision::Deny(reason) => reason.to_string(),
    };
    let mut event = Event::new("refused");
    event.engineer = Some(login.engineer.clone());
    event.account = Some(login.account.clone());
    event.host = Some(login.host.clone());
    event.result = Some("deny".to_owned());
    event.reason = Some(format!("no key offered for {login}: {reason}"));
    Audit::open(cfg.audit.file.as_deref(), cfg.audit.syslog).emit(&event);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_sshd_invocations() {
        let a = args(&["alice@root@web-01", "ssh-ed25519", "AAAA"]).unwrap();
        assert_eq!(a.config, PathBuf::from(DEFAULT_CONFIG_PATH));
        assert_eq!(a.user, "alice@root@web-01");
        assert_eq!(a.offered, Some(("ssh-ed25519".into(), "AAAA".into())));
        let a = args(&["--config", "/x.toml", "bob"]).unwrap();
        assert_eq!(
            (a.config, a.user, a.offered),
            (PathBuf::from("/x.toml"), "bob".into(), None)
        );
        assert_eq!(args(&["--config=/y", "--", "-odd"]).unwrap().user, "-odd");
        assert!(args(&[]).is_err());
        assert!(args(&["u", "t"]).is_err());
        assert!(args(&["u", "t", "k", "x"]).is_err());
        assert!(args(&["--bogus", "u"]).is_err());
        assert!(args(&["--config"]).is_err());
        assert_eq!(args(&["--help"]).err(), Some(String::new()));
    }
}
