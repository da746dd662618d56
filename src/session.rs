//! The connect ⇄ broker wire protocol.
//!
//! `kmsbastion-connect` (running as the engineer) talks to its login's
//! `kmsbastion-broker` over the Unix stream socket named by `KMSBASTION_SOCKET`. One
//! connection carries one onward request:
//!
//! ```text
//! connect → broker   Request{kind, pty, term, command}  + SCM_RIGHTS [stdin, stdout, stderr]
//! connect → broker   WindowChanged        (any number of times: connect got SIGWINCH)
//! connect → broker   Hangup               (connect got SIGHUP/SIGTERM: end the onward ssh)
//! broker  → connect  Exit{status}         (the onward ssh's exit status; the end)
//! broker  → connect  Failed{code, message} (one line for the engineer and connect's exit code)
//! ```
//!
//! Frames are `u32` big-endian body length, then the body: one tag byte and the fields.
//! Bodies larger than [`MAX_FRAME`] are refused before anything is allocated, and the decoder
//! is total: any byte string gives a message, "need more bytes" or an error, never a panic.
//!
//! The fd-passing helpers (`sendmsg`/`recvmsg` with `SCM_RIGHTS`) and `SO_PEERCRED` live here
//! too: they are the only `unsafe` of the protocol.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Largest accepted frame body, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Number of descriptors a [`Message::Request`] carries: stdin, stdout, stderr.
pub const REQUEST_FDS: usize = 3;

/// Exit status of `kmsbastion-connect` when it was invoked wrongly.
pub const EXIT_USAGE: u8 = 64;
/// Exit status: the secret is malformed or does not belong to the account.
pub const EXIT_SECRET_UNUSABLE: u8 = 65;
/// Exit status: the secret no longer exists (deleted or pending deletion) in KMS.
pub const EXIT_SECRET_GONE: u8 = 66;
/// Exit status: KMS unavailable (throttled, 5xx, unreachable) within the deadline.
pub const EXIT_KMS_UNAVAILABLE: u8 = 69;
/// Exit status: an internal error of the bastion (see the jump host's log).
pub const EXIT_INTERNAL: u8 = 70;
/// Exit status: the target host could not be reached (connection refused, timeout, DNS).
pub const EXIT_UNREACHABLE: u8 = 75;
/// Exit status: the target's host key differs from the pinned one.
pub const EXIT_HOST_KEY_CHANGED: u8 = 76;
/// Exit status: the target rejected the credential (ACSCurrent and, if any, ACSPrevious).
pub const EXIT_CREDENTIAL_REJECTED: u8 = 77;
/// Exit status: the bastion is misconfigured (KMS credentials, permissions, clock, no broker).
pub const EXIT_MISCONFIGURED: u8 = 78;
/// Exit status: the broker refused the request (not this login's account, bad request).
pub const EXIT_REFUSED: u8 = 79;

/// Why an onward connection did not happen: each variant is one line of DESIGN.md's failure
/// table. [`Failure::message`] is exactly what the engineer sees on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The secret was deleted or is pending deletion.
    SecretGone {
        account: String,
        host: String,
        secret: String,
    },
    /// KMS throttled, failed or was unreachable until the deadline.
    KmsUnavailable,
    /// KMS refused us for a reason only the bastion administrator can fix.
    Misconfigured { code: String },
    /// The secret value cannot be used for `account@host`.
    SecretUnusable { account: String, host: String },
    /// The target presented a host key other than the pinned one(s).
    HostKeyChanged { host: String },
    /// The target rejected ACSCurrent (and ACSPrevious when there was one).
    CredentialRejected { host: String },
    /// The onward connection could not be made; `reason` is ssh's own line.
    Unreachable { host: String, reason: String },
    /// The request was refused by the broker (wrong peer, bad request).
    Refused,
    /// Something inside the bastion failed; the details are in the jump host's log.
    Internal,
}

