//! What every limit kind provides. Each kind is one module (`fixed.rs`,
//! `rolling.rs`, `bucket.rs`, `concurrency.rs`) holding its parameters and
//! implementing [`LimitKind`]; the `kinds!` list in `mod.rs` registers it as
//! a variant of [`Rule`](super::Rule). Its counter state is a variant of
//! [`CounterState`](super::CounterState) (saved in snapshots: variants are
//! appended, never reordered or removed).

use super::{CounterState, Verdict};
use crate::clock::Nanos;

/// One kind of limit. The maths is pure: no clock, no I/O; `now` is passed
/// in. Methods that take a state are only called with a state of the kind's
/// own variant ([`LimitKind::fits`]); given another they change nothing.
pub trait LimitKind: Copy + std::fmt::Debug + PartialEq + Eq {
    /// The config's `kind = "..."` and the admin API's `kind` field.
    const NAME: &'static str;

    /// The kind number of the Redis decision script (`src/store/lua/`).
    const REDIS_KIND: u8;

    /// Whether an admission holds a slot for the whole exchange (given
    /// back by [`LimitKind::release`], not by time).
    const HOLDS_SLOT: bool = false;

    /// Whether it is a quota over time (shown in `X-RateLimit-*` and
    /// `RateLimit-Policy`); slots, jobs and balances are not.
    const QUOTA: bool = true;

    /// A fresh counter.
    fn new_state(&self) -> CounterState;

    /// Whether `state` is this kind's.
    fn fits(state: &CounterState) -> bool;

    /// Whether one more request of `units` fits at `now`, without counting
    /// it. May drop expired history from `state` (never changes what it
    /// admits). Kinds that count slots ignore `units`.
    fn evaluate(&self, state: &mut CounterState, now: Nanos, units: u32) -> Verdict;

    /// Counts an admitted request of `units` at `now`.
    fn record(&self, state: &mut CounterState, now: Nanos, units: u32);

    /// Takes back `units` counted at `at` (refused after admission, a
    /// refund, a lower settled cost); a window that has moved on since is
    /// left alone.
    fn unrecord(&self, _state: &mut CounterState, _at: Nanos, _units: u32) {}

    /// Counts `units` more for a request admitted at `at` (a higher settled
    /// cost), unchecked; a window that has moved on since is left alone.
    fn charge(&self, _state: &mut CounterState, _at: Nanos, _units: u32) {}

    /// Gives back a slot ([`LimitKind::HOLDS_SLOT`] kinds).
    fn release(&self, _state: &mut CounterState) {}

    /// When `state` no longer holds anything this rule would count: after
    /// that the counter may be evicted without changing any decision.
    fn expires_at(&self, state: &CounterState) -> Nanos;

    /// The limit shown in headers (`requests`, a bucket's `burst`, `max`).
    fn shown_limit(&self) -> u32;

    /// The window in seconds at `now`, for `RateLimit-Policy`'s `w` (0: the
    /// kind has no window).
    fn window_secs(&self, _now: Nanos) -> u64 {
        0
    }

    /// One line for `turnstile check`, e.g. `minute 3/1m`.
    fn summary(&self, name: &str, window_text: &str) -> String;

    /// The two numbers the Redis script gets for this limit.
    fn redis_args(&self) -> (u64, u64);
}
