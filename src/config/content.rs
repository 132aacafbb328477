//! The route keys that read request or answer content: `cost`, `settle`,
//! `refund_on` (docs/configuration.md, "Cost, credits and refunds"),
//! `when` ("Conditions"), `max_duration_by_type` ("Media duration") and
//! `url_args` ("URL arguments").

use std::collections::HashMap;

use http::StatusCode;
use toml::{Spanned, Value};

use super::raw::RawRoute;
use super::{parse_duration, type_pattern, ConfigError, Source};
use crate::content::conditions::Condition;
use crate::content::cost::{Cost, RefundOn};
use crate::content::routing::PathPattern;
use crate::content::values::{Side, ValueSource};

/// A value source of the request or the answer, located on error.
fn source(
    src: &Source,
    s: &Spanned<String>,
    side: Side,
    pattern: &PathPattern,
) -> Result<ValueSource, ConfigError> {
    ValueSource::parse(s.get_ref(), side, pattern).map_err(|m| src.at(s.span(), m))
}

/// A non-negative whole number of credits or units.
fn units(
    src: &Source,
    v: &Value,
    span: std::ops::Range<usize>,
    what: &str,
) -> Result<u32, ConfigError> {
    v.as_integer()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            src.at(
                span,
                format!("{what} must be a whole number from 0 to {}", u32::MAX),
            )
        })
}

/// `cost = 5` or `cost = { by, prices, default, times }`.
pub(super) fn cost(
    src: &Source,
    r: &RawRoute,
    pattern: &PathPattern,
) -> Result<Option<Cost>, ConfigError> {
    let Some(raw) = &r.cost else { return Ok(None) };
    let span = raw.span();
    let table = match raw.get_ref() {
        Value::Table(t) => t,
        v @ Value::Integer(_) => return Ok(Some(Cost::Constant(units(src, v, span, "cost")?))),
        _ => {
            return Err(src.at(
                span,
                "cost is a whole number, or { by = \"json:/model\", prices = { ... }, default = N, times = \"json:/n\" }",
            ))
        }
    };
    for key in table.keys() {
        if !["by", "prices", "default", "times"].contains(&key.as_str()) {
            return Err(src.at(
                span.clone(),
                format!("unknown cost key `{key}`: expected by, prices, default, times"),
            ));
        }
    }
    let text = |key: &str| -> Result<Option<Spanned<String>>, ConfigError> {
        match table.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(Spanned::new(span.clone(), s.clone()))),
            Some(_) => Err(src.at(
                span.clone(),
                format!("cost `{key}` is a value source string, as \"json:/model\""),
            )),
        }
    };
    let Some(by) = text("by")? else {
        return Err(src.at(
            span,
            "a priced cost needs `by`: where the priced value is read",
        ));
    };
    let by = source(src, &by, Side::Request, pattern)?;
    let times = match text("times")? {
        Some(t) => Some(source(src, &t, Side::Request, pattern)?),
        None => None,
    };
    let mut prices = HashMap::new();
    match table.get("prices") {
        Some(Value::Table(p)) => {
            for (name, price) in p {
                let what = format!("the price of {name:?}");
                prices.insert(name.clone(), units(src, price, span.clone(), &what)?);
            }
        }
        None => {}
        Some(_) => return Err(src.at(span, "cost `prices` is a table, as { \"flux-pro\" = 8 }")),
    }
    let default = match table.get("default") {
        Some(v) => Some(units(src, v, span.clone(), "cost `default`")?),
        None => None,
    };
    if prices.is_empty() && default.is_none() {
        return Err(src.at(span, "a priced cost needs `prices`, `default` or both"));
    }
    Ok(Some(Cost::Priced {
        by,
        prices,
        default,
        times,
    }))
}

/// `settle = "json:/usage/credits"` or `"header:X-Credits-Used"`.
pub(super) fn settle(
    src: &Source,
    r: &RawRoute,
    pattern: &PathPattern,
) -> Result<Option<ValueSource>, ConfigError> {
    r.settle
        .as_ref()
        .map(|s| source(src, s, Side::Response, pattern))
        .transpose()
}

