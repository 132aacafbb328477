//! Everything turnstile says itself: the refusal bodies (default
//! or operator templates) and the rate-limit headers (docs/headers-and-refusals.md). Nothing
//! else in the crate builds an error response.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::clock::{secs_until_ceil, Nanos, SECOND};
use crate::keys::identity::AuthError;
use crate::limits::{format_rfc3339, write_rfc3339, Rule, Verdict};
use crate::limits::{HeaderTrio, LimitSpec};
use crate::wire::body::{full, Body};

/// Why turnstile answers a request itself. Each variant maps to exactly one response.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// 400: the request cannot be handled as sent.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no route matched and `unmatched = "reject"`.
    #[error("no route for {method} {path}")]
    NotFound {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
    },
    /// 401: no usable API key.
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    /// 403: the caller's plan may not use this route (plan gating).
    #[error("route {route} requires plan {}", plan_list(plans))]
    PlanRequired {
        /// Route name.
        route: Arc<str>,
        /// The plans that may use it.
        plans: Vec<Arc<str>>,
    },
    /// 400: a JSON argument is out of its bounds (`arg_limits`).
    #[error("{0}")]
    InvalidArguments(String),
    /// A JSON-RPC level error on an MCP endpoint: malformed JSON (-32700), a
    /// refused batch, a body over `mcp_max_body`.
    #[error("{message}")]
    JsonRpc {
        /// HTTP status (400 or 413).
        status: StatusCode,
        /// JSON-RPC error code.
        code: i64,
        /// What went wrong.
        message: String,
    },
    /// 413: the body exceeds the route's limit.
    #[error("body exceeds {}{} on route {route}", crate::wire::body::display_size(*limit), pattern.as_ref().map(|p| format!(" for {p}")).unwrap_or_default())]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
        /// The content-type pattern that set the limit (`image/*`), if any.
        pattern: Option<String>,
        /// Route name.
        route: Arc<str>,
    },
    /// 429: a limit refused.
    #[error("{0}")]
    RateLimited(Box<RateLimited>),
    /// 413: an uploaded file lasts longer than `max_duration_by_type` allows.
    #[error("{} lasts {}; at most {} on route {}", .0.what, crate::content::media::shown(.0.duration_seconds, .0.limit_seconds), crate::content::media::shown(.0.limit_seconds, .0.limit_seconds), .0.route)]
    MediaTooLong(Box<MediaTooLong>),
    /// 415: a file of a type with a duration limit whose duration cannot be read.
    #[error("{what}: {reason}; a duration limit applies to it on route {route}")]
    UnreadableMedia {
        /// `audio/mpeg part "file"`, or `audio/mpeg body`.
        what: String,
        /// Why it cannot be read.
        reason: String,
        /// Route name.
        route: Arc<str>,
    },
    /// 402: the request costs more than the caller's credits balance.
    #[error("Insufficient credits: this request costs {} credits, {} left.", .0.cost, .0.balance)]
    InsufficientCredits(Box<InsufficientCredits>),
    /// 502: the upstream could not be reached or failed before answering.
    #[error("{0}")]
    BadGateway(String),
    /// 503: the counter store could not decide.
    #[error("{0}")]
    StoreUnavailable(String),
    /// 504: the upstream did not answer in time.
    #[error("upstream did not answer within {} s", .0.as_secs_f64())]
    UpstreamTimeout(Duration),
    /// 400, connection closed: the request body's framing broke while it
    /// was streamed (malformed chunked encoding, cut short).
    #[error("{0}")]
    BrokenBody(String),
    /// 405: a method turnstile never forwards (CONNECT).
    #[error("{0} is not supported: turnstile forwards requests, it does not open tunnels")]
    MethodNotAllowed(Method),
    /// 408: the request body stalled for `[server] body_timeout`.
    #[error("request body stalled: no data for {} s", .0.as_secs_f64())]
    RequestTimeout(Duration),
    /// 415: a body that must be read for a decision came compressed.
    #[error(
        "Content-Encoding {encoding} is not accepted on route {route}: send the body uncompressed"
    )]
    UnsupportedEncoding {
        /// The `Content-Encoding` sent.
        encoding: String,
        /// Route name (or the path, before a route is known).
        route: Arc<str>,
    },
    /// 415: a route reads the JSON body, and the body is not declared JSON.
    #[error(
        "route {route} reads the request's JSON body: send it with Content-Type: application/json{}",
        .content_type.as_deref().map(|c| format!(" (not {c})")).unwrap_or_default()
    )]
    NotJson {
        /// The `Content-Type` sent, if any.
        content_type: Option<String>,
        /// Route name.
        route: Arc<str>,
    },
    /// 431: more header fields than HTTP/1.1 accepts.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 503: bodies held for inspection would exceed `[server] max_buffered`.
    #[error("{0}")]
    Overloaded(String),
}

