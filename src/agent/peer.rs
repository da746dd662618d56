//! The few system calls the agent needs that std does not offer on stable Rust: the peer
//! of a Unix socket (`SO_PEERCRED`) and waiting for readability with a timeout (`poll`).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The process id of the peer of a connected Unix stream socket, as the kernel recorded it
/// when the peer called `connect` (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the descriptor is open for the lifetime of `stream`; `cred` is a writable
    // `ucred` and `len` holds its exact size, which is what SO_PEERCRED writes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        // A peer in another pid namespace shows as 0: nobody we can vouch for.
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "agent peer has no visible process id",
        ));
    }
    Ok(cred.pid)
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes. `Ok(false)` on timeout
/// or when a signal interrupted the wait.
pub(crate) fn wait_readable(fd: &impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfd` is one valid, writable pollfd for a descriptor borrowed for the call.
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(rc > 0)
}

/// The parent process id of `pid`, from `/proc/<pid>/stat`. With [`peer_pid`] this lets a
/// caller accept only its own children: `parent_pid(pid)? == std::process::id()`.
pub fn parent_pid(pid: libc::pid_t) -> io::Result<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_ppid(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat format"),
        )
    })
}

/// `pid (comm) state ppid …`; `comm` may hold spaces and parentheses, so split at the last `)`.
fn parse_ppid(stat: &str) -> Option<libc::pid_t> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppid_even_with_odd_command_names() {
        assert_eq!(parse_ppid("42 (ssh) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("42 (a) b (c) R 9 1"), Some(9));
        assert_eq!(parse_ppid("42 (x"), None);
        assert_eq!(parse_ppid("42 (x) S"), None);
    }

    #[test]
    fn own_parent_and_peer() {
        let me = libc::pid_t::try_from(std::process::id()).unwrap();
        // SAFETY: getppid has no preconditions.
        let expected = unsafe { libc::getppid() };
        assert_eq!(parent_pid(me).unwrap(), expected);
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(peer_pid(&a).unwrap(), me);
        assert!(!wait_readable(&a, Duration::from_millis(10)).unwrap());
        drop(b);
        assert!(wait_readable(&a, Duration::from_millis(10)).unwrap());
    }
}
