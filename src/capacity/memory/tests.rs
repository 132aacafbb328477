use std::sync::Arc;
use std::time::Duration;

use super::MemoryPools;
use crate::capacity::{Asker, FairPer, PoolSpec, Refused};
use crate::clock::ManualClock;
use crate::store::{BindJob, Subject};

fn spec(max: u32, max_wait_ms: u64) -> Arc<PoolSpec> {
    Arc::new(PoolSpec {
        name: "gpu".into(),
        max,
        max_wait: Duration::from_millis(max_wait_ms),
        max_queue: 100,
        weights: vec![("premium".into(), 4), ("pro".into(), 2)],
        reserve: Vec::new(),
        fair_per: FairPer::Key,
        retry_after: Duration::from_secs(5),
        max_duration: Duration::from_secs(60),
        routes: vec![0],
        plans: vec!["free".into(), "premium".into(), "pro".into()],
    })
}

fn asker(plan: &str, who: u8) -> Asker {
    let s = Subject::Key([who; 16]);
    Asker {
        plan: plan.into(),
        fair: s.clone(),
        owner: s,
    }
}

fn pools() -> (MemoryPools, ManualClock) {
    let clock = ManualClock::new(1_000_000_000);
    (MemoryPools::new(Arc::new(clock.clone())), clock)
}

fn in_use(p: &MemoryPools) -> u64 {
    p.usage()[0].in_use
}

fn waiting(p: &MemoryPools) -> u64 {
    p.usage()[0].waiting.iter().map(|(_, n)| n).sum()
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gets_the_slot_freed() {
    let (p, _) = pools();
    let spec = spec(2, 30_000);
    p.configure(std::slice::from_ref(&spec));
    let a = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    let _b = p.acquire(&spec, &asker("free", 2)).await.unwrap();
    let p = Arc::new(p);
    let (p2, s2) = (p.clone(), spec.clone());
    let third = tokio::spawn(async move { p2.acquire(&s2, &asker("free", 3)).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(waiting(&p), 1);
    drop(a);
    assert!(third.await.unwrap());
    assert_eq!(in_use(&p), 1, "the third's slot was dropped with its task");
}

#[tokio::test(start_paused = true)]
async fn out_of_time_or_room_refuses_and_leaks_nothing() {
    let (p, _) = pools();
    let spec = spec(1, 500);
    let _a = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    match p.acquire(&spec, &asker("free", 2)).await {
        Err(Refused::Busy(b)) => assert_eq!((b.max, b.retry_after), (1, 5)),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("admitted"),
    }
    assert_eq!((in_use(&p), waiting(&p)), (1, 0));
    let now = spec_with(&spec, |s| s.max_wait = Duration::ZERO);
    assert!(matches!(
        p.acquire(&now, &asker("free", 2)).await,
        Err(Refused::Busy(_))
    ));
    let full = spec_with(&spec, |s| s.max_queue = 0);
    assert!(matches!(
        p.acquire(&full, &asker("free", 2)).await,
        Err(Refused::Busy(_))
    ));
}

fn spec_with(spec: &Arc<PoolSpec>, f: impl FnOnce(&mut PoolSpec)) -> Arc<PoolSpec> {
    let mut s = (**spec).clone();
    f(&mut s);
    Arc::new(s)
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_is_not_served() {
    let (p, _) = pools();
    let spec = spec(1, 30_000);
    let a = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    let gone = tokio::time::timeout(
        Duration::from_millis(5),
        p.acquire(&spec, &asker("free", 2)),
    )
    .await;
    assert!(gone.is_err(), "still waiting when dropped");
    assert_eq!(waiting(&p), 0, "the dropped waiter left the queue");
    drop(a);
    assert_eq!(in_use(&p), 0, "no slot went to the waiter that left");
}

#[tokio::test(start_paused = true)]
async fn freed_slots_follow_the_weights() {
    let (p, _) = pools();
    let spec = spec_with(&spec(1, 600_000), |s| s.max_queue = 1000);
    p.configure(std::slice::from_ref(&spec));
    let p = Arc::new(p);
    let first = p.acquire(&spec, &asker("free", 0)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (plan, n) in [("premium", 40), ("pro", 40), ("free", 40)] {
        for i in 0..n {
            let (p, spec, tx) = (p.clone(), spec.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = p.acquire(&spec, &asker(plan, i)).await;
                let _ = tx.send((plan, slot.is_ok()));
                // Hold it a moment, then free it for the next.
                tokio::time::sleep(Duration::from_millis(1)).await;
            });
            tokio::task::yield_now().await;
        }
    }
    drop(first);
    let mut served = std::collections::HashMap::new();
    for _ in 0..70 {
        let (plan, ok) = rx.recv().await.unwrap();
        assert!(ok);
        *served.entry(plan).or_insert(0) += 1;
    }
    assert_eq!(served.get("premium"), Some(&40), "{served:?}");
    assert_eq!(served.get("pro"), Some(&20), "{served:?}");
    assert_eq!(served.get("free"), Some(&10), "{served:?}");
}

#[tokio::test(start_paused = true)]
async fn reserved_slots_wait_for_their_plan() {
    let (p, _) = pools();
    let spec = spec_with(&spec(2, 0), |s| s.reserve = vec![("premium".into(), 1)]);
    let _free = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    assert!(p.acquire(&spec, &asker("free", 2)).await.is_err());
    let _premium = p.acquire(&spec, &asker("premium", 3)).await.unwrap();
    assert_eq!(in_use(&p), 2);
}

#[tokio::test(start_paused = true)]
async fn a_job_holds_its_slot_until_it_ends_or_expires() {
    let (p, clock) = pools();
    let spec = spec(2, 0);
    let a = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    Box::new(a).bind("vid_1").await.unwrap();
    assert_eq!(in_use(&p), 1, "bound: held past the exchange");
    // Another caller's poll cannot end it; its own can.
    assert!(p.end_job("vid_1", Some(&Subject::Key([9; 16]))).is_empty());
    assert_eq!(p.end_job("vid_1", Some(&Subject::Key([1; 16]))).len(), 1);
    assert_eq!(in_use(&p), 0);
    let b = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    Box::new(b).bind("vid_2").await.unwrap();
    clock.advance_secs(59);
    p.sweep();
    assert_eq!(in_use(&p), 1);
    clock.advance_secs(2);
    p.sweep();
    assert_eq!(in_use(&p), 0, "max_duration frees it");
    // The same id bound twice holds one slot.
    for _ in 0..2 {
        let c = p.acquire(&spec, &asker("free", 1)).await.unwrap();
        Box::new(c).bind("vid_3").await.unwrap();
    }
    assert_eq!(in_use(&p), 1);
    assert_eq!(p.end_job("vid_3", None).len(), 1);
    assert_eq!(in_use(&p), 0);
}

#[tokio::test(start_paused = true)]
async fn a_job_slot_that_expired_goes_to_the_waiter_not_a_newcomer() {
    let (p, clock) = pools();
    let p = Arc::new(p);
    let spec = spec(1, 600_000);
    let a = p.acquire(&spec, &asker("free", 1)).await.unwrap();
    Box::new(a).bind("vid_1").await.unwrap();
    let (p2, s2) = (p.clone(), spec.clone());
    let waiter = tokio::spawn(async move { p2.acquire(&s2, &asker("free", 2)).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(waiting(&p), 1);
    clock.advance_secs(61);
    let at_once = spec_with(&spec, |s| s.max_wait = Duration::ZERO);
    assert!(
        p.acquire(&at_once, &asker("free", 3)).await.is_err(),
        "the waiter was first"
    );
    assert!(waiter.await.unwrap());
}
