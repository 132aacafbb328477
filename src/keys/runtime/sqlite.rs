//! Runtime keys in SQLite (memory backend): one file, WAL mode, every
//! change one transaction; the whole table is read into the cache at
//! start. Writes run on the blocking pool, one at a time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::{KeyCache, KeyError, RuntimeKey};
use crate::keys::identity::KeyDigest;

/// A SQLite key store.
pub struct SqliteKeys {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

fn store_error(e: impl std::fmt::Display) -> KeyError {
    KeyError::Store(e.to_string())
}

impl SqliteKeys {
    /// Opens (or creates) the database at `path` and loads it into `cache`.
    pub fn open(path: &Path, cache: &KeyCache) -> Result<Self, KeyError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(store_error)?;
        }
        let conn = Connection::open(path).map_err(store_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(store_error)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(store_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(store_error)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS keys (
                 digest BLOB PRIMARY KEY,
                 account TEXT NOT NULL,
                 plan TEXT NOT NULL,
                 name TEXT,
                 created INTEGER NOT NULL,
                 expires_at INTEGER,
                 revoked INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS keys_account ON keys (account);
             CREATE TABLE IF NOT EXISTS accounts (
                 name TEXT PRIMARY KEY,
                 disabled INTEGER NOT NULL DEFAULT 0
             );",
        )
        .map_err(store_error)?;
        let (keys, disabled) = load(&conn).map_err(store_error)?;
        cache.replace(keys, disabled);
        Ok(Self {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, KeyError> + Send + 'static,
    ) -> Result<T, KeyError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(store_error)?
    }

    /// Stores a new key unless its account already holds `cap` active keys
    /// (counting `file_active` from the keys file).
    pub async fn create(
        &self,
        digest: KeyDigest,
        key: RuntimeKey,
        cap: Option<u32>,
        file_active: u32,
        now: u64,
    ) -> Result<(), KeyError> {
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(store_error)?;
            if let Some(cap) = cap {
                let active: u32 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM keys WHERE account = ?1 AND revoked = 0
                         AND (expires_at IS NULL OR expires_at > ?2)",
                        params![&*key.account, now as i64],
                        |r| r.get(0),
                    )
                    .map_err(store_error)?;
                if active + file_active >= cap {
                    return Err(KeyError::TooMany {
                        account: key.account.to_string(),
                        cap,
                    });
                }
            }
            tx.execute(
                "INSERT INTO keys (digest, account, plan, name, created, expires_at, revoked)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
                params![
                    &digest[..],
                    &*key.account,
                    &*key.plan,
                    key.name.as_deref(),
                    key.created as i64,
                    key.expires_at.map(|t| t as i64),
                ],
            )
            .map_err(store_error)?;
            tx.commit().map_err(store_error)
        })
        .await
    }

    /// Writes a changed key.
    pub async fn update(&self, digest: KeyDigest, key: RuntimeKey) -> Result<(), KeyError> {
        self.with(move |conn| {
            let n = conn
                .execute(
                    "UPDATE keys SET plan = ?2, name = ?3, expires_at = ?4, revoked = ?5 WHERE digest = ?1",
                    params![
                        &digest[..],
                        &*key.plan,
                        key.name.as_deref(),
                        key.expires_at.map(|t| t as i64),
                        key.revoked,
                    ],
                )
                .map_err(store_error)?;
            if n == 0 {
                return Err(KeyError::Store("the key is no longer in the database".into()));
            }
            Ok(())
        })
        .await
    }

    /// Disables or enables an account.
    pub async fn set_disabled(&self, account: String, disabled: bool) -> Result<(), KeyError> {
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO accounts (name, disabled) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET disabled = excluded.disabled",
                params![account, disabled],
            )
            .map_err(store_error)?;
            Ok(())
        })
        .await
    }

    /// Reads one key back (tests and diagnostics).
    pub async fn read(&self, digest: KeyDigest) -> Result<Option<RuntimeKey>, KeyError> {
        self.with(move |conn| {
            conn.query_row(
                "SELECT account, plan, name, created, expires_at, revoked FROM keys WHERE digest = ?1",
                params![&digest[..]],
                row_key,
            )
            .optional()
            .map_err(store_error)
        })
        .await
    }
}

fn row_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<RuntimeKey> {
    Ok(RuntimeKey {
        account: r.get::<_, String>(0)?.into(),
        plan: r.get::<_, String>(1)?.into(),
        name: r.get::<_, Option<String>>(2)?.map(Into::into),
        created: r.get::<_, i64>(3)?.max(0) as u64,
        expires_at: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
        revoked: r.get(5)?,
    })
}

type Loaded = (Vec<(KeyDigest, RuntimeKey)>, Vec<String>);

fn load(conn: &Connection) -> rusqlite::Result<Loaded> {
    let mut keys = Vec::new();
    let mut stmt =
        conn.prepare("SELECT account, plan, name, created, expires_at, revoked, digest FROM keys")?;
    let rows = stmt.query_map([], |r| {
        let digest: Vec<u8> = r.get(6)?;
        Ok((digest, row_key(r)?))
    })?;
    for row in rows {
        let (digest, key) = row?;
        if let Ok(d) = <KeyDigest>::try_from(digest.as_slice()) {
            keys.push((d, key));
        }
    }
    let mut stmt = conn.prepare("SELECT name FROM accounts WHERE disabled != 0")?;
    let disabled = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((keys, disabled))
}
