//! The onward connection a broker opens as soon as it starts, for the login's first request.
//!
//! sshd opens the PAM session (which starts the broker) right after authenticating the
//! engineer, and only then confirms the session channel, runs the login shell and lets it
//! ask the broker: about 50 ms during which the onward connection could already be on its
//! way. So the broker fetches the secret at once and opens the connection as an ssh *master*
//! with no session of its own ([`super::onward::SshRole::Master`]): TCP, key exchange and
//! authentication overlap sshd's session setup. The first request then runs as the one
//! session of that connection ([`super::onward::run_mux`]) and the master ends with it.
//!
//! What does not change:
//! - one KMS fetch and one onward connection per request: a request that finds no prepared
//!   connection (the second one of a login, one after [`IDLE`]) connects on its own;
//! - every request re-checks the grant before it may use anything; a refused request never
//!   touches the prepared connection;
//! - a failure while preparing (KMS, secret, host key, rejected credential, unreachable
//!   target) is the first request's failure, reported exactly as before. Only failures of
//!   the broker's own making are not: the request then simply connects on its own.
//!
//! This module is the state shared by the thread that runs the master and the requests.

use super::failure::OnwardError;
use super::onward::{ChildSlot, CredCell};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A prepared connection nobody claimed within this time is closed (and a failure of it
/// nobody asked about is forgotten). The first request of an interactive login or a command
/// arrives within milliseconds; a short limit also bounds how long an engineer who never
/// asks for a session (`ssh -N`) keeps a startup slot of the target's sshd busy.
pub const IDLE: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Phase {
    /// Nothing prepared (never started, or over): requests connect on their own.
    Off,
    /// Unclaimed: the master connects, verifies the target, and then waits for a credential
    /// in `cell`.
    Starting { cell: Arc<CredCell>, since: Instant },
    /// A request took it (and fetches the credential); `control` once authenticated.
    Claimed { control: Option<PathBuf> },
    /// The master failed in a way the request must hear about (at `since`).
    Failed { error: OnwardError, since: Instant },
    /// Closed unclaimed (idle, or no longer matching the configuration).
    Dropped,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The master ssh has exited (or never ran).
    master_done: bool,
}

/// What a request gets from [`Preconnect::claim`].
#[derive(Debug)]
pub enum Claim {
    /// Fetch the credential, [`CredCell::fill`] it, then [`Preconnect::await_ready`].
    Connecting { cell: Arc<CredCell> },
    /// Preparing failed (the target is unreachable, its host key changed): that is this
    /// request's outcome; no credential is needed to know it.
    Failed { error: OnwardError },
    /// Nothing prepared: connect as usual.
    Nothing,
}

/// What [`Preconnect::await_ready`] found.
#[derive(Debug)]
pub enum Ready {
    /// Authenticated: run the session through the control socket at this path.
    Control(PathBuf),
    /// The master failed (for example [`OnwardError::Rejected`]).
    Failed(OnwardError),
    /// The master is gone without a reason worth reporting: connect as usual.
    Gone,
}

/// How the prepared connection ended, for the audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A request used it.
    Used,
    /// Nobody claimed it in time, or it no longer matched the configuration.
    Unused,
    /// It failed; the request reports why.
    Failed,
    /// It failed for a reason of its own (a busy target, our files); requests connect on
    /// their own.
    Abandoned,
}

impl Outcome {
    /// The audit `result` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Unused => "unused",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Whether a failure of the master is the request's to report. Our own trouble (files,
/// processes, a hangup) is not, nor a target that turned the connection away before its
/// banner (busy: the request's own connection tries again).
fn reportable(error: &Option<OnwardError>) -> bool {
    matches!(
        error,
        Some(
            OnwardError::HostKey { .. }
                | OnwardError::Rejected { .. }
                | OnwardError::Unreachable { .. }
        )
    )
}

/// Shared between the master's thread, the request threads and the accept loop.
#[derive(Debug)]
pub struct Preconnect {
    state: Mutex<State>,
    changed: Condvar,
    /// The master ssh (also in the broker's list of children, so shutdown hangs it up).
    pub master: Arc<ChildSlot>,
}

impl Default for Preconnect {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                phase: Phase::Off,
                master_done: true,
            }),
            changed: Condvar::new(),
            master: Arc::new(ChildSlot::default()),
        }
    }
}

