//! The SSH agent protocol (draft-miller-ssh-agent) as plain typed messages.
//!
//! A frame is a u32 big-endian length followed by that many bytes, the first of which is the
//! message type. Frames over [`MAX_FRAME`] are refused before anything is allocated for
//! them. Decoding is total: any byte string gives a message or a [`ProtoError`], never a
//! panic (there is a proptest and a cargo-fuzz target on it).
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};

use zeroize::Zeroizing;

/// The largest frame we read or write (OpenSSH's own agent uses 256 KiB too).
pub const MAX_FRAME: usize = 256 * 1024;

/// Message numbers we use (draft-miller-ssh-agent, section 6.1).
pub mod msg {
    /// Generic failure.
    pub const FAILURE: u8 = 5;
    /// Generic success.
    pub const SUCCESS: u8 = 6;
    /// Client: list identities.
    pub const REQUEST_IDENTITIES: u8 = 11;
    /// Agent: the identities.
    pub const IDENTITIES_ANSWER: u8 = 12;
    /// Client: sign data with a key.
    pub const SIGN_REQUEST: u8 = 13;
    /// Agent: the signature.
    pub const SIGN_RESPONSE: u8 = 14;
    /// Client: add a key (refused by us).
    pub const ADD_IDENTITY: u8 = 17;
    /// Client: remove a key (refused by us).
    pub const REMOVE_IDENTITY: u8 = 18;
    /// Client: remove all keys (refused by us).
    pub const REMOVE_ALL_IDENTITIES: u8 = 19;
    /// Client: lock the agent (refused by us).
    pub const LOCK: u8 = 22;
    /// Client: unlock the agent (refused by us).
    pub const UNLOCK: u8 = 23;
    /// Client: protocol extension (refused by us).
    pub const EXTENSION: u8 = 27;
}

/// Sign-request flag: sign an RSA key with rsa-sha2-256.
pub const SSH_AGENT_RSA_SHA2_256: u32 = 2;
/// Sign-request flag: sign an RSA key with rsa-sha2-512.
pub const SSH_AGENT_RSA_SHA2_512: u32 = 4;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `SSH_AGENTC_REQUEST_IDENTITIES`.
    RequestIdentities,
    /// `SSH_AGENTC_SIGN_REQUEST`.
    Sign(SignRequest),
    /// Any other message. Its body is not kept: it may hold a key being added or a lock
    /// passphrase, and we answer all of them with failure anyway.
    Unsupported {
        /// The message type byte.
        kind: u8,
    },
}

/// `SSH_AGENTC_SIGN_REQUEST`: key blob, data to sign, flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    /// The public key blob of the key to sign with.
    pub key_blob: Vec<u8>,
    /// The data to sign (for SSH user authentication, the session id and request).
    pub data: Vec<u8>,
    /// `SSH_AGENT_RSA_SHA2_*` bits.
    pub flags: u32,
}

/// One identity in an `SSH_AGENT_IDENTITIES_ANSWER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The public key blob.
    pub key_blob: Vec<u8>,
    /// Its comment (shown by `ssh-add -l`).
    pub comment: String,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `SSH_AGENT_FAILURE`.
    Failure,
    /// `SSH_AGENT_SUCCESS`.
    Success,
    /// `SSH_AGENT_IDENTITIES_ANSWER`.
    Identities(Vec<Identity>),
    /// `SSH_AGENT_SIGN_RESPONSE` with the signature blob (`string alg, string sig`).
    SignResponse(Vec<u8>),
}

