use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::limits::credits::{Credits, Refill};
use crate::store::journal::{Change, Entry, Origin};

const SEC: Nanos = 1_000_000_000;
const CREDITS: u64 = 7;
const QUOTA: u64 = 8;

fn ledger(dir: &std::path::Path, durable: Durable) -> Ledger {
    let settings = LedgerSettings {
        path: dir.join("ledger.db"),
        durable,
        retain: Duration::from_secs(86_400),
        sinks: Vec::new(),
    };
    let l = Ledger::open(settings, "test", Arc::new(Metrics::new())).unwrap();
    let alerts: Vec<Alert> = [("20%", Level::Percent(2000)), ("0", Level::Units(0))]
        .into_iter()
        .map(|(t, level)| Alert {
            text: t.into(),
            level,
        })
        .collect();
    let mut limits = HashMap::new();
    limits.insert(
        CREDITS,
        LimitInfo {
            name: "credits".into(),
            rule: crate::limits::Rule::Credits(Credits {
                grant: 100,
                refill: Refill::Never,
            }),
            alerts: Arc::from(alerts),
        },
    );
    l.set_limits(limits);
    l
}

fn entry<'a>(subject: &'a Subject, change: Change, amount: i64, balance: i64) -> Entry<'a> {
    Entry {
        change,
        subject,
        counter: CREDITS,
        grant: 100,
        amount,
        balance: Some(balance),
        job_id: None,
        at: 1_700_000_000 * SEC,
        origin: None,
    }
}

fn all(l: &Ledger) -> Vec<serde_json::Value> {
    let conn = db::open(&l.settings().path).unwrap();
    db::after(&conn, 0, 1000)
        .unwrap()
        .into_iter()
        .map(|(_, b)| serde_json::from_str(&b).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_entry_is_on_disk_when_durable_returns() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Sync);
    let s = Subject::Account("acme".into());
    let origin = Origin {
        request_id: "req-1".into(),
        route: "flat".into(),
        key_fp: "9f8cfdb1".into(),
    };
    for i in 0..20 {
        let mut e = entry(&s, Change::Charged, -1, 99 - i);
        e.origin = Some(&origin);
        let seq = l.journal().write(e);
        l.durable(seq).await.unwrap();
        // Another connection sees it at once: it is committed.
        assert_eq!(all(&l).len() as i64, i + 1);
    }
    let e = &all(&l)[0];
    assert_eq!(e["type"], "credits.charged");
    assert_eq!(e["request_id"], "req-1");
    assert_eq!(e["route"], "flat");
    assert_eq!(e["key_fp"], "9f8cfdb1");
    assert_eq!(e["limit"], "credits");
    assert_eq!(e["account"], "acme");
    assert_eq!(e["time"], "2023-11-14T22:13:20.000Z");
    l.close();
}

