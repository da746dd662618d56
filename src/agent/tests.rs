//! The agent's answers, its signatures checked with the crypto crates' own verifiers, and
//! the connection loop over real Unix sockets.

use std::io::Write as _;
use std::sync::atomic::AtomicBool;
use std::thread;

use rsa::Pkcs1v15Sign;
use sha2::{Digest as _, Sha256, Sha512};

use super::proto::{
    msg, read_frame, write_frame, SignRequest, MAX_FRAME, SSH_AGENT_RSA_SHA2_256,
    SSH_AGENT_RSA_SHA2_512,
};
use super::*;
use crate::secret::KeyMaterial;

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/secrets/",
            $name
        ))
    };
}

fn key(text: &str) -> PrivateKey {
    PrivateKey::from_text(text).unwrap()
}

fn rsa_key() -> PrivateKey {
    key(fixture!("rsa2048_pkcs1"))
}

fn sign_request(agent: &Agent, data: &[u8], flags: u32) -> Request {
    Request::Sign(SignRequest {
        key_blob: agent.key().public_key_blob().to_vec(),
        data: data.to_vec(),
        flags,
    })
}

/// Splits an SSH signature blob into its algorithm name and signature bytes.
fn split_blob(blob: &[u8]) -> (String, Vec<u8>) {
    let mut rest = blob;
    let mut string = || {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let value = rest[4..4 + len].to_vec();
        rest = &rest[4 + len..];
        value
    };
    let name = String::from_utf8(string()).unwrap();
    let sig = string();
    assert!(rest.is_empty());
    (name, sig)
}

/// The fixed-width scalar of an SSH mpint (strip the sign byte, left-pad to `width`).
fn ecdsa_scalars(sig: &[u8], width: usize) -> (Vec<u8>, Vec<u8>) {
    let mut rest = sig;
    let mut mpint = || {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let digits = &rest[4..4 + len];
        assert!(len == 0 || digits[0] != 0 || digits.get(1).is_some_and(|b| b & 0x80 != 0));
        let digits: Vec<u8> = digits.iter().copied().skip_while(|&b| b == 0).collect();
        rest = &rest[4 + len..];
        let mut out = vec![0; width - digits.len()];
        out.extend(digits);
        out
    };
    let r = mpint();
    let s = mpint();
    assert!(rest.is_empty());
    (r, s)
}

fn signature(response: Response) -> Vec<u8> {
    match response {
        Response::SignResponse(blob) => blob,
        other => panic!("expected a signature, got {other:?}"),
    }
}

#[test]
fn lists_its_one_identity() {
    let agent = Agent::with_comment(rsa_key(), "root@web-01");
    assert_eq!(
        agent.handle(&Request::RequestIdentities),
        Response::Identities(vec![Identity {
            key_blob: agent.key().public_key_blob().to_vec(),
            comment: "root@web-01".into(),
        }])
    );
    assert_eq!(Agent::new(rsa_key()).comment, DEFAULT_COMMENT);
}

#[test]
fn rsa_signs_with_sha2_256_and_512_and_refuses_sha1() {
    let agent = Agent::new(rsa_key());
    let KeyMaterial::Rsa(private) = agent.key().material() else {
        panic!("not RSA");
    };
    let public = private.to_public_key();
    let data = b"session id and userauth request";
    for (flags, name) in [
        (SSH_AGENT_RSA_SHA2_256, "rsa-sha2-256"),
        (SSH_AGENT_RSA_SHA2_512, "rsa-sha2-512"),
        (
            SSH_AGENT_RSA_SHA2_256 | SSH_AGENT_RSA_SHA2_512,
            "rsa-sha2-256",
        ),
    ] {
        let (got_name, sig) =
            split_blob(&signature(agent.handle(&sign_request(&agent, data, flags))));
        assert_eq!(got_name, name);
        assert_eq!(sig.len(), 256);
        let ok = if name == "rsa-sha2-256" {
            public.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(data), &sig)
        } else {
            public.verify(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(data), &sig)
        };
        assert!(ok.is_ok(), "{name} signature does not verify");
    }
    // No SHA-2 flag means ssh-rsa with SHA-1: refused. Unrelated bits change nothing.
    assert_eq!(
        agent.handle(&sign_request(&agent, data, 0)),
        Response::Failure
    );
    assert_eq!(
        agent.handle(&sign_request(&agent, data, 1 | 8)),
        Response::Failure
    );
}

#[test]
fn ed25519_signs() {
    let agent = Agent::new(key(fixture!("ed25519_openssh")));
    let KeyMaterial::Ed25519(signing) = agent.key().material() else {
        panic!("not Ed25519");
    };
    let data = b"payload";
    // Flags are RSA-only; any value signs.
    for flags in [0, SSH_AGENT_RSA_SHA2_512] {
        let (name, sig) = split_blob(&signature(agent.handle(&sign_request(&agent, data, flags))));
        assert_eq!(name, "ssh-ed25519");
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        signing.verifying_key().verify_strict(data, &sig).unwrap();
    }
}

