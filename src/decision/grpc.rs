//! Envoy's rate limit service (`[decision] grpc_listen`):
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, served
//! with tonic. Each descriptor names a key and a route through the entries
//! `[decision.envoy]` names; `hits_addend` is the cost. One descriptor is
//! one decision, all of its limits or none; when any is refused, what the
//! others took is given back, so a refused request never counts.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tonic::{Request, Response, Status};

use super::proto::envoy::config::core::v3::HeaderValue;
use super::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use super::proto::envoy::service::ratelimit::v3 as rls;
use crate::config::EnvoySettings;
use crate::keys::identity::AuthError;
use crate::pipeline::{Ask, Headline, Peer, Turnstile, Verdict};
use crate::respond::Refusal;

use rls::rate_limit_response::rate_limit::Unit;
use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use rls::{RateLimitRequest, RateLimitResponse};

/// The service; one per process.
#[derive(Debug, Clone)]
pub struct RateLimitService {
    app: Arc<Turnstile>,
}

impl RateLimitService {
    /// The service deciding with `app`.
    pub fn new(app: Arc<Turnstile>) -> Self {
        Self { app }
    }
}

/// Serves the rate limit service on `listener` until `stop` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<Turnstile>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service =
        rls::rate_limit_service_server::RateLimitServiceServer::new(RateLimitService::new(app));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await
}

#[tonic::async_trait]
impl rls::rate_limit_service_server::RateLimitService for RateLimitService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let addr = request
            .remote_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let peer = Peer::new(addr);
        let policy = self.app.policy();
        let Some(settings) = policy.decision.as_ref() else {
            return Err(Status::unavailable("[decision] is no longer configured"));
        };
        let request = request.into_inner();
        if request.domain != settings.envoy.domain {
            return Ok(Response::new(unknown_domain().await));
        }
        if request.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "a rate limit request needs at least one descriptor",
            ));
        }
        let hits = request.hits_addend.max(1);
        let mut statuses = Vec::with_capacity(request.descriptors.len());
        let mut taken = Vec::new();
        let mut shown: Option<(Verdict, bool)> = None;
        for descriptor in &request.descriptors {
            let mut verdict = match ask(&settings.envoy, descriptor, hits) {
                Ok(ask) => self.app.verdict_for(&ask, &peer).await,
                Err(refusal) => refused_without_asking(&refusal),
            };
            let ok = verdict.response.status() == StatusCode::OK;
            statuses.push(status(ok, verdict.headline.as_ref()));
            if let Some(t) = verdict.taken.take() {
                taken.push(t);
            }
            // The answer's headers and body: the first refusal's, else the last admission's.
            if shown.as_ref().is_none_or(|(_, shown_ok)| *shown_ok) {
                shown = Some((verdict, ok));
            }
        }
        let refused = statuses.iter().any(|s| s.code != Code::Ok as i32);
        if refused {
            for t in taken {
                self.app.give_back(t).await;
            }
        }
        let mut answer = RateLimitResponse {
            overall_code: if refused { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        };
        if let Some((verdict, _)) = shown {
            fill(&mut answer, verdict.response, refused).await;
        }
        Ok(Response::new(answer))
    }
}

/// The key and route a descriptor names, and its cost.
fn ask<'a>(
    envoy: &EnvoySettings,
    d: &'a RateLimitDescriptor,
    hits: u32,
) -> Result<Ask<'a>, Refusal> {
    let value = |name: &str| -> Result<Option<&'a str>, Refusal> {
        let mut found = d
            .entries
            .iter()
            .filter(|e| e.key == name)
            .map(|e| e.value.as_str());
        let first = found.next();
        if found.any(|other| Some(other) != first) {
            return Err(Refusal::BadRequest(format!(
                "descriptor entry {name:?} given twice with different values"
            )));
        }
        Ok(first)
    };
    // Envoy's `request_headers` action copies a header as it is: an
    // `Authorization` value still has its scheme.
    let key = value(&envoy.key)?.unwrap_or("");
    let key = match key.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => key,
    };
    let route = value(&envoy.route)?.unwrap_or("");
    let cost = match d.hits_addend {
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX).max(1),
        None => hits,
    };
    Ok(Ask { key, route, cost })
}

