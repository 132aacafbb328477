//! Pure limiter maths: `(rule, state, now) -> verdict`, no I/O and no clock.
//!
//! Every kind splits a decision in two steps so that a request covered by
//! several limits can be decided atomically by a store: [`Rule::evaluate`]
//! looks without counting, [`Rule::record`] counts an admitted request.
//! One module per kind (its parameters and its [`LimitKind`] maths); the
//! `kinds!` list below registers them.
//!
//! May import: [`crate::clock`] only.

mod bucket;
mod calendar;
mod concurrency;
pub mod credits;
mod fixed;
mod jobs;
mod kind;
mod rolling;
mod spec;

pub use bucket::Bucket;
pub use calendar::{format_rfc3339, month_bounds, write_rfc3339};
pub use concurrency::Concurrency;
pub use credits::{Credits, Refill};
pub use fixed::Fixed;
pub use jobs::{Job, Jobs, JobsState};
pub use kind::LimitKind;
pub use rolling::{Rolling, RollingLog};
pub use spec::{HeaderTrio, LimitSpec, Per, QueueSpec};

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

/// Registers the limit kinds: each becomes a variant of [`Rule`] holding its
/// parameters, and every [`Rule`] method dispatches to its [`LimitKind`]
/// implementation. Adding a kind: its module, one line here, its
/// [`CounterState`] variant (appended), its Lua fragment.
macro_rules! kinds {
    ($($variant:ident($kind:ty)),* $(,)?) => {
        /// One limit's rule with its numbers, validated at config load.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Rule {
            $(
                #[doc = concat!("See [`", stringify!($kind), "`].")]
                $variant($kind),
            )*
        }

        impl Rule {
            /// A fresh counter for this rule.
            pub fn new_state(&self) -> CounterState {
                match self { $(Rule::$variant(k) => k.new_state(),)* }
            }

            /// Whether `state` was made for this kind of rule.
            pub fn fits(&self, state: &CounterState) -> bool {
                match self { $(Rule::$variant(_) => <$kind>::fits(state),)* }
            }

            /// The kind's name (`fixed`, `rolling`, `bucket`, `concurrency`, `jobs`).
            pub fn kind_name(&self) -> &'static str {
                match self { $(Rule::$variant(_) => <$kind>::NAME,)* }
            }

            /// Whether an admission holds a slot for the whole exchange.
            pub fn holds_slot(&self) -> bool {
                match self { $(Rule::$variant(_) => <$kind>::HOLDS_SLOT,)* }
            }

            /// Whether this is a quota over time (fixed, rolling, bucket):
            /// only those can be the primary limit of the `X-RateLimit-*`
            /// headers and appear in `RateLimit-Policy`.
            pub fn is_quota(&self) -> bool {
                match self { $(Rule::$variant(_) => <$kind>::QUOTA,)* }
            }

            /// The limit shown in headers: `requests`, or `burst` for a bucket.
            pub fn shown_limit(&self) -> u32 {
                match self { $(Rule::$variant(k) => k.shown_limit(),)* }
            }

            /// The window in seconds at `now` (`RateLimit-Policy`'s `w`).
            pub fn window_secs(&self, now: Nanos) -> u64 {
                match self { $(Rule::$variant(k) => k.window_secs(now),)* }
            }

            /// One line for `turnstile check`.
            pub fn summary(&self, name: &str, window_text: &str) -> String {
                match self { $(Rule::$variant(k) => k.summary(name, window_text),)* }
            }

            /// `(kind number, a, b)` for the Redis decision script.
            pub fn redis_args(&self) -> (u8, u64, u64) {
                match self {
                    $(Rule::$variant(k) => {
                        let (a, b) = k.redis_args();
                        (<$kind>::REDIS_KIND, a, b)
                    })*
                }
            }

            /// Decides whether one more request of `units` (1, or its
            /// cost for limits that count cost) fits at `now`, without
            /// counting it. May drop expired history from `state` (never
            /// changes what it admits).
            pub fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict {
                self.fit(state);
                match self { $(Rule::$variant(k) => k.evaluate(state, now, units),)* }
            }

            /// Counts an admitted request of `units` at `now`. Call only
            /// after every limit of the request admitted it.
            pub fn record(&self, state: &mut CounterState, now: Nanos, units: u32) {
                self.fit(state);
                match self { $(Rule::$variant(k) => k.record(state, now, units),)* }
            }

            /// Takes back `units` counted at `at` (a request refused after
            /// admission, a refund, a settled cost below its estimate). A
            /// window that has moved on since is left alone; slots are given
            /// back by [`release`](Rule::release) instead.
            pub fn unrecord(&self, state: &mut CounterState, at: Nanos, units: u32) {
                if self.fits(state) {
                    match self { $(Rule::$variant(k) => k.unrecord(state, at, units),)* }
                }
            }

            /// Counts `units` more for a request admitted at `at` (a settled
            /// cost above its estimate), without checking the limit: the
            /// upstream already did the work. A window that has moved on
            /// since is left alone.
            pub fn charge(&self, state: &mut CounterState, at: Nanos, units: u32) {
                if self.fits(state) {
                    match self { $(Rule::$variant(k) => k.charge(state, at, units),)* }
                }
            }

            /// Gives back one slot (the exchange ended). No-op for window kinds.
            pub fn release(&self, state: &mut CounterState) {
                if self.fits(state) {
                    match self { $(Rule::$variant(k) => k.release(state),)* }
                }
            }

            /// When `state` no longer holds anything this rule would count:
            /// after that the counter may be evicted without changing any decision.
            pub fn expires_at(&self, state: &CounterState) -> Nanos {
                if !self.fits(state) {
                    return 0;
                }
                match self { $(Rule::$variant(k) => k.expires_at(state),)* }
            }
        }
    };
}