/// A frame or message that cannot be read.
#[derive(Debug)]
pub enum ProtoError {
    /// A frame of length zero (no message type).
    EmptyFrame,
    /// A frame longer than [`MAX_FRAME`].
    FrameTooLarge {
        /// The announced length.
        len: u64,
    },
    /// The peer closed the stream in the middle of a frame.
    TruncatedFrame,
    /// A field runs past the end of its message.
    Truncated,
    /// Bytes left over after the last field.
    TrailingBytes,
    /// A text field is not UTF-8.
    NotUtf8,
    /// A response type we do not know.
    UnknownResponse(u8),
    /// Reading or writing the stream failed.
    Io(io::Error),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::EmptyFrame => f.write_str("agent frame of length zero"),
            ProtoError::FrameTooLarge { len } => {
                write!(
                    f,
                    "agent frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"
                )
            }
            ProtoError::TruncatedFrame => f.write_str("agent peer closed the stream mid-frame"),
            ProtoError::Truncated => f.write_str("agent message is truncated"),
            ProtoError::TrailingBytes => f.write_str("agent message has trailing bytes"),
            ProtoError::NotUtf8 => f.write_str("agent message text is not UTF-8"),
            ProtoError::UnknownResponse(kind) => write!(f, "unknown agent response type {kind}"),
            ProtoError::Io(e) => write!(f, "agent socket I/O failed: {e}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

/// Reads SSH wire types from one message body.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, ProtoError> {
        let (&b, rest) = self.rest.split_first().ok_or(ProtoError::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        if self.rest.len() < 4 {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.rest.split_at(4);
        self.rest = rest;
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(head);
        Ok(u32::from_be_bytes(bytes))
    }

    fn string(&mut self) -> Result<&'a [u8], ProtoError> {
        let len = usize::try_from(self.u32()?).map_err(|_| ProtoError::Truncated)?;
        if self.rest.len() < len {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    fn end(&self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes)
        }
    }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every field lives inside a frame of at most MAX_FRAME bytes, far below u32::MAX.
    put_u32(out, u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(bytes);
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    put_u32(out, u32::try_from(len).unwrap_or(u32::MAX));
}

impl Request {
    /// Decodes one message body (a frame without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Request, ProtoError> {
        let mut c = Cursor { rest: body };
        let kind = c.u8().map_err(|_| ProtoError::EmptyFrame)?;
        let request = match kind {
            msg::REQUEST_IDENTITIES => Request::RequestIdentities,
            msg::SIGN_REQUEST => Request::Sign(SignRequest {
                key_blob: c.string()?.to_vec(),
                data: c.string()?.to_vec(),
                flags: c.u32()?,
            }),
            kind => return Ok(Request::Unsupported { kind }),
        };
        c.end()?;
        Ok(request)
    }

    /// Encodes the message body. `Unsupported` encodes as its bare type byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Request::RequestIdentities => out.push(msg::REQUEST_IDENTITIES),
            Request::Sign(sign) => {
                out.push(msg::SIGN_REQUEST);
                put_string(&mut out, &sign.key_blob);
                put_string(&mut out, &sign.data);
                put_u32(&mut out, sign.flags);
            }
            Request::Unsupported { kind } => out.push(*kind),
        }
        out
    }
}

impl Response {
    /// Decodes one message body (used by tests and clients of the agent).
    pub fn decode(body: &[u8]) -> Result<Response, ProtoError> {
        let mut c = Cursor { rest: body };
        let kind = c.u8().map_err(|_| ProtoError::EmptyFrame)?;
        let response = match kind {
            msg::FAILURE => Response::Failure,
            msg::SUCCESS => Response::Success,
            msg::IDENTITIES_ANSWER => {
                let count = c.u32()?;
                let mut identities = Vec::new();
                for _ in 0..count {
                    // Each identity takes at least 8 bytes, so a huge count runs out of input
                    // long before it could exhaust memory.
                    let key_blob = c.string()?.to_vec();
                    let comment = std::str::from_utf8(c.string()?)
                        .map_err(|_| ProtoError::NotUtf8)?
                        .to_owned();
                    identities.push(Identity { key_blob, comment });
                }
                Response::Identities(identities)
            }
            msg::SIGN_RESPONSE => Response::SignResponse(c.string()?.to_vec()),
            other => return Err(ProtoError::UnknownResponse(other)),
        };
        c.end()?;
        Ok(response)
    }

    /// Encodes the message body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Response::Failure => out.push(msg::FAILURE),
            Response::Success => out.push(msg::SUCCESS),
            Response::Identities(identities) => {
                out.push(msg::IDENTITIES_ANSWER);
                put_len(&mut out, identities.len());
                for identity in identities {
                    put_string(&mut out, &identity.key_blob);
                    put_string(&mut out, identity.comment.as_bytes());
                }
            }
            Response::SignResponse(signature) => {
                out.push(msg::SIGN_RESPONSE);
                put_string(&mut out, signature);
            }
        }
        out
    }
}

/// Reads one frame body. `Ok(None)` is a clean end of stream (EOF before a frame starts).
/// The buffer is wiped when dropped: a refused `ADD_IDENTITY` or `LOCK` carries secrets.
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, ProtoError> {
    let mut len_bytes = [0u8; 4];
    let mut got = 0;
    while got < len_bytes.len() {
        let buf = len_bytes.get_mut(got..).unwrap_or_default();
        match reader.read(buf) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::TruncatedFrame),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len_bytes);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge { len: len.into() });
    }
    if len_usize == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    let mut body = Zeroizing::new(vec![0u8; len_usize]);
    reader.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::TruncatedFrame
        } else {
            ProtoError::Io(e)
        }
    })?;
    Ok(Some(body))
}

