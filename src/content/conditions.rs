//! Route conditions on request content (docs/configuration.md,
//! "Conditions"): `when = { "json:/params/arguments/contentType" =
//! ["blog_post"], "header:x-model" = ["flux-pro"] }`. A route whose
//! conditions do not all hold does not match, and matching goes on in file
//! order.

use std::borrow::Cow;

use crate::content::values::ValueSource;

/// One condition: the value at `source` is one of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Where the value is read.
    pub source: ValueSource,
    /// The values that satisfy it (JSON numbers and booleans as their JSON text).
    pub values: Vec<String>,
}

/// Whether every condition holds for a request whose values `value` reads;
/// an absent value never matches. A value that cannot be read (`E`, an
/// ambiguous one) is an error, never a condition that does not hold: the
/// request is refused rather than matched to a later route.
pub fn hold<'v, E>(
    conditions: &[Condition],
    value: impl Fn(&ValueSource) -> Result<Option<Cow<'v, str>>, E>,
) -> Result<bool, E> {
    for c in conditions {
        let held = value(&c.source)?.is_some_and(|v| c.values.iter().any(|want| *want == *v));
        if !held {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether checking `conditions` reads the JSON body.
pub fn need_json(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.source.needs_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_must_hold_and_absent_never_matches() {
        let kind = ValueSource::Json("/kind".into());
        let model = ValueSource::Json("/model".into());
        let conditions = vec![
            Condition {
                source: kind.clone(),
                values: vec!["blog_post".into(), "article".into()],
            },
            Condition {
                source: model.clone(),
                values: vec!["3".into(), "true".into()],
            },
        ];
        let read = |k: Option<&'static str>, m: Option<&'static str>| {
            let (kind, model) = (kind.clone(), model.clone());
            hold(&conditions, move |s| {
                Ok::<_, ()>(if *s == kind {
                    k.map(Cow::Borrowed)
                } else if *s == model {
                    m.map(Cow::Borrowed)
                } else {
                    None
                })
            })
            .unwrap()
        };
        assert!(read(Some("article"), Some("3")));
        assert!(read(Some("blog_post"), Some("true")));
        assert!(!read(Some("video"), Some("3")));
        assert!(!read(Some("article"), None));
        assert!(!read(None, Some("3")));
        assert!(!read(Some("Article"), Some("3")), "values compare exactly");
        assert_eq!(hold(&[], |_| Ok::<_, ()>(None)), Ok(true));
        let e = hold(&conditions, |_| Err::<Option<Cow<'_, str>>, _>("ambiguous"));
        assert_eq!(
            e,
            Err("ambiguous"),
            "an unreadable value refuses, never falls through"
        );
    }
}