/// The refusing limit of a 429, with every figure its body and template need.
#[derive(Debug, Clone)]
pub struct RateLimited {
    /// Name of the refusing limit (`X-RateLimit-Type`).
    pub name: Arc<str>,
    /// Its `requests` (or `burst`).
    pub limit: u32,
    /// Requests counted in its window.
    pub count: u32,
    /// Seconds until every refusing limit admits (`Retry-After`).
    pub retry_after: u64,
    /// When the refusing limit admits again.
    pub reset_at: Nanos,
    /// Seconds until `reset_at`.
    pub reset_in_seconds: u64,
    /// The window as written in the config (`30m`, `month`, `10/s`).
    pub window: Arc<str>,
    /// Route name.
    pub route: Arc<str>,
    /// Plan name.
    pub plan: Arc<str>,
    /// What the refusing limit counts.
    pub counts: Counts,
}

/// The file that refused a 413 `media_too_long`.
#[derive(Debug, Clone)]
pub struct MediaTooLong {
    /// `audio/mpeg part "file"`, or `audio/mpeg body`.
    pub what: String,
    /// Its duration, whole seconds rounded up.
    pub duration_seconds: u64,
    /// The limit in seconds.
    pub limit_seconds: u64,
    /// Route name.
    pub route: Arc<str>,
}

/// The balance that refused a 402 (docs/headers-and-refusals.md).
#[derive(Debug, Clone)]
pub struct InsufficientCredits {
    /// Name of the credits limit.
    pub name: Arc<str>,
    /// The balance (never shown below 0).
    pub balance: i64,
    /// What the request costs.
    pub cost: u32,
}

/// What a refusing limit counts, for the wording of its refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Requests (or cost) over time.
    Requests,
    /// Exchanges in flight.
    Concurrent,
    /// Generations in progress (docs/configuration.md, "Jobs").
    Jobs,
}

impl RateLimited {
    /// The 429 message, written piece by piece into `out` (the refusal path
    /// formats nothing): `name` appends the configured names (the window as
    /// written, the limit's name), escaped for JSON in a body.
    fn write_message(&self, out: &mut String, name: fn(&str, &mut String)) {
        let (lead, after_limit) = match self.counts {
            Counts::Concurrent => ("Too many concurrent requests: at most ", " at once ("),
            Counts::Jobs => ("Too many generations in progress: at most ", " at once ("),
            Counts::Requests => ("Rate limit exceeded: ", " requests per "),
        };
        out.push_str(lead);
        push_num(out, u64::from(self.limit));
        out.push_str(after_limit);
        if self.counts == Counts::Requests {
            name(&self.window, out);
            out.push_str(" (");
        }
        name(&self.name, out);
        out.push_str("). Retry in ");
        push_num(out, self.retry_after);
        out.push_str(" s.");
    }
}

/// The message of a 429 body.
impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::with_capacity(96);
        self.write_message(&mut text, |name, out| out.push_str(name));
        f.write_str(&text)
    }
}

/// The refusal names operators can template (`[responses.NAME]`).
pub const RESPONSE_NAMES: [&str; 9] = [
    "unauthorized",
    "plan_required",
    "payload_too_large",
    "rate_limited",
    "invalid_arguments",
    "bad_gateway",
    "upstream_timeout",
    "not_found",
    "insufficient_credits",
];

