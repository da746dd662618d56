//! kms-emulator: a local, wire-compatible Alibaba Cloud KMS for the secrets API.
//!
//! The tests, the benchmark and `make lab` run against it instead of a cloud account. It
//! verifies both request signatures (ACS3-HMAC-SHA256 and HMAC-SHA1) with the library's own
//! signing code, keeps versions and stages as KMS moves them, rotates ECS secrets (with a hook
//! standing in for Cloud Assistant), honours deletion windows, persists its state atomically
//! and injects faults on request. See `--help` and `shared/reference/kms-api.md`.
//!
//! Interface other tooling relies on: the first stdout line is exactly
//! `listening on http://ADDR:PORT`; SIGTERM/SIGINT flush the state and exit 0.

mod actions;
mod auth;
mod error;
mod faults;
mod persist;
mod rotation;
mod server;
mod signals;
mod state;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use kmsbastion::kms::Credentials;
use kmsbastion::sensitive::SecretString;

use crate::auth::Verifier;
use crate::faults::{FaultRule, Faults};
use crate::persist::StateDir;
use crate::server::Emulator;

/// A local Alibaba Cloud KMS (API 2016-01-20, secrets operations) for tests and the lab.
///
/// Accepts exactly one AccessKey pair, taken from the environment:
/// ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET (required), plus
/// ALIBABA_CLOUD_SECURITY_TOKEN (optional: when set, every request must carry this STS token).
/// Both signatures are verified: ACS3-HMAC-SHA256 (the SDK default) and HMAC-SHA1 (v1).
///
/// The first line on stdout is exactly `listening on http://ADDR:PORT`; one line per request
/// goes to stderr. SIGTERM or SIGINT saves the state and exits 0.
///
/// Admin endpoints (unsigned JSON, only when listening on a loopback address):
/// POST /__admin/faults {"action","code","count","latency_ms"}; DELETE /__admin/faults;
/// GET /__admin/stats -> {"calls":{"GetSecretValue":3,...},...}; POST /__admin/stats/reset.
#[derive(Parser, Debug)]
#[command(name = "kms-emulator", version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on (plain HTTP). Port 0 picks a free port; the chosen one is
    /// printed on the first stdout line.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Directory holding the secrets (created 0700 if missing). State survives restarts;
    /// it holds secret values in clear, so use a test or lab directory only.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,

    /// Command run by `/bin/sh -c` on every ECS rotation, with the new SecretData JSON on
    /// stdin and KMS_SECRET_NAME, KMS_INSTANCE_ID, KMS_USER_NAME, KMS_SECRET_SUBTYPE
    /// (Password/SSHKey) and KMS_VERSION_ID in the environment. Stages move only if it exits
    /// 0; otherwise RotateSecret fails with Rejected.RotationFailed. Its output goes to stderr.
    #[arg(long, value_name = "CMD")]
    rotation_hook: Option<String>,

    /// Inject a fault: ACTION:CODE:COUNT[:LATENCY_MS]. The next COUNT calls of ACTION (or *
    /// for every action) wait LATENCY_MS and then fail with CODE (its usual HTTP status, e.g.
    /// Rejected.Throttling 429, ServiceUnavailableTemporary 503, InternalFailure 500). Empty
    /// CODE or - = latency only; COUNT 0 = every call. Repeatable; rules apply in order.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<String>,

    /// Allowed difference in seconds between a request's timestamp and the emulator's
    /// clock (InvalidTimeStamp.Expired beyond it). Nonces are remembered for twice as long.
    #[arg(long, value_name = "SECONDS", default_value_t = auth::DEFAULT_SKEW.as_secs())]
    clock_skew_tolerance: u64,

    /// Region shown in ARNs and used as the default ExtendedConfig.RegionId.
    #[arg(long, value_name = "REGION", default_value = "cn-hangzhou")]
    region: String,

    /// Requests served at the same time (worker threads).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
}

fn credentials_from_env() -> Result<Credentials, String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(id), Some(secret)) = (
        var("ALIBABA_CLOUD_ACCESS_KEY_ID"),
        var("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
    ) else {
        return Err(
            "no AccessKey: set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET \
             to the one key pair this emulator should accept (any values; clients must use the same)"
                .to_owned(),
        );
    };
    Ok(Credentials {
        access_key_id: id,
        access_key_secret: SecretString::from(secret.as_str()),
        security_token: var("ALIBABA_CLOUD_SECURITY_TOKEN").map(|t| SecretString::from(t.as_str())),
    })
}

fn run(args: Args) -> Result<(), String> {
    let creds = credentials_from_env()?;
    let mut faults = Faults::default();
    for spec in &args.faults {
        faults.add(FaultRule::parse_flag(spec)?);
    }
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = signals::block().map_err(|e| format!("cannot block SIGTERM/SIGINT: {e}"))?;
    let state_dir = StateDir::open(&args.state)
        .map_err(|e| format!("cannot use state directory {}: {e}", args.state.display()))?;
    let store = state_dir
        .load()
        .map_err(|e| format!("cannot load state from {}: {e}", args.state.display()))?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| format!("cannot start the HTTP server on {addr}: {e}"))?;
    let server = Arc::new(server);
    let emulator = Arc::new(Emulator::new(
        store,
        state_dir,
        Verifier::new(creds, Duration::from_secs(args.clock_skew_tolerance)),
        faults,
        args.rotation_hook,
        args.region,
        addr.ip().is_loopback(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let (server, emulator, stop) = (server.clone(), emulator.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(format!("kms-worker-{i}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match server.recv_timeout(Duration::from_millis(200)) {
                        Ok(Some(req)) => emulator.handle(req),
                        Ok(None) => {}
                        Err(e) => {
                            eprintln!("kms-emulator: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start a worker thread: {e}"))?;
        workers.push(handle);
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    eprintln!(
        "kms-emulator: serving KMS 2016-01-20 on http://{addr} with {} workers (admin endpoints {})",
        args.workers,
        if addr.ip().is_loopback() { "on" } else { "off: not a loopback address" }
    );
    let sig = signals::wait(&signals).map_err(|e| format!("sigwait failed: {e}"))?;
    eprintln!("kms-emulator: signal {sig}, shutting down");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    emulator
        .flush()
        .map_err(|e| format!("cannot save state at shutdown: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-emulator: {e}");
            ExitCode::from(2)
        }
    }
}
