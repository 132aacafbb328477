//! The listener: accepts connections (HTTP/1.1 and h2c), applies the header
//! read timeout, hands each request to [`Turnstile::handle`], evicts idle
//! counters in the background and drains connections on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::clock::Clock;
use crate::config::Policy;
use crate::proxy::Turnstile;
use crate::store::MemoryStore;

/// How often idle counters are swept.
const EVICT_EVERY: Duration = Duration::from_secs(10);
/// How long in-flight exchanges get to finish on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A bound, not yet running, proxy.
pub struct Server {
    listener: TcpListener,
    app: Arc<Turnstile>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Server {
    /// Binds `[server] listen` of `policy`, counting with `clock`.
    pub async fn bind(policy: Policy, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(policy.server.listen).await?;
        let store = Arc::new(MemoryStore::new(clock));
        let app = Arc::new(Turnstile::new(Arc::new(policy), store));
        Ok(Self { listener, app })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The proxy behind this listener.
    pub fn app(&self) -> &Arc<Turnstile> {
        &self.app
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open
    /// connections finish (up to 30 s).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let Server { listener, app } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(app.policy().server.header_timeout)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(64 * 1024);
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();

        let store = app.store().clone();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVICT_EVERY);
            loop {
                tick.tick().await;
                let dropped = store.evict_expired();
                tracing::debug!(
                    dropped,
                    live = store.live_counters(),
                    "evicted idle counters"
                );
            }
        });

        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(ProxyService {
                app: app.clone(),
                peer,
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
            });
        }
        drop(listener);
        sweeper.abort();
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace expired with exchanges still in flight");
        }
        Ok(())
    }
}

/// The per-connection tower service: one [`Turnstile`] and the peer address.
#[derive(Clone)]
pub struct ProxyService {
    app: Arc<Turnstile>,
    peer: SocketAddr,
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let app = self.app.clone();
        let peer = self.peer;
        Box::pin(async move { Ok(app.handle(req, peer).await) })
    }
}
