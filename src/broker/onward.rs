//! One onward `ssh` run: its argv and environment (pure, tested), the classification of its
//! log lines, and the run itself with the credential served from memory.
//!
//! ssh's own log goes (`-E`) to a FIFO in the request's private directory, read by the
//! broker; its stdout/stderr are the engineer's descriptors, so after authentication the
//! remote output flows straight through and nothing of ssh's own chatter reaches the engineer.
//!
//! Retrying with ACSPrevious is safe: ssh reads stdin only once the session channel is open,
//! which is after user authentication, so a rejected first attempt has consumed nothing.

use super::failure::OnwardError;
use crate::agent;
use crate::secret::{Credential, PrivateKey, TargetSecret};
use crate::sensitive::SecretString;
use crate::session::{Request, RequestKind};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Environment variable that puts the broker binary in askpass mode (set only in the onward
/// ssh's environment): the path of the askpass socket.
pub const ASKPASS_ENV: &str = "KMSBASTION_ASKPASS";

/// `TERM` values passed on: `[A-Za-z0-9._+-]{1,64}`, else `dumb`.
pub fn validated_term(term: Option<&str>) -> String {
    match term {
        Some(t)
            if !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)) =>
        {
            t.to_owned()
        }
        _ => "dumb".to_owned(),
    }
}

/// A host name or address safe as an ssh destination (no `@`, no leading `-`, no spaces).
pub fn valid_destination(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:-_".contains(&b))
}

/// `known_hosts` content pinning `keys` under `alias`; only `type base64` is kept of each.
pub fn known_hosts(alias: &str, keys: &[String]) -> String {
    let mut out = String::new();
    for k in keys {
        let mut it = k.split_ascii_whitespace();
        if let (Some(kt), Some(b64)) = (it.next(), it.next()) {
            out.push_str(&format!("{alias} {kt} {b64}\n"));
        }
    }
    out
}

/// `SHA256:…` of a pinned `type base64 [comment]` line, as ssh prints fingerprints.
pub fn pinned_fingerprint(key: &str) -> Option<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let b64 = key.split_ascii_whitespace().nth(1)?;
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let digest = sha2::Sha256::digest(&blob);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

/// How the credential is offered to ssh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOptions {
    /// Agent socket and public key file.
    Key { agent: PathBuf, public_key: PathBuf },
    /// Password through askpass.
    Password,
    /// Whichever the credential turns out to be: the agent (no key file: ssh asks the agent
    /// what it holds) or askpass.
    Either { agent: PathBuf },
}

/// What one ssh process is for.
#[derive(Debug, Clone, Copy)]
pub enum SshRole<'a> {
    /// The engineer's request, run on a connection of its own.
    Request(&'a Request),
    /// A connection opened ahead of the login's first request: authenticate, open no
    /// session, and serve one multiplexed session (see [`mux_args`]) through the control
    /// socket at this path.
    Master(&'a Path),
}

/// Everything that decides the ssh argv.
#[derive(Debug, Clone)]
pub struct SshPlan<'a> {
    pub role: SshRole<'a>,
    pub account: &'a str,
    pub alias: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub known_hosts: &'a Path,
    pub log: &'a Path,
    pub connect_timeout_s: u32,
    pub auth: AuthOptions,
}

fn opt(args: &mut Vec<OsString>, kv: String) {
    args.push("-o".into());
    args.push(kv.into());
}

