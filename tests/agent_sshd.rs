//! The in-memory agent in a real SSH login: stock `ssh` authenticates to a stock `sshd` with
//! a key served only by our agent, the way the broker connects to a target.
//!
//! It checks what the broker relies on: the login works for RSA-2048 PEM (what ECS rotation
//! makes), Ed25519 and ECDSA keys; `ssh` asks for exactly one signature, and only after the
//! server accepted the key, so a target that does not know the key leaves
//! `sign_requests == 0`.
//!
//! sshd needs root-level state, so each test re-runs itself inside `tests/ns/run-in-ns`
//! (private mount/net/pid namespaces; nothing on the host changes). Needs root, sshd and
//! ssh; fails loudly without them.
#![cfg(feature = "client")]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kmsbastion::agent::{self, AgentStats};
use kmsbastion::secret::{Credential, TargetSecret};

fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install openssh-client and openssh-server"))
}

fn explain(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Outside the namespace: re-run this one test inside `run-in-ns` and require it to pass.
/// Inside: `true`, and the caller does the real work.
fn inside_namespace(test: &str) -> bool {
    if std::env::var_os("KMSB_NS").is_some() {
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} needs root: it runs sshd inside tests/ns/run-in-ns"
    );
    let exe = std::env::current_exe().unwrap();
    // run-in-ns keeps the checkout and CARGO_TARGET_DIR visible even under /tmp, but it
    // cannot keep anything under /run (its private /run is where it stages itself).
    assert!(
        !exe.starts_with("/run"),
        "{test}: the test binary {} lies under /run, which run-in-ns replaces; \
         use a CARGO_TARGET_DIR elsewhere",
        exe.display()
    );
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ns/run-in-ns");
    let output = Command::new(&runner)
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", runner.display()));
    let explanation = explain(&output);
    assert!(
        output.status.success(),
        "{test} inside run-in-ns failed:\n{explanation}"
    );
    assert!(
        explanation.contains("1 passed"),
        "{test} did not run inside run-in-ns:\n{explanation}"
    );
    false
}

fn keygen(args: &[&str], path: &Path) {
    let output = Command::new(tool("ssh-keygen"))
        .args(args)
        .args(["-q", "-N", "", "-C", "kmsbastion-sshd-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "ssh-keygen: {}", explain(&output));
}

/// A stock sshd on 127.0.0.1 (inside the namespace) that lets root in with the keys in
/// `authorized_keys`; killed on drop.
struct Sshd {
    child: Child,
    port: u16,
}

impl Sshd {
    fn start(dir: &Path, authorized_keys: &str) -> Sshd {
        if !dir.join("host_key").exists() {
            keygen(&["-t", "ed25519"], &dir.join("host_key"));
        }
        std::fs::write(dir.join("authorized_keys"), authorized_keys).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {dir}/host_key\n\
                 PidFile none\n\
                 AuthorizedKeysFile {dir}/authorized_keys\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PermitRootLogin prohibit-password\n\
                 AuthenticationMethods publickey\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 LogLevel VERBOSE\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(tool("sshd"))
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start listening");
            thread::sleep(Duration::from_millis(50));
        }
        Sshd { child, port }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Logs in to `sshd` as root with `ssh`, the key served by our agent only; returns ssh's
/// output and what the agent saw.
fn login_through_agent(
    dir: &Path,
    sshd: &Sshd,
    secret_json: &[u8],
    public_path: &Path,
) -> (Output, AgentStats) {
    let secret = TargetSecret::parse(secret_json).unwrap();
    let Credential::Key(key) = secret.credential else {
        panic!("expected a key secret");
    };
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
                |pid| agent::parent_pid(pid).ok() == Some(me),
                &stop,
            )
        });
        let output = Command::new(tool("ssh"))
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "PreferredAuthentications=publickey",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("-o")
            .arg(format!("IdentityFile={}", public_path.display()))
            .arg("-o")
            .arg(format!("IdentityAgent={}", socket.display()))
            .args([
                "-p",
                &sshd.port.to_string(),
                "root@127.0.0.1",
                "echo",
                "agent-login-ok",
            ])
            .stdin(Stdio::null())
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .unwrap();
        stop.store(true, Ordering::Release);
        let stats = serving.join().unwrap().unwrap();
        (output, stats)
    })
}

fn check_login(keygen_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let private_path = dir.join("id");
    keygen(keygen_args, &private_path);
    let private = std::fs::read_to_string(&private_path).unwrap();
    // Only the agent can sign: ssh must not find the private key file.
    std::fs::remove_file(&private_path).unwrap();
    let public_path = dir.join("id.pub");
    let public = std::fs::read_to_string(&public_path).unwrap();
    let secret_json = serde_json::to_vec(&serde_json::json!({
        "UserName": "root", "PublicKey": public.trim_end(), "PrivateKey": private,
    }))
    .unwrap();

    // The target knows the key: one signature, login works.
    let sshd = Sshd::start(dir, &public);
    let (output, stats) = login_through_agent(dir, &sshd, &secret_json, &public_path);
    let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "ssh login failed: {}\nsshd log:\n{log}",
        explain(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "agent-login-ok"
    );
    assert_eq!(
        stats,
        AgentStats {
            sign_requests: 1,
            signatures_made: 1
        }
    );
    drop(sshd);

    // The target does not know the key (say, rotated): ssh never asks the agent to sign.
    let other = dir.join("other");
    keygen(&["-t", "ed25519"], &other);
    let other_public = std::fs::read_to_string(dir.join("other.pub")).unwrap();
    let sshd = Sshd::start(dir, &other_public);
    let (output, stats) = login_through_agent(dir, &sshd, &secret_json, &public_path);
    assert_eq!(output.status.code(), Some(255), "{}", explain(&output));
    assert_eq!(stats, AgentStats::default());
}

#[test]
fn sshd_login_with_rsa_2048_pem_key() {
    if inside_namespace("sshd_login_with_rsa_2048_pem_key") {
        check_login(&["-t", "rsa", "-b", "2048", "-m", "PEM"]);
    }
}

#[test]
fn sshd_login_with_ed25519_key() {
    if inside_namespace("sshd_login_with_ed25519_key") {
        check_login(&["-t", "ed25519"]);
    }
}

#[test]
fn sshd_login_with_ecdsa_p256_key() {
    if inside_namespace("sshd_login_with_ecdsa_p256_key") {
        check_login(&["-t", "ecdsa", "-b", "256"]);
    }
}
