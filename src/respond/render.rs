//! A refusal rendered: status, headers and body (the default JSON, a
//! template, or the JSON-RPC shape on MCP routes).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::refusal::Refusal;
use super::templates::Context;
use super::text::{json_escape_into, num_value};
use crate::wire::body::{full, Body};

/// Renders a refusal as a response, with `rate_headers` attached.
pub fn refusal(refusal: &Refusal, ctx: &Context<'_>, rate_headers: HeaderMap) -> Response<Body> {
    let json = || HeaderValue::from_static("application/json");
    let template = ctx.templates.and_then(|s| s.get(refusal.code()));
    let (status, content_type, body) = match (refusal, ctx.mcp_id, template) {
        (
            Refusal::JsonRpc {
                status,
                code,
                message,
            },
            id,
            _,
        ) => (
            *status,
            json(),
            crate::content::mcp::rpc_error(id.unwrap_or(&serde_json::Value::Null), *code, message),
        ),
        (r, Some(id), t) if r.renders_as_tool_error() => {
            // MCP clients read tool errors, not HTTP statuses: 200 with isError.
            let text = match t.and_then(|t| t.body.as_deref()) {
                Some(pieces) => r.render_template(pieces, ctx),
                None => r.mcp_text(),
            };
            (
                StatusCode::OK,
                json(),
                crate::content::mcp::tool_error(id, &text),
            )
        }
        (r, _, Some(t)) => (
            t.status.unwrap_or(r.status()),
            t.content_type.clone(),
            t.body
                .as_deref()
                .map_or_else(|| r.default_body(), |p| r.render_template(p, ctx)),
        ),
        (r, _, None) => (r.status(), json(), r.default_body()),
    };
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    *headers = rate_headers;
    headers.insert(CONTENT_TYPE, content_type);
    match refusal {
        Refusal::Unauthorized(_) => {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Refusal::RateLimited(r) => {
            headers.insert(RETRY_AFTER, num_value(r.retry_after));
        }
        Refusal::Overloaded(_) => {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        Refusal::OverCapacity(c) => {
            headers.insert(RETRY_AFTER, num_value(c.retry_after));
        }
        Refusal::MethodNotAllowed(_) => {
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        _ => {}
    }
    if refusal.closes_connection() {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A JSON error answer that is not a refusal of a proxied request (the admin
/// API's): `{"error":CODE,"message":MESSAGE}`, escaped like every refusal body.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut body = String::with_capacity(32 + code.len() + message.len());
    body.push_str("{\"error\":\"");
    json_escape_into(code, &mut body);
    body.push_str("\",\"message\":\"");
    json_escape_into(message, &mut body);
    body.push_str("\"}");
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
