//! The listeners: the proxy (HTTP/1.1 and h2c, header read timeout) and the
//! optional admin API; background work (idle-counter eviction, periodic
//! snapshots); and shutdown: stop accepting, drain in-flight exchanges up to
//! `[server] shutdown_grace`, write the snapshot.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::clock::Clock;
use crate::config::{Backend, Policy};
use crate::pipeline::{Peer, Turnstile};
use crate::store::{CounterStore, MemoryStore, RedisStore};
use crate::wire::body::{Body, WithGuard};
use crate::wire::conn::{self, Activity, ConnLimits, Watched};
use crate::wire::header_case::CaseWriter;
use http_body_util::BodyExt;

/// How often idle counters are swept.
const EVICT_EVERY: Duration = Duration::from_secs(10);

/// Bound, not yet running, listeners.
pub struct Server {
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// `[decision] listen` and `grpc_listen`.
    decision: (Option<TcpListener>, Option<TcpListener>),
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
    /// Binds `[server] listen` (and `[admin] listen`) of `policy`, counting
    /// with `clock`, and restores the snapshot if one is configured. A
    /// missing or damaged snapshot is logged and turnstile starts empty.
    pub async fn bind(policy: Policy, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        // The admin listener first: once the proxy port accepts, probes can too.
        let admin = match &policy.admin {
            Some(a) => Some(TcpListener::bind(a.listen).await?),
            None => None,
        };
        let decision = match &policy.decision {
            Some(d) => (bind(d.listen).await?, bind(d.grpc_listen).await?),
            None => (None, None),
        };
        let listener = TcpListener::bind(policy.server.listen).await?;
        let store = match &policy.store.backend {
            Backend::Memory => CounterStore::Memory(MemoryStore::new(clock)),
            Backend::Redis(settings) => {
                CounterStore::Redis(RedisStore::new(settings.clone(), clock))
            }
        };
        if let (Some(path), CounterStore::Memory(store)) = (&policy.store.snapshot, &store) {
            match store.load_snapshot(path) {
                Ok(n) => {
                    tracing::info!(snapshot = %path.display(), counters = n, "counters restored")
                }
                Err(crate::store::SnapshotError::Io(e))
                    if e.kind() == std::io::ErrorKind::NotFound =>
                {
                    tracing::info!(snapshot = %path.display(), "no snapshot yet: starting with empty counters")
                }
                Err(e) => {
                    tracing::error!(snapshot = %path.display(), error = %e, "snapshot unreadable: starting with empty counters")
                }
            }
        }
        let keys = crate::keys::runtime::RuntimeKeys::open(&policy.identity, &store)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        keys.load().await;
        let app = Arc::new(Turnstile::new(policy, store, keys));
        open_ledger(&app).await?;
        Ok(Self {
            listener,
            admin,
            decision,
            app,
        })
    }

    /// The HTTP decision endpoint's address, if there is one.
    pub fn decision_addr(&self) -> Option<SocketAddr> {
        self.decision.0.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The rate limit service's (gRPC) address, if there is one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.decision.1.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The proxy address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin address actually bound, if there is an admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The proxy behind this listener.
    pub fn app(&self) -> &Arc<Turnstile> {
        &self.app
    }

    /// Serves until `shutdown` completes; then stops accepting, lets open
    /// exchanges finish (up to `[server] shutdown_grace`) and writes the snapshot.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let Server {
            listener,
            admin,
            decision,
            app,
        } = self;
        let policy = app.policy();
        let limits = ConnLimits {
            header_timeout: policy.server.header_timeout,
            idle_timeout: policy.server.idle_timeout,
        };
        let builder = Arc::new(connection_builder(&policy));
        let (stop, stopping) = watch::channel(false);
        let max_connections = policy.server.max_connections.min(u32::MAX as usize);
        let permits = Arc::new(Semaphore::new(max_connections));

        let background = spawn_background(app.clone());
        let admin_task = admin.map(|l| {
            let handler = |app: Arc<Turnstile>, req, _peer| async move {
                crate::admin::handle(&app, req).await
            };
            tokio::spawn(serve_own(l, app.clone(), stopping.clone(), handler, false))
        });
        let decision_tasks = spawn_decision(decision, &app, &stopping);

