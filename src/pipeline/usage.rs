//! A key's or an account's counters as the admin API (`GET /v1/usage`,
//! resets, credits) and `[server] usage_path` show them: which counters a
//! key's plan has ([`rows_of`]), and their figures read from the store
//! ([`render_rows`]). Keys are found in the keys file, among the runtime
//! keys, or on the default plan.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::clock::{Nanos, SECOND};
use crate::config::Policy;
use crate::keys::identity::{Fingerprint, KeyDigest, UnknownKey};
use crate::keys::runtime::KeyCache;
use crate::limits::{LimitSpec, Per, Rule};
use crate::store::{BalanceChange, CounterStore, LimitCheck, OwnedCheck, StoreError, Subject};

/// The next refill of a credits limit after `now` (Unix seconds), or null.
pub fn next_refill(spec: &LimitSpec, now: Nanos) -> Value {
    match spec.rule {
        Rule::Credits(c) => c
            .refill
            .next_after(now)
            .map_or(Value::Null, |at| json!(at.div_ceil(SECOND))),
        _ => Value::Null,
    }
}

/// One key's plan and counters: `{"key","account","plan","counters"}`.
pub async fn of_key(
    store: &CounterStore,
    policy: &Policy,
    key: &KeyView,
) -> Result<Value, StoreError> {
    let fp = Fingerprint::of(&key.digest);
    let mut rows = Vec::new();
    rows_of(policy, key, None, &mut rows);
    let counters = render_rows(store, &rows).await?;
    Ok(json!({
        "key": fp.as_str(),
        "account": key.account.as_deref().unwrap_or(fp.as_str()),
        "plan": policy.plans.get(key.plan).map(|p| &*p.name),
        "counters": counters,
    }))
}

/// One key as the policy sees it: account and plan.
#[derive(Debug, Clone)]
pub struct KeyView {
    /// The key's SHA-256.
    pub digest: KeyDigest,
    /// Its named account (`None`: the key is its own account).
    pub account: Option<Arc<str>>,
    /// Its plan's index.
    pub plan: usize,
}

/// The key with `digest`: in the keys file, among the runtime keys, or on
/// the default plan if unknown keys get one.
pub fn key_view(policy: &Policy, runtime: &KeyCache, digest: KeyDigest) -> Option<KeyView> {
    let id = &policy.identity;
    if let Some(k) = runtime
        .get(&digest)
        .filter(|_| id.keys.as_ref().and_then(|k| k.get(&digest)).is_none())
    {
        return Some(KeyView {
            digest,
            account: Some(k.account),
            plan: policy.plan_index(&k.plan)?,
        });
    }
    let registry = id.keys.is_some() || id.key_store.is_some();
    match id.keys.as_ref().and_then(|k| k.get(&digest)) {
        Some(rec) => Some(KeyView {
            digest,
            account: rec.account.clone(),
            plan: rec.plan,
        }),
        None if !registry || id.unknown_key == UnknownKey::Default => {
            id.default_plan.map(|plan| KeyView {
                digest,
                account: None,
                plan,
            })
        }
        None => None,
    }
}

/// Every key of `account`: the keys file's, then the runtime ones.
pub fn account_keys(policy: &Policy, runtime: &KeyCache, account: &str) -> Vec<KeyView> {
    let mut out: Vec<KeyView> = policy
        .identity
        .keys
        .iter()
        .flat_map(|keys| keys.iter())
        .filter(|(_, rec)| rec.account.as_deref() == Some(account))
        .map(|(d, rec)| KeyView {
            digest: *d,
            account: rec.account.clone(),
            plan: rec.plan,
        })
        .collect();
    out.sort_by_key(|k| k.digest);
    let file = out.len();
    for (digest, k) in runtime.of_account(account) {
        let in_file = out[..file].iter().any(|v| v.digest == digest);
        if let (false, Some(plan)) = (in_file, policy.plan_index(&k.plan)) {
            out.push(KeyView {
                digest,
                account: Some(k.account),
                plan,
            });
        }
    }
    out
}

/// One counter of a key's plan, ready to be read or reset.
pub struct Row<'p> {
    /// The limit.
    pub spec: &'p LimitSpec,
    /// Its route, for `per_route` limits.
    pub route: Option<String>,
    /// The key, for a per-key counter of a key with an account.
    pub per_key: Option<Fingerprint>,
    /// The counter.
    pub check: LimitCheck<'p>,
}