impl Failure {
    /// The one line the engineer sees (no trailing newline).
    pub fn message(&self) -> String {
        match self {
            Failure::SecretGone {
                account,
                host,
                secret,
            } => format!(
                "{account}@{host}: its secret {secret} no longer exists in KMS; ask your secret administrator"
            ),
            Failure::KmsUnavailable => "KMS unavailable, try again".to_owned(),
            Failure::Misconfigured { code } => format!("bastion misconfigured (KMS: {code})"),
            Failure::SecretUnusable { account, host } => {
                format!("secret for {account}@{host} is unusable")
            }
            Failure::HostKeyChanged { host } => format!("host key of {host} changed; refusing"),
            Failure::CredentialRejected { host } => format!("{host} rejected the credential"),
            Failure::Unreachable { host, reason } => {
                format!("cannot connect to {host}: {reason}")
            }
            Failure::Refused => "request refused by the bastion".to_owned(),
            Failure::Internal => {
                "bastion internal error; ask your bastion administrator to check the jump host's log"
                    .to_owned()
            }
        }
    }

    /// The exit status `kmsbastion-connect` ends with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::SecretGone { .. } => EXIT_SECRET_GONE,
            Failure::KmsUnavailable => EXIT_KMS_UNAVAILABLE,
            Failure::Misconfigured { .. } => EXIT_MISCONFIGURED,
            Failure::SecretUnusable { .. } => EXIT_SECRET_UNUSABLE,
            Failure::HostKeyChanged { .. } => EXIT_HOST_KEY_CHANGED,
            Failure::CredentialRejected { .. } => EXIT_CREDENTIAL_REJECTED,
            Failure::Unreachable { .. } => EXIT_UNREACHABLE,
            Failure::Refused => EXIT_REFUSED,
            Failure::Internal => EXIT_INTERNAL,
        }
    }

    /// A short machine word for audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::SecretGone { .. } => "secret-gone",
            Failure::KmsUnavailable => "kms-unavailable",
            Failure::Misconfigured { .. } => "misconfigured",
            Failure::SecretUnusable { .. } => "secret-unusable",
            Failure::HostKeyChanged { .. } => "host-key-changed",
            Failure::CredentialRejected { .. } => "credential-rejected",
            Failure::Unreachable { .. } => "unreachable",
            Failure::Refused => "refused",
            Failure::Internal => "internal",
        }
    }

    /// The wire form sent to connect.
    pub fn to_message(&self) -> Message {
        Message::Failed {
            code: self.exit_code(),
            message: self.message(),
        }
    }
}

/// What the engineer's sshd session asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// An interactive login shell.
    Shell,
    /// A command (`ssh jump 'cmd'`), run by the target account's shell.
    Exec,
    /// A subsystem; the name is the request's command (only `sftp` is served).
    Subsystem,
}

impl RequestKind {
    fn tag(self) -> u8 {
        match self {
            RequestKind::Shell => 0,
            RequestKind::Exec => 1,
            RequestKind::Subsystem => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(RequestKind::Shell),
            1 => Some(RequestKind::Exec),
            2 => Some(RequestKind::Subsystem),
            _ => None,
        }
    }
    /// Lower-case name, for audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Shell => "shell",
            RequestKind::Exec => "exec",
            RequestKind::Subsystem => "subsystem",
        }
    }
}

/// One onward request. Its descriptors travel next to it (SCM_RIGHTS), not inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Whether stdin is a terminal (sshd allocated a pty): the onward ssh then uses `-tt`.
    pub pty: bool,
    /// The engineer's `TERM`, unvalidated (the broker validates it).
    pub term: Option<String>,
    /// The command (exec) or subsystem name (subsystem); empty for a shell. Raw bytes: the
    /// target's shell interprets them, nothing on the jump host does.
    pub command: Vec<u8>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    WindowChanged,
    Hangup,
    Exit { status: u8 },
    Failed { code: u8, message: String },
}

const TAG_REQUEST: u8 = 1;
const TAG_WINDOW_CHANGED: u8 = 2;
const TAG_HANGUP: u8 = 3;
const TAG_EXIT: u8 = 4;
const TAG_FAILED: u8 = 5;

/// A protocol violation or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("{0} descriptors arrived with a frame; expected {1}")]
    Descriptors(usize, usize),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Encode one frame (length prefix included).
