//! Value sources (docs/configuration.md, "Jobs"): where a value is read from a request or
//! an upstream answer — `json:POINTER`, `header:NAME`, `query:NAME`,
//! `path:PARAM`. Parsed once at config load; read on the request path
//! without allocating unless the value is a JSON number or boolean.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName};
use serde_json::Value;

use crate::content::json::pointer::Malformed;
use crate::content::routing::PathPattern;
use crate::content::tap::Doc;

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
    /// JSON body (when it was read). Absent: `None`; present but empty: the
    /// empty string. A query parameter or header present more than once
    /// (for a header, also several comma-separated values) could be read two
    /// ways: [`Ambiguous`].
    pub fn from_request<'a>(
        &self,
        headers: &'a HeaderMap,
        path: &'a str,
        query: Option<&'a str>,
        pattern: &PathPattern,
        json: Option<&'a Value>,
    ) -> Result<Option<Cow<'a, str>>, Ambiguous> {
        match self {
            ValueSource::Json(pointer) => {
                Ok(json.and_then(|j| j.pointer(pointer)).and_then(json_text))
            }
            ValueSource::Header(name) => request_header(headers, name),
            ValueSource::Query(name) => match query {
                Some(q) => query_value(q, name),
                None => Ok(None),
            },
            ValueSource::Path(param) => Ok(pattern.param(path, param).map(Cow::Borrowed)),
        }
    }

    /// The value in an upstream answer: its headers and document.
    /// `Ok(None)`: readable, and nothing there (or `null`); an answer that
    /// cannot be read there, a header sent twice, or an object or array
    /// where a value is expected: [`Malformed`].
    pub fn from_response(
        &self,
        headers: &HeaderMap,
        doc: &Doc,
    ) -> Result<Option<String>, Malformed> {
        match self {
            ValueSource::Json(pointer) => match doc.value(pointer)? {
                None | Some(Value::Null) => Ok(None),
                Some(v) => json_text(&v)
                    .map(|t| Some(t.into_owned()))
                    .ok_or(Malformed("an object or array where a value is expected")),
            },
            ValueSource::Header(name) => {
                if headers.get_all(name).iter().nth(1).is_some() {
                    return Err(Malformed("the header appears more than once"));
                }
                Ok(header_text(headers, name).map(Cow::into_owned))
            }
            ValueSource::Query(_) | ValueSource::Path(_) => Ok(None),
        }
    }

    /// The JSON pointer this source reads, if it reads one.
    pub fn pointer(&self) -> Option<&str> {
        match self {
            ValueSource::Json(p) => Some(p),
            _ => None,
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
    pub fn get(&self, source: &ValueSource) -> Result<Option<Cow<'a, str>>, Ambiguous> {
        source.from_request(self.headers, self.path, self.query, self.pattern, self.json)
    }
}

/// A request value that could be read two ways (refused with 400: what
/// turnstile reads must be what the upstream reads).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ambiguous value: {0}")]
pub struct Ambiguous(pub String);

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
/// JSON text (an integer-valued number as the integer: `3.0` and `-0` read
/// `3` and `0`, as peers that compare numbers by value read them); null,
/// arrays and objects are not values.
pub fn json_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(number_text(n))),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// A number's text, integer-valued ones as integers.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, str>> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then_some(Cow::Borrowed(v))
}

/// A request header's one value (trimmed; empty is the empty string).
fn request_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<Cow<'a, str>>, Ambiguous> {
    let mut all = headers.get_all(name).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    let count = 1 + all.count();
    if count > 1 {
        return Err(Ambiguous(format!(
            "header \"{name}\" appears {count} times"
        )));
    }
    // A value that is not visible ASCII is not one turnstile can compare;
    // the upstream may decode it otherwise.
    let text = first
        .to_str()
        .map_err(|_| Ambiguous(format!("header \"{name}\" is not plain text")))?
        .trim();
    if text.contains(',') {
        return Err(Ambiguous(format!(
            "header \"{name}\" has several comma-separated values"
        )));
    }
    Ok(Some(Cow::Borrowed(text)))
}

/// The one value of `name` in a query string, percent-decoded (`+` is a
/// space; empty is the empty string).
fn query_value<'a>(query: &'a str, name: &str) -> Result<Option<Cow<'a, str>>, Ambiguous> {
    let mut found = None;
    let mut count = 0;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == name {
            count += 1;
            found.get_or_insert(v);
        }
    }
    if count > 1 {
        return Err(Ambiguous(format!(
            "query parameter \"{name}\" appears {count} times"
        )));
    }
    Ok(found)
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
                    Some("id=a%20b&twice=1&tw%69ce=2&empty="),
                    &p,
                    Some(&body),
                )
                .unwrap()
                .map(|v| v.into_owned())
        };
        assert_eq!(read("path:id").as_deref(), Some("ex-9"));
        assert_eq!(read("query:id").as_deref(), Some("a b"));
        assert_eq!(read("query:empty").as_deref(), Some(""));
        assert_eq!(read("header:x-model").as_deref(), Some("flux"));
        assert_eq!(read("json:/n").as_deref(), Some("3"));
        assert_eq!(read("json:/ok").as_deref(), Some("true"));
        assert_eq!(read("json:/s").as_deref(), Some("x"));
        assert_eq!(read("json:/o"), None);
        assert_eq!(read("json:/missing"), None);
        assert_eq!(read("query:other"), None);
    }

    #[test]
    fn repeated_values_are_ambiguous() {
        let p = pattern();
        let get = |h: &HeaderMap, q: &str, src: &str| {
            ValueSource::parse(src, Side::Request, &p)
                .unwrap()
                .from_request(h, "/", Some(q), &p, None)
                .map(|v| v.map(Cow::into_owned))
        };
        let e = get(&HeaderMap::new(), "model=flux&mod%65l=veo-3", "query:model").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ambiguous value: query parameter \"model\" appears 2 times"
        );
        let mut h = HeaderMap::new();
        h.append("x-model", "flux".parse().unwrap());
        h.append("x-model", "veo-3".parse().unwrap());
        let e = get(&h, "", "header:x-model").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ambiguous value: header \"x-model\" appears 2 times"
        );
        let mut h = HeaderMap::new();
        h.insert("x-model", "flux, veo-3".parse().unwrap());
        assert!(get(&h, "", "header:x-model").is_err());
        let mut h = HeaderMap::new();
        h.insert("x-model", "".parse().unwrap());
        assert_eq!(get(&h, "", "header:x-model"), Ok(Some(String::new())));
    }

    #[test]
    fn numbers_read_by_value() {
        for (text, want) in [
            ("3", "3"),
            ("3.0", "3"),
            ("-0", "0"),
            ("1.5", "1.5"),
            ("1e3", "1000"),
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(json_text(&v).as_deref(), Some(want), "{text}");
        }
    }
}
