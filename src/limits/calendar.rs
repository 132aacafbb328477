//! Calendar arithmetic for `window = "month"` and for `reset_at` timestamps.

use time::format_description::well_known::Rfc3339;
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
    OffsetDateTime::from_unix_timestamp((at / SECOND) as i64)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
