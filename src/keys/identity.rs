//! Caller identity (docs/configuration.md): where the API key is read from, the key
//! registry, the five distinct 401 reasons, and key fingerprints.
//!
//! Keys are held and compared as SHA-256 digests, so a keys file may list
//! digests instead of keys; only the 8-hex-character fingerprint is ever
//! shown in logs or to the upstream.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

pub use super::digest::{digest, Fingerprint, KeyDigest};

/// Where a key may be found, tried in configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// A request header holding the key.
    Header(HeaderName),
    /// A query-string parameter holding the key.
    Query(String),
}

impl KeySource {
    /// Parses `"bearer"`, `"header:NAME"` or `"query:NAME"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("bearer") {
            return Ok(Self::Bearer);
        }
        if let Some(name) = text.strip_prefix("header:") {
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("invalid header name in key source {text:?}"));
        }
        if let Some(name) = text.strip_prefix("query:") {
            if !name.trim().is_empty() {
                return Ok(Self::Query(name.trim().to_owned()));
            }
        }
        Err(format!(
            "invalid key source {text:?}: expected \"bearer\", \"header:NAME\" or \"query:NAME\""
        ))
    }

    fn describe(&self) -> String {
        match self {
            KeySource::Bearer => "Authorization: Bearer <key>".into(),
            KeySource::Header(name) => format!("{name} header"),
            KeySource::Query(name) => format!("?{name}= query parameter"),
        }
    }
}

/// Why a request has no usable identity; each maps to one distinct 401 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No configured source was present.
    #[error("API key missing: send it as {0}")]
    Missing(String),
    /// A source was present but unusable.
    #[error("{0}")]
    Malformed(String),
    /// The key lacks the configured prefix.
    #[error("API key must start with \"{0}\"")]
    WrongPrefix(String),
    /// The key is not in the keys file.
    #[error("unknown API key")]
    Unknown,
    /// The key is marked revoked.
    #[error("API key revoked")]
    Revoked,
    /// The key's `expires_at` has passed.
    #[error("API key expired")]
    Expired,
    /// The key's account is disabled.
    #[error("account disabled")]
    AccountDisabled,
    /// Two different credentials in one request.
    #[error("ambiguous credentials: send one API key, in one place")]
    Ambiguous,
}

/// One entry of the keys file.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    /// Account the key belongs to; `None`: the key is its own account.
    pub account: Option<Arc<str>>,
    /// Index of the key's plan in the policy.
    pub plan: usize,
    /// Revoked keys are refused with 401.
    pub revoked: bool,
    /// Unix seconds after which the key is refused (401 "API key expired").
    pub expires_at: Option<u64>,
    /// A label for people.
    pub name: Option<Arc<str>>,
}