kinds! {
    Fixed(Fixed),
    Rolling(Rolling),
    Bucket(Bucket),
    Concurrency(Concurrency),
    Jobs(Jobs),
    Credits(Credits),
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
    /// Submissions in flight and jobs in progress (boxed: it holds ids).
    Jobs(Box<JobsState>),
    /// Credits spent in the refill period that starts at `period_start`
    /// (negative: topped up above the grant).
    Credits {
        /// Start of the refill period the spending belongs to, in whole
        /// seconds since the epoch (0 without refill; seconds keep the
        /// state 16 bytes like the other kinds').
        period: u32,
        /// Credits spent in it: the balance is the grant minus this.
        spent: i64,
    },
}

impl CounterState {
    /// Whether this counter holds something that forgetting it would give
    /// away (a concurrency slot, a pending submission, a job, a balance
    /// other than the grant): such counters are never evicted under memory
    /// pressure.
    pub fn holds(&self) -> bool {
        match self {
            CounterState::Concurrency { in_flight } => *in_flight > 0,
            CounterState::Jobs(j) => j.in_progress() > 0,
            CounterState::Credits { spent, .. } => *spent != 0,
            _ => false,
        }
    }
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
    /// The verdict of a counting limit holding `used` of `limit` for a
    /// request of `units`: admitted while they fit; when refused,
    /// admissible again at `retry_at`.
    pub(crate) fn of_count(
        limit: u32,
        used: u32,
        units: u32,
        now: Nanos,
        reset_at: Nanos,
        retry_at: Nanos,
    ) -> Self {
        let after = used.saturating_add(units);
        let admitted = after <= limit;
        Self {
            admitted,
            limit,
            used: if admitted { after } else { used },
            remaining: if admitted { limit - after } else { 0 },
            reset_at,
            retry_at: if admitted { now } else { retry_at },
        }
    }

    /// This verdict as seen when the request (of `units`) was not counted
    /// after all (another limit refused it): the admitting limit's figures
    /// stay as they were.
    pub fn uncounted(self, units: u32) -> Self {
        if !self.admitted {
            return self;
        }
        Self {
            used: self.used.saturating_sub(units),
            // Never past the limit for counting kinds; a balance topped up
            // above its grant may be.
            remaining: self.remaining.saturating_add(units),
            ..self
        }
    }
}

impl Rule {
    /// A state of another kind (a reload changed the kind) starts afresh.
    #[inline]
    fn fit(&self, state: &mut CounterState) {
        if !self.fits(state) {
            *state = self.new_state();
        }
    }
}

/// A non-zero figure for tests.
#[cfg(test)]
pub(crate) fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).expect("a non-zero test figure")
}

#[cfg(test)]
mod tests;
