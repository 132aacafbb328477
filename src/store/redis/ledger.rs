//! The ledger in Redis (docs/ledger.md, "With Redis"): every script that
//! changes a credits balance or a job appends its events to one stream,
//! `<prefix>ledger`, in the same atomic step (`lua/prelude.lua`, `note`).
//! Each instance copies the stream to its own ledger on disk (the ledger
//! layer reads it with [`RedisStore::read_ledger`]); one instance at a
//! time delivers each sink, taking turns through a lease in Redis that
//! also holds the sink's position; and a Redis that lost turnstile's data
//! is rebuilt from the copy on disk before it decides again.

use std::sync::Arc;
use std::time::Duration;

use redis::ScriptInvocation;

use super::functions::Args;
use super::{Inner, RedisStore};
use crate::limits::Rule;
use crate::store::journal::{Appended, Journal, Origin, RecordedState};
use crate::store::{StoreError, Subject};

/// How long a sink's turn lasts unless renewed.
const TURN: Duration = Duration::from_secs(30);

/// Takes or renews a turn: KEYS[1] the lease, ARGV[1] this instance,
/// ARGV[2] ms. 1 if this instance holds it.
const TAKE_TURN: &str = r"
local held = redis.call('GET', KEYS[1])
if held == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// Moves a sink's position forward while this instance holds its turn:
/// KEYS[1] the lease, KEYS[2] the position, ARGV[1] the instance, ARGV[2]
/// the position (decimal digits). 1 if this instance has the turn.
const MOVE_ON: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
-- Compared as digits: positions pass 2^53, beyond Lua's exact numbers.
local at, to = redis.call('GET', KEYS[2]) or '0', ARGV[2]
if #to > #at or (#to == #at and to > at) then redis.call('SET', KEYS[2], to) end
return 1";

/// Puts back what the ledger recorded: KEYS[1] the counter. ARGV[1]
/// 'balance' (ARGV[2] grant, ARGV[3] refill as decide.lua's b, ARGV[4]
/// balance, ARGV[5] when, us) or 'jobs' (ARGV[2..]: id, expiry ms pairs).
const RESTORE: &str = r"
begin()
-- Kept a period longer, as the ledger's scripts keep balances.
LEDGER = true
if ARGV[1] == 'balance' then
  local grant, b, balance, at = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local start, fin = window_bounds(b, at)
  if b < CREDITS_NEVER and fin <= now then return 0 end
  redis.call('HSET', KEYS[1], 'w', start, 's', grant - balance)
  credits_expire(KEYS[1], b, fin)
  return 1
end
local n, longest = 0, 0
for i = 2, #ARGV, 2 do
  local expires = tonumber(ARGV[i + 1])
  if expires > now_ms then
    redis.call('ZADD', KEYS[1], expires, 'j:' .. ARGV[i])
    if expires > longest then longest = expires end
    n = n + 1
  end
end
if n > 0 and redis.call('PTTL', KEYS[1]) < longest - now_ms then
  redis.call('PEXPIREAT', KEYS[1], longest + 1000)
end
return n";

/// The scripts of this module.
pub(super) struct Scripts {
    take_turn: redis::Script,
    move_on: redis::Script,
    restore: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            take_turn: redis::Script::new(TAKE_TURN),
            move_on: redis::Script::new(MOVE_ON),
            restore: redis::Script::new(&format!(
                "{}{}{}{RESTORE}",
                include_str!("lua/prelude.lua"),
                include_str!("lua/kinds/fixed.lua"),
                include_str!("lua/kinds/credits.lua"),
            )),
        }
    }
}

impl Inner {
    /// The ledger, when one is kept.
    pub(super) fn journal(&self) -> Option<&Arc<dyn Journal>> {
        self.journal.get()
    }

    fn stream(&self) -> String {
        format!("{}ledger", self.settings.prefix)
    }

    /// Adds the ledger's key and arguments to a script call (read by
    /// `ledger_open`): the exchange, then each check's subject, counter,
    /// grant and alert levels. Nothing without a ledger.
    pub(super) fn ledger_args<'a>(
        &self,
        inv: &mut impl Args,
        origin: Option<&Origin>,
        checks: impl Iterator<Item = (&'a Subject, u64, &'a Rule)>,
    ) {
        let Some(journal) = self.journal() else {
            return;
        };
        inv.key(self.stream());
        match origin {
            Some(o) => inv.arg(&*o.request_id).arg(&*o.route).arg(&*o.key_fp),
            None => inv.arg("").arg("").arg(""),
        };
        for (subject, counter, rule) in checks {
            let grant = match rule {
                Rule::Credits(k) => k.grant,
                _ => 0,
            };
            let levels: Vec<String> = journal
                .alert_levels(counter, grant)
                .iter()
                .map(i64::to_string)
                .collect();
            inv.arg(subject.text())
                .arg(counter)
                .arg(grant)
                .arg(levels.join(","));
        }
    }

    /// Adds the ledger's key and arguments to a `job.lua` call.
    pub(super) fn job_ledger_args(
        &self,
        inv: &mut ScriptInvocation<'_>,
        subject: &str,
        counter: u64,
        origin: Option<&Origin>,
    ) {
        if self.journal().is_none() {
            return;
        }
        inv.key(self.stream()).arg(subject).arg(counter);
        match origin {
            Some(o) => inv.arg(&*o.request_id).arg(&*o.route).arg(&*o.key_fp),
            None => inv.arg("").arg("").arg(""),
        };
    }
}

