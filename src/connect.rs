//! `kmsbastion-connect`: the login shell of every engineer entry (runs as the engineer).
//!
//! # How sshd runs it
//!
//! | session request | argv | environment |
//! |---|---|---|
//! | interactive shell | `-kmsbastion-connect` | |
//! | `ssh jump CMD` | `kmsbastion-connect -c CMD` | |
//! | anything under `ForceCommand /usr/libexec/kmsbastion/kmsbastion-connect` | `kmsbastion-connect -c /usr/libexec/kmsbastion/kmsbastion-connect` | `SSH_ORIGINAL_COMMAND=CMD` (absent for a shell) |
//! | subsystem sftp | as exec of the configured Subsystem command (`internal-sftp`, `…/sftp-server [args]`) | |
//!
//! The request is: `SSH_ORIGINAL_COMMAND` when set; else `-c CMD` (where a `CMD` that is
//! kmsbastion-connect itself means "shell"); else a shell. A command whose first word is
//! `internal-sftp` or ends in `/sftp-server` is the sftp subsystem. A pty is used when stdin
//! is a terminal; `TERM` is forwarded (the broker validates it).
//!
//! # Composite login (`KMSBASTION_SOCKET` set by the PAM module)
//!
//! Connects to the broker, sends the request with fds 0, 1, 2 (SCM_RIGHTS; see
//! [`crate::session`]), forwards SIGWINCH as `WindowChanged`, turns SIGHUP/SIGTERM into
//! `Hangup`, and exits with the onward ssh's status, or prints the broker's one-line failure
//! on stderr and exits with its code:
//!
//! | exit | meaning |
//! |---|---|
//! | 0–255 from the target | the remote command's exit status (ssh's own 255 on a lost connection) |
//! | 64 | bad invocation of kmsbastion-connect |
//! | 65 | `secret for ACCOUNT@HOST is unusable` |
//! | 66 | `ACCOUNT@HOST: its secret NAME no longer exists in KMS; ask your secret administrator` |
//! | 69 | `KMS unavailable, try again` |
//! | 70 | bastion internal error, or lost connection to the broker |
//! | 75 | `cannot connect to HOST: REASON` |
//! | 76 | `host key of HOST changed; refusing` |
//! | 77 | `HOST rejected the credential` |
//! | 78 | `bastion misconfigured (KMS: CODE)`, or a composite login without a broker |
//! | 79 | request refused by the broker |
//!
//! # Plain login (`ssh alice@jump`)
//!
//! No socket: reads `/etc/kmsbastion/kmsbastion.toml`, lists the accounts the engineer
//! (`LOGNAME`) may reach now from the `SSH_CONNECTION` source, with the exact `ssh` command
//! for each (jump address and port from `SSH_CONNECTION`), and exits 0.

