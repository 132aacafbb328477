//! One ledger event: its row on disk and its JSON (what `GET /v1/ledger`
//! answers and sinks receive), and the CloudEvents envelope.

use serde::Serialize;

use crate::clock::Nanos;
use crate::store::journal::{Change, How};
use crate::store::Subject;

/// An event as the ledger keeps it: the JSON it exports, and the columns
/// a rebuild and the account pages read.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// Position in the ledger (dense, increasing).
    pub(crate) seq: u64,
    /// `account` as events write it.
    pub(crate) account: String,
    /// The subject, as [`subject_text`] writes it.
    pub(crate) subject: String,
    /// The counter's config id.
    pub(crate) counter: u64,
    /// `type`.
    pub(crate) kind: &'static str,
    /// Time in ms since the epoch.
    pub(crate) at_ms: i64,
    /// Balance after (credits events).
    pub(crate) balance: Option<i64>,
    /// The grant the balance was figured against (credits events).
    pub(crate) grant: i64,
    /// The job (job events).
    pub(crate) job_id: Option<String>,
    /// The event as JSON.
    pub(crate) body: String,
    /// With Redis: the counter's key (a Redis that forgot is rebuilt
    /// from it).
    pub(crate) rkey: Option<String>,
}

/// The event's `type`.
pub(crate) fn kind(change: Change) -> &'static str {
    match change {
        Change::Charged => "credits.charged",
        Change::Settled => "credits.settled",
        Change::Refunded => "credits.refunded",
        Change::Added => "credits.added",
        Change::Set => "credits.set",
        Change::Refilled => "credits.refilled",
        Change::JobStarted => "job.started",
        Change::JobEnded(_) => "job.ended",
        Change::QuotaExhausted { .. } => "quota.exhausted",
    }
}

/// `credits.low`: a threshold of `alerts` crossed.
pub(crate) const LOW: &str = "credits.low";

/// Event ids: the time in ms and the position, in hex (28 characters):
/// unique, and sorted as the ledger is.
pub(crate) fn id(at_ms: i64, seq: u64) -> String {
    let mut out = String::with_capacity(28);
    hex_digits(&mut out, at_ms.max(0) as u64, 12);
    hex_digits(&mut out, seq, 16);
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The last `n` hex digits of `v`, zero-padded (no formatting machinery:
/// this runs for every event, under the ledger's lock).
fn hex_digits(out: &mut String, v: u64, n: u32) {
    for i in (0..n).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
}

/// `prefix` then `bytes` in hex.
fn hex_text(prefix: &str, bytes: &[u8]) -> String {
    let mut out = String::with_capacity(prefix.len() + 2 * bytes.len());
    out.push_str(prefix);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The position an event id names (`None`: not an id of ours).
pub(crate) fn seq_of(id: &str) -> Option<u64> {
    if id.len() != 28 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&id[12..], 16).ok()
}

/// How `account` names a subject: the account's name, or `key:<fingerprint>`
/// for a key that is its own account.
pub(crate) fn account_of(subject: &Subject) -> String {
    match subject {
        Subject::Account(a) => a.to_string(),
        Subject::Key(d) => hex_text("key:", &d[..4]),
    }
}

/// The subject as a row keeps it (to be read back by a rebuild).
pub(crate) fn subject_text(subject: &Subject) -> String {
    match subject {
        Subject::Account(a) => {
            let mut out = String::with_capacity(2 + a.len());
            out.push_str("a:");
            out.push_str(a);
            out
        }
        Subject::Key(d) => hex_text("k:", d),
    }
}

/// The subject a row names.
pub(crate) fn subject_of(text: &str) -> Option<Subject> {
    if let Some(a) = text.strip_prefix("a:") {
        return Some(Subject::Account(a.into()));
    }
    let bytes = hex::decode(text.strip_prefix("k:")?).ok()?;
    let d: [u8; 16] = bytes.try_into().ok()?;
    Some(Subject::Key(d))
}

/// The date and time of the last second formatted, so that events of one
/// second format only their milliseconds.
#[derive(Debug, Default)]
pub(crate) struct Seconds {
    second: Option<i64>,
    text: String,
}

impl Seconds {
    /// RFC 3339 in UTC with milliseconds.
    pub(crate) fn rfc3339_ms(&mut self, at_ms: i64) -> String {
        let second = at_ms.div_euclid(1000);
        if self.second != Some(second) {
            let t = time::OffsetDateTime::from_unix_timestamp(second)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            self.text = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            self.second = Some(second);
        }
        let ms = at_ms.rem_euclid(1000) as u32;
        let mut out = String::with_capacity(self.text.len() + 4);
        out.push_str(&self.text);
        for d in [ms / 100, ms / 10 % 10, ms % 10] {
            out.push(char::from(b'0' + d as u8));
        }
        out.push('Z');
        out
    }
}

/// Milliseconds of `at`.
pub(crate) fn ms(at: Nanos) -> i64 {
    i64::try_from(at / 1_000_000).unwrap_or(i64::MAX)
}

/// The JSON of one event.
#[derive(Debug, Serialize)]
pub(crate) struct Body<'a> {
    pub(crate) id: &'a str,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) time: &'a str,
    pub(crate) account: &'a str,
    pub(crate) key_fp: Option<&'a str>,
    pub(crate) route: Option<&'a str>,
    pub(crate) limit: Option<&'a str>,
    pub(crate) amount: i64,
    pub(crate) balance: Option<i64>,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) job_id: Option<&'a str>,
    /// `job.ended`: how.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) how: Option<&'static str>,
    /// `credits.low`: the threshold as written in `alerts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) threshold: Option<&'a str>,
}

