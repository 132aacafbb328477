//! The rate-limit headers on every answer: `X-RateLimit-*`,
//! `RateLimit`/`RateLimit-Policy`, `Retry-After`, in the configured format.

use std::fmt::Write as _;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::refusal::{Counts, RateLimited};
use super::text::num_value;
use crate::clock::{secs_until_ceil, Nanos, SECOND};
use crate::limits::{HeaderTrio, LimitSpec, Rule, Verdict};

/// How `X-RateLimit-Reset` is expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetFormat {
    /// Unix seconds.
    Unix,
    /// Seconds from now.
    Seconds,
}

/// Validated `[headers]` settings.
#[derive(Debug, Clone)]
pub struct HeaderSettings {
    /// The main trio (`X-RateLimit-Limit/-Remaining/-Reset`).
    pub main: HeaderTrio,
    /// `{prefix}-Type`.
    pub kind: HeaderName,
    /// Unix or relative reset.
    pub reset: ResetFormat,
    /// Also on forwarded responses.
    pub on_success: bool,
    /// Also `RateLimit-Policy` / `RateLimit`.
    pub ietf: bool,
    /// Pin the main trio to this limit name where it applies.
    pub primary: Option<String>,
    /// How the names above are spelled on HTTP/1.1.
    pub spellings: Arc<crate::wire::header_case::Spellings>,
}

/// One limit of the request with its verdict.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    /// The limit.
    pub spec: &'a LimitSpec,
    /// What it decided for this request.
    pub verdict: Verdict,
}

/// The rate-limit headers for one request. `refused` marks a 429.
pub fn rate_headers(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    now: Nanos,
    refused: bool,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4 + checked.len() * 3);
    write_rate_headers(settings, checked, now, refused, &mut h);
    h
}

/// [`rate_headers`], inserted into `h` (replacing same-named headers).
pub fn write_rate_headers(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    now: Nanos,
    refused: bool,
    h: &mut HeaderMap,
) {
    let reset_value = |at: Nanos| match settings.reset {
        ResetFormat::Unix => num_value(at.div_ceil(SECOND)),
        ResetFormat::Seconds => num_value(secs_until_ceil(now, at)),
    };
    // A limit's own trio (a balance's `X-Credits-*` too) whatever the primary.
    for Checked { spec, verdict: v } in checked {
        if let Some(trio) = &spec.headers {
            h.insert(trio.limit.clone(), limit_value(spec, v));
            h.insert(trio.remaining.clone(), remaining_value(v));
            h.insert(trio.reset.clone(), reset_value(v.reset_at));
        }
    }
    let Some(primary) = primary_index(settings, checked, refused) else {
        return;
    };
    let Checked { spec, verdict: v } = checked[primary];
    h.insert(settings.main.limit.clone(), limit_value(spec, &v));
    h.insert(settings.main.remaining.clone(), remaining_value(&v));
    h.insert(settings.main.reset.clone(), reset_value(v.reset_at));
    if refused {
        if let Some(Checked { spec, .. }) = refusing(checked) {
            if let Some(v) = &spec.name_value {
                h.insert(settings.kind.clone(), v.clone());
            }
        }
    }
    if settings.ietf {
        let mut policy = String::new();
        // Slots, jobs and balances are not quotas over time: they have no place in RateLimit-Policy.
        for Checked { spec, verdict: v } in checked.iter().filter(|c| c.spec.rule.is_quota()) {
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            sf_string(&spec.name, &mut policy);
            let _ = write!(policy, ";q={};w={}", v.limit, spec.window_secs(now));
        }
        let mut current = String::new();
        sf_string(&spec.name, &mut current);
        let _ = write!(
            current,
            ";r={};t={}",
            v.remaining,
            secs_until_ceil(now, v.reset_at)
        );
        if let Ok(v) = HeaderValue::from_str(&policy) {
            if !policy.is_empty() {
                h.insert(HeaderName::from_static("ratelimit-policy"), v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&current) {
            h.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
}

/// The limit that refused (the one needing the longest wait), if any. A
/// credits balance is not among them: it refuses with its own 402, and
/// waiting does not refill it.
pub fn refusing<'a, 'b>(checked: &'a [Checked<'b>]) -> Option<&'a Checked<'b>> {
    checked
        .iter()
        .filter(|c| {
            !c.verdict.admitted && !c.spec.shadow && !matches!(c.spec.rule, Rule::Credits(_))
        })
        .reduce(|best, c| {
            if c.verdict.retry_at > best.verdict.retry_at {
                c
            } else {
                best
            }
        })
}

/// The limit the main `X-RateLimit-*` trio shows (its index in `checked`):
/// the pinned primary, else the refusing limit, else the quota with the
/// least remaining.
pub fn primary_index(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    refused: bool,
) -> Option<usize> {
    if let Some(name) = &settings.primary {
        let pinned = checked
            .iter()
            .position(|c| &*c.spec.name == name.as_str() && c.spec.rule.is_quota());
        if let Some(i) = pinned {
            return Some(i);
        }
    }
    if refused {
        // Refused by a balance alone (402): the quotas as on an admission.
        if let Some(worst) = refusing(checked) {
            return checked.iter().position(|c| std::ptr::eq(c, worst));
        }
    }
    let mut best: Option<usize> = None;
    for (i, Checked { spec, verdict: v }) in checked.iter().enumerate() {
        if !spec.rule.is_quota() {
            continue;
        }
        if best.is_none_or(|b| v.remaining < checked[b].verdict.remaining) {
            best = Some(i);
        }
    }
    best
}

/// Builds the 429 details from the verdicts of a refused request.
pub fn rate_limited(
    checked: &[Checked<'_>],
    now: Nanos,
    route: &Arc<str>,
    plan: &Arc<str>,
) -> Option<RateLimited> {
    let Checked { spec, verdict: v } = *refusing(checked)?;
    let retry_at = checked
        .iter()
        .filter(|c| !c.verdict.admitted && !c.spec.shadow)
        .map(|c| c.verdict.retry_at)
        .max()
        .unwrap_or(v.retry_at);
    Some(RateLimited {
        name: spec.name.clone(),
        limit: v.limit,
        count: v.used,
        retry_after: secs_until_ceil(now, retry_at).max(1),
        reset_at: v.retry_at,
        reset_in_seconds: secs_until_ceil(now, v.retry_at).max(1),
        window: spec.window_text.clone(),
        route: route.clone(),
        plan: plan.clone(),
        counts: match spec.rule {
            crate::limits::Rule::Jobs(_) => Counts::Jobs,
            crate::limits::Rule::Bucket(_) => Counts::Bucket,
            rule if rule.holds_slot() => Counts::Concurrent,
            _ => Counts::Requests,
        },
    })
}

/// A verdict's limit as a header value: the one made at config load when
/// it is the limit's own figure (no allocation per request).
fn limit_value(spec: &LimitSpec, v: &Verdict) -> HeaderValue {
    if v.limit == spec.rule.shown_limit() {
        spec.limit_value.clone()
    } else {
        num_value(v.limit as u64)
    }
}

/// A verdict's remaining count as a header value (`0`, on every refusal, without allocating).
fn remaining_value(v: &Verdict) -> HeaderValue {
    match v.remaining {
        0 => HeaderValue::from_static("0"),
        n => num_value(n as u64),
    }
}

/// Appends `s` as a Structured Field string (quoted, `\` and `"` escaped).
pub(super) fn sf_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}
