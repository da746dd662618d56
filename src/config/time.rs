//! Strict RFC 3339 UTC timestamps (`2026-01-01T00:00:00Z`) and the OpenSSH
//! `expiry-time` format, without a time crate.
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        _ => 28,
    }
}

fn digits(s: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(b - b'0');
    }
    Some(v)
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ` (UTC, no fraction, no offset, year ≥ 1970).
pub fn parse_rfc3339_utc(s: &str) -> Result<SystemTime, String> {
    const WANT: &str = "expected an RFC 3339 UTC time like \"2026-01-01T00:00:00Z\"";
    let b = s.as_bytes();
    if b.len() != 20 {
        return Err(format!("{WANT}, got {s:?}"));
    }
    let sep_ok = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && b.get(10) == Some(&b'T')
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':')
        && b.get(19) == Some(&b'Z');
    let field = |r: std::ops::Range<usize>| b.get(r).and_then(digits);
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec), true) = (
        field(0..4),
        field(5..7),
        field(8..10),
        field(11..13),
        field(14..16),
        field(17..19),
        sep_ok,
    ) else {
        return Err(format!("{WANT}, got {s:?}"));
    };
    let y = i64::from(y);
    if y < 1970
        || !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || sec > 59
    {
        return Err(format!(
            "{s:?} is not a valid time (year 1970 or later, real month/day, 00:00:00..23:59:59)"
        ));
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
    Ok(UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()))
}

fn utc_parts(t: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400) as u32;
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// Formats as RFC 3339 UTC, `2026-01-01T00:00:00Z` (times before 1970 print as the epoch).
pub fn format_rfc3339_utc(t: SystemTime) -> String {
    let (y, m, d, h, mi, s) = utc_parts(t);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// Formats for OpenSSH's `expiry-time=` option: `YYYYMMDDHHMMSSZ` (UTC; sshd ≥ 9.1 reads the
/// trailing `Z` as UTC in `parse_absolute_time`).
pub fn format_ssh_expiry(t: SystemTime) -> String {
    let (y, m, d, h, mi, s) = utc_parts(t);
    format!("{y:04}{m:02}{d:02}{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn parses_known_instants() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Ok(at(0)));
        assert_eq!(
            parse_rfc3339_utc("2026-01-01T00:00:00Z"),
            Ok(at(1_767_225_600))
        );
        assert_eq!(
            parse_rfc3339_utc("2000-02-29T23:59:59Z"),
            Ok(at(951_868_799))
        );
        assert_eq!(
            parse_rfc3339_utc("2038-01-19T03:14:08Z"),
            Ok(at(2_147_483_648))
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+00:00",
            "2026-01-01t00:00:00Z",
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00.5Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:60:00Z",
            "2026-01-01T00:00:60Z",
            "1969-12-31T23:59:59Z",
            "+026-01-01T00:00:00Z",
            "２026-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339_utc(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_roundtrip() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2026-11-29T19:22:37Z",
            "2400-02-29T12:00:00Z",
            "2099-12-31T23:59:59Z",
        ] {
            let t = parse_rfc3339_utc(s).unwrap();
            assert_eq!(format_rfc3339_utc(t), s);
        }
        assert_eq!(format_ssh_expiry(at(1_767_225_600)), "20260101000000Z");
    }
}
