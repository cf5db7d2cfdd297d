//! The one source of "now" for every rule that depends on time: disclosure
//! and break-glass expiry, audit timestamps. Tests set it instead of
//! sleeping; in service it is the system clock.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// Now, or a time a test has set.
#[derive(Debug, Default)]
pub struct Clock {
    fixed: Mutex<Option<DateTime<Utc>>>,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        self.fixed
            .lock()
            .map(|f| f.unwrap_or_else(Utc::now))
            .unwrap_or_else(|_| Utc::now())
    }

    /// Stop the clock at `t` (`None`: follow the system clock again).
    pub fn set(&self, t: Option<DateTime<Utc>>) {
        if let Ok(mut f) = self.fixed.lock() {
            *f = t;
        }
    }

    /// Move a set clock (or the system time) forward by `d`, and stop it there.
    pub fn advance(&self, d: chrono::Duration) {
        let t = self.now() + d;
        self.set(Some(t));
    }
}

/// The stored form of a time: UTC, microseconds, fixed width, so that text
/// order is time order in both index engines.
pub fn stamp(t: DateTime<Utc>) -> String {
    // Written field by field: chrono's `format` parses its pattern on every
    // call, and every search and audit event takes a stamp.
    use chrono::{Datelike, Timelike};
    use std::fmt::Write as _;
    let mut out = String::with_capacity(27);
    let year = t.year();
    // Writing into a `String` cannot fail. Outside 0..=9999 the year has a
    // sign, as chrono writes `%Y`.
    let _ = if (0..=9999).contains(&year) {
        write!(out, "{year:04}")
    } else {
        write!(out, "{year:+05}")
    };
    let _ = write!(
        out,
        "-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        // A leap second is second 60: chrono keeps it as nanoseconds past 10^9.
        t.second() + t.nanosecond() / 1_000_000_000,
        t.nanosecond() % 1_000_000_000 / 1000
    );
    out
}

/// Parse an RFC 3339 time from an API request into UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sort_as_times() {
        let a = parse("2026-11-25T09:00:00+09:00").unwrap();
        let b = parse("2026-11-25T00:00:00.5Z").unwrap();
        assert_eq!(stamp(a), "2026-11-25T00:00:00.000000Z");
        assert!(stamp(a) < stamp(b));
        let c = Clock::default();
        c.set(Some(a));
        c.advance(chrono::Duration::hours(4));
        assert_eq!(stamp(c.now()), "2026-11-25T04:00:00.000000Z");
        // The same text as chrono's pattern, leap second included.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_234_567_891))
            .unwrap()
            .and_utc();
        let year = |y| {
            chrono::NaiveDate::from_ymd_opt(y, 1, 2)
                .and_then(|d| d.and_hms_opt(3, 4, 5))
                .unwrap()
                .and_utc()
        };
        let extremes = [year(-1), year(0), year(999), year(10_000)];
        for t in [a, b, leap, Utc::now(), DateTime::UNIX_EPOCH]
            .into_iter()
            .chain(extremes)
        {
            assert_eq!(stamp(t), t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        }
    }
}