        tokio::pin!(shutdown);
        let mut accept_errors = AcceptErrors::default();
        loop {
            // Past max_connections, new connections wait in the backlog.
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off and
                        // keep serving the connections already open.
                        accept_errors.failed(&e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            spawn_connection(&app, stream, peer, &builder, limits, &stopping, permit);
        }
        drop(listener);
        let _ = stop.send(true);
        drain(&app, &permits, max_connections).await;
        for task in background
            .into_iter()
            .chain(admin_task)
            .chain(decision_tasks)
        {
            task.abort();
        }
        wind_down(&app).await;
        Ok(())
    }
}

/// Serves one accepted connection on its own task (TLS handshake first when
/// the listener has a certificate); the permit is released when it closes.
fn spawn_connection(
    app: &Arc<Turnstile>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    limits: ConnLimits,
    stopping: &watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    // Read per connection: a reload's new certificate serves new
    // connections; open ones keep theirs.
    let tls = app.policy().server.tls.as_ref().map(|t| t.acceptor());
    let peer = match tls {
        Some(_) => Peer::new(peer).over_tls(),
        None => Peer::new(peer),
    };
    let activity = Activity::new();
    let service = TowerToHyperService::new(ProxyService {
        app: app.clone(),
        peer,
        activity: activity.clone(),
    });
    let spellings = app.policy().headers.spellings.clone();
    let io = Watched::new(stream, activity.clone(), limits);
    let (builder, stopping) = (builder.clone(), stopping.clone());
    tokio::spawn(async move {
        match tls {
            None => {
                let io = CaseWriter::new(io, spellings, activity);
                serve_io(&builder, TokioIo::new(io), service, stopping).await;
            }
            // The handshake reads through `Watched`: header_timeout bounds it.
            Some(acceptor) => match acceptor.accept(io).await {
                Ok(stream) => {
                    let io = CaseWriter::new(stream, spellings, activity);
                    serve_io(&builder, TokioIo::new(io), service, stopping).await;
                }
                Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
            },
        }
        drop(permit);
    });
}

/// `[ledger]`: opened, balances and jobs rebuilt from it over the
/// snapshot, before anything is served. A ledger that cannot be opened or
/// read stops the start (credits are not counted without their record).
async fn open_ledger(app: &Arc<Turnstile>) -> std::io::Result<()> {
    let Some(settings) = app.policy().ledger.clone() else {
        return Ok(());
    };
    let ledger = crate::ledger::Ledger::open(settings, &host_name(), app.metrics().clone())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    app.set_ledger(ledger.clone());
    if let Some(redis) = ledger.redis() {
        if let Some(counters) = redis.adopt_ledger().await {
            tracing::info!(
                counters,
                "redis had no turnstile data: balances and jobs written back from the ledger"
            );
        }
        return Ok(());
    }
    let store = app.store().in_process().clone();
    let rebuilt = tokio::task::spawn_blocking(move || ledger.rebuild(&store))
        .await
        .map_err(std::io::Error::other)?
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tracing::info!(
        events = rebuilt.events,
        balances = rebuilt.balances,
        jobs = rebuilt.jobs,
        ms = rebuilt.took.as_millis() as u64,
        "balances and jobs rebuilt from the ledger"
    );
    Ok(())
}

/// This machine's name (CloudEvents' `source`).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnstile".to_owned())
}

/// After the drain: the snapshot written, and the access line of every
/// exchange served (all have ended) written before the process exits.
async fn wind_down(app: &Arc<Turnstile>) {
    if let Some(ledger) = app.ledger().cloned() {
        let _ = tokio::task::spawn_blocking(move || ledger.close()).await;
    }
    write_snapshot(app).await;
    app.flush_access_log();
    app.flush_traces().await;
}

/// Serves one client connection (plain or TLS) with the proxy's settings
/// until it ends or is drained.
async fn serve_io<IO>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<IO>,
    service: TowerToHyperService<ProxyService>,
    stopping: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(io, service).into_owned();
    conn::serve(conn, |c| c.graceful_shutdown(), stopping).await;
}