impl Refusal {
    /// The HTTP status this refusal has by default.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::NotFound { .. } => StatusCode::NOT_FOUND,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Refusal::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::InsufficientCredits(_) => StatusCode::PAYMENT_REQUIRED,
            Refusal::MediaTooLong(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnreadableMedia { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::PlanRequired { .. } => StatusCode::FORBIDDEN,
            Refusal::InvalidArguments(_) => StatusCode::BAD_REQUEST,
            Refusal::JsonRpc { status, .. } => *status,
            Refusal::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Refusal::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::BrokenBody(_) => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::UnsupportedEncoding { .. } | Refusal::NotJson { .. } => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Refusal::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable `error` code, also the `[responses.NAME]` name.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::NotFound { .. } => "not_found",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::PayloadTooLarge { .. } => "payload_too_large",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::InsufficientCredits(_) => "insufficient_credits",
            Refusal::MediaTooLong(_) => "media_too_long",
            Refusal::UnreadableMedia { .. } => "unreadable_media",
            Refusal::PlanRequired { .. } => "plan_required",
            Refusal::InvalidArguments(_) => "invalid_arguments",
            Refusal::JsonRpc { .. } => "jsonrpc_error",
            Refusal::BadGateway(_) => "bad_gateway",
            Refusal::StoreUnavailable(_) => "store_unavailable",
            Refusal::UpstreamTimeout(_) => "upstream_timeout",
            Refusal::BrokenBody(_) => "bad_request",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::RequestTimeout(_) => "request_timeout",
            Refusal::UnsupportedEncoding { .. } | Refusal::NotJson { .. } => {
                "unsupported_media_type"
            }
            Refusal::HeadersTooLarge(_) => "headers_too_large",
            Refusal::Overloaded(_) => "overloaded",
        }
    }

    /// Every [`Refusal::code`], for reading the per-decision series back.
    pub const CODES: &'static [&'static str] = &[
        "bad_request",
        "not_found",
        "unauthorized",
        "payload_too_large",
        "rate_limited",
        "insufficient_credits",
        "media_too_long",
        "unreadable_media",
        "plan_required",
        "invalid_arguments",
        "jsonrpc_error",
        "bad_gateway",
        "store_unavailable",
        "upstream_timeout",
        "method_not_allowed",
        "request_timeout",
        "unsupported_media_type",
        "headers_too_large",
        "overloaded",
    ];

    /// Whether the connection must be closed after this answer: what the
    /// client sent next can no longer be told apart from this request.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Refusal::BrokenBody(_))
    }

    /// Whether the request body failed on its way (too large, stalled,
    /// broken): the upstream never received the whole request, so the
    /// exchange gives back the quota it took.
    pub fn is_body_fault(&self) -> bool {
        matches!(
            self,
            Refusal::PayloadTooLarge { .. } | Refusal::RequestTimeout(_) | Refusal::BrokenBody(_)
        )
    }

    /// The default JSON body (docs/headers-and-refusals.md).
    fn default_body(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("{\"error\":\"");
        out.push_str(self.code());
        out.push_str("\",\"message\":\"");
        match self {
            Refusal::RateLimited(r) => r.write_message(&mut out, json_escape_into),
            _ => {
                let _ = write!(JsonEscaped(&mut out), "{self}");
            }
        }
        out.push('"');
        match self {
            Refusal::PayloadTooLarge { limit, .. } => {
                let _ = write!(out, ",\"limit_bytes\":{limit}");
            }
            Refusal::PlanRequired { plans, .. } => {
                out.push_str(",\"plans\":[");
                for (i, p) in plans.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('"');
                    json_escape_into(p, &mut out);
                    out.push('"');
                }
                out.push(']');
            }
            Refusal::RateLimited(r) => {
                out.push_str(",\"rate_limit\":{\"name\":\"");
                json_escape_into(&r.name, &mut out);
                out.push_str("\",\"count\":");
                push_num(&mut out, u64::from(r.count));
                out.push_str(",\"limit\":");
                push_num(&mut out, u64::from(r.limit));
                out.push_str(",\"remaining\":0,\"reset_in_seconds\":");
                push_num(&mut out, r.reset_in_seconds);
                out.push_str(",\"reset_at\":\"");
                write_rfc3339(r.reset_at, &mut out);
                out.push_str("\"}");
            }
            Refusal::MediaTooLong(m) => {
                let _ = write!(
                    out,
                    ",\"limit_seconds\":{},\"duration_seconds\":{}",
                    m.limit_seconds, m.duration_seconds
                );
            }
            Refusal::InsufficientCredits(c) => {
                out.push_str(",\"credits\":{\"name\":\"");
                json_escape_into(&c.name, &mut out);
                let _ = write!(out, "\",\"balance\":{},\"cost\":{}}}", c.balance, c.cost);
            }
            _ => {}
        }
        out.push('}');
        out
    }

    fn var(&self, var: Var, route: &str, plan: &str, out: &mut String) {
        let r = match self {
            Refusal::RateLimited(r) => Some(r),
            _ => None,
        };
        let credits = match self {
            Refusal::InsufficientCredits(c) => Some(c),
            _ => None,
        };
        match var {
            Var::Route => json_escape_into(route, out),
            Var::Plan => json_escape_into(plan, out),
            Var::Name => match credits {
                Some(c) => json_escape_into(&c.name, out),
                None => json_escape_into(r.map_or("", |r| &r.name), out),
            },
            Var::Cost => push_num(out, credits.map_or(0, |c| u64::from(c.cost))),
            Var::Balance => {
                let _ = write!(out, "{}", credits.map_or(0, |c| c.balance));
            }
            Var::Window => json_escape_into(r.map_or("", |r| &r.window), out),
            Var::ResetAt => {
                out.push_str(&r.map(|r| format_rfc3339(r.reset_at)).unwrap_or_default())
            }
            Var::Limit => push_num(out, r.map_or(0, |r| r.limit as u64)),
            Var::Count => push_num(out, r.map_or(0, |r| r.count as u64)),
            Var::Remaining => push_num(out, 0),
            Var::RetryAfter => push_num(out, r.map_or(0, |r| r.retry_after)),
            Var::ResetInSeconds => push_num(out, r.map_or(0, |r| r.reset_in_seconds)),
        }
    }
}

