//! Memory per live counter: `cargo run --release --example memory`.
//!
//! Fills the memory store with 1,000,000 keys × 2 limits (a minute and a
//! day), reports RSS and bytes per live counter, then lets both windows pass,
//! evicts, and reports RSS again. Numbers from /proc/self/status (Linux).
//!
//! `cargo run --release --example memory -- jobs 200000` instead holds 5 jobs
//! in progress for each of 200,000 keys (1,000,000 jobs, 20-character ids)
//! and reports bytes per job.

use std::alloc::{GlobalAlloc, Layout};
use std::future::Future as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The allocator of the `turnstile` binary, so the figures are the binary's,
/// counting the bytes held: RSS also moves with when the allocator hands
/// freed pages back (several percent between runs), the heap figure does not.
#[global_allocator]
static ALLOCATOR: Counting = Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is passed on to mimalloc unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is mimalloc's.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size, Ordering::Relaxed);
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

use turnstile::clock::{Clock, ManualClock, SECOND};
use turnstile::limits::{Fixed, Jobs, Rule, Window};
use turnstile::store::{LimitCheck, MemoryStore, Subject};

/// A non-zero limit figure.
fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).expect("a non-zero limit")
}

/// RSS once the allocator has handed back what it holds freed (a table's
/// old copy after it grew), so that runs agree.
fn rss_bytes() -> u64 {
    // SAFETY: mi_collect only returns freed memory to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn key(i: u64) -> Subject {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&z.to_le_bytes());
    d[8..].copy_from_slice(&(z ^ i).to_le_bytes());
    Subject::Key(d)
}

/// Holds 5 jobs in progress for each of `keys` keys.
fn jobs(keys: u64) {
    let clock = ManualClock::at_secs(1_777_996_810);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let rule = Rule::Jobs(Jobs {
        max: nz(5),
        max_duration: 3600 * SECOND,
        retry_after: 5 * SECOND,
    });
    let waker = std::task::Waker::noop();
    let baseline = rss_bytes();
    for i in 0..keys {
        let s = key(i);
        let check = [LimitCheck {
            subject: s.clone(),
            group: s,
            counter: 1,
            rule: &rule,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        }];
        for j in 0..5 {
            let mut d = store.decide_at(&check, clock.now());
            for claim in d.lease.take_jobs() {
                let id = format!("gen_{i:010}_{j:05}");
                let mut bind = std::pin::pin!(claim.bind(&id));
                let _ = bind
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(waker));
            }
        }
    }
    let held = store.jobs_in_progress();
    let full = rss_bytes();
    println!(
        "baseline RSS            {:>8.1} MiB",
        baseline as f64 / 1048576.0
    );
    println!(
        "RSS with {held} jobs     {:>8.1} MiB ({keys} keys × 5)",
        full as f64 / 1048576.0
    );
    println!(
        "bytes per job           {:>8.1}",
        (full - baseline) as f64 / held as f64
    );
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "jobs") {
        args.next();
        jobs(args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000));
        return;
    }
    let keys: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let clock = ManualClock::at_secs(1_777_996_810);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let minute = Rule::Fixed(Fixed {
        requests: nz(100),
        window: Window::Span(60 * SECOND),
    });
    let day = Rule::Fixed(Fixed {
        requests: nz(10_000),
        window: Window::Span(86_400 * SECOND),
    });
    let baseline = rss_bytes();
    let held_before = HELD.load(Ordering::Relaxed);
    let fill = |from: u64| {
        for i in from..from + keys {
            let s = key(i);
            let checks = [
                LimitCheck {
                    subject: s.clone(),
                    group: s.clone(),
                    counter: 1,
                    rule: &minute,
                    queue: None,
                    pinned: false,
                    shadow: false,
                    units: 1,
                },
                LimitCheck {
                    subject: s.clone(),
                    group: s,
                    counter: 2,
                    rule: &day,
                    queue: None,
                    pinned: false,
                    shadow: false,
                    units: 1,
                },
            ];
            store.decide_at(&checks, clock.now());
        }
    };
    fill(0);
    let full = rss_bytes();
    let live = store.live_counters() as u64;
    println!(
        "baseline RSS            {:>8.1} MiB",
        baseline as f64 / 1048576.0
    );
    println!(
        "RSS with {keys} keys × 2 {:>8.1} MiB ({live} live counters)",
        full as f64 / 1048576.0
    );
    println!(
        "bytes per live counter  {:>8.1} (RSS)",
        (full - baseline) as f64 / live as f64
    );
    println!(
        "heap bytes per counter  {:>8.1} (requested from the allocator: map slots, subject entries)",
        (HELD.load(Ordering::Relaxed) - held_before) as f64 / live as f64
    );
    clock.advance_secs(86_400);
    let dropped = store.evict_expired();
    let after = rss_bytes();
    println!(
        "after both windows pass {:>8.1} MiB ({dropped} counters evicted, {} live)",
        after as f64 / 1048576.0,
        store.live_counters()
    );
    // A new million keys reuse the freed memory: RSS follows live keys, not every key ever seen.
    fill(keys);
    println!(
        "{keys} new keys × 2       {:>8.1} MiB ({} live counters)",
        rss_bytes() as f64 / 1048576.0,
        store.live_counters()
    );
}
