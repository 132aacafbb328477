//! Everything turnstile says itself: the refusal bodies (default
//! or operator templates) and the rate-limit headers (docs/headers-and-refusals.md). Nothing
//! else in the crate builds an error response.
//!
//! Files, bottom first: `text` (JSON strings), `templates` (operator
//! bodies), `refusal` (every refusal and its figures), `headers` (the
//! rate-limit headers), `render` (a refusal made into a response).
//!
//! May import: [`crate::keys`] (why a key was refused), [`crate::limits`],
//! [`crate::wire`], [`crate::clock`].

mod headers;
mod refusal;
mod render;
mod templates;
mod text;
pub use headers::{
    primary_index, rate_headers, rate_limited, refusing, write_rate_headers, Checked,
    HeaderSettings, ResetFormat,
};
pub use refusal::{Counts, InsufficientCredits, MediaTooLong, OverCapacity, RateLimited, Refusal};
pub use render::{error_response, refusal};
pub use templates::{Context, ResponseSet, Template, RESPONSE_NAMES};
pub use text::json_escape_into;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::{HeaderMap, HeaderValue, Method, Response};

    use super::headers::sf_string;
    use super::*;
    use crate::keys::identity::AuthError;
    use crate::limits::format_rfc3339;
    use crate::wire::body::Body;

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
            Refusal::OverCapacity(Box::new(OverCapacity {
                name: "gpu".into(),
                max: 40,
                waiting: 12,
                retry_after: 5,
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
            counts in 0usize..4,
        ) {
            let counts = [Counts::Requests, Counts::Concurrent, Counts::Jobs, Counts::Bucket][counts];
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
                Counts::Bucket => format!("Rate limit exceeded: bursts of {limit} requests, refilled at {window} ({name}). Retry in {retry_after} s."),
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