impl Preconnect {
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.lock().ok()
    }

    fn stop_master(&self) {
        self.master.cancelled.store(true, Ordering::Release);
        self.master.signal(libc::SIGTERM);
    }

    /// Mark the master as being prepared with `cell` for its credential; false if it already
    /// was (once per broker).
    pub fn begin(&self, cell: Arc<CredCell>) -> bool {
        let Some(mut st) = self.lock() else {
            return false;
        };
        if !matches!(st.phase, Phase::Off) || !st.master_done {
            return false;
        }
        st.phase = Phase::Starting {
            cell,
            since: Instant::now(),
        };
        st.master_done = false;
        true
    }

    /// The master authenticated (called on the master's log thread).
    pub fn ready(&self, control: PathBuf) {
        if let Some(mut st) = self.lock() {
            if let Phase::Claimed { control: c @ None } = &mut st.phase {
                *c = Some(control);
                self.changed.notify_all();
            }
        }
    }

    /// The master has exited (`error`: why, if it failed).
    pub fn finished(&self, error: Option<OnwardError>) -> Outcome {
        let Some(mut st) = self.lock() else {
            return Outcome::Abandoned;
        };
        st.master_done = true;
        let report = reportable(&error);
        let phase = std::mem::replace(&mut st.phase, Phase::Off);
        let outcome = match (phase, error) {
            (Phase::Starting { cell, .. }, error) => {
                cell.close();
                match error {
                    Some(error) if report => {
                        st.phase = Phase::Failed {
                            error,
                            since: Instant::now(),
                        };
                        Outcome::Failed
                    }
                    _ => Outcome::Abandoned,
                }
            }
            (Phase::Claimed { control: Some(_) }, _) => Outcome::Used,
            (Phase::Claimed { control: None }, Some(error)) if report => {
                st.phase = Phase::Failed {
                    error,
                    since: Instant::now(),
                };
                Outcome::Failed
            }
            (Phase::Claimed { control: None }, _) => Outcome::Abandoned,
            (Phase::Dropped | Phase::Off, _) => Outcome::Unused,
            (Phase::Failed { error, since }, _) => {
                st.phase = Phase::Failed { error, since };
                Outcome::Failed
            }
        };
        self.changed.notify_all();
        outcome
    }

    /// Take the prepared connection (or its failure).
    pub fn claim(&self) -> Claim {
        let Some(mut st) = self.lock() else {
            return Claim::Nothing;
        };
        match std::mem::replace(&mut st.phase, Phase::Off) {
            Phase::Starting { cell, .. } => {
                st.phase = Phase::Claimed { control: None };
                Claim::Connecting { cell }
            }
            Phase::Failed { error, .. } => Claim::Failed { error },
            other => {
                st.phase = other;
                Claim::Nothing
            }
        }
    }

    /// After filling the claimed cell: wait (at most `wait`, less if `cancelled`) until the
    /// master authenticated or failed.
    pub fn await_ready(&self, cancelled: &AtomicBool, wait: Duration) -> Ready {
        let deadline = Instant::now() + wait;
        let Some(mut st) = self.lock() else {
            return Ready::Gone;
        };
        loop {
            match &st.phase {
                Phase::Claimed {
                    control: Some(control),
                } => return Ready::Control(control.clone()),
                Phase::Claimed { control: None } if !st.master_done => {
                    let now = Instant::now();
                    if now >= deadline || cancelled.load(Ordering::Acquire) {
                        return Ready::Gone;
                    }
                    let step = (deadline - now).min(Duration::from_millis(100));
                    st = match self.changed.wait_timeout(st, step) {
                        Ok((g, _)) => g,
                        Err(_) => return Ready::Gone,
                    };
                }
                Phase::Failed { .. } => {
                    return match std::mem::replace(&mut st.phase, Phase::Off) {
                        Phase::Failed { error, .. } => Ready::Failed(error),
                        _ => Ready::Gone,
                    };
                }
                _ => return Ready::Gone,
            }
        }
    }

    /// Close a master that has waited unclaimed for `idle`.
    pub fn drop_idle(&self, idle: Duration) -> bool {
        let Some(mut st) = self.lock() else {
            return false;
        };
        let expired = match &st.phase {
            Phase::Starting { since, cell } if since.elapsed() >= idle => {
                cell.close();
                true
            }
            Phase::Failed { since, .. } if since.elapsed() >= idle => {
                // Old news: a later request tries for itself.
                st.phase = Phase::Off;
                return false;
            }
            _ => false,
        };
        if expired {
            st.phase = Phase::Dropped;
            drop(st);
            self.stop_master();
        }
        expired
    }

    /// Forget whatever was prepared (the configuration no longer matches it): close an
    /// unclaimed master, drop a stored failure.
    pub fn discard(&self) {
        let Some(mut st) = self.lock() else {
            return;
        };
        match &st.phase {
            Phase::Starting { cell, .. } => {
                cell.close();
                st.phase = Phase::Dropped;
                drop(st);
                self.stop_master();
            }
            Phase::Failed { .. } => st.phase = Phase::Off,
            Phase::Off | Phase::Claimed { .. } | Phase::Dropped => {}
        }
    }

    /// Whether the master ssh is still running (or still to be started).
    pub fn master_running(&self) -> bool {
        self.lock().map(|st| !st.master_done).unwrap_or(false)
    }

    /// Whether an unclaimed master is waiting (or an unclaimed failure is kept).
    pub fn pending(&self) -> bool {
        self.lock()
            .map(|st| matches!(st.phase, Phase::Starting { .. } | Phase::Failed { .. }))
            .unwrap_or(false)
    }

    /// End the master after its session (or when the request gives up on it) and wait until
    /// it is gone: it holds the engineer's descriptors until then, and sshd waits for their
    /// EOF.
    ///
    /// SIGTERM is repeated: OpenSSH's client loop (9.2) checks its quit flag before a plain
    /// `poll(2)`, so a signal landing between the two is only acted upon at the next wake-up
    /// (up to `ServerAliveInterval` later); another signal interrupts that poll.
    pub fn release(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            self.stop_master();
            if self.wait_done(Duration::from_millis(25)) {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.master.signal(libc::SIGKILL);
        self.wait_done(patience);
    }

    fn wait_done(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        let Some(mut st) = self.lock() else {
            return false;
        };
        while !st.master_done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensitive::SecretString;

    fn unreachable() -> OnwardError {
        OnwardError::Unreachable {
            reason: "connection refused".into(),
            detail: "connect to host 10.0.0.1 port 22: Connection refused".into(),
        }
    }

    #[test]
    fn the_first_request_gets_the_master_and_the_second_gets_nothing() {
        let p = Arc::new(Preconnect::default());
        let cell = Arc::new(CredCell::default());
        assert!(p.begin(Arc::clone(&cell)));
        assert!(
            !p.begin(Arc::new(CredCell::default())),
            "only once per broker"
        );
        assert!(p.pending());
        let Claim::Connecting { cell: got } = p.claim() else {
            panic!("expected the master");
        };
        assert!(Arc::ptr_eq(&got, &cell));
        assert!(matches!(p.claim(), Claim::Nothing), "one request only");
        assert!(!p.pending());
        let p2 = Arc::clone(&p);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            p2.ready("/run/x/c".into());
        });
        let no = AtomicBool::new(false);
        match p.await_ready(&no, Duration::from_secs(5)) {
            Ready::Control(c) => assert_eq!(c, PathBuf::from("/run/x/c")),
            other => panic!("expected the control socket, got {other:?}"),
        }
        t.join().unwrap();
        assert_eq!(p.finished(None), Outcome::Used);
        assert!(p.wait_done(Duration::ZERO));
    }

    #[test]
    fn a_failure_before_any_request_is_the_first_requests_failure_once() {
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert_eq!(p.finished(Some(unreachable())), Outcome::Failed);
        match p.claim() {
            Claim::Failed { error } => assert!(matches!(error, OnwardError::Unreachable { .. })),
            other => panic!("expected the failure, got {other:?}"),
        }
        assert!(matches!(p.claim(), Claim::Nothing));
    }

    #[test]
    fn an_unclaimed_failure_is_forgotten_after_the_idle_time() {
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert_eq!(p.finished(Some(unreachable())), Outcome::Failed);
        assert!(p.pending());
        assert!(!p.drop_idle(IDLE));
        assert!(matches!(p.claim(), Claim::Failed { .. }), "still fresh");
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert_eq!(p.finished(Some(unreachable())), Outcome::Failed);
        p.drop_idle(Duration::ZERO);
        assert!(!p.pending());
        assert!(
            matches!(p.claim(), Claim::Nothing),
            "old news: connect as usual"
        );
    }

    #[test]
    fn a_rejected_credential_reaches_the_waiting_request() {
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert!(matches!(p.claim(), Claim::Connecting { .. }));
        let rejected = OnwardError::Rejected {
            version_ids: vec![],
        };
        assert_eq!(p.finished(Some(rejected)), Outcome::Failed);
        let no = AtomicBool::new(false);
        assert!(matches!(
            p.await_ready(&no, Duration::from_secs(1)),
            Ready::Failed(OnwardError::Rejected { .. })
        ));
    }

    #[test]
    fn our_own_failures_and_busy_targets_are_not_reported() {
        for err in [
            Some(OnwardError::Internal("mkfifo: EEXIST".into())),
            Some(OnwardError::Refused("hung up".into())),
            None,
        ] {
            let p = Preconnect::default();
            assert!(p.begin(Arc::new(CredCell::default())));
            assert_eq!(p.finished(err), Outcome::Abandoned);
            assert!(matches!(p.claim(), Claim::Nothing));
        }
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert!(matches!(p.claim(), Claim::Connecting { .. }));
        assert_eq!(p.finished(None), Outcome::Abandoned);
        let no = AtomicBool::new(false);
        assert!(matches!(
            p.await_ready(&no, Duration::from_secs(1)),
            Ready::Gone
        ));
    }

    #[test]
    fn waiting_ends_at_the_deadline_or_on_hangup() {
        let p = Preconnect::default();
        assert!(p.begin(Arc::new(CredCell::default())));
        assert!(matches!(p.claim(), Claim::Connecting { .. }));
        let no = AtomicBool::new(false);
        let t = Instant::now();
        assert!(matches!(
            p.await_ready(&no, Duration::from_millis(150)),
            Ready::Gone
        ));
        assert!(t.elapsed() >= Duration::from_millis(150));
        let yes = AtomicBool::new(true);
        let t = Instant::now();
        assert!(matches!(
            p.await_ready(&yes, Duration::from_secs(10)),
            Ready::Gone
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn an_idle_master_is_dropped_its_cell_closed_and_then_unused() {
        let p = Preconnect::default();
        let cell = Arc::new(CredCell::default());
        assert!(p.begin(Arc::clone(&cell)));
        assert!(!p.drop_idle(IDLE), "just started");
        assert!(p.drop_idle(Duration::ZERO));
        assert!(!p.pending());
        assert!(matches!(p.claim(), Claim::Nothing));
        let pw = crate::secret::Credential::Password(SecretString::new("x".into()));
        assert!(!cell.fill(pw), "a closed cell takes no credential");
        assert_eq!(p.finished(None), Outcome::Unused);
    }
}
