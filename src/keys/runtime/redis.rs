//! Runtime keys in Redis (redis backend), shared by every instance: the
//! keys in one hash (field: the key's SHA-256 in hex, value: the record as
//! JSON), disabled accounts in another, each account's active keys in a
//! set (for the cap, checked in the same script that adds a key), and a
//! version number bumped by every change. Each instance reads the version
//! every [`SYNC_EVERY`] and reloads both hashes when it moved, so a create,
//! revoke or re-plan made through any instance is in force everywhere
//! within about a quarter of a second. All keys share one hash tag, so the
//! scripts run on Redis Cluster too.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use sha2::{Digest, Sha256};

use super::{KeyCache, KeyError, RuntimeKey};
use crate::keys::identity::KeyDigest;
use crate::store::RedisStore;

/// How often each instance looks for changes.
pub const SYNC_EVERY: Duration = Duration::from_millis(250);

const CREATE: &str = r#"
-- KEYS: keys hash, version, account set; ARGV: digest, record, cap (0: none), now, file_active
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -2 end
local cap = tonumber(ARGV[3])
if cap > 0 then
  local active = tonumber(ARGV[5])
  local now = tonumber(ARGV[4])
  for _, d in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local rec = redis.call('HGET', KEYS[1], d)
    local live = false
    if rec then
      local r = cjson.decode(rec)
      live = (not r.revoked) and (r.expires_at == nil or r.expires_at == cjson.null or r.expires_at > now)
    end
    if live then active = active + 1 else redis.call('SREM', KEYS[3], d) end
  end
  if active >= cap then return -1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return redis.call('INCR', KEYS[2])
"#;

const UPDATE: &str = r#"
-- KEYS: keys hash, version, account set; ARGV: digest, record, revoked (0/1)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('SREM', KEYS[3], ARGV[1]) end
return redis.call('INCR', KEYS[2])
"#;

const DISABLE: &str = r#"
-- KEYS: disabled hash, version; ARGV: account, 1 (disable) or 0
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], ARGV[1], '1') else redis.call('HDEL', KEYS[1], ARGV[1]) end
return redis.call('INCR', KEYS[2])
"#;

const VERSION: &str = r#"
return tonumber(redis.call('GET', KEYS[1]) or '0')
"#;

const LOAD: &str = r#"
-- KEYS: keys hash, disabled hash, version
return { tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('HGETALL', KEYS[1]), redis.call('HKEYS', KEYS[2]) }
"#;

/// The runtime keys in one Redis (or cluster).
pub struct RedisKeys {
    store: RedisStore,
    keys: String,
    disabled: String,
    version: String,
    prefix: String,
    scripts: Scripts,
    /// The version the cache reflects (-1: never loaded).
    seen: AtomicI64,
}

struct Scripts {
    create: Script,
    update: Script,
    disable: Script,
    version: Script,
    load: Script,
}

fn store_error(e: impl std::fmt::Display) -> KeyError {
    KeyError::Store(e.to_string())
}

impl RedisKeys {
    /// The key store in `store`'s Redis.
    pub fn new(store: RedisStore) -> Self {
        let prefix = format!("{}{{keys}}", store.prefix());
        Self {
            store,
            keys: prefix.clone(),
            disabled: format!("{prefix}:disabled"),
            version: format!("{prefix}:v"),
            prefix,
            scripts: Scripts {
                create: Script::new(CREATE),
                update: Script::new(UPDATE),
                disable: Script::new(DISABLE),
                version: Script::new(VERSION),
                load: Script::new(LOAD),
            },
            seen: AtomicI64::new(-1),
        }
    }

    fn account_set(&self, account: &str) -> String {
        format!(
            "{}:a:{}",
            self.prefix,
            hex::encode(&Sha256::digest(account.as_bytes())[..16])
        )
    }

    /// Stores a new key unless its account holds `cap` active keys already.
    pub async fn create(
        &self,
        digest: KeyDigest,
        key: &RuntimeKey,
        cap: Option<u32>,
        file_active: u32,
        now: u64,
    ) -> Result<(), KeyError> {
        let record = serde_json::to_string(key).map_err(store_error)?;
        let keys = [
            self.keys.clone(),
            self.version.clone(),
            self.account_set(&key.account),
        ];
        let args = [
            hex::encode(digest),
            record,
            cap.unwrap_or(0).to_string(),
            now.to_string(),
            file_active.to_string(),
        ];
        let r: i64 = self
            .store
            .run_script(&self.scripts.create, &keys, &args)
            .await
            .map_err(store_error)?;
        match r {
            -1 => Err(KeyError::TooMany {
                account: key.account.to_string(),
                cap: cap.unwrap_or(0),
            }),
            -2 => Err(KeyError::Conflict("that key exists already".into())),
            _ => Ok(()),
        }
    }

    /// Writes a changed key.
    pub async fn update(&self, digest: KeyDigest, key: &RuntimeKey) -> Result<(), KeyError> {
        let record = serde_json::to_string(key).map_err(store_error)?;
        let keys = [
            self.keys.clone(),
            self.version.clone(),
            self.account_set(&key.account),
        ];
        let args = [
            hex::encode(digest),
            record,
            u8::from(key.revoked).to_string(),
        ];
        let r: i64 = self
            .store
            .run_script(&self.scripts.update, &keys, &args)
            .await
            .map_err(store_error)?;
        if r == -2 {
            return Err(KeyError::Store("the key is no longer in redis".into()));
        }
        Ok(())
    }

    /// Disables or enables an account.
    pub async fn set_disabled(&self, account: &str, disabled: bool) -> Result<(), KeyError> {
        let keys = [self.disabled.clone(), self.version.clone()];
        let args = [account.to_owned(), u8::from(disabled).to_string()];
        let _: i64 = self
            .store
            .run_script(&self.scripts.disable, &keys, &args)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Brings `cache` up to date if the version moved; returns whether it
    /// reloaded.
    pub async fn sync(&self, cache: &KeyCache) -> Result<bool, KeyError> {
        let version: i64 = self
            .store
            .run_script(
                &self.scripts.version,
                std::slice::from_ref(&self.version),
                &[],
            )
            .await
            .map_err(store_error)?;
        if version == self.seen.load(Ordering::Acquire) {
            return Ok(false);
        }
        let keys = [
            self.keys.clone(),
            self.disabled.clone(),
            self.version.clone(),
        ];
        let (version, fields, disabled): (i64, Vec<String>, Vec<String>) = self
            .store
            .run_script(&self.scripts.load, &keys, &[])
            .await
            .map_err(store_error)?;
        let mut loaded = Vec::with_capacity(fields.len() / 2);
        for pair in fields.chunks_exact(2) {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(&pair[0], &mut digest).is_err() {
                continue;
            }
            match serde_json::from_str::<RuntimeKey>(&pair[1]) {
                Ok(k) => loaded.push((digest, k)),
                Err(e) => tracing::warn!(error = %e, "unreadable runtime key record in redis"),
            }
        }
        cache.replace(loaded, disabled);
        self.seen.store(version, Ordering::Release);
        Ok(true)
    }

    /// Keeps `cache` current until the task is aborted.
    pub fn spawn_sync(self: &Arc<Self>, cache: Arc<KeyCache>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = me.sync(&cache).await {
                    tracing::debug!(error = %e, "runtime keys not synced");
                }
            }
        })
    }
}
