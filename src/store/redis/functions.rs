//! The decision as a Redis Function (Redis 7): the library (the prelude,
//! the kinds, `decide.lua`, `library.lua`) is loaded once with `FUNCTION
//! LOAD` and each decision is one `FCALL`, so the kinds are not defined
//! again on every call as an `EVALSHA` script's whole text is. The
//! library's name carries a hash of its text, so instances of different
//! versions sharing a Redis each call their own. A Redis without
//! Functions (before 7, or `FUNCTION` not allowed) gets the script; a
//! Redis that lost the library (restarted empty) gets it loaded again.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use redis::{ScriptInvocation, ToRedisArgs};
use sha2::{Digest, Sha256};

use super::client::Request;
use super::Inner;
use crate::store::StoreError;

/// The error a call gets when Redis does not hold the library.
pub(super) const NOT_LOADED: &str = "redis does not hold turnstile's function library";

/// Whether `e` says Redis has no such function (it lost the library).
pub(super) fn not_loaded(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

const UNTRIED: u8 = 0;
const LOADED: u8 = 1;
const UNAVAILABLE: u8 = 2;

/// The library and where its loading stands.
pub(super) struct Library {
    text: String,
    decide: String,
    state: AtomicU8,
    /// After a load that got no answer, the next try waits until then
    /// (the breaker's clock, ms): decisions meanwhile use the script.
    next_try_ms: AtomicU64,
}

/// How long after a load that got no answer the next one is tried.
const RETRY_LOAD_MS: u64 = 1_000;

impl Library {
    /// The library of this build; `enabled` false (a Redis Cluster)
    /// keeps to the script.
    pub(super) fn new(enabled: bool) -> Self {
        let text = concat!(
            include_str!("lua/library_head.lua"),
            with_kinds!("lua/decide.lua"),
            include_str!("lua/library.lua"),
        );
        let hash = hex::encode(&Sha256::digest(text.as_bytes())[..4]);
        Self {
            text: text
                .replacen("name=turnstile", &format!("name=turnstile_{hash}"), 1)
                .replacen(
                    "'turnstile_decide'",
                    &format!("'turnstile_decide_{hash}'"),
                    1,
                ),
            decide: format!("turnstile_decide_{hash}"),
            state: AtomicU8::new(if enabled { UNTRIED } else { UNAVAILABLE }),
            next_try_ms: AtomicU64::new(0),
        }
    }
}

/// A call's keys and arguments, for either a script or `FCALL`. The
/// arguments are written into one buffer (a `Cmd` used as such), not one
/// allocation each: a decision has 5 + 5 per limit + the ledger's.
pub(super) struct Call {
    keys: Vec<Vec<u8>>,
    args: redis::Cmd,
}

impl Default for Call {
    fn default() -> Self {
        Self {
            keys: Vec::with_capacity(4),
            args: redis::Cmd::with_capacity(48, 512),
        }
    }
}

impl Call {
    fn args(&self) -> impl Iterator<Item = &[u8]> {
        self.args.args_iter().map(|a| match a {
            redis::Arg::Simple(bytes) => bytes,
            // Never written: `arg` takes no cursor.
            _ => &[][..],
        })
    }
}

/// What the ledger's arguments are added to: a script invocation or a
/// [`Call`].
pub(super) trait Args {
    fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self;
    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self;
}

impl Args for ScriptInvocation<'_> {
    fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        ScriptInvocation::key(self, key)
    }
    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        ScriptInvocation::arg(self, arg)
    }
}

impl Args for Call {
    fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }
    fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.arg(arg);
        self
    }
}

impl Inner {
    /// Runs a decision: `FCALL` where Redis has the library (loaded on
    /// first use, and again if Redis lost it), else the script.
    pub(super) async fn decide_call(&self, call: &Call) -> Result<Vec<i64>, StoreError> {
        let reply: Vec<u8> = self.decide_reply(call).await?;
        parse_numbers(&reply).ok_or_else(|| {
            StoreError::Unavailable(format!(
                "unexpected reply from the decision: {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(80)])
            ))
        })
    }

