//! Wake-up latency of a capacity pool: how long from a slot freed to the
//! next waiter holding it, in this process (memory backend) and through
//! Redis, on the same instance and across two instances (two stores, as
//! two turnstile processes would have). Used by `bench/capacity.sh`.
//!
//! Usage: capacity_wakeup ROUNDS [redis://127.0.0.1:PORT]
//! Prints one line per case: `case p50_us p99_us`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstile::capacity::{Asker, FairPer, PoolSpec, Pools};
use turnstile::observe::metrics::Metrics;
use turnstile::store::{CounterStore, MemoryStore, OnError, RedisSettings, RedisStore, Subject};
use turnstile::SystemClock;

fn spec() -> Arc<PoolSpec> {
    Arc::new(PoolSpec {
        name: "bench".into(),
        max: 1,
        max_wait: Duration::from_secs(10),
        max_queue: 10,
        weights: Vec::new(),
        reserve: Vec::new(),
        fair_per: FairPer::Key,
        retry_after: Duration::from_secs(5),
        max_duration: Duration::from_secs(3600),
        routes: vec![0],
        plans: vec!["p".into()],
    })
}

fn asker(n: u8) -> Asker {
    Asker {
        plan: "p".into(),
        fair: Subject::Key([n; 16]),
        owner: Subject::Key([n; 16]),
    }
}

fn pools(store: &CounterStore) -> Arc<Pools> {
    let p = Arc::new(Pools::new(
        store,
        Arc::new(SystemClock),
        Arc::new(Metrics::new()),
    ));
    p.configure(&[spec()]);
    p
}

fn redis(url: &str) -> CounterStore {
    CounterStore::Redis(RedisStore::new(
        RedisSettings {
            url: url.to_owned(),
            cluster: false,
            prefix: "bench:".into(),
            timeout: Duration::from_secs(2),
            on_error: OnError::Deny,
            lease: Duration::from_secs(30),
        },
        Arc::new(SystemClock),
    ))
}

/// Holder on `a` frees its slot; the waiter on `b` times how long until it holds it.
async fn rounds(a: Arc<Pools>, b: Arc<Pools>, n: usize) -> (u128, u128) {
    let spec = spec();
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let held = a.acquire(&spec, &asker(1)).await.expect("a slot");
        let (b2, s2) = (b.clone(), spec.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let slot = b2.acquire(&s2, &asker(2)).await;
            let _ = tx.send(Instant::now());
            drop(slot);
        });
        // Let the waiter queue.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let freed = Instant::now();
        drop(held);
        let got = rx.await.expect("the waiter");
        took.push(got.duration_since(freed).as_micros());
        waiter.await.expect("waiter task");
        // Its release reaches Redis in the background.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    took.sort_unstable();
    (took[n / 2], took[(n * 99 / 100).min(n - 1)])
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let memory = pools(&CounterStore::Memory(MemoryStore::new(Arc::new(
        SystemClock,
    ))));
    let (p50, p99) = rounds(memory.clone(), memory, n).await;
    println!("memory-same {p50} {p99}");
    if let Some(url) = args.next() {
        let one = pools(&redis(&url));
        let (p50, p99) = rounds(one.clone(), one.clone(), n).await;
        println!("redis-same {p50} {p99}");
        let other = pools(&redis(&url));
        let (p50, p99) = rounds(one, other, n).await;
        println!("redis-across {p50} {p99}");
    }
}
