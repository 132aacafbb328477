//! What a request costs (docs/configuration.md, "Cost, credits and
//! refunds"): a route's `cost` (a constant or a price table by a request
//! value), what its answer says it cost (`settle`), and which outcomes give
//! back everything the exchange consumed (`refund_on`). The counting is
//! done by the limits (`count = "cost"`, `kind = "credits"`) in the stores.

use std::borrow::Cow;
use std::collections::HashMap;

use http::StatusCode;

use crate::content::values::ValueSource;

/// A route's `cost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// Every request costs this much.
    Constant(u32),
    /// `prices[value at by]` (else `default`), times the value at `times`.
    Priced {
        /// Where the priced value is read.
        by: ValueSource,
        /// Price per value.
        prices: HashMap<String, u32>,
        /// The price of a value not listed (or absent); `None`: such a request is refused.
        default: Option<u32>,
        /// Where a multiplier is read (a positive integer), if any.
        times: Option<ValueSource>,
    },
}

impl Cost {
    /// Whether pricing reads the JSON body.
    pub fn needs_json(&self) -> bool {
        match self {
            Cost::Constant(_) => false,
            Cost::Priced { by, times, .. } => {
                by.needs_json() || times.as_ref().is_some_and(ValueSource::needs_json)
            }
        }
    }

    /// The cost of a request whose values `value` reads (`None`: absent);
    /// [`Unpriced::Value`] names the value that could not be priced (a 400
    /// `invalid_arguments`), [`Unpriced::Unreadable`] carries the reader's
    /// error for a value it could not read.
    pub fn of<'v, E>(
        &self,
        value: impl Fn(&ValueSource) -> Result<Option<Cow<'v, str>>, E>,
    ) -> Result<u32, Unpriced<E>> {
        let (by, prices, default, times) = match self {
            Cost::Constant(n) => return Ok(*n),
            Cost::Priced {
                by,
                prices,
                default,
                times,
            } => (by, prices, default, times),
        };
        let priced = value(by).map_err(Unpriced::Unreadable)?;
        let price = match (priced.as_deref().and_then(|v| prices.get(v)), default) {
            (Some(p), _) => *p,
            (None, Some(d)) => *d,
            (None, None) => {
                return Err(Unpriced::Value(match priced {
                    Some(v) => format!("{by}: no price for {v:?} (priced: {})", listed(prices)),
                    None => format!("{by} is required to price this request"),
                }))
            }
        };
        let Some(times) = times else {
            return Ok(price);
        };
        let count = match value(times).map_err(Unpriced::Unreadable)? {
            None => 1,
            Some(t) => match t.trim().parse::<u32>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(Unpriced::Value(format!(
                        "{times} must be a positive integer, not {t:?}"
                    )))
                }
            },
        };
        Ok(price.saturating_mul(count))
    }
}

/// Why a request could not be priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unpriced<E> {
    /// A value read has no price, or is not a positive count (the message).
    Value(String),
    /// A value could not be read.
    Unreadable(E),
}

/// The priced values, sorted, for a refusal's message.
fn listed(prices: &HashMap<String, u32>) -> String {
    let mut names: Vec<&str> = prices.keys().map(String::as_str).collect();
    names.sort_unstable();
    names.join(", ")
}

/// A figure the upstream's answer gives for what the request cost: a
/// non-negative integer (a JSON number or a string of digits).
pub fn settled_figure(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

/// A route's `refund_on`: the outcomes that give back everything the
/// exchange consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefundOn {
    /// `"5xx"`: the upstream answered 500–599.
    pub server_error: bool,
    /// `"connect"`: turnstile answered 502 (the upstream could not be reached).
    pub connect: bool,
    /// `"timeout"`: turnstile answered 504 (the upstream did not answer in time).
    pub timeout: bool,
    /// Upstream statuses listed one by one (400–599).
    pub statuses: Vec<StatusCode>,
}

/// Why an exchange was refunded, for `turnstile_refunds_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundReason {
    /// The upstream answered 5xx (`"5xx"`).
    ServerError,
    /// The upstream answered a listed status.
    Status(StatusCode),
    /// 502 from turnstile.
    Connect,
    /// 504 from turnstile.
    Timeout,
}

