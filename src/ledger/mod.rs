//! The ledger: every change of a credits balance and every job start and
//! end as an event — numbered, written to disk (before the request is
//! forwarded, with `durable = "sync"`), sent to sinks, paged by the admin
//! API, and read back after a crash to rebuild balances and jobs
//! (docs/ledger.md).
//!
//! The stores report each change while the subject is locked
//! ([`crate::store::journal`]); this layer names it (account, limit,
//! route, request), numbers it, adds the low-balance alerts it crosses,
//! and hands it to one writer thread that commits whatever accumulated
//! in one transaction (one fsync for many requests).
//!
//! May import: [`crate::jobs`], [`crate::observe`], [`crate::store`],
//! [`crate::limits`], [`crate::clock`].

mod db;
mod event;
mod mirror;
mod rebuild;
pub mod settings;
mod sink;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use rusqlite::Connection;
use tokio::sync::watch;

pub use settings::{Alert, Durable, LedgerSettings, Level, LimitInfo, SinkKind, SinkSettings};

use crate::clock::Nanos;
use crate::observe::metrics::Metrics;
use crate::store::journal::{Change, Entry, Journal};
use crate::store::Subject;
use event::Row;

/// The longest a request waits for its charge to reach the disk before it
/// is refused (`durable = "sync"`).
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// The ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Its database cannot be opened, read or written.
    #[error("ledger {path}: {error}")]
    Disk {
        /// The database file.
        path: String,
        /// What went wrong.
        error: String,
    },
    /// A charge could not be made durable in time.
    #[error("the ledger cannot write to disk: the request was not forwarded")]
    NotDurable,
}

/// Where the writer got to.
#[derive(Debug, Clone, Copy, Default)]
struct Written {
    /// The last position on disk.
    seq: u64,
    /// The last commit failed (retried every second).
    failing: bool,
}

/// What the stores' entries are turned into, under one lock.
struct State {
    next: u64,
    last_ms: i64,
    pending: Vec<Row>,
    /// Alerts fired: (refill period, one bit per threshold), by counter.
    fired: HashMap<(Subject, u64), (u32, u32)>,
    /// `quota.exhausted` written, until the window's end, by counter.
    exhausted: HashMap<(Subject, u64), Nanos>,
    closed: bool,
    /// The last second's date and time, formatted.
    seconds: event::Seconds,
    /// The writer waits for an entry: the next one wakes it (only then,
    /// so a busy ledger costs no wake-up per entry).
    writer_idle: bool,
}

struct Inner {
    settings: LedgerSettings,
    /// CloudEvents `source`.
    source: String,
    limits: ArcSwap<HashMap<u64, LimitInfo>>,
    state: Mutex<State>,
    wake: Condvar,
    written: watch::Sender<Written>,
    metrics: Arc<Metrics>,
    /// For the admin API's reads (WAL: readers never wait for the writer).
    reader: Mutex<Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Each sink's delivery, by name (the dashboard).
    sinks: Mutex<Vec<SinkStatus>>,
    /// With Redis: the store whose stream this ledger copies, and a
    /// wake-up for the copy (a request waiting for its charge).
    redis: std::sync::OnceLock<crate::store::RedisStore>,
    kick: tokio::sync::Notify,
}

/// How a sink is doing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SinkStatus {
    /// The sink's name.
    pub name: Arc<str>,
    /// Events written and not yet acknowledged by it.
    pub backlog: u64,
    /// Events it acknowledged since start.
    pub delivered: u64,
    /// Its last failure, until a delivery succeeds.
    pub error: Option<String>,
}

