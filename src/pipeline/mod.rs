//! One request, in order (docs/architecture.md): target → route → identity → admission
//! checks → limits → forward → respond. [`Turnstile::handle`] runs the
//! steps (one module each) over one `Exchange` context and ends every
//! exchange in one place, `Turnstile::finish`: the response passed on
//! with its rate-limit headers, or the refusal rendered by
//! [`crate::respond`], counted, logged and, when the upstream never got
//! the whole request, refunded.
//!
//! Also the request-body reader ([`inspect`]), the usage report
//! ([`usage`]) served at `usage_path`, and the same steps up to the limits
//! answered for another gateway instead of forwarded (`verdict.rs`).
//!
//! May import everything below it: [`crate::config`] and the layers under it.

mod admission;
mod capacity;
mod decide;
mod forward;
pub mod inspect;
mod refund;
pub mod request_id;
mod route;
mod traced;
pub mod usage;
mod verdict;

pub use admission::MAX_HEADERS;
pub use forward::{strip_hop_by_hop, Peer};
pub use verdict::{Ask, Headline, Taken, Verdict};

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderMap;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use smallvec::SmallVec;

use crate::config::{ConfigError, Format, Plan, Policy, Route, Unmatched};
use crate::keys::identity::Caller;
use crate::keys::runtime::RuntimeKeys;
use crate::observe::access_log::{AccessLine, AccessLog, Logged};
use crate::observe::metrics::{Metrics, RouteMetrics};
use crate::observe::refusal_log::RefusalLog;
use crate::observe::top_refused::TopRefused;
use crate::observe::trace::Tracing;
use crate::pipeline::inspect::{Budget, ReadLimits, RequestBody};
use crate::respond::{self, Checked, Refusal};
use crate::store::{CounterStore, LimitCheck};
use crate::wire::body::{Body, WithGuard};
use crate::wire::upstream::Upstream;

/// What a reload did.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// Counters of limits that no longer exist, dropped.
    pub dropped_counters: usize,
    /// Settings that changed but only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
}

/// The configuration in force and the upstream client built for it. A reload
/// swaps in a new one; exchanges already started finish with the one they
/// loaded.
pub struct Live {
    /// The validated config.
    pub policy: Arc<Policy>,
    /// `[upstream]`'s connection pool.
    upstream: Arc<Upstream>,
    /// One pool per `[upstreams.NAME]`, in the policy's order.
    upstreams: Vec<Arc<Upstream>>,
    /// Per route index, then one for unmatched requests.
    route_metrics: Vec<RouteMetrics>,
}

impl Live {
    /// The connection pool requests on `route` go to.
    fn upstream_of(&self, route: Option<&Route>) -> &Arc<Upstream> {
        match route.and_then(|r| r.upstream) {
            Some(i) => self.upstreams.get(i).unwrap_or(&self.upstream),
            None => &self.upstream,
        }
    }

    /// The metric series of a route (`None`: unmatched requests).
    fn route_metrics(&self, route: Option<&Route>) -> &RouteMetrics {
        let index = route.map_or(self.route_metrics.len() - 1, |r| r.index);
        &self.route_metrics[index.min(self.route_metrics.len() - 1)]
    }

    fn new(policy: Policy, metrics: &Metrics) -> Self {
        let pool =
            |u: &crate::config::UpstreamSettings| Upstream::new(&u.authority, u.connect_timeout);
        let upstream = pool(&policy.upstream);
        let upstreams = policy.upstreams.iter().map(|(_, u)| pool(u)).collect();
        let mut route_metrics: Vec<RouteMetrics> = policy
            .routes
            .iter()
            .map(|r| metrics.route(&r.name, &decide::limit_names(&policy, r.index)))
            .collect();
        // Series dashboards query start at 0 rather than missing until the
        // first event.
        for r in &policy.routes {
            if matches!(r.job, crate::jobs::JobRole::Submit { .. }) {
                metrics.job_unreadable_series(&r.name);
            }
        }
        route_metrics.push(metrics.route(&unmatched_label(), &[]));
        Self {
            policy: Arc::new(policy),
            upstream,
            upstreams,
            route_metrics,
        }
    }
}

