//! The PAM module's decisions, free of FFI so that they are unit-tested without root.
//!
//! `pam/` (the `pam_kmsbastion.so` glue) calls into here for everything it decides:
//!
//! * [`ModuleArgs::parse`]: strict module arguments (`config=PATH`, `debug`); anything else is
//!   an error (the module then returns `PAM_SERVICE_ERR`: a typo must not weaken policy).
//! * [`account_outcome`]: the `pam_sm_acct_mgmt` decision for a PAM user name.
//! * [`session_plan`] and [`BrokerArgs`]: whether `pam_sm_open_session` starts a broker, and
//!   the exact argv it gets. `kmsbastion-broker` parses the same argv with
//!   [`BrokerArgs::parse`], so the two sides cannot drift apart.
//! * [`parse_ready_line`]: the broker's one status line on its ready pipe.
#![forbid(unsafe_code)]

use crate::config::Config;
use crate::grant::{self, Decision};
use crate::login::{Login, LoginString};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

/// How long `pam_sm_open_session` waits for the broker's ready line.
pub const BROKER_READY_TIMEOUT_MS: u64 = 5_000;
/// How long `pam_sm_close_session` waits for the broker to exit after SIGTERM before SIGKILL.
pub const BROKER_STOP_TIMEOUT_MS: u64 = 2_000;
/// The environment variable that names the broker socket in the engineer's session.
pub const SOCKET_ENV: &str = "KMSBASTION_SOCKET";
/// The only environment the broker is started with.
pub const BROKER_PATH_ENV: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// Parsed module arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleArgs {
    /// `config=PATH`; default [`crate::config::DEFAULT_CONFIG_PATH`].
    pub config: PathBuf,
    /// `debug`: log every decision, not only denials and errors.
    pub debug: bool,
}

impl ModuleArgs {
    /// Parse the arguments of a `pam.d` line. Unknown or repeated arguments are errors.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<ModuleArgs, String> {
        let mut config: Option<PathBuf> = None;
        let mut debug = false;
        for arg in args {
            let arg = arg.as_ref();
            if arg == "debug" {
                if debug {
                    return Err("argument 'debug' given twice".into());
                }
                debug = true;
            } else if let Some(path) = arg.strip_prefix("config=") {
                if config.is_some() {
                    return Err("argument 'config=' given twice".into());
                }
                if !path.starts_with('/') {
                    return Err(format!("config={path}: the path must be absolute"));
                }
                config = Some(PathBuf::from(path));
            } else {
                return Err(format!(
                    "unknown argument '{arg}' (accepted: config=PATH, debug)"
                ));
            }
        }
        Ok(ModuleArgs {
            config: config.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_CONFIG_PATH)),
            debug,
        })
    }
}

/// What `pam_sm_acct_mgmt` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOutcome {
    /// A composite login that a grant allows now.
    Allow { login: LoginString, rule: usize },
    /// A composite login that no grant allows (or that names nothing we know).
    Deny {
        login: Option<LoginString>,
        /// For syslog and audit: which check failed.
        reason: String,
    },
    /// A plain engineer login: allowed, it only lists what the engineer may reach.
    Plain { engineer: String },
    /// Not a bastion login (a local account): `PAM_IGNORE`.
    NotOurs,
}

/// The engineer's address from `PAM_RHOST`; a name or garbage gives `None` (grants with
/// `from` then deny).
pub fn parse_source(rhost: Option<&str>) -> Option<IpAddr> {
    let r = rhost?.trim();
    let r = r
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(r);
    // Drop an IPv6 zone index (`fe80::1%eth0`).
    let r = r.split('%').next().unwrap_or(r);
    r.parse().ok()
}