pub fn encode(msg: &Message) -> Result<Vec<u8>, SessionError> {
    let mut body = Vec::new();
    match msg {
        Message::Request(r) => {
            body.push(TAG_REQUEST);
            body.push(r.kind.tag());
            body.push(u8::from(r.pty));
            match &r.term {
                None => body.push(0),
                Some(t) => {
                    body.push(1);
                    put_bytes16(&mut body, t.as_bytes())?;
                }
            }
            put_bytes32(&mut body, &r.command)?;
        }
        Message::WindowChanged => body.push(TAG_WINDOW_CHANGED),
        Message::Hangup => body.push(TAG_HANGUP),
        Message::Exit { status } => {
            body.push(TAG_EXIT);
            body.push(*status);
        }
        Message::Failed { code, message } => {
            body.push(TAG_FAILED);
            body.push(*code);
            put_bytes16(&mut body, message.as_bytes())?;
        }
    }
    if body.len() > MAX_FRAME {
        return Err(SessionError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| SessionError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) -> Result<(), SessionError> {
    let n = u16::try_from(b.len()).map_err(|_| SessionError::TooLarge(b.len()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) -> Result<(), SessionError> {
    if b.len() > MAX_FRAME {
        return Err(SessionError::TooLarge(b.len()));
    }
    let n = u32::try_from(b.len()).map_err(|_| SessionError::TooLarge(b.len()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// Decode one frame from the front of `buf`. `Ok(None)`: not enough bytes yet;
/// `Ok(Some((msg, used)))`: a message and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, SessionError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let mut len4 = [0u8; 4];
    len4.copy_from_slice(len_bytes);
    let len = u32::from_be_bytes(len4) as usize;
    if len > MAX_FRAME {
        return Err(SessionError::TooLarge(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = decode_body(body)?;
    Ok(Some((msg, 4 + len)))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, SessionError> {
        let (&b, rest) = self
            .0
            .split_first()
            .ok_or(SessionError::Malformed("short body"))?;
        self.0 = rest;
        Ok(b)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], SessionError> {
        if n > self.0.len() {
            return Err(SessionError::Malformed("field longer than the frame"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn bytes16(&mut self) -> Result<&'a [u8], SessionError> {
        let hi = self.u8()? as usize;
        let lo = self.u8()? as usize;
        self.take(hi << 8 | lo)
    }
    fn bytes32(&mut self) -> Result<&'a [u8], SessionError> {
        let mut n = 0usize;
        for _ in 0..4 {
            n = n << 8 | self.u8()? as usize;
        }
        self.take(n)
    }
    fn end(&self) -> Result<(), SessionError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SessionError::Malformed("trailing bytes"))
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Message, SessionError> {
    let mut c = Cursor(body);
    let msg = match c.u8()? {
        TAG_REQUEST => {
            let kind = RequestKind::from_tag(c.u8()?)
                .ok_or(SessionError::Malformed("unknown request kind"))?;
            let pty = match c.u8()? {
                0 => false,
                1 => true,
                _ => return Err(SessionError::Malformed("bad pty flag")),
            };
            let term = match c.u8()? {
                0 => None,
                1 => Some(
                    String::from_utf8(c.bytes16()?.to_vec())
                        .map_err(|_| SessionError::Malformed("TERM is not UTF-8"))?,
                ),
                _ => return Err(SessionError::Malformed("bad TERM flag")),
            };
            let command = c.bytes32()?.to_vec();
            Message::Request(Request {
                kind,
                pty,
                term,
                command,
            })
        }
        TAG_WINDOW_CHANGED => Message::WindowChanged,
        TAG_HANGUP => Message::Hangup,
        TAG_EXIT => Message::Exit { status: c.u8()? },
        TAG_FAILED => {
            let code = c.u8()?;
            let message = String::from_utf8(c.bytes16()?.to_vec())
                .map_err(|_| SessionError::Malformed("message is not UTF-8"))?;
            Message::Failed { code, message }
        }
        _ => return Err(SessionError::Malformed("unknown message tag")),
    };
    c.end()?;
    Ok(msg)
}

/// Send one message, with `fds` attached (SCM_RIGHTS) when not empty.
pub fn send(
    stream: &UnixStream,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), SessionError> {
    let frame = encode(msg)?;
    if fds.is_empty() {
        let mut s = stream;
        s.write_all(&frame)?;
        return Ok(());
    }
    let sent = send_with_fds(stream.as_raw_fd(), &frame, fds)?;
    if sent < frame.len() {
        let mut s = stream;
        s.write_all(frame.get(sent..).unwrap_or_default())?;
    }
    Ok(())
}

/// A message and the descriptors that arrived with it.
#[derive(Debug)]
pub struct Received {
    pub message: Message,
    pub fds: Vec<OwnedFd>,
}

/// Reads frames from a stream, collecting any descriptors that arrive on the way.
pub struct FrameReader {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// At most this many descriptors are accepted per `recvmsg`; more is a protocol error.
const MAX_FDS_PER_READ: usize = 8;

impl FrameReader {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// The next message, or `Ok(None)` on a clean end of stream between frames. Descriptors
    /// received before and with the frame are handed over with it.
    pub fn recv(&mut self) -> Result<Option<Received>, SessionError> {
        loop {
            if let Some((message, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                let fds = std::mem::take(&mut self.fds);
                return Ok(Some(Received { message, fds }));
            }
            let mut chunk = [0u8; 4096];
            let n = recv_with_fds(self.stream.as_raw_fd(), &mut chunk, &mut self.fds)?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(SessionError::Truncated)
                };
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
            if self.buf.len() > MAX_FRAME + 4 + chunk.len() || self.fds.len() > MAX_FDS_PER_READ {
                return Err(SessionError::Malformed("peer floods the connection"));
            }
        }
    }

    /// The underlying stream (to poll it, or to write on a clone).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

/// `sendmsg` with one SCM_RIGHTS control message. Returns the number of bytes sent.
fn send_with_fds(sock: RawFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let fd_bytes_u32 = u32::try_from(fd_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes_u32) } as usize;
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "empty" value; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` zeroed, aligned bytes, enough for one header with
    // `fd_bytes` of data (CMSG_SPACE); CMSG_FIRSTHDR therefore returns a valid pointer into it,
    // and CMSG_DATA points inside the same buffer with room for `fd_bytes`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for SCM_RIGHTS"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes_u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    loop {
        // SAFETY: msg points to a live iovec over `data` and a live control buffer; the
        // kernel only reads them during the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `recvmsg` that appends any SCM_RIGHTS descriptors (close-on-exec) to `fds`.
fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let max_bytes = (MAX_FDS_PER_READ * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(max_bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points to a live iovec over `buf` and a live control buffer of
        // `space` bytes; the kernel writes at most those lengths.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: after a successful recvmsg, the CMSG_* macros walk the control buffer the
    // kernel filled, bounded by msg_controllen; each SCM_RIGHTS payload holds whole `int`s,
    // which are fresh descriptors now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let payload = ((*cmsg).cmsg_len as usize).saturating_sub(header);
                let count = payload / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one message",
        ));
    }
    Ok(n)
}

/// The kernel's view of a Unix socket peer (`SO_PEERCRED`), taken when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and sized for SO_PEERCRED's ucred result.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;

    fn samples() -> Vec<Message> {
        vec![
            Message::Request(Request {
                kind: RequestKind::Exec,
                pty: false,
                term: None,
                command: b"echo hi; id `x` $(y)\n\xff".to_vec(),
            }),
            Message::Request(Request {
                kind: RequestKind::Shell,
                pty: true,
                term: Some("xterm-256color".into()),
                command: Vec::new(),
            }),
            Message::Request(Request {
                kind: RequestKind::Subsystem,
                pty: false,
                term: None,
                command: b"sftp".to_vec(),
            }),
            Message::WindowChanged,
            Message::Hangup,
            Message::Exit { status: 7 },
            Failure::KmsUnavailable.to_message(),
        ]
    }

    #[test]
    fn round_trip() {
        for m in samples() {
            let frame = encode(&m).unwrap();
            let (back, used) = decode(&frame).unwrap().unwrap();
            assert_eq!(back, m);
            assert_eq!(used, frame.len());
            // Every strict prefix is "need more".
            for cut in 0..frame.len() {
                assert!(decode(&frame[..cut]).unwrap().is_none(), "{m:?} cut {cut}");
            }
        }
    }

    #[test]
    fn refuses_oversized_and_garbage() {
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.push(TAG_HANGUP);
        assert!(matches!(decode(&huge), Err(SessionError::TooLarge(_))));
        assert!(matches!(
            decode(&[0, 0, 0, 1, 99]),
            Err(SessionError::Malformed("unknown message tag"))
        ));
        assert!(matches!(
            decode(&[0, 0, 0, 2, TAG_HANGUP, 0]),
            Err(SessionError::Malformed("trailing bytes"))
        ));
        // A request whose command length points past the frame.
        assert!(matches!(
            decode(&[0, 0, 0, 8, TAG_REQUEST, 1, 0, 0, 0, 0, 0, 9]),
            Err(SessionError::Malformed(_))
        ));
        let big = Message::Request(Request {
            kind: RequestKind::Exec,
            pty: false,
            term: None,
            command: vec![b'a'; MAX_FRAME + 1],
        });
        assert!(matches!(encode(&big), Err(SessionError::TooLarge(_))));
    }

    #[test]
    fn failure_table() {
        let a = || "root".to_owned();
        let h = || "web-01".to_owned();
        let cases: Vec<(Failure, &str, u8)> = vec![
            (
                Failure::SecretGone { account: a(), host: h(), secret: "acs/ecs/web-01/root".into() },
                "root@web-01: its secret acs/ecs/web-01/root no longer exists in KMS; ask your secret administrator",
                66,
            ),
            (Failure::KmsUnavailable, "KMS unavailable, try again", 69),
            (
                Failure::Misconfigured { code: "Forbidden.NoPermission".into() },
                "bastion misconfigured (KMS: Forbidden.NoPermission)",
                78,
            ),
            (
                Failure::SecretUnusable { account: a(), host: h() },
                "secret for root@web-01 is unusable",
                65,
            ),
            (Failure::HostKeyChanged { host: h() }, "host key of web-01 changed; refusing", 76),
            (Failure::CredentialRejected { host: h() }, "web-01 rejected the credential", 77),
        ];
        for (f, msg, code) in cases {
            assert_eq!(f.message(), msg);
            assert_eq!(f.exit_code(), code);
            assert_eq!(
                f.to_message(),
                Message::Failed {
                    code,
                    message: msg.into()
                }
            );
        }
        // All codes are >= 64 and distinct.
        let all = [
            Failure::SecretGone {
                account: a(),
                host: h(),
                secret: a(),
            },
            Failure::KmsUnavailable,
            Failure::Misconfigured { code: a() },
            Failure::SecretUnusable {
                account: a(),
                host: h(),
            },
            Failure::HostKeyChanged { host: h() },
            Failure::CredentialRejected { host: h() },
            Failure::Unreachable {
                host: h(),
                reason: a(),
            },
            Failure::Refused,
            Failure::Internal,
        ];
        let mut codes: Vec<u8> = all.iter().map(Failure::exit_code).collect();
        assert!(codes.iter().all(|&c| c >= 64));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    #[test]
    fn passes_descriptors_over_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"through the socket").unwrap();
        let req = samples().remove(0);
        send(&a, &req, &[file.as_fd(), file.as_fd(), file.as_fd()]).unwrap();
        send(&a, &Message::WindowChanged, &[]).unwrap();
        drop(a);
        let mut reader = FrameReader::new(b);
        let got = reader.recv().unwrap().unwrap();
        assert_eq!(got.message, req);
        assert_eq!(got.fds.len(), 3);
        let mut f = std::fs::File::from(got.fds.into_iter().next().unwrap());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the socket");
        let next = reader.recv().unwrap().unwrap();
        assert_eq!(next.message, Message::WindowChanged);
        assert!(next.fds.is_empty());
        assert!(reader.recv().unwrap().is_none());
    }

    #[test]
    fn peer_cred_of_a_socketpair_is_ourselves() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(a.as_fd()).unwrap();
        assert_eq!(c.pid, std::process::id() as i32);
        // SAFETY: getuid has no preconditions.
        assert_eq!(c.uid, unsafe { libc::getuid() });
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_with_plausible_length(
            tag in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
            frame.push(tag);
            frame.extend_from_slice(&body);
            let _ = decode(&frame);
        }

        #[test]
        fn requests_round_trip(
            kind in 0u8..3, pty: bool, term in proptest::option::of("[ -~]{0,40}"),
            command in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            let m = Message::Request(Request {
                kind: RequestKind::from_tag(kind).unwrap(), pty, term, command,
            });
            let frame = encode(&m).unwrap();
            prop_assert_eq!(decode(&frame).unwrap().unwrap().0, m);
        }
    }
}
