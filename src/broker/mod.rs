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
//!    file can be read); creates `runtime_dir/s-<random>/` (0711, owned by the service user)
//!    with the socket `connect.sock` (owned by the engineer's uid, mode 0600: only that uid
//!    can connect) and the private directory `p/` (0700, service user).
//! 2. Drops to the service user for good (`setgroups([])`, `setresgid`, `setresuid`, checks
//!    that `setuid(0)` fails), then `PR_SET_DUMPABLE=0`, `PR_SET_NO_NEW_PRIVS`,
//!    `RLIMIT_CORE=0`; memory is locked (`mlockall`, best effort, `RLIMIT_MEMLOCK` raised
//!    while still root).
//! 3. Writes `ready <socket path>\n` to the ready fd (or `error <why>\n` and exits 1), which
//!    the PAM module exports as `KMSBASTION_SOCKET`.
//! 4. Serves until the lifetime pipe reaches EOF (sshd session over) or SIGTERM/SIGHUP/SIGINT;
//!    then hangs up every onward ssh, removes its directory and exits 0.
//!
//! A connection is accepted only from a peer (SO_PEERCRED) with the engineer's uid whose
//! process ancestry (`/proc/PID/stat`) includes `--sshd-pid`. Each connection is one request
//! (see `session`), served on its own thread: `GetSecretValue(ACSCurrent)` of the login's
//! host account secret (a request cannot name a target: the broker only ever serves its own
//! `account@host`), parse and check `UserName`, run the onward ssh (see [`onward`]) on the
//! descriptors handed over, retry once with ACSPrevious if the target rejected ACSCurrent, and
//! answer `Exit{status}` or `Failed{code, line}` (see [`failure`]). Each request is audited
//! (`connect-start`, `connect-end`).
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

use crate::audit::{self, Audit, Event};
use crate::config::{Config, Host, HostAccount};
use crate::kms::{KmsClient, KmsErrorKind, SecretStage};
use crate::pam_session::{BrokerArgs, ReadyLine};
use crate::secret::TargetSecret;
use crate::session::{self, FrameReader, Message, Request, RequestKind, REQUEST_FDS};
use failure::{failure_for, log_detail, OnwardError, Target};
use onward::{Attempt, AttemptContext, ChildSlot};
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most this many onward connections at once per login.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

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

/// Everything a request needs, shared by the request threads.
struct Broker {
    args: BrokerArgs,
    host: Host,
    account: HostAccount,
    engineer_uid: u32,
    ssh: PathBuf,
    askpass_program: PathBuf,
    connect_timeout_s: u32,
    private: PathBuf,
    kms: KmsClient,
    audit: Audit,
    children: Mutex<Vec<Arc<ChildSlot>>>,
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

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

fn start(args: BrokerArgs) -> Result<(Broker, UnixListener, PathBuf, PathBuf), String> {
    // SAFETY: geteuid/umask have no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must be started as root (by pam_kmsbastion)".into());
    }
    // SAFETY: as above.
    unsafe { libc::umask(0o077) };
    let cfg = Config::load(&args.config).map_err(|e| e.to_string())?;
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
    let kms = KmsClient::from_settings(&cfg.kms).map_err(|e| format!("KMS client: {e}"))?;

    // The runtime directory: root- or service-owned, not writable by anyone else.
    let runtime = cfg.bastion.runtime_dir.clone();
    if !runtime.exists() {
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&runtime)
            .map_err(|e| format!("creating {}: {e}", runtime.display()))?;
        // Explicitly: the umask above would make it 0700, and engineers must traverse it.
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", runtime.display()))?;
    }
    let md = fs::symlink_metadata(&runtime).map_err(|e| format!("{}: {e}", runtime.display()))?;
    {
        use std::os::unix::fs::MetadataExt;
        if !md.is_dir() || (md.uid() != 0 && md.uid() != svc.uid) || md.mode() & 0o022 != 0 {
            return Err(format!(
                "{} must be a directory owned by root or {} and not writable by others",
                runtime.display(),
                cfg.bastion.service_user
            ));
        }
    }
    let session_dir = onward::private_dir(&runtime, "s-")
        .map_err(|e| format!("creating a session directory: {e}"))?;
    let cleanup_err = |e: String| {
        let _ = fs::remove_dir_all(&session_dir);
        e
    };
    fs::set_permissions(&session_dir, fs::Permissions::from_mode(0o711))
        .map_err(|e| cleanup_err(format!("chmod: {e}")))?;
    chown(&session_dir, svc.uid, svc.gid).map_err(cleanup_err)?;
    let private = session_dir.join("p");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| cleanup_err(format!("creating {}: {e}", private.display())))?;
    chown(&private, svc.uid, svc.gid).map_err(cleanup_err)?;
    let socket = session_dir.join("connect.sock");
    let listener = UnixListener::bind(&socket)
        .map_err(|e| cleanup_err(format!("binding {}: {e}", socket.display())))?;
    chown(&socket, engineer_uid, svc.gid).map_err(cleanup_err)?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| cleanup_err(format!("chmod socket: {e}")))?;

    lock_memory();
    drop_privileges(&svc).map_err(cleanup_err)?;
    harden();

    let askpass_program = std::env::current_exe().unwrap_or_else(|_| cfg.bastion.broker.clone());
    let broker = Broker {
        args,
        host,
        account,
        engineer_uid,
        ssh: cfg.bastion.ssh.clone(),
        askpass_program,
        connect_timeout_s: cfg.bastion.connect_timeout_s,
        private,
        kms,
        audit,
        children: Mutex::new(Vec::new()),
    };
    Ok((broker, listener, session_dir, socket))
}

