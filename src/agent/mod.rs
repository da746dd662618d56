//! An in-memory, sign-only SSH agent holding exactly one key: the target account's private
//! key from KMS, served to the broker's own onward `ssh` and to nothing else.
//!
//! It answers `REQUEST_IDENTITIES` with its one key and `SIGN_REQUEST` for that key only
//! (RSA with rsa-sha2-256/512 — never SHA-1 —, Ed25519, ECDSA P-256/P-384). Every other
//! request (add/remove identities, lock, extensions, …) gets `SSH_AGENT_FAILURE`. Frames
//! over [`proto::MAX_FRAME`] end the connection.
//!
//! [`AgentStats`] counts sign requests: OpenSSH asks the agent to sign only after the server
//! answered `PK_OK` for the key, so `signatures_made > 0` means the target accepted the key
//! (and `sign_requests == 0` after a failed login means it refused it).
//!
//! ```no_run
//! # use std::os::unix::net::UnixListener;
//! # use std::sync::atomic::AtomicBool;
//! # fn run(key: kmsbastion::secret::PrivateKey, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
//! use kmsbastion::agent;
//! let listener = UnixListener::bind(path)?; // in a directory only the broker can reach
//! let stop = AtomicBool::new(false);         // set it if ssh dies before connecting
//! let me = std::process::id() as libc::pid_t;
//! // Serves the first connection from one of our children until it closes (ssh closes it
//! // right after user authentication), then returns and drops the key.
//! let stats = agent::serve_listener(&listener, key, |pid| agent::parent_pid(pid).ok() == Some(me), &stop)?;
//! # Ok(()) }
//! ```
// The only unsafe code (two system calls) lives in `peer`, which allows it explicitly.
#![deny(unsafe_code)]

pub mod peer;
pub mod proto;
mod sign;

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use peer::{parent_pid, peer_pid};
use proto::{Identity, ProtoError, Request, Response};

use crate::secret::PrivateKey;

/// The comment shown for the key by `ssh-add -l` when none is given.
pub const DEFAULT_COMMENT: &str = "kmsbastion";

/// How often [`serve_listener`] looks at its `stop` flag while waiting.
const STOP_POLL: Duration = Duration::from_millis(100);

/// How long [`serve_listener`] waits for the rest of a frame once one has started, and for
/// a reply to be written, before it gives up on the peer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on an agent connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// `SIGN_REQUEST` messages received (for any key, well-formed or not).
    pub sign_requests: u32,
    /// Signatures made with our key.
    pub signatures_made: u32,
}

/// An agent connection that ended with an error. `stats` holds what happened before it, so a
/// signature already made still counts.
#[derive(Debug)]
pub struct AgentError {
    /// What went wrong.
    pub source: ProtoError,
    /// Counts up to the error.
    pub stats: AgentStats,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in-memory ssh agent: {}", self.source)
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A sign-only agent holding one key.
pub struct Agent {
    key: PrivateKey,
    comment: String,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("key", &self.key)
            .field("comment", &self.comment)
            .finish()
    }
}

impl Agent {
    /// An agent serving `key` with the comment [`DEFAULT_COMMENT`].
    pub fn new(key: PrivateKey) -> Agent {
        Agent::with_comment(key, DEFAULT_COMMENT)
    }

    /// An agent serving `key` under `comment` (shown by `ssh-add -l`; not secret).
    pub fn with_comment(key: PrivateKey, comment: impl Into<String>) -> Agent {
        Agent {
            key,
            comment: comment.into(),
        }
    }

    /// The key this agent serves.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The answer to one request.
    pub fn handle(&self, request: &Request) -> Response {
        match request {
            Request::RequestIdentities => Response::Identities(vec![Identity {
                key_blob: self.key.public_key_blob().to_vec(),
                comment: self.comment.clone(),
            }]),
            Request::Sign(sign) if sign.key_blob == self.key.public_key_blob() => {
                match sign::sign(&self.key, &sign.data, sign.flags) {
                    Ok(signature) => Response::SignResponse(signature),
                    Err(_) => Response::Failure,
                }
            }
            Request::Sign(_) | Request::Unsupported { .. } => Response::Failure,
        }
    }

