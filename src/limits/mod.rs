//! Pure limiter maths: `(rule, state, now) -> verdict`, no I/O and no clock.
//!
//! Every kind splits a decision in two steps so that a request covered by
//! several limits can be decided atomically by a store: [`Rule::evaluate`]
//! looks without counting, [`Rule::record`] counts an admitted request.

mod calendar;
mod rolling;

pub use calendar::{format_rfc3339, month_bounds};
pub use rolling::RollingLog;

use crate::clock::{Nanos, SECOND};

/// A window length for fixed and rolling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// A span of whole seconds (at least one), held in nanoseconds.
    Span(Nanos),
    /// The calendar month, UTC.
    Month,
}

impl Window {
    /// Start and end of the window containing `now`, aligned to the Unix epoch
    /// (spans) or to the first of the month at 00:00 UTC (months).
    pub fn bounds(self, now: Nanos) -> (Nanos, Nanos) {
        match self {
            Window::Span(len) => {
                let start = now - now % len;
                (start, start + len)
            }
            Window::Month => month_bounds(now),
        }
    }

    /// The window length in seconds at `now` (a month's length depends on it).
    pub fn len_secs(self, now: Nanos) -> u64 {
        let (start, end) = self.bounds(now);
        (end - start) / SECOND
    }
}

/// One limit's rule with its numbers, validated at config load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// At most `requests` per epoch-aligned window.
    Fixed {
        /// Requests admitted per window (at least 1).
        requests: u32,
        /// The window.
        window: Window,
    },
    /// At most `requests` in any interval of `window` (whole seconds).
    Rolling {
        /// Requests admitted per interval (at least 1).
        requests: u32,
        /// The interval length in nanoseconds, a whole number of seconds.
        window: Nanos,
    },
    /// GCRA token bucket: one token every `interval`, at most `burst` saved.
    Bucket {
        /// Bucket capacity in requests (at least 1).
        burst: u32,
        /// Time to earn one token, in nanoseconds (at least 1).
        interval: Nanos,
    },
    /// At most `max` exchanges in flight; a slot is taken by
    /// [`record`](Rule::record) and given back by [`release`](Rule::release).
    Concurrency {
        /// Slots (at least 1).
        max: u32,
        /// What a refusal's `Retry-After` says, in nanoseconds.
        retry_after: Nanos,
    },
}

/// What a counter holds between requests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CounterState {
    /// Count within the window that starts at `window_start`.
    Fixed {
        /// Start of the window the count belongs to.
        window_start: Nanos,
        /// Requests admitted in that window.
        count: u32,
    },
    /// Admissions per second still inside the rolling window (boxed: the
    /// common kinds stay 16 bytes).
    Rolling(Box<RollingLog>),
    /// Theoretical arrival time of the next request (GCRA).
    Bucket {
        /// When the bucket is full again.
        tat: Nanos,
    },
    /// Exchanges holding a slot.
    Concurrency {
        /// Slots taken.
        in_flight: u32,
    },
}

/// One limit's verdict for one request, with what the headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether this limit admits the request.
    pub admitted: bool,
    /// The limit shown to clients (`requests`, or `burst` for buckets).
    pub limit: u32,
    /// Requests counted in the window: after this one when admitted, before it when refused.
    pub used: u32,
    /// Remaining after this request (0 when refused).
    pub remaining: u32,
    /// When the limit resets: end of the fixed window, exit of the oldest
    /// rolling admission, or the moment the bucket is full again.
    pub reset_at: Nanos,
    /// When a refused request would be admitted (equals `now` when admitted).
    pub retry_at: Nanos,
}

impl Verdict {
    /// The verdict of a counting limit holding `used` of `limit`: admitted
    /// while there is room; when refused, admissible again at `retry_at`.
    fn of_count(limit: u32, used: u32, now: Nanos, reset_at: Nanos, retry_at: Nanos) -> Self {
        let admitted = used < limit;
        Self {
            admitted,
            limit,
            used: if admitted { used + 1 } else { used },
            remaining: if admitted { limit - used - 1 } else { 0 },
            reset_at,
            retry_at: if admitted { now } else { retry_at },
        }
    }

    /// This verdict as seen when the request was not counted after all
    /// (another limit refused it): the admitting limit's figures stay as they were.
    pub fn uncounted(self) -> Self {
        if !self.admitted {
            return self;
        }
        Self {
            used: self.used.saturating_sub(1),
            remaining: (self.remaining + 1).min(self.limit),
            ..self
        }
    }
}

impl Rule {
    /// A fresh counter for this rule.
    pub fn new_state(&self) -> CounterState {
        match self {
            Rule::Fixed { .. } => CounterState::Fixed {
                window_start: 0,
                count: 0,
            },
            Rule::Rolling { .. } => CounterState::Rolling(Box::default()),
            Rule::Bucket { .. } => CounterState::Bucket { tat: 0 },
            Rule::Concurrency { .. } => CounterState::Concurrency { in_flight: 0 },
        }
    }

    /// Whether `state` was made for this kind of rule.
    pub fn fits(&self, state: &CounterState) -> bool {
        matches!(
            (self, state),
            (Rule::Fixed { .. }, CounterState::Fixed { .. })
                | (Rule::Rolling { .. }, CounterState::Rolling(_))
                | (Rule::Bucket { .. }, CounterState::Bucket { .. })
                | (Rule::Concurrency { .. }, CounterState::Concurrency { .. })
        )
    }

    /// The limit shown in headers: `requests`, or `burst` for a bucket.
    pub fn shown_limit(&self) -> u32 {
        match *self {
            Rule::Fixed { requests, .. } | Rule::Rolling { requests, .. } => requests,
            Rule::Bucket { burst, .. } => burst,
            Rule::Concurrency { max, .. } => max,
        }
    }

