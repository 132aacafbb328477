//! With Redis, the events are written by Redis's scripts to one stream
//! (atomic with the change, numbered by Redis for every instance); each
//! instance copies the whole stream into its ledger on disk, in order,
//! with the stream's numbering — so every instance pages, delivers and
//! rebuilds from the same events under the same ids.

use std::time::{Duration, Instant};

use super::{event, lock, Ledger};
use crate::store::journal::{stream_id, stream_position, Appended, Change, Entry, How, Origin};
use crate::store::RedisStore;

/// The longest a copy waits between two reads of the stream (a request
/// waiting for its charge wakes it at once).
const POLL: Duration = Duration::from_millis(100);
/// Events read at once.
const BATCH: usize = 1000;
/// How long Redis's stream keeps events (each instance's disk keeps them
/// for `retain`); trimmed hourly.
const STREAM_KEEPS: Duration = Duration::from_secs(24 * 3600);
const TRIM_EVERY: Duration = Duration::from_secs(3600);

impl Ledger {
    /// Keeps the ledger in `store`'s stream (set once, before serving).
    pub fn attach_redis(&self, store: &RedisStore) {
        store.set_journal(self.journal());
        let _ = self.inner.redis.set(store.clone());
    }

    /// The Redis store the ledger's events come from, if any.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.inner.redis.get()
    }

    /// Copies `batch` (in stream order) into the ledger; the last position.
    fn copy(&self, batch: &[Appended]) -> u64 {
        let limits = self.inner.limits.load();
        let mut st = lock(&self.inner.state);
        let mut last = 0;
        for a in batch {
            last = stream_position(a.ms, a.seq);
            let Some(subject) = event::subject_of(a.field("s")) else {
                tracing::warn!(event = %format!("{}-{}", a.ms, a.seq), "a ledger event in redis names no subject: not copied");
                continue;
            };
            let Some(change) = change_of(a) else {
                continue;
            };
            let counter = a.field("c").parse().unwrap_or(0);
            let info = limits.get(&counter);
            let origin = (!a.field("r").is_empty()).then(|| Origin {
                request_id: a.field("r").into(),
                route: a.field("o").into(),
                key_fp: a.field("f").into(),
            });
            let job_id = Some(a.field("j")).filter(|j| !j.is_empty());
            let entry = Entry {
                change,
                subject: &subject,
                counter,
                grant: a.field("g").parse().unwrap_or(0),
                amount: a.field("a").parse().unwrap_or(0),
                balance: a.field("b").parse().ok(),
                job_id,
                at: a.ms.saturating_mul(1_000_000),
                origin: origin.as_ref(),
            };
            let threshold = match a.field("t") {
                event::LOW => {
                    let i: usize = a.field("x").parse().unwrap_or(usize::MAX);
                    info.and_then(|i2| i2.alerts.get(i))
                        .map(|al| al.text.clone())
                }
                _ => None,
            };
            st.push(&entry, info, threshold.as_deref(), Some(last));
            if let Some(row) = st.pending.last_mut() {
                row.rkey = Some(a.field("k").to_owned()).filter(|k| !k.is_empty());
            }
        }
        let wake = std::mem::take(&mut st.writer_idle);
        drop(st);
        if wake {
            self.inner.wake.notify_one();
        }
        last
    }
}

/// What an event of the stream records.
fn change_of(a: &Appended) -> Option<Change> {
    Some(match a.field("t") {
        "credits.charged" | event::LOW => Change::Charged,
        "credits.settled" => Change::Settled,
        "credits.refunded" => Change::Refunded,
        "credits.added" => Change::Added,
        "credits.set" => Change::Set,
        "credits.refilled" => Change::Refilled,
        "job.started" => Change::JobStarted,
        "job.ended" => Change::JobEnded(match a.field("h") {
            "cancelled" => How::Cancelled,
            "expired" => How::Expired,
            "admin" => How::Admin,
            "unreadable" => How::Unreadable,
            _ => How::Done,
        }),
        "quota.exhausted" => Change::QuotaExhausted {
            until: a
                .field("u")
                .parse::<u64>()
                .unwrap_or(0)
                .saturating_mul(1_000),
        },
        other => {
            tracing::warn!(
                kind = other,
                "a ledger event in redis of an unknown type: not copied"
            );
            return None;
        }
    })
}

/// Copies Redis's stream into the ledger until aborted, and trims the
/// stream hourly.
pub fn spawn_mirror(ledger: &Ledger) -> Option<tokio::task::JoinHandle<()>> {
    let store = ledger.redis()?.clone();
    let ledger = ledger.clone();
    Some(tokio::spawn(async move {
        let mut after = stream_id(ledger.written());
        let mut trimmed: Option<Instant> = None;
        let mut failing = false;
        loop {
            match store.read_ledger(after, BATCH).await {
                Ok(batch) if !batch.is_empty() => {
                    failing = false;
                    let last = batch.last().map(|a| (a.ms, a.seq));
                    ledger.copy(&batch);
                    if let Some(last) = last {
                        after = last;
                    }
                    continue;
                }
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "the ledger cannot read redis's stream: copying again when it answers");
                    }
                    failing = true;
                }
            }
            if trimmed.is_none_or(|t| t.elapsed() >= TRIM_EVERY) {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let before = now_ms.saturating_sub(STREAM_KEEPS.as_millis() as u64);
                if store.trim_ledger(before).await.is_ok() {
                    trimmed = Some(Instant::now());
                }
            }
            let _ = tokio::time::timeout(POLL, ledger.inner.kick.notified()).await;
        }
    }))
}