/// Lock current and future memory (best effort): raise RLIMIT_MEMLOCK while still root so the
/// locked future allocations of the unprivileged broker do not fail.
fn lock_memory() {
    // SAFETY: setrlimit/mlockall with valid arguments.
    unsafe {
        let inf = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) == 0 {
            libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE);
        }
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
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
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
            std::thread::spawn(move || {
                handle_connection(&b, stream);
                a.fetch_sub(1, Ordering::AcqRel);
            });
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
    fn target(&self) -> Target {
        Target {
            account: self.account.name.clone(),
            host: self.host.name.clone(),
            secret: self.account.secret.clone(),
        }
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
        let mut e = self.event("refused");
        e.result = Some("refused".into());
        e.reason = Some(why.to_owned());
        self.audit.emit(&e);
        let _ = session::send(stream, &session::Failure::Refused.to_message(), &[]);
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

    let slot = Arc::new(ChildSlot::default());
    if let Ok(mut c) = broker.children.lock() {
        c.push(Arc::clone(&slot));
    }
    // Control messages from connect while the request runs.
    let ctl_slot = Arc::clone(&slot);
    let control = std::thread::spawn(move || loop {
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

    let started = Instant::now();
    let mut start = broker.event("connect-start");
    start.kind = Some(request.kind.as_str().into());
    broker.audit.emit(&start);

    let mut end = broker.event("connect-end");
    end.kind = Some(request.kind.as_str().into());
    let outcome = onward_connection(broker, &request, &fds, &slot, &mut end);
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
            let f = failure_for(&err, &broker.target());
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
    let _ = writer.shutdown(std::net::Shutdown::Both);
    let _ = control.join();
    if let Ok(mut c) = broker.children.lock() {
        c.retain(|s| !Arc::ptr_eq(s, &slot));
    }
}

/// Fetch, check, connect; retry once with ACSPrevious on a rejected credential.
fn onward_connection(
    broker: &Broker,
    request: &Request,
    fds: &[OwnedFd; 3],
    slot: &ChildSlot,
    end: &mut Event,
) -> Result<u8, OnwardError> {
    if broker.host.host_keys.is_empty() {
        return Err(OnwardError::Unreachable {
            reason: "no pinned host key is configured for it; ask your bastion administrator"
                .into(),
        });
    }
    let mut tried: Vec<String> = Vec::new();
    for stage in [SecretStage::Current, SecretStage::Previous] {
        if slot.cancelled.load(Ordering::Acquire) {
            return Err(OnwardError::Refused("hung up".into()));
        }
        let value = match broker.kms.get_secret_value(&broker.account.secret, stage) {
            Ok(v) => v,
            Err(error) => {
                if stage == SecretStage::Previous {
                    // No previous version (or it cannot be fetched): the rejection stands.
                    if !matches!(error.kind, KmsErrorKind::NotFound) {
                        audit::send_syslog(
                            4,
                            &format!("GetSecretValue(ACSPrevious) failed: {error}"),
                        );
                    }
                    break;
                }
                return Err(OnwardError::Kms {
                    error,
                    stage: stage.as_str(),
                });
            }
        };
        if tried.contains(&value.version_id) {
            break;
        }
        tried.push(value.version_id.clone());
        end.version_ids = tried.clone();
        let secret = TargetSecret::parse(value.secret_data.expose())
            .and_then(|s| s.ensure_user(&broker.account.name).map(|()| s))
            .map_err(|error| OnwardError::Secret {
                error,
                version_id: value.version_id.clone(),
            })?;
        drop(value);
        let fingerprint = secret.fingerprint();
        let dir = onward::private_dir(&broker.private, "r-")
            .map_err(|e| OnwardError::Internal(format!("request directory: {e}")))?;
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
            request,
            fds,
            slot,
        };
        let result = onward::attempt(&cx, secret);
        let _ = fs::remove_dir_all(&dir);
        match result {
            Attempt::Done { status } => {
                end.version_id = tried.last().cloned();
                end.fingerprint = fingerprint;
                return Ok(status);
            }
            Attempt::Rejected => {
                audit::send_syslog(
                    5,
                    &format!(
                        "{}@{} rejected {} version {}",
                        broker.account.name,
                        broker.host.name,
                        stage.as_str(),
                        tried.last().map(String::as_str).unwrap_or("?")
                    ),
                );
                continue;
            }
            Attempt::Failed(e) => return Err(e),
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
