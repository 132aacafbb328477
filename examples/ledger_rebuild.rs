//! How long a restart takes to rebuild balances from a ledger: writes
//! `N` credits events (default 1,000,000) over 10,000 accounts to a fresh
//! ledger at `PATH`, closes it, then opens it again and rebuilds a memory
//! store from it, timing each part.
//!
//! Usage: cargo run --release --example ledger_rebuild -- [N] [PATH]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstile::clock::SECOND;
use turnstile::ledger::{Durable, Ledger, LedgerSettings, LimitInfo};
use turnstile::limits::credits::{Credits, Refill};
use turnstile::limits::Rule;
use turnstile::observe::metrics::Metrics;
use turnstile::store::journal::{Change, Entry};
use turnstile::store::{MemoryStore, Subject};
use turnstile::SystemClock;

const COUNTER: u64 = 42;
const ACCOUNTS: usize = 10_000;

fn open(path: &std::path::Path) -> Ledger {
    let settings = LedgerSettings {
        path: path.to_path_buf(),
        durable: Durable::Interval,
        retain: Duration::from_secs(90 * 86_400),
        sinks: Vec::new(),
    };
    let ledger = Ledger::open(settings, "bench", Arc::new(Metrics::new())).expect("ledger");
    let rule = Rule::Credits(Credits {
        grant: 1_000_000_000,
        refill: Refill::Never,
    });
    let limits = HashMap::from([(
        COUNTER,
        LimitInfo {
            name: "credits".into(),
            rule,
            alerts: Arc::from(Vec::new()),
        },
    )]);
    ledger.set_limits(limits);
    ledger
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let path = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("turnstile-ledger-rebuild.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let accounts: Vec<Subject> = (0..ACCOUNTS)
        .map(|i| Subject::Account(format!("account-{i}").into()))
        .collect();
    let ledger = open(&path);
    let journal = ledger.journal();
    let start = Instant::now();
    let mut balances = vec![1_000_000_000i64; ACCOUNTS];
    for i in 0..n {
        let a = i % ACCOUNTS;
        balances[a] -= 3;
        journal.write(Entry {
            change: Change::Charged,
            subject: &accounts[a],
            counter: COUNTER,
            grant: 1_000_000_000,
            amount: -3,
            balance: Some(balances[a]),
            job_id: None,
            at: 1_800_000_000 * SECOND + i as u64 * 1000,
            origin: None,
        });
    }
    ledger.close();
    let wrote = start.elapsed();
    let bytes: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum();

    let ledger = open(&path);
    let store = MemoryStore::new(Arc::new(SystemClock));
    let rebuilt = ledger.rebuild(&store).expect("rebuild");
    println!(
        "wrote {n} events in {:.2} s ({:.0} bytes each on disk); rebuilt {} balances from {} events in {:.2} s",
        wrote.as_secs_f64(),
        bytes as f64 / n as f64,
        rebuilt.balances,
        rebuilt.events,
        rebuilt.took.as_secs_f64()
    );
    ledger.close();
}
