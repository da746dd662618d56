//! `libnss_kmsbastion.so.2`: the glibc NSS module of kmsbastion (`passwd: files kmsbastion`,
//! `group: files kmsbastion` in nsswitch.conf).
//!
//! Hand-written glue: every decision is made by `kmsbastion::passwd` from the configuration
//! at [`DEFAULT_CONFIG_PATH`]; this crate converts entries into the caller's buffers and
//! statuses. It runs inside every process that resolves users, so it is total and quick: no
//! network, no threads, no panics across the boundary (each entry point catches unwinds), no
//! unchecked pointer; `NSS_STATUS_TRYAGAIN` + `ERANGE` when the buffer is too small (glibc
//! retries with a bigger one), `NSS_STATUS_UNAVAIL` (+ `ENOENT`/`EIO`) when the configuration
//! is missing or broken, `NSS_STATUS_NOTFOUND` for names that are not ours.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![deny(unsafe_op_in_unsafe_fn)]

mod cache;
mod pack;

use kmsbastion::config::{Config, Scope, DEFAULT_CONFIG_PATH};
use kmsbastion::login::MAX_LOGIN_LEN;
use kmsbastion::passwd::{self, GroupEntry, PasswdEntry};
use libc::{c_char, c_int, c_long, gid_t, size_t, uid_t};
use pack::PackError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// `enum nss_status` values (glibc `<nss.h>`).
pub const NSS_STATUS_TRYAGAIN: c_int = -2;
/// The service is not available (configuration missing or broken).
pub const NSS_STATUS_UNAVAIL: c_int = -1;
/// No such entry.
pub const NSS_STATUS_NOTFOUND: c_int = 0;
/// Entry returned.
pub const NSS_STATUS_SUCCESS: c_int = 1;

/// What an entry point returns: the status and, if not 0, the errno to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    status: c_int,
    errno: c_int,
}

const SUCCESS: Outcome = Outcome {
    status: NSS_STATUS_SUCCESS,
    errno: 0,
};
/// Not ours: errno is left alone (callers of getpwnam() read errno to tell errors apart).
const NOTFOUND: Outcome = Outcome {
    status: NSS_STATUS_NOTFOUND,
    errno: 0,
};
/// End of an enumeration.
const END: Outcome = Outcome {
    status: NSS_STATUS_NOTFOUND,
    errno: libc::ENOENT,
};
const ERANGE: Outcome = Outcome {
    status: NSS_STATUS_TRYAGAIN,
    errno: libc::ERANGE,
};
const INVALID: Outcome = Outcome {
    status: NSS_STATUS_UNAVAIL,
    errno: libc::EINVAL,
};
const PANICKED: Outcome = Outcome {
    status: NSS_STATUS_UNAVAIL,
    errno: libc::EIO,
};

fn unavail(errno: c_int) -> Outcome {
    Outcome {
        status: NSS_STATUS_UNAVAIL,
        errno,
    }
}

/// The configuration as far as one lookup needs it (see `cache`).
fn config(scope: Scope<'_>) -> Result<Arc<Config>, Outcome> {
    cache::config_for(Path::new(DEFAULT_CONFIG_PATH), scope).map_err(unavail)
}

/// Runs `body` with unwinding caught and reports its outcome through `errnop`.
///
/// # Safety
/// `errnop` is null or valid for writing a `c_int`.
unsafe fn run(errnop: *mut c_int, body: impl FnOnce() -> Outcome) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or(PANICKED);
    if outcome.errno != 0 && !errnop.is_null() {
        // SAFETY: errnop is non-null and, per this function's contract (glibc passes
        // &errno), valid for a c_int write.
        unsafe { *errnop = outcome.errno };
    }
    outcome.status
}

/// Reads a name from C, bounded: longer than any login string → `None` (not ours), as is
/// anything that is not UTF-8.
///
/// # Safety
/// `name` is null or points to a NUL-terminated string.
unsafe fn c_name<'a>(name: *const c_char) -> Option<&'a str> {
    if name.is_null() {
        return None;
    }
    // SAFETY: name is non-null and NUL-terminated (caller contract); strnlen reads at most
    // MAX_LOGIN_LEN + 1 bytes and stops at the NUL, so it never reads past the string.
    let len = unsafe { libc::strnlen(name, MAX_LOGIN_LEN + 1) };
    if len > MAX_LOGIN_LEN {
        return None;
    }
    // SAFETY: the first `len` bytes were just read by strnlen and lie before the NUL.
    let bytes = unsafe { std::slice::from_raw_parts(name.cast::<u8>(), len) };
    std::str::from_utf8(bytes).ok()
}

