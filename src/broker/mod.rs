//! `kmsbastion-broker`: one per composite login. Holds the credential path for that login and
//! nothing else.
//!
//! # How it is started (by `pam_kmsbastion.so`, session open, as root)
//!
//! ```text
//! /usr/libexec/kmsbastion/kmsbastion-broker --config /etc/kmsbastion/kmsbastion.toml \
//!     --engineer alice --account root --host web-01 --source 127.0.0.1|- \
//!     --sshd-pid <pid of the sshd process that opened the PAM session> \
//!     --lifetime-fd <read end of a pipe whose write end sshd keeps> \
//!     --ready-fd <write end of the ready pipe>
//! ```
//! (exactly `pam_session::BrokerArgs`), with environment `PATH=/usr/sbin:/usr/bin:/sbin:/bin`
//! only, stdin/stdout/stderr on /dev/null, in its own session.
//!
//! # What it does
//!
//! 1. As root: loads the config; looks up `bastion.service_user` (getpwnam) and the engineer's
//!    uid (config); opens the audit file; builds the KMS client (so a root-only credentials
//!    file can be read). `runtime_dir` must be root-owned and writable by root only (else it
//!    refuses to start: root must never work where another user can swap in a symlink). In it,
//!    through directory descriptors (`mkdirat`, `O_NOFOLLOW`, `fchown`/`fchmod`): `s-<random>/`
//!    (root, 0711), its private directory `p/` (0700, service user) and the socket
//!    `connect.sock` (bound under umask 0177, then `fchownat(AT_SYMLINK_NOFOLLOW)` to the
//!    engineer's uid, mode 0600: only that uid can connect). The PAM module removes `s-*` (as
//!    root) when the session closes.
//! 2. Drops to the service user for good (`setgroups([])`, `setresgid`, `setresuid`, checks
//!    that `setuid(0)` fails), then `PR_SET_DUMPABLE=0`, `PR_SET_NO_NEW_PRIVS`,
//!    `RLIMIT_CORE=0`. Memory: `mlockall(MCL_CURRENT|MCL_ONFAULT)` while still root (no
//!    `MCL_FUTURE`, RLIMIT_MEMLOCK untouched: idle logins must not lock memory without bound),
//!    plus `mlock` of each fetched secret value (best effort); threads get small stacks.
//! 3. Writes `ready <socket path>\n` to the ready fd (or `error <why>\n` and exits 1), which
//!    the PAM module exports as `KMSBASTION_SOCKET`.
//! 4. Serves until the lifetime pipe reaches EOF (sshd session over) or SIGTERM/SIGHUP/SIGINT;
//!    then hangs up every onward ssh, removes its directory and exits 0.
//!
//! A connection is accepted only from a peer (SO_PEERCRED) with the engineer's uid whose
//! process ancestry (`/proc/PID/stat`) includes `--sshd-pid`. Each connection is one request
//! (see `session`), served on its own thread (at most [`MAX_CONCURRENT_REQUESTS`] at once).
//! Every request first re-reads the configuration and re-evaluates the login's grant (source,
//! time window, rule still present: client-side connection sharing can keep a login open
//! long after its grant ended), and counts against [`RATE_LIMIT`] per [`RATE_WINDOW`]; a
//! refusal answers the grant's engineer line (or the rate line) with exit status 79 and an
//! audit `refused` event. Then `GetSecretValue(ACSCurrent)` of the login's host account
//! secret (a request cannot name a target: the broker only ever serves its own
//! `account@host`, as configured now), parse and check `UserName`, run the onward ssh (see
//! [`onward`]) on the descriptors handed over, retry once with ACSPrevious if the target
//! rejected ACSCurrent, and answer `Exit{status}` or `Failed{code, line}` (see [`failure`]).
//! Each request is audited (`connect-start`, `connect-end`).
//!
//! # Exit status
//!
//! 0 after a normal end (lifetime EOF or signal); 1 when it could not start (the reason is on
//! the ready pipe as `error …`, which the PAM module logs, and on syslog); 2 for a bad command
//! line.
//!
//! # Askpass mode
//!
//! With `KMSBASTION_ASKPASS=<socket>` in its environment (set only for the onward ssh, which
//! runs the broker binary as `SSH_ASKPASS`), the binary is an askpass client instead: see
//! [`askpass`].
//!
//! # Files a test can look at
//!
//! `runtime_dir/s-*/connect.sock` while a login is open (gone after); audit lines in
//! `audit.file`; errors of the broker go to syslog (ident `kmsbastion`) and to the ready pipe
//! before it is ready.

pub mod askpass;
pub mod failure;
pub mod onward;
pub mod preconnect;

use crate::audit::{self, Audit, Event};
use crate::config::{Config, Host, HostAccount, Scope};
use crate::grant::{self, Decision};
use crate::kms::{KmsClient, KmsError, KmsErrorKind, PreparedClient, SecretStage};
use crate::login::LoginString;
use crate::pam_session::{BrokerArgs, ReadyLine};
use crate::secret::TargetSecret;
use crate::session::{self, FrameReader, Message, Request, RequestKind, EXIT_REFUSED, REQUEST_FDS};
use failure::{failure_for, log_detail, OnwardError, Target};
use onward::{spawn_with_stack, Attempt, AttemptContext, AttemptRole, ChildSlot, SMALL_STACK};
use onward::{CredCell, Supply};
use preconnect::{Claim, Preconnect, Ready};
use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// At most this many onward connections at once per login (sshd's `MaxSessions` in the
/// drop-in caps the channels of one client connection lower still).
pub const MAX_CONCURRENT_REQUESTS: usize = 16;

/// At most this many onward connections (each one a KMS fetch) per login within
/// [`RATE_WINDOW`].
pub const RATE_LIMIT: usize = 30;
/// The window of [`RATE_LIMIT`].
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Stack of a request thread: the KMS call (request signing, JSON), secret parsing (PEM, RSA)
/// and the onward ssh's bookkeeping. Far below the 2 MiB default, with a wide margin.
pub const REQUEST_STACK: usize = 512 * 1024;

/// How often the broker tries again when the target drops a connection before its banner
/// (sshd's `MaxStartups` throttling), with jittered, doubling pauses from
/// [`NO_BANNER_PAUSE`].
pub const NO_BANNER_RETRIES: u32 = 4;
/// The first pause of [`NO_BANNER_RETRIES`].
pub const NO_BANNER_PAUSE: Duration = Duration::from_millis(150);

/// At most this many prepared connections wait unclaimed for one target host at a time, jump
/// host wide (each holds a startup slot of the target's sshd, whose default `MaxStartups`
/// starts refusing at 10): an engineer opening logins that never ask for a session cannot
/// crowd the target out. Logins beyond it simply connect when their request comes.
pub const PRECONNECT_SLOTS_PER_HOST: usize = 8;

/// Mode of `runtime_dir/s-*`: root-owned, traversable so the engineer can reach its socket.
pub const SESSION_DIR_MODE: u32 = 0o711;

/// How far up the process tree a peer's ancestry is followed.
const MAX_ANCESTRY_DEPTH: usize = 64;

/// The parent pid of `pid`, from `<proc_root>/<pid>/stat` (`pid (comm) state ppid …`).
pub fn ppid_from_proc(proc_root: &Path, pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    let mut f = after.split_ascii_whitespace();
    f.next()?;
    f.next()?.parse().ok()
}