/// Writes one frame (length prefix and body) in a single write call.
pub fn write_frame<W: Write>(writer: &mut W, body: &[u8]) -> Result<(), ProtoError> {
    if body.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len: u64::try_from(body.len()).unwrap_or(u64::MAX),
        });
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    put_len(&mut frame, body.len());
    frame.extend_from_slice(body);
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sign(key_blob: &[u8], data: &[u8], flags: u32) -> Request {
        Request::Sign(SignRequest {
            key_blob: key_blob.to_vec(),
            data: data.to_vec(),
            flags,
        })
    }

    #[test]
    fn request_round_trips() {
        for request in [
            Request::RequestIdentities,
            sign(b"blob", b"data", 0),
            sign(b"", b"", SSH_AGENT_RSA_SHA2_512),
            Request::Unsupported { kind: msg::LOCK },
        ] {
            assert_eq!(Request::decode(&request.encode()).unwrap(), request);
        }
    }

    #[test]
    fn known_request_bytes() {
        assert_eq!(Request::RequestIdentities.encode(), [11]);
        assert_eq!(
            sign(b"k", b"dd", 2).encode(),
            [13, 0, 0, 0, 1, b'k', 0, 0, 0, 2, b'd', b'd', 0, 0, 0, 2]
        );
    }

    #[test]
    fn response_round_trips() {
        for response in [
            Response::Failure,
            Response::Success,
            Response::Identities(vec![]),
            Response::Identities(vec![
                Identity {
                    key_blob: b"one".to_vec(),
                    comment: "first".into(),
                },
                Identity {
                    key_blob: vec![0; 300],
                    comment: String::new(),
                },
            ]),
            Response::SignResponse(b"sig".to_vec()),
        ] {
            assert_eq!(Response::decode(&response.encode()).unwrap(), response);
        }
    }

    #[test]
    fn unsupported_requests_keep_no_payload() {
        let mut add = vec![msg::ADD_IDENTITY];
        add.extend_from_slice(b"\0\0\0\x07ssh-rsa private parts");
        assert_eq!(
            Request::decode(&add).unwrap(),
            Request::Unsupported {
                kind: msg::ADD_IDENTITY
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(Request::decode(&[]), Err(ProtoError::EmptyFrame)));
        assert!(matches!(
            Request::decode(&[11, 0]),
            Err(ProtoError::TrailingBytes)
        ));
        let good = sign(b"blob", b"data", 4).encode();
        for cut in 1..good.len() {
            assert!(
                matches!(
                    Request::decode(good.get(..cut).unwrap()),
                    Err(ProtoError::Truncated)
                ),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Request::decode(&long),
            Err(ProtoError::TrailingBytes)
        ));
        // A string length far past the end.
        assert!(matches!(
            Request::decode(&[13, 0xff, 0xff, 0xff, 0xff, 1, 2]),
            Err(ProtoError::Truncated)
        ));
        // An identities answer announcing 4 billion identities.
        assert!(matches!(
            Response::decode(&[12, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::Truncated)
        ));
        assert!(matches!(
            Response::decode(&[12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]),
            Err(ProtoError::NotUtf8)
        ));
        assert!(matches!(
            Response::decode(&[99]),
            Err(ProtoError::UnknownResponse(99))
        ));
    }

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &[11]).unwrap();
        write_frame(&mut wire, &sign(b"k", b"d", 2).encode()).unwrap();
        assert_eq!(wire.get(..5).unwrap(), [0, 0, 0, 1, 11]);
        let mut reader = wire.as_slice();
        let first = read_frame(&mut reader).unwrap().unwrap();
        assert_eq!(Request::decode(&first).unwrap(), Request::RequestIdentities);
        let second = read_frame(&mut reader).unwrap().unwrap();
        assert_eq!(Request::decode(&second).unwrap(), sign(b"k", b"d", 2));
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn bad_frames_are_errors() {
        let oversized = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert!(matches!(
            read_frame(&mut oversized.as_slice()),
            Err(ProtoError::FrameTooLarge { len }) if len == u64::try_from(MAX_FRAME + 1).unwrap()
        ));
        assert!(matches!(
            read_frame(&mut [0xff, 0xff, 0xff, 0xff].as_slice()),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            read_frame(&mut [0, 0, 0, 0].as_slice()),
            Err(ProtoError::EmptyFrame)
        ));
        assert!(matches!(
            read_frame(&mut [0, 0].as_slice()),
            Err(ProtoError::TruncatedFrame)
        ));
        assert!(matches!(
            read_frame(&mut [0, 0, 0, 5, 11].as_slice()),
            Err(ProtoError::TruncatedFrame)
        ));
        // Exactly the limit is accepted.
        let mut at_limit = u32::try_from(MAX_FRAME).unwrap().to_be_bytes().to_vec();
        at_limit.resize(4 + MAX_FRAME, 0);
        assert_eq!(
            read_frame(&mut at_limit.as_slice()).unwrap().unwrap().len(),
            MAX_FRAME
        );
        assert!(matches!(
            write_frame(&mut Vec::new(), &vec![0; MAX_FRAME + 1]),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn frame_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut reader = bytes.as_slice();
            let mut frames = 0;
            while let Ok(Some(body)) = read_frame(&mut reader) {
                let _ = Request::decode(&body);
                frames += 1;
                prop_assert!(frames <= bytes.len());
            }
        }

        #[test]
        fn sign_requests_round_trip(
            key_blob in proptest::collection::vec(any::<u8>(), 0..64),
            data in proptest::collection::vec(any::<u8>(), 0..256),
            flags in any::<u32>(),
        ) {
            let request = Request::Sign(SignRequest { key_blob, data, flags });
            let mut wire = Vec::new();
            write_frame(&mut wire, &request.encode()).unwrap();
            let body = read_frame(&mut wire.as_slice()).unwrap().unwrap();
            prop_assert_eq!(Request::decode(&body).unwrap(), request);
        }
    }
}