/// Every counter of `key`'s plan: per limit, one per route when `per_route`.
/// `only` restricts to per-key or per-account limits.
pub fn rows_of<'p>(policy: &'p Policy, key: &KeyView, only: Option<Per>, out: &mut Vec<Row<'p>>) {
    let Some(plan) = policy.plans.get(key.plan) else {
        return;
    };
    let mut seen = Vec::new();
    for (route_index, applied) in plan.by_route.iter().enumerate() {
        for a in applied {
            if seen.contains(&a.counter) {
                continue;
            }
            seen.push(a.counter);
            let spec = &plan.limits[a.limit];
            // Without a named account, per-account limits count per key.
            let per = if key.account.is_none() {
                Per::Key
            } else {
                spec.per
            };
            if only.is_some_and(|o| o != per) {
                continue;
            }
            let subject = Subject::counted(spec.per, &key.digest, key.account.as_ref());
            let per_key = (matches!(subject, Subject::Key(_)) && key.account.is_some())
                .then(|| Fingerprint::of(&key.digest));
            let group = Subject::group(&key.digest, key.account.as_ref());
            out.push(Row {
                spec,
                route: spec
                    .per_route
                    .then(|| policy.routes[route_index].name.to_string()),
                per_key,
                check: LimitCheck {
                    subject,
                    group,
                    counter: a.counter,
                    rule: &spec.rule,
                    queue: None,
                    pinned: true,
                    shadow: false,
                    units: 1,
                },
            });
        }
    }
}

impl Row<'_> {
    /// The row's counter as a jobs counter, if it is one.
    pub fn job_counter(&self) -> Option<OwnedCheck> {
        matches!(self.spec.rule, Rule::Jobs(_)).then(|| OwnedCheck::of(&self.check))
    }

    /// The row's counter as a credits balance, if it is one.
    pub fn balance_check(&self) -> Option<OwnedCheck> {
        matches!(self.spec.rule, Rule::Credits(_)).then(|| OwnedCheck::of(&self.check))
    }
}

/// The jobs in progress of a jobs row, as the usage output lists them.
async fn jobs_of(store: &CounterStore, row: &Row<'_>) -> Result<Option<Value>, StoreError> {
    let Some(counter) = row.job_counter() else {
        return Ok(None);
    };
    let jobs = store.jobs(&counter).await?;
    Ok(Some(Value::Array(
        jobs.iter()
            .map(|j| {
                // A job whose submission's answer could not be read has no id.
                let id = (!crate::jobs::is_unreadable(&j.id)).then_some(&*j.id);
                json!({
                    "id": id,
                    "started": j.started / SECOND,
                    "expires": j.expires.div_ceil(SECOND),
                })
            })
            .collect(),
    )))
}

/// The rows as JSON, with their figures read from the store.
pub async fn render_rows(store: &CounterStore, rows: &[Row<'_>]) -> Result<Vec<Value>, StoreError> {
    let checks: Vec<LimitCheck<'_>> = rows.iter().map(|r| r.check.clone()).collect();
    let verdicts = store.usage(&checks).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut balances = std::collections::HashMap::new();
    for row in rows {
        jobs.push(jobs_of(store, row).await?);
        if let Some(owned) = row.balance_check() {
            let balance = store.balance(&owned, BalanceChange::Read).await?;
            balances.insert(row.check.counter, balance);
        }
    }
    let now = store.in_process().now();
    Ok(rows
        .iter()
        .zip(verdicts)
        .zip(jobs)
        .map(|((row, v), jobs)| {
            let mut entry = json!({
                "name": &*row.spec.name,
                "route": row.route,
                "kind": row.spec.rule.kind_name(),
                "limit": row.spec.rule.shown_limit(),
            });
            if let Some(fp) = &row.per_key {
                entry["key"] = json!(fp.as_str());
            }
            if let Rule::Jobs(_) = row.spec.rule {
                entry["in_progress"] = json!(v.used);
                entry["jobs"] = jobs.unwrap_or_default();
            } else if let Some(balance) = balances.get(&row.check.counter) {
                entry["balance"] = json!(balance);
                entry["next_refill"] = next_refill(row.spec, now);
            } else if row.spec.rule.holds_slot() {
                entry["in_flight"] = json!(v.used);
            } else {
                entry["used"] = json!(v.used);
                entry["remaining"] = json!(v.remaining);
                entry["reset"] = json!(v.reset_at.div_ceil(SECOND));
            }
            entry
        })
        .collect())
}
