//! `pam_kmsbastion.so`: the PAM glue of kmsbastion. Every decision is made by
//! `kmsbastion::pam_session`; this crate only converts PAM items, talks to libpam and starts
//! (and ends) the per-login broker.
//!
//! ```text
//! account  [success=ok ignore=ignore default=die]  pam_kmsbastion.so [config=PATH] [debug]
//! session  required                                pam_kmsbastion.so [config=PATH] [debug]
//! ```
//!
//! * account: composite login (`alice@root@web-01`) → grant check with `PAM_RHOST` → `PAM_SUCCESS`
//!   or `PAM_PERM_DENIED`; plain engineer → `PAM_SUCCESS`; anything else → `PAM_IGNORE`.
//! * session open: for a granted composite login, fork+exec `bastion.broker` (as root, clean
//!   environment, only its two pipes open), wait up to 5 s for `ready SOCKET`, then
//!   `pam_putenv("KMSBASTION_SOCKET=SOCKET")`. The write end of the lifetime pipe stays open in
//!   sshd (close-on-exec): when the sshd session ends, the broker sees EOF. A detached sweeper
//!   (a double-forked copy of this process holding only the pipe's read end) then removes the
//!   root-owned session directory, even if sshd died without closing the session.
//! * session close: SIGTERM the broker this module started (by pid, only if it is still our
//!   unreaped child), wait up to 2 s, SIGKILL if needed, reap.
//! * auth, setcred, chauthtok: `PAM_IGNORE`.
//!
//! Unknown module arguments are an error (`PAM_SERVICE_ERR`). No threads, no network, no
//! panics across the C boundary. Log lines go to syslog (AUTHPRIV) prefixed
//! `pam_kmsbastion(<service>:<stage>): `.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kmsbastion::audit::{Audit, Event};
use kmsbastion::config::index::{self, IndexError, Loaded, Via};
use kmsbastion::config::Config;
use kmsbastion::login::LoginString;
use kmsbastion::pam_session::{
    self, AccountOutcome, BrokerArgs, ModuleArgs, ReadyLine, SessionPlan,
};
use pam::constants::{PamFlag, PamResultCode};
use pam::items::{RHost, Service, User};
use pam::module::{PamHandle, PamHooks};
use pam::pam_hooks;
use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant, SystemTime};

const DATA_KEY: &str = "kmsbastion.broker";

#[link(name = "pam")]
extern "C" {
    fn pam_putenv(pamh: *mut PamHandle, name_value: *const libc::c_char) -> libc::c_int;
}

struct PamKmsbastion;
pam_hooks!(PamKmsbastion);

impl PamHooks for PamKmsbastion {
    fn acct_mgmt(pamh: &mut PamHandle, args: Vec<&CStr>, _flags: PamFlag) -> PamResultCode {
        guarded(|| account(pamh, &args))
    }

    fn sm_open_session(pamh: &mut PamHandle, args: Vec<&CStr>, _flags: PamFlag) -> PamResultCode {
        guarded(|| open_session(pamh, &args))
    }

    fn sm_close_session(pamh: &mut PamHandle, args: Vec<&CStr>, _flags: PamFlag) -> PamResultCode {
        guarded(|| close_session(pamh, &args))
    }
}

/// A second panic guard inside the crate's own: a panic is a service error, never an unwind
/// into sshd.
fn guarded(f: impl FnOnce() -> PamResultCode) -> PamResultCode {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(PamResultCode::PAM_SERVICE_ERR)
}

/// What every hook needs: parsed arguments and the PAM items.
struct Context {
    args: ModuleArgs,
    service: String,
    stage: &'static str,
    user: Option<String>,
    rhost: Option<String>,
}