/// argv\[1..\] of the onward ssh. No user configuration, pinned host key, no forwarding of
/// any kind, and the engineer's command as ONE argument after `--` and the destination (ssh
/// sends it verbatim to the target's shell; nothing on the jump host interprets it).
pub fn ssh_args(p: &SshPlan<'_>) -> Result<Vec<OsString>, String> {
    if !valid_destination(p.address) {
        return Err(format!(
            "host address {:?} is not usable as an ssh destination",
            p.address
        ));
    }
    let mut a: Vec<OsString> = vec!["-F".into(), "none".into(), "-e".into(), "none".into()];
    a.push("-E".into());
    a.push(p.log.as_os_str().to_owned());
    for kv in [
        "LogLevel=VERBOSE".to_owned(),
        format!("UserKnownHostsFile={}", p.known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        "CheckHostIP=no".to_owned(),
        format!("HostKeyAlias={}", p.alias),
        "UpdateHostKeys=no".to_owned(),
        "VerifyHostKeyDNS=no".to_owned(),
        "ClearAllForwardings=yes".to_owned(),
        "ForwardAgent=no".to_owned(),
        "ForwardX11=no".to_owned(),
        "ForwardX11Trusted=no".to_owned(),
        "Tunnel=no".to_owned(),
        "PermitLocalCommand=no".to_owned(),
        "ProxyCommand=none".to_owned(),
        "ProxyJump=none".to_owned(),
        "AddKeysToAgent=no".to_owned(),
        "HashKnownHosts=no".to_owned(),
        format!("ConnectTimeout={}", p.connect_timeout_s),
        "ServerAliveInterval=30".to_owned(),
        "BatchMode=no".to_owned(),
    ] {
        opt(&mut a, kv);
    }
    match p.role {
        SshRole::Request(_) => {
            opt(&mut a, "ControlMaster=no".into());
            opt(&mut a, "ControlPath=none".into());
        }
        SshRole::Master(control) => {
            opt(&mut a, "ControlMaster=yes".into());
            opt(&mut a, format!("ControlPath={}", control_path(control)?));
            opt(&mut a, "ControlPersist=no".into());
        }
    }
    match &p.auth {
        AuthOptions::Key { agent, public_key } => {
            opt(&mut a, format!("IdentityAgent={}", agent.display()));
            opt(&mut a, format!("IdentityFile={}", public_key.display()));
            opt(&mut a, "IdentitiesOnly=yes".into());
            opt(&mut a, "PreferredAuthentications=publickey".into());
            opt(&mut a, "PubkeyAuthentication=yes".into());
            opt(&mut a, "PasswordAuthentication=no".into());
            opt(&mut a, "KbdInteractiveAuthentication=no".into());
        }
        AuthOptions::Password => {
            opt(&mut a, "IdentityAgent=none".into());
            opt(&mut a, "IdentitiesOnly=yes".into());
            opt(&mut a, "PubkeyAuthentication=no".into());
            opt(
                &mut a,
                "PreferredAuthentications=password,keyboard-interactive".into(),
            );
            opt(&mut a, "NumberOfPasswordPrompts=1".into());
        }
        AuthOptions::Either { agent } => {
            opt(&mut a, format!("IdentityAgent={}", agent.display()));
            // The agent's key only: a file that does not exist keeps ssh from adding the
            // service user's default identity files (~ is its passwd home, not $HOME).
            let none = agent.with_file_name("no-identity-file");
            opt(&mut a, format!("IdentityFile={}", none.display()));
            opt(&mut a, "IdentitiesOnly=no".into());
            opt(&mut a, "PubkeyAuthentication=yes".into());
            opt(&mut a, "PasswordAuthentication=yes".into());
            opt(&mut a, "KbdInteractiveAuthentication=yes".into());
            opt(
                &mut a,
                "PreferredAuthentications=publickey,password,keyboard-interactive".into(),
            );
            opt(&mut a, "NumberOfPasswordPrompts=1".into());
        }
    }
    a.push("-p".into());
    a.push(p.port.to_string().into());
    a.push("-l".into());
    a.push(p.account.into());
    match p.role {
        SshRole::Request(request) => push_request(&mut a, request, p.address)?,
        SshRole::Master(_) => {
            // No session of its own, stdin never read: it only carries the one the first
            // request asks for.
            for f in ["-N", "-n", "-T", "--"] {
                a.push(f.into());
            }
            a.push(p.address.into());
        }
    }
    Ok(a)
}

/// The tail of a request's argv: tty flag, subsystem flag, `--`, destination, command.
fn push_request(a: &mut Vec<OsString>, request: &Request, address: &str) -> Result<(), String> {
    a.push(if request.pty { "-tt" } else { "-T" }.into());
    if request.kind == RequestKind::Subsystem {
        a.push("-s".into());
    }
    a.push("--".into());
    a.push(address.into());
    match request.kind {
        RequestKind::Shell => {}
        RequestKind::Exec | RequestKind::Subsystem => {
            if request.command.contains(&0) {
                return Err("the command contains a NUL byte".into());
            }
            a.push(OsString::from_vec(request.command.clone()));
        }
    }
    Ok(())
}

/// Longest control socket path used (ssh binds `<path>.<16 random characters>` first, and
/// `sun_path` holds 107 bytes).
pub const MAX_CONTROL_PATH: usize = 88;

/// `path` as a `ControlPath` value: no `%` or `~` expansion can apply, and short enough to
/// bind.
fn control_path(path: &Path) -> Result<String, String> {
    let s = path
        .to_str()
        .filter(|s| s.starts_with('/') && !s.contains(['%', '~', ' ', '"', '\\']))
        .ok_or_else(|| format!("control socket path {} is not usable", path.display()))?;
    if s.len() > MAX_CONTROL_PATH {
        return Err(format!("control socket path {s} is too long"));
    }
    Ok(s.to_owned())
}

/// argv\[1..\] of the ssh that runs a request as a session of an authenticated master
/// (`control`, see [`SshRole::Master`]). It never connects to anything itself: should the
/// master be gone, ssh would fall back to a connection of its own, and `ProxyCommand` makes
/// that fail at once instead (without a credential it could not log in anyway). Its log
/// (`-E`) only says what went wrong with the master; the session's output flows through the
/// engineer's descriptors, which the master uses directly.
pub fn mux_args(
    control: &Path,
    log: &Path,
    request: &Request,
    account: &str,
    address: &str,
    port: u16,
) -> Result<Vec<OsString>, String> {
    if !valid_destination(address) {
        return Err(format!(
            "host address {address:?} is not usable as an ssh destination"
        ));
    }
    let mut a: Vec<OsString> = vec!["-F".into(), "none".into(), "-e".into(), "none".into()];
    a.push("-E".into());
    a.push(log.as_os_str().to_owned());
    for kv in [
        "LogLevel=ERROR".to_owned(),
        "ControlMaster=no".to_owned(),
        format!("ControlPath={}", control_path(control)?),
        "ProxyCommand=/bin/false".to_owned(),
        "ProxyJump=none".to_owned(),
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        "UserKnownHostsFile=/dev/null".to_owned(),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "ClearAllForwardings=yes".to_owned(),
        "ForwardAgent=no".to_owned(),
        "ForwardX11=no".to_owned(),
        "Tunnel=no".to_owned(),
        "PermitLocalCommand=no".to_owned(),
        "IdentityAgent=none".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
        "PubkeyAuthentication=no".to_owned(),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
    ] {
        opt(&mut a, kv);
    }
    a.push("-p".into());
    a.push(port.to_string().into());
    a.push("-l".into());
    a.push(account.into());
    push_request(&mut a, request, address)?;
    Ok(a)
}

/// What one line of ssh's log means.
///
/// Only ssh's own line formats count, matched from the start of the line (OpenSSH 9:
/// `sshconnect2.c`, `sshconnect.c`, `packet.c`, `kex.c`). Text the target controls reaches the
/// log too, chiefly its disconnect message (`Received disconnect from …: <server text>`, where
/// ssh escapes control characters but not newlines): that line and everything after it is
/// ignored, so a target cannot steer the classification with what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `Authenticated to <host> ([<addr>]:<port>) using "<method>".`
    Authenticated,
    /// `<account>@<address>: Permission denied (<methods>).`
    PermissionDenied,
    /// One of ssh's host key verification failures.
    HostKeyFailure,
    /// `The fingerprint for the <type> key sent by the remote host is`: the next line is the
    /// fingerprint.
    FingerprintFollows,
    /// A line that is only a fingerprint (`SHA256:….`); meaningful right after
    /// [`LogEvent::FingerprintFollows`].
    Fingerprint(String),
    /// ssh could not connect; the short reason the engineer may see.
    ConnectError(&'static str),
    /// `Received disconnect from …`: the target's own text follows; stop classifying.
    ServerDisconnect,
    Other,
}

/// Strip the `ssh: ` prefixes ssh may put in front of a line (its program name, and the
/// literal `ssh: ` of some of its messages).
fn strip_progname(mut l: &str) -> &str {
    while let Some(rest) = l.strip_prefix("ssh: ") {
        l = rest;
    }
    l
}

/// The short reason for one of ssh's connection failures: what the engineer sees (never the
/// target's address, which only the jump host's log gets). `None`: not a connection failure.
pub fn short_connect_reason(line: &str) -> Option<&'static str> {
    let l = strip_progname(line.trim_end_matches(['\r', '\n']).trim());
    if let Some(rest) = l.strip_prefix("connect to host ") {
        // `connect to host <host> port <port>: <strerror>`
        let why = rest.rsplit_once(": ").map_or("", |(_, w)| w);
        return Some(match why {
            "Connection refused" => "connection refused",
            "Connection timed out" => "timed out",
            "No route to host" => "no route to host",
            "Network is unreachable" => "network unreachable",
            _ => "connection failed",
        });
    }
    if l.starts_with("Could not resolve hostname ") {
        return Some("its address does not resolve");
    }
    if let Some(rest) = l.strip_prefix("kex_exchange_identification: ") {
        return Some(match rest {
            "Connection closed by remote host" => "connection closed by the target",
            "read: Connection reset by peer" => "connection reset by the target",
            _ => "connection failed",
        });
    }
    if l == "Connection timed out during banner exchange"
        || (l.starts_with("Connection to ") && l.ends_with(" timed out"))
    {
        return Some("timed out");
    }
    if l.starts_with("Connection closed by ") {
        return Some("connection closed by the target");
    }
    if l.starts_with("Connection reset by ") {
        return Some("connection reset by the target");
    }
    if l.starts_with("Unable to negotiate with ") {
        return Some("no algorithms in common with the target");
    }
    if l.starts_with("banner exchange: ") {
        return Some("connection failed");
    }
    None
}

fn is_fingerprint_line(l: &str) -> Option<&str> {
    let fp = l.strip_suffix('.')?;
    let b64 = fp.strip_prefix("SHA256:")?;
    (!b64.is_empty()
        && b64
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='))
    .then_some(fp)
}

/// Classify one log line of `ssh -o LogLevel=VERBOSE` whose `Permission denied` line starts
/// with `denied_prefix` (`<account>@<address>: Permission denied (`).
pub fn classify_log_line(line: &str, denied_prefix: &str) -> LogEvent {
    let l = strip_progname(line.trim_end_matches(['\r', '\n']));
    if l.starts_with("Received disconnect from ") {
        LogEvent::ServerDisconnect
    } else if l.starts_with("Authenticated to ") {
        LogEvent::Authenticated
    } else if !denied_prefix.is_empty() && l.starts_with(denied_prefix) {
        LogEvent::PermissionDenied
    } else if l == "Host key verification failed."
        || l == "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @"
        || l == "Exiting, you have requested strict checking."
        || (l.starts_with("Host key for ")
            && l.ends_with(" has changed and you have requested strict checking."))
        || (l.starts_with("No ")
            && l.contains(" host key is known for ")
            && l.ends_with(" and you have requested strict checking."))
    {
        LogEvent::HostKeyFailure
    } else if l.starts_with("The fingerprint for the ")
        && l.ends_with(" key sent by the remote host is")
    {
        LogEvent::FingerprintFollows
    } else if let Some(fp) = is_fingerprint_line(l) {
        LogEvent::Fingerprint(fp.to_owned())
    } else if let Some(reason) = short_connect_reason(l) {
        LogEvent::ConnectError(reason)
    } else {
        LogEvent::Other
    }
}

/// A connection failure: the engineer's short reason and ssh's own line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    pub reason: &'static str,
    pub line: String,
}

