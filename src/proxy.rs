//! One request, in SPEC §1 order: route → identity → body size → limits →
//! forward → respond. [`Turnstile::handle`] reads top to bottom; each step is
//! a call into its own module, and every refusal is rendered by
//! [`crate::responses`].

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use smallvec::SmallVec;

use crate::body::{Body, BodyFault, BodyLimits, Deadline, LimitedBody, Trip, WithGuard};
use crate::config::{ConfigError, Format, Plan, Policy, Route, Unmatched, UpstreamSettings};
use crate::identity::{AuthError, Caller};
use crate::inspect::{content_length, Budget, ReadLimits, RequestBody};
use crate::jobs;
use crate::mcp;
use crate::metrics::{Metrics, RouteMetrics};
use crate::refusal_log::RefusalLog;
use crate::responses::{self, Checked, Refusal};
use crate::store::{CounterStore, Lease, LimitCheck, Store, Subject};
use crate::upstream::{Upstream, UpstreamError};
use arc_swap::ArcSwap;
use serde_json::Value;
use std::collections::HashSet;

/// What a reload did.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// CounterStore of limits that no longer exist, dropped.
    pub dropped_counters: usize,
    /// Settings that changed but only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client end of a connection, its address formatted once for
/// `X-Forwarded-For` rather than once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    ip: HeaderValue,
}

impl Peer {
    /// Describes the client at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        // An IP address is always a valid header value.
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { addr, ip }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded in either direction
/// (`transfer-encoding` too: hyper frames each side's body itself).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// The configuration in force and the upstream client built for it. A reload
/// swaps in a new one; exchanges already started finish with the one they
/// loaded.
pub struct Live {
    /// The validated config.
    pub policy: Arc<Policy>,
    upstream: Arc<Upstream>,
    /// Per route index, then one for unmatched requests.
    route_metrics: Vec<RouteMetrics>,
}

impl Live {
    /// The metric series of a route (`None`: unmatched requests).
    fn route_metrics(&self, route: Option<&Route>) -> &RouteMetrics {
        let index = route.map_or(self.route_metrics.len() - 1, |r| r.index);
        &self.route_metrics[index.min(self.route_metrics.len() - 1)]
    }

    fn new(policy: Policy, metrics: &Metrics) -> Self {
        let upstream = Upstream::new(&policy.upstream.authority, policy.upstream.connect_timeout);
        let mut route_metrics: Vec<RouteMetrics> = policy
            .routes
            .iter()
            .map(|r| metrics.route(&r.name))
            .collect();
        route_metrics.push(metrics.route(&unmatched_label()));
        Self {
            policy: Arc::new(policy),
            upstream,
            route_metrics,
        }
    }
}

/// The proxy: the live config, the counters and the metrics.
pub struct Turnstile {
    live: ArcSwap<Live>,
    store: CounterStore,
    metrics: Arc<Metrics>,
    /// Bytes of bodies held for inspection (`[server] max_buffered`).
    budget: Arc<Budget>,
    refusal_log: RefusalLog,
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

/// Route label for requests no route matched.
fn unmatched_label() -> Arc<str> {
    Arc::from("(unmatched)")
}

impl Turnstile {
    /// A proxy for `policy` counting in `store`.
    pub fn new(policy: Policy, store: CounterStore) -> Self {
        let metrics = Arc::new(Metrics::new());
        store
            .in_process()
            .set_max_counters(policy.store.max_counters);
        Self {
            budget: Budget::new(policy.server.max_buffered),
            refusal_log: RefusalLog::new(policy.log.refusals_per_second),
            live: ArcSwap::from_pointee(Live::new(policy, &metrics)),
            store,
            metrics,
        }
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.live.load().policy.clone()
    }

    /// The counter store.
    pub fn store(&self) -> &CounterStore {
        &self.store
    }