/// Decide `acct_mgmt` for PAM user `user` from `source` at `now`.
pub fn account_outcome(
    cfg: &Config,
    user: &str,
    source: Option<IpAddr>,
    now: SystemTime,
) -> AccountOutcome {
    match Login::parse(user) {
        Ok(Login::Composite(login)) => match grant::evaluate(cfg, &login, source, now) {
            Decision::Allow { rule, .. } => AccountOutcome::Allow { login, rule },
            Decision::Deny(reason) => AccountOutcome::Deny {
                reason: reason.to_string(),
                login: Some(login),
            },
        },
        Ok(Login::Plain(name)) if cfg.engineer(&name).is_some() => {
            AccountOutcome::Plain { engineer: name }
        }
        Ok(Login::Plain(_)) => AccountOutcome::NotOurs,
        // Two or more '@' that do not form a valid login string: it is in our name space
        // (no local account looks like that), so refuse rather than ignore.
        Err(e) if user.matches('@').count() >= 2 => AccountOutcome::Deny {
            login: None,
            reason: format!("malformed login string: {e}"),
        },
        Err(_) => AccountOutcome::NotOurs,
    }
}

/// Whether a PAM user name looks like a composite login (used when the configuration cannot be
/// read: composite logins then fail closed, everything else is ignored).
pub fn looks_composite(user: &str) -> bool {
    user.matches('@').count() >= 2
}

/// What `pam_sm_open_session` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPlan {
    /// Not ours, or a plain engineer login (no broker): `PAM_IGNORE`.
    Ignore,
    /// Start a broker for this login.
    StartBroker(LoginString),
    /// A composite login that must not get a session (grant gone since acct_mgmt).
    Refuse(String),
}

/// Decide `open_session`: a broker only for a composite login that is still granted.
pub fn session_plan(
    cfg: &Config,
    user: &str,
    source: Option<IpAddr>,
    now: SystemTime,
) -> SessionPlan {
    match account_outcome(cfg, user, source, now) {
        AccountOutcome::Allow { login, .. } => SessionPlan::StartBroker(login),
        AccountOutcome::Deny { reason, .. } => SessionPlan::Refuse(reason),
        AccountOutcome::Plain { .. } | AccountOutcome::NotOurs => SessionPlan::Ignore,
    }
}

/// The broker's command line: the login identity plus the two pipes it inherits.
///
/// ```text
/// kmsbastion-broker --config PATH --engineer NAME --account NAME --host NAME
///                   --source ADDR|- --sshd-pid PID --lifetime-fd FD --ready-fd FD
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerArgs {
    pub config: PathBuf,
    pub engineer: String,
    pub account: String,
    pub host: String,
    /// The engineer's address (`-` when unknown).
    pub source: Option<IpAddr>,
    /// The sshd process that opened the PAM session (the session's monitor): only processes
    /// that descend from it may use the broker.
    pub sshd_pid: u32,
    /// Read end of the lifetime pipe: EOF means the sshd session is over.
    pub lifetime_fd: i32,
    /// Write end of the ready pipe: one line, `ready SOCKET` or `error MESSAGE`.
    pub ready_fd: i32,
}

