//! Refusal bodies an operator writes (`[responses.*]`): templates with
//! `{{variables}}`, checked when the config loads.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};

/// The refusal names operators can template (`[responses.NAME]`).
pub const RESPONSE_NAMES: [&str; 10] = [
    "unauthorized",
    "plan_required",
    "payload_too_large",
    "rate_limited",
    "invalid_arguments",
    "bad_gateway",
    "upstream_timeout",
    "not_found",
    "insufficient_credits",
    "over_capacity",
];

/// A placeholder in a response template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Var {
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

pub(super) const VARS: [(&str, Var); 12] = [
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
pub(super) enum Piece {
    Text(String),
    Var(Var),
}

/// An operator's replacement for one refusal, parsed at config load.
#[derive(Debug, Clone)]
pub struct Template {
    pub(super) status: Option<StatusCode>,
    pub(super) content_type: HeaderValue,
    pub(super) body: Option<Vec<Piece>>,
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

pub(super) fn parse_pieces(body: &str) -> Vec<Piece> {
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

    pub(super) fn get(&self, code: &str) -> Option<&Template> {
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
