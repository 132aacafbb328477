//! Value sources (docs/configuration.md, "Jobs"): where a value is read from a request or
//! an upstream answer — `json:POINTER`, `header:NAME`, `query:NAME`,
//! `path:PARAM`. Parsed once at config load; read on the request path
//! without allocating unless the value is a JSON number or boolean.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};
use serde_json::Value;

use crate::routing::PathPattern;

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// An RFC 6901 pointer into the JSON body.
    Json(String),
    /// A header (the first value, when repeated).
    Header(HeaderName),
    /// A query parameter (the first, percent-decoded).
    Query(String),
    /// A `{PARAM}` segment of the route's path pattern.
    Path(String),
}

/// Which side of an exchange a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request: any source.
    Request,
    /// The upstream's answer: `json:` and `header:` only.
    Response,
}

impl ValueSource {
    /// Parses `"json:/a/b"`, `"header:Location"`, `"query:id"`, `"path:id"`;
    /// `pattern` is the route's path (for `path:`). The message says what is wrong.
    pub fn parse(text: &str, side: Side, pattern: &PathPattern) -> Result<Self, String> {
        let (scheme, rest) = text.split_once(':').ok_or_else(|| {
            format!("value source {text:?} must be \"json:/POINTER\", \"header:NAME\", \"query:NAME\" or \"path:PARAM\"")
        })?;
        let source = match scheme {
            "json" => {
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return Err(format!(
                        "{text:?}: a JSON pointer is empty or starts with '/', as \"json:/id\""
                    ));
                }
                ValueSource::Json(rest.to_owned())
            }
            "header" => ValueSource::Header(
                HeaderName::from_bytes(rest.as_bytes())
                    .map_err(|_| format!("{text:?}: {rest:?} is not a header name"))?,
            ),
            "query" if !rest.is_empty() => ValueSource::Query(rest.to_owned()),
            "path" if pattern.has_param(rest) => ValueSource::Path(rest.to_owned()),
            "path" => {
                return Err(format!(
                    "{text:?}: the route's path has no {{{rest}}} segment"
                ))
            }
            _ => {
                return Err(format!(
                    "value source {text:?} must be \"json:/POINTER\", \"header:NAME\", \"query:NAME\" or \"path:PARAM\""
                ))
            }
        };
        if side == Side::Response && matches!(source, ValueSource::Query(_) | ValueSource::Path(_))
        {
            return Err(format!(
                "{text:?}: an upstream answer has no {scheme}; use \"json:/POINTER\" or \"header:NAME\""
            ));
        }
        Ok(source)
    }

    /// Whether reading this source needs the JSON body.
    pub fn needs_json(&self) -> bool {
        matches!(self, ValueSource::Json(_))
    }

    /// The value in a request: its headers, path (in match form), query and
    /// JSON body (when it was read). Absent: `None`.
    pub fn from_request<'a>(
        &self,
        headers: &'a HeaderMap,
        path: &'a str,
        query: Option<&'a str>,
        pattern: &PathPattern,
        json: Option<&'a Value>,
    ) -> Option<Cow<'a, str>> {
        match self {
            ValueSource::Json(pointer) => json_text(json?.pointer(pointer)?),
            ValueSource::Header(name) => header_text(headers, name),
            ValueSource::Query(name) => query_value(query?, name),
            ValueSource::Path(param) => pattern.param(path, param).map(Cow::Borrowed),
        }
    }

    /// The value in an upstream answer: its headers and JSON document.
    pub fn from_response<'a>(
        &self,
        headers: &'a HeaderMap,
        json: Option<&'a Value>,
    ) -> Option<Cow<'a, str>> {
        match self {
            ValueSource::Json(pointer) => json_text(json?.pointer(pointer)?),
            ValueSource::Header(name) => header_text(headers, name),
            ValueSource::Query(_) | ValueSource::Path(_) => None,
        }
    }
}

/// One request's values, for reading any source of it.
#[derive(Debug, Clone, Copy)]
pub struct RequestValues<'a> {
    /// Its headers.
    pub headers: &'a HeaderMap,
    /// Its path in match form.
    pub path: &'a str,
    /// Its query string.
    pub query: Option<&'a str>,
    /// The matched route's path pattern (for `path:` sources).
    pub pattern: &'a PathPattern,
    /// Its JSON body, when it was read.
    pub json: Option<&'a Value>,
}

impl<'a> RequestValues<'a> {
    /// The value at `source` (`None`: absent).
    pub fn get(&self, source: &ValueSource) -> Option<Cow<'a, str>> {
        source.from_request(self.headers, self.path, self.query, self.pattern, self.json)
    }
}

impl std::fmt::Display for ValueSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueSource::Json(p) => write!(f, "json:{p}"),
            ValueSource::Header(h) => write!(f, "header:{h}"),
            ValueSource::Query(q) => write!(f, "query:{q}"),
            ValueSource::Path(p) => write!(f, "path:{p}"),
        }
    }
}

/// A JSON value as text: strings as they are, numbers and booleans as their
/// JSON text; null, arrays and objects are not values.
pub fn json_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, str>> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then_some(Cow::Borrowed(v))
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space).
fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> PathPattern {
        PathPattern::parse("/v1/tools/executions/{id}/cancel").unwrap()
    }

    #[test]
    fn parses_every_source_and_refuses_the_rest() {
        let p = pattern();
        assert_eq!(
            ValueSource::parse("json:/result/id", Side::Response, &p),
            Ok(ValueSource::Json("/result/id".into()))
        );
        assert!(ValueSource::parse("header:Location", Side::Response, &p).is_ok());
        assert!(ValueSource::parse("query:id", Side::Request, &p).is_ok());
        assert!(ValueSource::parse("path:id", Side::Request, &p).is_ok());
        for bad in [
            "path:nope",
            "json:id",
            "xml:/a",
            "id",
            "query:",
            "header:a b",
        ] {
            assert!(ValueSource::parse(bad, Side::Request, &p).is_err(), "{bad}");
        }
        assert!(ValueSource::parse("query:id", Side::Response, &p).is_err());
    }

    #[test]
    fn reads_values_from_a_request() {
        let p = pattern();
        let mut h = HeaderMap::new();
        h.insert("x-model", "flux".parse().unwrap());
        let body: Value = serde_json::json!({"n": 3, "ok": true, "s": "x", "o": {}});
        let read = |src: &str| {
            ValueSource::parse(src, Side::Request, &p)
                .unwrap()
                .from_request(
                    &h,
                    "/v1/tools/executions/ex-9/cancel",
                    Some("id=a%20b&id=second"),
                    &p,
                    Some(&body),
                )
                .map(|v| v.into_owned())
        };
        assert_eq!(read("path:id").as_deref(), Some("ex-9"));
        assert_eq!(read("query:id").as_deref(), Some("a b"));
        assert_eq!(read("header:x-model").as_deref(), Some("flux"));
        assert_eq!(read("json:/n").as_deref(), Some("3"));
        assert_eq!(read("json:/ok").as_deref(), Some("true"));
        assert_eq!(read("json:/s").as_deref(), Some("x"));
        assert_eq!(read("json:/o"), None);
        assert_eq!(read("json:/missing"), None);
        assert_eq!(read("query:other"), None);
    }
}