impl KeyRecord {
    /// Whether the key counts as active at `now` (unix seconds).
    pub fn active(&self, now: u64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The keys file, indexed by key digest.
#[derive(Debug, Clone, Default)]
pub struct KeyRegistry {
    /// Digests are uniformly random already: a fast non-keyed hasher suffices.
    by_digest: HashMap<KeyDigest, KeyRecord, foldhash::fast::FixedState>,
    /// `[[accounts]] disabled = true`.
    disabled: std::collections::HashSet<Arc<str>>,
}

impl KeyRegistry {
    /// Adds a key; returns false when its digest was already present.
    pub fn insert(&mut self, digest: KeyDigest, record: KeyRecord) -> bool {
        self.by_digest.insert(digest, record).is_none()
    }

    /// Looks a key up by digest.
    pub fn get(&self, digest: &KeyDigest) -> Option<&KeyRecord> {
        self.by_digest.get(digest)
    }

    /// Every key, by digest.
    pub fn iter(&self) -> impl Iterator<Item = (&KeyDigest, &KeyRecord)> {
        self.by_digest.iter()
    }

    /// Disables `account` (every key of it is refused).
    pub fn disable(&mut self, account: &str) {
        self.disabled.insert(account.into());
    }

    /// Whether the keys file disables `account`.
    pub fn is_disabled(&self, account: &str) -> bool {
        !self.disabled.is_empty() && self.disabled.contains(account)
    }

    /// The keys of `account` active at `now`.
    pub fn active_of(&self, account: &str, now: u64) -> usize {
        self.by_digest
            .values()
            .filter(|r| r.account.as_deref() == Some(account) && r.active(now))
            .count()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether the registry is empty.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// What to do with well-formed keys missing from the keys file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKey {
    /// 401 unknown API key.
    Reject,
    /// Admit on the default plan, the key being its own account.
    Default,
}

/// Validated `[identity]` settings.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Sources tried in order.
    pub sources: Vec<KeySource>,
    /// Required key prefix.
    pub prefix: Option<String>,
    /// Policy for keys not in the keys file (only with a keys file).
    pub unknown_key: UnknownKey,
    /// Plan of keys without a keys-file entry, when such keys are admitted.
    pub default_plan: Option<usize>,
    /// The keys file, if any.
    pub keys: Option<KeyRegistry>,
    /// Where runtime keys live (`None`: no runtime keys).
    pub key_store: Option<KeyStoreAt>,
    /// Most active keys one account may hold.
    pub max_keys_per_account: Option<u32>,
}

/// `[identity] key_store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStoreAt {
    /// A SQLite file (memory backend).
    Sqlite(std::path::PathBuf),
    /// The redis backend's Redis.
    Redis,
}

/// The last key one connection presented, with its SHA-256: keep-alive
/// clients send the same key on every request, so the digest is computed
/// once per connection and key instead of once per request.
///
/// Scoped to a connection, so it never holds another connection's key;
/// compared in constant time, so the time taken says nothing about how
/// much of a key matched (only whether it is the same key, which sending
/// that key would tell anyway).
#[derive(Debug, Default)]
pub struct KeyMemo(std::sync::Mutex<Option<(Box<str>, KeyDigest)>>);

impl KeyMemo {
    /// The digest of `key`, from the memo when it is the key last seen.
    pub fn digest(&self, key: &str) -> KeyDigest {
        // Never wait: with the memo busy (HTTP/2 streams at once), hash.
        let Ok(mut slot) = self.0.try_lock() else {
            return digest(key);
        };
        if let Some((last, d)) = slot.as_ref() {
            if same(last.as_bytes(), key.as_bytes()) {
                return *d;
            }
        }
        let d = digest(key);
        *slot = Some((key.into(), d));
        d
    }
}

/// Whether `a == b`, in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What identifying a caller needs besides the request: the runtime keys,
/// the time, and the policy's plans by name.
pub struct Lookup<'a> {
    /// Runtime keys and disabled accounts.
    pub runtime: &'a crate::keys::cache::KeyCache,
    /// Unix seconds now (the injected clock's).
    pub now: u64,
    /// A plan's index by name.
    pub plan: &'a dyn Fn(&str) -> Option<usize>,
    /// The connection's last key and digest.
    pub memo: Option<&'a KeyMemo>,
}

/// Who the caller is, once identified.
#[derive(Debug, Clone)]
pub struct Caller {
    /// SHA-256 of the key.
    pub digest: KeyDigest,
    /// Shown in logs and sent upstream for accounts without a name.
    pub fingerprint: Fingerprint,
    /// Named account from the keys file; `None`: the key is its own account.
    pub account: Option<Arc<str>>,
    /// Index of the caller's plan.
    pub plan: usize,
    /// Whether the key is in the keys file (its counters are evicted last).
    pub registered: bool,
}

impl IdentitySettings {
    /// Reads and checks the caller's key from the request: the keys file
    /// first (it wins), then the runtime keys, then the default plan if
    /// unknown keys get one.
    pub fn identify(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        lookup: &Lookup<'_>,
    ) -> Result<Caller, AuthError> {
        let key = self.extract(headers, query)?;
        self.identify_key(&key, lookup)
    }