    /// Bytes of request bodies held for inspection right now.
    pub fn buffered_bytes(&self) -> u64 {
        self.budget.used()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        self.store
            .in_process()
            .set_max_counters(policy.store.max_counters);
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
    pub async fn handle<T: Send + Sync + 'static>(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        held: T,
    ) -> Response<Body> {
        let exchange = self.metrics.exchange();
        let live = self.live.load_full();
        let response = self.pipeline(&live, req, peer).await;
        response.map(|b| WithGuard::new(b, (exchange, held)).boxed())
    }

    /// One request in order: target check, route, identity, admission
    /// checks, limits, forward and respond.
    async fn pipeline(&self, live: &Live, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let policy = &*live.policy;
        let (mut parts, incoming) = req.into_parts();
        let mut body = RequestBody::Streaming(incoming);

        // 0. The target as routes see it; the upstream gets the same.
        if let Err(refusal) = normalise_target(&mut parts) {
            return self.refuse_unrouted(policy, &refusal);
        }

        // 1. Route match (reading the body only for tool routes, and only
        // once the key has been checked).
        let mut early_caller = None;
        let route_index = match self
            .select_route(live, &parts, &mut body, &mut early_caller)
            .await
        {
            Ok(Some(i)) => i,
            Ok(None) => return self.unmatched(live, parts, body, peer).await,
            Err(refused) => return refused,
        };
        let route = &policy.routes[route_index];
        if !route.auth {
            return self.forward_public(live, parts, body, peer, route).await;
        }

        // 2. Identity.
        let caller = match early_caller {
            Some(caller) => Ok(caller),
            None => policy.identity.identify(&parts.headers, parts.uri.query()),
        };
        let who = match identified(policy, caller) {
            Ok(who) => who,
            Err(refusal) => {
                return self.refuse(live, &refusal, route, None, None, HeaderMap::new());
            }
        };

        // 3-4. Plan gating, body size (before reading the body), argument
        // limits (which read a JSON body): none of these refusals consumes quota.
        if let Err(refusal) =
            check_admission(policy, &self.budget, route, &who, &parts.headers, &mut body).await
        {
            return self.refuse(
                live,
                &refusal,
                route,
                Some(&who),
                body.rpc_id(),
                HeaderMap::new(),
            );
        }

        // 5. Limits, decided together.
        let applied = &who.plan.by_route[route_index];
        let checks = limit_checks(&who, applied);
        let (now, checked, lease): (u64, Vec<Checked<'_>>, Lease) = if checks.is_empty() {
            (0, Vec::new(), Lease::default())
        } else {
            match self.decide(policy, route, &who, &checks, applied).await {
                Ok(decided) => decided,
                Err((refusal, headers)) => {
                    return self.refuse(live, &refusal, route, Some(&who), body.rpc_id(), headers);
                }
            }
        };
        // 6-7. Forward and respond.
        let admitted = Admitted {
            now,
            checks,
            checked,
            lease,
        };
        self.forward_admitted(live, parts, body, peer, route, &who, admitted)
            .await
    }

    /// Steps 6 and 7 for an admitted request: forwarded, answered with the
    /// rate-limit headers. Concurrency slots (the lease) are held until the
    /// response body is dropped: sent completely, or the exchange ended any
    /// other way. A body fault gives the quota back.
    #[allow(clippy::too_many_arguments)]
    async fn forward_admitted(
        &self,
        live: &Live,
        parts: Parts,
        body: RequestBody,
        peer: &Peer,
        route: &Route,
        who: &Identified<'_>,
        admitted: Admitted<'_>,
    ) -> Response<Body> {
        let policy = &*live.policy;
        let Admitted {
            now,
            checks,
            checked,
            mut lease,
        } = admitted;
        let with_headers = !checked.is_empty() && policy.headers.on_success;
        let rpc_id = body.rpc_id().cloned();
        let watcher = self.job_watcher(policy, route, who, &parts, &body, &mut lease);
        match self
            .forward(
                live,
                parts,
                body.into_body(),
                peer,
                Some(route),
                Some(who),
                watcher,
            )
            .await
        {
            Ok(mut response) => {
                live.route_metrics(Some(route)).forwarded();
                if with_headers {
                    // Straight into the response: no map of their own to merge.
                    responses::write_rate_headers(
                        &policy.headers,
                        &checked,
                        now,
                        false,
                        response.headers_mut(),
                    );
                }
                if lease.is_empty() {
                    response
                } else {
                    response.map(|b| WithGuard::new(b, lease).boxed())
                }
            }
            Err(refusal) => {
                if refusal.is_body_fault() && !checks.is_empty() {
                    // The upstream never received the whole request: it
                    // consumes no quota.
                    if let Err(e) = self.store.refund(&checks, now).await {
                        tracing::warn!(error = %e, "could not refund a refused request");
                    }
                }
                let rate_headers = if with_headers {
                    responses::rate_headers(&policy.headers, &checked, now, false)
                } else {
                    HeaderMap::new()
                };
                self.refuse(
                    live,
                    &refusal,
                    route,
                    Some(who),
                    rpc_id.as_ref(),
                    rate_headers,
                )
            }
        }
    }

