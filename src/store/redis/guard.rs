//! Guarding against a Redis that forgot turnstile's counts (restarted
//! without persistence, keys evicted, flushed): a marker of turnstile's own,
//! `<prefix>marker`, holds an epoch every instance remembers. When the
//! marker disappears, or changes without an acknowledgement, the counts
//! behind it are gone: a spent balance would silently be a full grant
//! again. turnstile then treats Redis as down (`on_error` applies) and
//! logs an error until an operator acknowledges (`POST /v1/store/ack`,
//! which starts a new epoch every instance adopts).
//!
//! The marker is checked every second and before the first call after
//! Redis was unreachable (a restart is an outage first). At the first
//! connection, Redis's eviction policy and persistence are read and a
//! warning logged unless they keep turnstile's data.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::client::Conn;
use super::{Inner, RedisStore};
use crate::store::StoreError;

/// How often the marker is checked.
const EVERY: Duration = Duration::from_secs(1);

impl Conn {
    /// One command, not a script.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

fn fresh_epoch() -> String {
    let mut buf = [0u8; 8];
    if getrandom::fill(&mut buf).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        buf = t.to_le_bytes();
    }
    hex::encode(buf)
}

impl Inner {
    fn marker_key(&self) -> String {
        format!("{}marker", self.settings.prefix)
    }

    fn ack_key(&self, epoch: &str) -> String {
        format!("{}marker:ack:{epoch}", self.settings.prefix)
    }

    /// One command bounded by the timeout, outside the breaker.
    pub(super) async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let Some(mut conn) = self.connection().await else {
            return Err(StoreError::Unavailable("cannot connect to redis".into()));
        };
        match tokio::time::timeout(self.settings.timeout, conn.query::<T>(&cmd)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable("redis timed out".into())),
        }
    }

    /// Compares the marker with the epoch this instance knows; returns
    /// whether Redis still holds turnstile's data.
    pub(super) async fn check_marker(&self) -> Result<bool, StoreError> {
        let key = self.marker_key();
        let found: Option<String> = self.command(redis::cmd("GET").arg(&key).to_owned()).await?;
        let known = self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (found, known) {
            (None, None) => {
                // First use of this Redis (as far as this instance can tell).
                let fresh = fresh_epoch();
                let set = redis::cmd("SET").arg(&key).arg(&fresh).arg("NX").to_owned();
                self.command::<Option<String>>(set).await?;
                let now: Option<String> =
                    self.command(redis::cmd("GET").arg(&key).to_owned()).await?;
                *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = now;
                Ok(true)
            }
            (Some(found), None) => {
                *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
                Ok(true)
            }
            (Some(found), Some(known)) if found == known => Ok(true),
            (Some(found), Some(_)) => {
                let acked: i64 = self
                    .command(redis::cmd("EXISTS").arg(self.ack_key(&found)).to_owned())
                    .await?;
                if acked == 1 {
                    *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
                    if self.lost.swap(false, Ordering::AcqRel) {
                        tracing::warn!("redis's loss of turnstile's data was acknowledged: deciding in redis again");
                    }
                    return Ok(true);
                }
                Ok(false)
            }
            (None, Some(_)) => Ok(false),
        }
    }

    /// Checks the marker and flags a loss (logged once).
    pub(super) async fn guard(&self) -> bool {
        match self.check_marker().await {
            Ok(true) => !self.lost.load(Ordering::Acquire),
            Ok(false) => {
                if !self.lost.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        marker = %self.marker_key(),
                        "redis lost turnstile's data (restarted without persistence, keys evicted or flushed): \
                         it is treated as down (on_error applies) until an operator acknowledges with POST /v1/store/ack"
                    );
                }
                false
            }
            // Unreachable: the breaker and on_error deal with it.
            Err(_) => !self.lost.load(Ordering::Acquire),
        }
    }

    /// Warns unless Redis keeps turnstile's data: `noeviction`, and AOF or
    /// RDB snapshots on.
    pub(super) async fn check_settings(&self) {
        let get = |name: &str| redis::cmd("CONFIG").arg("GET").arg(name).to_owned();
        let read = |v: Result<Vec<String>, StoreError>| v.ok().and_then(|v| v.get(1).cloned());
        let policy = read(self.command(get("maxmemory-policy")).await);
        let aof = read(self.command(get("appendonly")).await);
        let save = read(self.command(get("save")).await);
        let (Some(policy), Some(aof), Some(save)) = (policy, aof, save) else {
            tracing::info!("could not read redis's eviction and persistence settings (CONFIG GET refused): make sure it runs with maxmemory-policy noeviction and appendonly yes or save");
            return;
        };
        if policy != "noeviction" {
            tracing::warn!(maxmemory_policy = %policy, "redis may evict turnstile's counts under memory pressure (a spent balance would come back full): run it with maxmemory-policy noeviction");
        }
        if aof != "yes" && save.trim().is_empty() {
            tracing::warn!("redis keeps nothing on disk (appendonly no, save \"\"): a restart forgets every count and balance; run it with appendonly yes (or save)");
        }
    }
}

