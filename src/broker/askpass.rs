//! The password path: the broker answers ssh's askpass, once, and only to a child of its own
//! onward ssh.
//!
//! ssh runs `SSH_ASKPASS` (the broker binary itself, with `KMSBASTION_ASKPASS=<socket>` in
//! its environment) as its direct child. That child connects to the request's private askpass
//! socket (in a 0700 directory of the broker uid), the broker checks the peer's parent pid is
//! its ssh, writes the password once, and closes. The askpass child prints it to ssh on
//! stdout. The engineer's uid can reach neither the socket nor the processes.

use crate::sensitive::SecretString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;
use zeroize::Zeroizing;

/// A stop signal a thread blocked in `poll(2)` notices at once: a flag plus an eventfd that
/// becomes (and stays) readable when the flag is set.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    wake: OwnedFd,
}

impl Stop {
    /// A fresh, unset stop signal (the eventfd is close-on-exec: ssh never inherits it).
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            flag: AtomicBool::new(false),
            wake,
        })
    }

    /// Set the flag and wake the waiter (idempotent).
    pub fn set(&self) {
        self.flag.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd we own. A failure (the counter
        // is saturated) leaves the eventfd readable anyway, which is all the waiter needs.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// How long one `poll(2)` may sleep before the flag is looked at again. Only a guard: every
/// `Stop::set` wakes the waiter at once, and a connection is accepted the moment it arrives.
const STOP_GUARD: libc::c_int = 1000;

/// Wait until `listener` has a connection (`Ok(true)`) or `stop` is set (`Ok(false)`).
fn wait_for_connection(listener: &UnixListener, stop: &Stop) -> std::io::Result<bool> {
    loop {
        if stop.is_set() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd for descriptors we hold.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, STOP_GUARD) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let [l, w] = fds;
        if w.revents != 0 {
            return Ok(false);
        }
        if l.revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if l.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(std::io::Error::other("the askpass socket failed"));
        }
    }
}

/// Serve `password` to the first accepted askpass child of `ssh_pid`; stop when `stop` is set.
/// Returns whether the password was handed out. The password is dropped (zeroized) on return.
/// Sleeps in `poll(2)` on the listener and the stop signal: a connection is answered as soon
/// as it arrives, and a stop ends the wait at once.
pub fn serve(
    listener: &UnixListener,
    password: SecretString,
    ssh_pid: &AtomicI32,
    stop: &Stop,
) -> bool {
    if listener.set_nonblocking(true).is_err() {
        return false;
    }
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    loop {
        match wait_for_connection(listener, stop) {
            Ok(true) => {}
            Ok(false) | Err(_) => return false,
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                let ok = crate::session::peer_cred(stream.as_fd())
                    .map(|c| c.uid == me && super::onward::is_child_of(c.pid, ssh_pid))
                    .unwrap_or(false)
                    && parent_is_ssh(&stream, ssh_pid);
                if !ok {
                    continue;
                }
                let mut line = Zeroizing::new(password.expose().as_bytes().to_vec());
                line.push(b'\n');
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let sent = stream.write_all(&line).is_ok();
                drop(stream);
                return sent;
            }
            // The connection went away between poll and accept.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(_) => return false,
        }
    }
}

/// The askpass peer must be a *child* of ssh (ssh forks it), not ssh itself.
fn parent_is_ssh(stream: &UnixStream, ssh_pid: &AtomicI32) -> bool {
    match crate::session::peer_cred(stream.as_fd()) {
        Ok(c) => crate::agent::parent_pid(c.pid).ok() == Some(ssh_pid.load(Ordering::Acquire)),
        Err(_) => false,
    }
}

/// Askpass mode of the broker binary: fetch the answer from `socket` and print it on stdout.
/// Exit status 0 when an answer came, 1 otherwise (ssh then treats the prompt as cancelled).
pub fn client(socket: &Path) -> i32 {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return 1;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Zeroizing::new(Vec::with_capacity(256));
    if s.read_to_end(&mut buf).is_err() || buf.is_empty() {
        return 1;
    }
    let mut out = std::io::stdout().lock();
    if out.write_all(&buf).is_err() || out.flush().is_err() {
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn answers_only_children_of_its_ssh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("askpass.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Pretend the onward ssh is pid 1: this test process is not its child, so it must get
        // nothing, and the server must give up when told to stop.
        let ssh = Arc::new(AtomicI32::new(1));
        let stop = Arc::new(Stop::new().unwrap());
        let (s2, st2) = (Arc::clone(&ssh), Arc::clone(&stop));
        let t = std::thread::spawn(move || serve(&listener, SecretString::from("pw"), &s2, &st2));
        let mut c = UnixStream::connect(&path).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        // The stop wakes the server at once (well inside the poll guard).
        let asked = std::time::Instant::now();
        stop.set();
        assert!(!t.join().unwrap());
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "{:?}",
            asked.elapsed()
        );
    }

    #[test]
    fn a_stop_set_before_serving_ends_it_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("askpass.sock")).unwrap();
        let stop = Stop::new().unwrap();
        stop.set();
        stop.set();
        assert!(stop.is_set());
        let ssh = AtomicI32::new(std::process::id() as i32);
        assert!(!serve(&listener, SecretString::from("pw"), &ssh, &stop));
    }

    #[test]
    fn answers_a_child_of_its_ssh_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("askpass.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Our own pid plays the onward ssh; a child process plays its askpass.
        let ssh = Arc::new(AtomicI32::new(std::process::id() as i32));
        let stop = Arc::new(Stop::new().unwrap());
        let (s2, st2) = (Arc::clone(&ssh), Arc::clone(&stop));
        let t = std::thread::spawn(move || serve(&listener, SecretString::from("pw-1"), &s2, &st2));
        let script = format!(
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect({:?}); sys.stdout.write(s.recv(100).decode())",
            path.to_str().unwrap()
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "pw-1\n");
        assert!(t.join().unwrap());
    }
}