/// A sink's keys: its turn and its position.
fn sink_keys(prefix: &str, sink: &str) -> (String, String) {
    (
        format!("{prefix}ledger:sink:{sink}:turn"),
        format!("{prefix}ledger:sink:{sink}:at"),
    )
}

impl RedisStore {
    /// Keeps the ledger's events in Redis's stream from now on (set once,
    /// before serving; the local fallback writes nothing: what it did is
    /// written when Redis takes it).
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        let _ = self.inner.journal.set(journal);
    }

    /// Up to `count` events of the stream after stream id `after` (ms,
    /// seq), oldest first.
    pub async fn read_ledger(
        &self,
        after: (u64, u64),
        count: usize,
    ) -> Result<Vec<Appended>, StoreError> {
        let inner = &self.inner;
        let cmd = redis::cmd("XRANGE")
            .arg(inner.stream())
            .arg(format!("({}-{}", after.0, after.1))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .to_owned();
        let reply: redis::streams::StreamRangeReply = inner.command(cmd).await?;
        Ok(reply
            .ids
            .into_iter()
            .filter_map(|e| {
                let (ms, seq) = e.id.split_once('-')?;
                let fields = e
                    .map
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, redis::from_redis_value::<String>(v).ok()?)))
                    .collect();
                Some(Appended {
                    ms: ms.parse().ok()?,
                    seq: seq.parse().ok()?,
                    fields,
                })
            })
            .collect())
    }

    /// Drops the stream's events older than `before_ms` (each instance's
    /// ledger on disk keeps them).
    pub async fn trim_ledger(&self, before_ms: u64) -> Result<u64, StoreError> {
        let cmd = redis::cmd("XTRIM")
            .arg(self.inner.stream())
            .arg("MINID")
            .arg("~")
            .arg(before_ms)
            .to_owned();
        self.inner.command(cmd).await
    }

    /// Takes (or keeps) sink `sink`'s turn to deliver: true while this
    /// instance has it.
    pub async fn sink_turn(&self, sink: &str) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let (turn, _) = sink_keys(&inner.settings.prefix, sink);
        let mut inv = inner.ledger.take_turn.prepare_invoke();
        inv.key(turn)
            .arg(&inner.instance)
            .arg(TURN.as_millis() as u64);
        Ok(inner.call::<i64>(inv).await? == 1)
    }

    /// Where sink `sink` was delivered up to, by any instance.
    pub async fn sink_position(&self, sink: &str) -> Result<u64, StoreError> {
        let (_, at) = sink_keys(&self.inner.settings.prefix, sink);
        let v: Option<u64> = self
            .inner
            .command(redis::cmd("GET").arg(at).to_owned())
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Records that sink `sink` was delivered up to `position`, if this
    /// instance still has its turn (false: another took it over).
    pub async fn move_sink(&self, sink: &str, position: u64) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let (turn, at) = sink_keys(&inner.settings.prefix, sink);
        let mut inv = inner.ledger.move_on.prepare_invoke();
        inv.key(turn).key(at).arg(&inner.instance).arg(position);
        Ok(inner.call::<i64>(inv).await? == 1)
    }
}

impl Inner {
    /// Writes back every balance and job the ledger recorded (a Redis that
    /// lost turnstile's data); how many counters.
    pub(super) async fn restore_from_ledger(&self) -> Result<usize, StoreError> {
        let Some(journal) = self.journal().cloned() else {
            return Ok(0);
        };
        let (recorded, last) =
            tokio::task::spawn_blocking(move || (journal.recorded(), journal.last_position()))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.continue_stream(last).await?;
        let mut restored = 0;
        for r in recorded {
            let mut inv = self.ledger.restore.prepare_invoke();
            inv.key(&r.key);
            match &r.state {
                RecordedState::Balance {
                    balance,
                    grant,
                    refill,
                    at,
                } => {
                    inv.arg("balance")
                        .arg(*grant)
                        .arg(*refill)
                        .arg(*balance)
                        .arg(*at / 1_000);
                }
                RecordedState::Jobs(jobs) => {
                    inv.arg("jobs");
                    for (id, expires) in jobs {
                        inv.arg(id).arg(*expires / 1_000_000);
                    }
                }
            }
            restored += self.command_script(inv).await?;
        }
        Ok(restored)
    }

    /// Makes the stream's next ids follow position `last` (the ledger's
    /// last event): a Redis that started empty, with a clock behind the
    /// one before, would otherwise number new events below those every
    /// instance already holds. An empty stream is left whose last id is
    /// just after it; a stream already further on is left alone.
    async fn continue_stream(&self, last: u64) -> Result<(), StoreError> {
        if last == 0 {
            return Ok(());
        }
        let (ms, seq) = crate::store::journal::stream_id(last);
        let mark = redis::cmd("XADD")
            .arg(self.stream())
            .arg("MAXLEN")
            .arg("0")
            .arg(format!("{ms}-{}", seq + 1))
            .arg("t")
            .arg("mark")
            .to_owned();
        match self.command::<String>(mark).await {
            Ok(_) => Ok(()),
            // Redis's ids are already past it.
            Err(StoreError::Unavailable(m)) if m.contains("equal or smaller") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A script outside the breaker (the guard's calls).
    async fn command_script(&self, inv: ScriptInvocation<'_>) -> Result<usize, StoreError> {
        let Some(mut conn) = self.connection().await else {
            return Err(StoreError::Unavailable("cannot connect to redis".into()));
        };
        match tokio::time::timeout(self.settings.timeout * 4, conn.invoke::<i64>(&inv)).await {
            Ok(Ok(n)) => Ok(n.max(0) as usize),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable("redis timed out".into())),
        }
    }
}