    /// A public route (`auth = false`): forwarded with no identity and no limits.
    async fn forward_public(
        &self,
        live: &Live,
        parts: Parts,
        body: RequestBody,
        peer: &Peer,
        route: &Route,
    ) -> Response<Body> {
        let rpc_id = body.rpc_id().cloned();
        match self
            .forward(live, parts, body.into_body(), peer, Some(route), None, None)
            .await
        {
            Ok(response) => {
                live.route_metrics(Some(route)).forwarded();
                response
            }
            Err(r) => self.refuse(live, &r, route, None, rpc_id.as_ref(), HeaderMap::new()),
        }
    }

    /// The first route (file order) that matches by method, host and path,
    /// and by tool name where it has one. A tool route needs the JSON-RPC
    /// body: before it is read, the key is checked (unless a route that
    /// could match is public), and the caller found is kept in `caller`.
    async fn select_route(
        &self,
        live: &Live,
        parts: &Parts,
        body: &mut RequestBody,
        caller: &mut Option<Caller>,
    ) -> Result<Option<usize>, Response<Body>> {
        let policy = &*live.policy;
        let host = request_host(parts);
        let form = crate::path::match_form(parts.uri.path());
        let candidates = || {
            policy
                .routes
                .iter()
                .filter(|r| r.matcher.matches(&parts.method, host, &form))
        };
        for r in candidates() {
            let Some(tool) = &r.mcp_tool else {
                return Ok(Some(r.index));
            };
            if parts.method != Method::POST {
                continue;
            }
            if caller.is_none() && !candidates().any(|r| !r.auth) {
                let found = policy.identity.identify(&parts.headers, parts.uri.query());
                match found {
                    Ok(c) => *caller = Some(c),
                    Err(e) => {
                        let refusal = Refusal::Unauthorized(e);
                        return Err(self.refuse(live, &refusal, r, None, None, HeaderMap::new()));
                    }
                }
            }
            let message = match body.json(&parts.headers, self.read_limits(policy)).await {
                Ok(message) => message,
                Err(problem) => {
                    return Err(self.refuse_unrouted(policy, &problem.refusal(true, &r.name)));
                }
            };
            if mcp::batch_calls_a_tool(message) {
                let refusal = Refusal::JsonRpc {
                    status: StatusCode::BAD_REQUEST,
                    code: mcp::INVALID_REQUEST,
                    message:
                        "a JSON-RPC batch may not contain tools/call: send one call per request"
                            .into(),
                };
                return Err(self.refuse_unrouted(policy, &refusal));
            }
            if mcp::tool_call(message) == Some(tool.as_str()) {
                return Ok(Some(r.index));
            }
        }
        Ok(None)
    }