/// What the log said by the time ssh ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogSummary {
    pub authenticated: bool,
    pub denied: bool,
    pub host_key_failed: bool,
    pub presented: Option<String>,
    pub connect_error: Option<ConnectFailure>,
    /// The target sent a disconnect: nothing after it is classified.
    pub server_disconnected: bool,
    /// The connection ended before the target's SSH banner (`kex_exchange_identification:`
    /// closed or reset): sshd's `MaxStartups` throttling looks like this.
    pub no_banner: bool,
    denied_prefix: String,
    fingerprint_next: bool,
}

impl LogSummary {
    /// A summary for an ssh run that logs in as `account` to `address` (the destination as
    /// given on ssh's command line, which its `Permission denied` line names).
    pub fn new(account: &str, address: &str) -> Self {
        Self {
            denied_prefix: format!("{account}@{address}: Permission denied ("),
            ..Self::default()
        }
    }

    /// Fold one line in; returns true when authentication is decided (either way).
    pub fn absorb(&mut self, line: &str) -> bool {
        if self.server_disconnected {
            return false;
        }
        let fingerprint_next = std::mem::take(&mut self.fingerprint_next);
        match classify_log_line(line, &self.denied_prefix) {
            LogEvent::ServerDisconnect => {
                self.server_disconnected = true;
                if !self.authenticated && self.connect_error.is_none() {
                    self.connect_error = Some(ConnectFailure {
                        reason: "connection closed by the target",
                        line: line.trim_end().to_owned(),
                    });
                }
                false
            }
            LogEvent::Authenticated => {
                self.authenticated = true;
                true
            }
            LogEvent::PermissionDenied => {
                self.denied = true;
                true
            }
            LogEvent::HostKeyFailure => {
                self.host_key_failed = true;
                true
            }
            LogEvent::FingerprintFollows => {
                self.fingerprint_next = true;
                false
            }
            LogEvent::Fingerprint(fp) => {
                if fingerprint_next && !self.authenticated {
                    self.presented = Some(fp);
                }
                false
            }
            LogEvent::ConnectError(reason) => {
                if !self.authenticated {
                    let l = strip_progname(line.trim());
                    if l.starts_with("kex_exchange_identification: Connection closed")
                        || l.starts_with("kex_exchange_identification: read: Connection reset")
                    {
                        self.no_banner = true;
                    }
                    self.connect_error = Some(ConnectFailure {
                        reason,
                        line: line.trim_end().to_owned(),
                    });
                }
                false
            }
            LogEvent::Other => false,
        }
    }
}

/// Stack of the thread that serves the in-memory agent (RSA signing).
pub const AGENT_STACK: usize = 256 * 1024;
/// Stack of the thread that answers askpass.
pub const ASKPASS_STACK: usize = 128 * 1024;
/// Stack of the small helper threads (ssh log reader, control messages).
pub const SMALL_STACK: usize = 64 * 1024;

/// `std::thread::spawn` with an explicit (small) stack: the broker's threads are many and
/// short-lived, and none of them needs the 2 MiB default.
pub fn spawn_with_stack<F, T>(stack: usize, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().stack_size(stack).spawn(f)
}

/// The result of one attempt.
#[derive(Debug)]
pub enum Attempt {
    /// Authenticated; the session ran and ssh exited with this status.
    Done { status: u8 },
    /// The target rejected the credential (nothing of the engineer's stdin was read).
    Rejected,
    /// The target closed or reset the connection before its SSH banner: sshd does that when
    /// too many connections are starting (`MaxStartups`). Nothing was sent, no credential
    /// offered: trying again shortly is safe.
    NoBanner(OnwardError),
    /// Anything else: final.
    Failed(OnwardError),
}

/// The ssh process of a request, shared with the thread that forwards window changes and
/// hangups. The pid is cleared (under the lock) in the same step that reaps the child, so a
/// signal can never reach a recycled pid.
#[derive(Debug, Default)]
pub struct ChildSlot {
    pid: Mutex<Option<i32>>,
    /// Set by a hangup: do not start (another) ssh.
    pub cancelled: AtomicBool,
}

impl ChildSlot {
    /// Start `cmd` as this slot's process, unless a hangup came first (`None`). The pid is
    /// recorded under the lock, so a signal sent meanwhile waits for it.
    pub fn spawn(&self, cmd: &mut Command) -> Option<std::io::Result<std::process::Child>> {
        let mut guard = match self.pid.lock() {
            Ok(g) => g,
            Err(_) => return Some(Err(std::io::Error::other("child slot poisoned"))),
        };
        if self.cancelled.load(Ordering::Acquire) {
            return None;
        }
        let child = cmd.spawn();
        if let Ok(c) = &child {
            *guard = Some(i32::try_from(c.id()).unwrap_or(0));
        }
        Some(child)
    }

    /// Send `sig` to the running ssh, if any.
    pub fn signal(&self, sig: libc::c_int) {
        if let Ok(guard) = self.pid.lock() {
            if let Some(pid) = *guard {
                // SAFETY: `pid` is our unreaped child (cleared under this lock when reaped).
                unsafe { libc::kill(pid, sig) };
            }
        }
    }
}

/// Tells the credential thread to let go: the agent watches the flag, askpass sleeps in
/// `poll(2)` on its own [`super::askpass::Stop`], which wakes it at once.
#[derive(Debug, Clone)]
struct CredStop {
    flag: Arc<AtomicBool>,
    askpass: Option<Arc<super::askpass::Stop>>,
    cell: Option<Arc<CredCell>>,
}

impl CredStop {
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(s) = &self.askpass {
            s.set();
        }
        if let Some(c) = &self.cell {
            // Wake this attempt's waiters only: a credential not used yet (ssh died before
            // asking) stays for another attempt; whoever owns the cell closes it.
            c.interrupt();
        }
    }
}

/// The credential of an attempt: known at the start, or handed over later.
pub enum Supply {
    /// Serve this secret.
    Now(TargetSecret),
    /// ssh connects and verifies the target at once but authenticates only once the
    /// credential is put into the cell (its agent and askpass requests wait until then).
    /// Both key and password authentication are offered, since the secret's kind is not
    /// known yet; whichever the credential is answers, the other declines.
    Later(Arc<CredCell>),
}

#[derive(Default)]
enum CellState {
    #[default]
    Empty,
    Key(PrivateKey),
    Password(SecretString),
    /// Taken, or closed (authentication decided, ssh gone): nothing more to hand out.
    Closed,
}

/// A credential handed from the request that fetched it to the ssh that waits for it.
#[derive(Default)]
pub struct CredCell {
    state: Mutex<(CellState, u64)>,
    changed: Condvar,
}

impl std::fmt::Debug for CredCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredCell")
    }
}

