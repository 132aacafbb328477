use super::*;
use crate::clock::{ManualClock, SECOND};
use crate::limits::nz;
use crate::limits::{Concurrency, Fixed, Rolling, Window};

fn key(n: u8) -> Subject {
    Subject::Key([n; 16])
}

#[test]
fn all_or_nothing_across_limits_and_subjects() {
    let clock = ManualClock::at_secs(1_000_020);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let minute = Rule::Fixed(Fixed {
        requests: nz(3),
        window: Window::Span(60 * SECOND),
    });
    let daily = Rule::Fixed(Fixed {
        requests: nz(4),
        window: Window::Span(86_400 * SECOND),
    });
    let checks = |who: Subject| {
        vec![
            LimitCheck {
                group: key(0),
                subject: who.clone(),
                counter: 1,
                rule: &minute,
                queue: None,
                pinned: false,
                shadow: false,
                units: 1,
            },
            LimitCheck {
                group: key(0),
                subject: Subject::Account("acme".into()),
                counter: 2,
                rule: &daily,
                queue: None,
                pinned: false,
                shadow: false,
                units: 1,
            },
        ]
    };
    let now = clock.now();
    for _ in 0..3 {
        assert!(store.decide_at(&checks(key(1)), now).admitted);
    }
    // Key 1's minute refuses: the account's daily must not be counted.
    let d = store.decide_at(&checks(key(1)), now);
    assert!(!d.admitted);
    assert_eq!((d.verdicts[1].used, d.verdicts[1].remaining), (3, 1));
    // Another key of the account takes the last daily slot, then the daily refuses.
    assert!(store.decide_at(&checks(key(2)), now).admitted);
    let d = store.decide_at(&checks(key(2)), now);
    assert!(!d.admitted && d.verdicts[0].admitted && !d.verdicts[1].admitted);
}

#[test]
fn idle_counters_are_evicted_after_their_window() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let minute = Rule::Fixed(Fixed {
        requests: nz(3),
        window: Window::Span(60 * SECOND),
    });
    for n in 0..100 {
        let c = [LimitCheck {
            group: key(0),
            subject: key(n),
            counter: 1,
            rule: &minute,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        }];
        store.decide_at(&c, clock.now());
    }
    assert_eq!((store.subjects(), store.live_counters()), (100, 100));
    assert_eq!(store.evict_expired(), 0);
    clock.advance_secs(20); // the minute ends at 1_000_020
    assert_eq!(store.evict_expired(), 100);
    assert_eq!((store.subjects(), store.live_counters()), (0, 0));
}

#[test]
fn concurrent_threads_never_over_admit() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = Arc::new(MemoryStore::new(Arc::new(clock.clone())));
    let rule = Rule::Rolling(Rolling {
        requests: nz(97),
        window: 60 * SECOND,
    });
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    let c = [LimitCheck {
                        group: key(0),
                        subject: key(7),
                        counter: 9,
                        rule: &rule,
                        queue: None,
                        pinned: false,
                        shadow: false,
                        units: 1,
                    }];
                    if store.decide_at(&c, clock.now()).admitted {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    // Eviction racing with decisions must not lose counts.
                    store.evict_expired();
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 97);
}

#[tokio::test]
async fn a_panicking_exchange_gives_its_slot_back() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let rule = Rule::Concurrency(Concurrency {
        max: nz(1),
        retry_after: SECOND,
    });
    let check = || {
        [LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 5,
            rule: &rule,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        }]
    };
    let d = store.decide(&check(), None).await.unwrap();
    assert!(d.admitted && d.lease.len() == 1);
    let lease = d.lease;
    let task = tokio::spawn(async move {
        let _lease = lease;
        panic!("boom inside the exchange");
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(store.slots_in_flight(), 0);
    assert!(store.decide(&check(), None).await.unwrap().admitted);
}

#[tokio::test]
async fn a_released_slot_goes_to_the_oldest_waiter_not_a_newcomer() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let rule = Rule::Concurrency(Concurrency {
        max: nz(1),
        retry_after: SECOND,
    });
    let queue = Some(crate::store::QueueSpec {
        max_wait: std::time::Duration::from_secs(30),
        max_len: 10,
    });
    let held = store
        .decide(
            &[LimitCheck {
                group: key(0),
                subject: key(1),
                counter: 5,
                rule: &rule,
                queue,
                pinned: false,
                shadow: false,
                units: 1,
            }],
            None,
        )
        .await
        .unwrap();
    assert!(held.admitted);
    let s2 = store.clone();
    let waiter = tokio::spawn(async move {
        let rule = Rule::Concurrency(Concurrency {
            max: nz(1),
            retry_after: SECOND,
        });
        s2.decide(
            &[LimitCheck {
                group: key(0),
                subject: key(1),
                counter: 5,
                rule: &rule,
                queue,
                pinned: false,
                shadow: false,
                units: 1,
            }],
            None,
        )
        .await
        .unwrap()
    });
    while store.queued() == 0 {
        tokio::task::yield_now().await;
    }
    drop(held.lease);
    // The slot was handed over: a newcomer without a queue is refused.
    let newcomer = store.decide_at(
        &[LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 5,
            rule: &rule,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        }],
        clock.now(),
    );
    let served = waiter.await.unwrap();
    assert!(served.admitted);
    assert!(!newcomer.admitted);
    assert_eq!(store.slots_in_flight(), 1);
    drop(served);
    assert_eq!(store.slots_in_flight(), 0);
}