    /// No route matched: 404 with `unmatched = "reject"`, else forwarded
    /// with no identity and no limits.
    async fn unmatched(
        &self,
        live: &Live,
        parts: Parts,
        body: RequestBody,
        peer: &Peer,
    ) -> Response<Body> {
        let policy = &*live.policy;
        if policy.server.unmatched == Unmatched::Reject {
            let refusal = Refusal::NotFound {
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
            };
            return self.refuse_unrouted(policy, &refusal);
        }
        match self
            .forward(live, parts, body.into_body(), peer, None, None, None)
            .await
        {
            Ok(response) => {
                live.route_metrics(None).forwarded();
                response
            }
            Err(r) => self.refuse_unrouted(policy, &r),
        }
    }

    /// Step 5: every limit of the request decided together. Refused: the
    /// refusal and its rate-limit headers.
    async fn decide<'p>(
        &self,
        policy: &'p Policy,
        route: &Route,
        who: &Identified<'p>,
        checks: &[LimitCheck<'p>],
        applied: &'p [crate::config::AppliedLimit],
    ) -> Result<(u64, Vec<Checked<'p>>, Lease), (Refusal, HeaderMap)> {
        match self.store.decide(checks).await {
            Ok(d) => {
                let checked: Vec<Checked<'p>> = applied
                    .iter()
                    .zip(d.verdicts)
                    .map(|(a, verdict)| Checked {
                        spec: &who.plan.limits[a.limit],
                        verdict,
                    })
                    .collect();
                if d.admitted {
                    return Ok((d.now, checked, d.lease));
                }
                let headers = responses::rate_headers(&policy.headers, &checked, d.now, true);
                let refusal =
                    match responses::rate_limited(&checked, d.now, &route.name, &who.plan.name) {
                        Some(details) => Refusal::RateLimited(Box::new(details)),
                        None => {
                            Refusal::StoreUnavailable("refused without a refusing limit".into())
                        }
                    };
                Err((refusal, headers))
            }
            Err(e) => {
                self.metrics.store_error();
                tracing::error!(error = %e, "counter store failed");
                Err((Refusal::StoreUnavailable(e.to_string()), HeaderMap::new()))
            }
        }
    }

    /// What this exchange watches its answer for (SPEC §11): the pending
    /// job slots its admission took (out of `lease`), or the job its status
    /// poll or cancel names.
    fn job_watcher(
        &self,
        policy: &Policy,
        route: &Route,
        who: &Identified<'_>,
        parts: &Parts,
        body: &RequestBody,
        lease: &mut Lease,
    ) -> Option<jobs::Watcher> {
        if matches!(route.job, jobs::JobRole::None) {
            return None;
        }
        let caller = &who.caller;
        let watch = jobs::watch(
            &route.job,
            &route.matcher.path,
            parts,
            body.parsed(),
            lease.take_jobs(),
            || jobs::counters(who.plan, &caller.digest, caller.account.as_ref()),
        )?;
        Some(jobs::Watcher {
            watch,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            max: policy.server.mcp_max_body,
            rpc_id: body.rpc_id().cloned(),
        })
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
        let ctx = responses::Context {
            templates: Some(&policy.responses),
            ..Default::default()
        };
        responses::refusal(refusal, &ctx, HeaderMap::new())
    }

    /// Logs, counts and renders a refusal on `route`. `rpc_id` is the
    /// JSON-RPC id of the request, when its body was read.
    fn refuse(
        &self,
        live: &Live,
        refusal: &Refusal,
        route: &Route,
        who: Option<&Identified<'_>>,
        rpc_id: Option<&Value>,
        headers: HeaderMap,
    ) -> Response<Body> {
        let plan = who.map_or("", |w| &*w.plan.name);
        let key_fp = who.map(|w| w.caller.fingerprint.as_str());
        let limit = match refusal {
            Refusal::RateLimited(r) => Some(&*r.name),
            _ => None,
        };
        if let Refusal::RateLimited(r) = refusal {
            live.route_metrics(Some(route)).rate_limited();
            self.metrics.rate_limited(&route.name, &r.name);
        } else {
            self.metrics.request(&route.name, refusal.code());
        }
        let status = refusal.status().as_u16();
        if self.may_log(refusal) {
            if status >= 500 {
                tracing::warn!(route = &*route.name, plan, key_fp, status, error = %refusal, "upstream failure");
            } else {
                tracing::info!(route = &*route.name, plan, key_fp, limit, status, reason = %refusal, "refused");
            }
        }
        let mcp_id = (route.format == Format::Mcp).then(|| rpc_id.unwrap_or(&Value::Null));
        let ctx = responses::Context {
            templates: Some(&route.responses),
            route: &route.name,
            plan,
            mcp_id,
        };
        responses::refusal(refusal, &ctx, headers)
    }