impl CredCell {
    /// Hand the credential over; false (and the credential dropped) if the cell was closed.
    pub fn fill(&self, credential: Credential) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if !matches!(st.0, CellState::Empty) {
            return false;
        }
        st.0 = match credential {
            Credential::Key(k) => CellState::Key(k),
            Credential::Password(p) => CellState::Password(p),
        };
        self.changed.notify_all();
        true
    }

    /// Nothing will be handed out any more (drops a credential still inside).
    pub fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = CellState::Closed;
            self.changed.notify_all();
        }
    }

    /// Wake everyone waiting now, empty-handed; the cell itself is unchanged.
    pub fn interrupt(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = st.1.wrapping_add(1);
            self.changed.notify_all();
        }
    }

    /// The current interrupt generation: a take that started waiting at it ends at the next
    /// [`CredCell::interrupt`].
    fn generation(&self) -> u64 {
        self.state.lock().map(|st| st.1).unwrap_or(u64::MAX)
    }

    /// Wait until the cell is filled or closed (or interrupted since `generation`), then take
    /// what `pick` accepts.
    fn take<T>(
        &self,
        generation: u64,
        pick: impl Fn(&CellState) -> bool,
        out: impl Fn(CellState) -> Option<T>,
    ) -> Option<T> {
        let mut st = self.state.lock().ok()?;
        if st.1 != generation {
            return None;
        }
        while matches!(st.0, CellState::Empty) {
            st = self.changed.wait(st).ok()?;
            if st.1 != generation {
                return None;
            }
        }
        if pick(&st.0) {
            out(std::mem::replace(&mut st.0, CellState::Closed))
        } else {
            None
        }
    }

    fn take_key(&self, generation: u64) -> Option<PrivateKey> {
        self.take(
            generation,
            |s| matches!(s, CellState::Key(_)),
            |s| match s {
                CellState::Key(k) => Some(k),
                _ => None,
            },
        )
    }

    fn take_password(&self, generation: u64) -> Option<SecretString> {
        self.take(
            generation,
            |s| matches!(s, CellState::Password(_)),
            |s| match s {
                CellState::Password(p) => Some(p),
                _ => None,
            },
        )
    }
}

/// The threads that serve an attempt's credential.
struct CredThreads(Vec<std::thread::JoinHandle<bool>>);

impl CredThreads {
    fn join(self) {
        for t in self.0 {
            let _ = t.join();
        }
    }
}

type Served = (
    AuthOptions,
    CredThreads,
    Option<Arc<super::askpass::Stop>>,
    Option<Arc<CredCell>>,
);

fn agent_thread(
    listener: UnixListener,
    key: impl FnOnce() -> Option<PrivateKey> + Send + 'static,
    ssh_pid: &Arc<AtomicI32>,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<bool>> {
    let (pid, stop2) = (Arc::clone(ssh_pid), Arc::clone(stop));
    spawn_with_stack(AGENT_STACK, move || {
        let Some(key) = key() else {
            return false;
        };
        let accept = |peer: libc::pid_t| is_child_of(peer, &pid);
        let r = agent::serve_listener(&listener, key, accept, &stop2);
        drop(listener);
        r.map(|s| s.signatures_made > 0).unwrap_or(false)
    })
}

fn askpass_thread(
    listener: UnixListener,
    password: impl FnOnce() -> Option<SecretString> + Send + 'static,
    ssh_pid: &Arc<AtomicI32>,
) -> Result<(std::thread::JoinHandle<bool>, Arc<super::askpass::Stop>), std::io::Error> {
    let ask_stop = Arc::new(super::askpass::Stop::new()?);
    let (pid, stop2) = (Arc::clone(ssh_pid), Arc::clone(&ask_stop));
    let t = spawn_with_stack(ASKPASS_STACK, move || match password() {
        Some(p) => super::askpass::serve(&listener, p, &pid, &stop2),
        None => false,
    })?;
    Ok((t, ask_stop))
}

/// Wait until someone connects to the listening socket `fd` (true) or `stop` is set.
fn asked(fd: std::os::fd::RawFd, stop: &AtomicBool) -> bool {
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the listener outlives this call (its thread owns it).
        let r = unsafe { libc::poll(&mut p, 1, 50) };
        if r > 0 {
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
    false
}

fn serve_now(
    dir: &Path,
    secret: TargetSecret,
    ssh_pid: &Arc<AtomicI32>,
    flag: &Arc<AtomicBool>,
) -> Result<Served, Attempt> {
    match secret.credential {
        Credential::Key(key) => {
            let agent_path = dir.join("agent.sock");
            let pub_path = dir.join("id.pub");
            fs::write(&pub_path, format!("{}\n", key.public_key_openssh()))
                .map_err(|e| internal("writing the public key", e))?;
            let listener =
                UnixListener::bind(&agent_path).map_err(|e| internal("agent socket", e))?;
            let t = agent_thread(listener, move || Some(key), ssh_pid, flag)
                .map_err(|e| internal("agent thread", e))?;
            Ok((
                AuthOptions::Key {
                    agent: agent_path,
                    public_key: pub_path,
                },
                CredThreads(vec![t]),
                None,
                None,
            ))
        }
        Credential::Password(password) => {
            let listener = UnixListener::bind(dir.join("askpass.sock"))
                .map_err(|e| internal("askpass socket", e))?;
            let (t, stop) = askpass_thread(listener, move || Some(password), ssh_pid)
                .map_err(|e| internal("askpass thread", e))?;
            Ok((
                AuthOptions::Password,
                CredThreads(vec![t]),
                Some(stop),
                None,
            ))
        }
    }
}

fn serve_later(
    dir: &Path,
    cell: Arc<CredCell>,
    ssh_pid: &Arc<AtomicI32>,
    flag: &Arc<AtomicBool>,
) -> Result<Served, Attempt> {
    let agent_path = dir.join("agent.sock");
    let agent_listener =
        UnixListener::bind(&agent_path).map_err(|e| internal("agent socket", e))?;
    let ask_listener =
        UnixListener::bind(dir.join("askpass.sock")).map_err(|e| internal("askpass socket", e))?;
    // Each thread takes the credential only once ssh asks for it: an ssh that never gets that
    // far (a target that dropped the connection) leaves it for the next attempt. An
    // interrupt (this attempt ended) from here on ends their waits.
    let generation = cell.generation();
    let (c, f, fd) = (
        Arc::clone(&cell),
        Arc::clone(flag),
        agent_listener.as_raw_fd(),
    );
    let agent = agent_thread(
        agent_listener,
        move || asked(fd, &f).then(|| c.take_key(generation)).flatten(),
        ssh_pid,
        flag,
    );
    let agent = match agent {
        Ok(t) => t,
        Err(e) => return Err(internal("agent thread", e)),
    };
    let (c, f, fd) = (
        Arc::clone(&cell),
        Arc::clone(flag),
        ask_listener.as_raw_fd(),
    );
    match askpass_thread(
        ask_listener,
        move || asked(fd, &f).then(|| c.take_password(generation)).flatten(),
        ssh_pid,
    ) {
        Ok((t, stop)) => Ok((
            AuthOptions::Either { agent: agent_path },
            CredThreads(vec![agent, t]),
            Some(stop),
            Some(cell),
        )),
        Err(e) => {
            cell.close();
            let _ = agent.join();
            Err(internal("askpass thread", e))
        }
    }
}

/// Fixed inputs of an attempt.
pub struct AttemptContext<'a> {
    pub ssh: &'a Path,
    pub askpass_program: &'a Path,
    pub dir: &'a Path,
    pub alias: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub account: &'a str,
    pub host_keys: &'a [String],
    pub connect_timeout_s: u32,
    pub role: AttemptRole<'a>,
    pub slot: &'a ChildSlot,
}

/// What the ssh of an attempt is for.
#[derive(Clone)]
pub enum AttemptRole<'a> {
    /// Run the engineer's request on the engineer's stdin, stdout, stderr.
    Request {
        request: &'a Request,
        fds: &'a [OwnedFd; 3],
    },
    /// Open a master connection (stdio on /dev/null) with its control socket at `control`;
    /// `on_authenticated` runs (on the log thread) once the target accepted the credential.
    /// The attempt lasts until the master exits.
    Master {
        control: &'a Path,
        on_authenticated: Arc<dyn Fn() + Send + Sync>,
    },
}