impl RefundReason {
    /// The metric label: `5xx`, `connect`, `timeout` or the status, e.g. `429`.
    pub fn label(self) -> std::borrow::Cow<'static, str> {
        match self {
            RefundReason::ServerError => "5xx".into(),
            RefundReason::Connect => "connect".into(),
            RefundReason::Timeout => "timeout".into(),
            RefundReason::Status(s) => s.as_str().to_owned().into(),
        }
    }
}

impl RefundOn {
    /// Whether nothing is refunded.
    pub fn is_empty(&self) -> bool {
        !self.server_error && !self.connect && !self.timeout && self.statuses.is_empty()
    }

    /// Whether the upstream's answer with `status` is refunded, and why.
    pub fn answer(&self, status: StatusCode) -> Option<RefundReason> {
        if self.statuses.contains(&status) {
            return Some(RefundReason::Status(status));
        }
        (self.server_error && status.is_server_error()).then_some(RefundReason::ServerError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Map(Vec<(ValueSource, &'static str)>);

    impl Map {
        fn get(&self) -> impl Fn(&ValueSource) -> Result<Option<Cow<'static, str>>, ()> + '_ {
            |source| {
                Ok(self
                    .0
                    .iter()
                    .find(|(s, _)| s == source)
                    .map(|(_, v)| Cow::Borrowed(*v)))
            }
        }
    }

    fn priced(default: Option<u32>) -> Cost {
        Cost::Priced {
            by: ValueSource::Json("/model".into()),
            prices: [("flux-pro".to_owned(), 8), ("veo-3".to_owned(), 40)]
                .into_iter()
                .collect(),
            default,
            times: Some(ValueSource::Json("/count".into())),
        }
    }

    #[test]
    fn a_price_by_value_times_a_count() {
        let model = ValueSource::Json("/model".into());
        let count = ValueSource::Json("/count".into());
        let cost = priced(Some(2));
        let v = Map(vec![(model.clone(), "veo-3"), (count.clone(), "3")]);
        assert_eq!(cost.of(v.get()), Ok(120));
        assert_eq!(cost.of(Map(vec![(model.clone(), "flux-pro")]).get()), Ok(8));
        assert_eq!(cost.of(Map(vec![(model.clone(), "sdxl")]).get()), Ok(2));
        assert_eq!(cost.of(Map(vec![]).get()), Ok(2));
        let message = |r: Result<u32, Unpriced<()>>| match r {
            Err(Unpriced::Value(m)) => m,
            other => panic!("{other:?}"),
        };
        let e = message(priced(None).of(Map(vec![(model.clone(), "sdxl")]).get()));
        assert!(e.contains("\"sdxl\"") && e.contains("json:/model"), "{e}");
        let e = message(priced(None).of(Map(vec![]).get()));
        assert!(e.contains("json:/model is required"), "{e}");
        for bad in ["0", "-1", "1.5", "two"] {
            let v = Map(vec![(model.clone(), "veo-3"), (count.clone(), bad)]);
            let e = message(cost.of(v.get()));
            assert!(e.contains("positive integer"), "{bad}: {e}");
        }
        let unreadable = cost.of(|_| Err::<Option<Cow<'_, str>>, _>(()));
        assert_eq!(
            unreadable,
            Err(Unpriced::Unreadable(())),
            "never the default"
        );
        assert_eq!(Cost::Constant(5).of(Map(vec![]).get()), Ok(5));
        let huge = Map(vec![(model, "veo-3"), (count, "4294967295")]);
        assert_eq!(cost.of(huge.get()), Ok(u32::MAX));
    }

    #[test]
    fn refund_reasons() {
        let on = RefundOn {
            server_error: true,
            statuses: vec![StatusCode::TOO_MANY_REQUESTS],
            ..RefundOn::default()
        };
        assert_eq!(
            on.answer(StatusCode::BAD_GATEWAY),
            Some(RefundReason::ServerError)
        );
        assert_eq!(on.answer(StatusCode::OK), None);
        assert_eq!(on.answer(StatusCode::BAD_REQUEST), None);
        let r = on.answer(StatusCode::TOO_MANY_REQUESTS).unwrap();
        assert_eq!(r.label(), "429");
        assert_eq!(RefundReason::Connect.label(), "connect");
    }
}