    /// Whether this is a concurrency limit (held for the whole exchange).
    pub fn is_concurrency(&self) -> bool {
        matches!(self, Rule::Concurrency { .. })
    }

    /// Decides whether one more request at `now` fits, without counting it.
    /// May drop expired history from `state` (never changes what it admits).
    pub fn evaluate(&self, state: &mut CounterState, now: Nanos) -> Verdict {
        if !self.fits(state) {
            *state = self.new_state();
        }
        match (*self, state) {
            (
                Rule::Fixed { requests, window },
                CounterState::Fixed {
                    window_start,
                    count,
                },
            ) => {
                let (start, end) = window.bounds(now);
                let used = if *window_start == start { *count } else { 0 };
                Verdict::of_count(requests, used, now, end, end)
            }
            (Rule::Rolling { requests, window }, CounterState::Rolling(log)) => {
                log.prune(now, window);
                let used = log.total();
                let oldest_exit = log
                    .oldest_exit(window)
                    .unwrap_or_else(|| RollingLog::exit_of(now, window));
                let retry_at = if used < requests {
                    now
                } else {
                    log.exit_when_count_drops_by(used + 1 - requests, window)
                };
                Verdict::of_count(requests, used, now, oldest_exit, retry_at)
            }
            (Rule::Bucket { burst, interval }, CounterState::Bucket { tat }) => {
                let tolerance = interval * burst as Nanos;
                let tat = (*tat).max(now);
                let next_tat = tat + interval;
                let admitted = next_tat <= now + tolerance;
                if admitted {
                    let remaining = ((now + tolerance - next_tat) / interval) as u32;
                    Verdict {
                        admitted,
                        limit: burst,
                        used: burst - remaining,
                        remaining,
                        reset_at: next_tat,
                        retry_at: now,
                    }
                } else {
                    Verdict {
                        admitted,
                        limit: burst,
                        used: burst,
                        remaining: 0,
                        reset_at: tat,
                        retry_at: next_tat - tolerance,
                    }
                }
            }
            (Rule::Concurrency { max, retry_after }, CounterState::Concurrency { in_flight }) => {
                let (reset_at, retry_at) = if *in_flight < max {
                    (now, now)
                } else {
                    (now + retry_after, now + retry_after)
                };
                Verdict::of_count(max, *in_flight, now, reset_at, retry_at)
            }
            // `fits` was ensured above.
            _ => unreachable_verdict(now),
        }
    }

    /// Counts one admitted request at `now`. Call only after every limit of
    /// the request admitted it.
    pub fn record(&self, state: &mut CounterState, now: Nanos) {
        if !self.fits(state) {
            *state = self.new_state();
        }
        match (*self, state) {
            (
                Rule::Fixed { window, .. },
                CounterState::Fixed {
                    window_start,
                    count,
                },
            ) => {
                let (start, _) = window.bounds(now);
                if *window_start != start {
                    *window_start = start;
                    *count = 0;
                }
                *count = count.saturating_add(1);
            }
            (Rule::Rolling { .. }, CounterState::Rolling(log)) => log.push(now),
            (Rule::Bucket { interval, .. }, CounterState::Bucket { tat }) => {
                *tat = (*tat).max(now) + interval;
            }
            (Rule::Concurrency { .. }, CounterState::Concurrency { in_flight }) => {
                *in_flight = in_flight.saturating_add(1);
            }
            _ => {}
        }
    }

    /// Gives back one concurrency slot (the exchange ended). No-op for window kinds.
    pub fn release(&self, state: &mut CounterState) {
        if let CounterState::Concurrency { in_flight } = state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Takes back one request counted at `at` (a request refused after
    /// admission, e.g. a streamed body over its size limit). A window that has
    /// moved on since is left alone; concurrency slots are given back by
    /// [`release`](Rule::release) instead.
    pub fn unrecord(&self, state: &mut CounterState, at: Nanos) {
        match (*self, state) {
            (
                Rule::Fixed { window, .. },
                CounterState::Fixed {
                    window_start,
                    count,
                },
            ) if *window_start == window.bounds(at).0 => {
                *count = count.saturating_sub(1);
            }
            (Rule::Rolling { .. }, CounterState::Rolling(log)) => log.remove(at),
            (Rule::Bucket { interval, .. }, CounterState::Bucket { tat }) => {
                *tat = tat.saturating_sub(interval);
            }
            _ => {}
        }
    }

    /// When `state` no longer holds anything this rule would count: after that
    /// the counter may be evicted without changing any decision.
    pub fn expires_at(&self, state: &CounterState) -> Nanos {
        match (*self, state) {
            (Rule::Fixed { window, .. }, CounterState::Fixed { window_start, .. }) => {
                window.bounds(*window_start).1
            }
            (Rule::Rolling { window, .. }, CounterState::Rolling(log)) => {
                log.newest_exit(window).unwrap_or(0)
            }
            (Rule::Bucket { .. }, CounterState::Bucket { tat }) => *tat,
            // Never evicted while a slot is held.
            (Rule::Concurrency { .. }, CounterState::Concurrency { in_flight })
                if *in_flight > 0 =>
            {
                Nanos::MAX
            }
            _ => 0,
        }
    }
}

fn unreachable_verdict(now: Nanos) -> Verdict {
    Verdict {
        admitted: false,
        limit: 0,
        used: 0,
        remaining: 0,
        reset_at: now + SECOND,
        retry_at: now + SECOND,
    }
}

#[cfg(test)]
mod tests;