fn internal(what: &str, e: impl std::fmt::Display) -> Attempt {
    Attempt::Failed(OnwardError::Internal(format!("{what}: {e}")))
}

fn mkfifo(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("NUL in path"))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run ssh once with the credential `supply` gives. `dir` is a fresh private (0700)
/// directory for this attempt.
pub fn attempt(cx: &AttemptContext<'_>, supply: Supply) -> Attempt {
    let kh = cx.dir.join("known_hosts");
    if let Err(e) = fs::write(&kh, known_hosts(cx.alias, cx.host_keys)) {
        return internal("writing known_hosts", e);
    }
    let log = cx.dir.join("ssh.log");
    if let Err(e) = mkfifo(&log) {
        return internal("mkfifo", e);
    }
    // Read end first (non-blocking open), then our own write end so that EOF only comes once
    // ssh has exited and we let go of ours.
    let log_r = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&log)
    {
        Ok(f) => f,
        Err(e) => return internal("opening the ssh log", e),
    };
    let log_w = match fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&log)
    {
        Ok(f) => f,
        Err(e) => return internal("opening the ssh log", e),
    };
    if let Err(e) = set_blocking(&log_r) {
        return internal("ssh log", e);
    }

    let ssh_pid = Arc::new(AtomicI32::new(0));
    let flag = Arc::new(AtomicBool::new(false));
    let served = match supply {
        Supply::Now(secret) => serve_now(cx.dir, secret, &ssh_pid, &flag),
        Supply::Later(cell) => serve_later(cx.dir, cell, &ssh_pid, &flag),
    };
    let (auth, cred_thread, askpass_stop, cell) = match served {
        Ok(v) => v,
        Err(e) => return e,
    };
    let stop = CredStop {
        flag,
        askpass: askpass_stop,
        cell,
    };

    let (role, term) = match &cx.role {
        AttemptRole::Request { request, .. } => {
            (SshRole::Request(request), request.term.as_deref())
        }
        AttemptRole::Master { control, .. } => (SshRole::Master(control), None),
    };
    let plan = SshPlan {
        role,
        account: cx.account,
        alias: cx.alias,
        address: cx.address,
        port: cx.port,
        known_hosts: &kh,
        log: &log,
        connect_timeout_s: cx.connect_timeout_s,
        auth: auth.clone(),
    };
    let finish_cred = |stop: &CredStop| stop.set();
    let args = match ssh_args(&plan) {
        Ok(a) => a,
        Err(e) => {
            finish_cred(&stop);
            cred_thread.join();
            return Attempt::Failed(OnwardError::Refused(e));
        }
    };
    let mut cmd = ssh_command(cx.ssh, &args, cx.dir, term);
    if matches!(auth, AuthOptions::Password | AuthOptions::Either { .. }) {
        cmd.env("SSH_ASKPASS", cx.askpass_program)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env(ASKPASS_ENV, cx.dir.join("askpass.sock"));
    }
    match &cx.role {
        AttemptRole::Request { fds, .. } => {
            if let Err(e) = engineer_stdio(&mut cmd, fds) {
                finish_cred(&stop);
                cred_thread.join();
                return internal("duplicating the session descriptors", e);
            }
        }
        AttemptRole::Master { control, .. } => {
            // What ssh shows a person during authentication (the target's pre-login banner)
            // is kept for the request, which shows it before its session.
            let shown = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(banner_path(control));
            let stderr = match shown {
                Ok(f) => Stdio::from(f),
                Err(_) => Stdio::null(),
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
        }
    }
    tie_to_broker(&mut cmd);

    // Start the log reader before ssh so nothing blocks on a full FIFO.
    let summary = Arc::new(Mutex::new(LogSummary::new(cx.account, cx.address)));
    let (sum2, stop3) = (Arc::clone(&summary), stop.clone());
    let on_authenticated = match &cx.role {
        AttemptRole::Master {
            on_authenticated, ..
        } => Some(Arc::clone(on_authenticated)),
        AttemptRole::Request { .. } => None,
    };
    let reader = spawn_with_stack(SMALL_STACK, move || {
        let mut r = BufReader::new(log_r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let (decided, authenticated) = sum2
                        .lock()
                        .map(|mut s| (s.absorb(&text), s.authenticated))
                        .unwrap_or((false, false));
                    if decided {
                        // Authentication is over, either way: let go of the credential.
                        stop3.set();
                        if authenticated {
                            if let Some(f) = &on_authenticated {
                                f();
                            }
                        }
                    }
                }
            }
        }
    });

    let reader = match reader {
        Ok(r) => r,
        Err(e) => {
            finish_cred(&stop);
            cred_thread.join();
            return internal("log reader thread", e);
        }
    };

    let started = cx.slot.spawn(&mut cmd);
    if let Some(Ok(child)) = &started {
        ssh_pid.store(i32::try_from(child.id()).unwrap_or(0), Ordering::Release);
    }
    drop(cmd);
    let status = match started {
        None => {
            finish_cred(&stop);
            drop(log_w);
            cred_thread.join();
            let _ = reader.join();
            return Attempt::Failed(OnwardError::Refused("hung up before the connection".into()));
        }
        Some(Err(e)) => {
            finish_cred(&stop);
            drop(log_w);
            cred_thread.join();
            let _ = reader.join();
            return internal(&format!("running {}", cx.ssh.display()), e);
        }
        Some(Ok(mut child)) => match reap(&mut child, cx.slot) {
            Ok(st) => st,
            Err(e) => {
                finish_cred(&stop);
                drop(log_w);
                cred_thread.join();
                let _ = reader.join();
                return internal("waiting for ssh", e);
            }
        },
    };
    finish_cred(&stop);
    drop(log_w);
    let _ = reader.join();
    cred_thread.join();
    let summary = summary.lock().map(|s| s.clone()).unwrap_or_default();
    let code = exit_code(status);
    if summary.authenticated {
        Attempt::Done { status: code }
    } else if summary.host_key_failed {
        Attempt::Failed(OnwardError::HostKey {
            presented: summary.presented,
            pinned: cx
                .host_keys
                .iter()
                .filter_map(|k| pinned_fingerprint(k))
                .collect(),
        })
    } else if summary.denied {
        Attempt::Rejected
    } else {
        let no_banner = summary.no_banner;
        let (reason, detail) = match summary.connect_error {
            Some(c) => (c.reason, c.line),
            None => (
                "the connection ended before authentication",
                format!("ssh ended with status {code} before authenticating"),
            ),
        };
        let error = OnwardError::Unreachable {
            reason: reason.to_owned(),
            detail,
        };
        if no_banner {
            Attempt::NoBanner(error)
        } else {
            Attempt::Failed(error)
        }
    }
}

/// An ssh command line with a clean environment, run in `dir` (its `HOME`).
fn ssh_command(ssh: &Path, args: &[OsString], dir: &Path, term: Option<&str>) -> Command {
    let mut cmd = Command::new(ssh);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .env("TERM", validated_term(term))
        .current_dir(dir);
    cmd
}

/// The engineer's stdin, stdout and stderr (duplicated) as the child's.
fn engineer_stdio(cmd: &mut Command, fds: &[OwnedFd; 3]) -> std::io::Result<()> {
    let [i, o, e] = fds;
    cmd.stdin(Stdio::from(i.try_clone()?))
        .stdout(Stdio::from(o.try_clone()?))
        .stderr(Stdio::from(e.try_clone()?));
    Ok(())
}

