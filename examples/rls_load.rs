//! A load generator for Envoy's rate limit service (what `wrk` is for the
//! HTTP paths), used by `bench/decision.sh`: `CONNS` HTTP/2 connections,
//! `STREAMS` calls in flight on each, API keys round-robin over `KEYS`,
//! for `SECONDS`; prints "calls/s p99_ms non_ok".
//!
//! cargo run --release --example rls_load -- 127.0.0.1:8082 [KEYS] [CONNS] [STREAMS] [SECONDS]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstile::decision::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use turnstile::decision::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use turnstile::decision::proto::envoy::service::ratelimit::v3 as rls;

type Client = rls::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>;

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn request(key: usize) -> rls::RateLimitRequest {
    let entry = |k: &str, v: String| Entry {
        key: k.into(),
        value: v,
    };
    rls::RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                entry("api_key", format!("bench-key-{key}")),
                entry("route", "submit".into()),
            ],
            limit: None,
            hits_addend: None,
        }],
        hits_addend: 1,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .ok_or("usage: rls_load ADDR [KEYS] [CONNS] [STREAMS] [SECONDS]")?;
    let keys = arg(2, 10_000) as usize;
    let (conns, streams) = (arg(3, 4), arg(4, 16));
    let until = Instant::now() + Duration::from_secs(arg(5, 8));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let client = Client::connect(format!("http://{addr}")).await?;
        for _ in 0..streams {
            let (mut client, next) = (client.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let (mut took, mut bad) = (Vec::new(), 0u64);
                while Instant::now() < until {
                    let key = next.fetch_add(1, Ordering::Relaxed) % keys;
                    let sent = Instant::now();
                    match client.should_rate_limit(request(key)).await {
                        Ok(r)
                            if r.get_ref().overall_code
                                == rls::rate_limit_response::Code::Ok as i32 => {}
                        _ => bad += 1,
                    }
                    took.push(sent.elapsed().as_micros() as u64);
                }
                (took, bad)
            }));
        }
    }
    let started = Instant::now();
    let (mut all, mut bad) = (Vec::new(), 0);
    for t in tasks {
        let (took, b) = t.await?;
        all.extend(took);
        bad += b;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    all.sort_unstable();
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or(0);
    println!(
        "{:.0} {:.3} {bad}",
        all.len() as f64 / secs,
        p99 as f64 / 1000.0
    );
    Ok(())
}