/// A placeholder in a response template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Name,
    Limit,
    Count,
    Remaining,
    RetryAfter,
    ResetInSeconds,
    ResetAt,
    Window,
    Route,
    Plan,
    Cost,
    Balance,
}

const VARS: [(&str, Var); 12] = [
    ("name", Var::Name),
    ("limit", Var::Limit),
    ("count", Var::Count),
    ("remaining", Var::Remaining),
    ("retry_after", Var::RetryAfter),
    ("reset_in_seconds", Var::ResetInSeconds),
    ("reset_at", Var::ResetAt),
    ("window", Var::Window),
    ("route", Var::Route),
    ("plan", Var::Plan),
    ("cost", Var::Cost),
    ("balance", Var::Balance),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// An operator's replacement for one refusal, parsed at config load.
#[derive(Debug, Clone)]
pub struct Template {
    status: Option<StatusCode>,
    content_type: HeaderValue,
    body: Option<Vec<Piece>>,
}

impl Template {
    /// Builds a template; `{name}`-style placeholders are recognised only for
    /// the known names, so JSON braces stay literal.
    /// A template without `body` keeps the default body.
    pub fn new(status: Option<StatusCode>, content_type: HeaderValue, body: Option<&str>) -> Self {
        let body = body.map(parse_pieces);
        Self {
            status,
            content_type,
            body,
        }
    }
}

fn parse_pieces(body: &str) -> Vec<Piece> {
    {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = body;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let var = after.find('}').and_then(|close| {
                VARS.iter()
                    .find(|(n, _)| *n == &after[..close])
                    .map(|(_, v)| (close, *v))
            });
            match var {
                Some((close, v)) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Var(v));
                    rest = &after[close + 1..];
                }
                None => {
                    text.push('{');
                    rest = after;
                }
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        pieces
    }
}

/// The templates in force for one route: route-level ones over global ones.
#[derive(Debug, Clone, Default)]
pub struct ResponseSet {
    templates: [Option<Arc<Template>>; RESPONSE_NAMES.len()],
}