use crate::config::{Config, Scope, DEFAULT_CONFIG_PATH};
use crate::login::Login;
use crate::session::{
    self, FrameReader, Message, Request, RequestKind, EXIT_INTERNAL, EXIT_MISCONFIGURED, EXIT_USAGE,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::SystemTime;

/// What the engineer's session asked for, before it goes to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

/// Work out the request from argv (without argv\[0\]) and `SSH_ORIGINAL_COMMAND`.
pub fn classify(args: &[Vec<u8>], original_command: Option<&[u8]>) -> Result<Invocation, String> {
    if let Some(cmd) = original_command {
        return Ok(classify_command(cmd));
    }
    match args {
        [] => Ok(Invocation::Shell),
        [flag, cmd] if flag.as_slice() == b"-c" => {
            if is_self(cmd) {
                Ok(Invocation::Shell)
            } else {
                Ok(classify_command(cmd))
            }
        }
        _ => Err("usage: kmsbastion-connect [-c COMMAND]".into()),
    }
}

fn first_word(cmd: &[u8]) -> &[u8] {
    let trimmed = cmd
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .and_then(|s| cmd.get(s..))
        .unwrap_or_default();
    let end = trimmed
        .iter()
        .position(u8::is_ascii_whitespace)
        .unwrap_or(trimmed.len());
    trimmed.get(..end).unwrap_or_default()
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

fn is_self(cmd: &[u8]) -> bool {
    let w = first_word(cmd);
    w == trim(cmd) && (w == b"kmsbastion-connect" || w.ends_with(b"/kmsbastion-connect"))
}

fn classify_command(cmd: &[u8]) -> Invocation {
    let w = first_word(cmd);
    if w == b"internal-sftp" || w.ends_with(b"/sftp-server") {
        Invocation::Subsystem("sftp".into())
    } else if trim(cmd).is_empty() {
        Invocation::Shell
    } else {
        Invocation::Exec(cmd.to_vec())
    }
}

/// The request sent to the broker.
pub fn to_request(inv: &Invocation, pty: bool, term: Option<String>) -> Request {
    let (kind, command) = match inv {
        Invocation::Shell => (RequestKind::Shell, Vec::new()),
        Invocation::Exec(c) => (RequestKind::Exec, c.clone()),
        Invocation::Subsystem(s) => (RequestKind::Subsystem, s.as_bytes().to_vec()),
    };
    Request {
        kind,
        pty,
        term,
        command,
    }
}

/// `SSH_CONNECTION` = `client_ip client_port server_ip server_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConnection {
    pub client: Option<IpAddr>,
    pub server: String,
    pub server_port: u16,
}

/// Parse `SSH_CONNECTION`; `None` when absent or malformed.
pub fn parse_ssh_connection(v: &str) -> Option<SshConnection> {
    let parts: Vec<&str> = v.split_ascii_whitespace().collect();
    let [client, _, server, port] = parts.as_slice() else {
        return None;
    };
    Some(SshConnection {
        client: client.parse().ok(),
        server: (*server).to_owned(),
        server_port: port.parse().ok()?,
    })
}

/// The plain login's listing.
pub fn listing(
    engineer: &str,
    reachable: &[(String, String)],
    conn: Option<&SshConnection>,
) -> String {
    let jump = conn.map_or_else(|| "<jump-host>".to_owned(), |c| c.server.clone());
    let port = match conn {
        Some(c) if c.server_port != 22 => format!("-p {} ", c.server_port),
        _ => String::new(),
    };
    if reachable.is_empty() {
        return format!(
            "{engineer}: no account is granted to you from this address right now; ask your bastion administrator\n"
        );
    }
    let mut out = format!("{engineer} may reach these accounts now:\n");
    let width = reachable
        .iter()
        .map(|(a, h)| a.len() + h.len() + 1)
        .max()
        .unwrap_or(0);
    for (account, host) in reachable {
        let target = format!("{account}@{host}");
        out.push_str(&format!(
            "  {target:<width$}  ssh {port}{engineer}@{target}@{jump}\n"
        ));
    }
    out
}

/// Make a broker's line safe to print: one line, no control characters.
pub fn sanitize_line(msg: &str) -> String {
    msg.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

/// Environment as seen by [`run`] (injected for tests).
#[derive(Debug, Clone, Default)]
pub struct ConnectEnv {
    pub socket: Option<String>,
    pub original_command: Option<Vec<u8>>,
    pub logname: Option<String>,
    pub term: Option<String>,
    pub ssh_connection: Option<String>,
}

impl ConnectEnv {
    /// The process environment.
    pub fn from_process() -> Self {
        use std::os::unix::ffi::OsStringExt;
        let s = |k: &str| std::env::var(k).ok();
        ConnectEnv {
            socket: s("KMSBASTION_SOCKET"),
            original_command: std::env::var_os("SSH_ORIGINAL_COMMAND").map(|v| v.into_vec()),
            logname: s("LOGNAME").or_else(|| s("USER")),
            term: s("TERM"),
            ssh_connection: s("SSH_CONNECTION"),
        }
    }
}

/// Run kmsbastion-connect; returns the process exit status.
pub fn run(args: &[Vec<u8>], env: &ConnectEnv) -> u8 {
    let inv = match classify(args, env.original_command.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_USAGE;
        }
    };
    match &env.socket {
        Some(path) => onward(path, &inv, env),
        None => {
            let composite = env
                .logname
                .as_deref()
                .map(|l| {
                    matches!(Login::parse(l), Ok(Login::Composite(_)))
                        || l.matches('@').count() >= 2
                })
                .unwrap_or(false);
            if composite {
                eprintln!(
                    "no bastion broker for this session (KMSBASTION_SOCKET is not set); ask your bastion administrator to check the PAM session configuration"
                );
                EXIT_MISCONFIGURED
            } else {
                list_reachable(env)
            }
        }
    }
}

fn list_reachable(env: &ConnectEnv) -> u8 {
    let Some(engineer) = env.logname.clone() else {
        eprintln!("cannot tell who you are (LOGNAME is not set)");
        return EXIT_USAGE;
    };
    let cfg = match Config::load_scoped(Path::new(DEFAULT_CONFIG_PATH), Scope::Engineer(&engineer))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot read the bastion configuration: {e}");
            return EXIT_MISCONFIGURED;
        }
    };
    let conn = env.ssh_connection.as_deref().and_then(parse_ssh_connection);
    let source = conn.as_ref().and_then(|c| c.client);
    let reach = crate::grant::reachable(&cfg, &engineer, source, SystemTime::now());
    print!("{}", listing(&engineer, &reach, conn.as_ref()));
    let _ = std::io::stdout().flush();
    0
}