/// Whether `ancestor` is `pid` or one of its ancestors.
pub fn descends_from(pid: i32, ancestor: i32, ppid_of: impl Fn(i32) -> Option<i32>) -> bool {
    let mut p = pid;
    for _ in 0..MAX_ANCESTRY_DEPTH {
        if p == ancestor {
            return true;
        }
        if p <= 1 {
            return false;
        }
        match ppid_of(p) {
            Some(next) if next != p => p = next,
            _ => return false,
        }
    }
    false
}

/// A sliding-window limit: at most `max` admissions within any `window`.
#[derive(Debug)]
pub struct RateLimiter {
    max: usize,
    window: Duration,
    admitted: VecDeque<Instant>,
}

impl RateLimiter {
    /// A limiter admitting `max` per `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            admitted: VecDeque::new(),
        }
    }

    /// Admit one at `now`, or say how long until the next admission is possible.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        while let Some(&t) = self.admitted.front() {
            if now.saturating_duration_since(t) >= self.window {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        match self.admitted.front() {
            Some(&oldest) if self.admitted.len() >= self.max => Err(self
                .window
                .saturating_sub(now.saturating_duration_since(oldest))),
            _ if self.max == 0 => Err(self.window),
            _ => {
                self.admitted.push_back(now);
                Ok(())
            }
        }
    }
}

/// What the configuration as it is NOW says about one more onward connection of a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// Still granted; the host and account as configured now (address, pinned keys, secret).
    Allow { host: Host, account: HostAccount },
    /// No longer granted: `line` for the engineer, `reason` for the log.
    Deny { line: String, reason: String },
}

/// Re-evaluate the grant of `login` from `source` at `now` (each request does: a client's
/// connection sharing can keep a login open long after its grant ended or was removed).
pub fn recheck(
    cfg: &Config,
    login: &LoginString,
    source: Option<IpAddr>,
    now: SystemTime,
) -> Recheck {
    match grant::evaluate(cfg, login, source, now) {
        Decision::Allow { .. } => match cfg.account(&login.host, &login.account) {
            Some((h, a)) => Recheck::Allow {
                host: h.clone(),
                account: a.clone(),
            },
            None => Recheck::Deny {
                line: "login refused: you have no grant for this account@host".into(),
                reason: "grant allows an account that is not in the inventory".into(),
            },
        },
        Decision::Deny(reason) => Recheck::Deny {
            line: reason.engineer_message().to_owned(),
            reason: format!("grant re-checked for a new request: {reason}"),
        },
    }
}

/// Why `runtime_dir` (owner `uid`, `mode`) must not be used, if it must not: root follows
/// paths inside it, so nobody but root may write to it.
pub fn runtime_dir_problem(is_dir: bool, uid: u32, mode: u32) -> Option<String> {
    if !is_dir {
        Some("is not a directory".into())
    } else if uid != 0 {
        Some(format!("is owned by uid {uid}, not root"))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:04o})",
            mode & 0o7777
        ))
    } else {
        None
    }
}

/// Everything a request needs, shared by the request threads.
struct Broker {
    args: BrokerArgs,
    /// The login this broker serves (re-checked against the configuration per request).
    login: LoginString,
    /// Host and account as configured at start (names for audit records).
    host: Host,
    account: HostAccount,
    engineer_uid: u32,
    ssh: PathBuf,
    askpass_program: PathBuf,
    connect_timeout_s: u32,
    private: PathBuf,
    /// The KMS client, resolved as root at start and built (its HTTP client) right after
    /// the broker reported ready, off the login's path; see [`Broker::kms`].
    kms_prepared: Mutex<Option<PreparedClient>>,
    kms: std::sync::OnceLock<Result<KmsClient, String>>,
    audit: Audit,
    children: Mutex<Vec<Arc<ChildSlot>>>,
    rate: Mutex<RateLimiter>,
    /// The connection prepared for the first request.
    pre: Arc<Preconnect>,
    /// This login's slot among the host's [`PRECONNECT_SLOTS_PER_HOST`] (a `flock`ed file
    /// under `runtime_dir/preconnect/`), held while the prepared connection waits unclaimed.
    pre_slot: Mutex<Option<OwnedFd>>,
}

/// The broker's entry point (argv without argv\[0\]); returns the exit status.
pub fn main(argv: &[String]) -> i32 {
    block_signals();
    let args = match BrokerArgs::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kmsbastion-broker: {e}");
            return 2;
        }
    };
    // SAFETY: the PAM module passed these descriptors to us (and nothing else uses them).
    let ready = unsafe { fs::File::from_raw_fd(args.ready_fd) };
    // SAFETY: as above.
    let lifetime = unsafe { OwnedFd::from_raw_fd(args.lifetime_fd) };
    // Neither pipe may leak into the onward ssh processes.
    // SAFETY: fcntl on descriptors we own.
    unsafe {
        libc::fcntl(lifetime.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(ready.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    match start(args) {
        Ok((broker, listener, session_dir, socket)) => {
            let mut ready = ready;
            let line = ReadyLine::Ready(socket.clone()).to_line();
            if ready.write_all(line.as_bytes()).is_err() {
                let _ = fs::remove_dir_all(&session_dir);
                return 1;
            }
            drop(ready);
            let broker = Arc::new(broker);
            start_preconnect(&broker);
            // Build the KMS client now, in the background: the first request usually
            // arrives tens of milliseconds later and finds it ready.
            let b = Arc::clone(&broker);
            if spawn_with_stack(REQUEST_STACK, move || drop(b.kms())).is_err() {
                audit::send_syslog(4, "broker: cannot start the KMS client thread");
            }
            serve(&broker, &listener, &lifetime);
            shutdown(&broker);
            drop(listener);
            let _ = fs::remove_file(&socket);
            let _ = fs::remove_dir_all(&session_dir);
            0
        }
        Err(e) => {
            audit::send_syslog(3, &format!("broker: {e}"));
            let mut ready = ready;
            let _ = ready.write_all(ReadyLine::Error(e).to_line().as_bytes());
            1
        }
    }
}

/// Block the signals the serve loop reads through a signalfd (before any thread exists, so
/// every thread inherits the mask; std resets the mask for spawned children).
fn block_signals() {
    // SAFETY: plain signal-mask manipulation on a zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

struct ServiceUser {
    uid: u32,
    gid: u32,
}

fn service_user(name: &str) -> Result<ServiceUser, String> {
    let c = CString::new(name).map_err(|_| "NUL in service_user")?;
    // SAFETY: getpwnam_r with a buffer we own; the result points into `buf`.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let rc = libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out);
        if rc != 0 || out.is_null() {
            return Err(format!(
                "service user '{name}' does not exist (create it: useradd --system {name})"
            ));
        }
        if pw.pw_uid == 0 {
            return Err(format!("service user '{name}' must not be root"));
        }
        Ok(ServiceUser {
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        })
    }
}

fn start(args: BrokerArgs) -> Result<(Broker, UnixListener, PathBuf, PathBuf), String> {
    // SAFETY: geteuid/umask have no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must be started as root (by pam_kmsbastion)".into());
    }
    // SAFETY: as above.
    unsafe { libc::umask(0o077) };
    let login = LoginString::new(&args.engineer, &args.account, &args.host)
        .map_err(|e| format!("invalid login identity: {e}"))?;
    // Only this login's part of the configuration (through the index when it is fresh).
    let cfg = Config::load_scoped(&args.config, Scope::Login(&login)).map_err(|e| e.to_string())?;
    let engineer = cfg
        .engineer(&args.engineer)
        .ok_or_else(|| format!("unknown engineer {}", args.engineer))?;
    let engineer_uid = engineer.uid;
    let (host, account) = cfg
        .account(&args.host, &args.account)
        .map(|(h, a)| (h.clone(), a.clone()))
        .ok_or_else(|| format!("unknown account {}@{}", args.account, args.host))?;
    let svc = service_user(&cfg.bastion.service_user)?;
    if engineer_uid == 0 || engineer_uid == svc.uid {
        return Err("the engineer uid must be neither root nor the service user".into());
    }
    let audit = Audit::open(cfg.audit.file.as_deref(), cfg.audit.syslog);
    let kms = PreparedClient::from_settings(&cfg.kms).map_err(|e| format!("KMS client: {e}"))?;

    let (session_dir, listener, socket) =
        session_directory(&cfg.bastion.runtime_dir, &svc, engineer_uid)?;
    let pre_slot = preconnect_slot(&cfg.bastion.runtime_dir, &host.name);
    let cleanup_err = |e: String| {
        let _ = fs::remove_dir_all(&session_dir);
        e
    };
    let private = session_dir.join("p");

    lock_memory();
    drop_privileges(&svc).map_err(cleanup_err)?;
    harden();

    let askpass_program = std::env::current_exe().unwrap_or_else(|_| cfg.bastion.broker.clone());
    let broker = Broker {
        args,
        login,
        host,
        account,
        engineer_uid,
        ssh: cfg.bastion.ssh.clone(),
        askpass_program,
        connect_timeout_s: cfg.bastion.connect_timeout_s,
        private,
        kms_prepared: Mutex::new(Some(kms)),
        kms: std::sync::OnceLock::new(),
        audit,
        children: Mutex::new(Vec::new()),
        rate: Mutex::new(RateLimiter::new(RATE_LIMIT, RATE_WINDOW)),
        pre: Arc::new(Preconnect::default()),
        pre_slot: Mutex::new(pre_slot),
    };
    Ok((broker, listener, session_dir, socket))
}

fn c_path(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("NUL in {}", p.display()))
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `openat(dir, name, O_DIRECTORY|O_NOFOLLOW)`: a directory, never through a symlink.
fn open_dir_at(dir: Option<&OwnedFd>, name: &CStr) -> Result<OwnedFd, String> {
    let base = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: openat with a valid descriptor (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            base,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os_err(&format!("opening {}", name.to_string_lossy())));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat, String> {
    // SAFETY: fstat into a zeroed stat we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(os_err("fstat"));
        }
        Ok(st)
    }
}