impl Context {
    fn new(pamh: &PamHandle, raw: &[&CStr], stage: &'static str) -> Result<Context, PamResultCode> {
        let service = item_string(pamh.get_item::<Service>().ok().flatten().map(|s| s.0))
            .unwrap_or_else(|| "?".into());
        let strings: Vec<String> = raw
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args = match ModuleArgs::parse(&strings) {
            Ok(a) => a,
            Err(e) => {
                log(libc::LOG_ERR, &service, stage, &format!("{e}; refusing"));
                return Err(PamResultCode::PAM_SERVICE_ERR);
            }
        };
        let user = item_string(pamh.get_item::<User>().ok().flatten().map(|u| u.0));
        let rhost = item_string(pamh.get_item::<RHost>().ok().flatten().map(|r| r.0));
        Ok(Context {
            args,
            service,
            stage,
            user,
            rhost,
        })
    }

    fn log(&self, priority: libc::c_int, msg: &str) {
        log(priority, &self.service, self.stage, msg);
    }

    fn debug(&self, msg: &str) {
        if self.args.debug {
            self.log(libc::LOG_DEBUG, msg);
        }
    }
}

fn item_string(c: Option<&CStr>) -> Option<String> {
    c.and_then(|c| c.to_str().ok()).map(str::to_owned)
}

/// syslog(3) at AUTHPRIV without openlog: sshd keeps its own ident, our lines carry the
/// module prefix.
fn log(priority: libc::c_int, service: &str, stage: &str, msg: &str) {
    let line = format!("pam_kmsbastion({service}:{stage}): {msg}").replace(['\0', '\n', '\r'], " ");
    if let Ok(c) = CString::new(line) {
        // SAFETY: the format is a literal "%s" and the one argument a NUL-terminated string
        // that outlives the call.
        unsafe { libc::syslog(libc::LOG_AUTHPRIV | priority, c"%s".as_ptr(), c.as_ptr()) };
    }
}

fn audit_for(cfg: &Config) -> Audit {
    Audit::open(cfg.audit.file.as_deref(), cfg.audit.syslog)
}

/// Load the configuration (as far as this user needs it: from the lookup index when it is
/// fresh), or decide what a broken one means for this user: composite logins fail closed,
/// everyone else is not our business.
fn load_config(ctx: &Context, user: &str) -> Result<Loaded, PamResultCode> {
    match index::load_for_user(&ctx.args.config, user) {
        Ok(c) => Ok(c),
        Err(e) => {
            if pam_session::looks_composite(user) {
                ctx.log(
                    libc::LOG_ERR,
                    &format!("cannot load configuration: {e}; refusing {user}"),
                );
                Err(PamResultCode::PAM_SERVICE_ERR)
            } else {
                ctx.log(
                    libc::LOG_ERR,
                    &format!("cannot load configuration: {e}; ignoring {user}"),
                );
                Err(PamResultCode::PAM_IGNORE)
            }
        }
    }
}

fn account(pamh: &mut PamHandle, raw: &[&CStr]) -> PamResultCode {
    let ctx = match Context::new(pamh, raw, "account") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(user) = ctx.user.clone() else {
        ctx.log(libc::LOG_ERR, "no PAM_USER; refusing");
        return PamResultCode::PAM_USER_UNKNOWN;
    };
    let loaded = match load_config(&ctx, &user) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cfg = &loaded.config;
    let source = pam_session::parse_source(ctx.rhost.as_deref());
    let outcome = pam_session::account_outcome(cfg, &user, source, SystemTime::now());
    if outcome != AccountOutcome::NotOurs {
        refresh_index(&ctx, &loaded);
    }
    let mut event = Event::new("login");
    event.service = Some(ctx.service.clone());
    event.source = ctx.rhost.clone();
    match outcome {
        AccountOutcome::Allow { login, rule } => {
            ctx.debug(&format!(
                "{login} from {:?}: allowed by grant rule {rule}",
                ctx.rhost
            ));
            fill_login(&mut event, &login);
            event.result = Some("allow".into());
            event.rule = Some(rule);
            audit_for(cfg).emit(&event);
            PamResultCode::PAM_SUCCESS
        }
        AccountOutcome::Deny { login, reason } => {
            ctx.log(
                libc::LOG_NOTICE,
                &format!(
                    "{user} from {}: denied: {reason}",
                    ctx.rhost.as_deref().unwrap_or("unknown source")
                ),
            );
            match &login {
                Some(l) => fill_login(&mut event, l),
                None => event.engineer = Some(user.clone()),
            }
            event.result = Some("deny".into());
            event.reason = Some(reason);
            audit_for(cfg).emit(&event);
            PamResultCode::PAM_PERM_DENIED
        }
        AccountOutcome::Plain { engineer } => {
            ctx.debug(&format!("{engineer}: plain engineer login (listing only)"));
            PamResultCode::PAM_SUCCESS
        }
        AccountOutcome::NotOurs => {
            ctx.debug(&format!("{user}: not a bastion login; ignoring"));
            PamResultCode::PAM_IGNORE
        }
    }
}

