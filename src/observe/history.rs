//! The last 15 minutes of traffic for the dashboard's charts: route totals
//! and jobs in progress noted every [`STEP`] seconds in a ring of [`KEEP`]
//! points, turned into per-interval rates when the dashboard asks (the
//! interval still running included, so new traffic shows at once).
//! Nothing here is recomputed from Prometheus, and nothing grows: the ring
//! holds at most `KEEP` points of one entry per route.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// One route's requests so far, by decision (`forwarded` or a refusal
/// code), and the credits its requests spent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RouteTotals {
    /// The route's name.
    pub route: String,
    /// Requests by decision; decisions never taken are left out.
    pub decisions: std::collections::BTreeMap<&'static str, u64>,
    /// Credits spent (settled figures where they arrived).
    pub credits_spent: u64,
}

impl RouteTotals {
    pub(super) fn split(&self) -> (u64, u64) {
        let forwarded = self.decisions.get("forwarded").copied().unwrap_or(0);
        let all: u64 = self.decisions.values().sum();
        (forwarded, all - forwarded)
    }
}

/// Seconds between points.
pub const STEP: u64 = 10;

/// Points kept: 15 minutes.
pub const KEEP: usize = 90;

/// Totals as they stood at one moment.
#[derive(Debug, Clone)]
struct Point {
    /// Unix seconds.
    at: u64,
    totals: Vec<RouteTotals>,
    jobs: i64,
}

/// The ring of points.
#[derive(Debug, Default)]
pub struct History {
    points: Mutex<VecDeque<Point>>,
}

/// The charts' data: one value per interval ending at `times[i]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Seconds between points.
    pub step: u64,
    /// Unix seconds at which each interval ends (the last one: now).
    pub times: Vec<u64>,
    /// Forwarded requests per second, by route.
    pub forwarded: BTreeMap<String, Vec<f64>>,
    /// Refused requests per second (any refusal), by route.
    pub refused: BTreeMap<String, Vec<f64>>,
    /// Refusals per second over all routes, by reason (the refusal's code).
    pub refused_by_reason: BTreeMap<String, Vec<f64>>,
    /// Credits spent per minute over all routes.
    pub credits_per_minute: Vec<f64>,
    /// Jobs in progress at the end of each interval.
    pub jobs_in_progress: Vec<i64>,
}

impl History {
    /// Notes `totals` at unix second `at` if a step has passed since the
    /// last point (the first call always does).
    pub fn offer(&self, at: u64, jobs: i64, totals: impl FnOnce() -> Vec<RouteTotals>) {
        let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        if points.back().is_some_and(|last| at < last.at + STEP) {
            return;
        }
        if points.len() == KEEP {
            points.pop_front();
        }
        points.push_back(Point {
            at,
            totals: totals(),
            jobs,
        });
    }

    /// The series from the points kept to `now` (unix seconds), whose
    /// totals are `current` and jobs in progress `jobs`.
    pub fn series(&self, now: u64, current: &[RouteTotals], jobs: i64) -> Series {
        let kept = self.points.lock().unwrap_or_else(|p| p.into_inner());
        let last = Point {
            at: now.max(kept.back().map_or(0, |p| p.at)),
            totals: current.to_vec(),
            jobs,
        };
        let points: Vec<&Point> = kept.iter().chain(std::iter::once(&last)).collect();
        let mut s = Series {
            step: STEP,
            ..Series::default()
        };
        let intervals = points.len().saturating_sub(1);
        for (i, pair) in points.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            // The running interval may be a fraction of a second old.
            let seconds = (b.at.saturating_sub(a.at)).max(1) as f64;
            s.times.push(b.at);
            s.jobs_in_progress.push(b.jobs);
            let mut credits = 0u64;
            for route in &b.totals {
                let before = a.totals.iter().find(|t| t.route == route.route);
                let was = |d: &str| {
                    before
                        .and_then(|t| t.decisions.get(d))
                        .copied()
                        .unwrap_or(0)
                };
                let mut refused = 0u64;
                for (decision, n) in &route.decisions {
                    let delta = n.saturating_sub(was(decision));
                    if *decision == "forwarded" {
                        add(
                            &mut s.forwarded,
                            &route.route,
                            i,
                            intervals,
                            per(delta, seconds),
                        );
                    } else {
                        refused += delta;
                        add(
                            &mut s.refused_by_reason,
                            decision,
                            i,
                            intervals,
                            per(delta, seconds),
                        );
                    }
                }
                add(
                    &mut s.refused,
                    &route.route,
                    i,
                    intervals,
                    per(refused, seconds),
                );
                s.forwarded
                    .entry(route.route.clone())
                    .or_insert_with(|| vec![0.0; intervals]);
                credits += route
                    .credits_spent
                    .saturating_sub(before.map_or(0, |t| t.credits_spent));
            }
            s.credits_per_minute
                .push(round(credits as f64 * 60.0 / seconds));
        }
        s
    }
}

/// `n` over `seconds`, to two decimals.
fn per(n: u64, seconds: f64) -> f64 {
    round(n as f64 / seconds)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Adds to interval `i` of `name`'s series (made of `len` zeros if new).
fn add(map: &mut BTreeMap<String, Vec<f64>>, name: &str, i: usize, len: usize, v: f64) {
    let series = map.entry(name.to_owned()).or_insert_with(|| vec![0.0; len]);
    if let Some(slot) = series.get_mut(i) {
        *slot = round(*slot + v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(route: &str, forwarded: u64, limited: u64, credits: u64) -> RouteTotals {
        let mut t = RouteTotals {
            route: route.into(),
            credits_spent: credits,
            ..RouteTotals::default()
        };
        t.decisions.insert("forwarded", forwarded);
        t.decisions.insert("rate_limited", limited);
        t
    }

    #[test]
    fn rates_are_per_interval_and_the_running_one_counts() {
        let h = History::default();
        h.offer(1000, 0, || vec![totals("gen", 0, 0, 0)]);
        h.offer(1005, 0, || panic!("no point before a step has passed"));
        h.offer(1010, 2, || vec![totals("gen", 50, 10, 30)]);
        let s = h.series(1015, &[totals("gen", 60, 20, 30)], 1);
        assert_eq!(s.times, [1010, 1015]);
        assert_eq!(s.forwarded["gen"], [5.0, 2.0]);
        assert_eq!(s.refused["gen"], [1.0, 2.0]);
        assert_eq!(s.refused_by_reason["rate_limited"], [1.0, 2.0]);
        assert_eq!(s.credits_per_minute, [180.0, 0.0]);
        assert_eq!(s.jobs_in_progress, [2, 1]);
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes() {
        let h = History::default();
        for i in 0..(KEEP as u64 + 30) {
            h.offer(i * STEP, 0, || vec![totals("gen", i, 0, 0)]);
        }
        let s = h.series((KEEP as u64 + 30) * STEP, &[totals("gen", 200, 0, 0)], 0);
        assert_eq!(s.times.len(), KEEP);
        assert_eq!(s.forwarded["gen"].len(), KEEP);
        assert!(s.forwarded["gen"][..KEEP - 1].iter().all(|&r| r == 0.1));
    }

    #[test]
    fn a_route_that_appears_later_is_zero_before() {
        let h = History::default();
        h.offer(0, 0, Vec::new);
        h.offer(10, 0, || vec![totals("gen", 10, 0, 0)]);
        let s = h.series(20, &[totals("gen", 10, 0, 0), totals("new", 30, 0, 0)], 0);
        assert_eq!(s.forwarded["gen"], [1.0, 0.0]);
        assert_eq!(s.forwarded["new"], [0.0, 3.0]);
    }
}
