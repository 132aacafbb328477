//! The connection to Redis (single node or cluster), made lazily and shared,
//! and the circuit breaker: every script call is bounded by `timeout`, and a
//! failure opens the breaker so requests stop waiting on a Redis that is down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, ScriptInvocation};

use crate::store::StoreError;

/// How long the breaker stays open before one request probes Redis again.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// One connection shared by every call (both kinds reconnect by themselves).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub(super) async fn invoke<T: FromRedisValue>(
        &mut self,
        inv: &ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(c).await,
            Conn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    async fn send<T: FromRedisValue>(&mut self, req: &Request<'_, '_>) -> redis::RedisResult<T> {
        match req {
            Request::Script(inv) => self.invoke(inv).await,
            Request::Command(cmd) => match self {
                Conn::Single(c) => cmd.query_async(c).await,
                Conn::Cluster(c) => cmd.query_async(c).await,
            },
        }
    }
}

/// A call through the breaker: a script, or a command (`FCALL`).
pub(super) enum Request<'r, 'a> {
    Script(&'r ScriptInvocation<'a>),
    Command(&'r redis::Cmd),
}

/// Opens after a failure; lets one probe through every [`PROBE_EVERY`].
pub(super) struct Breaker {
    pub(super) started: Instant,
    pub(super) open_until_ms: AtomicU64,
    pub(super) probing: AtomicBool,
}

impl Breaker {
    pub(super) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Microseconds on the same monotonic clock.
    pub(super) fn now_us(&self) -> i64 {
        self.started.elapsed().as_micros() as i64
    }

    pub(super) fn allow(&self) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        self.now_ms() >= until
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    pub(super) fn success(&self) {
        self.open_until_ms.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    pub(super) fn failure(&self) {
        self.open_until_ms.store(
            self.now_ms() + PROBE_EVERY.as_millis() as u64,
            Ordering::Release,
        );
        self.probing.store(false, Ordering::Release);
    }

    pub(super) fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }
}

impl super::Inner {
    pub(super) async fn connection(&self) -> Option<Conn> {
        if let Some(c) = self.conn.load_full() {
            return Some((*c).clone());
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Some((*c).clone());
        }
        let connect = async {
            let s = &self.settings;
            if s.cluster {
                let client = redis::cluster::ClusterClient::builder(vec![s.url.as_str()])
                    .connection_timeout(s.timeout.max(Duration::from_millis(200)))
                    .response_timeout(s.timeout)
                    .build()?;
                client.get_async_connection().await.map(Conn::Cluster)
            } else {
                let client = redis::Client::open(s.url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(s.timeout.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(s.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(200));
                client
                    .get_connection_manager_with_config(config)
                    .await
                    .map(Conn::Single)
            }
        };
        match tokio::time::timeout(
            self.settings.timeout.max(Duration::from_millis(500)),
            connect,
        )
        .await
        {
            Ok(Ok(conn)) => {
                self.conn.store(Some(Arc::new(conn.clone())));
                Some(conn)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot connect to redis");
                None
            }
            Err(_) => None,
        }
    }

    /// One script call, bounded by the timeout; failures open the breaker.
    pub(super) async fn call<T: FromRedisValue>(
        &self,
        inv: ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.request(Request::Script(&inv)).await
    }

    /// One call, bounded by the timeout; failures open the breaker, except
    /// a function Redis does not have (it is loaded again: see
    /// `functions.rs`).
    pub(super) async fn request<T: FromRedisValue>(
        &self,
        req: Request<'_, '_>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::NotSent(
                "redis unavailable (circuit open)".into(),
            ));
        }
        // After an outage (this call is the probe), or while a loss is
        // unacknowledged: Redis must still hold turnstile's data.
        if (self.breaker.is_open() || self.lost.load(std::sync::atomic::Ordering::Acquire))
            && !self.guard().await
        {
            self.breaker.failure();
            return Err(StoreError::NotSent(
                "redis lost turnstile's data: treated as down until POST /v1/store/ack".into(),
            ));
        }
        let Some(mut conn) = self.connection().await else {
            self.breaker.failure();
            return Err(StoreError::NotSent("cannot connect to redis".into()));
        };
        match tokio::time::timeout(self.settings.timeout, conn.send::<T>(&req)).await {
            Ok(Ok(v)) => {
                if self.breaker.is_open() {
                    tracing::info!("redis is back");
                }
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) if super::functions::not_loaded(&e) => {
                Err(StoreError::NotSent(super::functions::NOT_LOADED.into()))
            }
            Ok(Err(e)) => {
                if !self.breaker.is_open() {
                    tracing::error!(error = %e, "redis failed: falling back to on_error");
                }
                self.breaker.failure();
                // Refused, or the connection already gone (Redis stopped
                // before the call): the script never ran. Other errors
                // (a timeout, a reply lost) may come after it did.
                if e.is_connection_refusal() || e.is_connection_dropped() {
                    Err(StoreError::NotSent(format!("redis: {e}")))
                } else {
                    Err(StoreError::Unavailable(format!("redis: {e}")))
                }
            }
            Err(_) => {
                if !self.breaker.is_open() {
                    tracing::error!(
                        timeout_ms = self.settings.timeout.as_millis() as u64,
                        "redis timed out: falling back to on_error"
                    );
                }
                self.breaker.failure();
                Err(StoreError::Unavailable("redis timed out".into()))
            }
        }
    }
}
