//! `make bench` (issue 3 figures): invalidation latency, commit to entry
//! gone, and PING latency while a table of one million entries is dropped.
//!
//! Starts its own PostgreSQL and Redis through the integration-test harness.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

const ROUNDS: usize = 300;
const ENTRIES: usize = 1_000_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        *v.last().unwrap_or(&f64::NAN),
    )
}

/// Commit (the UPDATE's autocommit returns) to the entry being gone.
fn invalidation_latency(pg: &PgServer, r: &RedisServer) -> Vec<f64> {
    pg.execute(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/pgcache.sql")).unwrap(),
    );
    pg.execute("SELECT pgcache_watch('users')");
    let mut c = r.con();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(pg.client());
    let mut out = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let id = 1 + (i % 5) as i32;
        let key = format!(r#"pg_cache:users:{{"id":{id}}}"#);
        read(&mut c, "users", &format!(r#"{{"id":{id}}}"#)).unwrap();
        assert!(exists(&mut c, &key));
        rt.block_on(client.execute("UPDATE users SET name = name || '' WHERE id = $1", &[&id]))
            .unwrap();
        let committed = Instant::now();
        while exists(&mut c, &key) {
            assert!(
                committed.elapsed() < Duration::from_secs(10),
                "never invalidated"
            );
        }
        out.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    out
}

/// PING round trips (ms) on one connection for as long as `busy` runs.
fn ping_during(r: &RedisServer, busy: impl FnOnce() + Send) -> Vec<f64> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            let mut c = r.con();
            let mut v = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert!(ping(&mut c));
                v.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            v
        });
        busy();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pinger.join().unwrap()
    })
}

fn main() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["events", "none"]);

    let (p50, p99, max) = summary(invalidation_latency(&pg, &r));
    println!("invalidation latency, commit to entry gone ({ROUNDS} updates): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");

    // One million entries of `users` (written directly: same keys, same shape).
    let mut c = r.con();
    let value = pg.row_json_text("users", "id = 1").unwrap();
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!(r#"pg_cache:users:{{"id":{}}}"#, 1_000_000 + i))
                .arg(&value)
                .ignore();
        }
        pipe.query::<()>(&mut c).unwrap();
    }
    let idle = ping_during(&r, || std::thread::sleep(Duration::from_secs(2)));
    let mut dropped = 0i64;
    let mut took = Duration::ZERO;
    let busy = ping_during(&r, || {
        let mut c = r.con();
        let t = Instant::now();
        dropped = redis::cmd("PGCACHE.INVALIDATE_TABLE")
            .arg("users")
            .query(&mut c)
            .unwrap();
        took = t.elapsed();
    });
    let (i50, i99, imax) = summary(idle);
    let (b50, b99, bmax) = summary(busy);
    println!(
        "INVALIDATE_TABLE of {dropped} entries took {:.2} s",
        took.as_secs_f64()
    );
    println!("PING idle:                 p50 {i50:.3} ms, p99 {i99:.3} ms, max {imax:.3} ms");
    println!("PING while dropping them:  p50 {b50:.3} ms, p99 {b99:.3} ms, max {bmax:.3} ms (p99 ratio {:.2})", b99 / i99);
}