impl BrokerArgs {
    /// argv\[1..\] for the broker.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.config.to_string_lossy().into_owned(),
            "--engineer".into(),
            self.engineer.clone(),
            "--account".into(),
            self.account.clone(),
            "--host".into(),
            self.host.clone(),
            "--source".into(),
            self.source
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            "--sshd-pid".into(),
            self.sshd_pid.to_string(),
            "--lifetime-fd".into(),
            self.lifetime_fd.to_string(),
            "--ready-fd".into(),
            self.ready_fd.to_string(),
        ]
    }

    /// Parse argv\[1..\]. Every option is required exactly once; nothing else is accepted.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<BrokerArgs, String> {
        let mut config = None;
        let mut engineer = None;
        let mut account = None;
        let mut host = None;
        let mut source = None;
        let mut sshd_pid = None;
        let mut lifetime_fd = None;
        let mut ready_fd = None;
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(opt) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("option {opt} needs a value"))?;
            let slot_taken = |present: bool| {
                if present {
                    Err(format!("option {opt} given twice"))
                } else {
                    Ok(())
                }
            };
            match opt {
                "--config" => {
                    slot_taken(config.is_some())?;
                    config = Some(PathBuf::from(value));
                }
                "--engineer" => {
                    slot_taken(engineer.is_some())?;
                    engineer = Some(value.to_owned());
                }
                "--account" => {
                    slot_taken(account.is_some())?;
                    account = Some(value.to_owned());
                }
                "--host" => {
                    slot_taken(host.is_some())?;
                    host = Some(value.to_owned());
                }
                "--source" => {
                    slot_taken(source.is_some())?;
                    source = Some(if value == "-" {
                        None
                    } else {
                        Some(
                            value
                                .parse::<IpAddr>()
                                .map_err(|_| format!("--source {value}: not an IP address"))?,
                        )
                    });
                }
                "--sshd-pid" => {
                    slot_taken(sshd_pid.is_some())?;
                    sshd_pid = Some(parse_positive(opt, value)?);
                }
                "--lifetime-fd" => {
                    slot_taken(lifetime_fd.is_some())?;
                    lifetime_fd = Some(parse_fd(opt, value)?);
                }
                "--ready-fd" => {
                    slot_taken(ready_fd.is_some())?;
                    ready_fd = Some(parse_fd(opt, value)?);
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        let need = |name: &str| format!("missing option --{name}");
        let config: PathBuf = config.ok_or_else(|| need("config"))?;
        if !config.is_absolute() {
            return Err("--config: the path must be absolute".into());
        }
        let login = LoginString::new(
            &engineer.ok_or_else(|| need("engineer"))?,
            &account.ok_or_else(|| need("account"))?,
            &host.ok_or_else(|| need("host"))?,
        )
        .map_err(|e| format!("invalid login identity: {e}"))?;
        let args = BrokerArgs {
            config,
            engineer: login.engineer,
            account: login.account,
            host: login.host,
            source: source.ok_or_else(|| need("source"))?,
            sshd_pid: sshd_pid.ok_or_else(|| need("sshd-pid"))?,
            lifetime_fd: lifetime_fd.ok_or_else(|| need("lifetime-fd"))?,
            ready_fd: ready_fd.ok_or_else(|| need("ready-fd"))?,
        };
        if args.lifetime_fd == args.ready_fd {
            return Err("--lifetime-fd and --ready-fd must differ".into());
        }
        Ok(args)
    }
}

fn parse_positive(opt: &str, v: &str) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(n) if n > 1 => Ok(n),
        _ => Err(format!("{opt} {v}: not a process id")),
    }
}

fn parse_fd(opt: &str, v: &str) -> Result<i32, String> {
    match v.parse::<i32>() {
        Ok(n) if n > 2 => Ok(n),
        _ => Err(format!("{opt} {v}: not a descriptor above 2")),
    }
}

/// The broker's ready line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyLine {
    /// The broker serves on this socket.
    Ready(PathBuf),
    /// The broker could not start; the message says why.
    Error(String),
}

impl ReadyLine {
    /// The line the broker writes (with its newline).
    pub fn to_line(&self) -> String {
        match self {
            ReadyLine::Ready(p) => format!("ready {}\n", p.display()),
            ReadyLine::Error(m) => format!("error {}\n", m.replace(['\n', '\r'], " ")),
        }
    }
}

/// Parse what the broker wrote on its ready pipe (everything read before EOF or newline).
pub fn parse_ready_line(bytes: &[u8]) -> Result<ReadyLine, String> {
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(n) => bytes.get(..n).unwrap_or_default(),
        None => return Err("the broker exited without reporting ready".into()),
    };
    let line = std::str::from_utf8(line).map_err(|_| "the broker's ready line is not UTF-8")?;
    if let Some(path) = line.strip_prefix("ready ") {
        if !path.starts_with('/') || path.contains('\0') || path.len() > 107 {
            return Err(format!("the broker reported a bad socket path: {path}"));
        }
        Ok(ReadyLine::Ready(PathBuf::from(path)))
    } else if let Some(msg) = line.strip_prefix("error ") {
        Ok(ReadyLine::Error(msg.to_owned()))
    } else {
        Err(format!("unexpected line from the broker: {line}"))
    }
}

