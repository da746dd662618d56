//! Audit events: one JSON object per line, to syslog (facility AUTHPRIV, ident `kmsbastion`)
//! and, when `[audit] file` is configured, appended to that file.
//!
//! Events carry names, addresses, secret *names*, VersionIds and key fingerprints: never a
//! secret value. The type makes that structural: [`Event`] has no field that could hold one,
//! and nothing of type `SecretBytes`/`SecretString` can be serialised.
//!
//! The PAM module uses this module too (it has no `client` feature): syslog is written as one
//! datagram to `/dev/log` rather than through `openlog(3)`, so loading the module never changes
//! sshd's own syslog identity.
//!
//! The file is opened by root (the PAM module inside sshd; the broker before it drops
//! privileges), so it is opened without following a symlink and without blocking
//! (`O_NOFOLLOW|O_NONBLOCK`), and anything but a regular file (a FIFO planted there would hang
//! sshd's PAM account step) is refused. Its directory should be root-owned 0755
//! (`/var/log/kmsbastion`) with `audit.log` pre-created `kmsbastion:adm 0640`, as the
//! packages' tmpfiles.d entry does: then no one but root can plant anything there.
#![forbid(unsafe_code)]

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mode of a newly created audit file: readable by its group (the log readers), not by others.
pub const AUDIT_FILE_MODE: u32 = 0o640;

/// The syslog socket.
const DEV_LOG: &str = "/dev/log";
/// syslog facility AUTHPRIV (10 << 3).
const LOG_AUTHPRIV: u8 = 10 << 3;
/// syslog severity "notice".
const LOG_NOTICE: u8 = 5;

/// One audit event. Absent fields are left out of the JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Event {
    /// RFC 3339 UTC time the event was emitted (set by [`Audit::emit`] when empty).
    pub ts: String,
    /// `login`, `session-open`, `session-close`, `connect-start`, `connect-end`, `refused`.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engineer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The engineer's address (PAM_RHOST).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// PAM service name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// KMS secret name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// KMS VersionId(s) used, in order (ACSCurrent, then ACSPrevious on a retry).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub version_ids: Vec<String>,
    /// VersionId that authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// `SHA256:…` of the public key used (key secrets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// `shell`, `exec` or `subsystem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `allow`, `deny`, `ok`, or a failure kind (see `session::Failure::kind`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Human-readable reason (grant denial, failed check, KMS code and RequestId).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Index of the grant rule that allowed the login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Process the event is about (the broker's pid for session events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Event {
    /// A new event of kind `event` with every other field empty.
    pub fn new(event: &'static str) -> Self {
        Self {
            event,
            ..Self::default()
        }
    }

    /// The JSON line (without newline).
    pub fn to_json(&self) -> String {
        // Serialising plain strings and integers cannot fail; fall back to a minimal record.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                "{{\"event\":\"{}\",\"error\":\"unserialisable\"}}",
                self.event
            )
        })
    }
}

/// Where audit events go.
#[derive(Debug)]
pub struct Audit {
    file: Option<File>,
    file_path: Option<PathBuf>,
    syslog: bool,
}

impl Audit {
    /// Open the audit file (append, created 0640) now, so that a process that later drops
    /// privileges keeps writing to it. A file that cannot be opened is reported on syslog and
    /// on stderr and then skipped: the event still reaches syslog.
    pub fn open(file: Option<&Path>, syslog: bool) -> Self {
        let opened = file.and_then(|p| match open_append(p) {
            Ok(f) => Some(f),
            Err(e) => {
                let msg = format!("cannot open audit file {}: {e}", p.display());
                if syslog {
                    send_syslog(3, &msg);
                }
                eprintln!("kmsbastion: {msg}");
                None
            }
        });
        Self {
            file: opened,
            file_path: file.map(Path::to_path_buf),
            syslog,
        }
    }

    /// An audit sink that drops everything (tests, `--no-audit` tools).
    pub fn disabled() -> Self {
        Self {
            file: None,
            file_path: None,
            syslog: false,
        }
    }

