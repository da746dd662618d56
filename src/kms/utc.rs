//! UTC timestamps in the one format the Alibaba Cloud API uses everywhere:
//! `yyyy-MM-ddTHH:mm:ssZ` (`Timestamp`, `x-acs-date`, the metadata service's `Expiration`).
//!
//! Hand-written so the client needs no date library: the civil-calendar conversion is
//! Howard Hinnant's `days_from_civil` / `civil_from_days`.
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `t` as `yyyy-MM-ddTHH:mm:ssZ` (seconds precision, UTC). Times before 1970 are
/// clamped to the epoch: nothing here ever signs a request dated in the past century.
pub fn format(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses `yyyy-MM-ddTHH:mm:ssZ` (an optional fractional part before `Z` is accepted and
/// dropped). Returns `None` for anything else, including out-of-range fields.
pub fn parse(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let time = time.split_once('.').map_or(time, |(whole, frac)| {
        if frac.bytes().all(|b| b.is_ascii_digit()) {
            whole
        } else {
            "invalid"
        }
    });
    let mut dp = date.split('-');
    let y: i64 = num(dp.next()?, 4)?;
    let mo: u32 = num(dp.next()?, 2)?;
    let d: u32 = num(dp.next()?, 2)?;
    if dp.next().is_some() {
        return None;
    }
    let mut tp = time.split(':');
    let h: u64 = num(tp.next()?, 2)?;
    let mi: u64 = num(tp.next()?, 2)?;
    let sec: u64 = num(tp.next()?, 2)?;
    if tp.next().is_some() {
        return None;
    }
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let days = u64::try_from(days).ok()?;
    let total = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + sec)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(total))
}

fn num<T: std::str::FromStr>(s: &str, width: usize) -> Option<T> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(format(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2024-05-01T08:30:00Z = 1714552200
        let t = UNIX_EPOCH + Duration::from_secs(1_714_552_200);
        assert_eq!(format(t), "2024-05-01T08:30:00Z");
        assert_eq!(parse("2024-05-01T08:30:00Z"), Some(t));
        // leap day
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format(t), "2000-02-29T00:00:00Z");
        assert_eq!(
            parse("2017-11-01T05:20:01.123Z"),
            parse("2017-11-01T05:20:01Z")
        );
    }

    #[test]
    fn round_trips_over_a_wide_range() {
        let mut s: u64 = 0;
        while s < 8_000_000_000 {
            let t = UNIX_EPOCH + Duration::from_secs(s);
            assert_eq!(parse(&format(t)), Some(t), "{s}");
            s += 86_400 * 17 + 3_599;
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2024-05-01 08:30:00Z",
            "2024-05-01T08:30:00",
            "2024-5-01T08:30:00Z",
            "2024-02-30T08:30:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T08:30:00+08:00",
            "2024-05-01T08:30:00.x1Z",
            "+024-05-01T08:30:00Z",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
