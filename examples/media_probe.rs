//! How long reading one file's duration takes (what `max_duration_by_type`
//! adds to an upload, besides holding it): `cargo run --release --example
//! media_probe -- FILE [RUNS]`. Prints the duration found and the median
//! time over RUNS (default 20).

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: media_probe FILE [RUNS]");
        std::process::exit(2);
    };
    let runs: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(20);
    let file = match std::fs::read(&path) {
        Ok(bytes) => bytes::Bytes::from(bytes),
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let mut times = Vec::with_capacity(runs);
    let mut found = Err(String::new());
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        found = turnstile::content::media::duration_of(file.clone());
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "{path}: {:.1} MB, duration {found:?} s, median {:.2} ms over {} runs",
        file.len() as f64 / 1e6,
        median.as_secs_f64() * 1000.0,
        times.len()
    );
}
