//! The runtime keys as requests see them: an in-memory map from digest to
//! record, and the disabled accounts. The stores behind it ([`super::runtime`])
//! write through it; identifying a caller ([`super::identity`]) only reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::digest::{Fingerprint, KeyDigest};

/// One runtime key as stored (its digest is the map key, never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeKey {
    /// The account it belongs to.
    pub account: Arc<str>,
    /// Its plan's name (resolved against the policy on each request, so a
    /// reload's plans apply at once).
    pub plan: Arc<str>,
    /// A label for people.
    #[serde(default)]
    pub name: Option<Arc<str>>,
    /// Unix seconds of its creation.
    pub created: u64,
    /// Unix seconds after which it is refused (401 "API key expired").
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Revoked keys are refused (401 "API key revoked"); revoking is final.
    #[serde(default)]
    pub revoked: bool,
}

impl RuntimeKey {
    /// Whether it counts against `max_keys_per_account` at `now` (unix s).
    pub fn active(&self, now: u64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| at > now)
    }

    /// This key with `patch` applied (`plan` and `expires_at` already
    /// checked by the caller).
    pub fn patched(
        &self,
        plan: Option<Arc<str>>,
        patch: &KeyPatch,
        expires_at: Option<Option<u64>>,
    ) -> Self {
        let mut out = self.clone();
        if let Some(plan) = plan {
            out.plan = plan;
        }
        if patch.revoked == Some(true) {
            out.revoked = true;
        }
        if let Some(name) = &patch.name {
            out.name = Some(name.as_str().into());
        }
        if let Some(at) = expires_at {
            out.expires_at = at;
        }
        out
    }
}

/// What a change through the API asks for; `None`: unchanged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    /// A new plan (must exist).
    pub plan: Option<String>,
    /// `true` revokes; `false` on a revoked key is refused.
    pub revoked: Option<bool>,
    /// A new label.
    pub name: Option<String>,
    /// A new expiry (RFC 3339), or `null` for none.
    #[serde(default, deserialize_with = "some_value")]
    pub expires_at: Option<Option<String>>,
}

fn some_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// The in-memory view of the runtime keys and disabled accounts, kept
/// current by the store's writes (and, with Redis, its change feed).
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: DashMap<KeyDigest, RuntimeKey, foldhash::fast::FixedState>,
    disabled: DashMap<Arc<str>, (), foldhash::fast::RandomState>,
    any_keys: AtomicBool,
    any_disabled: AtomicBool,
}

impl KeyCache {
    /// The runtime key with `digest`, if any (memory only).
    pub fn get(&self, digest: &KeyDigest) -> Option<RuntimeKey> {
        if !self.any_keys.load(Ordering::Acquire) {
            return None;
        }
        self.keys.get(digest).map(|k| k.clone())
    }

    /// Whether `account` was disabled through the API.
    pub fn is_disabled(&self, account: &str) -> bool {
        self.any_disabled.load(Ordering::Acquire) && self.disabled.contains_key(account)
    }

    /// Every runtime key of `account`, by digest.
    pub fn of_account(&self, account: &str) -> Vec<(KeyDigest, RuntimeKey)> {
        let mut out: Vec<_> = self
            .keys
            .iter()
            .filter(|e| &*e.value().account == account)
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        out.sort_by_key(|(_, k)| k.created);
        out
    }

    /// The runtime keys whose fingerprint is `fp`.
    pub fn by_fingerprint(&self, fp: &str) -> Vec<(KeyDigest, RuntimeKey)> {
        self.keys
            .iter()
            .filter(|e| Fingerprint::of(e.key()).as_str().eq_ignore_ascii_case(fp))
            .map(|e| (*e.key(), e.value().clone()))
            .collect()
    }

    /// Whether some runtime key has fingerprint `fp`.
    pub fn has_fingerprint(&self, fp: &Fingerprint) -> bool {
        self.keys.iter().any(|e| Fingerprint::of(e.key()) == *fp)
    }

    /// Sets one key.
    pub fn put(&self, digest: KeyDigest, key: RuntimeKey) {
        self.keys.insert(digest, key);
        self.any_keys.store(true, Ordering::Release);
    }

    /// Disables or enables an account.
    pub fn set_disabled(&self, account: &str, disabled: bool) {
        if disabled {
            self.disabled.insert(account.into(), ());
            self.any_disabled.store(true, Ordering::Release);
        } else {
            self.disabled.remove(account);
        }
    }

    /// Replaces everything with `keys` and `disabled` (a full reload).
    pub fn replace(&self, keys: Vec<(KeyDigest, RuntimeKey)>, disabled: Vec<String>) {
        let fresh: std::collections::HashSet<KeyDigest> = keys.iter().map(|(d, _)| *d).collect();
        self.keys.retain(|d, _| fresh.contains(d));
        let any = !keys.is_empty();
        for (d, k) in keys {
            self.keys.insert(d, k);
        }
        self.any_keys.store(any, Ordering::Release);
        let fresh: std::collections::HashSet<&str> = disabled.iter().map(|s| s.as_str()).collect();
        self.disabled.retain(|a, _| fresh.contains(&**a));
        for a in &disabled {
            self.disabled.insert(a.as_str().into(), ());
        }
        self.any_disabled
            .store(!disabled.is_empty(), Ordering::Release);
    }
}