#[test]
fn ecdsa_p256_signs_with_sha256() {
    use p256::ecdsa::signature::Verifier as _;
    let agent = Agent::new(key(fixture!("p256_openssh")));
    let KeyMaterial::EcdsaP256(signing) = agent.key().material() else {
        panic!("not P-256");
    };
    let data = b"payload";
    let (name, sig) = split_blob(&signature(agent.handle(&sign_request(&agent, data, 0))));
    assert_eq!(name, "ecdsa-sha2-nistp256");
    let (r, s) = ecdsa_scalars(&sig, 32);
    let sig = p256::ecdsa::Signature::from_scalars(
        *p256::FieldBytes::from_slice(&r),
        *p256::FieldBytes::from_slice(&s),
    )
    .unwrap();
    signing.verifying_key().verify(data, &sig).unwrap();
}

#[test]
fn ecdsa_p384_signs_with_sha384() {
    use p384::ecdsa::signature::Verifier as _;
    let agent = Agent::new(key(fixture!("p384_pkcs8")));
    let KeyMaterial::EcdsaP384(signing) = agent.key().material() else {
        panic!("not P-384");
    };
    let data = b"payload";
    let (name, sig) = split_blob(&signature(agent.handle(&sign_request(&agent, data, 0))));
    assert_eq!(name, "ecdsa-sha2-nistp384");
    let (r, s) = ecdsa_scalars(&sig, 48);
    let sig = p384::ecdsa::Signature::from_scalars(
        *p384::FieldBytes::from_slice(&r),
        *p384::FieldBytes::from_slice(&s),
    )
    .unwrap();
    signing.verifying_key().verify(data, &sig).unwrap();
}

#[test]
fn refuses_other_keys_and_every_other_request() {
    let agent = Agent::new(key(fixture!("ed25519_openssh")));
    let other = key(fixture!("ed25519_pkcs8"));
    assert_eq!(
        agent.handle(&Request::Sign(SignRequest {
            key_blob: other.public_key_blob().to_vec(),
            data: b"x".to_vec(),
            flags: 0,
        })),
        Response::Failure
    );
    for kind in [
        msg::ADD_IDENTITY,
        msg::REMOVE_IDENTITY,
        msg::REMOVE_ALL_IDENTITIES,
        msg::LOCK,
        msg::UNLOCK,
        msg::EXTENSION,
        20,
        25,
        26,
        0,
        255,
    ] {
        assert_eq!(
            agent.handle(&Request::Unsupported { kind }),
            Response::Failure,
            "{kind}"
        );
    }
}

/// Sends one frame body and reads the answer.
fn exchange(stream: &mut UnixStream, body: &[u8]) -> Response {
    write_frame(stream, body).unwrap();
    Response::decode(&read_frame(stream).unwrap().unwrap()).unwrap()
}

#[test]
fn serve_answers_until_eof_and_counts_signatures() {
    let agent = Agent::new(rsa_key());
    let blob = agent.key().public_key_blob().to_vec();
    let (server, mut client) = UnixStream::pair().unwrap();
    let result = thread::scope(|scope| {
        let serving = scope.spawn(|| agent.serve(server));
        assert!(matches!(
            exchange(&mut client, &Request::RequestIdentities.encode()),
            Response::Identities(ids) if ids.len() == 1 && ids[0].key_blob == blob
        ));
        let good = Request::Sign(SignRequest {
            key_blob: blob.clone(),
            data: b"d".to_vec(),
            flags: SSH_AGENT_RSA_SHA2_256,
        });
        assert!(matches!(
            exchange(&mut client, &good.encode()),
            Response::SignResponse(_)
        ));
        let sha1 = Request::Sign(SignRequest {
            key_blob: blob.clone(),
            data: b"d".to_vec(),
            flags: 0,
        });
        assert_eq!(exchange(&mut client, &sha1.encode()), Response::Failure);
        // A garbled sign request inside an intact frame: failure, and the stream goes on.
        assert_eq!(
            exchange(&mut client, &[msg::SIGN_REQUEST, 0, 0]),
            Response::Failure
        );
        assert_eq!(
            exchange(&mut client, &[msg::LOCK, 0, 0, 0, 1, b'p']),
            Response::Failure
        );
        drop(client);
        serving.join().unwrap()
    });
    assert_eq!(
        result.unwrap(),
        AgentStats {
            sign_requests: 3,
            signatures_made: 1
        }
    );
}

