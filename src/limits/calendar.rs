//! Calendar arithmetic for `window = "month"` and for `reset_at` timestamps.

use time::{Date, Month, OffsetDateTime, Time};

use crate::clock::{Nanos, SECOND};

/// Start and end (exclusive) of the calendar month, UTC, that contains `now`.
pub fn month_bounds(now: Nanos) -> (Nanos, Nanos) {
    let secs = (now / SECOND) as i64;
    let Ok(t) = OffsetDateTime::from_unix_timestamp(secs) else {
        return (now, now + 31 * 86_400 * SECOND);
    };
    let (year, month) = (t.year(), t.month());
    let (next_year, next_month) = if month == Month::December {
        (year + 1, Month::January)
    } else {
        (year, month.next())
    };
    (first_of(year, month), first_of(next_year, next_month))
}

fn first_of(year: i32, month: Month) -> Nanos {
    Date::from_calendar_date(year, month, 1)
        .map(|d| d.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp())
        .map(|s| s.max(0) as Nanos * SECOND)
        .unwrap_or(0)
}

/// `at` as an RFC 3339 UTC timestamp with whole seconds, e.g. `2026-05-05T18:30:00Z`.
pub fn format_rfc3339(at: Nanos) -> String {
    let mut out = String::with_capacity(20);
    write_rfc3339(at, &mut out);
    out
}

/// [`format_rfc3339`] appended to `out` (on the refusal path: no allocation,
/// no formatting machinery). Nanoseconds since 1970 end before the year
/// 10000, so the year always has four digits.
pub fn write_rfc3339(at: Nanos, out: &mut String) {
    let Ok(t) = OffsetDateTime::from_unix_timestamp((at / SECOND) as i64) else {
        return;
    };
    let mut digits = [0u8; 20];
    let fields = [
        (t.year().unsigned_abs(), 4, b'-'),
        (u32::from(u8::from(t.month())), 2, b'-'),
        (u32::from(t.day()), 2, b'T'),
        (u32::from(t.hour()), 2, b':'),
        (u32::from(t.minute()), 2, b':'),
        (u32::from(t.second()), 2, b'Z'),
    ];
    let mut at = 0;
    for (value, width, after) in fields {
        let mut v = value;
        for i in (0..width).rev() {
            digits[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        digits[at + width] = after;
        at += width + 1;
    }
    // Digits and ASCII separators only.
    out.push_str(std::str::from_utf8(&digits[..at]).unwrap_or_default());
}

/// The `time` crate's RFC 3339 text, the reference [`write_rfc3339`] is tested against.
#[cfg(test)]
pub(crate) fn rfc3339_by_time(at: Nanos) -> String {
    OffsetDateTime::from_unix_timestamp((at / SECOND) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