#[test]
fn alerts_fire_when_crossed_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Interval);
    let s = Subject::Account("acme".into());
    let j = l.journal();
    j.write(entry(&s, Change::Charged, -70, 30));
    j.write(entry(&s, Change::Charged, -10, 20)); // 20% of 100: fires
    j.write(entry(&s, Change::Added, 50, 70));
    j.write(entry(&s, Change::Charged, -60, 10)); // crossed again: not again
    j.write(entry(&s, Change::Settled, -15, -5)); // 0: fires
    l.close();
    let low: Vec<(i64, String)> = all(&l)
        .iter()
        .filter(|e| e["type"] == "credits.low")
        .map(|e| {
            (
                e["balance"].as_i64().unwrap(),
                e["threshold"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(low, vec![(20, "20%".into()), (-5, "0".into())]);
}

#[test]
fn a_quota_is_exhausted_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Interval);
    let s = Subject::Account("acme".into());
    let j = l.journal();
    let refused = |at: Nanos| Entry {
        change: Change::QuotaExhausted { until: 60 * SEC },
        subject: &s,
        counter: QUOTA,
        grant: 0,
        amount: 0,
        balance: None,
        job_id: None,
        at,
        origin: None,
    };
    assert!(j.write(refused(10 * SEC)) > 0);
    assert_eq!(j.write(refused(20 * SEC)), 0, "the same window");
    let next = Entry {
        change: Change::QuotaExhausted { until: 120 * SEC },
        ..refused(61 * SEC)
    };
    assert!(j.write(next) > 0, "the next window");
    l.close();
    assert_eq!(all(&l).len(), 2);
}

#[test]
fn positions_continue_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = Subject::Account("acme".into());
    let l = ledger(dir.path(), Durable::Interval);
    let first = l.journal().write(entry(&s, Change::Charged, -1, 99));
    l.close();
    let l = ledger(dir.path(), Durable::Interval);
    let second = l.journal().write(entry(&s, Change::Charged, -1, 98));
    l.close();
    assert_eq!(second, first + 1);
    // Written with an earlier clock after the restart: still sorted after.
    let l = ledger(dir.path(), Durable::Interval);
    let mut early = entry(&s, Change::Charged, -1, 97);
    early.at -= 3600 * SEC;
    l.journal().write(early);
    l.close();
    let ids: Vec<String> = all(&l)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
}

#[tokio::test]
async fn a_failing_disk_refuses_the_wait_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Sync);
    let s = Subject::Account("acme".into());
    let seq = l.journal().write(entry(&s, Change::Charged, -1, 99));
    l.durable(seq).await.unwrap();
    // The writer reports a failed commit: whoever waits is refused.
    l.inner.written.send_modify(|w| w.failing = true);
    let next = seq + 1;
    assert!(matches!(
        l.durable(next).await,
        Err(LedgerError::NotDurable)
    ));
    // Nothing to wait for never waits.
    assert!(l.durable(0).await.is_ok());
    l.close();
}

#[tokio::test]
async fn interval_does_not_wait_but_refuses_while_the_disk_fails() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Interval);
    let s = Subject::Account("acme".into());
    let seq = l.journal().write(entry(&s, Change::Charged, -1, 99));
    l.durable(seq).await.unwrap();
    l.inner.written.send_modify(|w| w.failing = true);
    let seq = l.journal().write(entry(&s, Change::Charged, -1, 98));
    assert!(matches!(l.durable(seq).await, Err(LedgerError::NotDurable)));
    l.close();
}

#[test]
fn retention_drops_delivered_old_events_but_each_balances_latest() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), Durable::Interval);
    let (a, b) = (Subject::Account("a".into()), Subject::Account("b".into()));
    let j = l.journal();
    fn at(e: Entry<'_>, secs: u64) -> Entry<'_> {
        Entry {
            at: secs * SEC,
            ..e
        }
    }
    j.write(at(entry(&a, Change::Charged, -1, 99), 100));
    j.write(at(entry(&a, Change::Charged, -1, 98), 200));
    j.write(at(entry(&b, Change::Charged, -1, 99), 300));
    j.write(at(entry(&a, Change::Charged, -1, 97), 5000));
    l.close();
    let conn = db::open(&l.settings().path).unwrap();
    // A sink that delivered only the first two: nothing past it goes.
    db::ack(&conn, "billing", 2).unwrap();
    let sinks = vec!["billing".to_owned()];
    assert_eq!(db::forget(&conn, 1_000 * 1000, &sinks).unwrap(), 2);
    db::ack(&conn, "billing", 4).unwrap();
    // Everything delivered: b's only event stays (its balance's latest).
    assert_eq!(db::forget(&conn, 1_000 * 1000, &sinks).unwrap(), 0);
    let left: Vec<i64> = db::after(&conn, 0, 10)
        .unwrap()
        .iter()
        .map(|(_, body)| {
            serde_json::from_str::<serde_json::Value>(body).unwrap()["balance"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(left, vec![99, 97]);
}