/// The caller's buffer as a byte slice.
///
/// # Safety
/// `buffer` is null or valid for reads and writes of `buflen` bytes, not aliased elsewhere
/// for the duration of the call.
unsafe fn c_buffer<'a>(buffer: *mut c_char, buflen: size_t) -> Option<&'a mut [u8]> {
    if buffer.is_null() {
        return None;
    }
    // SAFETY: non-null, valid for buflen bytes and exclusive (caller contract).
    Some(unsafe { std::slice::from_raw_parts_mut(buffer.cast::<u8>(), buflen) })
}

/// Fills `result` and `buffer` with `entry`.
///
/// # Safety
/// `result` is null or valid for writing a `struct passwd`; `buffer`/`buflen` as for
/// [`c_buffer`].
unsafe fn fill_passwd(
    entry: &PasswdEntry,
    result: *mut libc::passwd,
    buffer: *mut c_char,
    buflen: size_t,
) -> Outcome {
    if result.is_null() {
        return INVALID;
    }
    // SAFETY: forwarded caller contract.
    let Some(buf) = (unsafe { c_buffer(buffer, buflen) }) else {
        return INVALID;
    };
    match pack::pack_passwd(entry, buf) {
        Ok(p) => {
            let pw = libc::passwd {
                pw_name: p.name,
                pw_passwd: p.passwd,
                pw_uid: entry.uid as uid_t,
                pw_gid: entry.gid as gid_t,
                pw_gecos: p.gecos,
                pw_dir: p.dir,
                pw_shell: p.shell,
            };
            // SAFETY: result is non-null and valid for a struct passwd write (caller
            // contract); its string fields point into the caller's buffer, filled above.
            unsafe { result.write(pw) };
            SUCCESS
        }
        Err(PackError::Range) => ERANGE,
        Err(PackError::BadField) => NOTFOUND,
    }
}

/// Fills `result` and `buffer` with `entry`.
///
/// # Safety
/// `result` is null or valid for writing a `struct group`; `buffer`/`buflen` as for
/// [`c_buffer`].
unsafe fn fill_group(
    entry: &GroupEntry,
    result: *mut libc::group,
    buffer: *mut c_char,
    buflen: size_t,
) -> Outcome {
    if result.is_null() {
        return INVALID;
    }
    // SAFETY: forwarded caller contract.
    let Some(buf) = (unsafe { c_buffer(buffer, buflen) }) else {
        return INVALID;
    };
    match pack::pack_group(entry, buf) {
        Ok(g) => {
            let gr = libc::group {
                gr_name: g.name,
                gr_passwd: g.passwd,
                gr_gid: entry.gid as gid_t,
                gr_mem: g.mem,
            };
            // SAFETY: result is non-null and valid for a struct group write (caller
            // contract); its pointers point into the caller's buffer, filled above.
            unsafe { result.write(gr) };
            SUCCESS
        }
        Err(PackError::Range) => ERANGE,
        Err(PackError::BadField) => NOTFOUND,
    }
}

