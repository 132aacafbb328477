//! The rule of a limit from its raw fields: one function per kind. Each kind
//! names the fields it takes ([`FIELDS`]); a field of another kind is an
//! error naming it, a required one missing is an error naming the limit.

use std::num::NonZeroU32;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawKind, RawLimit, RawQueue};
use super::units::{parse_duration, parse_rate};
use super::{duration, positive, ConfigError, Source};
use crate::clock::SECOND;
use crate::limits::{
    Bucket, Concurrency, Credits, Fixed, Jobs, QueueSpec, Refill, Rolling, Rule, Window,
};

/// What a limit compiles to: its rule, its window as written (for the
/// `check` table and the counter identity), its queue.
pub(super) type Compiled = (Rule, String, Option<QueueSpec>);

/// Every kind-specific field and the kinds that take it.
const FIELDS: [(&str, &[RawKind]); 11] = [
    ("requests", &[RawKind::Fixed, RawKind::Rolling]),
    ("window", &[RawKind::Fixed, RawKind::Rolling]),
    ("rate", &[RawKind::Bucket]),
    ("burst", &[RawKind::Bucket]),
    ("max", &[RawKind::Concurrency, RawKind::Jobs]),
    ("retry_after", &[RawKind::Concurrency, RawKind::Jobs]),
    ("queue", &[RawKind::Concurrency]),
    ("max_duration", &[RawKind::Jobs]),
    ("grant", &[RawKind::Credits]),
    ("refill", &[RawKind::Credits]),
    (
        "count",
        &[RawKind::Fixed, RawKind::Rolling, RawKind::Bucket],
    ),
];

/// One limit's raw fields with what its errors need.
struct Fields<'a> {
    src: &'a Source,
    span: Range<usize>,
    l: &'a RawLimit,
    kind: RawKind,
}

