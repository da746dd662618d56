//! Shared by the integration tests that drive the real KMS emulator binary
//! (`tests/kms_client.rs`, `tests/cli.rs`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `target/<profile>/examples/kms-emulator`, next to this test's `deps/` directory.
pub fn emulator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps/");
    let bin = profile_dir.join("examples").join("kms-emulator");
    assert!(
        bin.is_file(),
        "KMS emulator binary not found at {}.\n\
         `make test-unit` builds it; when running cargo yourself, build it first: \
         `cargo build --example kms-emulator` (add --release for `cargo test --release`).",
        bin.display()
    );
    bin
}

/// A running emulator on a free loopback port, with its state and log in a scratch
/// directory; killed by pid (SIGKILL to exactly this child) on drop.
pub struct Emulator {
    child: Child,
    /// `http://127.0.0.1:PORT`, from its first stdout line.
    pub url: String,
    /// Scratch directory: `state/`, `emulator.log`, and whatever the test puts there.
    pub dir: tempfile::TempDir,
}

impl Emulator {
    /// Start it accepting the AccessKey pair (and, if given, the STS token).
    pub fn start(ak_id: &str, ak_secret: &str, token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state dir");
        let log = std::fs::File::create(dir.path().join("emulator.log")).expect("log file");
        let mut cmd = Command::new(emulator_binary());
        cmd.args(["--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .env("ALIBABA_CLOUD_ACCESS_KEY_ID", ak_id)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", ak_secret)
            .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(t) = token {
            cmd.env("ALIBABA_CLOUD_SECURITY_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("spawn kms-emulator");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Keep draining so the emulator never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(line)) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kms-emulator did not print its listening line: {other:?}");
            }
        };
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        Emulator { child, url, dir }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The emulator logs one line per request: show them for the failed test.
            let log = std::fs::read_to_string(self.dir.path().join("emulator.log"));
            eprintln!("--- kms-emulator log ---\n{}", log.unwrap_or_default());
        }
    }
}
