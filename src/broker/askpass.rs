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
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;
use zeroize::Zeroizing;

/// Serve `password` to the first accepted askpass child of `ssh_pid`; stop when `stop` is set.
/// Returns whether the password was handed out. The password is dropped (zeroized) on return.
pub fn serve(
    listener: &UnixListener,
    password: SecretString,
    ssh_pid: &AtomicI32,
    stop: &AtomicBool,
) -> bool {
    if listener.set_nonblocking(true).is_err() {
        return false;
    }
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    loop {
        if stop.load(Ordering::Acquire) {
            return false;
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
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
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
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (Arc::clone(&ssh), Arc::clone(&stop));
        let t = std::thread::spawn(move || serve(&listener, SecretString::from("pw"), &s2, &st2));
        let mut c = UnixStream::connect(&path).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        stop.store(true, Ordering::Release);
        assert!(!t.join().unwrap());
    }

    #[test]
    fn answers_a_child_of_its_ssh_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("askpass.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Our own pid plays the onward ssh; a child process plays its askpass.
        let ssh = Arc::new(AtomicI32::new(std::process::id() as i32));
        let stop = Arc::new(AtomicBool::new(false));
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