impl ResponseSet {
    /// Sets the template for `name` (one of [`RESPONSE_NAMES`]); false if unknown.
    pub fn set(&mut self, name: &str, template: Arc<Template>) -> bool {
        match RESPONSE_NAMES.iter().position(|n| *n == name) {
            Some(i) => {
                self.templates[i] = Some(template);
                true
            }
            None => false,
        }
    }

    fn get(&self, code: &str) -> Option<&Template> {
        let i = RESPONSE_NAMES.iter().position(|n| *n == code)?;
        self.templates[i].as_deref()
    }
}

/// Where a refusal is rendered: the templates in force, the names that fill
/// placeholders, and — for a route answering in MCP format — the JSON-RPC id
/// to echo.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// Templates in force (route over global).
    pub templates: Option<&'a ResponseSet>,
    /// Route name (`""` when none matched).
    pub route: &'a str,
    /// Plan name (`""` before identity).
    pub plan: &'a str,
    /// `Some(id)`: answer 429/403/413/400-argument refusals as MCP tool errors.
    pub mcp_id: Option<&'a serde_json::Value>,
}

impl Refusal {
    /// The text of an MCP tool error for this refusal.
    fn mcp_text(&self) -> String {
        match self {
            Refusal::RateLimited(r) if r.counts == Counts::Concurrent => format!(
                "Too many requests at once (at most {}). Try again in {} s.",
                r.limit, r.retry_after
            ),
            Refusal::RateLimited(r) if r.counts == Counts::Jobs => format!(
                "Too many generations in progress (at most {}). Try again in {} s.",
                r.limit, r.retry_after
            ),
            Refusal::RateLimited(r) => {
                format!("Rate limit exceeded. Try again in {} s.", r.retry_after)
            }
            Refusal::PayloadTooLarge { .. } => format!("Request too large: {self}."),
            Refusal::InsufficientCredits(_) => self.to_string(),
            Refusal::PlanRequired { route, plans } => {
                format!("{route} requires plan {}.", plan_list(plans))
            }
            other => other.to_string(),
        }
    }

    fn renders_as_tool_error(&self) -> bool {
        matches!(
            self,
            Refusal::RateLimited(_)
                | Refusal::InsufficientCredits(_)
                | Refusal::PlanRequired { .. }
                | Refusal::PayloadTooLarge { .. }
                | Refusal::InvalidArguments(_)
        )
    }

    fn render_template(&self, pieces: &[Piece], ctx: &Context<'_>) -> String {
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(s) => out.push_str(s),
                Piece::Var(v) => self.var(*v, ctx.route, ctx.plan, &mut out),
            }
        }
        out
    }
}

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

fn plan_list(plans: &[Arc<str>]) -> String {
    plans.iter().map(|p| &**p).collect::<Vec<_>>().join(" or ")
}

/// How `X-RateLimit-Reset` is expressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetFormat {
    /// Unix seconds.
    Unix,
    /// Seconds from now.
    Seconds,
}

/// Validated `[headers]` settings.
#[derive(Debug, Clone)]
pub struct HeaderSettings {
    /// The main trio (`X-RateLimit-Limit/-Remaining/-Reset`).
    pub main: HeaderTrio,
    /// `{prefix}-Type`.
    pub kind: HeaderName,
    /// Unix or relative reset.
    pub reset: ResetFormat,
    /// Also on forwarded responses.
    pub on_success: bool,
    /// Also `RateLimit-Policy` / `RateLimit`.
    pub ietf: bool,
    /// Pin the main trio to this limit name where it applies.
    pub primary: Option<String>,
    /// How the names above are spelled on HTTP/1.1.
    pub spellings: Arc<crate::wire::header_case::Spellings>,
}

/// One limit of the request with its verdict.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    /// The limit.
    pub spec: &'a LimitSpec,
    /// What it decided for this request.
    pub verdict: Verdict,
}

/// The rate-limit headers for one request. `refused` marks a 429.
pub fn rate_headers(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    now: Nanos,
    refused: bool,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4 + checked.len() * 3);
    write_rate_headers(settings, checked, now, refused, &mut h);
    h
}

