//! Step 1: the first route (file order) that matches the request, reading
//! the JSON-RPC body for tool routes once the key has been checked.

use http::request::Parts;
use http::{Method, StatusCode};

use super::admission::request_host;
use super::{Exchange, Turnstile};
use crate::config::{Policy, Route};
use crate::inspect::RequestBody;
use crate::mcp;
use crate::responses::Refusal;

impl Turnstile {
    /// The first route (file order) that matches by method, host and path,
    /// and by tool name where it has one. A tool route needs the JSON-RPC
    /// body: before it is read, the key is checked (unless a route that
    /// could match is public), and the caller found is kept in `caller`.
    pub(super) async fn select_route<'a>(
        &self,
        cx: &mut Exchange<'a>,
        parts: &Parts,
        body: &mut RequestBody,
    ) -> Result<Option<&'a Route>, Refusal> {
        let policy: &'a Policy = &cx.live.policy;
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
                return Ok(Some(r));
            };
            if parts.method != Method::POST {
                continue;
            }
            if cx.caller.is_none() && !candidates().any(|r| !r.auth) {
                let found = policy.identity.identify(&parts.headers, parts.uri.query());
                match found {
                    Ok(c) => cx.caller = Some(c),
                    Err(e) => {
                        // Refused on the tool route it would have matched.
                        cx.route = Some(r);
                        return Err(Refusal::Unauthorized(e));
                    }
                }
            }
            let message = match body.json(&parts.headers, self.read_limits(policy)).await {
                Ok(message) => message,
                Err(problem) => return Err(problem.refusal(true, &r.name)),
            };
            if mcp::batch_calls_a_tool(message) {
                let refusal = Refusal::JsonRpc {
                    status: StatusCode::BAD_REQUEST,
                    code: mcp::INVALID_REQUEST,
                    message:
                        "a JSON-RPC batch may not contain tools/call: send one call per request"
                            .into(),
                };
                return Err(refusal);
            }
            if mcp::tool_call(message) == Some(tool.as_str()) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}
