//! After a restart: balances and jobs in progress read back from the
//! ledger, over what the snapshot restored. Each balance is its latest
//! event's (every change writes one, so it is never older than the
//! snapshot's), each jobs counter holds the jobs started and not ended,
//! and the low-balance alerts of the current refill period stay fired.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::{db, event, lock, Ledger, LedgerError};
use crate::clock::Nanos;
use crate::limits::Rule;
use crate::store::journal::{Recorded, RecordedState};
use crate::store::{MemoryStore, Subject};

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebuilt {
    /// Events read.
    pub events: u64,
    /// Balances set from the ledger.
    pub balances: usize,
    /// Jobs in progress put back.
    pub jobs: usize,
    /// How long it took.
    pub took: Duration,
}

/// One counter as the ledger leaves it.
#[derive(Default)]
struct Seen {
    /// The latest balance, the grant it was figured against, and its
    /// time (ms).
    balance: Option<(i64, i64, i64)>,
    /// Jobs started and not ended: id -> start (ms).
    jobs: BTreeMap<String, i64>,
    /// Whether any job event was seen (the ledger then knows its jobs).
    job_events: bool,
    /// Thresholds fired, by refill period.
    low: Vec<(i64, String)>,
}

impl Ledger {
    /// Rebuilds `store`'s balances and jobs from the ledger (call once,
    /// after the snapshot is loaded and the limits are set, before serving).
    pub fn rebuild(&self, store: &MemoryStore) -> Result<Rebuilt, LedgerError> {
        let started = Instant::now();
        let mut seen: HashMap<(String, u64), Seen> = HashMap::new();
        let events = {
            let conn = lock(&self.inner.reader);
            db::replay(&conn, |r| {
                let s = seen.entry((r.subject, r.counter)).or_default();
                match r.kind.as_str() {
                    "job.started" => {
                        s.job_events = true;
                        if let Some(id) = r.job_id {
                            s.jobs.insert(id, r.at_ms);
                        }
                    }
                    "job.ended" => {
                        s.job_events = true;
                        if let Some(id) = r.job_id {
                            s.jobs.remove(&id);
                        }
                    }
                    kind => {
                        if let Some(b) = r.balance {
                            s.balance = Some((b, r.grant, r.at_ms));
                        }
                        if kind == event::LOW {
                            s.low.push((r.at_ms, r.body));
                        }
                    }
                }
            })
            .map_err(|e| LedgerError::Disk {
                path: self.inner.settings.path.display().to_string(),
                error: e.to_string(),
            })?
        };
        let mut done = Rebuilt {
            events,
            ..Rebuilt::default()
        };
        let limits = self.inner.limits.load();
        let now = store.now();
        for ((subject, counter), s) in seen {
            let (Some(subject), Some(info)) = (event::subject_of(&subject), limits.get(&counter))
            else {
                continue;
            };
            match info.rule {
                Rule::Credits(k) => {
                    if let Some((balance, grant, at_ms)) = s.balance {
                        let state = k.restored(balance, grant, nanos(at_ms));
                        store.restore_state(&subject, counter, &info.rule, state);
                        done.balances += 1;
                    }
                    self.refire(&subject, counter, &info.rule, &s.low, now);
                }
                Rule::Jobs(_) if s.job_events => {
                    let jobs: Vec<(String, Nanos)> =
                        s.jobs.into_iter().map(|(id, at)| (id, nanos(at))).collect();
                    done.jobs += store.restore_jobs(&subject, counter, &info.rule, &jobs);
                }
                _ => {}
            }
        }
        done.took = started.elapsed();
        Ok(done)
    }

    /// Marks the alerts the ledger shows fired in the current refill period.
    fn refire(
        &self,
        subject: &Subject,
        counter: u64,
        rule: &Rule,
        low: &[(i64, String)],
        now: Nanos,
    ) {
        let (Rule::Credits(k), Some(info)) =
            (rule, self.inner.limits.load().get(&counter).cloned())
        else {
            return;
        };
        let period = k.period_of(now);
        let mut mask = 0u32;
        for (at_ms, body) in low {
            if k.period_of(nanos(*at_ms)) != period {
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
                continue;
            };
            let text = v
                .get("threshold")
                .and_then(|t| t.as_str())
                .unwrap_or_default();
            if let Some(i) = info.alerts.iter().position(|a| &*a.text == text) {
                mask |= 1 << i.min(31);
            }
        }
        if mask != 0 {
            lock(&self.inner.state)
                .fired
                .insert((subject.clone(), counter), (period, mask));
        }
    }
}

fn nanos(ms: i64) -> Nanos {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

impl super::Inner {
    /// Each Redis counter as the ledger leaves it: a balance's latest
    /// figure, a jobs counter's jobs started and not ended (with when they
    /// expire). Read from disk: call off the async threads.
    pub(super) fn recorded_keys(&self) -> rusqlite::Result<Vec<Recorded>> {
        let limits = self.limits.load();
        let mut balances: HashMap<String, (i64, i64, i64, u64)> = HashMap::new();
        let mut jobs: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
        {
            let conn = lock(&self.reader);
            db::replay_keys(&conn, |r| {
                let Some(info) = limits.get(&r.counter) else {
                    return;
                };
                match (r.kind.as_str(), info.rule) {
                    ("job.started", Rule::Jobs(_)) => {
                        if let Some(id) = r.job_id {
                            jobs.entry(r.rkey).or_default().insert(id, r.at_ms);
                        }
                    }
                    ("job.ended", Rule::Jobs(_)) => {
                        if let Some(id) = r.job_id {
                            jobs.entry(r.rkey).or_default().remove(&id);
                        }
                    }
                    (_, Rule::Credits(_)) => {
                        if let Some(b) = r.balance {
                            let (_, _, refill) = info.rule.redis_args();
                            balances.insert(r.rkey, (b, r.grant, r.at_ms, refill));
                        }
                    }
                    _ => {}
                }
            })?;
        }
        let mut out: Vec<Recorded> = balances
            .into_iter()
            .map(|(key, (balance, grant, at_ms, refill))| Recorded {
                key,
                state: RecordedState::Balance {
                    balance,
                    grant,
                    refill,
                    at: nanos(at_ms),
                },
            })
            .collect();
        for (key, started) in jobs {
            let counter = key
                .rsplit(':')
                .next()
                .and_then(|c| u64::from_str_radix(c, 16).ok());
            let Some(Rule::Jobs(j)) = counter.and_then(|c| limits.get(&c)).map(|i| i.rule) else {
                continue;
            };
            let held: Vec<(String, Nanos)> = started
                .into_iter()
                .map(|(id, at)| (id, nanos(at).saturating_add(j.max_duration)))
                .collect();
            if !held.is_empty() {
                out.push(Recorded {
                    key,
                    state: RecordedState::Jobs(held),
                });
            }
        }
        Ok(out)
    }
}