#[test]
fn serve_closes_on_oversized_and_truncated_frames() {
    let agent = Agent::new(key(fixture!("ed25519_openssh")));
    for wire in [
        u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes().to_vec(),
        vec![0, 0, 0, 0],
        vec![0, 0, 0, 9, msg::REQUEST_IDENTITIES],
        vec![0, 0],
    ] {
        let (server, mut client) = UnixStream::pair().unwrap();
        client.write_all(&wire).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let err = agent.serve(server).unwrap_err();
        assert!(
            matches!(
                err.source,
                ProtoError::FrameTooLarge { .. }
                    | ProtoError::EmptyFrame
                    | ProtoError::TruncatedFrame
            ),
            "{err}"
        );
        assert_eq!(err.stats, AgentStats::default());
        // Nothing was answered.
        assert!(read_frame(&mut client).unwrap().is_none());
    }
}

#[test]
fn serve_listener_serves_an_accepted_peer_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let me = libc::pid_t::try_from(std::process::id()).unwrap();
    let stop = AtomicBool::new(false);
    let key = rsa_key();
    let blob = key.public_key_blob().to_vec();
    let stats = thread::scope(|scope| {
        let serving = scope.spawn(|| serve_listener(&listener, key, |pid| pid == me, &stop));
        let mut client = UnixStream::connect(&path).unwrap();
        let request = Request::Sign(SignRequest {
            key_blob: blob,
            data: b"d".to_vec(),
            flags: SSH_AGENT_RSA_SHA2_512,
        });
        assert!(matches!(
            exchange(&mut client, &request.encode()),
            Response::SignResponse(_)
        ));
        drop(client);
        serving.join().unwrap()
    });
    assert_eq!(
        stats.unwrap(),
        AgentStats {
            sign_requests: 1,
            signatures_made: 1
        }
    );
}

#[test]
fn serve_listener_closes_rejected_peers_and_honours_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stop = AtomicBool::new(false);
    let stats = thread::scope(|scope| {
        let serving = scope.spawn(|| serve_listener(&listener, rsa_key(), |_| false, &stop));
        let mut client = UnixStream::connect(&path).unwrap();
        write_frame(&mut client, &Request::RequestIdentities.encode()).unwrap();
        // Closed without an answer.
        assert!(matches!(read_frame(&mut client), Ok(None) | Err(_)));
        stop.store(true, Ordering::Release);
        serving.join().unwrap()
    });
    assert_eq!(stats.unwrap(), AgentStats::default());
}

#[test]
fn stop_ends_an_idle_accepted_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let stats = thread::scope(|scope| {
        let serving = scope.spawn(|| serve_listener(&listener, rsa_key(), |_| true, &stop));
        let mut client = UnixStream::connect(&path).unwrap();
        assert!(matches!(
            exchange(&mut client, &Request::RequestIdentities.encode()),
            Response::Identities(_)
        ));
        stop.store(true, Ordering::Release);
        let stats = serving.join().unwrap();
        drop(client);
        stats
    });
    assert_eq!(stats.unwrap(), AgentStats::default());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn debug_redacts_the_key() {
    let agent = Agent::new(rsa_key());
    let debug = format!("{agent:?}");
    assert!(debug.contains("[redacted]"));
    assert!(debug.contains("SHA256:"));
    assert!(!debug.contains(fixture!("rsa2048_pkcs1").lines().nth(3).unwrap()));
}

/// An in-memory connection: reads from a fixed byte string, records what is written.
struct Duplex<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl std::io::Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

proptest::proptest! {
    /// Whatever a peer sends, the request loop ends without panicking, and everything it
    /// wrote is a sequence of well-formed responses, one per complete request frame.
    #[test]
    fn serve_loop_survives_any_byte_stream(
        noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        prefix_valid in proptest::prelude::any::<bool>(),
    ) {
        let agent = Agent::new(key(fixture!("ed25519_openssh")));
        let mut input = Vec::new();
        if prefix_valid {
            write_frame(&mut input, &Request::RequestIdentities.encode()).unwrap();
            write_frame(&mut input, &sign_request(&agent, &noise, 0).encode()).unwrap();
        }
        input.extend_from_slice(&noise);
        let mut duplex = Duplex { input: &input, output: Vec::new() };
        let mut stats = AgentStats::default();
        let _ = agent.serve_frames(&mut duplex, &mut stats, || Ok(true));
        let mut answers = duplex.output.as_slice();
        let mut count = 0u32;
        while let Some(body) = read_frame(&mut answers).unwrap() {
            Response::decode(&body).unwrap();
            count += 1;
        }
        proptest::prop_assert!(stats.signatures_made <= stats.sign_requests);
        proptest::prop_assert!(stats.sign_requests <= count);
        if prefix_valid {
            proptest::prop_assert!(count >= 2);
            proptest::prop_assert!(stats.signatures_made >= 1);
        }
    }
}