    /// [`IdentitySettings::identify`] for a key already read (a decision
    /// asked for by key, as Envoy's rate limit service does).
    pub fn identify_key(&self, key: &str, lookup: &Lookup<'_>) -> Result<Caller, AuthError> {
        if key.is_empty() {
            return Err(AuthError::Missing(self.sources_text()));
        }
        checked_key(key, || "malformed API key".to_owned())?;
        if let Some(prefix) = &self.prefix {
            if !key.starts_with(prefix.as_str()) {
                return Err(AuthError::WrongPrefix(prefix.clone()));
            }
        }
        let digest = match lookup.memo {
            Some(memo) => memo.digest(key),
            None => digest(key),
        };
        let fingerprint = Fingerprint::of(&digest);
        let disabled = |account: &str| {
            self.keys.as_ref().is_some_and(|k| k.is_disabled(account))
                || lookup.runtime.is_disabled(account)
        };
        if let Some(rec) = self.keys.as_ref().and_then(|k| k.get(&digest)) {
            if rec.revoked {
                return Err(AuthError::Revoked);
            }
            if rec.expires_at.is_some_and(|at| at <= lookup.now) {
                return Err(AuthError::Expired);
            }
            if rec.account.as_deref().is_some_and(disabled) {
                return Err(AuthError::AccountDisabled);
            }
            return Ok(Caller {
                digest,
                fingerprint,
                account: rec.account.clone(),
                plan: rec.plan,
                registered: true,
            });
        }
        if let Some(k) = lookup.runtime.get(&digest) {
            if k.revoked {
                return Err(AuthError::Revoked);
            }
            if k.expires_at.is_some_and(|at| at <= lookup.now) {
                return Err(AuthError::Expired);
            }
            if disabled(&k.account) {
                return Err(AuthError::AccountDisabled);
            }
            // A plan a reload removed: the key no longer has a plan to use.
            let plan = (lookup.plan)(&k.plan).ok_or(AuthError::Unknown)?;
            return Ok(Caller {
                digest,
                fingerprint,
                account: Some(k.account),
                plan,
                registered: true,
            });
        }
        let registry = self.keys.is_some() || self.key_store.is_some();
        match self.default_plan {
            Some(plan) if !registry || self.unknown_key == UnknownKey::Default => Ok(Caller {
                digest,
                fingerprint,
                account: None,
                plan,
                registered: false,
            }),
            _ => Err(AuthError::Unknown),
        }
    }

    /// The fingerprint of the key a request presents, usable or not (for
    /// the log line of a 401); `None` when it presents none, or several.
    pub fn presented(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Fingerprint> {
        let key = self.extract(headers, query).ok()?;
        Some(Fingerprint::of(&digest(&key)))
    }

    /// The key from the first configured source that is present. Any other
    /// credential in the request (a second `Authorization` header, a second
    /// value of a key header or query parameter, a key in another configured
    /// source) must be the same key: otherwise the request is ambiguous, as
    /// the upstream might honour the one that was not counted.
    fn extract<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Cow<'a, str>, AuthError> {
        let mut found: Option<Cow<'a, str>> = None;
        let mut take = |key: Result<Cow<'a, str>, AuthError>| -> Result<(), AuthError> {
            let key = key?;
            match &found {
                None => found = Some(key),
                Some(first) if *first == key => {}
                Some(_) => return Err(AuthError::Ambiguous),
            }
            Ok(())
        };
        // Without a repeated header name (the usual case) one lookup per
        // source finds every value.
        let repeated = headers.len() != headers.keys_len();
        let values = |name: &HeaderName| -> SmallVec<[&'a HeaderValue; 1]> {
            if repeated {
                headers.get_all(name).iter().collect()
            } else {
                headers.get(name).into_iter().collect()
            }
        };
        for source in &self.sources {
            match source {
                KeySource::Bearer => {
                    for value in values(&AUTHORIZATION) {
                        take(bearer_token(value.as_bytes()).map(Cow::Borrowed))?;
                    }
                }
                KeySource::Header(name) => {
                    for value in values(name) {
                        let text = std::str::from_utf8(value.as_bytes()).unwrap_or("").trim();
                        take(
                            checked_key(text, || format!("malformed API key in the {name} header"))
                                .map(Cow::Borrowed),
                        )?;
                    }
                }
                KeySource::Query(name) => {
                    let Some(query) = query else { continue };
                    for (_, value) in
                        form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k == name)
                    {
                        checked_key(&value, || {
                            format!("malformed API key in the {name} query parameter")
                        })?;
                        take(Ok(Cow::Owned(value.into_owned())))?;
                    }
                }
            }
        }
        if let Some(key) = found {
            return Ok(key);
        }
        Err(AuthError::Missing(self.sources_text()))
    }

    /// Where a key is looked for, as a 401 says it.
    fn sources_text(&self) -> String {
        let how: Vec<String> = self.sources.iter().map(KeySource::describe).collect();
        how.join(" or ")
    }
}