/// After a bastion login had to parse the whole configuration (no fresh index), write the
/// index from that parse, so that the next helpers of this and later logins skip it. Never
/// affects the login: problems are only logged.
fn refresh_index(ctx: &Context, loaded: &Loaded) {
    if loaded.via == Via::Index {
        return;
    }
    match index::refresh(&ctx.args.config, loaded) {
        Ok(Some(built)) => ctx.debug(&format!(
            "lookup index {} rebuilt ({} bytes)",
            built.path.display(),
            built.bytes
        )),
        Ok(None) => {}
        Err(IndexError::Unsettled) => ctx.debug(
            "the configuration changed moments ago; the lookup index is rebuilt by a later login",
        ),
        Err(e) => ctx.log(
            libc::LOG_WARNING,
            &format!("cannot write the lookup index (logins stay correct, only slower): {e}"),
        ),
    }
}

fn fill_login(event: &mut Event, login: &LoginString) {
    event.engineer = Some(login.engineer.clone());
    event.account = Some(login.account.clone());
    event.host = Some(login.host.clone());
}

/// The broker this module started, kept in the PAM handle between open and close.
struct BrokerHandle {
    pid: libc::pid_t,
    /// The broker's `runtime_dir/s-*` directory, removed (as root) once the broker is gone:
    /// the unprivileged broker cannot remove it itself from a root-owned `runtime_dir`.
    session_dir: Option<std::path::PathBuf>,
    /// Write end of the lifetime pipe (-1 once closed).
    lifetime_w: Cell<RawFd>,
}