/// The ledger. Clones share it.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.settings.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ledger {
    /// Opens (creating) the ledger of `settings` and starts its writer.
    /// `instance` names this turnstile in CloudEvents' `source`.
    pub fn open(
        settings: LedgerSettings,
        instance: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LedgerError> {
        let disk = |e: rusqlite::Error| LedgerError::Disk {
            path: settings.path.display().to_string(),
            error: e.to_string(),
        };
        let writer_conn = db::open(&settings.path).map_err(disk)?;
        let next = db::next_seq(&writer_conn).map_err(disk)?;
        let last_ms = db::last_ms(&writer_conn).map_err(disk)?;
        let reader = db::open(&settings.path).map_err(disk)?;
        let (written, _) = watch::channel(Written {
            seq: next - 1,
            failing: false,
        });
        let inner = Arc::new(Inner {
            source: format!("turnstile/{instance}"),
            limits: ArcSwap::from_pointee(HashMap::new()),
            state: Mutex::new(State {
                next,
                last_ms,
                pending: Vec::new(),
                fired: HashMap::new(),
                exhausted: HashMap::new(),
                closed: false,
                seconds: event::Seconds::default(),
                writer_idle: false,
            }),
            wake: Condvar::new(),
            written,
            metrics,
            reader: Mutex::new(reader),
            writer: Mutex::new(None),
            sinks: Mutex::new(
                settings
                    .sinks
                    .iter()
                    .map(|s| SinkStatus {
                        name: s.name.clone(),
                        backlog: 0,
                        delivered: 0,
                        error: None,
                    })
                    .collect(),
            ),
            redis: std::sync::OnceLock::new(),
            kick: tokio::sync::Notify::new(),
            settings,
        });
        let for_thread = inner.clone();
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || for_thread.write_forever(writer_conn))
            .map_err(|e| LedgerError::Disk {
                path: inner.settings.path.display().to_string(),
                error: e.to_string(),
            })?;
        *lock(&inner.writer) = Some(handle);
        Ok(Self { inner })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &LedgerSettings {
        &self.inner.settings
    }

    /// What the stores write to.
    pub fn journal(&self) -> Arc<dyn Journal> {
        self.inner.clone()
    }

    /// The limits of the config, by counter id (set at start and on reload).
    pub fn set_limits(&self, limits: HashMap<u64, LimitInfo>) {
        self.inner.limits.store(Arc::new(limits));
    }

    /// Waits until position `seq` is on disk (`durable = "sync"`; at once
    /// otherwise, or for `seq` 0). Either way an error while the disk
    /// refuses the ledger's commits: a charge is never made without its
    /// record on its way to disk.
    pub async fn durable(&self, seq: u64) -> Result<(), LedgerError> {
        if seq == 0 {
            return Ok(());
        }
        self.inner.kick.notify_one();
        if self.inner.settings.durable != Durable::Sync {
            return match self.inner.written.borrow().failing {
                true => Err(LedgerError::NotDurable),
                false => Ok(()),
            };
        }
        let mut rx = self.inner.written.subscribe();
        let done = tokio::time::timeout(SYNC_WAIT, async move {
            rx.wait_for(|w| w.seq >= seq || w.failing).await.map(|w| *w)
        });
        match done.await {
            Ok(Ok(w)) if w.seq >= seq => Ok(()),
            _ => Err(LedgerError::NotDurable),
        }
    }

    /// How each sink is doing.
    pub fn sinks(&self) -> Vec<SinkStatus> {
        lock(&self.inner.sinks).clone()
    }

    /// Updates sink `name`'s status.
    fn sink_status(&self, name: &str, f: impl FnOnce(&mut SinkStatus)) {
        if let Some(s) = lock(&self.inner.sinks)
            .iter_mut()
            .find(|s| &*s.name == name)
        {
            f(s);
        }
    }

    /// The last position on disk.
    pub fn written(&self) -> u64 {
        self.inner.written.borrow().seq
    }

    /// Stops the writer after it wrote everything taken so far.
    pub fn close(&self) {
        lock(&self.inner.state).closed = true;
        self.inner.wake.notify_all();
        if let Some(h) = lock(&self.inner.writer).take() {
            let _ = h.join();
        }
    }

    /// Runs `f` on the reading connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let inner = self.inner.clone();
        let path = inner.settings.path.display().to_string();
        let out = tokio::task::spawn_blocking(move || f(&lock(&inner.reader))).await;
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LedgerError::Disk {
                path,
                error: e.to_string(),
            }),
            Err(e) => Err(LedgerError::Disk {
                path,
                error: e.to_string(),
            }),
        }
    }

    /// A page of `account`'s events after event `after` (oldest first):
    /// the events' JSON, and the id to ask after for the next page.
    pub async fn page(
        &self,
        account: String,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, LedgerError> {
        let after = after.and_then(event::seq_of).unwrap_or(0);
        let rows = self
            .read(move |c| db::of_account(c, &account, after, limit))
            .await?;
        let next = (rows.len() == limit)
            .then(|| rows.last().and_then(|(_, body)| id_in(body)))
            .flatten();
        Ok(Page {
            events: rows.into_iter().map(|(_, b)| b).collect(),
            next,
        })
    }

    /// The `n` latest events (the dashboard), newest last.
    pub async fn latest(&self, n: usize) -> Result<Vec<String>, LedgerError> {
        self.read(move |c| db::latest(c, n)).await
    }
}