impl Fields<'_> {
    fn present(&self, field: &str) -> bool {
        let l = self.l;
        match field {
            "requests" => l.requests.is_some(),
            "window" => l.window.is_some(),
            "rate" => l.rate.is_some(),
            "burst" => l.burst.is_some(),
            "max" => l.max.is_some(),
            "retry_after" => l.retry_after.is_some(),
            "queue" => l.queue.is_some(),
            "max_duration" => l.max_duration.is_some(),
            "grant" => l.grant.is_some(),
            "refill" => l.refill.is_some(),
            "count" => l.count.is_some(),
            _ => false,
        }
    }

    /// A field of another kind is an error.
    fn only_own(&self) -> Result<(), ConfigError> {
        for (field, kinds) in FIELDS {
            if self.present(field) && !kinds.contains(&self.kind) {
                return Err(self.src.at(
                    self.span.clone(),
                    format!(
                        "limit {:?}: `{field}` does not apply to a {} limit",
                        self.l.name.get_ref(),
                        self.kind.as_str()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn missing(&self, field: &str) -> ConfigError {
        self.src.at(
            self.span.clone(),
            format!(
                "limit {:?} ({}) needs `{field}`",
                self.l.name.get_ref(),
                self.kind.as_str()
            ),
        )
    }

    fn required<'v, T>(&self, v: &'v Option<T>, field: &str) -> Result<&'v T, ConfigError> {
        v.as_ref().ok_or_else(|| self.missing(field))
    }
}

/// The rule of one limit, its window as written, and its queue: the
/// fields of its kind required, those of other kinds refused.
pub(super) fn compile_rule(
    src: &Source,
    span: Range<usize>,
    l: &RawLimit,
) -> Result<Compiled, ConfigError> {
    let f = Fields {
        src,
        span,
        l,
        kind: l.kind.unwrap_or(RawKind::Fixed),
    };
    f.only_own()?;
    match f.kind {
        RawKind::Fixed | RawKind::Rolling => window_rule(&f),
        RawKind::Bucket => bucket_rule(&f),
        RawKind::Concurrency => concurrency_rule(&f),
        RawKind::Jobs => jobs_rule(&f),
        RawKind::Credits => credits_rule(&f),
    }
}

/// `credits`: a balance of `grant`, set back to it at each `refill`
/// (`"month"` or a whole number of seconds; none: never).
fn credits_rule(f: &Fields<'_>) -> Result<Compiled, ConfigError> {
    let g = f.required(&f.l.grant, "grant")?;
    let grant = u32::try_from(*g.get_ref()).map_err(|_| {
        f.src.at(
            g.span(),
            format!("grant must be a whole number from 0 to {}", u32::MAX),
        )
    })?;
    let (refill, text) = match &f.l.refill {
        None => (Refill::Never, "never".to_owned()),
        Some(r) => (
            Refill::Every(parse_window(f.src, r, false)?),
            r.get_ref().trim().to_owned(),
        ),
    };
    Ok((Rule::Credits(Credits { grant, refill }), text, None))
}

/// `fixed` and `rolling`: `requests` per `window`.
fn window_rule(f: &Fields<'_>) -> Result<Compiled, ConfigError> {
    let requests = positive(f.src, f.required(&f.l.requests, "requests")?, "requests")?;
    let w = f.required(&f.l.window, "window")?;
    let rolling = f.kind == RawKind::Rolling;
    let rule = match (rolling, parse_window(f.src, w, rolling)?) {
        (true, Window::Span(len)) => Rule::Rolling(Rolling {
            requests,
            window: len,
        }),
        (_, window) => Rule::Fixed(Fixed { requests, window }),
    };
    Ok((rule, w.get_ref().trim().to_owned(), None))
}

/// `bucket`: `rate`, `burst` (1 by default).
fn bucket_rule(f: &Fields<'_>) -> Result<Compiled, ConfigError> {
    let r = f.required(&f.l.rate, "rate")?;
    let (count, period) = parse_rate(r.get_ref()).map_err(|m| f.src.at(r.span(), m))?;
    let interval = (period.as_nanos() / count as u128) as u64;
    if interval == 0 {
        return Err(f.src.at(r.span(), "rate is too high"));
    }
    let burst = match &f.l.burst {
        Some(b) => positive(f.src, b, "burst")?,
        None => NonZeroU32::MIN,
    };
    let rule = Rule::Bucket(Bucket { burst, interval });
    Ok((rule, r.get_ref().trim().to_owned(), None))
}

/// `concurrency`: `max` slots, `retry_after` (1 s), an optional `queue`.
fn concurrency_rule(f: &Fields<'_>) -> Result<Compiled, ConfigError> {
    let max = positive(f.src, f.required(&f.l.max, "max")?, "max")?;
    let retry_after = duration(f.src, &f.l.retry_after, Duration::from_secs(1))?;
    let queue = match &f.l.queue {
        Some(q) => Some(compile_queue(f.src, q.get_ref())?),
        None => None,
    };
    let rule = Rule::Concurrency(Concurrency {
        max,
        retry_after: retry_after.as_nanos() as u64,
    });
    Ok((rule, "concurrent".to_owned(), queue))
}

/// `jobs`: `max` jobs in progress, `max_duration` (1 h), `retry_after` (5 s).
fn jobs_rule(f: &Fields<'_>) -> Result<Compiled, ConfigError> {
    let max = positive(f.src, f.required(&f.l.max, "max")?, "max")?;
    let retry_after = duration(f.src, &f.l.retry_after, Duration::from_secs(5))?;
    let max_duration = duration(f.src, &f.l.max_duration, Duration::from_secs(3600))?;
    if max_duration.is_zero() {
        return Err(f.missing("max_duration above zero"));
    }
    let rule = Rule::Jobs(Jobs {
        max,
        max_duration: max_duration.as_nanos() as u64,
        retry_after: retry_after.as_nanos() as u64,
    });
    Ok((rule, "jobs".to_owned(), None))
}

/// A fixed or rolling window: `"month"` (fixed only) or a whole number of
/// seconds, at least one.
pub(super) fn parse_window(
    src: &Source,
    w: &Spanned<String>,
    rolling: bool,
) -> Result<Window, ConfigError> {
    let text = w.get_ref().trim();
    if text == "month" {
        if rolling {
            return Err(src.at(
                w.span(),
                "a rolling window cannot be \"month\": use e.g. \"30d\"",
            ));
        }
        return Ok(Window::Month);
    }
    if text.to_ascii_lowercase().contains("month") {
        return Err(src.at(
            w.span(),
            format!("{text:?} is not a window: write \"month\" for calendar months (UTC), or a duration such as \"30d\""),
        ));
    }
    let d = parse_duration(text).map_err(|m| src.at(w.span(), m))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(src.at(
            w.span(),
            format!("window {text:?} must be a whole number of seconds, at least 1s"),
        ));
    }
    Ok(Window::Span(d.as_secs() * SECOND))
}

/// A concurrency limit's `queue = { max_wait, max_len }` (`max_len` 100 by default).
fn compile_queue(src: &Source, q: &RawQueue) -> Result<QueueSpec, ConfigError> {
    let max_wait =
        parse_duration(q.max_wait.get_ref()).map_err(|m| src.at(q.max_wait.span(), m))?;
    let max_len = match &q.max_len {
        Some(n) => positive(src, n, "max_len")?.get() as usize,
        None => 100,
    };
    Ok(QueueSpec { max_wait, max_len })
}
