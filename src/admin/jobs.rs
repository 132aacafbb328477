//! `POST /v1/jobs/end` (a job ended by its id alone: the upstream's own
//! backend calls it when a job finishes, for APIs that report completion
//! by webhook rather than a status poll) and `GET /v1/capacity` (each
//! capacity pool's slots in use and requests waiting, by plan).

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::{error, json_response, store_error};
use crate::config::Policy;
use crate::pipeline::Turnstile;
use crate::wire::body::Body;

/// Largest body a `POST /v1/jobs/end` may carry.
const MAX_BODY: usize = 64 * 1024;
/// Most ids one call may end.
const MAX_IDS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndJobs {
    id: Option<String>,
    ids: Option<Vec<String>>,
}

/// The ids a body names: `{"id": "..."}` or `{"ids": [...]}`, nothing else.
fn parse(bytes: &[u8]) -> Result<Vec<String>, String> {
    let body: EndJobs = serde_json::from_slice(bytes)
        .map_err(|e| format!("expected {{\"id\": \"JOB\"}} or {{\"ids\": [\"JOB\", ...]}}: {e}"))?;
    let ids = match (body.id, body.ids) {
        (Some(id), None) => vec![id],
        (None, Some(ids)) => ids,
        _ => return Err("give either id or ids, not both and not neither".into()),
    };
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(format!("ids must list 1 to {MAX_IDS} jobs"));
    }
    if ids
        .iter()
        .any(|id| id.is_empty() || crate::jobs::is_unreadable(id))
    {
        return Err("a job id must be a non-empty id the upstream gave".into());
    }
    Ok(ids)
}

/// The limit names of counter `counter` in `policy`.
fn limit_names(policy: &Policy, counter: u64) -> Vec<String> {
    let mut names = Vec::new();
    for plan in &policy.plans {
        for a in plan
            .by_route
            .iter()
            .flatten()
            .filter(|a| a.counter == counter)
        {
            if let Some(spec) = plan.limits.get(a.limit) {
                if !names.iter().any(|n| n == &*spec.name) {
                    names.push(spec.name.to_string());
                }
            }
        }
    }
    names
}

/// `POST /v1/jobs/end`: 200 with what each id ended (the counters that
/// held it, by subject and limit, and the pools), 404 when none of the ids
/// is held anywhere.
pub(super) async fn end(
    app: &Turnstile,
    policy: &Policy,
    req: Request<Incoming>,
) -> Response<Body> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let m = format!("could not read the body (at most {MAX_BODY} bytes): {e}");
            return error(StatusCode::BAD_REQUEST, "bad_request", &m);
        }
    };
    let ids = match parse(&bytes) {
        Ok(ids) => ids,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", &m),
    };
    let mut ended = Vec::new();
    let mut unknown = Vec::new();
    for id in ids {
        let holders = match app
            .store()
            .end_job_by_id(&id, crate::store::How::Done)
            .await
        {
            Ok(h) => h,
            Err(e) => return store_error(e),
        };
        let pools = match app.pools().end_job(&id, None).await {
            Ok(p) => p,
            Err(e) => return store_error(e),
        };
        if holders.is_empty() && pools.is_empty() {
            unknown.push(id);
            continue;
        }
        app.metrics()
            .job_ended(crate::jobs::Ended::Upstream.label());
        tracing::info!(job = %id, "job ended by its id through the admin API");
        let held: Vec<_> = holders
            .iter()
            .map(|(subject, counter)| json!({ "subject": subject, "limits": limit_names(policy, *counter) }))
            .collect();
        ended.push(json!({ "id": id, "held": held, "pools": pools }));
    }
    if ended.is_empty() {
        let m = format!("no job {} in progress", unknown.join(", "));
        return error(StatusCode::NOT_FOUND, "not_found", &m);
    }
    json_response(
        StatusCode::OK,
        &json!({ "ended": ended, "unknown": unknown }),
    )
}

/// `GET /v1/capacity`: every pool's figures.
pub(super) async fn capacity(app: &Turnstile) -> Response<Body> {
    match app.pools().usage().await {
        Ok(pools) => {
            let pools: Vec<_> = pools
                .iter()
                .map(|p| {
                    let waiting: serde_json::Map<String, serde_json::Value> = p
                        .waiting
                        .iter()
                        .map(|(plan, n)| (plan.to_string(), json!(n)))
                        .collect();
                    let c = app.metrics().capacity();
                    let mean_wait: serde_json::Map<String, serde_json::Value> = p
                        .waiting
                        .iter()
                        .map(|(plan, _)| (plan.to_string(), json!(c.mean_wait(&p.name, plan).0)))
                        .collect();
                    json!({
                        "name": p.name,
                        "max": p.max,
                        "in_use": p.in_use,
                        "jobs": p.jobs,
                        "waiting": waiting,
                        "waiting_total": p.waiting.iter().map(|(_, n)| n).sum::<u64>(),
                        "mean_wait_seconds": mean_wait,
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "pools": pools }))
        }
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn bodies_are_read_one_way_only() {
        assert_eq!(parse(br#"{"id":"vid_4"}"#).unwrap(), vec!["vid_4"]);
        assert_eq!(parse(br#"{"ids":["a","b"]}"#).unwrap(), vec!["a", "b"]);
        for bad in [
            &br#"{"id":"a","ids":["b"]}"#[..],
            br#"{"id":"a","id":"b"}"#,
            br#"{"id":4}"#,
            br#"{"job":"a"}"#,
            br#"{}"#,
            br#"{"ids":[]}"#,
            br#"{"id":""}"#,
            b"id=a",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