impl RedisStore {
    /// Checks the marker every second, and Redis's settings once, until the
    /// returned task is aborted.
    pub fn spawn_guard(&self) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let inner = &store.inner;
            let mut checked_settings = false;
            loop {
                if inner.connection().await.is_some() {
                    if !checked_settings {
                        inner.check_settings().await;
                        checked_settings = true;
                    }
                    // Back and whole: what it missed is applied even if no
                    // decision comes to set it off.
                    if inner.guard().await {
                        // It answered in time: requests go to it again.
                        inner.breaker.success();
                        store.reconcile_soon();
                    } else if store.lost() && inner.journal().is_some() {
                        store.rebuild_from_ledger().await;
                    }
                }
                tokio::time::sleep(EVERY).await;
            }
        })
    }

    /// Whether Redis is known to have lost turnstile's data (until acknowledged).
    pub fn lost(&self) -> bool {
        self.inner.lost.load(Ordering::Acquire)
    }

    /// `POST /v1/store/ack`: accepts that Redis lost turnstile's data and
    /// starts a new epoch, adopted by every instance; returns it.
    pub async fn acknowledge(&self) -> Result<String, StoreError> {
        let inner = &self.inner;
        let fresh = fresh_epoch();
        let ack = redis::cmd("SET")
            .arg(inner.ack_key(&fresh))
            .arg(1)
            .to_owned();
        inner.command::<()>(ack).await?;
        let set = redis::cmd("SET")
            .arg(inner.marker_key())
            .arg(&fresh)
            .to_owned();
        inner.command::<()>(set).await?;
        *inner.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(fresh.clone());
        if inner.lost.swap(false, Ordering::AcqRel) {
            tracing::warn!(epoch = %fresh, "redis's loss of turnstile's data acknowledged: counting starts afresh");
        }
        Ok(fresh)
    }
}

impl RedisStore {
    /// With a ledger, a Redis that lost turnstile's data is rebuilt from
    /// it: one instance at a time writes back every balance and job the
    /// ledger recorded, then starts a new epoch the others adopt.
    pub async fn rebuild_from_ledger(&self) {
        let inner = &self.inner;
        let lock = redis::cmd("SET")
            .arg(format!("{}marker:rebuild", inner.settings.prefix))
            .arg(&inner.instance)
            .arg("NX")
            .arg("PX")
            .arg(60_000)
            .to_owned();
        // Another instance is at it: its new epoch will be adopted.
        if !matches!(inner.command::<Option<String>>(lock).await, Ok(Some(_))) {
            return;
        }
        match inner.restore_from_ledger().await {
            Ok(counters) => match self.acknowledge().await {
                Ok(epoch) => tracing::warn!(
                    counters,
                    %epoch,
                    "redis lost turnstile's data: balances and jobs rebuilt from the ledger, deciding in redis again"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "balances and jobs rebuilt from the ledger, but the new epoch could not be written")
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "redis lost turnstile's data and rebuilding it from the ledger failed: retrying");
            }
        }
        let unlock = redis::cmd("DEL")
            .arg(format!("{}marker:rebuild", inner.settings.prefix))
            .to_owned();
        let _ = inner.command::<i64>(unlock).await;
    }

    /// At start, with a ledger: a Redis without turnstile's marker (new,
    /// or restarted empty while turnstile was down too) gets the balances
    /// and jobs the ledger recorded before the first decision. How many
    /// counters (`None`: it had the marker, or is unreachable).
    pub async fn adopt_ledger(&self) -> Option<usize> {
        let inner = &self.inner;
        inner.journal()?;
        let found: Option<String> = inner
            .command(redis::cmd("GET").arg(inner.marker_key()).to_owned())
            .await
            .ok()?;
        if found.is_some() {
            return None;
        }
        let counters = inner.restore_from_ledger().await.ok()?;
        self.acknowledge().await.ok()?;
        Some(counters)
    }
}