    /// Streams the request to the upstream and its response back. With a
    /// job `watcher`, the exchange with the upstream runs on as its own task
    /// even if the client goes away (SPEC §11.2: the job runs whether or not
    /// anyone waits for the answer).
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        live: &Live,
        parts: Parts,
        body: Body,
        peer: &Peer,
        route: Option<&Route>,
        who: Option<&Identified<'_>>,
        watcher: Option<jobs::Watcher>,
    ) -> Result<Response<Body>, Refusal> {
        let policy = &*live.policy;
        let timeout = route.map_or(policy.upstream.timeout, |r| r.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let trip = Trip::default();
        let request = upstream_request(policy, parts, body, peer, route, who, trip.clone())?;

        let sent = std::time::Instant::now();
        let has_watcher = watcher.is_some();
        let upstream = live.upstream.clone();
        let exchange = async move {
            match tokio::time::timeout_at(deadline, upstream.send(request)).await {
                Err(_) => Err(None),
                Ok(Err(e)) => Err(Some(e)),
                Ok(Ok(response)) => {
                    let response = streamed_back(response, deadline);
                    Ok(match watcher {
                        Some(w) => w.answer(response).await,
                        None => response,
                    })
                }
            }
        };
        let result = if has_watcher {
            tokio::spawn(exchange)
                .await
                .unwrap_or_else(|e| Err(Some(UpstreamError::Task(e.to_string()))))
        } else {
            exchange.await
        };
        live.route_metrics(route).upstream_latency(sent.elapsed());
        match result {
            Ok(response) => Ok(response),
            Err(None) => Err(Refusal::UpstreamTimeout(timeout)),
            Err(Some(e)) => Err(match trip.get() {
                Some(BodyFault::TooLarge(over)) => Refusal::PayloadTooLarge {
                    limit: over.limit,
                    pattern: over.pattern.clone(),
                    route: route.map_or_else(unmatched_label, |r| r.name.clone()),
                },
                Some(BodyFault::Stalled(idle)) => Refusal::RequestTimeout(*idle),
                Some(BodyFault::Broken(why)) => {
                    Refusal::BrokenBody(format!("malformed request body: {why}"))
                }
                None => Refusal::BadGateway(e.to_string()),
            }),
        }
    }
}

/// The request as the upstream gets it: its target and headers rewritten,
/// its body under the route's size limits and stall timer (`trip` records
/// why the body failed, if it does).
fn upstream_request(
    policy: &Policy,
    parts: Parts,
    body: Body,
    peer: &Peer,
    route: Option<&Route>,
    who: Option<&Identified<'_>>,
    trip: Trip,
) -> Result<Request<Body>, Refusal> {
    let unmatched_limits;
    let limits = match route {
        Some(r) => &r.body,
        None => {
            unmatched_limits = BodyLimits {
                max: policy.server.max_body,
                by_type: Vec::new(),
            };
            &unmatched_limits
        }
    };
    let uri = upstream_uri(&policy.upstream, &parts.uri)?;
    let mut headers = parts.headers;
    upstream_headers(policy, &mut headers, &parts.uri, peer, who);
    let body = LimitedBody::new(
        body,
        limits,
        content_type(&headers),
        policy.server.body_timeout,
        trip,
    )
    .boxed();
    let mut request = Request::new(body);
    *request.method_mut() = parts.method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The upstream's answer as the client gets it: hop-by-hop headers removed,
/// the body bounded by the exchange's deadline.
fn streamed_back(response: Response<Incoming>, deadline: tokio::time::Instant) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Deadline::new(body, deadline).boxed())
}

/// The request headers as the upstream gets them: hop-by-hop headers and
/// spoofed account/plan headers removed, the caller's account and plan set,
/// `X-Forwarded-*` and `Host` as configured.
fn upstream_headers(
    policy: &Policy,
    headers: &mut HeaderMap,
    uri: &Uri,
    peer: &Peer,
    who: Option<&Identified<'_>>,
) {
    let up = &policy.upstream;
    let original_host = request_host_header(headers, uri);
    strip_hop_by_hop(headers);
    headers.remove(&up.account_header);
    headers.remove(&up.plan_header);
    if let Some(who) = who {
        let account = match &who.caller.account {
            Some(name) => HeaderValue::from_str(name).ok(),
            None => HeaderValue::from_str(who.caller.fingerprint.as_str()).ok(),
        };
        if let Some(account) = account {
            headers.insert(up.account_header.clone(), account);
        }
        headers.insert(up.plan_header.clone(), who.plan.header_value.clone());
    }
    set_forwarded(
        policy.server.trust_forwarded,
        headers,
        peer,
        original_host.as_ref(),
    );
    match original_host {
        Some(h) if up.preserve_host => headers.insert(HOST, h),
        _ => headers.insert(HOST, up.host_header.clone()),
    };
}

/// The upstream target for a request: the configured base path plus the
/// path and query of the client's target, in origin-form.
fn upstream_uri(up: &UpstreamSettings, original: &Uri) -> Result<Uri, Refusal> {
    {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        // Only the path and query of the client's target are used: an
        // absolute-form target never chooses where the request goes.
        let pq = if up.base_path.is_empty() {
            PathAndQuery::try_from(pq)
        } else {
            PathAndQuery::try_from(format!("{}{}", up.base_path, pq))
        };
        let pq = pq.map_err(|_| Refusal::BadRequest("invalid request target".into()))?;
        // Origin-form: the connection already goes to the upstream.
        Ok(Uri::from(pq))
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`: replaced, or appended to when `trust`.
fn set_forwarded(trust: bool, headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
    {
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) if trust && !prior.trim().is_empty() => {
                HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok()
            }
            _ => Some(peer.ip.clone()),
        };
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        if !(trust && headers.contains_key(&X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if !(trust && headers.contains_key(&X_FORWARDED_HOST)) {
            match host {
                Some(h) => {
                    headers.insert(X_FORWARDED_HOST.clone(), h.clone());
                }
                None => {
                    headers.remove(&X_FORWARDED_HOST);
                }
            }
        }
    }
}

/// What step 5 decided for an admitted request.
struct Admitted<'p> {
    /// When it was decided.
    now: u64,
    /// The checks it was decided with (for a refund).
    checks: SmallVec<[LimitCheck<'p>; 4]>,
    /// Each limit with its verdict (for the headers).
    checked: Vec<Checked<'p>>,
    /// The concurrency slots it holds.
    lease: Lease,
}

/// The counters of a request: one per limit of the caller's plan that
/// covers the route.
fn limit_checks<'p>(
    who: &Identified<'p>,
    applied: &'p [crate::config::AppliedLimit],
) -> SmallVec<[LimitCheck<'p>; 4]> {
    let caller = &who.caller;
    applied
        .iter()
        .map(|a| {
            let spec = &who.plan.limits[a.limit];
            LimitCheck {
                subject: Subject::counted(spec.per, &caller.digest, caller.account.as_ref()),
                group: Subject::group(&caller.digest, caller.account.as_ref()),
                counter: a.counter,
                rule: &spec.rule,
                queue: spec.queue,
                pinned: caller.registered,
            }
        })
        .collect()
}

/// Plan gating, the declared body size, then argument limits (which read
/// the JSON body), in that order.
async fn check_admission(
    policy: &Policy,
    budget: &Arc<Budget>,
    route: &Route,
    who: &Identified<'_>,
    headers: &HeaderMap,
    body: &mut RequestBody,
) -> Result<(), Refusal> {
    if let Some(allowed) = &route.plans {
        if !allowed.contains(&who.caller.plan) {
            return Err(Refusal::PlanRequired {
                route: route.name.clone(),
                plans: route.plan_names.clone(),
            });
        }
    }
    let whole = route.body.whole(content_type(headers));
    if content_length(headers).is_some_and(|len| len > whole.limit) {
        return Err(Refusal::PayloadTooLarge {
            limit: whole.limit,
            pattern: whole.pattern,
            route: route.name.clone(),
        });
    }
    if !route.arg_limits.is_empty() || route.job.needs_request_json() {
        let subject = route.mcp_tool.as_deref().unwrap_or(&route.name);
        let limits = ReadLimits {
            max: policy.server.mcp_max_body,
            idle: policy.server.body_timeout,
            budget,
        };
        return match body.json(headers, limits).await {
            Ok(message) => mcp::check_args(&route.arg_limits, message, subject)
                .map_err(Refusal::InvalidArguments),
            Err(problem) => Err(problem.refusal(route.format == Format::Mcp, &route.name)),
        };
    }
    Ok(())
}

/// Most header fields a request may carry, HTTP/1.1 and HTTP/2 alike.
pub const MAX_HEADERS: usize = 100;

/// Checks the request line and framing and puts the path in normal form
/// (the upstream receives it so): CONNECT → 405, too many header fields →
/// 431, an ambiguous path or a target that is not a path → 400.
fn normalise_target(parts: &mut Parts) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        return Err(Refusal::MethodNotAllowed(Method::CONNECT));
    }
    if parts.headers.len() > MAX_HEADERS {
        return Err(Refusal::HeadersTooLarge(format!(
            "too many header fields ({}; at most {MAX_HEADERS})",
            parts.headers.len()
        )));
    }
    let bad = |e: crate::path::PathError| Refusal::BadRequest(e.to_string());
    let raw = parts.uri.path();
    if parts
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() == "*")
    {
        return Err(bad(crate::path::PathError::NotOriginForm));
    }
    let normal = match crate::path::normalise(raw).map_err(bad)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normal) => normal,
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|_| Refusal::BadRequest("invalid request target".into()))?,
    );
    parts.uri =
        Uri::from_parts(uri).map_err(|_| Refusal::BadRequest("invalid request target".into()))?;
    Ok(())
}

/// The caller with its plan, or the 401 to answer.
fn identified(
    policy: &Policy,
    caller: Result<Caller, AuthError>,
) -> Result<Identified<'_>, Refusal> {
    let caller = caller.map_err(Refusal::Unauthorized)?;
    match policy.plans.get(caller.plan) {
        Some(plan) => Ok(Identified { plan, caller }),
        None => Err(Refusal::Unauthorized(AuthError::Unknown)),
    }
}

/// The request's host for route matching: `Host`, else the target's authority (HTTP/2).
fn request_host(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

fn request_host_header(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE)?.to_str().ok()
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the ones to drop; most messages carry
    // none, or only `connection: keep-alive`.
    let mut drop: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if drop.is_empty() {
        return;
    }
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            // `keep-alive` and `close` name no other header worth a lookup.
            if token.is_empty()
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                drop.push(name);
            }
        }
    }
    for name in drop {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn end_to_end_headers_are_kept_untouched() {
        let mut h = map(&[("content-type", "application/json"), ("x-api-key", "k")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h,
            map(&[("content-type", "application/json"), ("x-api-key", "k")])
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Private"),
            ("connection", "close,x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("x-private", "secret"),
            ("x-other", "secret"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, map(&[("x-kept", "yes")]));
    }

    #[test]
    fn peer_ip_is_the_forwarded_for_value() {
        let peer = Peer::new("[::1]:4000".parse().unwrap());
        let mut h = HeaderMap::new();
        set_forwarded(false, &mut h, &peer, None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        set_forwarded(
            true,
            &mut h,
            &Peer::new("127.0.0.1:5".parse().unwrap()),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