impl BrokerHandle {
    fn close_lifetime(&self) {
        let fd = self.lifetime_w.replace(-1);
        if fd >= 0 {
            // SAFETY: we own this descriptor (it came from pipe2 and nobody else closes it).
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        // Only the descriptor: pam_end may run in a process that did not start the broker.
        self.close_lifetime();
    }
}

fn open_session(pamh: &mut PamHandle, raw: &[&CStr]) -> PamResultCode {
    let ctx = match Context::new(pamh, raw, "session") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(user) = ctx.user.clone() else {
        ctx.log(libc::LOG_ERR, "no PAM_USER; refusing");
        return PamResultCode::PAM_SESSION_ERR;
    };
    let cfg = match load_config(&ctx, &user) {
        Ok(c) => c.config,
        Err(PamResultCode::PAM_IGNORE) => return PamResultCode::PAM_IGNORE,
        Err(_) => return PamResultCode::PAM_SESSION_ERR,
    };
    let source = pam_session::parse_source(ctx.rhost.as_deref());
    let login = match pam_session::session_plan(&cfg, &user, source, SystemTime::now()) {
        SessionPlan::Ignore => {
            ctx.debug(&format!("{user}: no broker for this login"));
            return PamResultCode::PAM_IGNORE;
        }
        SessionPlan::Refuse(reason) => {
            ctx.log(libc::LOG_NOTICE, &format!("{user}: no session: {reason}"));
            return PamResultCode::PAM_SESSION_ERR;
        }
        SessionPlan::StartBroker(l) => l,
    };
    match start_broker(&ctx, &cfg, &login, source) {
        Ok((handle, socket)) => {
            let pid = handle.pid;
            let env = format!("{}={}", pam_session::SOCKET_ENV, socket.display());
            let Ok(env) = CString::new(env) else {
                stop_broker(&handle);
                return PamResultCode::PAM_SESSION_ERR;
            };
            // SAFETY: pamh is the live handle of this call; pam_putenv copies the string.
            let rc = unsafe { pam_putenv(pamh, env.as_ptr()) };
            if rc != PamResultCode::PAM_SUCCESS as libc::c_int {
                ctx.log(libc::LOG_ERR, &format!("pam_putenv failed ({rc})"));
                stop_broker(&handle);
                return PamResultCode::PAM_SESSION_ERR;
            }
            if let Err(code) = pamh.set_data(DATA_KEY, Box::new(handle)) {
                ctx.log(libc::LOG_ERR, &format!("pam_set_data failed ({code:?})"));
                return PamResultCode::PAM_SESSION_ERR;
            }
            ctx.debug(&format!(
                "{login}: broker {pid} serves {}",
                socket.display()
            ));
            let mut event = Event::new("session-open");
            fill_login(&mut event, &login);
            event.source = ctx.rhost.clone();
            event.service = Some(ctx.service.clone());
            event.pid = u32::try_from(pid).ok();
            audit_for(&cfg).emit(&event);
            PamResultCode::PAM_SUCCESS
        }
        Err(e) => {
            ctx.log(
                libc::LOG_ERR,
                &format!("{login}: cannot start the broker: {e}"),
            );
            PamResultCode::PAM_SESSION_ERR
        }
    }
}

fn close_session(pamh: &mut PamHandle, raw: &[&CStr]) -> PamResultCode {
    let ctx = match Context::new(pamh, raw, "session") {
        Ok(c) => c,
        Err(code) => return code,
    };
    // SAFETY: only this module stores data under DATA_KEY, always a BrokerHandle.
    let handle = match unsafe { pamh.get_data::<BrokerHandle>(DATA_KEY) } {
        Ok(h) => h,
        Err(_) => return PamResultCode::PAM_IGNORE,
    };
    let pid = handle.pid;
    stop_broker(handle);
    ctx.debug(&format!("broker {pid} stopped"));
    PamResultCode::PAM_SUCCESS
}

/// End the broker: close the lifetime pipe, SIGTERM, bounded wait, SIGKILL, reap. Signals go
/// only to a process that is still our unreaped child (so its pid cannot have been reused).
fn stop_broker(handle: &BrokerHandle) {
    handle.close_lifetime();
    let pid = handle.pid;
    if reap(pid) {
        remove_session_dir(handle);
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_millis(pam_session::BROKER_STOP_TIMEOUT_MS);
    while Instant::now() < deadline {
        if reap(pid) {
            remove_session_dir(handle);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above; the child is still unreaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    remove_session_dir(handle);
}

fn remove_session_dir(handle: &BrokerHandle) {
    if let Some(dir) = &handle.session_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Whether `pid` is gone (reaped now, or not our child any more).
fn reap(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    r != 0
}

/// Pipes owned until handed over; closed on drop.
struct Fd(RawFd);

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: we own this descriptor.
            unsafe { libc::close(self.0) };
        }
    }
}

impl Fd {
    fn take(&mut self) -> RawFd {
        std::mem::replace(&mut self.0, -1)
    }
}

fn pipe_cloexec() -> Result<(Fd, Fd), String> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    let [r, w] = fds;
    Ok((Fd(r), Fd(w)))
}

/// The broker binary must be a root-owned regular file nobody else can write.
fn check_broker_binary(path: &std::path::Path) -> Result<(), String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.is_file() || md.uid() != 0 || md.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: must be a root-owned file not writable by group or others",
            path.display()
        ));
    }
    Ok(())
}