/// HTTP/1.1 and HTTP/2 settings of the proxy listener.
fn connection_builder(policy: &crate::config::Policy) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // `header_timeout` is kept by the connection itself (`conn::Watched`):
    // hyper's own timer would also run while a keep-alive connection idles.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(crate::pipeline::MAX_HEADERS)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(policy.server.max_concurrent_streams)
        .max_header_list_size(64 * 1024);
    builder
}

/// Waits up to `shutdown_grace` for every connection (each holds one of the
/// `max` permits) to finish its exchanges.
async fn drain(app: &Turnstile, permits: &Semaphore, max: usize) {
    let grace = app.policy().server.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining in-flight exchanges"
    );
    let drained = permits.acquire_many(max as u32);
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("shutdown grace expired with exchanges still in flight");
    }
}

/// Accept failures, logged at most once a second.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn failed(&mut self, e: &std::io::Error) {
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            error = %e,
            suppressed = self.suppressed,
            "accept failed: open connections keep being served, retrying (raise ulimit -n or lower [server] max_connections)"
        );
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

/// Capacity pools: every second, jobs past `max_duration` freed and the
/// gauges refreshed (and the job index pruned); in Redis mode, this
/// instance's slot leases renewed every third of the lease.
fn spawn_capacity(app: &Arc<Turnstile>) -> Vec<tokio::task::JoinHandle<()>> {
    let pools = app.pools().clone();
    let store = app.store().clone();
    let mut tasks = vec![tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 0u64.. {
            tick.tick().await;
            pools.tick().await;
            if n % 60 == 0 {
                store.prune_job_index();
            }
        }
    })];
    if let Some(lease) = app.pools().lease() {
        let pools = app.pools().clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            loop {
                tick.tick().await;
                pools.renew().await;
            }
        }));
    }
    tasks
}

/// Eviction of idle counters, and periodic snapshots when configured.
fn spawn_background(app: Arc<Turnstile>) -> Vec<tokio::task::JoinHandle<()>> {
    let store = app.store().in_process().clone();
    let mut tasks = vec![tokio::spawn(async move {
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
    })];
    let log_app = app.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            log_app.flush_refusal_log();
            let policy = log_app.policy();
            if policy.admin.is_some() {
                let at = log_app.store().in_process().now() / crate::clock::SECOND;
                let jobs = log_app.store().jobs_in_progress();
                log_app
                    .metrics()
                    .sample_routes(policy.routes.iter().map(|r| &r.name), at, jobs);
            }
        }
    }));
    if let CounterStore::Redis(redis) = app.store() {
        tasks.push(redis.spawn_renewal());
        tasks.push(redis.spawn_guard());
    }
    tasks.extend(spawn_capacity(&app));
    if let Some(t) = app.policy().telemetry.as_ref().filter(|t| t.metrics) {
        let target = crate::observe::otlp_metrics::Target {
            endpoint: t.otlp_endpoint.clone(),
            service_name: t.service_name.clone(),
            every: t.export_interval,
        };
        let metrics_app = app.clone();
        tasks.push(tokio::spawn(crate::observe::otlp_metrics::push_forever(
            target,
            move || metrics_app.metrics().families(metrics_app.store_figures()),
        )));
    }
    tasks.extend(app.keys().spawn_sync());
    if let Some(ledger) = app.ledger() {
        tasks.extend(crate::ledger::spawn_sinks(ledger));
        tasks.extend(crate::ledger::spawn_mirror(ledger));
    }
    if app.policy().store.snapshot.is_some() {
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(app.policy().store.snapshot_interval).await;
                write_snapshot(&app).await;
            }
        }));
    }
    tasks
}

/// Writes the snapshot (if configured) off the async threads.
pub async fn write_snapshot(app: &Arc<Turnstile>) {
    let Some(path) = app.policy().store.snapshot.clone() else {
        return;
    };
    let CounterStore::Memory(store) = app.store().clone() else {
        return;
    };
    let target = path.clone();
    let result = tokio::task::spawn_blocking(move || store.save_snapshot(&target)).await;
    match result {
        Ok(Ok(n)) => {
            app.metrics().snapshot(true);
            tracing::debug!(snapshot = %path.display(), counters = n, "snapshot written");
        }
        Ok(Err(e)) => {
            app.metrics().snapshot(false);
            tracing::error!(snapshot = %path.display(), error = %e, "snapshot failed");
        }
        Err(e) => {
            app.metrics().snapshot(false);
            tracing::error!(error = %e, "snapshot task failed");
        }
    }
}

