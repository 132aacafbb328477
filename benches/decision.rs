//! The decision path: one request's limits decided by the memory store.
//! 1 and 3 limits; fixed, rolling, bucket; 1 key and 1,000,000 keys; and
//! two threads contending for one key.

use std::future::Future as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use turnstile::clock::{Clock, ManualClock, SECOND};
use turnstile::limits::{Bucket, Fixed, Jobs, Rolling, Rule, Window};
use turnstile::store::{LimitCheck, MemoryStore, OwnedCheck, Subject};

/// The allocator of the `turnstile` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MANY: u32 = 1_000_000;
/// 2026-05-05T16:00:10Z
const NOW: u64 = 1_777_996_810 * SECOND;

/// A key subject derived from `i` (random-looking, like a real digest) without
/// touching memory, so the benchmark measures the store's cache misses only.
/// A non-zero limit figure.
fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).expect("a non-zero limit")
}

fn key(i: u32) -> Subject {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&z.to_le_bytes());
    d[8..].copy_from_slice(&(!z).to_le_bytes());
    Subject::Key(d)
}

fn rules() -> [Rule; 3] {
    [
        Rule::Fixed(Fixed {
            requests: nz(u32::MAX),
            window: Window::Span(60 * SECOND),
        }),
        Rule::Rolling(Rolling {
            requests: nz(u32::MAX),
            window: 3600 * SECOND,
        }),
        Rule::Bucket(Bucket {
            burst: nz(u32::MAX),
            interval: 1,
        }),
    ]
}

fn checks<'a>(subject: &Subject, rules: &'a [Rule]) -> smallvec::SmallVec<[LimitCheck<'a>; 4]> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| LimitCheck {
            subject: subject.clone(),
            group: subject.clone(),
            counter: i as u64 + 1,
            rule,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        })
        .collect()
}

fn store() -> MemoryStore {
    MemoryStore::new(Arc::new(ManualClock::new(NOW)))
}

fn decision(c: &mut Criterion) {
    let all = rules();
    let mut group = c.benchmark_group("decide");
    for (name, set) in [
        ("fixed", &all[0..1]),
        ("rolling", &all[1..2]),
        ("bucket", &all[2..3]),
        ("3 limits", &all[..]),
    ] {
        let s = store();
        let k = key(7);
        let cs = checks(&k, set);
        group.bench_function(format!("{name}, 1 key"), |b| {
            b.iter(|| black_box(s.decide_at(black_box(&cs), NOW)))
        });
    }

    // A job's whole life next to the same three limits: admitted (pending
    // slot), bound to the id the answer names, ended by its status poll.
    {
        let s = store();
        let k = key(7);
        let mut with_jobs = all.to_vec();
        with_jobs.push(Rule::Jobs(Jobs {
            max: nz(5),
            max_duration: 3600 * SECOND,
            retry_after: 5 * SECOND,
        }));
        let cs = checks(&k, &with_jobs);
        let ended = [OwnedCheck {
            subject: k.clone(),
            group: k.clone(),
            counter: 4,
            rule: with_jobs[3],
            units: 1,
        }];
        let waker = std::task::Waker::noop();
        group.bench_function("3 limits + jobs (admit, bind, end), 1 key", |b| {
            b.iter(|| {
                let mut d = s.decide_at(black_box(&cs), NOW);
                for claim in d.lease.take_jobs() {
                    let mut bind = std::pin::pin!(claim.bind("gen_0123456789"));
                    let polled = bind
                        .as_mut()
                        .poll(&mut std::task::Context::from_waker(waker));
                    assert!(polled.is_ready(), "the memory store binds at once");
                }
                black_box(s.end_job(&ended, "gen_0123456789", turnstile::store::How::Done, None))
            })
        });
    }

    // 1,000,000 keys, each with its counters already live (cold caches).
    for (name, set) in [("fixed", &all[0..1]), ("3 limits", &all[..])] {
        let s = store();
        for i in 0..MANY {
            s.decide_at(&checks(&key(i), set), NOW);
        }
        let mut i = 0u32;
        group.bench_function(format!("{name}, 1,000,000 keys"), |b| {
            b.iter(|| {
                // A stride that defeats the caches.
                i = (i + 7919) % MANY;
                black_box(s.decide_at(&checks(&key(i), set), NOW))
            })
        });
        println!("live counters: {}", s.live_counters());
    }

    // Two threads deciding for the same key at once.
    let s = Arc::new(store());
    group.bench_function("3 limits, 1 key, 2 threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    let s = s.clone();
                    scope.spawn(move || {
                        let all = rules();
                        let k = key(1);
                        let cs = checks(&k, &all);
                        for _ in 0..iters {
                            black_box(s.decide_at(&cs, NOW));
                        }
                    });
                }
            });
            // Per decision, with both threads' work counted.
            start.elapsed() / 2
        })
    });
    group.finish();
}

/// One dependent read from a random place in 256 MiB: the price of each
/// cache miss the decisions above pay at a million keys, on this machine.
fn memory(c: &mut Criterion) {
    const LINES: usize = (256 << 20) / 64;
    // A random cycle through every cache line (Sattolo's shuffle), each
    // line holding the index of the next: the reads cannot be overlapped.
    let mut order: Vec<usize> = (0..LINES).collect();
    let mut z = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..LINES).rev() {
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        order.swap(i, (z % i as u64) as usize);
    }
    let mut next = vec![0usize; LINES * 8];
    for w in 0..LINES {
        next[order[w] * 8] = order[(w + 1) % LINES] * 8;
    }
    let mut at = 0usize;
    c.bench_function("one random read, 256 MiB", |b| {
        b.iter(|| {
            at = next[at];
            black_box(at)
        })
    });
}

fn clock(c: &mut Criterion) {
    let clock = turnstile::SystemClock;
    c.bench_function("system clock now", |b| b.iter(|| black_box(clock.now())));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decision, memory, clock
}
criterion_main!(benches);
