//! Decisions for another gateway (`[decision]`): steps 0–5 of a request
//! that gateway will forward itself — target, route, identity, admission,
//! limits — and an answer instead of a forward: 200 with the rate-limit
//! headers and the caller's account and plan, or exactly the refusal the
//! proxy would send. Decisions count, log and refuse like proxied requests.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};

use super::admission;
use super::inspect::RequestBody;
use super::{outcome_facts, request_id, Exchange, Peer, Turnstile};
use crate::config::{Policy, Route, Unmatched};
use crate::keys::identity::Lookup;
use crate::respond::Refusal;
use crate::store::Store;
use crate::wire::body::Body;

/// What a decision endpoint answers for one request.
#[derive(Debug)]
pub struct Verdict {
    /// 200 with the rate-limit headers and the caller's account and plan,
    /// or the refusal as the proxy would send it.
    pub response: Response<Body>,
    /// The limit the main rate-limit headers show, when limits were decided.
    pub headline: Option<Headline>,
    /// What an admitted decision counted, to give back with
    /// [`Turnstile::give_back`] when the request does not go ahead after all.
    pub taken: Option<Taken>,
}

/// What one admitted decision counted.
#[derive(Debug)]
pub struct Taken {
    checks: Vec<crate::store::OwnedCheck>,
    at: crate::clock::Nanos,
    route: Arc<str>,
    /// The exchange, for the ledger's `credits.refunded`.
    origin: Option<Arc<crate::store::Origin>>,
}

/// One limit's figures, as Envoy's rate limit service reports them.
#[derive(Debug, Clone)]
pub struct Headline {
    /// The limit's name.
    pub name: Arc<str>,
    /// Its maximum (`requests`, a bucket's `burst`, a balance's grant).
    pub limit: u32,
    /// The length of its window in seconds (0: not a window).
    pub window_secs: u64,
    /// What remains after this request.
    pub remaining: u32,
    /// Seconds until it resets.
    pub reset_secs: u64,
}

/// A decision asked for by key and route name (Envoy's rate limit service).
#[derive(Debug)]
pub struct Ask<'a> {
    /// The API key, as the descriptor carries it.
    pub key: &'a str,
    /// The route's name.
    pub route: &'a str,
    /// What the request costs (`hits_addend`).
    pub cost: u32,
}

impl Turnstile {
    /// Decides for `parts`, the original request's line and headers as the
    /// gateway reported them (the body is never read).
    pub async fn verdict(&self, parts: Parts, peer: &Peer) -> Verdict {
        let live = self.live.load_full();
        let access = self.access_start(&live.policy, &parts.method, &parts.uri, &parts.headers);
        let trace = self.tracing.as_ref().map(|t| t.exchange(&parts.headers));
        let mut cx = Exchange::new(&live, peer, request_id::of(&parts.headers), trace);
        let method = parts.method.clone();
        let outcome = self.verdict_steps(&mut cx, parts).await;
        self.conclude(&cx, &method, outcome, access).await
    }

    /// Decides for a request named by its key and route (no path, no
    /// headers): identity, plan gating, limits with `cost`.
    pub async fn verdict_for(&self, ask: &Ask<'_>, peer: &Peer) -> Verdict {
        let live = self.live.load_full();
        let uri = http::Uri::from_static("/");
        let access = self.access_start(&live.policy, &Method::POST, &uri, &HeaderMap::new());
        let trace = self.tracing.as_ref().map(|t| t.exchange(&HeaderMap::new()));
        let mut cx = Exchange::new(&live, peer, request_id::of(&HeaderMap::new()), trace);
        let outcome = self.asked_steps(&mut cx, ask).await;
        self.conclude(&cx, &Method::POST, outcome, access).await
    }

