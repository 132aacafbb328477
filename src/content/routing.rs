//! Route matching: method, path pattern and host, first match in file order.
//! Patterns are parsed once at config load and compared with a path in
//! [`crate::wire::path::match_form`]; literal segments ignore ASCII case unless the
//! pattern was parsed case-sensitive, and a `GET` route also matches `HEAD`.

use http::Method;

/// One piece of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Must equal the request's segment.
    Literal(String),
    /// `{name}`: any one non-empty segment.
    Param(String),
}

/// A compiled path pattern: exact `/v1/files`, parameters `/v1/files/{id}`,
/// or prefix `/v1/tools/*` (anything deeper, not `/v1/tools` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Segment>,
    prefix: bool,
    case_sensitive: bool,
}

impl PathPattern {
    /// Parses a pattern whose literal segments ignore ASCII case; the message
    /// says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with_case(text, false)
    }

    /// Parses a pattern; `case_sensitive`: literal segments must match exactly.
    pub fn parse_with_case(text: &str, case_sensitive: bool) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path {text:?} must start with '/'"));
        };
        let (rest, prefix) = match rest.strip_suffix("/*") {
            Some(head) => (head, true),
            None if rest == "*" => ("", true),
            None => (rest, false),
        };
        let mut segments = Vec::new();
        if !rest.is_empty() || !prefix {
            for seg in rest.split('/') {
                if seg.contains('*') {
                    return Err(format!(
                        "path {text:?}: '*' is only allowed as the last segment, as \"/prefix/*\""
                    ));
                }
                if seg.starts_with('{') && seg.ends_with('}') && seg.len() > 2 {
                    segments.push(Segment::Param(seg[1..seg.len() - 1].to_owned()));
                } else if seg.contains(['{', '}']) {
                    return Err(format!(
                        "path {text:?}: a parameter must be a whole segment, as \"{{id}}\""
                    ));
                } else {
                    segments.push(Segment::Literal(seg.to_owned()));
                }
            }
        }
        Ok(Self {
            segments,
            prefix,
            case_sensitive,
        })
    }

    /// Whether `path` (in match form, no query string) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        for (i, seg) in self.segments.iter().enumerate() {
            let (head, tail) = match rest.split_once('/') {
                Some((head, tail)) => (head, Some(tail)),
                None => (rest, None),
            };
            let ok = match seg {
                Segment::Literal(lit) if self.case_sensitive => head == lit,
                Segment::Literal(lit) => head.eq_ignore_ascii_case(lit),
                Segment::Param(_) => !head.is_empty(),
            };
            if !ok {
                return false;
            }
            match tail {
                Some(tail) => rest = tail,
                None => return !self.prefix && i + 1 == self.segments.len(),
            }
        }
        // Every segment matched and the path goes deeper: `rest` is what follows.
        self.prefix && !rest.is_empty()
    }
}

impl PathPattern {
    /// Whether the pattern has a `{name}` segment.
    pub fn has_param(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Param(p) if p == name))
    }

    /// The segment of `path` (in match form, already matched by this
    /// pattern) at the pattern's `{name}`.
    pub fn param<'a>(&self, path: &'a str, name: &str) -> Option<&'a str> {
        let at = self
            .segments
            .iter()
            .position(|s| matches!(s, Segment::Param(p) if p == name))?;
        path.strip_prefix('/')?.split('/').nth(at)
    }
}

/// What a route matches on, besides its name.
#[derive(Debug, Clone)]
pub struct RouteMatcher {
    /// `None`: any method.
    pub method: Option<Method>,
    /// The path pattern.
    pub path: PathPattern,
    /// Lower-case host without port; `None`: any host.
    pub host: Option<String>,
}

impl RouteMatcher {
    /// Whether the request matches. `host` is the request's Host (any port is ignored).
    pub fn matches(&self, method: &Method, host: Option<&str>, path: &str) -> bool {
        if let Some(m) = &self.method {
            if m != method && !(*m == Method::GET && *method == Method::HEAD) {
                return false;
            }
        }
        if let Some(want) = &self.host {
            let Some(host) = host else { return false };
            if !strip_port(host).eq_ignore_ascii_case(want) {
                return false;
            }
        }
        self.path.matches(path)
    }
}

/// The host part of a `Host` value: `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_paths() {
        assert!(p("/v1/files").matches("/v1/files"));
        assert!(!p("/v1/files").matches("/v1/files/"));
        assert!(!p("/v1/files").matches("/v1/files/x"));
        assert!(!p("/v1/files").matches("/v1/file"));
        assert!(p("/v1/files").matches("/V1/Files"));
        let exact = PathPattern::parse_with_case("/v1/files", true).unwrap();
        assert!(!exact.matches("/V1/Files"));
        assert!(exact.matches("/v1/files"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/x"));
    }

    #[test]
    fn prefix_paths_need_something_deeper() {
        let pat = p("/v1/tools/*");
        assert!(pat.matches("/v1/tools/x"));
        assert!(pat.matches("/v1/tools/executions/12/cancel"));
        assert!(!pat.matches("/v1/tools"));
        assert!(!pat.matches("/v1/tools/"));
        assert!(!pat.matches("/v1/toolsx/y"));
        assert!(p("/*").matches("/anything"));
        assert!(!p("/*").matches("/"));
    }

    #[test]
    fn params_match_one_non_empty_segment() {
        let pat = p("/v1/tools/executions/{id}");
        assert!(pat.matches("/v1/tools/executions/abc"));
        assert!(!pat.matches("/v1/tools/executions/"));
        assert!(!pat.matches("/v1/tools/executions/abc/cancel"));
        assert!(p("/v1/files/{id}/hydrate").matches("/v1/files/9/hydrate"));
        assert!(!p("/v1/files/{id}/hydrate").matches("/v1/files//hydrate"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(PathPattern::parse("v1/x").is_err());
        assert!(PathPattern::parse("/v1/*/x").is_err());
        assert!(PathPattern::parse("/v1/x{id}").is_err());
    }

    #[test]
    fn method_and_host_with_port_ignored() {
        let m = RouteMatcher {
            method: Some(Method::POST),
            path: p("/v1/x"),
            host: Some("api.example.com".into()),
        };
        assert!(m.matches(&Method::POST, Some("API.example.com:8443"), "/v1/x"));
        assert!(!m.matches(&Method::GET, Some("api.example.com"), "/v1/x"));
        let get = RouteMatcher {
            method: Some(Method::GET),
            ..m.clone()
        };
        assert!(get.matches(&Method::HEAD, Some("api.example.com"), "/v1/x"));
        let lower = Method::from_bytes(b"get").unwrap();
        assert!(!get.matches(&lower, Some("api.example.com"), "/v1/x"));
        assert!(!m.matches(&Method::POST, Some("other.com"), "/v1/x"));
        assert!(!m.matches(&Method::POST, None, "/v1/x"));
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("localhost"), "localhost");
    }
}