fn start_broker(
    ctx: &Context,
    cfg: &Config,
    login: &LoginString,
    source: Option<std::net::IpAddr>,
) -> Result<(BrokerHandle, std::path::PathBuf), String> {
    let program = cfg.bastion.broker.clone();
    check_broker_binary(&program)?;
    let (mut life_r, mut life_w) = pipe_cloexec()?;
    let (mut ready_r, mut ready_w) = pipe_cloexec()?;
    // SAFETY: getpid has no preconditions. This is the sshd process that opened the session.
    let sshd_pid = unsafe { libc::getpid() };
    let args = BrokerArgs {
        config: ctx.args.config.clone(),
        engineer: login.engineer.clone(),
        account: login.account.clone(),
        host: login.host.clone(),
        source,
        sshd_pid: u32::try_from(sshd_pid).map_err(|_| "bad pid")?,
        lifetime_fd: life_r.0,
        ready_fd: ready_w.0,
    };
    // Everything the child needs is allocated before fork: after it, only async-signal-safe
    // calls happen.
    let c_program =
        CString::new(program.as_os_str().as_bytes()).map_err(|_| "NUL in broker path")?;
    let mut c_args = vec![c_program.clone()];
    for a in args.to_args() {
        c_args.push(CString::new(a).map_err(|_| "NUL in a broker argument")?);
    }
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let c_env = CString::new(pam_session::BROKER_PATH_ENV).map_err(|_| "NUL in env")?;
    let envp: [*const libc::c_char; 2] = [c_env.as_ptr(), std::ptr::null()];
    // SAFETY: open with a literal path.
    let devnull = Fd(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) });
    if devnull.0 < 0 {
        return Err(format!("/dev/null: {}", std::io::Error::last_os_error()));
    }
    let keep = [life_r.0, ready_w.0];

    // SAFETY: fork in sshd (single-threaded). The child only calls async-signal-safe
    // functions (dup2, fcntl, close, sigprocmask, signal, setsid, execve, _exit) on data
    // prepared above, and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; all pointers refer to memory that stays valid until execve.
        unsafe { exec_broker_child(devnull.0, &keep, c_program.as_ptr(), &argv, &envp) }
    }

    // Parent (sshd). The read end of the lifetime pipe stays open until the sweeper (below)
    // has its copy.
    drop(ready_w.take_into());
    drop(devnull);
    let mut handle = BrokerHandle {
        pid,
        session_dir: None,
        lifetime_w: Cell::new(life_w.take()),
    };
    let line = read_ready(
        ready_r.0,
        Duration::from_millis(pam_session::BROKER_READY_TIMEOUT_MS),
    );
    drop(ready_r.take_into());
    let parsed = line.and_then(|bytes| pam_session::parse_ready_line(&bytes));
    match parsed {
        Ok(ReadyLine::Ready(path)) => {
            match pam_session::session_dir_of(&cfg.bastion.runtime_dir, &path) {
                Some(dir) => {
                    spawn_sweeper(life_r.0, &dir);
                    drop(life_r.take_into());
                    handle.session_dir = Some(dir);
                    Ok((handle, path))
                }
                None => {
                    stop_broker(&handle);
                    Err(format!(
                        "the broker reported a socket outside {}: {}",
                        cfg.bastion.runtime_dir.display(),
                        path.display()
                    ))
                }
            }
        }
        Ok(ReadyLine::Error(msg)) => {
            stop_broker(&handle);
            Err(msg)
        }
        Err(e) => {
            stop_broker(&handle);
            Err(e)
        }
    }
}

impl Fd {
    fn take_into(&mut self) -> Fd {
        Fd(self.take())
    }
}

