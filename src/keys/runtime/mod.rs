//! Keys managed at runtime (SPEC §14): created, re-planned and revoked
//! through the admin API, kept in a real database — SQLite at
//! `[identity] key_store` with the memory backend ([`sqlite`]), Redis with
//! the redis backend ([`redis`]) — and looked up on the request path in
//! memory only ([`KeyCache`]): a request never waits on the database, and
//! a flood of unknown keys reads nothing but a hash map.
//!
//! The keys file stays the static registry: its keys win over runtime keys
//! with the same digest and are read-only through the API.

pub mod redis;
pub mod sqlite;

use std::sync::Arc;

use serde::Deserialize;

pub use super::cache::{KeyCache, KeyPatch, RuntimeKey};
use super::digest::{digest, Fingerprint, KeyDigest};
use super::identity::{IdentitySettings, KeyStoreAt};

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The account holds `max_keys_per_account` active keys.
    #[error("account {account:?} already has {cap} active API keys (max_keys_per_account)")]
    TooMany {
        /// The account.
        account: String,
        /// The cap.
        cap: u32,
    },
    /// No runtime key has that fingerprint.
    #[error("no runtime API key has the fingerprint {0:?}")]
    NotFound(String),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (unknown plan, bad time, ...).
    #[error("{0}")]
    Invalid(String),
    /// No `[identity] key_store` is configured.
    #[error("runtime keys need [identity] key_store (a SQLite file with the memory backend, \"redis\" with the redis backend)")]
    NotConfigured,
    /// The database failed.
    #[error("key store: {0}")]
    Store(String),
}

/// Where runtime keys are kept.
pub enum KeyStore {
    /// None configured: the API refuses changes.
    None,
    /// SQLite (memory backend).
    Sqlite(sqlite::SqliteKeys),
    /// Redis (redis backend).
    Redis(Arc<redis::RedisKeys>),
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// The account the key belongs to.
    pub account: String,
    /// Its plan.
    pub plan: String,
    /// A label for people.
    #[serde(default)]
    pub name: Option<String>,
    /// RFC 3339; none: never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// A key just made: the only time the key itself is known.
#[derive(Debug, Clone)]
pub struct Created {
    /// The key (prefix + 32 base62 characters).
    pub key: String,
    /// Its SHA-256.
    pub digest: KeyDigest,
    /// What was stored.
    pub record: RuntimeKey,
}

/// One process's runtime keys: the cache requests read and the database
/// behind it.
#[derive(Debug)]
pub struct RuntimeKeys {
    cache: Arc<KeyCache>,
    store: KeyStore,
}

impl RuntimeKeys {
    /// Opens the configured store (and loads it into the cache).
    pub fn open(
        identity: &IdentitySettings,
        counters: &crate::store::CounterStore,
    ) -> Result<Self, KeyError> {
        let cache = Arc::new(KeyCache::default());
        let store = match (&identity.key_store, counters) {
            (None, _) => KeyStore::None,
            (Some(KeyStoreAt::Sqlite(path)), _) => {
                KeyStore::Sqlite(sqlite::SqliteKeys::open(path, &cache)?)
            }
            (Some(KeyStoreAt::Redis), crate::store::CounterStore::Redis(r)) => {
                KeyStore::Redis(Arc::new(redis::RedisKeys::new(r.clone())))
            }
            (Some(KeyStoreAt::Redis), _) => return Err(KeyError::NotConfigured),
        };
        Ok(Self { cache, store })
    }

    /// The in-memory view.
    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    /// Reads a shared store (Redis) into the cache once, before serving; an
    /// unreachable Redis is retried by the sync task.
    pub async fn load(&self) {
        if let KeyStore::Redis(r) = &self.store {
            if let Err(e) = r.sync(&self.cache).await {
                tracing::warn!(error = %e, "runtime keys not loaded yet: retrying in the background");
            }
        }
    }

    /// Keeps the cache current from a shared store (Redis); `None` for the
    /// others, whose every change goes through this process.
    pub fn spawn_sync(&self) -> Option<tokio::task::JoinHandle<()>> {
        match &self.store {
            KeyStore::Redis(r) => Some(r.spawn_sync(self.cache.clone())),
            _ => None,
        }
    }

    /// Makes, stores and caches a new key for `new.account`.
    pub async fn create(
        &self,
        new: NewKey,
        id: &IdentitySettings,
        plans: &[Arc<str>],
        now: u64,
    ) -> Result<Created, KeyError> {
        if matches!(self.store, KeyStore::None) {
            return Err(KeyError::NotConfigured);
        }
        if new.account.trim().is_empty() {
            return Err(KeyError::Invalid("account must not be empty".into()));
        }
        let plan = plan_named(plans, &new.plan)?;
        let expires_at = match &new.expires_at {
            None => None,
            Some(t) => Some(future_time(t, now)?),
        };
        let file = id.keys.as_ref();
        let file_active = file.map_or(0, |k| k.active_of(&new.account, now)) as u32;
        // A fresh key whose fingerprint no other key has, so a fingerprint
        // names one key in the API.
        let mut made = None;
        for _ in 0..16 {
            let key = format!("{}{}", id.prefix.as_deref().unwrap_or(""), random_secret()?);
            let digest = digest(&key);
            let fp = Fingerprint::of(&digest);
            let taken = file.is_some_and(|k| k.iter().any(|(d, _)| Fingerprint::of(d) == fp))
                || self.cache.has_fingerprint(&fp);
            if !taken {
                made = Some((key, digest));
                break;
            }
        }
        let (key, digest) =
            made.ok_or_else(|| KeyError::Store("could not draw an unused fingerprint".into()))?;
        let record = RuntimeKey {
            account: new.account.as_str().into(),
            plan,
            name: new.name.as_deref().map(Into::into),
            created: now,
            expires_at,
            revoked: false,
        };
        let cap = id.max_keys_per_account;
        match &self.store {
            KeyStore::None => return Err(KeyError::NotConfigured),
            KeyStore::Sqlite(s) => {
                s.create(digest, record.clone(), cap, file_active, now)
                    .await?
            }
            KeyStore::Redis(r) => r.create(digest, &record, cap, file_active, now).await?,
        }
        self.cache.put(digest, record.clone());
        Ok(Created {
            key,
            digest,
            record,
        })
    }

