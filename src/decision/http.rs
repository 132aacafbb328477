//! The HTTP decision endpoint (`[decision] listen`): one contract for
//! Traefik `forwardAuth` and Caddy `forward_auth` (`X-Forwarded-Method` +
//! `X-Forwarded-Uri`, `X-Forwarded-Host`), nginx `auth_request`
//! (`X-Original-Method` + `X-Original-URI`) and Envoy `ext_authz` over HTTP
//! (the request's own method and path, less `path_prefix`). The original
//! request's headers are the request's own.
//!
//! Fail closed: a header repeated, two conventions in one request, a method
//! without its URI or the other way round, a target that is not a path —
//! each is a 400, never a guess.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, HOST};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::pipeline::{Peer, Turnstile};
use crate::wire::body::Body;

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");

/// Header on a refusal for nginx: the refusal body, which nginx drops from
/// an `auth_request` answer, for its `error_page` location to send.
pub static X_TURNSTILE_REFUSAL: HeaderName = HeaderName::from_static("x-turnstile-refusal");

/// Answers one decision request from a gateway.
pub async fn handle(app: &Arc<Turnstile>, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    // The body (a gateway may send the original's) is never read.
    let (parts, _) = req.into_parts();
    let policy = app.policy();
    let prefix = policy
        .decision
        .as_ref()
        .map_or("", |d| d.path_prefix.as_str());
    let nginx = parts.headers.contains_key(&X_ORIGINAL_URI);
    let parts = match original(parts, prefix) {
        Ok(parts) => parts,
        Err(message) => {
            return crate::respond::error_response(StatusCode::BAD_REQUEST, "bad_request", &message)
        }
    };
    let verdict = app.verdict(parts, peer).await;
    if nginx && verdict.response.status() != StatusCode::OK {
        return with_body_header(verdict.response).await;
    }
    verdict.response
}

/// The original request as the gateway describes it.
pub fn original(mut parts: Parts, prefix: &str) -> Result<Parts, String> {
    let h = &parts.headers;
    let forwarded = (one(h, &X_FORWARDED_METHOD)?, one(h, &X_FORWARDED_URI)?);
    let nginx = (one(h, &X_ORIGINAL_METHOD)?, one(h, &X_ORIGINAL_URI)?);
    let host = one(h, &X_FORWARDED_HOST)?;
    let given =
        |pair: &(Option<&HeaderValue>, Option<&HeaderValue>)| pair.0.is_some() || pair.1.is_some();
    let (method, target, host) = match (given(&forwarded), given(&nginx)) {
        (true, true) => {
            return Err(
                "both X-Forwarded-Uri and X-Original-URI conventions in one request: send one"
                    .into(),
            )
        }
        (true, false) => {
            let (m, u) = both(forwarded, "X-Forwarded-Method", "X-Forwarded-Uri")?;
            (
                method_of(m)?,
                text(u, "X-Forwarded-Uri")?.to_owned(),
                host.cloned(),
            )
        }
        (false, true) => {
            let (m, u) = both(nginx, "X-Original-Method", "X-Original-URI")?;
            (method_of(m)?, text(u, "X-Original-URI")?.to_owned(), None)
        }
        (false, false) => (parts.method.clone(), own_target(&parts.uri, prefix)?, None),
    };
    if !target.starts_with('/') {
        return Err(format!("the original target {target:?} is not a path"));
    }
    let uri: Uri = target
        .parse()
        .map_err(|_| format!("the original target {target:?} is not a valid request target"))?;
    for name in [
        &X_FORWARDED_METHOD,
        &X_FORWARDED_URI,
        &X_ORIGINAL_METHOD,
        &X_ORIGINAL_URI,
    ] {
        parts.headers.remove(name);
    }
    if let Some(host) = host {
        parts.headers.insert(HOST, host);
    }
    parts.method = method;
    parts.uri = uri;
    Ok(parts)
}

/// The one value of `name`, if present; repeated is an error.
fn one<'a>(h: &'a http::HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, String> {
    let mut all = h.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(format!("{name} is repeated: send it once"));
    }
    Ok(first)
}

fn both<'a>(
    pair: (Option<&'a HeaderValue>, Option<&'a HeaderValue>),
    method: &str,
    uri: &str,
) -> Result<(&'a HeaderValue, &'a HeaderValue), String> {
    match pair {
        (Some(m), Some(u)) => Ok((m, u)),
        (None, _) => Err(format!("{uri} without {method}: send both")),
        (_, None) => Err(format!("{method} without {uri}: send both")),
    }
}

fn text<'a>(v: &'a HeaderValue, name: &str) -> Result<&'a str, String> {
    v.to_str()
        .map_err(|_| format!("{name} is not visible ASCII"))
}

fn method_of(v: &HeaderValue) -> Result<Method, String> {
    Method::from_bytes(v.as_bytes())
        .ok()
        // Methods are case-sensitive: `get` is not what a `GET` route matches.
        .filter(|_| v.as_bytes().iter().all(u8::is_ascii_uppercase))
        .ok_or_else(|| {
            format!(
                "{:?} is not an HTTP method",
                String::from_utf8_lossy(v.as_bytes())
            )
        })
}