/// Set owner and mode through the descriptor (no path, so no symlink can redirect it).
fn fchown_fchmod(fd: &OwnedFd, uid: u32, gid: u32, mode: u32) -> Result<(), String> {
    // SAFETY: fchown/fchmod on a descriptor we own.
    unsafe {
        if libc::fchown(fd.as_raw_fd(), uid, gid) != 0 {
            return Err(os_err("fchown"));
        }
        if libc::fchmod(fd.as_raw_fd(), mode) != 0 {
            return Err(os_err("fchmod"));
        }
    }
    Ok(())
}

/// Create, as root, this login's directory and socket:
///
/// * `runtime_dir` must be a root-owned directory nobody else can write (created 0711 when
///   missing); anything else is refused, because root works inside it.
/// * `runtime_dir/s-<random>/` (root, 0711): nobody but root can add, remove or replace
///   anything in it, so the names below cannot be swapped for symlinks.
/// * `…/p/` (service user, 0700): the broker's private working directory (made with
///   `mkdirat` and set up through its descriptor).
/// * `…/connect.sock`: created 0600 (umask 0177 around `bind`), then given to the engineer's
///   uid with `fchownat(…, AT_SYMLINK_NOFOLLOW)` inside the root-only directory.
///
/// The unprivileged broker cannot remove `s-*` later; the PAM module (root) does at session
/// close.
fn session_directory(
    runtime: &Path,
    svc: &ServiceUser,
    engineer_uid: u32,
) -> Result<(PathBuf, UnixListener, PathBuf), String> {
    if !runtime.exists() {
        fs::DirBuilder::new()
            .mode(0o711)
            .recursive(true)
            .create(runtime)
            .map_err(|e| format!("creating {}: {e}", runtime.display()))?;
        // Explicitly: the umask would make it 0700, and engineers must traverse it.
        fs::set_permissions(runtime, fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("chmod {}: {e}", runtime.display()))?;
    }
    let rt = open_dir_at(None, &c_path(runtime)?).map_err(|e| {
        format!(
            "{}: {e} (it must be a directory, not a symlink)",
            runtime.display()
        )
    })?;
    let st = fstat(&rt)?;
    if let Some(problem) = runtime_dir_problem(
        st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        st.st_uid,
        st.st_mode,
    ) {
        return Err(format!(
            "runtime directory {} {problem}; it must be root-owned and writable only by root \
             (root:root 0711; see /usr/lib/tmpfiles.d/kmsbastion.conf)",
            runtime.display()
        ));
    }
    let mut made = None;
    for _ in 0..8 {
        let name = format!("s-{:016x}", rand::random::<u64>());
        let c = CString::new(name.as_bytes()).map_err(|_| "NUL in a name")?;
        // SAFETY: mkdirat with a directory descriptor we own and a NUL-terminated name.
        if unsafe { libc::mkdirat(rt.as_raw_fd(), c.as_ptr(), 0o700) } == 0 {
            made = Some((name, c));
            break;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::AlreadyExists {
            return Err(os_err(&format!(
                "creating a session directory in {}",
                runtime.display()
            )));
        }
    }
    let (name, c_name) = made.ok_or("could not create a unique session directory")?;
    let session_dir = runtime.join(&name);
    let fail = |e: String| {
        let _ = fs::remove_dir_all(&session_dir);
        e
    };
    let sd = open_dir_at(Some(&rt), &c_name).map_err(fail)?;
    fchown_fchmod(&sd, 0, 0, SESSION_DIR_MODE).map_err(fail)?;

    // SAFETY: mkdirat in the session directory we just made (root-only).
    if unsafe { libc::mkdirat(sd.as_raw_fd(), c"p".as_ptr(), 0o700) } != 0 {
        return Err(fail(os_err("creating the private directory")));
    }
    let pd = open_dir_at(Some(&sd), c"p").map_err(fail)?;
    fchown_fchmod(&pd, svc.uid, svc.gid, 0o700).map_err(fail)?;
    drop(pd);

    let socket = session_dir.join("connect.sock");
    // SAFETY: umask has no preconditions. None of the broker's threads exists yet (and no
    // other thread creates files).
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| fail(format!("binding {}: {e}", socket.display())))?;
    // SAFETY: fchownat in the root-only session directory, never following a symlink.
    let rc = unsafe {
        libc::fchownat(
            sd.as_raw_fd(),
            c"connect.sock".as_ptr(),
            engineer_uid,
            svc.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(fail(os_err("giving the socket to the engineer")));
    }
    Ok((session_dir, listener, socket))
}

/// A free slot for a prepared connection to `host`: one of [`PRECONNECT_SLOTS_PER_HOST`]
/// files `runtime/preconnect/<host>.<n>` (directory root 0700, made here as root), locked with
/// `flock` so the kernel frees it when the holder exits, whatever way. `None`: all taken, or
/// the directory is not as it must be (then nothing is prepared; logins work as before).
fn preconnect_slot(runtime: &Path, host: &str) -> Option<OwnedFd> {
    let rt = open_dir_at(None, &c_path(runtime).ok()?).ok()?;
    // SAFETY: mkdirat with a directory descriptor we own and a NUL-terminated name.
    let made = unsafe { libc::mkdirat(rt.as_raw_fd(), c"preconnect".as_ptr(), 0o700) };
    if made != 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::AlreadyExists {
        return None;
    }
    let dir = open_dir_at(Some(&rt), c"preconnect").ok()?;
    let st = fstat(&dir).ok()?;
    if st.st_uid != 0 || st.st_mode & 0o077 != 0 {
        audit::send_syslog(
            4,
            &format!(
                "broker: {}/preconnect must be root's, mode 0700; not preparing connections",
                runtime.display()
            ),
        );
        return None;
    }
    for n in 0..PRECONNECT_SLOTS_PER_HOST {
        let name = CString::new(format!("{host}.{n}")).ok()?;
        // SAFETY: openat in the root-only directory we own, never following a symlink.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: flock on that descriptor.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(fd);
        }
    }
    audit::send_syslog(
        6,
        &format!(
            "broker: {PRECONNECT_SLOTS_PER_HOST} prepared connections to {host} already wait; \
             this login connects when its request comes"
        ),
    );
    None
}