/// The broker's session directory for a reported socket path: `runtime_dir/s-<hex>/connect.sock`
/// gives `runtime_dir/s-<hex>`; anything else (another place, `..`) gives `None`.
pub fn session_dir_of(runtime_dir: &std::path::Path, socket: &std::path::Path) -> Option<PathBuf> {
    use std::path::Component;
    if socket.file_name()? != "connect.sock" {
        return None;
    }
    let dir = socket.parent()?;
    let name = dir.file_name()?.to_str()?;
    let hex = name.strip_prefix("s-")?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if dir.parent()? != runtime_dir || dir.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    Some(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    const CONFIG: &str = r#"
[kms]
endpoint = "http://127.0.0.1:9100"

[bastion]

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"

[[engineer]]
name = "alice"
uid = 64001
keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"]

[[engineer]]
name = "bob"
uid = 64002
keys = []

[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
from = ["127.0.0.0/8"]
not_after = "2030-01-01T00:00:00Z"
"#;

    fn cfg() -> Config {
        Config::parse(CONFIG, Path::new("/etc/kmsbastion/kmsbastion.toml")).unwrap()
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_980_600) // 2026-11-29T19:30Z
    }

    fn lo() -> Option<IpAddr> {
        Some("127.0.0.1".parse().unwrap())
    }

    #[test]
    fn module_arguments_are_strict() {
        let ok = ModuleArgs::parse(&["config=/etc/x.toml", "debug"]).unwrap();
        assert_eq!(ok.config, PathBuf::from("/etc/x.toml"));
        assert!(ok.debug);
        let default = ModuleArgs::parse::<&str>(&[]).unwrap();
        assert_eq!(
            default.config,
            PathBuf::from("/etc/kmsbastion/kmsbastion.toml")
        );
        assert!(!default.debug);
        for bad in [
            &["debgu"][..],
            &["config=relative.toml"],
            &["debug", "debug"],
            &["config=/a", "config=/b"],
            &["config"],
            &["nullok"],
        ] {
            assert!(ModuleArgs::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn account_decisions() {
        let c = cfg();
        let allow = account_outcome(&c, "alice@root@web-01", lo(), now());
        assert!(
            matches!(allow, AccountOutcome::Allow { rule: 0, .. }),
            "{allow:?}"
        );

        let wrong_source = account_outcome(
            &c,
            "alice@root@web-01",
            Some("10.1.2.3".parse().unwrap()),
            now(),
        );
        assert!(
            matches!(wrong_source, AccountOutcome::Deny { .. }),
            "{wrong_source:?}"
        );

        let no_source = account_outcome(&c, "alice@root@web-01", None, now());
        assert!(
            matches!(no_source, AccountOutcome::Deny { .. }),
            "{no_source:?}"
        );

        let expired = account_outcome(
            &c,
            "alice@root@web-01",
            lo(),
            UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        );
        assert!(
            matches!(expired, AccountOutcome::Deny { .. }),
            "{expired:?}"
        );

        let no_grant = account_outcome(&c, "bob@root@web-01", lo(), now());
        assert!(
            matches!(no_grant, AccountOutcome::Deny { .. }),
            "{no_grant:?}"
        );

        let unknown_host = account_outcome(&c, "alice@root@web-99", lo(), now());
        assert!(
            matches!(unknown_host, AccountOutcome::Deny { .. }),
            "{unknown_host:?}"
        );

        assert_eq!(
            account_outcome(&c, "alice", lo(), now()),
            AccountOutcome::Plain {
                engineer: "alice".into()
            }
        );
        assert_eq!(
            account_outcome(&c, "root", lo(), now()),
            AccountOutcome::NotOurs
        );
        assert_eq!(
            account_outcome(&c, "admin", None, now()),
            AccountOutcome::NotOurs
        );
        assert!(matches!(
            account_outcome(&c, "alice@@web-01", lo(), now()),
            AccountOutcome::Deny { login: None, .. }
        ));
    }

    #[test]
    fn session_plans() {
        let c = cfg();
        assert!(matches!(
            session_plan(&c, "alice@root@web-01", lo(), now()),
            SessionPlan::StartBroker(l) if l.to_string() == "alice@root@web-01"
        ));
        assert_eq!(session_plan(&c, "alice", lo(), now()), SessionPlan::Ignore);
        assert_eq!(session_plan(&c, "root", lo(), now()), SessionPlan::Ignore);
        assert!(matches!(
            session_plan(&c, "bob@root@web-01", lo(), now()),
            SessionPlan::Refuse(_)
        ));
    }

    #[test]
    fn sources() {
        assert_eq!(parse_source(Some("127.0.0.1")), lo());
        assert_eq!(parse_source(Some("[::1]")), Some("::1".parse().unwrap()));
        assert_eq!(
            parse_source(Some("fe80::1%eth0")),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(parse_source(Some("laptop.example")), None);
        assert_eq!(parse_source(None), None);
        assert!(looks_composite("a@b@c"));
        assert!(!looks_composite("root"));
    }

    #[test]
    fn broker_args_round_trip_and_strictness() {
        let a = BrokerArgs {
            config: "/etc/kmsbastion/kmsbastion.toml".into(),
            engineer: "alice".into(),
            account: "root".into(),
            host: "web-01".into(),
            source: lo(),
            sshd_pid: 1234,
            lifetime_fd: 5,
            ready_fd: 7,
        };
        let argv = a.to_args();
        assert_eq!(BrokerArgs::parse(&argv).unwrap(), a);
        let none = BrokerArgs {
            source: None,
            ..a.clone()
        };
        assert_eq!(BrokerArgs::parse(&none.to_args()).unwrap(), none);

        let mut extra = argv.clone();
        extra.push("--debug".into());
        assert!(BrokerArgs::parse(&extra).is_err());
        let mut twice = argv.clone();
        twice.extend(["--host".to_owned(), "web-02".to_owned()]);
        assert!(BrokerArgs::parse(&twice).is_err());
        let mut missing = argv.clone();
        missing.truncate(argv.len() - 2);
        assert!(BrokerArgs::parse(&missing).is_err());
        let mut bad_fd = argv.clone();
        bad_fd[15] = "1".into();
        assert!(BrokerArgs::parse(&bad_fd).is_err());
        let mut bad_login = argv;
        bad_login[5] = "ro@ot".into();
        assert!(BrokerArgs::parse(&bad_login).is_err());
    }

    #[test]
    fn session_dirs() {
        let rt = Path::new("/run/kmsbastion");
        assert_eq!(
            session_dir_of(rt, Path::new("/run/kmsbastion/s-00ff/connect.sock")),
            Some(PathBuf::from("/run/kmsbastion/s-00ff"))
        );
        for bad in [
            "/run/kmsbastion/connect.sock",
            "/run/kmsbastion/s-/connect.sock",
            "/run/kmsbastion/s-zz/connect.sock",
            "/run/kmsbastion/s-00/other.sock",
            "/etc/s-00/connect.sock",
            "/run/kmsbastion/x/s-00/connect.sock",
        ] {
            assert_eq!(session_dir_of(rt, Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn ready_lines() {
        let r = ReadyLine::Ready("/run/kmsbastion/b-0011/sock".into());
        assert_eq!(parse_ready_line(r.to_line().as_bytes()).unwrap(), r);
        let e = ReadyLine::Error("cannot load config\nsecond".into());
        assert_eq!(
            parse_ready_line(e.to_line().as_bytes()).unwrap(),
            ReadyLine::Error("cannot load config second".into())
        );
        assert!(parse_ready_line(b"").is_err());
        assert!(parse_ready_line(b"ready /run/x").is_err());
        assert!(parse_ready_line(b"ready relative\n").is_err());
        assert!(parse_ready_line(b"hello\n").is_err());
        assert!(parse_ready_line(b"ready \xff\n").is_err());
    }
}