/// Start the session directory's sweeper: a root process (a double-forked copy of this one,
/// detached, holding nothing but the read end of the lifetime pipe) that removes
/// `runtime_dir/s-*` once the lifetime pipe ends, that is when the sshd session is over, also
/// when sshd died without closing the PAM session. The broker cannot remove the directory
/// itself: it is root-owned so that no process of the service user can tamper with it.
/// Best effort: close_session removes it too.
fn spawn_sweeper(life_r: RawFd, dir: &std::path::Path) {
    let Ok(c_dir) = CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: fork in sshd (single-threaded); the child only runs `sweeper_child`, which never
    // returns into sshd's code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child of fork; c_dir is valid.
        unsafe { sweeper_child(life_r, &c_dir) }
    }
    if pid > 0 {
        let mut status = 0;
        // SAFETY: waitpid on our own child (it exits at once) with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

/// Close every descriptor from 3 up except those in `keep`.
///
/// # Safety
/// Only in a forked child that owns no Rust objects wrapping these descriptors.
unsafe fn close_fds_except(keep: &[RawFd]) {
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 16) as RawFd
        } else {
            1024
        };
        let mut fd: RawFd = 3;
        while fd < max {
            if !keep.contains(&fd) {
                libc::close(fd);
            }
            fd += 1;
        }
    }
}

/// The sweeper (see [`spawn_sweeper`]). Never returns.
///
/// # Safety
/// Must only be called in the child of `fork`.
unsafe fn sweeper_child(life_r: RawFd, dir: &CStr) -> ! {
    unsafe {
        libc::setsid();
        // Detach: the intermediate exits at once (reaped by the module), so sshd never sees
        // the sweeper as its child.
        if libc::fork() != 0 {
            libc::_exit(0);
        }
        // Nothing of sshd's: not the client connection, not the lifetime pipe's write end
        // (or the broker would never see EOF).
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if devnull >= 0 {
            libc::dup2(devnull, 0);
            libc::dup2(devnull, 1);
            libc::dup2(devnull, 2);
        }
        close_fds_except(&[life_r]);
        default_signals();
        let mut buf = [0u8; 64];
        loop {
            let n = libc::read(life_r, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes()));
        // remove_dir_all never follows symlinks (it works through directory descriptors).
        let _ = std::fs::remove_dir_all(path);
        libc::_exit(0)
    }
}

/// In a forked child: unblock every signal and restore every default disposition (sshd's
/// must not leak). Async-signal-safe.
///
/// # Safety
/// Only in the child of `fork`, before it execs or exits.
unsafe fn default_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        let mut sig = 1;
        while sig < 65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
            sig += 1;
        }
    }
}

/// The forked child: set up descriptors and signals, exec the broker. Never returns.
///
/// # Safety
/// Must only be called in the child of `fork`; `argv`/`envp` are NULL-terminated arrays of
/// valid C strings.
unsafe fn exec_broker_child(
    devnull: RawFd,
    keep: &[RawFd; 2],
    program: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char; 2],
) -> ! {
    unsafe {
        libc::dup2(devnull, 0);
        libc::dup2(devnull, 1);
        libc::dup2(devnull, 2);
        for &fd in keep {
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
        // Close everything else sshd had open (sockets, host keys, the monitor pipes).
        close_fds_except(keep);
        // sshd's signal dispositions and mask must not leak into the broker.
        default_signals();
        libc::setsid();
        libc::execve(program, argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

/// Read the broker's ready line: up to a newline, EOF, 4 KiB or the deadline.
fn read_ready(fd: RawFd, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the broker did not report ready within {} ms",
                timeout.as_millis()
            ));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if r == 0 {
            continue;
        }
        let mut buf = [0u8; 512];
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read: {e}"));
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
        if out.contains(&b'\n') || out.len() > 4096 {
            return Ok(out);
        }
    }
}