    /// Applies `patch` to the runtime key with fingerprint `fp`.
    pub async fn update(
        &self,
        fp: &str,
        patch: KeyPatch,
        plans: &[Arc<str>],
        now: u64,
    ) -> Result<(KeyDigest, RuntimeKey), KeyError> {
        let found = self.cache.by_fingerprint(fp);
        let (digest, current) = match found.as_slice() {
            [] => return Err(KeyError::NotFound(fp.to_owned())),
            [one] => one.clone(),
            _ => {
                return Err(KeyError::Conflict(format!(
                    "several keys have the fingerprint {fp:?}"
                )))
            }
        };
        if patch.revoked == Some(false) && current.revoked {
            return Err(KeyError::Conflict(
                "a revoked key stays revoked: create a new one".into(),
            ));
        }
        let plan = match &patch.plan {
            Some(p) => Some(plan_named(plans, p)?),
            None => None,
        };
        let expires_at = match &patch.expires_at {
            None => None,
            Some(None) => Some(None),
            Some(Some(t)) => Some(Some(future_time(t, now)?)),
        };
        let changed = current.patched(plan, &patch, expires_at);
        match &self.store {
            KeyStore::None => return Err(KeyError::NotConfigured),
            KeyStore::Sqlite(s) => s.update(digest, changed.clone()).await?,
            KeyStore::Redis(r) => r.update(digest, &changed).await?,
        }
        self.cache.put(digest, changed.clone());
        Ok((digest, changed))
    }

    /// Disables (or enables again) every key of `account`.
    pub async fn set_disabled(&self, account: &str, disabled: bool) -> Result<(), KeyError> {
        match &self.store {
            KeyStore::None => return Err(KeyError::NotConfigured),
            KeyStore::Sqlite(s) => s.set_disabled(account.to_owned(), disabled).await?,
            KeyStore::Redis(r) => r.set_disabled(account, disabled).await?,
        }
        self.cache.set_disabled(account, disabled);
        Ok(())
    }
}

fn plan_named(plans: &[Arc<str>], name: &str) -> Result<Arc<str>, KeyError> {
    plans
        .iter()
        .find(|p| &***p == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = plans.iter().map(|p| &**p).collect();
            KeyError::Invalid(format!(
                "unknown plan {name:?}: plans are {}",
                names.join(", ")
            ))
        })
}

fn future_time(text: &str, now: u64) -> Result<u64, KeyError> {
    let at = parse_time(text).map_err(KeyError::Invalid)?;
    if at <= now {
        return Err(KeyError::Invalid(format!(
            "expires_at {text:?} is in the past"
        )));
    }
    Ok(at)
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyStore::None => "KeyStore::None",
            KeyStore::Sqlite(_) => "KeyStore::Sqlite",
            KeyStore::Redis(_) => "KeyStore::Redis",
        })
    }
}

/// A new key's random part: base62, 32 characters (about 190 bits) from
/// the operating system's CSPRNG.
pub fn random_secret() -> Result<String, KeyError> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    const LEN: usize = 32;
    let mut out = String::with_capacity(LEN);
    let mut buf = [0u8; 64];
    while out.len() < LEN {
        getrandom::fill(&mut buf).map_err(|e| KeyError::Store(format!("no randomness: {e}")))?;
        // Rejection sampling: 248 = 4 × 62, so every symbol is equally likely.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if out.len() == LEN {
                break;
            }
            out.push(ALPHABET[usize::from(b % 62)] as char);
        }
    }
    Ok(out)
}

/// Unix seconds of an RFC 3339 time (`2027-01-01T00:00:00Z`).
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!(
                "expires_at {text:?} is not an RFC 3339 time ({e}), e.g. \"2027-01-01T00:00:00Z\""
            )
        })?;
    u64::try_from(t.unix_timestamp()).map_err(|_| format!("expires_at {text:?} is before 1970"))
}

/// RFC 3339 of unix seconds.
pub fn format_time(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_base62_and_differ() {
        let a = random_secret().unwrap();
        let b = random_secret().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn times_round_trip() {
        let t = parse_time("2027-01-01T00:00:00Z").unwrap();
        assert_eq!(t, 1_798_761_600);
        assert_eq!(format_time(t), "2027-01-01T00:00:00Z");
        assert!(parse_time("tomorrow").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn a_full_reload_drops_what_is_gone() {
        let c = KeyCache::default();
        let key = RuntimeKey {
            account: "acme".into(),
            plan: "free".into(),
            name: None,
            created: 1,
            expires_at: None,
            revoked: false,
        };
        c.put([1; 32], key.clone());
        c.put([2; 32], key.clone());
        c.set_disabled("acme", true);
        c.replace(vec![([2; 32], key)], vec![]);
        assert!(c.get(&[1; 32]).is_none());
        assert!(c.get(&[2; 32]).is_some());
        assert!(!c.is_disabled("acme"));
    }
}