/// A descriptor that could not even be asked about (read two ways).
fn refused_without_asking(refusal: &Refusal) -> Verdict {
    let ctx = crate::respond::Context::default();
    Verdict {
        response: crate::respond::refusal(refusal, &ctx, HeaderMap::new()),
        headline: None,
        taken: None,
    }
}

/// OVER_LIMIT with the 401 body: the domain is not turnstile's.
async fn unknown_domain() -> RateLimitResponse {
    let verdict = refused_without_asking(&Refusal::Unauthorized(AuthError::Unknown));
    let mut answer = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        ..Default::default()
    };
    fill(&mut answer, verdict.response, true).await;
    answer
}

/// A descriptor's status: its code and the limit its headers show.
fn status(ok: bool, headline: Option<&Headline>) -> DescriptorStatus {
    let code = if ok { Code::Ok } else { Code::OverLimit } as i32;
    let Some(h) = headline else {
        return DescriptorStatus {
            code,
            ..Default::default()
        };
    };
    let (unit, per_unit) = nearest_unit(h.limit, h.window_secs);
    DescriptorStatus {
        code,
        current_limit: Some(RateLimit {
            name: h.name.to_string(),
            requests_per_unit: per_unit,
            unit: unit as i32,
        }),
        limit_remaining: h.remaining,
        duration_until_reset: Some(prost_types::Duration {
            seconds: i64::try_from(h.reset_secs).unwrap_or(i64::MAX),
            nanos: 0,
        }),
    }
}

/// A limit of `limit` per `window` seconds in Envoy's terms: the unit
/// nearest the window (on a log scale), the limit scaled to it (at least 1).
/// A limit without a window (a balance, a slot count) is reported as is,
/// per unknown unit.
pub fn nearest_unit(limit: u32, window: u64) -> (Unit, u32) {
    const UNITS: [(Unit, u64); 6] = [
        (Unit::Second, 1),
        (Unit::Minute, 60),
        (Unit::Hour, 3_600),
        (Unit::Day, 86_400),
        (Unit::Month, 30 * 86_400),
        (Unit::Year, 365 * 86_400),
    ];
    if window == 0 {
        return (Unit::Unknown, limit);
    }
    let distance = |len: u64| (window as f64 / len as f64).ln().abs();
    let (unit, len) = UNITS
        .iter()
        .copied()
        .min_by(|a, b| distance(a.1).total_cmp(&distance(b.1)))
        .unwrap_or((Unit::Second, 1));
    let scaled = (f64::from(limit) * len as f64 / window as f64).round();
    (unit, (scaled as u32).max(1))
}

/// The answer's headers (`response_headers_to_add`) and, refused, the
/// refusal body (`raw_body`), from the answer turnstile would have sent.
async fn fill(
    answer: &mut RateLimitResponse,
    response: http::Response<crate::wire::body::Body>,
    refused: bool,
) {
    let (parts, body) = response.into_parts();
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH {
            continue;
        }
        answer.response_headers_to_add.push(HeaderValue {
            key: name.as_str().to_owned(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            raw_value: Vec::new(),
        });
    }
    if refused {
        if let Ok(collected) = body.collect().await {
            answer.raw_body = collected.to_bytes().to_vec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_reported_in_the_nearest_unit() {
        assert_eq!(nearest_unit(10, 60), (Unit::Minute, 10));
        assert_eq!(nearest_unit(1000, 86_400), (Unit::Day, 1000));
        assert_eq!(nearest_unit(10, 1), (Unit::Second, 10));
        assert_eq!(nearest_unit(100, 3_600), (Unit::Hour, 100));
        // 10 per 5 minutes: closer to a minute than an hour, 2 per minute.
        assert_eq!(nearest_unit(10, 300), (Unit::Minute, 2));
        assert_eq!(nearest_unit(5_000, 31 * 86_400), (Unit::Month, 4_839));
        assert_eq!(nearest_unit(3, 0), (Unit::Unknown, 3));
        // A week: nearer a month than a day; 1 a week is about 4 a month.
        assert_eq!(nearest_unit(1, 7 * 86_400), (Unit::Month, 4));
    }
}
