//! Retries inside one overall deadline.
//!
//! Only errors for which [`KmsError::is_retryable`] holds are repeated, with full-jitter
//! exponential backoff (delay drawn uniformly from `[0, min(cap, base × 2^n))`). Every attempt
//! is given only the time left before the deadline, and the last pause is shortened so that a
//! final attempt still fits; when less than [`MIN_ATTEMPT_TIME`] is left, the last error is
//! returned, saying how many attempts were made in how long.
//! Time and sleeping go through [`Clock`], so the loop is tested without sleeping.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::error::{KmsError, KmsErrorKind};

/// Time source and sleeper of the retry loop.
pub trait Clock {
    /// A monotonic now.
    fn now(&self) -> Instant;
    /// Blocks for `d`.
    fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Backoff base delay (the first pause is drawn from `[0, 100 ms)`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Backoff cap (no pause longer than 1 s).
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(1);
/// No attempt is started with less than this left (a round trip to KMS in the same region
/// takes a few tens of milliseconds; less time could only end in a timeout).
pub const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(200);

/// How long to try, and how to pause between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Overall deadline for the operation, all attempts and pauses included.
    pub deadline: Duration,
    /// First backoff ceiling; doubled after each failed attempt.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
}

impl RetryPolicy {
    /// The default backoff within `deadline`.
    pub fn with_deadline(deadline: Duration) -> Self {
        Self {
            deadline,
            base: DEFAULT_BACKOFF_BASE,
            cap: DEFAULT_BACKOFF_CAP,
        }
    }

    /// The pause after failed attempt number `attempt` (1-based), for a uniform random
    /// `unit` in `[0, 1)`: full jitter over `min(cap, base × 2^(attempt-1))`.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let ceiling = self.base.saturating_mul(1u32 << exp).min(self.cap);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Runs `attempt` until it succeeds, fails with a non-retryable error, or the deadline leaves
/// no room for another try. `attempt` receives the time left (use it as the request timeout).
/// `unit` draws the jitter, uniformly from `[0, 1)`.
pub fn run<T>(
    policy: &RetryPolicy,
    clock: &dyn Clock,
    unit: &mut dyn FnMut() -> f64,
    mut attempt: impl FnMut(Duration) -> Result<T, KmsError>,
) -> Result<T, KmsError> {
    let start = clock.now();
    let mut attempts: u32 = 0;
    let mut last_chance = false;
    loop {
        let left = policy
            .deadline
            .saturating_sub(clock.now().duration_since(start));
        attempts += 1;
        let err = match attempt(left.max(Duration::from_millis(1))) {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => e,
        };
        let left = policy
            .deadline
            .saturating_sub(clock.now().duration_since(start));
        if last_chance || left < MIN_ATTEMPT_TIME {
            return Err(exhausted(
                err,
                attempts,
                clock.now().duration_since(start),
                policy,
            ));
        }
        // When the drawn pause would not leave MIN_ATTEMPT_TIME for another attempt, it is
        // shortened and that attempt is the last.
        let room = left.saturating_sub(MIN_ATTEMPT_TIME);
        let mut pause = policy.backoff(attempts, unit());
        if pause >= room {
            pause = room;
            last_chance = true;
        }
        clock.sleep(pause);
    }
}

/// The last error, reworded to say that retrying did not help.
fn exhausted(last: KmsError, attempts: u32, took: Duration, policy: &RetryPolicy) -> KmsError {
    let kind = match last.kind {
        KmsErrorKind::Throttled => KmsErrorKind::Throttled,
        _ => KmsErrorKind::Unavailable,
    };
    KmsError {
        kind,
        message: format!(
            "{}; gave up after {attempts} attempt{} in {:.1} s (deadline {:.1} s)",
            last.message,
            if attempts == 1 { "" } else { "s" },
            took.as_secs_f64(),
            policy.deadline.as_secs_f64()
        ),
        ..last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A clock that only moves when slept on (or when an attempt "takes" time).
    struct FakeClock {
        start: Instant,
        elapsed: Cell<Duration>,
        sleeps: RefCell<Vec<Duration>>,
    }

    impl FakeClock {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                elapsed: Cell::new(Duration::ZERO),
                sleeps: RefCell::new(Vec::new()),
            }
        }
        fn advance(&self, d: Duration) {
            self.elapsed.set(self.elapsed.get() + d);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.elapsed.get()
        }
        fn sleep(&self, d: Duration) {
            self.sleeps.borrow_mut().push(d);
            self.advance(d);
        }
    }