/// `getpwnam_r` backend.
///
/// # Safety
/// glibc's NSS contract: `name` NUL-terminated, `result` a writable `struct passwd`,
/// `buffer` writable for `buflen` bytes, `errnop` writable. Null pointers are tolerated.
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getpwnam_r(
    name: *const c_char,
    result: *mut libc::passwd,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        // SAFETY: name per this function's contract.
        let Some(name) = (unsafe { c_name(name) }) else {
            return NOTFOUND;
        };
        let cfg = match config(Scope::Name(name)) {
            Ok(c) => c,
            Err(o) => return o,
        };
        match passwd::passwd_by_name(&cfg, name) {
            // SAFETY: result/buffer per this function's contract.
            Some(e) => unsafe { fill_passwd(&e, result, buffer, buflen) },
            None => NOTFOUND,
        }
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// `getpwuid_r` backend.
///
/// # Safety
/// As for [`_nss_kmsbastion_getpwnam_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getpwuid_r(
    uid: uid_t,
    result: *mut libc::passwd,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        let cfg = match config(Scope::Uid(uid)) {
            Ok(c) => c,
            Err(o) => return o,
        };
        match passwd::passwd_by_uid(&cfg, uid) {
            // SAFETY: result/buffer per this function's contract.
            Some(e) => unsafe { fill_passwd(&e, result, buffer, buflen) },
            None => NOTFOUND,
        }
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// `getgrnam_r` backend.
///
/// # Safety
/// As for [`_nss_kmsbastion_getpwnam_r`], with a `struct group` result.
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getgrnam_r(
    name: *const c_char,
    result: *mut libc::group,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        // SAFETY: name per this function's contract.
        let Some(name) = (unsafe { c_name(name) }) else {
            return NOTFOUND;
        };
        let cfg = match config(Scope::Engineers) {
            Ok(c) => c,
            Err(o) => return o,
        };
        match passwd::group_by_name(&cfg, name) {
            // SAFETY: result/buffer per this function's contract.
            Some(g) => unsafe { fill_group(&g, result, buffer, buflen) },
            None => NOTFOUND,
        }
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// `getgrgid_r` backend.
///
/// # Safety
/// As for [`_nss_kmsbastion_getgrnam_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getgrgid_r(
    gid: gid_t,
    result: *mut libc::group,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        let cfg = match config(Scope::Engineers) {
            Ok(c) => c,
            Err(o) => return o,
        };
        match passwd::group_by_gid(&cfg, gid) {
            // SAFETY: result/buffer per this function's contract.
            Some(g) => unsafe { fill_group(&g, result, buffer, buflen) },
            None => NOTFOUND,
        }
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// An enumeration in progress: a snapshot of the entries and the next index.
struct Enumeration<T> {
    entries: Vec<T>,
    next: usize,
}

static PW_ENUM: Mutex<Option<Enumeration<PasswdEntry>>> = Mutex::new(None);
static GR_ENUM: Mutex<Option<Enumeration<GroupEntry>>> = Mutex::new(None);

fn start<T>(
    slot: &Mutex<Option<Enumeration<T>>>,
    entries: impl FnOnce(&Config) -> Vec<T>,
) -> Outcome {
    let cfg = match config(Scope::Engineers) {
        Ok(c) => c,
        Err(o) => {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return o;
        }
    };
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Enumeration {
        entries: entries(&cfg),
        next: 0,
    });
    SUCCESS
}

fn stop<T>(slot: &Mutex<Option<Enumeration<T>>>) -> Outcome {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    SUCCESS
}

/// Hands out the next entry; `fill` decides success (advance) or ERANGE (retry same entry).
fn next<T>(
    slot: &Mutex<Option<Enumeration<T>>>,
    entries: impl FnOnce(&Config) -> Vec<T>,
    fill: impl FnOnce(&T) -> Outcome,
) -> Outcome {
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        // getpwent() without setpwent(): start implicitly, as nss_files does.
        match config(Scope::Engineers) {
            Ok(cfg) => {
                *guard = Some(Enumeration {
                    entries: entries(&cfg),
                    next: 0,
                })
            }
            Err(o) => return o,
        }
    }
    let Some(state) = guard.as_mut() else {
        return END;
    };
    let Some(entry) = state.entries.get(state.next) else {
        return END;
    };
    let outcome = fill(entry);
    if outcome.status == NSS_STATUS_SUCCESS {
        state.next += 1;
    }
    outcome
}

/// `setpwent` backend: snapshot the plain engineers.
#[no_mangle]
pub extern "C" fn _nss_kmsbastion_setpwent(_stayopen: c_int) -> c_int {
    catch_unwind(|| start(&PW_ENUM, passwd::passwd_all).status).unwrap_or(NSS_STATUS_UNAVAIL)
}

/// `endpwent` backend.
#[no_mangle]
pub extern "C" fn _nss_kmsbastion_endpwent() -> c_int {
    catch_unwind(|| stop(&PW_ENUM).status).unwrap_or(NSS_STATUS_UNAVAIL)
}

