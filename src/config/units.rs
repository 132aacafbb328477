//! Parsing of the config's human units: durations, sizes and rates.

use std::time::Duration;

use serde::Deserialize;

/// The units a duration may use: milliseconds, seconds, minutes, hours,
/// days, weeks. (humantime also reads `M` as a 30-day month, `min`,
/// `minute`, `y`...: refused here, so a config means one thing.)
const DURATION_UNITS: [&str; 6] = ["ms", "s", "m", "h", "d", "w"];

/// What a duration error says is accepted.
const DURATION_HELP: &str = "a whole number with ms, s, m, h, d or w, or several together, e.g. \"250ms\", \"30s\", \"1m\", \"1h30m\", \"7d\", \"2w\"";

/// Parses `"250ms"`, `"10s"`, `"1m"`, `"1h30m"`, `"1d"`, `"2w"`: whole
/// numbers with one of [`DURATION_UNITS`] each, written together without
/// spaces (the value itself computed by `humantime`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("empty duration: expected {DURATION_HELP}"));
    }
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let after = &rest[digits..];
        let unit_len = after.len()
            - after
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let unit = &after[..unit_len];
        if digits == 0 || !DURATION_UNITS.contains(&unit) {
            return Err(format!(
                "invalid duration {text:?}: expected {DURATION_HELP}"
            ));
        }
        rest = &after[unit_len..];
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (expected {DURATION_HELP})"))
}

/// A size as written in the config: integer bytes or a string with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// Plain bytes.
    Bytes(u64),
    /// `"10KB"`/`"10MB"`/`"1GB"` (powers of 1000) or `"10KiB"`/`"10MiB"`/`"1GiB"` (powers of 1024).
    Text(String),
}

/// Resolves a [`RawSize`] to bytes.
pub fn parse_size(raw: &RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Bytes(n) => Ok(*n),
        RawSize::Text(text) => parse_size::Config::new()
            .with_decimal()
            .parse_size(text.trim())
            .map_err(|e| {
                format!("invalid size {text:?}: {e} (expected e.g. 1048576, \"10MB\", \"10MiB\")")
            }),
    }
}

/// Parses a bucket rate `"10/s"`, `"300/m"`, `"1000/h"`, `"5/10s"` into
/// (requests, period).
pub fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let err = || {
        format!(
            "invalid rate {text:?}: expected REQUESTS/PERIOD, e.g. \"10/s\", \"300/m\", \"1000/h\""
        )
    };
    let (count, period) = text.trim().split_once('/').ok_or_else(err)?;
    let count: u32 = count.trim().parse().map_err(|_| err())?;
    let period = period.trim();
    let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(period)?
    } else {
        parse_duration(&format!("1{period}")).map_err(|_| err())?
    };
    if count == 0 || period.is_zero() {
        return Err(format!(
            "invalid rate {text:?}: requests and period must be above zero"
        ));
    }
    Ok((count, period))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::body::display_size;

    #[test]
    fn durations_as_in_the_spec() {
        for (text, secs) in [
            ("10s", 10),
            ("1m", 60),
            ("30m", 1800),
            ("1h", 3600),
            ("1d", 86_400),
            ("7d", 604_800),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_decimal_and_binary() {
        let p = |s: &str| parse_size(&RawSize::Text(s.into()));
        assert_eq!(p("10KB"), Ok(10_000));
        assert_eq!(p("10MB"), Ok(10_000_000));
        assert_eq!(p("1GB"), Ok(1_000_000_000));
        assert_eq!(p("10KiB"), Ok(10_240));
        assert_eq!(p("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(p("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size(&RawSize::Bytes(42)), Ok(42));
        assert!(p("lots").is_err());
        assert_eq!(display_size(10_000_000), "10 MB");
        assert_eq!(display_size(20 << 20), "20 MiB");
        assert_eq!(display_size(1234), "1234 bytes");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10/s"), Ok((10, Duration::from_secs(1))));
        assert_eq!(parse_rate("300/m"), Ok((300, Duration::from_secs(60))));
        assert_eq!(parse_rate("5/10s"), Ok((5, Duration::from_secs(10))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("x/s").is_err());
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations_use_the_documented_units_only() {
        for (text, secs) in [
            ("250ms", 0.25),
            ("30s", 30.0),
            ("1m", 60.0),
            ("1h30m", 5400.0),
            ("7d", 604_800.0),
            ("2w", 1_209_600.0),
            (" 10s ", 10.0),
            ("1m30s500ms", 90.5),
        ] {
            assert_eq!(
                parse_duration(text).map(|d| d.as_secs_f64()),
                Ok(secs),
                "{text}"
            );
        }
        for bad in [
            "1M", "1 minute", "1min", "1 m", "1y", "1.5s", "s", "10", "-1s", "1h 30m", "month",
            "1µs",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("ms, s, m, h, d or w"), "{bad}: {e}");
        }
    }
}