    /// Emit one event. Never fails: audit trouble must not turn into a crash inside sshd.
    pub fn emit(&self, event: &Event) {
        let mut event = event.clone();
        if event.ts.is_empty() {
            event.ts = rfc3339(SystemTime::now());
        }
        let line = event.to_json();
        if self.syslog {
            send_syslog(LOG_NOTICE, &line);
        }
        if let Some(mut f) = self.file.as_ref() {
            let mut buf = line.into_bytes();
            buf.push(b'\n');
            // One write(2) per line: with O_APPEND, concurrent writers do not interleave.
            if let Err(e) = f.write_all(&buf) {
                let path = self.file_path.as_deref().unwrap_or(Path::new("?"));
                send_syslog(
                    3,
                    &format!("cannot write audit file {}: {e}", path.display()),
                );
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(AUDIT_FILE_MODE)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    // O_NONBLOCK only matters for what is refused here (a FIFO, a device); it has no effect on
    // a regular file's writes.
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other(
            "not a regular file (refusing a FIFO, device or socket)",
        ));
    }
    Ok(f)
}

/// Send one message to syslog (AUTHPRIV, ident `kmsbastion`) as a datagram to `/dev/log`.
/// A missing syslog daemon is not an error (containers, test namespaces).
pub fn send_syslog(severity: u8, msg: &str) {
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let line = format!(
        "<{}>{} kmsbastion[{}]: {}",
        LOG_AUTHPRIV | (severity & 7),
        syslog_time(SystemTime::now()),
        std::process::id(),
        msg.replace(['\n', '\r'], " ")
    );
    let _ = sock.send_to(line.as_bytes(), DEV_LOG);
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn split_time(t: SystemTime) -> (i64, u32, u32, u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, mo, day) = civil_from_days((secs / 86_400) as i64);
    (y, mo, day, secs % 86_400, d.subsec_millis())
}

/// `2026-11-29T19:30:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, sod, ms) = split_time(t);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

fn syslog_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_, mo, d, sod, _) = split_time(t);
    let name = MONTHS
        .get((mo as usize).saturating_sub(1))
        .unwrap_or(&"Jan");
    format!(
        "{name} {d:>2} {:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensitive::SecretString;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_980_600_123);
        assert_eq!(rfc3339(t), "2026-11-29T19:30:00.123Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(rfc3339(t), "2024-02-29T00:00:00.000Z");
        assert_eq!(
            syslog_time(UNIX_EPOCH + Duration::from_secs(1_709_164_800)),
            "Feb 29 00:00:00"
        );
    }

    #[test]
    fn file_lines_are_json_and_mode_0640() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(&path), false);
        let mut e = Event::new("connect-end");
        e.engineer = Some("alice".into());
        e.account = Some("root".into());
        e.host = Some("web-01".into());
        e.secret = Some("acs/ecs/web-01/root".into());
        e.version_id = Some("v2".into());
        e.exit_status = Some(7);
        e.duration_ms = Some(12);
        audit.emit(&e);
        audit.emit(&Event::new("login"));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["event"], "connect-end");
        assert_eq!(v["exit_status"], 7);
        assert_eq!(v["version_id"], "v2");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("fingerprint").is_none());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn a_secret_never_appears() {
        // The only way a value could get in is through a string field: check that our
        // redacting wrapper cannot leak through formatting into one.
        let secret = SecretString::from("hunter2-very-secret");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(&path), false);
        let mut e = Event::new("connect-end");
        e.reason = Some(format!("password check failed for {secret} / {secret:?}"));
        audit.emit(&e);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("[redacted]"));
    }

    #[test]
    fn a_fifo_or_symlink_is_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.log");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // No reader: a blocking open would fail with ENXIO; with a reader it would succeed.
        // Both cases must end quickly and without a file.
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
            }
        });
        let held = reader.join().unwrap().unwrap();
        let started = std::time::Instant::now();
        let err = open_append(&fifo).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        let audit = Audit::open(Some(&fifo), false);
        assert!(audit.file.is_none());
        audit.emit(&Event::new("login"));
        drop(held);
        assert!(open_append(&fifo).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(
            open_append(&link).is_err(),
            "a symlink must not be followed"
        );
        Audit::open(Some(&link), false).emit(&Event::new("login"));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
    }

    #[test]
    fn unopenable_file_does_not_fail() {
        let audit = Audit::open(Some(Path::new("/nonexistent-dir/x/audit.log")), false);
        audit.emit(&Event::new("login"));
    }
}
