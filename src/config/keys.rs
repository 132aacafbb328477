//! `[identity]` and the keys file it names: where keys are read from, the
//! default plan, the runtime key store, every key checked against the plans.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use http::HeaderName;

use super::raw::{RawIdentity, RawKey, RawKeysFile, RawUnknownKey};
use super::{Backend, ConfigError, Plans, Source, StoreSettings};
use crate::keys::identity::{
    self, IdentitySettings, KeyDigest, KeyRecord, KeyRegistry, KeySource, KeyStoreAt, UnknownKey,
};

pub(super) fn compile_identity(
    src: &Source,
    raw: &RawIdentity,
    plans: &Plans<'_>,
    base: &Path,
    store: &StoreSettings,
) -> Result<IdentitySettings, ConfigError> {
    let sources = key_sources(src, raw)?;
    let prefix = raw.prefix.as_ref().map(|p| p.get_ref().clone());
    let unknown_key = match raw.unknown_key {
        Some(RawUnknownKey::Default) => UnknownKey::Default,
        _ => UnknownKey::Reject,
    };
    let default_plan = match &raw.default_plan {
        Some(p) => Some(plans.index(src, p)?),
        None if plans.plans.len() == 1 => Some(0),
        None if plans.names.is_empty() => Some(0),
        None => None,
    };
    let key_store = key_store(src, raw, base, store)?;
    let max_keys_per_account = match &raw.max_keys_per_account {
        Some(n) if *n.get_ref() == 0 => {
            return Err(src.at(n.span(), "max_keys_per_account must be at least 1"))
        }
        n => n.as_ref().map(|n| *n.get_ref()),
    };
    let keys = match &raw.keys_file {
        None => None,
        Some(f) => {
            let file = base.join(f.get_ref());
            // A keys file that cannot be read is reported where it is named.
            let keys_src = Source::read(&file).map_err(|e| {
                src.at(
                    f.span(),
                    format!("keys_file {:?}: {}", f.get_ref(), io_message(e)),
                )
            })?;
            let rules = KeyRules {
                plans,
                default_plan,
                prefix: prefix.as_deref(),
                cap: max_keys_per_account,
            };
            Some(load_keys(&keys_src, &rules)?)
        }
    };
    let needs_default =
        (keys.is_none() && key_store.is_none()) || unknown_key == UnknownKey::Default;
    if needs_default && default_plan.is_none() && !plans.plans.is_empty() {
        return Err(src.at(0..0, format!("[identity] default_plan is required: keys without a keys-file entry need a plan (one of {})", plans.list())));
    }
    Ok(IdentitySettings {
        sources,
        prefix,
        unknown_key,
        default_plan,
        keys,
        key_store,
        max_keys_per_account,
    })
}

/// The message of a file that could not be read, without its name.
fn io_message(e: ConfigError) -> String {
    match e {
        ConfigError::Io { message, .. } => message,
        other => other.to_string(),
    }
}

/// `sources`: where a key is looked for (default: bearer, then `X-API-Key`).
fn key_sources(src: &Source, raw: &RawIdentity) -> Result<Vec<KeySource>, ConfigError> {
    let Some(list) = &raw.sources else {
        return Ok(vec![
            KeySource::Bearer,
            KeySource::Header(HeaderName::from_static("x-api-key")),
        ]);
    };
    let mut out = Vec::new();
    for s in list {
        out.push(KeySource::parse(s.get_ref()).map_err(|m| src.at(s.span(), m))?);
    }
    if out.is_empty() {
        return Err(src.at(0..0, "[identity] sources must name at least one source"));
    }
    Ok(out)
}

/// `key_store`: a SQLite file with the memory backend, `"redis"` with Redis.
fn key_store(
    src: &Source,
    raw: &RawIdentity,
    base: &Path,
    store: &StoreSettings,
) -> Result<Option<KeyStoreAt>, ConfigError> {
    let Some(k) = &raw.key_store else {
        return Ok(None);
    };
    let redis = matches!(store.backend, Backend::Redis(_));
    match (k.get_ref().as_str(), redis) {
        ("redis", true) => Ok(Some(KeyStoreAt::Redis)),
        ("redis", false) => Err(src.at(k.span(), "key_store = \"redis\" needs the redis backend ([store] backend = \"redis\"); with the memory backend give a SQLite file, e.g. \"state/keys.db\"")),
        (_, true) => Err(src.at(k.span(), "with the redis backend runtime keys live in Redis, so every instance sees them: write key_store = \"redis\"")),
        ("", false) => Err(src.at(k.span(), "key_store must name a SQLite file, e.g. \"state/keys.db\"")),
        (path, false) => Ok(Some(KeyStoreAt::Sqlite(base.join(path)))),
    }
}

/// What every key of the keys file is checked against.
struct KeyRules<'a> {
    plans: &'a Plans<'a>,
    default_plan: Option<usize>,
    prefix: Option<&'a str>,
    cap: Option<u32>,
}

fn load_keys(src: &Source, rules: &KeyRules<'_>) -> Result<KeyRegistry, ConfigError> {
    let raw: RawKeysFile = src.parse()?;
    let mut reg = KeyRegistry::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut active: HashMap<&str, u32> = HashMap::new();
    for k in &raw.keys {
        let span = k.span();
        let k = k.get_ref();
        let digest = key_digest(src, k, span.clone(), rules.prefix)?;
        let plan = match &k.plan {
            Some(p) => rules.plans.index(src, p)?,
            None => rules.default_plan.ok_or_else(|| {
                src.at(
                    span.clone(),
                    "key has no `plan` and there is no default_plan",
                )
            })?,
        };
        let expires_at = match &k.expires_at {
            None => None,
            Some(t) => Some(
                crate::keys::runtime::parse_time(t.get_ref()).map_err(|m| src.at(t.span(), m))?,
            ),
        };
        let record = KeyRecord {
            account: k.account.as_deref().map(Arc::from),
            plan,
            revoked: k.revoked.unwrap_or(false),
            expires_at,
            name: k.name.as_deref().map(Arc::from),
        };
        if let (Some(cap), Some(account)) = (rules.cap, k.account.as_deref()) {
            if record.active(now) {
                let n = active.entry(account).or_default();
                *n += 1;
                if *n > cap {
                    return Err(src.at(span, format!("account {account:?} has more than max_keys_per_account = {cap} active keys (this is number {n})")));
                }
            }
        }
        if !reg.insert(digest, record) {
            return Err(src.at(span, "duplicate key"));
        }
    }
    for a in &raw.accounts {
        if a.get_ref().disabled.unwrap_or(false) {
            reg.disable(&a.get_ref().name);
        }
    }
    Ok(reg)
}

/// A key's digest: the key hashed (it must carry the identity prefix), or
/// its `sha256` as written.
fn key_digest(
    src: &Source,
    k: &RawKey,
    span: std::ops::Range<usize>,
    prefix: Option<&str>,
) -> Result<KeyDigest, ConfigError> {
    match (&k.key, &k.sha256) {
        (Some(key), None) => {
            if let Some(p) = prefix {
                if !key.get_ref().starts_with(p) {
                    return Err(src.at(key.span(), format!("key does not start with the identity prefix {p:?}, so it could never be used")));
                }
            }
            Ok(identity::digest(key.get_ref()))
        }
        (None, Some(h)) => {
            let mut d = [0u8; 32];
            hex::decode_to_slice(h.get_ref().trim(), &mut d)
                .map_err(|_| src.at(h.span(), "sha256 must be 64 hex characters"))?;
            Ok(d)
        }
        _ => Err(src.at(span, "each key needs exactly one of `key` or `sha256`")),
    }
}