/// The position an event id names, when it is one of a ledger's ids.
pub fn event_position(id: &str) -> Option<u64> {
    event::seq_of(id)
}

/// The id in an event's JSON.
fn id_in(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("id")?.as_str().map(str::to_owned)
}

/// One page of an account's events.
#[derive(Debug)]
pub struct Page {
    /// The events' JSON, oldest first.
    pub events: Vec<String>,
    /// The id to page on from (`None`: that was the last page).
    pub next: Option<String>,
}

impl Journal for Inner {
    fn alert_levels(&self, counter: u64, grant: u32) -> Vec<i64> {
        self.limits
            .load()
            .get(&counter)
            .map_or_else(Vec::new, |info| {
                info.alerts
                    .iter()
                    .take(32)
                    .map(|a| a.balance(grant))
                    .collect()
            })
    }

    fn recorded(&self) -> Vec<crate::store::journal::Recorded> {
        match self.recorded_keys() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(ledger = %self.settings.path.display(), error = %e, "the ledger cannot be read: nothing rebuilt from it");
                Vec::new()
            }
        }
    }

    fn last_position(&self) -> u64 {
        self.written.borrow().seq
    }

    fn write(&self, e: Entry<'_>) -> u64 {
        let limits = self.limits.load();
        let info = limits.get(&e.counter);
        let mut st = lock(&self.state);
        if let Change::QuotaExhausted { until } = e.change {
            if !st.first_exhaustion(e.subject, e.counter, e.at, until) {
                return 0;
            }
        }
        let mut seq = st.push(&e, info, None, None);
        if let (Some(info), Some(balance)) = (info, e.balance) {
            seq = seq.max(st.alerts(&e, info, balance));
        }
        let wake = std::mem::take(&mut st.writer_idle);
        drop(st);
        if wake {
            self.wake.notify_one();
        }
        seq
    }
}

impl State {
    /// Numbers and encodes one entry; its position. `numbered`: the
    /// position it already has (Redis's stream id), else the next.
    fn push(
        &mut self,
        e: &Entry<'_>,
        info: Option<&LimitInfo>,
        threshold: Option<&str>,
        numbered: Option<u64>,
    ) -> u64 {
        let at_ms = event::ms(e.at);
        let (seq, id) = match numbered {
            Some(seq) => (seq, event::id(at_ms, seq)),
            None => {
                let seq = self.next;
                self.next += 1;
                self.last_ms = self.last_ms.max(at_ms);
                (seq, event::id(self.last_ms, seq))
            }
        };
        let account = event::account_of(e.subject);
        let key_fp = match (e.origin, e.subject) {
            (Some(o), _) => Some(o.key_fp.to_string()),
            (None, Subject::Key(_)) => Some(account[4..].to_owned()),
            (None, Subject::Account(_)) => None,
        };
        let kind = match threshold {
            Some(_) => event::LOW,
            None => event::kind(e.change),
        };
        let (how, job_id) = event::how(e.change, e.job_id);
        let time = self.seconds.rfc3339_ms(at_ms);
        let body = event::Body {
            id: &id,
            kind,
            time: &time,
            account: &account,
            key_fp: key_fp.as_deref(),
            route: e.origin.map(|o| &*o.route),
            limit: info.map(|i| &*i.name),
            amount: if threshold.is_some() { 0 } else { e.amount },
            balance: e.balance,
            request_id: e.origin.map(|o| &*o.request_id),
            job_id,
            how,
            threshold,
        };
        let body = serde_json::to_string(&body).unwrap_or_default();
        self.pending.push(Row {
            seq,
            account,
            subject: event::subject_text(e.subject),
            counter: e.counter,
            kind,
            at_ms,
            balance: e.balance,
            grant: i64::from(e.grant),
            job_id: e.job_id.map(str::to_owned),
            body,
            rkey: None,
        });
        seq
    }