/// [`rate_headers`], inserted into `h` (replacing same-named headers).
pub fn write_rate_headers(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    now: Nanos,
    refused: bool,
    h: &mut HeaderMap,
) {
    let reset_value = |at: Nanos| match settings.reset {
        ResetFormat::Unix => num_value(at.div_ceil(SECOND)),
        ResetFormat::Seconds => num_value(secs_until_ceil(now, at)),
    };
    // A limit's own trio (a balance's `X-Credits-*` too) whatever the primary.
    for Checked { spec, verdict: v } in checked {
        if let Some(trio) = &spec.headers {
            h.insert(trio.limit.clone(), limit_value(spec, v));
            h.insert(trio.remaining.clone(), remaining_value(v));
            h.insert(trio.reset.clone(), reset_value(v.reset_at));
        }
    }
    let Some(primary) = primary_index(settings, checked, refused) else {
        return;
    };
    let Checked { spec, verdict: v } = checked[primary];
    h.insert(settings.main.limit.clone(), limit_value(spec, &v));
    h.insert(settings.main.remaining.clone(), remaining_value(&v));
    h.insert(settings.main.reset.clone(), reset_value(v.reset_at));
    if refused {
        if let Some(Checked { spec, .. }) = refusing(checked) {
            if let Some(v) = &spec.name_value {
                h.insert(settings.kind.clone(), v.clone());
            }
        }
    }
    if settings.ietf {
        let mut policy = String::new();
        // Slots, jobs and balances are not quotas over time: they have no place in RateLimit-Policy.
        for Checked { spec, verdict: v } in checked.iter().filter(|c| c.spec.rule.is_quota()) {
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            sf_string(&spec.name, &mut policy);
            let _ = write!(policy, ";q={};w={}", v.limit, spec.window_secs(now));
        }
        let mut current = String::new();
        sf_string(&spec.name, &mut current);
        let _ = write!(
            current,
            ";r={};t={}",
            v.remaining,
            secs_until_ceil(now, v.reset_at)
        );
        if let Ok(v) = HeaderValue::from_str(&policy) {
            if !policy.is_empty() {
                h.insert(HeaderName::from_static("ratelimit-policy"), v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&current) {
            h.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
}

/// The limit that refused (the one needing the longest wait), if any. A
/// credits balance is not among them: it refuses with its own 402, and
/// waiting does not refill it.
pub fn refusing<'a, 'b>(checked: &'a [Checked<'b>]) -> Option<&'a Checked<'b>> {
    checked
        .iter()
        .filter(|c| {
            !c.verdict.admitted && !c.spec.shadow && !matches!(c.spec.rule, Rule::Credits(_))
        })
        .reduce(|best, c| {
            if c.verdict.retry_at > best.verdict.retry_at {
                c
            } else {
                best
            }
        })
}

fn primary_index(
    settings: &HeaderSettings,
    checked: &[Checked<'_>],
    refused: bool,
) -> Option<usize> {
    if let Some(name) = &settings.primary {
        let pinned = checked
            .iter()
            .position(|c| &*c.spec.name == name.as_str() && c.spec.rule.is_quota());
        if let Some(i) = pinned {
            return Some(i);
        }
    }
    if refused {
        // Refused by a balance alone (402): the quotas as on an admission.
        if let Some(worst) = refusing(checked) {
            return checked.iter().position(|c| std::ptr::eq(c, worst));
        }
    }
    let mut best: Option<usize> = None;
    for (i, Checked { spec, verdict: v }) in checked.iter().enumerate() {
        if !spec.rule.is_quota() {
            continue;
        }
        if best.is_none_or(|b| v.remaining < checked[b].verdict.remaining) {
            best = Some(i);
        }
    }
    best
}

/// Builds the 429 details from the verdicts of a refused request.
pub fn rate_limited(
    checked: &[Checked<'_>],
    now: Nanos,
    route: &Arc<str>,
    plan: &Arc<str>,
) -> Option<RateLimited> {
    let Checked { spec, verdict: v } = *refusing(checked)?;
    let retry_at = checked
        .iter()
        .filter(|c| !c.verdict.admitted && !c.spec.shadow)
        .map(|c| c.verdict.retry_at)
        .max()
        .unwrap_or(v.retry_at);
    Some(RateLimited {
        name: spec.name.clone(),
        limit: v.limit,
        count: v.used,
        retry_after: secs_until_ceil(now, retry_at).max(1),
        reset_at: v.retry_at,
        reset_in_seconds: secs_until_ceil(now, v.retry_at).max(1),
        window: spec.window_text.clone(),
        route: route.clone(),
        plan: plan.clone(),
        counts: match spec.rule {
            crate::limits::Rule::Jobs(_) => Counts::Jobs,
            rule if rule.holds_slot() => Counts::Concurrent,
            _ => Counts::Requests,
        },
    })
}

/// A verdict's limit as a header value: the one made at config load when
/// it is the limit's own figure (no allocation per request).
fn limit_value(spec: &LimitSpec, v: &Verdict) -> HeaderValue {
    if v.limit == spec.rule.shown_limit() {
        spec.limit_value.clone()
    } else {
        num_value(v.limit as u64)
    }
}

/// A verdict's remaining count as a header value (`0`, on every refusal, without allocating).
fn remaining_value(v: &Verdict) -> HeaderValue {
    match v.remaining {
        0 => HeaderValue::from_static("0"),
        n => num_value(n as u64),
    }
}

fn num_value(n: u64) -> HeaderValue {
    // One allocation (the copy of the digits); `HeaderValue::from(u64)`
    // makes two. Digits are always a valid value.
    let mut digits = itoa::Buffer::new();
    HeaderValue::from_str(digits.format(n)).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn push_num(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `s` as a Structured Field string (quoted, `\` and `"` escaped).
fn sf_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Appends `s` JSON-escaped, without surrounding quotes.
pub fn json_escape_into(s: &str, out: &mut String) {
    // Runs of bytes needing no escape are copied whole; every byte escaped
    // is ASCII, so the slices below fall on character boundaries.
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// A [`std::fmt::Write`] that JSON-escapes what is written into a string,
/// so a `Display` value lands in a JSON string without a copy in between.
struct JsonEscaped<'a>(&'a mut String);

impl std::fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        json_escape_into(s, self.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_templatable_name_is_the_code_of_a_refusal() {
        let rate_limited = Refusal::RateLimited(Box::new(RateLimited {
            name: "n".into(),
            limit: 1,
            count: 1,
            retry_after: 1,
            reset_at: 0,
            reset_in_seconds: 1,
            window: "1m".into(),
            route: "r".into(),
            plan: "p".into(),
            counts: Counts::Requests,
        }));
        let refusals = [
            Refusal::Unauthorized(crate::keys::identity::AuthError::Unknown),
            Refusal::PlanRequired {
                route: "r".into(),
                plans: Vec::new(),
            },
            Refusal::PayloadTooLarge {
                limit: 1,
                pattern: None,
                route: "r".into(),
            },
            rate_limited,
            Refusal::InvalidArguments("x".into()),
            Refusal::BadGateway("x".into()),
            Refusal::UpstreamTimeout(Duration::from_secs(1)),
            Refusal::NotFound {
                method: http::Method::GET,
                path: "/".into(),
            },
            Refusal::InsufficientCredits(Box::new(InsufficientCredits {
                name: "credits".into(),
                balance: 3,
                cost: 8,
            })),
        ];
        let codes: Vec<&str> = refusals.iter().map(Refusal::code).collect();
        assert_eq!(
            codes, RESPONSE_NAMES,
            "RESPONSE_NAMES names refusal codes, in order"
        );
        for code in &codes {
            assert!(
                Refusal::CODES.contains(code),
                "{code} missing from Refusal::CODES"
            );
        }
    }

    #[test]
    fn json_escaping_matches_serde_json() {
        for s in [
            "",
            "plain",
            "quote \" and backslash \\",
            "lines\nand\r\ttabs",
            "control \u{1} \u{1f} end",
            "unicode é 日本 🎨 \"mixed\"",
            "\u{7f} is not escaped",
        ] {
            let mut ours = String::new();
            json_escape_into(s, &mut ours);
            let theirs = serde_json::to_string(s).unwrap();
            assert_eq!(format!("\"{ours}\""), theirs, "{s:?}");
        }
    }

    #[test]
    fn templates_keep_json_braces_and_fill_known_names() {
        let t = Template::new(
            None,
            HeaderValue::from_static("application/json"),
            Some(r#"{"message":"{name} hit, retry in {retry_after}s","x":{unknown}}"#),
        );
        let r = Refusal::RateLimited(Box::new(RateLimited {
            name: "da\"ily".into(),
            limit: 3,
            count: 3,
            retry_after: 42,
            reset_at: 0,
            reset_in_seconds: 42,
            window: "1m".into(),
            route: "r".into(),
            plan: "p".into(),
            counts: Counts::Requests,
        }));
        let mut set = ResponseSet::default();
        set.set("rate_limited", Arc::new(t));
        let ctx = Context {
            templates: Some(&set),
            route: "r",
            plan: "p",
            mcp_id: None,
        };
        let resp = refusal(&r, &ctx, HeaderMap::new());
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "42");
        let body = futures_body(resp);
        assert_eq!(
            body,
            r#"{"message":"da\"ily hit, retry in 42s","x":{unknown}}"#
        );
    }

    fn futures_body(resp: Response<Body>) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn default_bodies_match_the_spec() {
        let r = Refusal::Unauthorized(AuthError::Revoked);
        let resp = refusal(&r, &Context::default(), HeaderMap::new());
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            futures_body(resp),
            r#"{"error":"unauthorized","message":"API key revoked"}"#
        );
        let r = Refusal::NotFound {
            method: Method::GET,
            path: "/x".into(),
        };
        assert_eq!(
            futures_body(refusal(&r, &Context::default(), HeaderMap::new())),
            r#"{"error":"not_found","message":"no route for GET /x"}"#
        );
        let r = Refusal::UpstreamTimeout(Duration::from_secs(300));
        assert_eq!(
            futures_body(refusal(&r, &Context::default(), HeaderMap::new())),
            r#"{"error":"upstream_timeout","message":"upstream did not answer within 300 s"}"#
        );
    }

    proptest::proptest! {
        /// The 429 body, written piece by piece, is the JSON of the
        /// message and figures as the SPEC words them, whatever the names hold.
        #[test]
        fn rate_limited_bodies_are_the_json_of_their_figures(
            name in "[ -~\\n\t\u{1}\u{e9}\"\\\\]{1,12}",
            window in "[0-9a-z/]{1,6}",
            limit in 1u32..u32::MAX,
            count in 0u32..u32::MAX,
            retry_after in 1u64..1_000_000,
            reset_in in 1u64..1_000_000,
            reset_at in 0u64..u64::MAX,
            counts in 0usize..3,
        ) {
            let counts = [Counts::Requests, Counts::Concurrent, Counts::Jobs][counts];
            let r = RateLimited {
                name: name.as_str().into(),
                limit,
                count,
                retry_after,
                reset_at,
                reset_in_seconds: reset_in,
                window: window.as_str().into(),
                route: "gen".into(),
                plan: "free".into(),
                counts,
            };
            let message = match counts {
                Counts::Requests => format!("Rate limit exceeded: {limit} requests per {window} ({name}). Retry in {retry_after} s."),
                Counts::Concurrent => format!("Too many concurrent requests: at most {limit} at once ({name}). Retry in {retry_after} s."),
                Counts::Jobs => format!("Too many generations in progress: at most {limit} at once ({name}). Retry in {retry_after} s."),
            };
            proptest::prop_assert_eq!(&r.to_string(), &message);
            let body = Refusal::RateLimited(Box::new(r)).default_body();
            let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
                proptest::test_runner::TestCaseError::fail(format!("{e}: {body}"))
            })?;
            let expected = serde_json::json!({
                "error": "rate_limited",
                "message": message,
                "rate_limit": {
                    "name": name,
                    "count": count,
                    "limit": limit,
                    "remaining": 0,
                    "reset_in_seconds": reset_in,
                    "reset_at": format_rfc3339(reset_at),
                },
            });
            proptest::prop_assert_eq!(json, expected);
        }
    }

    #[test]
    fn structured_field_strings_are_escaped() {
        let mut s = String::new();
        sf_string("a\"b\\c", &mut s);
        assert_eq!(s, r#""a\"b\\c""#);
    }
}