/// `refund_on = ["5xx", "connect", "timeout", "429"]`.
pub(super) fn refund_on(src: &Source, r: &RawRoute) -> Result<RefundOn, ConfigError> {
    let mut on = RefundOn::default();
    let Some(list) = &r.refund_on else {
        return Ok(on);
    };
    for item in list.get_ref() {
        match item.get_ref().as_str() {
            "5xx" => on.server_error = true,
            "connect" => on.connect = true,
            "timeout" => on.timeout = true,
            other => {
                let status = other
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (400..=599).contains(n))
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .ok_or_else(|| {
                        src.at(
                            item.span(),
                            format!("refund_on {other:?}: expected \"5xx\", \"connect\", \"timeout\" or a status from 400 to 599"),
                        )
                    })?;
                on.statuses.push(status);
            }
        }
    }
    Ok(on)
}

/// `when = { "json:/a" = ["x", "y"], "header:x-model" = "flux" }`.
pub(super) fn when(
    src: &Source,
    r: &RawRoute,
    pattern: &PathPattern,
) -> Result<Vec<Condition>, ConfigError> {
    let Some(raw) = &r.when else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (key, values) in raw.get_ref() {
        let at = values.span();
        let source = ValueSource::parse(key, Side::Request, pattern)
            .map_err(|m| src.at(raw.span(), format!("when: {m}")))?;
        let scalar = |v: &Value| -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Integer(n) => Some(n.to_string()),
                Value::Float(f) => Some(serde_json::Number::from_f64(*f)?.to_string()),
                Value::Boolean(b) => Some(b.to_string()),
                _ => None,
            }
        };
        let list: Option<Vec<String>> = match values.get_ref() {
            Value::Array(items) => items.iter().map(scalar).collect(),
            v => scalar(v).map(|s| vec![s]),
        };
        let values = list.filter(|l| !l.is_empty()).ok_or_else(|| {
            src.at(
                at.clone(),
                format!("when {key:?}: a value or a non-empty list of values (strings, numbers, booleans)"),
            )
        })?;
        out.push(Condition { source, values });
    }
    Ok(out)
}

/// `max_duration_by_type = { "audio/*" = "600m" }`: whole seconds, at least 1.
pub(super) fn media_limits(
    src: &Source,
    r: &RawRoute,
) -> Result<crate::content::media::MediaLimits, ConfigError> {
    let mut by_type = Vec::new();
    for (pattern, limit) in r.max_duration_by_type.iter().flatten() {
        let p = type_pattern(src, pattern, limit.span())?;
        let d = parse_duration(limit.get_ref()).map_err(|m| src.at(limit.span(), m))?;
        if d.subsec_nanos() != 0 || d.as_secs() == 0 {
            return Err(src.at(
                limit.span(),
                format!("max_duration_by_type {pattern:?}: a whole number of seconds, at least 1s"),
            ));
        }
        by_type.push((p, d.as_secs()));
    }
    Ok(crate::content::media::MediaLimits { by_type })
}

/// `url_args = [{ pointers = ["/params/arguments/sourceUrls"] }]`.
pub(super) fn url_args(
    src: &Source,
    r: &RawRoute,
) -> Result<Vec<crate::content::urls::UrlArg>, ConfigError> {
    let mut out = Vec::new();
    for rule in r.url_args.iter().flatten() {
        let pointers = &rule.get_ref().pointers;
        if pointers.is_empty() || pointers.iter().any(|p| !p.starts_with('/')) {
            return Err(src.at(
                rule.span(),
                "url_args needs JSON pointers starting with '/', e.g. \"/params/arguments/sourceUrls\"",
            ));
        }
        out.push(crate::content::urls::UrlArg {
            pointers: pointers.clone(),
        });
    }
    Ok(out)
}