    /// Serves requests on `stream` until the peer closes it. Blocks; returns what happened.
    pub fn serve(&self, mut stream: UnixStream) -> Result<AgentStats, AgentError> {
        let mut stats = AgentStats::default();
        self.serve_frames(&mut stream, &mut stats, || Ok(true))
            .map_err(|source| AgentError { source, stats })?;
        Ok(stats)
    }

    /// The request loop. `ready` runs before each frame; `Ok(false)` ends the loop early.
    fn serve_frames<S: Read + Write>(
        &self,
        stream: &mut S,
        stats: &mut AgentStats,
        mut ready: impl FnMut() -> Result<bool, ProtoError>,
    ) -> Result<(), ProtoError> {
        while ready()? {
            let Some(body) = proto::read_frame(stream)? else {
                return Ok(());
            };
            let response = match Request::decode(&body) {
                Ok(request) => self.handle(&request),
                // The frame boundary is intact, so the stream is still in step: refuse this
                // message and carry on, as OpenSSH's agent does.
                Err(_) => Response::Failure,
            };
            if body.first() == Some(&proto::msg::SIGN_REQUEST) {
                stats.sign_requests = stats.sign_requests.saturating_add(1);
            }
            if matches!(response, Response::SignResponse(_)) {
                stats.signatures_made = stats.signatures_made.saturating_add(1);
            }
            proto::write_frame(stream, &response.encode())?;
        }
        Ok(())
    }
}

/// Serves `key` on `listener` to one approved peer, then returns (dropping, and so wiping,
/// the key).
///
/// Each incoming connection's peer process id (`SO_PEERCRED`) goes to `accept_peer`; a
/// connection it rejects is closed unanswered and the wait goes on. The first accepted
/// connection is served until the peer closes it — OpenSSH's `ssh` opens one agent
/// connection and closes it as soon as user authentication is over — and its stats are
/// returned. Setting `stop` ends the wait (or the connection) within about 100 ms and
/// returns the stats so far, which is how a caller whose `ssh` died before connecting gets
/// its thread back. A peer that stops in the middle of a frame or does not read its answer
/// is dropped after 10 s.
///
/// Errors: the listener failing (not a peer misbehaving before it was accepted), or the
/// accepted connection failing (the error carries the stats up to then).
pub fn serve_listener(
    listener: &UnixListener,
    key: PrivateKey,
    accept_peer: impl Fn(libc::pid_t) -> bool,
    stop: &AtomicBool,
) -> Result<AgentStats, AgentError> {
    let agent = Agent::new(key);
    let fail = |source: std::io::Error| AgentError {
        source: ProtoError::Io(source),
        stats: AgentStats::default(),
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(AgentStats::default());
        }
        if !peer::wait_readable(listener, STOP_POLL).map_err(fail)? {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => return Err(fail(e)),
        };
        match peer_pid(&stream) {
            Ok(pid) if accept_peer(pid) => {}
            // Unknown or unwelcome peer: close without a word.
            _ => continue,
        }
        return serve_until_stopped(&agent, stream, stop);
    }
}

fn serve_until_stopped(
    agent: &Agent,
    mut stream: UnixStream,
    stop: &AtomicBool,
) -> Result<AgentStats, AgentError> {
    let mut stats = AgentStats::default();
    let setup = stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = setup {
        return Err(AgentError {
            source: ProtoError::Io(e),
            stats,
        });
    }
    let watch = stream.try_clone();
    let result = match watch {
        Ok(watch) => agent.serve_frames(&mut stream, &mut stats, || loop {
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            if peer::wait_readable(&watch, STOP_POLL)? {
                return Ok(true);
            }
        }),
        Err(e) => Err(ProtoError::Io(e)),
    };
    result
        .map(|()| stats)
        .map_err(|source| AgentError { source, stats })
}

#[cfg(test)]
mod tests;
