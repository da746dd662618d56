//! SIGTERM / SIGINT as an ordinary event: both are blocked in every thread (the mask is
//! inherited, so this must run before any thread starts) and the main thread waits for one
//! with `sigwait`, then shuts down cleanly. No async-signal-safety puzzles, no handler.
//! (Children started with `std::process::Command` get an empty mask again: std resets it.)

use std::io;

/// The blocked set, for [`wait`].
pub struct TerminationSignals {
    set: libc::sigset_t,
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later.
pub fn block() -> io::Result<TerminationSignals> {
    // SAFETY: sigset_t is plain data; an all-zero value is a valid argument for
    // sigemptyset, which initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; these calls only write to it
    // and cannot fail for valid signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed by POSIX.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(TerminationSignals { set })
}

/// Waits until SIGTERM or SIGINT arrives; returns its number.
pub fn wait(signals: &TerminationSignals) -> io::Result<i32> {
    let mut sig: libc::c_int = 0;
    // SAFETY: `signals.set` was initialised by `block`, `sig` is a valid out-pointer.
    let rc = unsafe { libc::sigwait(&signals.set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}