/// Make a child of the broker die with the thread that waits for it, and start with default
/// signal handling.
fn tie_to_broker(cmd: &mut Command) {
    // The broker's pid, for the child to check that it was not orphaned before the
    // parent-death signal was armed.
    let broker_pid = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, _exit,
    // sigemptyset, sigprocmask, signal). If the broker thread waiting for this ssh dies, the
    // kernel kills ssh (no onward session outlives its broker); if the broker died before
    // PR_SET_PDEATHSIG took effect, the child sees a different parent and exits. And ssh must
    // not inherit the broker's blocked SIGHUP/SIGTERM/SIGINT or ignored SIGPIPE, or a hangup
    // would not end it.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::getppid() != broker_pid {
                libc::_exit(1);
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
}

/// Where a master's stderr goes (next to its control socket `control`).
pub fn banner_path(control: &Path) -> PathBuf {
    control.with_file_name("shown")
}

/// Fixed inputs of a request run as a session of a prepared master connection.
pub struct MuxContext<'a> {
    pub ssh: &'a Path,
    /// A fresh private directory for this run (its log).
    pub dir: &'a Path,
    pub control: &'a Path,
    pub account: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub request: &'a Request,
    pub fds: &'a [OwnedFd; 3],
    pub slot: &'a ChildSlot,
}

/// Lines of the multiplexing client's log that mean the master could not serve the session
/// (its connection is gone), as opposed to a session that ended with status 255.
fn master_lost_line(log: &str) -> Option<&str> {
    log.lines().map(str::trim).find(|l| {
        let l = strip_progname(l);
        l.starts_with("Control socket connect(")
            || l.contains("master hello exchange failed")
            || l.starts_with("mux_client_")
            || l.starts_with("kex_exchange_identification: ")
            || l.starts_with("Connection closed by ")
    })
}

/// Run the request as a session of the master behind `control`; the session's exit status.
/// Window changes and hangups reach this ssh through the slot; it relays window changes to
/// the master (ssh's `control_client_sigrelay`), which reads the new size from the
/// engineer's terminal.
pub fn run_mux(cx: &MuxContext<'_>) -> Result<u8, OnwardError> {
    let internal =
        |what: &str, e: &dyn std::fmt::Display| OnwardError::Internal(format!("{what}: {e}"));
    let log = cx.dir.join("mux.log");
    let args = mux_args(
        cx.control, &log, cx.request, cx.account, cx.address, cx.port,
    )
    .map_err(OnwardError::Refused)?;
    let mut cmd = ssh_command(cx.ssh, &args, cx.dir, cx.request.term.as_deref());
    engineer_stdio(&mut cmd, cx.fds)
        .map_err(|e| internal("duplicating the session descriptors", &e))?;
    tie_to_broker(&mut cmd);
    let mut child = match cx.slot.spawn(&mut cmd) {
        None => return Err(OnwardError::Refused("hung up before the connection".into())),
        Some(r) => r.map_err(|e| internal(&format!("running {}", cx.ssh.display()), &e))?,
    };
    drop(cmd);
    let status = reap(&mut child, cx.slot).map_err(|e| internal("waiting for ssh", &e))?;
    let code = exit_code(status);
    if code == 255 {
        let mut text = String::new();
        if let Ok(f) = File::open(&log) {
            use std::io::Read as _;
            let _ = f.take(64 * 1024).read_to_string(&mut text);
        }
        if let Some(line) = master_lost_line(&text) {
            return Err(OnwardError::Unreachable {
                reason: "the connection to the target was lost".into(),
                detail: format!("prepared connection unusable: {line}"),
            });
        }
    }
    Ok(code)
}

/// Block until `child` (the slot's ssh) has ended, then clear the slot and reap it in one
/// step under the slot's lock, so a signal can never reach a recycled pid.
///
/// `waitid(WNOWAIT)` sleeps in the kernel until the child is a zombie without reaping it: its
/// pid stays ours (a signal to it is harmless) until `try_wait` below collects the status.
/// A hangup needs no wake-up of its own here: it reaches ssh as a signal and ssh's exit
/// ends the wait. This thread spawned ssh and stays alive while blocked, so ssh's
/// parent-death signal is unaffected.
fn reap(
    child: &mut std::process::Child,
    slot: &ChildSlot,
) -> std::io::Result<std::process::ExitStatus> {
    let pid = libc::id_t::try_from(child.id()).map_err(std::io::Error::other)?;
    loop {
        // SAFETY: waitid only writes the siginfo_t we own; WNOWAIT leaves the child unreaped.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            // Cannot watch without reaping: clear the pid first, then wait blocking.
            if let Ok(mut guard) = slot.pid.lock() {
                *guard = None;
            }
            return child.wait();
        }
    }
    let mut guard = slot
        .pid
        .lock()
        .map_err(|_| std::io::Error::other("child slot poisoned"))?;
    *guard = None;
    match child.try_wait() {
        Ok(Some(st)) => Ok(st),
        // The child is a zombie by now; should it not be reapable yet, wait for it (the
        // pid is already cleared, so nothing signals it meanwhile).
        Ok(None) | Err(_) => {
            drop(guard);
            child.wait()
        }
    }
}

/// ssh's exit status as one byte (128+signal when killed).
fn exit_code(st: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(255),
        (None, Some(s)) => u8::try_from((128 + s) & 0xff).unwrap_or(255),
        _ => 255,
    }
}

/// Whether `peer` is a child of the ssh whose pid is in `ssh_pid` (waiting up to 1 s for it
/// to be known: ssh may in theory connect before `spawn` returned here).
pub fn is_child_of(peer: libc::pid_t, ssh_pid: &AtomicI32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut want = ssh_pid.load(Ordering::Acquire);
    while want == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        want = ssh_pid.load(Ordering::Acquire);
    }
    want > 0 && (peer == want || agent::parent_pid(peer).ok() == Some(want))
}