/// The request's own path and query less `prefix` (Envoy `ext_authz`
/// appends the original path to the configured `path_prefix`).
fn own_target(uri: &Uri, prefix: &str) -> Result<String, String> {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if prefix.is_empty() {
        return Ok(pq.to_owned());
    }
    match pq.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => Ok(rest.to_owned()),
        Some("") => Ok("/".to_owned()),
        Some(rest) if rest.starts_with('?') => Ok(format!("/{rest}")),
        _ => Err(format!(
            "the path {:?} is not under path_prefix {prefix:?}, and no X-Forwarded-Uri or X-Original-URI names the original",
            uri.path()
        )),
    }
}

/// A refusal for nginx: its body also in `X-Turnstile-Refusal` (one line of
/// JSON), since nginx passes only the headers of an `auth_request` answer.
async fn with_body_header(response: Response<Body>) -> Response<Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return Response::from_parts(parts, crate::wire::body::empty());
    };
    let bytes = collected.to_bytes();
    let line: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&line) {
        parts.headers.insert(X_TURNSTILE_REFUSAL.clone(), v);
    }
    Response::from_parts(parts, crate::wire::body::full(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a gateway (or a client through it) sends, reading the
        /// original request never panics, and what is read is a path
        /// with a method spelled in capitals.
        #[test]
        fn any_headers_give_a_path_or_a_400(
            method in "[A-Za-z]{0,8}",
            uri in "[ -~]{0,40}",
            own in "/[a-z/.%?=]{0,20}",
            convention in 0usize..3,
            host in proptest::option::of("[ -~]{0,12}"),
        ) {
            let names = [("x-forwarded-method", "x-forwarded-uri"), ("x-original-method", "x-original-uri"), ("", "")];
            let (m, u) = names[convention];
            let mut b = Request::builder().method("GET").uri(own.as_str());
            if !m.is_empty() {
                b = b.header(m, method.as_str()).header(u, uri.as_str());
            }
            if let Some(h) = &host {
                b = b.header("x-forwarded-host", h.as_str());
            }
            let Ok(req) = b.body(()) else { return Ok(()) };
            if let Ok(p) = original(req.into_parts().0, "/check") {
                prop_assert!(p.uri.path().starts_with('/'));
                prop_assert!(p.method.as_str().bytes().all(|c| c.is_ascii_uppercase()) || convention == 2);
            }
        }
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_gateways_convention_gives_the_original_request() {
        let p = original(
            parts(
                "GET",
                "/",
                &[
                    ("x-forwarded-method", "POST"),
                    ("x-forwarded-uri", "/v1/gen?a=1"),
                    ("x-forwarded-host", "api.example"),
                ],
            ),
            "",
        )
        .unwrap();
        assert_eq!(
            (p.method.as_str(), p.uri.to_string().as_str()),
            ("POST", "/v1/gen?a=1")
        );
        assert_eq!(p.headers["host"], "api.example");
        assert!(p.headers.get("x-forwarded-uri").is_none());

        let p = original(
            parts(
                "GET",
                "/auth",
                &[("x-original-method", "PUT"), ("x-original-uri", "/a/b")],
            ),
            "",
        )
        .unwrap();
        assert_eq!((p.method.as_str(), p.uri.path()), ("PUT", "/a/b"));

        let p = original(parts("DELETE", "/check/v1/x?q=2", &[]), "/check").unwrap();
        assert_eq!(
            (p.method.as_str(), p.uri.to_string().as_str()),
            ("DELETE", "/v1/x?q=2")
        );
        let p = original(parts("GET", "/check", &[]), "/check").unwrap();
        assert_eq!(p.uri.path(), "/");
    }

    #[test]
    fn anything_read_two_ways_is_refused() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "/",
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/a"),
                    ("x-original-uri", "/b"),
                    ("x-original-method", "GET"),
                ],
            ),
            ("/", &[("x-forwarded-uri", "/a")]),
            ("/", &[("x-forwarded-method", "GET")]),
            (
                "/",
                &[
                    ("x-original-uri", "/a"),
                    ("x-original-uri", "/b"),
                    ("x-original-method", "GET"),
                ],
            ),
            (
                "/",
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "http://evil/a"),
                ],
            ),
            (
                "/",
                &[("x-forwarded-method", "get"), ("x-forwarded-uri", "/a")],
            ),
            (
                "/",
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/a"),
                    ("x-forwarded-host", "a"),
                    ("x-forwarded-host", "b"),
                ],
            ),
            ("/other/a", &[]),
            ("/checkout", &[]),
        ];
        for (uri, headers) in cases {
            let r = original(parts("GET", uri, headers), "/check");
            assert!(
                r.is_err(),
                "{uri} {headers:?} was read as {:?}",
                r.map(|p| p.uri)
            );
        }
    }
}
