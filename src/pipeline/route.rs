//! Step 1: the first route (file order) that matches the request, reading
//! the JSON body for tool routes and `json:` conditions once the key has
//! been checked.

use http::request::Parts;
use http::{Method, StatusCode};
use serde_json::Value;

use super::admission::request_host;
use super::{Exchange, Turnstile};
use crate::config::{Format, Policy, Route};
use crate::content::mcp;
use crate::content::values::RequestValues;
use crate::pipeline::inspect::RequestBody;
use crate::respond::Refusal;

impl Turnstile {
    /// The first route (file order) that matches by method, host and path,
    /// by tool name where it has one, and whose `when` conditions hold. A
    /// route whose match reads the JSON body needs it read: before that,
    /// the key is checked (unless a route that could match is public), and
    /// the caller found is kept in `caller`.
    pub(super) async fn select_route<'a>(
        &self,
        cx: &mut Exchange<'a>,
        parts: &Parts,
        body: &mut RequestBody,
    ) -> Result<Option<&'a Route>, Refusal> {
        let policy: &'a Policy = &cx.live.policy;
        let host = request_host(parts);
        let form = crate::wire::path::match_form(parts.uri.path());
        let candidates = || {
            policy
                .routes
                .iter()
                .filter(|r| r.matcher.matches(&parts.method, host, &form))
        };
        for r in candidates() {
            if r.mcp_tool.is_some() && parts.method != Method::POST {
                continue;
            }
            if !r.match_reads_json && r.when.is_empty() {
                return Ok(Some(r));
            }
            // A request without a body has no `json:` values: a condition
            // on one does not hold (a tool call always needs its body).
            let json = if r.match_reads_json && (r.mcp_tool.is_some() || !body.is_empty()) {
                if cx.caller.is_none() && !candidates().any(|r| !r.auth) {
                    let found = self.identify(policy, cx.peer, &parts.headers, parts.uri.query());
                    match found {
                        Ok(c) => cx.caller = Some(c),
                        Err(e) => {
                            // Refused on the route it would have matched.
                            cx.route = Some(r);
                            cx.refused_key =
                                policy.identity.presented(&parts.headers, parts.uri.query());
                            return Err(Refusal::Unauthorized(e));
                        }
                    }
                }
                Some(read_json(self, policy, r, parts, body).await?)
            } else {
                None
            };
            if let Some(tool) = &r.mcp_tool {
                if json.and_then(mcp::tool_call) != Some(tool.as_str()) {
                    continue;
                }
            }
            let values = RequestValues {
                headers: &parts.headers,
                path: &form,
                query: parts.uri.query(),
                pattern: &r.matcher.path,
                json,
            };
            let held = crate::content::conditions::hold(&r.when, |s| values.get(s))
                .map_err(|a| Refusal::BadRequest(a.to_string()))?;
            if held {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

/// The request's JSON body for matching `r`: read strictly (a body that
/// cannot be read as JSON is refused, never passed on to a later route),
/// and a JSON-RPC batch carrying a tool call refused on a tool route.
async fn read_json<'b>(
    proxy: &Turnstile,
    policy: &Policy,
    r: &Route,
    parts: &Parts,
    body: &'b mut RequestBody,
) -> Result<&'b Value, Refusal> {
    let rpc = r.mcp_tool.is_some() || r.format == Format::Mcp;
    let message = match body.json(&parts.headers, proxy.read_limits(policy)).await {
        Ok(message) => message,
        Err(problem) => return Err(problem.refusal(rpc, &r.name)),
    };
    if r.mcp_tool.is_some() && !mcp::plain_id(&mcp::request_id(message)) {
        return Err(Refusal::JsonRpc {
            status: StatusCode::BAD_REQUEST,
            code: mcp::INVALID_REQUEST,
            message: "the request id must be a string, an integer or null".into(),
        });
    }
    if r.mcp_tool.is_some() && mcp::batch_calls_a_tool(message) {
        return Err(Refusal::JsonRpc {
            status: StatusCode::BAD_REQUEST,
            code: mcp::INVALID_REQUEST,
            message: "a JSON-RPC batch may not contain tools/call: send one call per request"
                .into(),
        });
    }
    Ok(message)
}