/// The proxy: the live config, the counters and the metrics.
pub struct Turnstile {
    live: ArcSwap<Live>,
    store: CounterStore,
    /// `[[capacity]]` pools, kept across reloads.
    pools: Arc<crate::capacity::Pools>,
    metrics: Arc<Metrics>,
    /// Bytes of bodies held for inspection (`[server] max_buffered`).
    budget: Arc<Budget>,
    refusal_log: RefusalLog,
    /// The most refused keys and accounts (the admin dashboard).
    top_refused: TopRefused,
    /// Keys created through the admin API (`[identity] key_store`).
    keys: RuntimeKeys,
    /// Started the first time a config turns the access log on.
    access_log: std::sync::OnceLock<Option<AccessLog>>,
    /// OpenTelemetry spans (`[telemetry]`, read at start).
    tracing: Option<Tracing>,
    /// `[ledger]`, opened at start.
    ledger: std::sync::OnceLock<crate::ledger::Ledger>,
}

impl std::fmt::Debug for Turnstile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turnstile")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Who is asking and under which plan, once identified.
struct Identified<'a> {
    caller: Caller,
    plan: &'a Plan,
}

/// One exchange as the pipeline knows it so far (pingora's per-request
/// context): each step fills in its part, [`Turnstile::finish`] reads it.
struct Exchange<'a> {
    live: &'a Live,
    peer: &'a Peer,
    /// The route, once matched.
    route: Option<&'a Route>,
    /// A caller identified early (before reading a tool route's body).
    caller: Option<Caller>,
    /// The caller and its plan, once identified.
    who: Option<Identified<'a>>,
    /// The fingerprint of a key that was refused (401), for its log line.
    refused_key: Option<crate::keys::identity::Fingerprint>,
    /// The request's JSON-RPC id, once its body was read.
    rpc_id: Option<Value>,
    /// What the request costs (1 unless the route has a `cost`).
    cost: u32,
    /// The limits' verdicts, once decided.
    decided: Option<Decided<'a>>,
    /// Microseconds to the upstream's response headers (0: not asked).
    upstream_us: AtomicU64,
    /// An answer turnstile made itself on the way (a usage answer).
    generated: bool,
    /// The exchange's id (`X-Request-Id`), the client's or made here.
    request_id: HeaderValue,
    /// The exchange's span context, when traced (`[telemetry]`).
    trace: Option<opentelemetry::Context>,
    /// The job the exchange is about, for its access line (job routes).
    job: Option<crate::observe::access_log::JobNote>,
    /// The exchange as the ledger's events name it (with a ledger).
    origin: Option<Arc<crate::store::Origin>>,
}

impl<'a> Exchange<'a> {
    /// An exchange on `live` from `peer`, nothing known of it yet.
    fn new(
        live: &'a Live,
        peer: &'a Peer,
        request_id: HeaderValue,
        trace: Option<opentelemetry::Context>,
    ) -> Self {
        Exchange {
            live,
            peer,
            route: None,
            caller: None,
            who: None,
            refused_key: None,
            rpc_id: None,
            cost: 1,
            decided: None,
            upstream_us: AtomicU64::new(0),
            generated: false,
            request_id,
            trace,
            job: None,
            origin: None,
        }
    }

    /// The access log line of this exchange, as far as the pipeline knows it.
    fn access_line(
        &self,
        mut line: AccessLine,
        status: u16,
        decision: &'static str,
        limit: Option<Arc<str>>,
    ) -> AccessLine {
        line.route = self.route.map_or_else(unmatched_label, |r| r.name.clone());
        line.plan = self.who.as_ref().map(|w| w.plan.name.clone());
        line.key_fp = match (&self.who, &self.refused_key) {
            (Some(w), _) => Some(w.caller.fingerprint.to_string()),
            (None, Some(fp)) => Some(fp.to_string()),
            (None, None) => None,
        };
        line.account = self.who.as_ref().and_then(|w| w.caller.account.clone());
        line.status = status;
        line.decision = decision;
        line.limit = limit;
        let us = self.upstream_us.load(Ordering::Relaxed);
        line.upstream_ms = (us > 0).then(|| us as f64 / 1000.0);
        line.request_id = self.request_id.to_str().ok().map(str::to_owned);
        (line.cost, line.credits_balance) = decide::spent(self);
        line.job = self.job.clone();
        line
    }
}

/// An exchange's access line as it starts, when the access log is on.
type Access = (AccessLog, AccessLine, std::time::Instant);