/// Binds `addr`, when there is one.
async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr).await.map(Some),
        None => Ok(None),
    }
}

/// The decision endpoints (`[decision]`): HTTP and Envoy's rate limit service.
fn spawn_decision(
    (http, grpc): (Option<TcpListener>, Option<TcpListener>),
    app: &Arc<Turnstile>,
    stopping: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(l) = http {
        let handler = |app: Arc<Turnstile>, req, peer: Peer| async move {
            crate::decision::http::handle(&app, req, &peer).await
        };
        // HTTP/2 too: Envoy's ext_authz cluster may speak it (h2c).
        let serve = serve_own(l, app.clone(), stopping.clone(), handler, true);
        tasks.push(tokio::spawn(serve));
    }
    if let Some(l) = grpc {
        let mut stopping = stopping.clone();
        let stop = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::decision::grpc::serve(l, app, stop).await {
                tracing::error!(error = %e, "the rate limit service stopped");
            }
        }));
    }
    tasks
}

/// Serves a listener of turnstile's own (admin API: HTTP/1.1; decision
/// endpoint: HTTP/1.1 and h2c) with `handler`, under the proxy's header and
/// idle timeouts.
async fn serve_own<H, F>(
    listener: TcpListener,
    app: Arc<Turnstile>,
    stopping: watch::Receiver<bool>,
    handler: H,
    http2: bool,
) where
    H: Fn(Arc<Turnstile>, Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let policy = app.policy();
    let limits = ConnLimits {
        header_timeout: policy.server.header_timeout,
        idle_timeout: policy.server.idle_timeout,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if http2 {
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(policy.server.max_concurrent_streams)
            .max_header_list_size(64 * 1024);
    } else {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(crate::pipeline::MAX_HEADERS);
    let builder = Arc::new(builder);
    let mut accept_errors = AcceptErrors::default();
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                accept_errors.failed(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (app, handler, peer) = (app.clone(), handler.clone(), Peer::new(addr));
        let activity = Activity::new();
        let in_service = activity.clone();
        let service = service_fn(move |req| {
            let (app, handler, peer) = (app.clone(), handler.clone(), peer.clone());
            let busy = in_service.begin();
            async move {
                let response = handler(app, req, peer).await;
                Ok::<_, Infallible>(response.map(|b| WithGuard::new(b, busy).boxed()))
            }
        });
        let io = TokioIo::new(Watched::new(stream, activity, limits));
        let conn = builder.serve_connection(io, service).into_owned();
        let stopping = stopping.clone();
        tokio::spawn(conn::serve(conn, |c| c.graceful_shutdown(), stopping));
    }
}

/// The per-connection tower service: one [`Turnstile`] and the peer address.
#[derive(Clone)]
pub struct ProxyService {
    app: Arc<Turnstile>,
    peer: Peer,
    activity: Arc<Activity>,
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
        let peer = self.peer.clone();
        let busy = self
            .activity
            .begin_request(req.method() == http::Method::HEAD);
        let (index, activity) = (busy.index(), self.activity.clone());
        if req.version() == http::Version::HTTP_2 {
            // hyper drops a stream's future when the client resets the
            // stream; run the exchange as its own task so that it ends as
            // on HTTP/1.1 (a body cut short refunds what it consumed).
            return Box::pin(async move {
                let exchange = tokio::spawn(async move { app.handle(req, &peer, busy).await.0 });
                Ok(exchange.await.unwrap_or_else(|_| {
                    let failed = crate::respond::Refusal::BadGateway("the exchange failed".into());
                    let ctx = crate::respond::Context::default();
                    crate::respond::refusal(&failed, &ctx, http::HeaderMap::new())
                }))
            });
        }
        Box::pin(async move {
            let (response, generated) = app.handle(req, &peer, busy).await;
            // Before hyper writes the head: CaseWriter spells every name of
            // an answer turnstile made.
            activity.set_generated(index, generated);
            Ok(response)
        })
    }
}
