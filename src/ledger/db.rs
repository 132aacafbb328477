//! The ledger on disk: one SQLite database in WAL mode. Events are rows
//! appended in position order; every commit is one fsync
//! (`synchronous = FULL`), and the writer commits whatever accumulated
//! while the previous commit ran (group commit). Sinks keep the position
//! they delivered up to in the same file.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::event::Row;

/// Opens (creating) the ledger at `path`.
pub(crate) fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
            seq INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            subject TEXT NOT NULL,
            counter INTEGER NOT NULL,
            type TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            balance INTEGER,
            grant_ INTEGER NOT NULL,
            job_id TEXT,
            body TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS events_by_account ON events(account, seq);
        CREATE TABLE IF NOT EXISTS sinks (
            name TEXT PRIMARY KEY,
            acked INTEGER NOT NULL
        );",
    )?;
    // Ledgers made before Redis events were kept lack the counter's key.
    let has_rkey: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('events') WHERE name = 'rkey'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_rkey {
        conn.execute_batch("ALTER TABLE events ADD COLUMN rkey TEXT")?;
    }
    Ok(conn)
}

/// The position after the last event written.
pub(crate) fn next_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let max: Option<i64> = conn.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
    Ok(max.map_or(1, |m| m as u64 + 1))
}

/// The latest event time written (ms; 0 for an empty ledger): ids made
/// after a restart sort after those made before, whatever the clock did.
pub(crate) fn last_ms(conn: &Connection) -> rusqlite::Result<i64> {
    let max: Option<i64> = conn.query_row("SELECT MAX(at_ms) FROM events", [], |r| r.get(0))?;
    Ok(max.unwrap_or(0))
}

/// Appends `rows` in one transaction: one commit, one fsync.
pub(crate) fn append(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, account, subject, counter, type, at_ms, balance, grant_, job_id, body, rkey)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in rows {
            insert.execute(params![
                r.seq as i64,
                r.account,
                r.subject,
                r.counter as i64,
                r.kind,
                r.at_ms,
                r.balance,
                r.grant,
                r.job_id,
                r.body,
                r.rkey,
            ])?;
        }
    }
    tx.commit()
}

/// Up to `limit` events after position `after`, in order: (position, JSON).
pub(crate) fn after(
    conn: &Connection,
    after: u64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, String)>> {
    let mut q =
        conn.prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let rows = q.query_map(params![after as i64, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
    })?;
    rows.collect()
}

/// Up to `limit` events of `account` after position `after`, in order.
pub(crate) fn of_account(
    conn: &Connection,
    account: &str,
    after: u64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, String)>> {
    let mut q = conn.prepare_cached(
        "SELECT seq, body FROM events WHERE account = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = q.query_map(params![account, after as i64, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
    })?;
    rows.collect()
}

/// How many events come after position `after`.
pub(crate) fn count_after(conn: &Connection, after: u64) -> rusqlite::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM events WHERE seq > ?1",
        [after as i64],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// The `n` latest events, newest last.
pub(crate) fn latest(conn: &Connection, n: usize) -> rusqlite::Result<Vec<String>> {
    let mut q = conn.prepare_cached("SELECT body FROM events ORDER BY seq DESC LIMIT ?1")?;
    let rows = q.query_map(params![n as i64], |r| r.get::<_, String>(0))?;
    let mut out: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    out.reverse();
    Ok(out)
}

/// Where sink `name` delivered up to (0: nothing yet).
pub(crate) fn acked(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    let at: Option<i64> = conn
        .query_row("SELECT acked FROM sinks WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(at.map_or(0, |a| a as u64))
}

/// Sink `name` delivered up to `seq`.
pub(crate) fn ack(conn: &Connection, name: &str, seq: u64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO sinks (name, acked) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET acked = excluded.acked",
        params![name, seq as i64],
    )?;
    Ok(())
}

/// One event a rebuild reads.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) subject: String,
    pub(crate) counter: u64,
    pub(crate) kind: String,
    pub(crate) at_ms: i64,
    pub(crate) balance: Option<i64>,
    pub(crate) grant: i64,
    pub(crate) job_id: Option<String>,
    pub(crate) body: String,
}

/// Every event that rebuilds a balance or a job, in order, to `f`.
pub(crate) fn replay(conn: &Connection, mut f: impl FnMut(Replayed)) -> rusqlite::Result<u64> {
    let mut q = conn.prepare(
        "SELECT subject, counter, type, at_ms, balance, job_id, body, grant_ FROM events
         WHERE type <> 'quota.exhausted' ORDER BY seq",
    )?;
    let mut rows = q.query([])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(2)?;
        // Only low alerts need their JSON (the threshold).
        let body = if kind == super::event::LOW {
            r.get(6)?
        } else {
            String::new()
        };
        f(Replayed {
            subject: r.get(0)?,
            counter: r.get::<_, i64>(1)? as u64,
            kind,
            at_ms: r.get(3)?,
            balance: r.get(4)?,
            job_id: r.get(5)?,
            body,
            grant: r.get(7)?,
        });
        n += 1;
    }
    Ok(n)
}

/// One Redis counter's event a rebuild of Redis reads.
#[derive(Debug)]
pub(crate) struct OfKey {
    pub(crate) rkey: String,
    pub(crate) counter: u64,
    pub(crate) kind: String,
    pub(crate) at_ms: i64,
    pub(crate) balance: Option<i64>,
    pub(crate) grant: i64,
    pub(crate) job_id: Option<String>,
}

/// Every event of a Redis counter that rebuilds a balance or a job, in
/// order, to `f`.
pub(crate) fn replay_keys(conn: &Connection, mut f: impl FnMut(OfKey)) -> rusqlite::Result<()> {
    let mut q = conn.prepare(
        "SELECT rkey, counter, type, at_ms, balance, grant_, job_id FROM events
         WHERE rkey IS NOT NULL AND type NOT IN ('quota.exhausted', 'credits.low') ORDER BY seq",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f(OfKey {
            rkey: r.get(0)?,
            counter: r.get::<_, i64>(1)? as u64,
            kind: r.get(2)?,
            at_ms: r.get(3)?,
            balance: r.get(4)?,
            grant: r.get(5)?,
            job_id: r.get(6)?,
        });
    }
    Ok(())
}

/// Drops events older than `before_ms` that every sink delivered, except
/// each balance's latest (a rebuild starts from it). How many went.
pub(crate) fn forget(
    conn: &Connection,
    before_ms: i64,
    sinks: &[String],
) -> rusqlite::Result<usize> {
    let mut delivered = i64::MAX;
    for s in sinks {
        delivered = delivered.min(acked(conn, s)? as i64);
    }
    conn.execute(
        "DELETE FROM events WHERE at_ms < ?1 AND seq <= ?2 AND seq NOT IN (
            SELECT MAX(seq) FROM events WHERE type LIKE 'credits.%' GROUP BY subject, counter
        )",
        params![before_ms, delivered],
    )
}