    async fn verdict_steps<'a>(
        &self,
        cx: &mut Exchange<'a>,
        mut parts: Parts,
    ) -> Result<Response<Body>, Refusal> {
        let policy: &'a Policy = &cx.live.policy;
        admission::normalise_target(&mut parts)?;
        let mut body = RequestBody::Gone;
        let not_found = |parts: &Parts| Refusal::NotFound {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
        };
        let Some(route) = self.select_route(cx, &parts, &mut body).await? else {
            if policy.server.unmatched == Unmatched::Reject {
                return Err(not_found(&parts));
            }
            return Ok(allowed(cx));
        };
        cx.route = Some(route);
        if !served(policy, route) {
            return Err(not_found(&parts));
        }
        if !route.auth {
            return Ok(allowed(cx));
        }
        self.identify_caller(cx, &parts)?;
        let Some(who) = cx.who.as_ref() else {
            return Err(Refusal::Unauthorized(
                crate::keys::identity::AuthError::Unknown,
            ));
        };
        admission::check_admission(policy, &self.budget, route, who, &parts.headers, &mut body)
            .await?;
        cx.cost = admission::price(route, &parts, &body)?;
        // A served route holds no slot: nothing outlives the decision.
        drop(self.decide_traced(cx).await?);
        Ok(allowed(cx))
    }

    async fn asked_steps<'a>(
        &self,
        cx: &mut Exchange<'a>,
        ask: &Ask<'_>,
    ) -> Result<Response<Body>, Refusal> {
        let policy: &'a Policy = &cx.live.policy;
        let route = policy
            .routes
            .iter()
            .find(|r| &*r.name == ask.route && served(policy, r))
            .ok_or_else(|| {
                Refusal::BadRequest(format!("no route named {:?} is decided here", ask.route))
            })?;
        cx.route = Some(route);
        if !route.auth {
            return Ok(allowed(cx));
        }
        let caller = {
            let plan = |name: &str| policy.plans.binary_search_by(|p| (*p.name).cmp(name)).ok();
            let lookup = Lookup {
                runtime: self.keys.cache(),
                now: self.store.in_process().now() / crate::clock::SECOND,
                plan: &plan,
                memo: Some(cx.peer.memo()),
            };
            policy.identity.identify_key(ask.key, &lookup)
        };
        if caller.is_err() && !ask.key.is_empty() {
            let digest = crate::keys::digest::digest(ask.key);
            cx.refused_key = Some(crate::keys::digest::Fingerprint::of(&digest));
        }
        cx.who = Some(admission::identified(policy, caller)?);
        let Some(who) = cx.who.as_ref() else {
            return Err(Refusal::Unauthorized(
                crate::keys::identity::AuthError::Unknown,
            ));
        };
        let mut body = RequestBody::Gone;
        admission::check_admission(
            policy,
            &self.budget,
            route,
            who,
            &HeaderMap::new(),
            &mut body,
        )
        .await?;
        cx.cost = ask.cost.max(1);
        drop(self.decide_traced(cx).await?);
        Ok(allowed(cx))
    }

    /// The answer, counted and logged as the proxy's are, with the limit
    /// its headers show.
    async fn conclude(
        &self,
        cx: &Exchange<'_>,
        method: &Method,
        outcome: Result<Response<Body>, Refusal>,
        access: Option<super::Access>,
    ) -> Verdict {
        let facts = (access.is_some() || cx.trace.is_some()).then(|| outcome_facts(&outcome));
        let response = self.finish(cx, outcome).await;
        if let Some((decision, limit)) = &facts {
            let status = response.status().as_u16();
            super::traced::annotate_exchange(
                cx,
                method.as_str(),
                status,
                decision,
                limit.as_deref(),
            );
        }
        let response = super::logged(cx, response, access, facts);
        let taken = cx.decided.as_ref().filter(|d| d.admitted).map(|d| Taken {
            checks: d.checks.iter().map(crate::store::OwnedCheck::of).collect(),
            at: d.now,
            route: cx.route.map_or_else(|| Arc::from(""), |r| r.name.clone()),
            origin: cx.origin.clone(),
        });
        Verdict {
            response,
            headline: headline(cx),
            taken,
        }
    }

    /// Gives back what an admitted decision counted: the gateway asked about
    /// several things at once (Envoy descriptors) and another was refused,
    /// so this request never goes ahead.
    pub async fn give_back(&self, taken: Taken) {
        let checks: Vec<_> = taken
            .checks
            .iter()
            .map(crate::store::OwnedCheck::check)
            .collect();
        match self
            .store
            .refund(&checks, taken.at, taken.origin.as_ref())
            .await
        {
            Ok(()) => self.metrics.refunded(&taken.route, "descriptor"),
            Err(e) => tracing::warn!(error = %e, "could not give back a decision"),
        }
    }
}

/// Whether the decision endpoints decide `route`.
fn served(policy: &Policy, route: &Route) -> bool {
    policy.decision.as_ref().is_some_and(|d| d.serves(route))
}

/// 200, with the caller's account and plan for the gateway to pass on
/// (both always present, empty without a caller: a gateway copying them
/// overwrites whatever the client sent); the rate-limit headers are added
/// as on a forwarded answer.
fn allowed(cx: &Exchange<'_>) -> Response<Body> {
    let mut response = Response::new(crate::wire::body::empty());
    *response.status_mut() = StatusCode::OK;
    let up = cx.live.policy.upstream_of(cx.route);
    match &cx.who {
        Some(who) => super::forward::caller_headers(up, who, response.headers_mut()),
        None => {
            let h = response.headers_mut();
            h.insert(
                up.account_header.clone(),
                http::HeaderValue::from_static(""),
            );
            h.insert(up.plan_header.clone(), http::HeaderValue::from_static(""));
        }
    }
    response
}

/// The limit the main rate-limit headers show, with its figures.
fn headline(cx: &Exchange<'_>) -> Option<Headline> {
    let d = cx.decided.as_ref()?;
    let headers = &cx.live.policy.headers;
    let i = crate::respond::primary_index(headers, &d.checked, !d.admitted)
        .or_else(|| (!d.checked.is_empty()).then_some(0))?;
    let c = d.checked.get(i)?;
    Some(Headline {
        name: c.spec.name.clone(),
        limit: c.verdict.limit,
        window_secs: c.spec.window_secs(d.now),
        remaining: c.verdict.remaining,
        reset_secs: crate::clock::secs_until_ceil(d.now, c.verdict.reset_at),
    })
}