/// `getpwent_r` backend.
///
/// # Safety
/// As for [`_nss_kmsbastion_getpwnam_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getpwent_r(
    result: *mut libc::passwd,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        next(&PW_ENUM, passwd::passwd_all, |e| {
            // SAFETY: result/buffer per this function's contract.
            unsafe { fill_passwd(e, result, buffer, buflen) }
        })
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// `setgrent` backend: snapshot the bastion group.
#[no_mangle]
pub extern "C" fn _nss_kmsbastion_setgrent(_stayopen: c_int) -> c_int {
    catch_unwind(|| start(&GR_ENUM, passwd::group_all).status).unwrap_or(NSS_STATUS_UNAVAIL)
}

/// `endgrent` backend.
#[no_mangle]
pub extern "C" fn _nss_kmsbastion_endgrent() -> c_int {
    catch_unwind(|| stop(&GR_ENUM).status).unwrap_or(NSS_STATUS_UNAVAIL)
}

/// `getgrent_r` backend.
///
/// # Safety
/// As for [`_nss_kmsbastion_getgrnam_r`].
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_getgrent_r(
    result: *mut libc::group,
    buffer: *mut c_char,
    buflen: size_t,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        next(&GR_ENUM, passwd::group_all, |g| {
            // SAFETY: result/buffer per this function's contract.
            unsafe { fill_group(g, result, buffer, buflen) }
        })
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// `initgroups_dyn` backend: adds the bastion gid for our names (unless it is the primary
/// group `group`, or already listed), growing glibc's malloc'd array within `limit`.
///
/// # Safety
/// glibc's contract: `user` NUL-terminated; `start`, `size`, `groupsp` valid, `*groupsp` a
/// malloc'd array of `*size` gids of which the first `*start` are used; `errnop` writable.
#[no_mangle]
pub unsafe extern "C" fn _nss_kmsbastion_initgroups_dyn(
    user: *const c_char,
    group: gid_t,
    start: *mut c_long,
    size: *mut c_long,
    groupsp: *mut *mut gid_t,
    limit: c_long,
    errnop: *mut c_int,
) -> c_int {
    let body = || {
        // SAFETY: user per this function's contract.
        let Some(user) = (unsafe { c_name(user) }) else {
            return NOTFOUND;
        };
        if start.is_null() || size.is_null() || groupsp.is_null() {
            return INVALID;
        }
        let cfg = match config(Scope::Name(user)) {
            Ok(c) => c,
            Err(o) => return o,
        };
        let Some(gid) = passwd::initgroups(&cfg, user) else {
            return NOTFOUND;
        };
        if gid == group {
            return SUCCESS;
        }
        // SAFETY: start, size, groupsp are non-null and valid (contract).
        unsafe { add_group(gid as gid_t, start, size, groupsp, limit) }
    };
    // SAFETY: errnop per this function's contract.
    unsafe { run(errnop, body) }
}

/// Appends `gid` to glibc's group array unless present.
///
/// # Safety
/// As for [`_nss_kmsbastion_initgroups_dyn`], pointers checked non-null.
unsafe fn add_group(
    gid: gid_t,
    start: *mut c_long,
    size: *mut c_long,
    groupsp: *mut *mut gid_t,
    limit: c_long,
) -> Outcome {
    // SAFETY: start, size, groupsp are valid for reads and writes (contract).
    let (used, cap, array) = unsafe { (*start, *size, *groupsp) };
    let (Ok(used_n), Ok(cap_n)) = (usize::try_from(used), usize::try_from(cap)) else {
        return INVALID;
    };
    if used_n > cap_n || (array.is_null() && cap_n > 0) {
        return INVALID;
    }
    if !array.is_null() && used_n > 0 {
        // SAFETY: array holds at least `used` initialised gids (contract).
        let present = unsafe { std::slice::from_raw_parts(array, used_n) };
        if present.contains(&gid) {
            return SUCCESS;
        }
    }
    let mut array = array;
    if used_n == cap_n {
        if limit > 0 && cap >= limit {
            // No room allowed: glibc stops adding groups, not an error.
            return SUCCESS;
        }
        let mut new_cap = cap.saturating_mul(2).max(1);
        if limit > 0 {
            new_cap = new_cap.min(limit);
        }
        let Some(bytes) = usize::try_from(new_cap)
            .ok()
            .and_then(|n| n.checked_mul(std::mem::size_of::<gid_t>()))
        else {
            return INVALID;
        };
        // SAFETY: array is null or glibc's malloc'd gid array (contract), so realloc is the
        // right allocator; on failure the old block stays valid and owned by glibc.
        let grown = unsafe { libc::realloc(array.cast(), bytes) }.cast::<gid_t>();
        if grown.is_null() {
            return Outcome {
                status: NSS_STATUS_TRYAGAIN,
                errno: libc::ENOMEM,
            };
        }
        array = grown;
        // SAFETY: groupsp and size valid for writes (contract); hand the new block back.
        unsafe {
            *groupsp = array;
            *size = new_cap;
        }
    }
    // SAFETY: array has room for more than `used` gids (grown above if needed), and start is
    // valid for writes (contract).
    unsafe {
        array.add(used_n).write(gid);
        *start = used + 1;
    }
    SUCCESS
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn c_name_bounds_and_utf8() {
        let ok = std::ffi::CString::new("alice@root@web-01").unwrap();
        // SAFETY: NUL-terminated CString.
        assert_eq!(unsafe { c_name(ok.as_ptr()) }, Some("alice@root@web-01"));
        let long = std::ffi::CString::new("a".repeat(MAX_LOGIN_LEN + 1)).unwrap();
        // SAFETY: NUL-terminated CString.
        assert_eq!(unsafe { c_name(long.as_ptr()) }, None);
        let bad = std::ffi::CString::new(vec![0xffu8, b'a']).unwrap();
        // SAFETY: NUL-terminated CString.
        assert_eq!(unsafe { c_name(bad.as_ptr()) }, None);
        // SAFETY: null is tolerated.
        assert_eq!(unsafe { c_name(std::ptr::null()) }, None);
    }

    #[test]
    fn add_group_grows_dedups_and_respects_limit() {
        // SAFETY: malloc'd array of 1 gid as glibc would pass it.
        let mut array = unsafe { libc::malloc(std::mem::size_of::<gid_t>()) }.cast::<gid_t>();
        assert!(!array.is_null());
        // SAFETY: array has room for one gid.
        unsafe { array.write(100) };
        let (mut start, mut size) = (1 as c_long, 1 as c_long);
        // SAFETY: valid pointers to locals and the malloc'd array.
        let o = unsafe { add_group(64000, &mut start, &mut size, &mut array, 0) };
        assert_eq!(o, SUCCESS);
        assert_eq!((start, size), (2, 2));
        // SAFETY: two initialised gids.
        assert_eq!(
            unsafe { std::slice::from_raw_parts(array, 2) },
            &[100, 64000]
        );
        // SAFETY: as above.
        let o = unsafe { add_group(64000, &mut start, &mut size, &mut array, 0) };
        assert_eq!((o, start), (SUCCESS, 2), "no duplicate");
        // SAFETY: as above; the limit (2) is reached, nothing is added.
        let o = unsafe { add_group(64001, &mut start, &mut size, &mut array, 2) };
        assert_eq!((o, start, size), (SUCCESS, 2, 2));
        // SAFETY: free glibc-style array.
        unsafe { libc::free(array.cast()) };
    }

    #[test]
    fn run_catches_panics_and_reports_errno() {
        let mut errno: c_int = 0;
        // SAFETY: errno is a valid c_int.
        let st = unsafe { run(&mut errno, || std::panic::panic_any("boom")) };
        assert_eq!((st, errno), (NSS_STATUS_UNAVAIL, libc::EIO));
        let mut errno: c_int = 0;
        // SAFETY: as above.
        let st = unsafe { run(&mut errno, || ERANGE) };
        assert_eq!((st, errno), (NSS_STATUS_TRYAGAIN, libc::ERANGE));
        // SAFETY: null errnop is tolerated.
        assert_eq!(
            unsafe { run(std::ptr::null_mut(), || NOTFOUND) },
            NSS_STATUS_NOTFOUND
        );
    }
}