/// The token of `Bearer <token>`; anything else is malformed.
fn bearer_token(value: &[u8]) -> Result<&str, AuthError> {
    let malformed =
        || AuthError::Malformed("malformed Authorization header: expected \"Bearer <key>\"".into());
    let text = std::str::from_utf8(value).map_err(|_| malformed())?;
    let (scheme, token) = text.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    checked_key(token.trim(), || {
        "malformed Authorization header: expected \"Bearer <key>\"".into()
    })
}

/// A key must be non-empty visible ASCII.
fn checked_key(key: &str, message: impl FnOnce() -> String) -> Result<&str, AuthError> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed(message()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn settings(keys: Option<KeyRegistry>) -> IdentitySettings {
        IdentitySettings {
            sources: vec![
                KeySource::Bearer,
                KeySource::parse("header:x-api-key").unwrap(),
                KeySource::parse("query:api_key").unwrap(),
            ],
            prefix: Some("rfn_live_".into()),
            unknown_key: UnknownKey::Reject,
            default_plan: Some(0),
            keys,
            key_store: None,
            max_keys_per_account: None,
        }
    }

    fn no_plan(_: &str) -> Option<usize> {
        None
    }

    fn runtime() -> &'static crate::keys::cache::KeyCache {
        static CACHE: std::sync::OnceLock<crate::keys::cache::KeyCache> =
            std::sync::OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    fn lookup() -> Lookup<'static> {
        Lookup {
            runtime: runtime(),
            now: 1_000,
            plan: &no_plan,
            memo: None,
        }
    }

    #[test]
    fn the_memo_gives_each_key_its_own_digest() {
        let memo = KeyMemo::default();
        for key in [
            "rfn_live_a",
            "rfn_live_a",
            "rfn_live_b",
            "rfn_live_a",
            "rfn_live_ab",
            "",
        ] {
            assert_eq!(memo.digest(key), digest(key), "{key:?}");
        }
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn sources_in_order_and_no_fall_through_on_malformed() {
        let s = settings(None);
        let c = s
            .identify(
                &headers(&[("authorization", "Bearer rfn_live_a")]),
                None,
                &lookup(),
            )
            .unwrap();
        assert_eq!(c.digest, digest("rfn_live_a"));
        let c = s
            .identify(&headers(&[("x-api-key", "rfn_live_b")]), None, &lookup())
            .unwrap();
        assert_eq!(c.digest, digest("rfn_live_b"));
        let c = s
            .identify(&HeaderMap::new(), Some("x=1&api_key=rfn_live_c"), &lookup())
            .unwrap();
        assert_eq!(c.digest, digest("rfn_live_c"));
        // A present but malformed Authorization is an error even if X-Api-Key is fine.
        let e = s
            .identify(
                &headers(&[("authorization", "Basic abc"), ("x-api-key", "rfn_live_b")]),
                None,
                &lookup(),
            )
            .unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)));
    }

    #[test]
    fn five_distinct_reasons() {
        let mut reg = KeyRegistry::default();
        reg.insert(
            digest("rfn_live_ok"),
            KeyRecord {
                account: None,
                plan: 0,
                revoked: false,
                expires_at: None,
                name: None,
            },
        );
        reg.insert(
            digest("rfn_live_old"),
            KeyRecord {
                account: None,
                plan: 0,
                revoked: true,
                expires_at: None,
                name: None,
            },
        );
        let s = settings(Some(reg));
        let err = |h: &[(&str, &str)]| {
            s.identify(&headers(h), None, &lookup())
                .unwrap_err()
                .to_string()
        };
        let msgs = [
            err(&[]),
            err(&[("authorization", "Bearer ")]),
            err(&[("authorization", "Bearer sk_x")]),
            err(&[("authorization", "Bearer rfn_live_nope")]),
            err(&[("authorization", "Bearer rfn_live_old")]),
        ];
        assert!(msgs[0].starts_with("API key missing"));
        assert!(msgs[1].contains("malformed Authorization"));
        assert_eq!(msgs[2], "API key must start with \"rfn_live_\"");
        assert_eq!(msgs[3], "unknown API key");
        assert_eq!(msgs[4], "API key revoked");
        assert!(s
            .identify(
                &headers(&[("authorization", "bearer rfn_live_ok")]),
                None,
                &lookup()
            )
            .is_ok());
    }

    #[test]
    fn fingerprint_is_eight_hex_of_sha256() {
        // sha256("test") = 9f86d081884c7d65...
        assert_eq!(Fingerprint::of(&digest("test")).as_str(), "9f86d081");
    }
}