fn set_blocking(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Create a fresh private directory (0700) under `parent`.
pub fn private_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    for _ in 0..8 {
        let p = parent.join(format!("{prefix}{:016x}", rand::random::<u64>()));
        match fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o700))?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a unique directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: RequestKind, pty: bool, cmd: &str) -> Request {
        Request {
            kind,
            pty,
            term: Some("xterm".into()),
            command: cmd.as_bytes().to_vec(),
        }
    }

    fn plan<'a>(r: &'a Request, auth: AuthOptions) -> SshPlan<'a> {
        SshPlan {
            role: SshRole::Request(r),
            account: "root",
            alias: "web-01",
            address: "127.0.0.2",
            port: 22,
            known_hosts: Path::new("/run/k/p/kh"),
            log: Path::new("/run/k/p/log"),
            connect_timeout_s: 10,
            auth,
        }
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn exec_args_put_the_command_last_as_one_argument() {
        let r = req(
            RequestKind::Exec,
            false,
            "-oProxyCommand=id; echo `id` $(id)",
        );
        let key = AuthOptions::Key {
            agent: "/run/k/p/agent.sock".into(),
            public_key: "/run/k/p/id.pub".into(),
        };
        let a = strs(&ssh_args(&plan(&r, key)).unwrap());
        let n = a.len();
        assert_eq!(
            &a[n - 3..],
            ["--", "127.0.0.2", "-oProxyCommand=id; echo `id` $(id)"]
        );
        assert_eq!(a[n - 4], "-T");
        for must in [
            "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/run/k/p/kh",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=web-01",
            "ClearAllForwardings=yes",
            "ForwardAgent=no",
            "ForwardX11=no",
            "PermitLocalCommand=no",
            "ControlPath=none",
            "IdentityAgent=/run/k/p/agent.sock",
            "IdentityFile=/run/k/p/id.pub",
            "IdentitiesOnly=yes",
            "PasswordAuthentication=no",
            "LogLevel=VERBOSE",
        ] {
            assert!(a.iter().any(|x| x == must), "missing {must}: {a:?}");
        }
        assert_eq!(&a[..4], ["-F", "none", "-e", "none"]);
        let l = a.iter().position(|x| x == "-l").unwrap();
        assert_eq!(a[l + 1], "root");
    }

    #[test]
    fn shell_pty_and_subsystem_args() {
        let r = req(RequestKind::Shell, true, "");
        let a = strs(&ssh_args(&plan(&r, AuthOptions::Password)).unwrap());
        let n = a.len();
        assert_eq!(&a[n - 3..], ["-tt", "--", "127.0.0.2"]);
        assert!(a.iter().any(|x| x == "PubkeyAuthentication=no"));
        assert!(a.iter().any(|x| x == "NumberOfPasswordPrompts=1"));
        let r = req(RequestKind::Subsystem, false, "sftp");
        let a = strs(&ssh_args(&plan(&r, AuthOptions::Password)).unwrap());
        let n = a.len();
        assert_eq!(&a[n - 5..], ["-T", "-s", "--", "127.0.0.2", "sftp"]);
    }

    #[test]
    fn master_args_open_no_session_and_listen_on_the_control_socket() {
        let r = req(RequestKind::Shell, true, "");
        let mut p = plan(&r, AuthOptions::Password);
        let ctl = Path::new("/run/k/p/r-1/c");
        p.role = SshRole::Master(ctl);
        let a = strs(&ssh_args(&p).unwrap());
        let n = a.len();
        assert_eq!(&a[n - 5..], ["-N", "-n", "-T", "--", "127.0.0.2"]);
        for must in [
            "ControlMaster=yes",
            "ControlPath=/run/k/p/r-1/c",
            "ControlPersist=no",
            "StrictHostKeyChecking=yes",
            "ClearAllForwardings=yes",
        ] {
            assert!(a.iter().any(|x| x == must), "missing {must}: {a:?}");
        }
        assert!(!a.iter().any(|x| x == "ControlPath=none" || x == "-tt"));
        // ssh would expand %-tokens in a control path; a long one cannot be bound.
        p.role = SshRole::Master(Path::new("/run/k/%h/c"));
        assert!(ssh_args(&p).is_err());
        let long = format!("/run/{}/c", "x".repeat(MAX_CONTROL_PATH));
        p.role = SshRole::Master(Path::new(&long));
        assert!(ssh_args(&p).is_err());
    }

    #[test]
    fn mux_args_never_connect_on_their_own_and_keep_the_command_whole() {
        let ctl = Path::new("/run/k/p/r-1/c");
        let log = Path::new("/run/k/p/m-1/mux.log");
        let r = req(RequestKind::Exec, false, "echo $HOME; id");
        let a = strs(&mux_args(ctl, log, &r, "root", "127.0.0.2", 2222).unwrap());
        let n = a.len();
        assert_eq!(&a[n - 4..], ["-T", "--", "127.0.0.2", "echo $HOME; id"]);
        for must in [
            "ControlMaster=no",
            "ControlPath=/run/k/p/r-1/c",
            "ProxyCommand=/bin/false",
            "BatchMode=yes",
            "IdentityAgent=none",
            "PasswordAuthentication=no",
            "PubkeyAuthentication=no",
            "ForwardAgent=no",
        ] {
            assert!(a.iter().any(|x| x == must), "missing {must}: {a:?}");
        }
        let p = a.iter().position(|x| x == "-p").unwrap();
        assert_eq!(a[p + 1], "2222");
        let r = req(RequestKind::Subsystem, true, "sftp");
        let a = strs(&mux_args(ctl, log, &r, "root", "web", 22).unwrap());
        let n = a.len();
        assert_eq!(&a[n - 5..], ["-tt", "-s", "--", "web", "sftp"]);
        assert!(mux_args(ctl, log, &r, "root", "-oProxyCommand=x", 22).is_err());
    }

    #[test]
    fn a_credential_cell_hands_over_once_and_survives_an_interrupted_wait() {
        use crate::sensitive::SecretString;
        let cell = Arc::new(CredCell::default());
        // An attempt that ends before ssh asked: its waiters wake empty-handed...
        let (c, generation) = (Arc::clone(&cell), cell.generation());
        let waiter = std::thread::spawn(move || c.take_password(generation).is_some());
        std::thread::sleep(Duration::from_millis(50));
        cell.interrupt();
        assert!(!waiter.join().unwrap());
        // An interrupt before the wait began ends it too.
        assert!(cell.take_password(generation).is_none());
        let generation = cell.generation();
        // ...and the credential handed over later is there for the next attempt, once.
        assert!(cell.fill(Credential::Password(SecretString::new("pw".into()))));
        assert!(!cell.fill(Credential::Password(SecretString::new("again".into()))));
        assert!(
            cell.take_key(generation).is_none(),
            "a password is not a key"
        );
        assert_eq!(cell.take_password(generation).unwrap().expose(), "pw");
        assert!(cell.take_password(generation).is_none(), "taken once");
        cell.close();
        assert!(!cell.fill(Credential::Password(SecretString::new("late".into()))));
    }

    #[test]
    fn a_connection_dropped_before_the_banner_is_marked_retryable() {
        let mut s = LogSummary::new("root", "127.0.0.2");
        s.absorb("kex_exchange_identification: read: Connection reset by peer\n");
        s.absorb("Connection reset by 127.0.0.2 port 22\n");
        assert!(s.no_banner && !s.authenticated);
        let mut s = LogSummary::new("root", "127.0.0.2");
        s.absorb("ssh: kex_exchange_identification: Connection closed by remote host\n");
        assert!(s.no_banner);
        let mut s = LogSummary::new("root", "127.0.0.2");
        s.absorb("ssh: connect to host 127.0.0.2 port 22: Connection refused\n");
        assert!(!s.no_banner);
        assert_eq!(
            master_lost_line("Control socket connect(/run/k/c): No such file or directory\n"),
            Some("Control socket connect(/run/k/c): No such file or directory")
        );
        assert_eq!(master_lost_line("bash: line 1: oops\n"), None);
    }

    #[test]
    fn refuses_bad_destinations_and_nul() {
        let r = req(RequestKind::Exec, false, "id");
        let mut p = plan(&r, AuthOptions::Password);
        for bad in ["-oProxyCommand=x", "a@b", "a b", ""] {
            p.address = bad;
            assert!(ssh_args(&p).is_err(), "{bad}");
        }
        let r = Request {
            command: b"a\0b".to_vec(),
            ..req(RequestKind::Exec, false, "")
        };
        assert!(ssh_args(&plan(&r, AuthOptions::Password)).is_err());
    }

    #[test]
    fn reap_blocks_until_exit_and_clears_the_slot() {
        let slot = ChildSlot::default();
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 0.2; exit 7"])
            .spawn()
            .unwrap();
        *slot.pid.lock().unwrap() = Some(child.id() as i32);
        let t0 = Instant::now();
        let st = reap(&mut child, &slot).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(exit_code(st), 7);
        assert!(slot.pid.lock().unwrap().is_none());
    }

    #[test]
    fn a_hangup_through_the_slot_ends_the_wait() {
        let slot = Arc::new(ChildSlot::default());
        let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        *slot.pid.lock().unwrap() = Some(child.id() as i32);
        let s2 = Arc::clone(&slot);
        let hangup = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            s2.signal(libc::SIGHUP);
        });
        let t0 = Instant::now();
        let st = reap(&mut child, &slot).unwrap();
        hangup.join().unwrap();
        assert_eq!(exit_code(st), 128 + libc::SIGHUP as u8);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(slot.pid.lock().unwrap().is_none());
        // The slot is cleared: signalling it now reaches nobody.
        slot.signal(libc::SIGKILL);
    }

    #[test]
    fn terms() {
        assert_eq!(validated_term(Some("xterm-256color")), "xterm-256color");
        assert_eq!(validated_term(Some("screen.xterm+x_1")), "screen.xterm+x_1");
        assert_eq!(validated_term(Some("xterm$(id)")), "dumb");
        assert_eq!(validated_term(Some("vt100; rm -rf /")), "dumb");
        assert_eq!(validated_term(Some(&"a".repeat(65))), "dumb");
        assert_eq!(validated_term(Some("")), "dumb");
        assert_eq!(validated_term(None), "dumb");
    }

    #[test]
    fn known_hosts_lines() {
        let kh = known_hosts(
            "web-01",
            &[
                "ssh-ed25519 AAAAC3Nz host@x".into(),
                "garbage".into(),
                "ssh-rsa AAAAB3 ".into(),
            ],
        );
        assert_eq!(kh, "web-01 ssh-ed25519 AAAAC3Nz\nweb-01 ssh-rsa AAAAB3\n");
    }

    #[test]
    fn pinned_fingerprints_match_ssh_keygen() {
        // `ssh-keygen -lf` of this key prints
        // 256 SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU x (ED25519)
        let k =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x";
        assert_eq!(
            pinned_fingerprint(k).unwrap(),
            "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
        );
        assert!(pinned_fingerprint("ssh-ed25519 !!!").is_none());
    }

    #[test]
    fn log_classification() {
        let denied = "root@127.0.0.2: Permission denied (";
        let cases = [
            (
                "Authenticated to web-01 ([127.0.0.2]:22) using \"publickey\".\r\n",
                LogEvent::Authenticated,
            ),
            (
                "root@127.0.0.2: Permission denied (publickey).\r\n",
                LogEvent::PermissionDenied,
            ),
            (
                "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n",
                LogEvent::HostKeyFailure,
            ),
            ("Host key verification failed.", LogEvent::HostKeyFailure),
            (
                "No ED25519 host key is known for web-01 and you have requested strict checking.",
                LogEvent::HostKeyFailure,
            ),
            (
                "Host key for web-01 has changed and you have requested strict checking.",
                LogEvent::HostKeyFailure,
            ),
            (
                "The fingerprint for the ED25519 key sent by the remote host is",
                LogEvent::FingerprintFollows,
            ),
            (
                "SHA256:abcDEF+/x.",
                LogEvent::Fingerprint("SHA256:abcDEF+/x".into()),
            ),
            (
                "ssh: connect to host 127.0.0.2 port 22: Connection refused",
                LogEvent::ConnectError("connection refused"),
            ),
            (
                "Received disconnect from 127.0.0.2 port 22:2: Too many authentication failures",
                LogEvent::ServerDisconnect,
            ),
            ("Server host key: ssh-ed25519 SHA256:xyz", LogEvent::Other),
            ("Transferred: sent 1, received 2 bytes", LogEvent::Other),
            // Someone else's Permission denied, or one in the middle of a line: not ours.
            (
                "deploy@127.0.0.2: Permission denied (password).",
                LogEvent::Other,
            ),
            (
                "Remote: root@127.0.0.2: Permission denied (publickey).",
                LogEvent::Other,
            ),
            (
                "banner says: REMOTE HOST IDENTIFICATION HAS CHANGED",
                LogEvent::Other,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(classify_log_line(line, denied), want, "{line}");
        }
        let mut s = LogSummary::new("root", "127.0.0.2");
        assert!(!s.absorb("Server host key: ssh-ed25519 SHA256:xyz"));
        assert!(s.absorb("Authenticated to web-01 ([127.0.0.2]:22) using \"password\"."));
        assert!(s.authenticated && !s.denied);
    }

    #[test]
    fn the_target_cannot_steer_the_classification() {
        // The target's disconnect text, with newlines ssh does not escape, tries to forge a
        // rejection (which would make the broker try ACSPrevious) and a host key failure.
        let mut s = LogSummary::new("root", "127.0.0.2");
        for line in [
            "Server host key: ssh-ed25519 SHA256:xyz\r\n",
            "Received disconnect from 127.0.0.2 port 22:11: bye\r\n",
            "root@127.0.0.2: Permission denied (publickey).\r\n",
            "Host key verification failed.\r\n",
            "Authenticated to web-01 ([127.0.0.2]:22) using \"publickey\".\r\n",
            "Disconnected from 127.0.0.2 port 22\r\n",
        ] {
            assert!(!s.absorb(line), "{line}");
        }
        assert!(!s.denied && !s.host_key_failed && !s.authenticated, "{s:?}");
        assert!(s.server_disconnected);
        assert_eq!(
            s.connect_error.as_ref().map(|c| c.reason),
            Some("connection closed by the target")
        );
        // A fingerprint counts only right after ssh's own announcement of it.
        let mut s = LogSummary::new("root", "127.0.0.2");
        s.absorb("SHA256:forged.");
        assert_eq!(s.presented, None);
        s.absorb("The fingerprint for the ED25519 key sent by the remote host is\r\n");
        s.absorb("SHA256:real+key/1.\r\n");
        assert!(s.absorb("Host key verification failed.\r\n"));
        assert_eq!(s.presented.as_deref(), Some("SHA256:real+key/1"));
        assert!(s.host_key_failed);
    }

    #[test]
    fn connect_failures_are_short_and_name_no_address() {
        let cases = [
            (
                "ssh: connect to host 10.9.8.7 port 22: Connection refused",
                "connection refused",
            ),
            (
                "ssh: connect to host 10.9.8.7 port 22: Connection timed out",
                "timed out",
            ),
            (
                "ssh: connect to host 10.9.8.7 port 22: No route to host",
                "no route to host",
            ),
            (
                "ssh: connect to host 10.9.8.7 port 22: Network is unreachable",
                "network unreachable",
            ),
            (
                "ssh: Could not resolve hostname db.internal: Name or service not known",
                "its address does not resolve",
            ),
            (
                "kex_exchange_identification: Connection closed by remote host",
                "connection closed by the target",
            ),
            (
                "kex_exchange_identification: read: Connection reset by peer",
                "connection reset by the target",
            ),
            (
                "Connection timed out during banner exchange",
                "timed out",
            ),
            ("Connection to 10.9.8.7 port 22 timed out", "timed out"),
            (
                "Connection closed by 10.9.8.7 port 22",
                "connection closed by the target",
            ),
            (
                "Unable to negotiate with 10.9.8.7 port 22: no matching host key type found. Their offer: ssh-dss",
                "no algorithms in common with the target",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(short_connect_reason(line), Some(want), "{line}");
            assert_eq!(
                classify_log_line(line, "root@10.9.8.7: Permission denied ("),
                LogEvent::ConnectError(want)
            );
        }
        assert_eq!(short_connect_reason("Authenticated to x"), None);
        let mut s = LogSummary::new("root", "10.9.8.7");
        s.absorb("ssh: connect to host 10.9.8.7 port 22: Connection refused\r\n");
        let c = s.connect_error.unwrap();
        assert_eq!(c.reason, "connection refused");
        assert!(c.line.contains("10.9.8.7"), "the log keeps ssh's own line");
    }
}