/// Lock the memory mapped so far as it is touched (best effort, while still root so the
/// RLIMIT_MEMLOCK of the service user does not apply to it). Deliberately not `MCL_FUTURE`:
/// every later thread stack and heap growth would be locked too, and hundreds of idle logins
/// could lock gigabytes. The pages that hold a fetched secret are locked one by one instead
/// (see [`lock_secret_pages`]).
fn lock_memory() {
    // SAFETY: mlockall with valid flags; failure is harmless.
    unsafe {
        libc::mlockall(libc::MCL_CURRENT | libc::MCL_ONFAULT);
    }
}

/// Keep the pages of `bytes` out of swap (best effort: within the service user's
/// RLIMIT_MEMLOCK; failure is ignored).
fn lock_secret_pages(bytes: &[u8]) {
    if !bytes.is_empty() {
        // SAFETY: mlock of memory we hold a reference to; it only pins pages.
        unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
    }
}

fn drop_privileges(svc: &ServiceUser) -> Result<(), String> {
    // SAFETY: credential syscalls with plain integer arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(svc.gid, svc.gid, svc.gid) != 0
            || libc::setresuid(svc.uid, svc.uid, svc.uid) != 0
        {
            return Err(format!(
                "dropping privileges: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Must not be able to regain root.
        if libc::setuid(0) == 0 || libc::seteuid(0) == 0 {
            return Err("privileges could be regained after dropping them".into());
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        libc::getresuid(&mut r, &mut e, &mut s);
        let (mut gr, mut ge, mut gs) = (0, 0, 0);
        libc::getresgid(&mut gr, &mut ge, &mut gs);
        if [r, e, s] != [svc.uid; 3] || [gr, ge, gs] != [svc.gid; 3] {
            return Err("credentials are not what was set".into());
        }
    }
    Ok(())
}

fn harden() {
    // SAFETY: prctl/setrlimit with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
}

fn signal_fd() -> Option<OwnedFd> {
    // SAFETY: signalfd on the set we blocked in block_signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            None
        } else {
            Some(OwnedFd::from_raw_fd(fd))
        }
    }
}

/// Accept connections until the lifetime pipe ends or a termination signal arrives.
fn serve(broker: &Arc<Broker>, listener: &UnixListener, lifetime: &OwnedFd) {
    let sigfd = signal_fd();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let mut pfds = vec![
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: lifetime.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some(s) = &sigfd {
            pfds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // While a prepared connection waits, wake up now and then to close it when idle.
        let timeout = if broker.pre.pending() { 500 } else { -1 };
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        broker.pre.drop_idle(preconnect::IDLE);
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if pfds.iter().skip(1).any(|p| p.revents != 0) {
            // Lifetime pipe: EOF/HUP (or stray data, also the end); or a signal.
            return;
        }
        if pfds
            .first()
            .map(|p| p.revents & libc::POLLIN != 0)
            .unwrap_or(false)
        {
            let Ok((stream, _)) = listener.accept() else {
                continue;
            };
            if active.load(Ordering::Acquire) >= MAX_CONCURRENT_REQUESTS {
                let _ = session::send(&stream, &session::Failure::Refused.to_message(), &[]);
                continue;
            }
            let b = Arc::clone(broker);
            let a = Arc::clone(&active);
            a.fetch_add(1, Ordering::AcqRel);
            let spawned = spawn_with_stack(REQUEST_STACK, move || {
                handle_connection(&b, stream);
                a.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = spawned {
                // The closure (and the stream in it) is gone: connect sees EOF.
                active.fetch_sub(1, Ordering::AcqRel);
                audit::send_syslog(3, &format!("broker: cannot start a request thread: {e}"));
            }
        }
    }
}

/// Hang up every onward ssh, give them a moment, then kill what is left.
fn shutdown(broker: &Broker) {
    let slots: Vec<Arc<ChildSlot>> = broker
        .children
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    for s in &slots {
        s.cancelled.store(true, Ordering::Release);
        s.signal(libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && broker
            .children
            .lock()
            .map(|c| !c.is_empty())
            .unwrap_or(false)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for s in broker
        .children
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default()
    {
        s.signal(libc::SIGKILL);
    }
}

impl Broker {
    fn target(&self, account: &HostAccount) -> Target {
        Target {
            account: account.name.clone(),
            host: self.host.name.clone(),
            secret: account.secret.clone(),
        }
    }

    /// Give back this login's prepared-connection slot (claimed, or over).
    fn release_pre_slot(&self) {
        if let Ok(mut s) = self.pre_slot.lock() {
            s.take();
        }
    }

    /// The KMS client, built on first use (waiting for a build in progress).
    fn kms(&self) -> Result<&KmsClient, KmsError> {
        let built = self.kms.get_or_init(|| {
            let prepared = self.kms_prepared.lock().ok().and_then(|mut p| p.take());
            match prepared {
                Some(p) => p.build().map_err(|e| e.to_string()),
                None => Err("the KMS client was never prepared".into()),
            }
        });
        built
            .as_ref()
            .map_err(|e| KmsError::new(KmsErrorKind::Config, format!("KMS client: {e}")))
    }

    /// How long a request waits for the connection being prepared: at most what preparing
    /// itself may take (KMS deadline, connect timeout, authentication).
    fn preconnect_wait(&self) -> Duration {
        Duration::from_secs(u64::from(self.connect_timeout_s) + 15)
    }

    fn event(&self, name: &'static str) -> Event {
        let mut e = Event::new(name);
        e.engineer = Some(self.args.engineer.clone());
        e.account = Some(self.account.name.clone());
        e.host = Some(self.host.name.clone());
        e.source = self.args.source.map(|s| s.to_string());
        e.secret = Some(self.account.secret.clone());
        e.pid = Some(std::process::id());
        e
    }

    fn refuse(&self, stream: &UnixStream, why: &str) {
        self.refuse_with(stream, why, session::Failure::Refused.to_message());
    }

    /// Refuse with an audit `refused` event (reason `why`) and `reply` to connect.
    fn refuse_with(&self, stream: &UnixStream, why: &str, reply: Message) {
        let mut e = self.event("refused");
        e.result = Some("refused".into());
        e.reason = Some(why.to_owned());
        self.audit.emit(&e);
        let _ = session::send(stream, &reply, &[]);
    }

    /// The grant, checked for each request. `Ok`: the host and account as configured now.
    fn admit(&self) -> Result<(Host, HostAccount), (String, Message)> {
        let refused = |line: String| Message::Failed {
            code: EXIT_REFUSED,
            message: line,
        };
        let cfg =
            Config::load_scoped(&self.args.config, Scope::Login(&self.login)).map_err(|e| {
                (
                    format!("cannot re-read the configuration: {e}"),
                    session::Failure::Internal.to_message(),
                )
            })?;
        let (host, account) = match recheck(&cfg, &self.login, self.args.source, SystemTime::now())
        {
            Recheck::Allow { host, account } => (host, account),
            Recheck::Deny { line, reason } => return Err((reason, refused(line))),
        };
        Ok((host, account))
    }

    /// The rate limit, counted for each onward connection.
    fn admit_rate(&self) -> Result<(), (String, Message)> {
        let refused = |line: String| Message::Failed {
            code: EXIT_REFUSED,
            message: line,
        };
        let mut rate = self.rate.lock().map_err(|_| {
            (
                "rate limiter poisoned".to_owned(),
                refused("request refused".into()),
            )
        })?;
        if let Err(wait) = rate.admit(Instant::now()) {
            let secs = wait.as_secs().max(1);
            return Err((
                format!("rate limit: more than {RATE_LIMIT} connections in {}s", RATE_WINDOW.as_secs()),
                refused(format!(
                    "too many connections to {}@{} (at most {RATE_LIMIT} a minute); try again in {secs} s",
                    self.login.account, self.login.host
                )),
            ));
        }
        Ok(())
    }
}

/// Whether the peer may use this broker: the engineer's uid, descending from our sshd.
fn peer_allowed(broker: &Broker, stream: &UnixStream) -> Result<(), String> {
    let cred = session::peer_cred(stream.as_fd()).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    if cred.uid != broker.engineer_uid {
        return Err(format!("peer uid {} is not the engineer's", cred.uid));
    }
    let sshd = i32::try_from(broker.args.sshd_pid).unwrap_or(-1);
    if cred.pid <= 0 || !descends_from(cred.pid, sshd, |p| ppid_from_proc(Path::new("/proc"), p)) {
        return Err(format!(
            "peer pid {} does not descend from sshd {sshd}",
            cred.pid
        ));
    }
    Ok(())
}

fn handle_connection(broker: &Arc<Broker>, stream: UnixStream) {
    if let Err(why) = peer_allowed(broker, &stream) {
        broker.refuse(&stream, &why);
        return;
    }
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = FrameReader::new(stream);
    let (request, fds) = match reader.recv() {
        Ok(Some(rx)) => match (rx.message, rx.fds.len()) {
            (Message::Request(r), REQUEST_FDS) => (r, rx.fds),
            (Message::Request(_), n) => {
                broker.refuse(&writer, &format!("request came with {n} descriptors"));
                return;
            }
            _ => {
                broker.refuse(&writer, "first message is not a request");
                return;
            }
        },
        Ok(None) => return,
        Err(e) => {
            broker.refuse(&writer, &format!("bad request: {e}"));
            return;
        }
    };
    let _ = reader.stream().set_read_timeout(None);
    let fds: [OwnedFd; 3] = match fds.try_into() {
        Ok(a) => a,
        Err(_) => return,
    };
    if request.kind == RequestKind::Subsystem && request.command != b"sftp" {
        broker.refuse(&writer, "only the sftp subsystem is served");
        return;
    }
    let (host, account) = match broker.admit() {
        Ok(v) => v,
        Err((why, reply)) => {
            broker.refuse_with(&writer, &why, reply);
            return;
        }
    };
    let prepared_matches = host == broker.host && account == broker.account;

    let slot = Arc::new(ChildSlot::default());
    if let Ok(mut c) = broker.children.lock() {
        c.push(Arc::clone(&slot));
    }
    // Control messages from connect while the request runs.
    let ctl_slot = Arc::clone(&slot);
    let control = spawn_with_stack(SMALL_STACK, move || loop {
        match reader.recv() {
            Ok(Some(rx)) => match rx.message {
                Message::WindowChanged => ctl_slot.signal(libc::SIGWINCH),
                Message::Hangup => {
                    ctl_slot.cancelled.store(true, Ordering::Release);
                    ctl_slot.signal(libc::SIGHUP);
                }
                _ => {}
            },
            // connect is gone: nobody is left to talk to the target for.
            Ok(None) | Err(_) => {
                ctl_slot.cancelled.store(true, Ordering::Release);
                ctl_slot.signal(libc::SIGHUP);
                return;
            }
        }
    });

    let control = match control {
        Ok(c) => c,
        Err(e) => {
            if let Ok(mut c) = broker.children.lock() {
                c.retain(|s| !Arc::ptr_eq(s, &slot));
            }
            audit::send_syslog(3, &format!("broker: cannot start a control thread: {e}"));
            let _ = session::send(&writer, &session::Failure::Internal.to_message(), &[]);
            return;
        }
    };

    let finish = |slot: &Arc<ChildSlot>| {
        let _ = writer.shutdown(std::net::Shutdown::Both);
        let _ = control.join();
        if let Ok(mut c) = broker.children.lock() {
            c.retain(|s| !Arc::ptr_eq(s, slot));
        }
    };

    if let Err((why, reply)) = broker.admit_rate() {
        broker.refuse_with(&writer, &why, reply);
        finish(&slot);
        return;
    }
    // The connection prepared at start, if it still fits the configuration.
    let claim = if prepared_matches {
        broker.pre.claim()
    } else {
        broker.pre.discard();
        Claim::Nothing
    };
    if matches!(claim, Claim::Connecting { .. }) {
        // No longer waiting unclaimed: let another login prepare one.
        broker.release_pre_slot();
    }

    let started = Instant::now();
    let mut start = broker.event("connect-start");
    start.secret = Some(account.secret.clone());
    start.kind = Some(request.kind.as_str().into());
    broker.audit.emit(&start);

    let mut end = broker.event("connect-end");
    end.kind = Some(request.kind.as_str().into());
    end.secret = Some(account.secret.clone());
    let cx = RequestContext {
        broker,
        host: &host,
        account: &account,
        request: &request,
        fds: &fds,
        slot: &slot,
    };
    let outcome = match claim {
        Claim::Connecting { cell } => use_prepared(&cx, &cell, &mut end),
        Claim::Failed { error } => Err(error),
        Claim::Nothing => onward_connection(&cx, &FULL, Vec::new(), None, &mut end),
    };
    // The engineer's descriptors must be closed before connect exits, or sshd waits for EOF.
    drop(fds);
    end.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    let reply = match outcome {
        Ok(status) => {
            end.result = Some("ok".into());
            end.exit_status = Some(i32::from(status));
            Message::Exit { status }
        }
        Err(err) => {
            let f = failure_for(&err, &broker.target(&account));
            let detail = log_detail(&err);
            audit::send_syslog(
                4,
                &format!(
                    "{}@{}@{}: {detail}",
                    broker.args.engineer, broker.account.name, broker.host.name
                ),
            );
            end.result = Some(f.kind().into());
            end.reason = Some(detail);
            f.to_message()
        }
    };
    broker.audit.emit(&end);
    let _ = session::send(&writer, &reply, &[]);
    finish(&slot);
}

/// One request being served.
struct RequestContext<'a> {
    broker: &'a Broker,
    host: &'a Host,
    account: &'a HostAccount,
    request: &'a Request,
    fds: &'a [OwnedFd; 3],
    slot: &'a ChildSlot,
}

/// Both stages, in order: ACSPrevious only when the target rejected ACSCurrent.
const FULL: [SecretStage; 2] = [SecretStage::Current, SecretStage::Previous];

/// `GetSecretValue` of a stage of the account's secret.
fn fetch_secret(
    broker: &Broker,
    account: &HostAccount,
    stage: SecretStage,
) -> Result<crate::kms::SecretValue, OnwardError> {
    broker
        .kms()
        .and_then(|kms| kms.get_secret_value(&account.secret, stage))
        .map_err(|error| OnwardError::Kms {
            error,
            stage: stage.as_str(),
        })
}

/// Parse a fetched value and check that it is for the account (`UserName`).
fn check_secret(
    value: &crate::kms::SecretValue,
    account: &HostAccount,
) -> Result<TargetSecret, OnwardError> {
    TargetSecret::parse(value.secret_data.expose())
        .and_then(|s| s.ensure_user(&account.name).map(|()| s))
        .map_err(|error| OnwardError::Secret {
            error,
            version_id: value.version_id.clone(),
        })
}

/// The first request on the connection prepared at start: fetch ACSCurrent now, hand it to
/// the waiting master, run the request as its session. A rejected credential goes on with
/// ACSPrevious on a connection of its own; a master lost on the way is replaced by one.
fn use_prepared(
    cx: &RequestContext<'_>,
    cell: &CredCell,
    end: &mut Event,
) -> Result<u8, OnwardError> {
    let pre = &cx.broker.pre;
    let patience = Duration::from_secs(2);
    // Whatever happens below, nothing is left in the cell afterwards.
    struct CloseOnExit<'a>(&'a CredCell);
    impl Drop for CloseOnExit<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(cell);
    let fetched = fetch_secret(cx.broker, cx.account, SecretStage::Current).and_then(|value| {
        lock_secret_pages(value.secret_data.expose());
        end.version_ids = vec![value.version_id.clone()];
        check_secret(&value, cx.account).map(|secret| (secret, value))
    });
    let (secret, value) = match fetched {
        Ok(v) => v,
        Err(e) => {
            pre.release(patience);
            return Err(e);
        }
    };
    let fingerprint = secret.fingerprint();
    let version_id = value.version_id.clone();
    // If the prepared connection is lost before it is used, the request connects on its own
    // with the version fetched here (no second fetch).
    let own = |end: &mut Event| onward_connection(cx, &FULL, Vec::new(), Some(value), end);
    if cx.slot.cancelled.load(Ordering::Acquire) {
        pre.release(patience);
        return Err(OnwardError::Refused("hung up".into()));
    }
    if !cell.fill(secret.credential) {
        // The master went away before it could use the credential.
        pre.release(patience);
        return own(end);
    }
    let ready = pre.await_ready(&cx.slot.cancelled, cx.broker.preconnect_wait());
    // Taken by now, or never to be: no copy of it stays for the rest of the session.
    cell.close();
    match ready {
        Ready::Control(control) => {
            let ran = run_prepared(cx, &control);
            pre.release(patience);
            match ran {
                Some(r) => {
                    end.version_id = Some(version_id);
                    end.fingerprint = fingerprint;
                    r
                }
                None => own(end),
            }
        }
        Ready::Failed(OnwardError::Rejected { .. }) => {
            pre.release(patience);
            rejected_log(cx, SecretStage::Current, &version_id);
            onward_connection(cx, &[SecretStage::Previous], vec![version_id], None, end)
        }
        Ready::Failed(OnwardError::Unreachable { detail, .. }) if was_connected(&detail) => {
            // The connection was there, waiting for this credential: the target (or a NAT)
            // may have given up on it meanwhile. A connection of our own tells.
            pre.release(patience);
            audit::send_syslog(
                6,
                &format!(
                    "{}@{}: prepared connection lost ({detail}); connecting again",
                    cx.account.name, cx.host.name
                ),
            );
            own(end)
        }
        Ready::Failed(e) => {
            pre.release(patience);
            Err(e)
        }
        Ready::Gone => {
            pre.release(patience);
            if cx.slot.cancelled.load(Ordering::Acquire) {
                return Err(OnwardError::Refused("hung up".into()));
            }
            own(end)
        }
    }
}

/// Whether ssh's failure line says the connection had been made (and was then lost), as
/// opposed to never made (refused, timed out, no route, no address): only a lost one is worth
/// a connection of the request's own; a target that cannot be reached is reported at once.
fn was_connected(detail: &str) -> bool {
    let l = detail.trim_start_matches("ssh: ");
    !(l.starts_with("connect to host ")
        || l.starts_with("Could not resolve hostname ")
        || l.starts_with("Connection timed out during banner exchange")
        || (l.starts_with("Connection to ") && l.ends_with(" timed out")))
}

fn rejected_log(cx: &RequestContext<'_>, stage: SecretStage, version_id: &str) {
    audit::send_syslog(
        5,
        &format!(
            "{}@{} rejected {} version {version_id}",
            cx.account.name,
            cx.host.name,
            stage.as_str(),
        ),
    );
}

/// Run the request as the session of the prepared master. `None`: its control socket never
/// appeared (the master is gone): nothing was used, the request may connect on its own.
fn run_prepared(cx: &RequestContext<'_>, control: &Path) -> Option<Result<u8, OnwardError>> {
    // ssh logs "Authenticated to" just before it starts listening on the control socket.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        use std::os::unix::fs::FileTypeExt;
        if fs::symlink_metadata(control).is_ok_and(|m| m.file_type().is_socket()) {
            break;
        }
        if Instant::now() >= deadline || !cx.broker.pre.master_running() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    show_banner(&onward::banner_path(control), &cx.fds[2]);
    let dir = match onward::private_dir(&cx.broker.private, "m-") {
        Ok(d) => d,
        Err(e) => {
            return Some(Err(OnwardError::Internal(format!(
                "request directory: {e}"
            ))))
        }
    };
    let mux = onward::MuxContext {
        ssh: &cx.broker.ssh,
        dir: &dir,
        control,
        account: &cx.account.name,
        address: &cx.host.address,
        port: cx.host.port,
        request: cx.request,
        fds: cx.fds,
        slot: cx.slot,
    };
    let r = onward::run_mux(&mux);
    let _ = fs::remove_dir_all(&dir);
    Some(r)
}

/// What the master's ssh showed during authentication (the target's pre-login banner), on the
/// engineer's stderr, as a connection of the request's own would have shown it.
fn show_banner(path: &Path, stderr: &OwnedFd) {
    use std::io::Read as _;
    let mut shown = Vec::new();
    if let Ok(f) = fs::File::open(path) {
        let _ = f.take(64 * 1024).read_to_end(&mut shown);
    }
    if !shown.is_empty() {
        if let Ok(fd) = stderr.try_clone() {
            let _ = fs::File::from(fd).write_all(&shown);
        }
    }
}

/// Start the connection for the first request (see [`preconnect`]): connect and verify the
/// target now, authenticate when the request brings the credential.
fn start_preconnect(broker: &Arc<Broker>) {
    // The control socket must fit in a socket address; a host without pinned keys is the
    // request's to report.
    let probe = broker.private.join("r-0123456789abcdef").join("c");
    let no_slot = broker.pre_slot.lock().map(|s| s.is_none()).unwrap_or(true);
    if probe.as_os_str().len() > onward::MAX_CONTROL_PATH
        || broker.host.host_keys.is_empty()
        || no_slot
    {
        broker.release_pre_slot();
        return;
    }
    let cell = Arc::new(CredCell::default());
    if !broker.pre.begin(Arc::clone(&cell)) {
        broker.release_pre_slot();
        return;
    }
    let master = Arc::clone(&broker.pre.master);
    if let Ok(mut c) = broker.children.lock() {
        c.push(Arc::clone(&master));
    }
    let b = Arc::clone(broker);
    if let Err(e) = spawn_with_stack(REQUEST_STACK, move || run_preconnect(&b, cell)) {
        broker.pre.finished(None);
        broker.release_pre_slot();
        if let Ok(mut c) = broker.children.lock() {
            c.retain(|s| !Arc::ptr_eq(s, &master));
        }
        audit::send_syslog(
            4,
            &format!("broker: cannot start the preconnect thread: {e}"),
        );
    }
}

/// The preconnect thread: runs the master until it exits (after its one session, when idle,
/// or at shutdown). Audited as `preconnect` (result `used`, `unused`, `failed`, `abandoned`).
fn run_preconnect(broker: &Arc<Broker>, cell: Arc<CredCell>) {
    let started = Instant::now();
    let master = Arc::clone(&broker.pre.master);
    let mut pauses = 0;
    let error = loop {
        let dir = match onward::private_dir(&broker.private, "r-") {
            Ok(d) => d,
            Err(e) => break Some(OnwardError::Internal(format!("request directory: {e}"))),
        };
        let control = dir.join("c");
        let (pre, at) = (Arc::clone(&broker.pre), control.clone());
        let cx = AttemptContext {
            ssh: &broker.ssh,
            askpass_program: &broker.askpass_program,
            dir: &dir,
            alias: &broker.host.name,
            address: &broker.host.address,
            port: broker.host.port,
            account: &broker.account.name,
            host_keys: &broker.host.host_keys,
            connect_timeout_s: broker.connect_timeout_s,
            role: AttemptRole::Master {
                control: &control,
                on_authenticated: Arc::new(move || pre.ready(at.clone())),
            },
            slot: &master,
        };
        let result = onward::attempt(&cx, Supply::Later(Arc::clone(&cell)));
        let _ = fs::remove_dir_all(&dir);
        if master.cancelled.load(Ordering::Acquire) {
            // Ended on purpose (its request is done or gave up, idle, shutdown): whatever ssh
            // said while dying is nobody's failure.
            break None;
        }
        match result {
            Attempt::NoBanner(e) if pauses < NO_BANNER_RETRIES => {
                // A busy target: the credential (if the request brought it already) waits in
                // the cell for the next try.
                let pause = no_banner_pause(pauses);
                pauses += 1;
                no_banner_log(&broker.account, &broker.host, &e, pause);
                std::thread::sleep(pause);
                if master.cancelled.load(Ordering::Acquire) {
                    break None;
                }
            }
            Attempt::Done { .. } | Attempt::NoBanner(_) => break None,
            Attempt::Rejected => {
                break Some(OnwardError::Rejected {
                    version_ids: Vec::new(),
                })
            }
            Attempt::Failed(e) => break Some(e),
        }
    };
    let detail = error.as_ref().map(log_detail);
    let result = broker.pre.finished(error);
    broker.release_pre_slot();
    if let Ok(mut c) = broker.children.lock() {
        c.retain(|s| !Arc::ptr_eq(s, &master));
    }
    let mut ev = broker.event("preconnect");
    ev.result = Some(result.as_str().into());
    ev.reason = detail;
    ev.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    broker.audit.emit(&ev);
}

/// Syslog line for a connection the target dropped before its banner.
fn no_banner_log(account: &HostAccount, host: &Host, e: &OnwardError, pause: Duration) {
    audit::send_syslog(
        6,
        &format!(
            "{}@{}: the target dropped the connection before its SSH banner (busy? sshd \
             MaxStartups): {}; trying again in {} ms",
            account.name,
            host.name,
            log_detail(e),
            pause.as_millis()
        ),
    );
}

/// The pause before try `n + 1` after a target dropped the connection before its banner.
fn no_banner_pause(n: u32) -> Duration {
    NO_BANNER_PAUSE * 2u32.saturating_pow(n) + Duration::from_millis(rand::random::<u64>() % 150)
}

/// Fetch, check, connect; retry once with ACSPrevious on a rejected credential, and a few
/// times (same secret) when the target drops the connection before its banner.
fn onward_connection(
    cx: &RequestContext<'_>,
    stages: &[SecretStage],
    mut tried: Vec<String>,
    mut fetched: Option<crate::kms::SecretValue>,
    end: &mut Event,
) -> Result<u8, OnwardError> {
    let (broker, host, account, slot) = (cx.broker, cx.host, cx.account, cx.slot);
    if host.host_keys.is_empty() {
        return Err(OnwardError::Unreachable {
            reason: "no pinned host key is configured for it; ask your bastion administrator"
                .into(),
            detail: "the host has no host_keys in the configuration".into(),
        });
    }
    for &stage in stages {
        if slot.cancelled.load(Ordering::Acquire) {
            return Err(OnwardError::Refused("hung up".into()));
        }
        // The first stage may come fetched already (by a request whose prepared connection
        // was lost): one fetch per onward connection still.
        let value = match fetched
            .take()
            .map(Ok)
            .unwrap_or_else(|| fetch_secret(broker, account, stage))
        {
            Ok(v) => v,
            Err(OnwardError::Kms { error, .. }) if stage == SecretStage::Previous => {
                // No previous version (or it cannot be fetched): the rejection stands.
                if !matches!(error.kind, KmsErrorKind::NotFound) {
                    audit::send_syslog(4, &format!("GetSecretValue(ACSPrevious) failed: {error}"));
                }
                break;
            }
            Err(e) => return Err(e),
        };
        if tried.contains(&value.version_id) {
            break;
        }
        lock_secret_pages(value.secret_data.expose());
        tried.push(value.version_id.clone());
        end.version_ids = tried.clone();
        let mut secret = check_secret(&value, account)?;
        let fingerprint = secret.fingerprint();
        let mut pauses = 0;
        let result = loop {
            let dir = onward::private_dir(&broker.private, "r-")
                .map_err(|e| OnwardError::Internal(format!("request directory: {e}")))?;
            let attempt_cx = AttemptContext {
                ssh: &broker.ssh,
                askpass_program: &broker.askpass_program,
                dir: &dir,
                alias: &host.name,
                address: &host.address,
                port: host.port,
                account: &account.name,
                host_keys: &host.host_keys,
                connect_timeout_s: broker.connect_timeout_s,
                role: AttemptRole::Request {
                    request: cx.request,
                    fds: cx.fds,
                },
                slot,
            };
            let result = onward::attempt(&attempt_cx, Supply::Now(secret));
            let _ = fs::remove_dir_all(&dir);
            match result {
                Attempt::NoBanner(e) if pauses < NO_BANNER_RETRIES => {
                    // Turned away before the banner (sshd's MaxStartups): nothing was sent.
                    let pause = no_banner_pause(pauses);
                    pauses += 1;
                    no_banner_log(account, host, &e, pause);
                    std::thread::sleep(pause);
                    if slot.cancelled.load(Ordering::Acquire) {
                        return Err(OnwardError::Refused("hung up".into()));
                    }
                    secret = check_secret(&value, account)?;
                }
                other => break other,
            }
        };
        drop(value);
        match result {
            Attempt::Done { status } => {
                end.version_id = tried.last().cloned();
                end.fingerprint = fingerprint;
                return Ok(status);
            }
            Attempt::Rejected => {
                rejected_log(cx, stage, tried.last().map(String::as_str).unwrap_or("?"));
                continue;
            }
            Attempt::Failed(e) | Attempt::NoBanner(e) => return Err(e),
        }
    }
    Err(OnwardError::Rejected { version_ids: tried })
}

/// Used by the binary to tell askpass mode from broker mode.
pub fn askpass_socket_from_env() -> Option<PathBuf> {
    std::env::var_os(onward::ASKPASS_ENV).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_walk_with_a_fake_proc() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |pid: i32, ppid: i32, comm: &str| {
            let d = dir.path().join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("stat"), format!("{pid} ({comm}) S {ppid} 1 1 0 -1")).unwrap();
        };
        mk(500, 1, "sshd");
        mk(600, 500, "sshd: alice@root@web-01");
        mk(700, 600, "kmsbastion-conn");
        mk(800, 1, "evil) S 500 (x");
        mk(900, 1, "other-sshd");
        let ppid = |p| ppid_from_proc(dir.path(), p);
        assert_eq!(
            ppid(800),
            Some(1),
            "comm with ') S 500 (' must not fool the parser"
        );
        assert!(descends_from(700, 500, ppid));
        assert!(descends_from(600, 500, ppid));
        assert!(!descends_from(800, 500, ppid));
        assert!(!descends_from(900, 500, ppid));
        assert!(!descends_from(12345, 500, ppid), "unknown pid");
        // A loop in a (fake) process table ends.
        mk(41, 42, "a");
        mk(42, 41, "b");
        assert!(!descends_from(41, 500, ppid));
    }

    #[test]
    fn only_a_connection_that_was_made_is_worth_a_second_try() {
        for never in [
            "ssh: connect to host 10.0.0.9 port 22: Connection refused",
            "connect to host 10.0.0.9 port 22: Connection timed out",
            "ssh: Could not resolve hostname web-09.internal: Name or service not known",
            "Connection timed out during banner exchange",
            "Connection to 10.0.0.9 port 22 timed out",
        ] {
            assert!(!was_connected(never), "{never}");
        }
        for lost in [
            "Connection closed by 10.0.0.9 port 22",
            "Connection reset by 10.0.0.9 port 22",
            "ssh ended with status 255 before authenticating",
            "Received disconnect from 10.0.0.9 port 22:2: Too many authentication failures",
        ] {
            assert!(was_connected(lost), "{lost}");
        }
    }

    #[test]
    fn rate_limit_is_a_sliding_window() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert!(r.admit(t0 + Duration::from_secs(i)).is_ok());
        }
        // The 4th within the minute waits until the oldest leaves the window.
        assert_eq!(
            r.admit(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert!(r.admit(t0 + Duration::from_secs(59)).is_err());
        assert!(r.admit(t0 + Duration::from_secs(60)).is_ok());
        assert!(r.admit(t0 + Duration::from_secs(60)).is_err());
        assert!(r.admit(t0 + Duration::from_secs(62)).is_ok());
        // Refusals do not count.
        let mut r = RateLimiter::new(1, Duration::from_secs(60));
        assert!(r.admit(t0).is_ok());
        for s in 1..30 {
            assert!(r.admit(t0 + Duration::from_secs(s)).is_err());
        }
        assert!(r.admit(t0 + Duration::from_secs(60)).is_ok());
        assert!(RateLimiter::new(0, Duration::from_secs(1))
            .admit(t0)
            .is_err());
        assert_eq!(RATE_LIMIT, 30);
        assert_eq!(RATE_WINDOW, Duration::from_secs(60));
    }

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
keys = []

[[grant]]
engineers = ["alice"]
accounts = ["root@web-01"]
from = ["127.0.0.0/8"]
not_after = "2030-01-01T00:00:00Z"
"#;

    #[test]
    fn every_request_rechecks_the_grant() {
        use std::time::UNIX_EPOCH;
        let origin = Path::new("/etc/kmsbastion/kmsbastion.toml");
        let cfg = Config::parse(CONFIG, origin).unwrap();
        let login = LoginString::new("alice", "root", "web-01").unwrap();
        let lo = Some("127.0.0.1".parse().unwrap());
        let before = UNIX_EPOCH + Duration::from_secs(1_795_980_600); // 2026-11-29
        let after = UNIX_EPOCH + Duration::from_secs(1_900_000_000); // 2030-03
        match recheck(&cfg, &login, lo, before) {
            Recheck::Allow { host, account } => {
                assert_eq!(host.address, "127.0.0.2");
                assert_eq!(account.secret, "acs/ecs/web-01/root");
            }
            other => panic!("{other:?}"),
        }
        match recheck(&cfg, &login, lo, after) {
            Recheck::Deny { line, reason } => {
                assert_eq!(
                    line,
                    "login refused: your grant for this account@host has expired"
                );
                assert!(reason.contains("not_after"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The grant removed from the configuration.
        let no_grant = CONFIG.split("[[grant]]").next().unwrap();
        let cfg = Config::parse(no_grant, origin).unwrap();
        match recheck(&cfg, &login, lo, before) {
            Recheck::Deny { line, .. } => assert_eq!(
                line,
                "login refused: you have no grant for this account@host"
            ),
            other => panic!("{other:?}"),
        }
        // The host's address changed: the next connection goes to the new one.
        let moved = CONFIG.replace("127.0.0.2", "127.0.0.9");
        let cfg = Config::parse(&moved, origin).unwrap();
        assert!(matches!(
            recheck(&cfg, &login, lo, before),
            Recheck::Allow { host, .. } if host.address == "127.0.0.9"
        ));
    }

    #[test]
    fn runtime_dir_must_be_root_only() {
        assert_eq!(runtime_dir_problem(true, 0, 0o40711), None);
        assert_eq!(runtime_dir_problem(true, 0, 0o40755), None);
        assert_eq!(runtime_dir_problem(true, 0, 0o40700), None);
        assert!(runtime_dir_problem(true, 999, 0o40711)
            .unwrap()
            .contains("not root"));
        assert!(runtime_dir_problem(true, 0, 0o40775)
            .unwrap()
            .contains("writable"));
        assert!(runtime_dir_problem(true, 0, 0o41777).is_some());
        assert!(runtime_dir_problem(false, 0, 0o100644).is_some());
    }

    #[test]
    fn real_proc_ancestry_of_ourselves() {
        let me = std::process::id() as i32;
        let parent = ppid_from_proc(Path::new("/proc"), me).unwrap();
        assert!(descends_from(me, parent, |p| ppid_from_proc(
            Path::new("/proc"),
            p
        )));
        assert!(descends_from(me, me, |_| None));
    }
}