    async fn decide_reply(&self, call: &Call) -> Result<Vec<u8>, StoreError> {
        for _ in 0..2 {
            if !self.library_ready().await {
                break;
            }
            let bytes = call.args().chain(call.keys.iter().map(|k| &k[..]));
            let mut cmd = redis::Cmd::with_capacity(
                call.keys.len() + call.args.args_iter().len() + 3,
                bytes.map(<[u8]>::len).sum::<usize>() + 64,
            );
            cmd.arg("FCALL");
            cmd.arg(&self.library.decide)
                .arg(call.keys.len())
                .arg(&call.keys);
            for a in call.args() {
                cmd.arg(a);
            }
            match self.request(Request::Command(&cmd)).await {
                Err(StoreError::NotSent(m)) if m == NOT_LOADED => {
                    self.library.state.store(UNTRIED, Ordering::Release);
                }
                done => return done,
            }
        }
        let mut inv = self.decide.prepare_invoke();
        for k in &call.keys {
            inv.key(k);
        }
        for a in call.args() {
            inv.arg(a);
        }
        self.call(inv).await
    }

    /// Whether decisions go by `FCALL`: loads the library if it was not
    /// yet (a Redis without Functions is remembered and asked no more).
    async fn library_ready(&self) -> bool {
        match self.library.state.load(Ordering::Acquire) {
            LOADED => return true,
            UNAVAILABLE => return false,
            _ => {}
        }
        // Redis is down, or a load just went unanswered: the script call
        // answers (or fails) at once through the breaker meanwhile.
        let now_ms = self.breaker.now_ms();
        if self.breaker.is_open() || now_ms < self.library.next_try_ms.load(Ordering::Acquire) {
            return false;
        }
        let later = || {
            self.library
                .next_try_ms
                .store(now_ms + RETRY_LOAD_MS, Ordering::Release);
            false
        };
        let load = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.library.text)
            .to_owned();
        let Some(mut conn) = self.connection().await else {
            return later();
        };
        let loaded = tokio::time::timeout(self.settings.timeout * 4, conn.query::<String>(&load));
        match loaded.await {
            Ok(Ok(_)) => {
                self.library.state.store(LOADED, Ordering::Release);
                true
            }
            // Not answering: tried again on the next decision.
            Ok(Err(e)) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => later(),
            Err(_) => later(),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "redis has no Functions (before Redis 7, or FUNCTION not allowed): decisions use a script (EVALSHA), which costs redis-server more per decision");
                self.library.state.store(UNAVAILABLE, Ordering::Release);
                false
            }
        }
    }
}

/// The decision's reply: integers, each after a space (read byte by
/// byte: `str::parse` per number was a fifth of the client's cost).
fn parse_numbers(reply: &[u8]) -> Option<Vec<i64>> {
    let mut out = Vec::with_capacity(reply.len() / 2 + 1);
    for word in reply.split(|&c| c == b' ').filter(|w| !w.is_empty()) {
        let (negative, digits) = match word {
            [b'-', rest @ ..] => (true, rest),
            _ => (false, word),
        };
        if digits.is_empty() || digits.len() > 18 {
            return None;
        }
        let mut n: i64 = 0;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            n = n * 10 + i64::from(d - b'0');
        }
        out.push(if negative { -n } else { n });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::parse_numbers;

    #[test]
    fn the_reply_is_read_as_integers() {
        assert_eq!(
            parse_numbers(b" 1 1765000000000123 0 -1 -2"),
            Some(vec![1, 1_765_000_000_000_123, 0, -1, -2])
        );
        assert_eq!(parse_numbers(b"-1"), Some(vec![-1]));
        assert_eq!(parse_numbers(b" 1 2x"), None);
        assert_eq!(parse_numbers(b" 1 2.5"), None);
        assert_eq!(parse_numbers(b""), Some(vec![]));
        assert_eq!(parse_numbers(b" -"), None);
        assert_eq!(parse_numbers(b" 1234567890123456789"), None);
        assert_eq!(
            parse_numbers(b" 999999999999999999 -999999999999999999"),
            Some(vec![999_999_999_999_999_999, -999_999_999_999_999_999])
        );
    }
}
