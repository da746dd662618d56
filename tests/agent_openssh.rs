//! The in-memory agent against real OpenSSH tools: keys made by `ssh-keygen`, wrapped in a
//! KMS-shaped secret, listed by `ssh-add -L`, and used by `ssh-keygen -Y sign` through
//! `SSH_AUTH_SOCK`; the signature must pass `ssh-keygen -Y verify`.
//!
//! Needs `ssh-keygen` and `ssh-add` (package openssh-client) on PATH; fails if they are not.
#![cfg(feature = "client")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use kmsbastion::agent::{self, AgentStats};
use kmsbastion::secret::{Credential, PrivateKey, TargetSecret};

/// The absolute path of an OpenSSH tool, or a loud failure.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH: install openssh-client (tests/install-deps.sh)")
        })
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn explain(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `<type> <base64>` of a public key line.
fn key_words(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A key pair made by ssh-keygen in `dir`, returned as the KMS secret value holding it
/// (the private key file is deleted so that nothing but the agent can sign).
struct TestKey {
    secret_json: Vec<u8>,
    public_line: String,
    public_path: PathBuf,
    fingerprint: String,
}

fn make_key(dir: &Path, keygen_args: &[&str]) -> TestKey {
    let private_path = dir.join("id");
    let output = run(Command::new(tool("ssh-keygen"))
        .args(keygen_args)
        .args(["-q", "-N", "", "-C", "kmsbastion-agent-test", "-f"])
        .arg(&private_path));
    assert!(output.status.success(), "ssh-keygen: {}", explain(&output));
    let private = std::fs::read_to_string(&private_path).unwrap();
    std::fs::remove_file(&private_path).unwrap();
    let public_path = dir.join("id.pub");
    let public_line = std::fs::read_to_string(&public_path).unwrap();
    let listing = run(Command::new(tool("ssh-keygen"))
        .arg("-l")
        .arg("-f")
        .arg(&public_path));
    assert!(listing.status.success(), "{}", explain(&listing));
    let fingerprint = stdout(&listing)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let secret_json = serde_json::to_vec(&serde_json::json!({
        "UserName": "root",
        "PublicKey": public_line.trim_end(),
        "PrivateKey": private,
    }))
    .unwrap();
    TestKey {
        secret_json,
        public_line,
        public_path,
        fingerprint,
    }
}

impl TestKey {
    /// The key as the broker gets it: parsed from the secret value.
    fn private_key(&self) -> PrivateKey {
        let secret = TargetSecret::parse(&self.secret_json).unwrap();
        assert_eq!(
            secret.fingerprint().as_deref(),
            Some(self.fingerprint.as_str())
        );
        assert_eq!(
            secret.public_key_openssh().as_deref(),
            Some(key_words(&self.public_line).as_str())
        );
        match secret.credential {
            Credential::Key(key) => key,
            Credential::Password(_) => panic!("expected a key secret"),
        }
    }
}

/// Runs `command` with `SSH_AUTH_SOCK` pointing at an agent that serves `key` to children of
/// this process only (the way the broker serves its own ssh).
fn with_agent(
    dir: &Path,
    key: PrivateKey,
    accept_children: bool,
    command: &mut Command,
) -> (Output, AgentStats) {
    let socket = dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let me = libc::pid_t::try_from(std::process::id()).unwrap();
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let serving = scope.spawn(|| {
            agent::serve_listener(
                &listener,
                key,
                |pid| accept_children && agent::parent_pid(pid).ok() == Some(me),
                &stop,
            )
        });
        let output = run(command.env("SSH_AUTH_SOCK", &socket));
        stop.store(true, Ordering::Release);
        let stats = serving.join().unwrap().unwrap();
        (output, stats)
    })
}

fn check_openssh_round_trip(keygen_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), keygen_args);

    // ssh-add -L lists exactly our key.
    let (listing, stats) = with_agent(
        dir.path(),
        key.private_key(),
        true,
        Command::new(tool("ssh-add")).arg("-L"),
    );
    assert!(
        listing.status.success(),
        "ssh-add -L: {}",
        explain(&listing)
    );
    let lines: Vec<String> = stdout(&listing).lines().map(key_words).collect();
    assert_eq!(lines, [key_words(&key.public_line)]);
    assert_eq!(stats, AgentStats::default());

    // ssh-keygen -Y sign uses the agent (the private key file is gone).
    let message = dir.path().join("message");
    std::fs::write(&message, b"the bastion signs this\n").unwrap();
    let (signing, stats) = with_agent(
        dir.path(),
        key.private_key(),
        true,
        Command::new(tool("ssh-keygen"))
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(&key.public_path)
            .arg(&message),
    );
    assert!(
        signing.status.success(),
        "ssh-keygen -Y sign: {}",
        explain(&signing)
    );
    assert_eq!(
        stats,
        AgentStats {
            sign_requests: 1,
            signatures_made: 1
        }
    );
    let signature = dir.path().join("message.sig");
    assert!(signature.is_file());

    // ssh-keygen -Y verify accepts it for our public key...
    let allowed = dir.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!("test@kmsbastion {}\n", key_words(&key.public_line)),
    )
    .unwrap();
    let verify = |data: &Path| {
        run(Command::new(tool("ssh-keygen"))
            .args(["-Y", "verify", "-n", "file", "-I", "test@kmsbastion", "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(&signature)
            .stdin(std::fs::File::open(data).unwrap()))
    };
    let good = verify(&message);
    assert!(
        good.status.success(),
        "ssh-keygen -Y verify: {}",
        explain(&good)
    );
    assert!(
        stdout(&good).contains("Good \"file\" signature"),
        "{}",
        explain(&good)
    );
    // ...and rejects it for other data.
    let tampered = dir.path().join("tampered");
    std::fs::write(&tampered, b"the bastion signs that\n").unwrap();
    assert!(!verify(&tampered).status.success());
}

#[test]
fn openssh_uses_rsa_2048_pkcs1_pem_key() {
    check_openssh_round_trip(&["-t", "rsa", "-b", "2048", "-m", "PEM"]);
}

#[test]
fn openssh_uses_rsa_pkcs8_key() {
    check_openssh_round_trip(&["-t", "rsa", "-b", "3072", "-m", "PKCS8"]);
}

#[test]
fn openssh_uses_ed25519_key() {
    check_openssh_round_trip(&["-t", "ed25519"]);
}

#[test]
fn openssh_uses_ecdsa_p256_key() {
    check_openssh_round_trip(&["-t", "ecdsa", "-b", "256"]);
}

#[test]
fn openssh_uses_ecdsa_p384_sec1_key() {
    check_openssh_round_trip(&["-t", "ecdsa", "-b", "384", "-m", "PEM"]);
}

#[test]
fn ssh_add_cannot_change_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), &["-t", "ed25519"]);
    let (removal, stats) = with_agent(
        dir.path(),
        key.private_key(),
        true,
        Command::new(tool("ssh-add")).arg("-D"),
    );
    assert!(
        !removal.status.success(),
        "ssh-add -D: {}",
        explain(&removal)
    );
    assert_eq!(stats, AgentStats::default());
}

#[test]
fn rejected_peer_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), &["-t", "ed25519"]);
    let (listing, stats) = with_agent(
        dir.path(),
        key.private_key(),
        false,
        Command::new(tool("ssh-add")).arg("-L"),
    );
    assert!(
        !listing.status.success(),
        "ssh-add -L: {}",
        explain(&listing)
    );
    assert!(!stdout(&listing).contains(&key_words(&key.public_line)));
    assert_eq!(stats, AgentStats::default());
}