/// How a job ended, as `job.ended` writes it; a job whose id could not be
/// read ends `unreadable` (and has no id to show).
pub(crate) fn how(change: Change, job_id: Option<&str>) -> (Option<&'static str>, Option<&str>) {
    let Change::JobEnded(how) = change else {
        let hidden = job_id.filter(|id| crate::jobs::is_unreadable(id));
        return (None, job_id.filter(|_| hidden.is_none()));
    };
    match job_id {
        Some(id) if crate::jobs::is_unreadable(id) => (Some(How::Unreadable.as_str()), None),
        _ => (Some(how.as_str()), job_id),
    }
}

/// The CloudEvents 1.0 batch of `bodies` (each an event's JSON), from
/// `source`.
pub(crate) fn cloudevents(source: &str, bodies: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bodies.iter().map(|b| b.len() + 200).sum::<usize>() + 2);
    out.push(b'[');
    for (i, b) in bodies.iter().enumerate() {
        let Ok(data) = serde_json::from_str::<serde_json::Value>(b) else {
            continue;
        };
        let field = |k: &str| data.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let kind = data.get("type").and_then(|t| t.as_str()).unwrap_or("event");
        let envelope = serde_json::json!({
            "specversion": "1.0",
            "type": format!("dev.turnstile.{kind}"),
            "source": source,
            "id": field("id"),
            "subject": field("account"),
            "time": field("time"),
            "datacontenttype": "application/json",
            "data": data,
        });
        if i > 0 {
            out.push(b',');
        }
        if serde_json::to_writer(&mut out, &envelope).is_err() {
            continue;
        }
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_as_the_ledger_and_give_their_position_back() {
        let a = id(1_700_000_000_000, 9);
        let b = id(1_700_000_000_000, 10);
        let c = id(1_700_000_000_001, 11);
        assert!(a < b && b < c);
        assert_eq!(a.len(), 28);
        assert_eq!(seq_of(&b), Some(10));
        assert_eq!(seq_of("nope"), None);
        assert_eq!(seq_of(&"g".repeat(28)), None);
    }

    #[test]
    fn subjects_round_trip_and_times_have_milliseconds() {
        let k = Subject::Key([7; 16]);
        let a = Subject::Account("acme".into());
        assert_eq!(subject_of(&subject_text(&k)), Some(k.clone()));
        assert_eq!(subject_of(&subject_text(&a)), Some(a.clone()));
        assert_eq!(account_of(&k), "key:07070707");
        assert_eq!(account_of(&a), "acme");
        let mut clock = Seconds::default();
        assert_eq!(
            clock.rfc3339_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            clock.rfc3339_ms(1_700_000_000_007),
            "2023-11-14T22:13:20.007Z"
        );
        assert_eq!(
            clock.rfc3339_ms(1_700_000_000_999),
            "2023-11-14T22:13:20.999Z"
        );
        assert_eq!(
            clock.rfc3339_ms(1_700_000_001_040),
            "2023-11-14T22:13:21.040Z"
        );
        assert_eq!(
            clock.rfc3339_ms(1_699_999_999_000),
            "2023-11-14T22:13:19.000Z"
        );
        assert_eq!(id(0x1_2345, 0xab), "00000001234500000000000000ab");
    }

    #[test]
    fn a_batch_is_cloudevents() {
        let body = r#"{"id":"x","type":"credits.charged","time":"t","account":"acme"}"#;
        let out = cloudevents("turnstile/a", &[body.to_owned(), body.to_owned()]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[0]["specversion"], "1.0");
        assert_eq!(v[0]["type"], "dev.turnstile.credits.charged");
        assert_eq!(v[0]["subject"], "acme");
        assert_eq!(v[0]["source"], "turnstile/a");
        assert_eq!(v[0]["data"]["id"], "x");
    }
}
