//! Every refusal turnstile can give: its status, its `error` code and the
//! figures its body and headers show.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use super::templates::{Context, Piece, Var};
use super::text::{json_escape_into, push_num, JsonEscaped};
use crate::clock::Nanos;
use crate::keys::identity::AuthError;
use crate::limits::{format_rfc3339, write_rfc3339};

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
    /// 503: no slot of a capacity pool within its `max_wait`, or its queue full.
    #[error("All {} generation slots are busy ({}). Retry in {} s.", .0.max, .0.name, .0.retry_after)]
    OverCapacity(Box<OverCapacity>),
}

/// The capacity pool that refused a 503 `over_capacity`.
#[derive(Debug, Clone)]
pub struct OverCapacity {
    /// The pool's name.
    pub name: Arc<str>,
    /// Its `max`.
    pub max: u32,
    /// Requests waiting when refused.
    pub waiting: u64,
    /// Seconds for `Retry-After`.
    pub retry_after: u64,
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
    /// Requests from a token bucket: a burst, refilled at a rate.
    Bucket,
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
            Counts::Bucket => ("Rate limit exceeded: bursts of ", " requests, refilled at "),
        };
        out.push_str(lead);
        push_num(out, u64::from(self.limit));
        out.push_str(after_limit);
        if matches!(self.counts, Counts::Requests | Counts::Bucket) {
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

impl Refusal {
    /// The text of an MCP tool error for this refusal.
    pub(super) fn mcp_text(&self) -> String {
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
            Refusal::OverCapacity(c) => format!(
                "All {} generation slots are busy ({}). Try again in {} s.",
                c.max, c.name, c.retry_after
            ),
            Refusal::PlanRequired { route, plans } => {
                format!("{route} requires plan {}.", plan_list(plans))
            }
            other => other.to_string(),
        }
    }

    pub(super) fn renders_as_tool_error(&self) -> bool {
        matches!(
            self,
            Refusal::RateLimited(_)
                | Refusal::InsufficientCredits(_)
                | Refusal::PlanRequired { .. }
                | Refusal::PayloadTooLarge { .. }
                | Refusal::InvalidArguments(_)
                | Refusal::OverCapacity(_)
        )
    }

    pub(super) fn render_template(&self, pieces: &[Piece], ctx: &Context<'_>) -> String {
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
            Refusal::Overloaded(_) | Refusal::OverCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            Refusal::OverCapacity(_) => "over_capacity",
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
        "over_capacity",
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
    pub(super) fn default_body(&self) -> String {
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
            Refusal::OverCapacity(c) => {
                out.push_str(",\"capacity\":{\"name\":\"");
                json_escape_into(&c.name, &mut out);
                let _ = write!(out, "\",\"max\":{},\"waiting\":{}}}", c.max, c.waiting);
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

    pub(super) fn var(&self, var: Var, route: &str, plan: &str, out: &mut String) {
        let r = match self {
            Refusal::RateLimited(r) => Some(r),
            _ => None,
        };
        let credits = match self {
            Refusal::InsufficientCredits(c) => Some(c),
            _ => None,
        };
        if let Refusal::OverCapacity(c) = self {
            return match var {
                Var::Route => json_escape_into(route, out),
                Var::Plan => json_escape_into(plan, out),
                Var::Name => json_escape_into(&c.name, out),
                Var::Limit => push_num(out, u64::from(c.max)),
                Var::RetryAfter => push_num(out, c.retry_after),
                _ => {}
            };
        }
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

pub(super) fn plan_list(plans: &[Arc<str>]) -> String {
    plans.iter().map(|p| &**p).collect::<Vec<_>>().join(" or ")
}