/// Write end of the self-pipe the signal handler writes to (-1: none).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = u8::try_from(sig).unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local byte.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Install handlers for SIGWINCH, SIGHUP, SIGTERM and SIGINT that write to a non-blocking
/// pipe; returns its read end.
fn install_signal_pipe() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [r, w] = fds;
    SIGNAL_PIPE.store(w, Ordering::Relaxed);
    for sig in [libc::SIGWINCH, libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing an async-signal-safe handler with a zeroed, then filled, sigaction.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: ignoring SIGPIPE has no preconditions (a dead broker gives EPIPE instead).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: r is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty has no memory-safety preconditions.
    unsafe { libc::isatty(fd) == 1 }
}

fn onward(path: &str, inv: &Invocation, env: &ConnectEnv) -> u8 {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot reach the bastion broker at {path}: {e}; log in again or ask your bastion administrator");
            return EXIT_INTERNAL;
        }
    };
    let sigpipe = match install_signal_pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bastion internal error: signal pipe: {e}");
            return EXIT_INTERNAL;
        }
    };
    let request = to_request(inv, isatty(0), env.term.clone());
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let fds: [BorrowedFd<'_>; 3] = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    if let Err(e) = session::send(&stream, &Message::Request(request), &fds) {
        eprintln!("cannot hand the session to the bastion broker: {e}");
        return EXIT_INTERNAL;
    }
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("bastion internal error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let mut reader = FrameReader::new(stream);
    let mut hung_up = false;
    loop {
        let mut pfds = [
            libc::pollfd {
                fd: reader.stream().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigpipe.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: pfds is a valid array of two pollfd.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return EXIT_INTERNAL;
        }
        let [sock_pfd, sig_pfd] = pfds;
        if sig_pfd.revents & libc::POLLIN != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: buf is valid for its length; the pipe is non-blocking.
            let n = unsafe { libc::read(sigpipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            for &sig in buf
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default()
            {
                let msg = if i32::from(sig) == libc::SIGWINCH {
                    Message::WindowChanged
                } else {
                    hung_up = true;
                    Message::Hangup
                };
                // A dead broker shows up on the read side; ignore send errors here.
                let _ = session::send(&writer, &msg, &[]);
            }
        }
        if sock_pfd.revents != 0 {
            match reader.recv() {
                Ok(Some(rx)) => match rx.message {
                    Message::Exit { status } => return status,
                    Message::Failed { code, message } => {
                        eprintln!("{}", sanitize_line(&message));
                        return code.max(64);
                    }
                    _ => {
                        eprintln!("bastion internal error: unexpected message from the broker");
                        return EXIT_INTERNAL;
                    }
                },
                Ok(None) | Err(_) => {
                    if hung_up {
                        return 129;
                    }
                    eprintln!("lost the connection to the bastion broker");
                    return EXIT_INTERNAL;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&[], None).unwrap(), Invocation::Shell);
        assert_eq!(
            classify(&[v("-c"), v("echo hi; id")], None).unwrap(),
            Invocation::Exec(v("echo hi; id"))
        );
        // ForceCommand: the real request is SSH_ORIGINAL_COMMAND.
        let forced = [v("-c"), v("/usr/libexec/kmsbastion/kmsbastion-connect")];
        assert_eq!(classify(&forced, None).unwrap(), Invocation::Shell);
        assert_eq!(
            classify(&forced, Some(b"exit 7")).unwrap(),
            Invocation::Exec(v("exit 7"))
        );
        assert_eq!(
            classify(&forced, Some(b"internal-sftp")).unwrap(),
            Invocation::Subsystem("sftp".into())
        );
        assert_eq!(
            classify(&forced, Some(b"/usr/lib/openssh/sftp-server -l INFO")).unwrap(),
            Invocation::Subsystem("sftp".into())
        );
        assert_eq!(
            classify(&[v("-c"), v("/usr/lib/openssh/sftp-server")], None).unwrap(),
            Invocation::Subsystem("sftp".into())
        );
        // Injection-looking commands are just bytes for the target's shell.
        assert_eq!(
            classify(&forced, Some(b"x; id `id` $(id)\nid")).unwrap(),
            Invocation::Exec(v("x; id `id` $(id)\nid"))
        );
        // "kmsbastion-connect --x" is a command, not the shell.
        assert_eq!(
            classify(&[v("-c"), v("kmsbastion-connect --x")], None).unwrap(),
            Invocation::Exec(v("kmsbastion-connect --x"))
        );
        assert!(classify(&[v("-x")], None).is_err());
        assert!(classify(&[v("-c")], None).is_err());
    }

    #[test]
    fn requests() {
        let r = to_request(&Invocation::Subsystem("sftp".into()), false, None);
        assert_eq!(r.kind, RequestKind::Subsystem);
        assert_eq!(r.command, b"sftp");
        let r = to_request(&Invocation::Shell, true, Some("xterm".into()));
        assert_eq!(r.kind, RequestKind::Shell);
        assert!(r.pty);
    }

    #[test]
    fn ssh_connection_and_listing() {
        let c = parse_ssh_connection("127.0.0.1 40000 127.0.0.1 2222").unwrap();
        assert_eq!(c.client, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.server_port, 2222);
        assert!(parse_ssh_connection("garbage").is_none());
        let out = listing(
            "alice",
            &[
                ("root".into(), "web-01".into()),
                ("deploy".into(), "web-02".into()),
            ],
            Some(&c),
        );
        assert!(
            out.contains("ssh -p 2222 alice@root@web-01@127.0.0.1\n"),
            "{out}"
        );
        assert!(
            out.contains("ssh -p 2222 alice@deploy@web-02@127.0.0.1\n"),
            "{out}"
        );
        let c22 = parse_ssh_connection("10.0.0.9 40000 10.0.0.1 22").unwrap();
        let out = listing("alice", &[("root".into(), "web-01".into())], Some(&c22));
        assert!(
            out.contains("  root@web-01  ssh alice@root@web-01@10.0.0.1\n"),
            "{out}"
        );
        assert!(listing("bob", &[], None).contains("no account is granted"));
    }

    #[test]
    fn sanitizes_broker_lines() {
        assert_eq!(sanitize_line("a\nb\x1b[2Jc"), "a b [2Jc");
    }

    #[test]
    fn composite_without_socket_is_an_error() {
        let env = ConnectEnv {
            logname: Some("alice@root@web-01".into()),
            ..ConnectEnv::default()
        };
        assert_eq!(run(&[], &env), EXIT_MISCONFIGURED);
        let bad = ConnectEnv::default();
        assert_eq!(run(&[v("-x"), v("y"), v("z")], &bad), EXIT_USAGE);
    }

    #[test]
    fn talks_to_a_fake_broker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let w = s.try_clone().unwrap();
            let mut r = FrameReader::new(s);
            let got = r.recv().unwrap().unwrap();
            assert_eq!(got.fds.len(), 3);
            let Message::Request(req) = got.message else {
                panic!("not a request")
            };
            assert_eq!(req.command, b"exit 7");
            session::send(&w, &Message::Exit { status: 7 }, &[]).unwrap();
        });
        let env = ConnectEnv {
            socket: Some(path.to_string_lossy().into_owned()),
            original_command: Some(v("exit 7")),
            ..ConnectEnv::default()
        };
        assert_eq!(run(&[], &env), 7);
        t.join().unwrap();
    }
}