    /// The `credits.low` events a change to `balance` crosses (each
    /// threshold once per refill period); the last one's position.
    fn alerts(&mut self, e: &Entry<'_>, info: &LimitInfo, balance: i64) -> u64 {
        let crate::limits::Rule::Credits(k) = info.rule else {
            return 0;
        };
        let period = k.period_of(e.at);
        let key = (e.subject.clone(), e.counter);
        if e.change == Change::Refilled {
            self.fired.remove(&key);
            return 0;
        }
        if info.alerts.is_empty() || e.amount >= 0 {
            return 0;
        }
        let before = balance - e.amount;
        let mut seq = 0;
        for (i, alert) in info.alerts.iter().enumerate().take(32) {
            let level = alert.balance(e.grant);
            let (p, mask) = self.fired.get(&key).copied().unwrap_or((period, 0));
            let mask = if p == period { mask } else { 0 };
            if balance > level || before <= level || mask & (1 << i) != 0 {
                continue;
            }
            self.fired.insert(key.clone(), (period, mask | (1 << i)));
            seq = self.push(e, Some(info), Some(&alert.text), None);
        }
        seq
    }

    /// Whether a refusal by a quota is the first of its window for this
    /// counter (then remembered until the window ends).
    fn first_exhaustion(
        &mut self,
        subject: &Subject,
        counter: u64,
        at: Nanos,
        until: Nanos,
    ) -> bool {
        let key = (subject.clone(), counter);
        if self.exhausted.get(&key).is_some_and(|&end| at < end) {
            return false;
        }
        if self.exhausted.len() >= 100_000 {
            self.exhausted.retain(|_, end| *end > at);
        }
        self.exhausted.insert(key, until);
        true
    }
}

impl Inner {
    /// The writer thread: commits whatever accumulated, in one
    /// transaction, as soon as the last commit is done (`sync`) or once a
    /// second (`interval`); a failed commit is retried every second.
    fn write_forever(&self, mut conn: Connection) {
        let interval = self.settings.durable == Durable::Interval;
        loop {
            let (batch, closed) = self.take_batch(interval);
            if let Some(last) = batch.last().map(|r| r.seq) {
                if !self.commit(&mut conn, &batch) {
                    return;
                }
                self.written.send_modify(|w| {
                    w.seq = last;
                    w.failing = false;
                });
            }
            if closed {
                return;
            }
        }
    }

    fn take_batch(&self, interval: bool) -> (Vec<Row>, bool) {
        let mut st = lock(&self.state);
        if interval {
            // A second's worth, however often writes wake the thread.
            st = self
                .wake
                .wait_timeout_while(st, Duration::from_secs(1), |s| !s.closed)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        while st.pending.is_empty() && !st.closed {
            st.writer_idle = true;
            st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.writer_idle = false;
        (std::mem::take(&mut st.pending), st.closed)
    }

    /// Commits `batch`, retrying until it is on disk (false: it could not
    /// be, and the ledger is closing).
    fn commit(&self, conn: &mut Connection, batch: &[Row]) -> bool {
        loop {
            match db::append(conn, batch) {
                Ok(()) => {
                    let m = self.metrics.ledger();
                    m.commit();
                    for r in batch {
                        m.event(r.kind);
                    }
                    return true;
                }
                Err(e) => {
                    self.metrics.ledger().write_error();
                    tracing::error!(ledger = %self.settings.path.display(), error = %e, "ledger write failed: retrying every second; requests that must wait for it are refused");
                    self.written.send_modify(|w| w.failing = true);
                    if lock(&self.state).closed {
                        return false;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

pub use mirror::spawn_mirror;
pub use rebuild::Rebuilt;
pub use sink::spawn_sinks;

#[cfg(test)]
mod tests;