#[test]
fn snapshots_restore_live_counters_and_drop_expired_ones() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let minute = Rule::Fixed(Fixed {
        requests: nz(3),
        window: Window::Span(60 * SECOND),
    });
    let daily = Rule::Fixed(Fixed {
        requests: nz(3),
        window: Window::Span(86_400 * SECOND),
    });
    let slots = Rule::Concurrency(Concurrency {
        max: nz(1),
        retry_after: SECOND,
    });
    let checks = [
        LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 1,
            rule: &minute,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        },
        LimitCheck {
            group: key(0),
            subject: Subject::Account("acme".into()),
            counter: 2,
            rule: &daily,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        },
        LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 3,
            rule: &slots,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        },
    ];
    let held = store.decide_at(&checks, clock.now());
    assert!(held.admitted);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.bin");
    assert_eq!(
        store.save_snapshot(&path).unwrap(),
        2,
        "concurrency slots are not saved"
    );

    clock.advance_secs(30); // the minute (ends at 1_000_020) has passed, the day has not
    let restored = MemoryStore::new(Arc::new(clock.clone()));
    assert_eq!(restored.load_snapshot(&path).unwrap(), 1);
    assert_eq!(
        restored.peek(&Subject::Account("acme".into()), 2),
        Some(CounterState::Fixed {
            window_start: 950_400 * SECOND,
            count: 1
        })
    );
    assert_eq!(restored.peek(&key(1), 1), None);
    let d = restored.decide_at(&checks, clock.now());
    assert!(
        d.admitted,
        "the slot held by the old process is not carried over"
    );
    assert_eq!(d.verdicts[1].remaining, 1);
}

#[test]
fn reset_and_retain_keep_slots_in_use() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    let minute = Rule::Fixed(Fixed {
        requests: nz(3),
        window: Window::Span(60 * SECOND),
    });
    let slots = Rule::Concurrency(Concurrency {
        max: nz(1),
        retry_after: SECOND,
    });
    let checks = [
        LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 1,
            rule: &minute,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        },
        LimitCheck {
            group: key(0),
            subject: key(1),
            counter: 3,
            rule: &slots,
            queue: None,
            pinned: false,
            shadow: false,
            units: 1,
        },
    ];
    let held = store.decide_at(&checks, clock.now());
    assert_eq!(
        store.reset_counters(&checks),
        1,
        "the window counter, not the slot"
    );
    assert_eq!(
        store.retain_counters(|_| false),
        0,
        "a slot in use survives a reload that removed its limit"
    );
    assert_eq!(store.slots_in_flight(), 1);
    drop(held);
    assert_eq!(store.slots_in_flight(), 0);
    assert_eq!(store.retain_counters(|id| id == 1), 1);
}

#[test]
fn a_flood_of_distinct_keys_stays_under_max_counters_keeping_registered_keys() {
    let clock = ManualClock::at_secs(1_000_000);
    let store = MemoryStore::new(Arc::new(clock.clone()));
    store.set_max_counters(10_000);
    let daily = Rule::Fixed(Fixed {
        requests: nz(5),
        window: Window::Span(86_400 * SECOND),
    });
    let minute = Rule::Fixed(Fixed {
        requests: nz(5),
        window: Window::Span(60 * SECOND),
    });
    let check = |subject: Subject, rule, pinned| LimitCheck {
        group: subject.clone(),
        subject,
        counter: 1,
        rule,
        queue: None,
        pinned,
        shadow: false,
        units: 1,
    };
    let paying = Subject::Account("paying".into());
    assert!(
        store
            .decide_at(&[check(paying.clone(), &daily, true)], clock.now())
            .admitted
    );
    let subject = |i: u32| {
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&i.to_le_bytes());
        Subject::Key(d)
    };
    for i in 0..100_000u32 {
        // Half of the flood holds minute windows (sooner to expire).
        let rule = if i % 2 == 0 { &minute } else { &daily };
        store.decide_at(&[check(subject(i), rule, false)], clock.now());
        assert!(store.live_counters() <= 10_000);
    }
    assert!(store.evicted_counters() >= 90_000);
    // The registered subject's count survived every pass.
    assert!(matches!(
        store.peek(&paying, 1),
        Some(CounterState::Fixed { count: 1, .. })
    ));
    // Among the flood, the longest-lived windows were kept longest.
    let recent_daily = (99_000..100_000)
        .filter(|i| i % 2 == 1)
        .filter(|&i| store.peek(&subject(i), 1).is_some())
        .count();
    assert!(recent_daily > 0);
}

#[test]
fn a_subject_with_two_counters_fits_in_one_small_allocation() {
    // The figure behind "bytes per live counter" (docs/performance.md): two counters
    // inline, the queues of queued limits out of line.
    assert_eq!(std::mem::size_of::<Counter>(), 32);
    assert_eq!(std::mem::size_of::<SubjectCounters>(), 88);
}