    fn code(c: &str, status: u16) -> KmsError {
        KmsError::from_response(Some(c.to_owned()), Some("m"), Some("req-1".into()), status)
    }

    fn policy_ms(ms: u64) -> RetryPolicy {
        RetryPolicy::with_deadline(Duration::from_millis(ms))
    }

    #[test]
    fn backoff_is_exponential_with_cap_and_full_jitter() {
        let p = policy_ms(5000);
        // unit just below 1 gives (almost) the ceiling
        let ceil = |n| p.backoff(n, 0.999_999).as_millis();
        assert_eq!(
            [
                ceil(1),
                ceil(2),
                ceil(3),
                ceil(4),
                ceil(5),
                ceil(6),
                ceil(40)
            ],
            [99, 199, 399, 799, 999, 999, 999]
        );
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn throttled_twice_then_success() {
        let clock = FakeClock::new();
        let mut n = 0;
        let r = run(&policy_ms(5000), &clock, &mut || 0.5, |_| {
            n += 1;
            clock.advance(Duration::from_millis(10));
            if n <= 2 {
                Err(code("Rejected.Throttling", 429))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r, Ok(3));
        assert_eq!(
            *clock.sleeps.borrow(),
            vec![Duration::from_millis(50), Duration::from_millis(100)]
        );
    }

    #[test]
    fn not_found_and_permission_are_never_retried() {
        for (c, s) in [
            ("Forbidden.ResourceNotFound", 404),
            ("Forbidden.NoPermission", 403),
            ("InvalidAccessKeyId.NotFound", 404),
            ("Rejected.ResourceInDeleteWindow", 409),
            ("SignatureDoesNotMatch", 400),
        ] {
            let clock = FakeClock::new();
            let mut n = 0;
            let r: Result<(), _> = run(&policy_ms(5000), &clock, &mut || 0.5, |_| {
                n += 1;
                Err(code(c, s))
            });
            assert_eq!(n, 1, "{c}");
            assert_eq!(r.expect_err("fails").code.as_deref(), Some(c));
            assert!(clock.sleeps.borrow().is_empty());
        }
    }

    #[test]
    fn persistent_unavailable_stops_within_deadline_and_says_so() {
        let clock = FakeClock::new();
        let mut n = 0;
        let mut timeouts = Vec::new();
        let r: Result<(), _> = run(&policy_ms(5000), &clock, &mut || 0.999, |left| {
            n += 1;
            timeouts.push(left);
            clock.advance(Duration::from_millis(20));
            Err(code("ServiceUnavailableTemporary", 503))
        });
        let e = r.expect_err("gives up");
        let elapsed = clock.elapsed.get();
        assert!(elapsed <= Duration::from_millis(5000), "{elapsed:?}");
        assert!(elapsed >= Duration::from_millis(4800), "{elapsed:?}");
        assert_eq!(e.kind, KmsErrorKind::Unavailable);
        assert_eq!(e.code.as_deref(), Some("ServiceUnavailableTemporary"));
        assert_eq!(e.request_id.as_deref(), Some("req-1"));
        assert!(
            e.message.contains(&format!("gave up after {n} attempts")),
            "{}",
            e.message
        );
        assert!(e.message.contains("deadline 5.0 s"), "{}", e.message);
        // every attempt's timeout is bounded by the time left, which shrinks
        assert_eq!(timeouts[0], Duration::from_millis(5000));
        assert!(timeouts.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn persistent_throttling_ends_as_throttled() {
        let clock = FakeClock::new();
        let r: Result<(), _> = run(&policy_ms(1000), &clock, &mut || 0.7, |_| {
            Err(code("Rejected.Throttling", 429))
        });
        assert_eq!(r.expect_err("gives up").kind, KmsErrorKind::Throttled);
    }

    #[test]
    fn slow_attempt_consuming_the_deadline_is_not_followed_by_another() {
        let clock = FakeClock::new();
        let mut n = 0;
        let r: Result<(), _> = run(&policy_ms(1000), &clock, &mut || 0.0, |left| {
            n += 1;
            clock.advance(left);
            Err(KmsError::new(KmsErrorKind::Unavailable, "timed out"))
        });
        assert_eq!(n, 1);
        assert!(r.expect_err("fails").message.contains("1 attempt in 1.0 s"));
    }
}