/// The answer with the exchange's request id, and its access line written
/// when its body ends.
fn logged(
    cx: &Exchange<'_>,
    mut response: Response<Body>,
    access: Option<Access>,
    facts: Option<(&'static str, Option<Arc<str>>)>,
) -> Response<Body> {
    response
        .headers_mut()
        .insert(request_id::X_REQUEST_ID.clone(), cx.request_id.clone());
    match (access, facts) {
        (Some((log, line, started)), Some((decision, limit))) => {
            let line = cx.access_line(line, response.status().as_u16(), decision, limit);
            response.map(|b| Logged::new(b, line, started, log).boxed())
        }
        _ => response,
    }
}

/// The decision and the refusing limit of an outcome, for the access log.
fn outcome_facts(outcome: &Result<Response<Body>, Refusal>) -> (&'static str, Option<Arc<str>>) {
    match outcome {
        Ok(_) => ("forwarded", None),
        Err(Refusal::RateLimited(r)) => ("rate_limited", Some(r.name.clone())),
        Err(Refusal::InsufficientCredits(c)) => ("insufficient_credits", Some(c.name.clone())),
        Err(r) => (r.code(), None),
    }
}

/// Step 5's outcome, for the rate-limit headers and refunds.
struct Decided<'a> {
    /// When the store decided.
    now: u64,
    /// Whether every limit admitted (and all were counted).
    admitted: bool,
    /// What was checked (a refund takes back the same).
    checks: SmallVec<[LimitCheck<'a>; 4]>,
    /// Each limit with its verdict.
    checked: Vec<Checked<'a>>,
}

/// Route label for requests no route matched.
fn unmatched_label() -> Arc<str> {
    Arc::from(crate::observe::metrics::UNMATCHED)
}

impl Turnstile {
    /// A proxy for `policy` counting in `store`.
    pub fn new(policy: Policy, store: CounterStore, keys: RuntimeKeys) -> Self {
        let metrics = Arc::new(Metrics::new());
        store
            .in_process()
            .set_max_counters(policy.store.max_counters);
        let clock = store.in_process().clock();
        let pools = Arc::new(crate::capacity::Pools::new(&store, clock, metrics.clone()));
        pools.configure(&policy.capacity);
        Self {
            pools,
            budget: Budget::new(policy.server.max_buffered),
            refusal_log: RefusalLog::new(policy.log.refusals_per_second),
            top_refused: TopRefused::default(),
            keys,
            access_log: std::sync::OnceLock::new(),
            tracing: policy.telemetry.as_ref().and_then(|s| {
                Tracing::start(s)
                    .map_err(|e| tracing::error!(error = %e, "traces are not exported"))
                    .ok()
            }),
            live: ArcSwap::from_pointee(Live::new(policy, &metrics)),
            store,
            metrics,
            ledger: std::sync::OnceLock::new(),
        }
    }

    /// Writes every balance change and job start and end to `ledger` from
    /// now on (set once, at start, before serving).
    pub fn set_ledger(&self, ledger: crate::ledger::Ledger) {
        ledger.set_limits(self.policy().ledger_limits());
        match &self.store {
            CounterStore::Memory(m) => m.set_journal(ledger.journal()),
            // Redis's scripts write the events; its local fallback writes
            // none (what it did is written when Redis takes it).
            CounterStore::Redis(r) => ledger.attach_redis(r),
        }
        let _ = self.ledger.set(ledger);
    }

    /// The ledger, when one is configured.
    pub fn ledger(&self) -> Option<&crate::ledger::Ledger> {
        self.ledger.get()
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }

    /// The counter store.
    pub fn store(&self) -> &CounterStore {
        &self.store
    }

    /// The capacity pools.
    pub fn pools(&self) -> &Arc<crate::capacity::Pools> {
        &self.pools
    }

    /// Access log lines dropped since start (0 without an access log).
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log
            .get()
            .and_then(Option::as_ref)
            .map_or(0, AccessLog::dropped)
    }

    /// Writes every access line queued so far (a graceful stop).
    pub fn flush_access_log(&self) {
        if let Some(log) = self.access_log.get().and_then(Option::as_ref) {
            log.flush(std::time::Duration::from_secs(2));
        }
    }

    /// The access log, started on first use; `None` when it is off.
    fn access_log(&self, policy: &Policy) -> Option<&AccessLog> {
        if !policy.log.access {
            return None;
        }
        self.access_log
            .get_or_init(|| match AccessLog::start() {
                Ok(log) => Some(log),
                Err(e) => {
                    tracing::error!(error = %e, "could not start the access log writer");
                    None
                }
            })
            .as_ref()
    }

    /// The start of an exchange's access line, when the access log is on.
    fn access_start(
        &self,
        policy: &Policy,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Option<Access> {
        self.access_log(policy).map(|log| {
            let line = AccessLine {
                method: method.to_string(),
                path: uri.path().to_owned(),
                bytes_in: crate::pipeline::inspect::content_length(headers),
                ..AccessLine::default()
            };
            (log.clone(), line, std::time::Instant::now())
        })
    }

    /// Bytes of request bodies held for inspection right now.
    pub fn buffered_bytes(&self) -> u64 {
        self.budget.used()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The runtime keys.
    pub fn keys(&self) -> &RuntimeKeys {
        &self.keys
    }

    /// `[server] usage_path`: the caller's own plan and counters (credits
    /// and jobs included), as `GET /v1/usage?key=` shows them; read only.
    async fn own_usage(
        &self,
        policy: &Policy,
        caller: &crate::keys::identity::Caller,
    ) -> Result<Response<Body>, Refusal> {
        let key = crate::pipeline::usage::KeyView {
            digest: caller.digest,
            account: caller.account.clone(),
            plan: caller.plan,
        };
        let usage = crate::pipeline::usage::of_key(&self.store, policy, &key)
            .await
            .map_err(|e| Refusal::StoreUnavailable(e.to_string()))?;
        let mut r = Response::new(crate::wire::body::full(usage.to_string()));
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        Ok(r)
    }

    /// The store's live figures for the metrics, read now.
    pub fn store_figures(&self) -> crate::observe::metrics::StoreFigures {
        let store = self.store.in_process();
        crate::observe::metrics::StoreFigures {
            counters: store.live_counters() as u64,
            queued: store.queued() as u64,
            slots: store.slots_in_flight(),
            store_up: self.store.health().up,
            evicted: store.evicted_counters(),
            jobs_in_progress: self.store.jobs_in_progress(),
            jobs_expired: self.store.jobs_expired(),
            access_log_dropped: self.access_log_dropped(),
        }
    }

    /// The most refused keys and accounts so far.
    pub fn top_refused(&self) -> &TopRefused {
        &self.top_refused
    }

    /// Re-reads the config file (and keys file) the running config came
    /// from. An invalid config is refused and the running one stays.
    pub fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let path = self.policy().path.clone();
        match crate::config::load(&path) {
            Ok(policy) => {
                let report = self.apply(policy);
                self.metrics.reload(true);
                tracing::info!(config = %path.display(), dropped_counters = report.dropped_counters, "config reloaded");
                Ok(report)
            }
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(error = %e, "config reload refused; the running config keeps serving");
                Err(e)
            }
        }
    }

    /// Puts `policy` in force. CounterStore whose identity is unchanged keep their
    /// counts; counters of removed limits are dropped; slots in use are kept.
    pub fn apply(&self, policy: Policy) -> ReloadReport {
        let old = self.policy();
        let mut restart_needed = Vec::new();
        if old.server.listen != policy.server.listen {
            restart_needed.push("[server] listen");
        }
        if old.admin.as_ref().map(|a| a.listen) != policy.admin.as_ref().map(|a| a.listen) {
            restart_needed.push("[admin] listen");
        }
        if old.identity.key_store != policy.identity.key_store {
            restart_needed.push("[identity] key_store");
        }
        let listens = |p: &Policy| p.decision.as_ref().map(|d| (d.listen, d.grpc_listen));
        if listens(&old) != listens(&policy) {
            restart_needed.push("[decision] listen and grpc_listen");
        }
        if old.telemetry != policy.telemetry {
            restart_needed.push("[telemetry]");
        }
        for what in &restart_needed {
            tracing::warn!(
                setting = what,
                "changed in the config: takes effect after a restart"
            );
        }
        let ids: HashSet<u64> = policy
            .plans
            .iter()
            .flat_map(|p| p.by_route.iter().flatten().map(|a| a.counter))
            .collect();
        self.budget.set_max(policy.server.max_buffered);
        self.refusal_log.set_rate(policy.log.refusals_per_second);
        self.pools.configure(&policy.capacity);
        self.store
            .in_process()
            .set_max_counters(policy.store.max_counters);
        if let Some(ledger) = self.ledger.get() {
            ledger.set_limits(policy.ledger_limits());
        }
        self.live.store(Arc::new(Live::new(policy, &self.metrics)));
        let dropped_counters = self
            .store
            .in_process()
            .retain_counters(|id| ids.contains(&id));
        ReloadReport {
            dropped_counters,
            restart_needed,
        }
    }

    /// Handles one request from `peer`; every failure is already a response.
    /// The response body carries the exchange's in-flight guard and `held`
    /// (the connection's activity guard), both dropped when the exchange ends.
    /// With it, whether turnstile made the answer (a refusal, a usage
    /// answer) rather than forwarding the upstream's.
    pub async fn handle<T: Send + Sync + 'static>(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        held: T,
    ) -> (Response<Body>, bool) {
        let exchange = self.metrics.exchange();
        let live = self.live.load_full();
        let access = self.access_start(&live.policy, req.method(), req.uri(), req.headers());
        let trace = self.tracing.as_ref().map(|t| t.exchange(req.headers()));
        let mut cx = Exchange::new(&live, peer, request_id::of(req.headers()), trace);
        let method = cx.trace.as_ref().map(|_| req.method().clone());
        let outcome = self.steps(&mut cx, req).await;
        let generated = cx.generated || outcome.is_err();
        let facts = (access.is_some() || cx.trace.is_some()).then(|| outcome_facts(&outcome));
        let response = self.finish(&cx, outcome).await;
        if let (Some(method), Some((decision, limit))) = (&method, &facts) {
            let status = response.status().as_u16();
            traced::annotate_exchange(&cx, method.as_str(), status, decision, limit.as_deref());
        }
        let response = logged(&cx, response, access, facts);
        // The exchange's span ends with its response body.
        let response = response.map(|b| WithGuard::new(b, (exchange, held, cx.trace)).boxed());
        (response, generated)
    }

    /// The steps in order; the first refusal ends the exchange.
    async fn steps<'a>(
        &self,
        cx: &mut Exchange<'a>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Refusal> {
        let policy: &'a Policy = &cx.live.policy;
        let (mut parts, incoming) = req.into_parts();
        let mut body = RequestBody::Streaming(incoming);

        // 0. The target as routes see it; the upstream gets the same.
        admission::normalise_target(&mut parts)?;

        // The caller's own usage (`[server] usage_path`): answered here,
        // before any route or limit, so it is never counted.
        if let Some(usage) = &policy.server.usage_path {
            let reads = parts.method == http::Method::GET || parts.method == http::Method::HEAD;
            if reads && parts.uri.path() == usage {
                let caller = self.identify(policy, cx.peer, &parts.headers, parts.uri.query());
                if caller.is_err() {
                    cx.refused_key = policy.identity.presented(&parts.headers, parts.uri.query());
                }
                let caller = caller.map_err(Refusal::Unauthorized)?;
                cx.generated = true;
                return self.own_usage(policy, &caller).await;
            }
        }

        // 1. Route match (reading the body only for tool routes, and only
        // once the key has been checked).
        let matched = self.select_route(cx, &parts, &mut body).await;
        cx.rpc_id = body.rpc_id().cloned();
        let Some(route) = matched? else {
            if policy.server.unmatched == Unmatched::Reject {
                return Err(Refusal::NotFound {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_owned(),
                });
            }
            return self.forward(cx, parts, body.into_body(), None).await;
        };
        cx.route = Some(route);
        if !route.auth {
            return self.forward(cx, parts, body.into_body(), None).await;
        }

        // 2. Identity and plan.
        self.identify_caller(cx, &parts)?;
        let Some(who) = cx.who.as_ref() else {
            return Err(Refusal::Unauthorized(
                crate::keys::identity::AuthError::Unknown,
            ));
        };

        // 3-4. Plan gating, body size (before reading the body), argument
        // limits (which read a JSON body): none of these consumes quota.
        let admission =
            admission::check_admission(policy, &self.budget, route, who, &parts.headers, &mut body)
                .await;
        cx.rpc_id = body.rpc_id().cloned();
        admission?;
        cx.cost = admission::price(route, &parts, &body)?;
        let job_id = admission::job_id(route, &parts, &body)?;

        // 5. Limits, decided together; then a slot of the route's
        // capacity pool, waiting for one in fair order.
        let mut lease = self.decide_traced(cx).await?;
        self.take_capacity(cx, &mut lease).await?;

        // 6. Forward, watching the answer for jobs; 7. the slots are held
        // until the response body is done with.
        let watcher = self.answer_watcher(cx, route, job_id, &body, &mut lease);
        let response = self.forward(cx, parts, body.into_body(), watcher).await?;
        Ok(if lease.is_empty() {
            response
        } else {
            response.map(|b| WithGuard::new(b, lease).boxed())
        })
    }

    /// Ends an exchange, whatever its outcome: the upstream's response with
    /// the rate-limit headers, or the refusal rendered, counted and logged;
    /// a request admitted whose body then failed (413, 408, broken framing)
    /// never reached the upstream whole and is refunded, and so is one
    /// whose outcome the route's `refund_on` lists.
    async fn finish(
        &self,
        cx: &Exchange<'_>,
        outcome: Result<Response<Body>, Refusal>,
    ) -> Response<Body> {
        let policy = &*cx.live.policy;
        self.account(cx, &outcome).await;
        let refusal = match outcome {
            Ok(mut response) => {
                cx.live.route_metrics(cx.route).forwarded();
                if let Some(d) = cx.decided.as_ref().filter(|d| !d.checked.is_empty()) {
                    if policy.headers.on_success {
                        // Straight into the response: no map of their own to merge.
                        respond::write_rate_headers(
                            &policy.headers,
                            &d.checked,
                            d.now,
                            false,
                            response.headers_mut(),
                        );
                    }
                }
                return response;
            }
            Err(refusal) => refusal,
        };
        let mut headers = HeaderMap::new();
        if let Some(d) = &cx.decided {
            if !d.admitted || (policy.headers.on_success && !d.checked.is_empty()) {
                headers = respond::rate_headers(&policy.headers, &d.checked, d.now, !d.admitted);
            }
        }
        match cx.route {
            Some(route) => self.refuse(cx, &refusal, route, headers),
            None => self.refuse_unrouted(policy, &refusal),
        }
    }

    /// How bodies are read for inspection under the config in force.
    fn read_limits<'a>(&'a self, policy: &Policy) -> ReadLimits<'a> {
        ReadLimits {
            max: policy.server.mcp_max_body,
            idle: policy.server.body_timeout,
            budget: &self.budget,
        }
    }

    /// Whether a refusal line may be written now (rate limited).
    fn may_log(&self, refusal: &Refusal) -> bool {
        // With refusal lines filtered out there is nothing to rate limit.
        let enabled = if refusal.status().is_server_error() {
            tracing::enabled!(tracing::Level::WARN)
        } else {
            tracing::enabled!(tracing::Level::INFO)
        };
        if !enabled {
            return false;
        }
        self.refusal_log
            .admit(refusal.code(), self.store.in_process().now())
    }

    /// Writes the summary of refusal lines suppressed since the last call.
    pub fn flush_refusal_log(&self) {
        self.refusal_log.flush();
    }

    /// A refusal before any route matched (400, 404, 405, 431, JSON-RPC errors).
    fn refuse_unrouted(&self, policy: &Policy, refusal: &Refusal) -> Response<Body> {
        self.metrics.request(&unmatched_label(), refusal.code());
        if self.may_log(refusal) {
            tracing::info!(status = refusal.status().as_u16(), reason = %refusal, "refused");
        }
        let ctx = respond::Context {
            templates: Some(&policy.responses),
            ..Default::default()
        };
        respond::refusal(refusal, &ctx, HeaderMap::new())
    }

    /// Logs, counts and renders a refusal on `route`.
    fn refuse(
        &self,
        cx: &Exchange<'_>,
        refusal: &Refusal,
        route: &Route,
        headers: HeaderMap,
    ) -> Response<Body> {
        let who = cx.who.as_ref();
        let plan = who.map_or("", |w| &*w.plan.name);
        let key_fp = who
            .map(|w| w.caller.fingerprint.as_str())
            .or(cx.refused_key.as_ref().map(|f| f.as_str()));
        let limit = match refusal {
            Refusal::RateLimited(r) => Some(&*r.name),
            _ => None,
        };
        if let Refusal::RateLimited(r) = refusal {
            cx.live
                .route_metrics(Some(route))
                .rate_limited_by(&self.metrics, &route.name, &r.name);
        } else {
            self.metrics.request(&route.name, refusal.code());
        }
        let status = refusal.status().as_u16();
        if status < 500 {
            let account = who.and_then(|w| w.caller.account.as_deref());
            self.top_refused.refused(key_fp, account);
        }
        if self.may_log(refusal) {
            if status >= 500 {
                tracing::warn!(route = &*route.name, plan, key_fp, status, error = %refusal, "upstream failure");
            } else {
                tracing::info!(route = &*route.name, plan, key_fp, limit, status, reason = %refusal, "refused");
            }
        }
        let mcp_id =
            (route.format == Format::Mcp).then(|| cx.rpc_id.as_ref().unwrap_or(&Value::Null));
        let ctx = respond::Context {
            templates: Some(&route.responses),
            route: &route.name,
            plan,
            mcp_id,
        };
        respond::refusal(refusal, &ctx, headers)
    }
}
