//! `make bench` (issue 5 figures): pgcache against its baselines, measured in
//! the same run, alternating, median of several rounds.
//!
//! Starts its own PostgreSQL (a table `items` of one million rows) and Redis
//! servers through the integration-test harness; uses `redis-benchmark` and
//! `pgbench` where they fit and a small tokio load generator for the rest.
//! Prints one table at the end and, when `BENCHMARKS.md` has the markers
//! `<!-- suite:begin -->` / `<!-- suite:end -->`, replaces what is between them.
//! Draws the measured figures into `bench/results.png` (bench/chart.rs),
//! which that section shows. Its last section, "writes" (bench/writes.rs),
//! starts a PostgreSQL of its own for `pgbench -N` per invalidation source.

mod chart;
#[path = "../tests/common/mod.rs"]
mod common;
mod font;
mod writes;

use chart::{Bar, BarPanel, Chart, RateFigure};
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROWS: i32 = 1_000_000;
const ROUNDS: usize = 3;
/// redis-benchmark on 2 cores is noisy: more rounds for the hit figures.
const HIT_ROUNDS: usize = 5;
/// The application workload's rounds moved 0.88-1.19 within one run of 3:
/// more rounds for its median.
const APP_ROUNDS: usize = 5;
/// The chart, relative to the repository root (BENCHMARKS.md links it so).
const CHART_PATH: &str = "bench/results.png";

// ---------------------------------------------------------------------------
// small helpers

/// Per-round ratios, for the table: `[0.91 1.02 0.97]`.
fn rounds(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    format!("rounds [{}]", items.join(" "))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// xorshift64*: a fast, dependency-free generator (quality is ample here).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i32
    }
}

/// Zipf over ranks 1..=n with exponent s, by inverse CDF (rank r is id r).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> i32 {
        let u = rng.unit();
        (self.cdf.partition_point(|&c| c < u) + 1).min(self.cdf.len()) as i32
    }
    /// Smallest k such that the top k ranks carry at least `mass`.
    fn top_for_mass(&self, mass: f64) -> usize {
        self.cdf.partition_point(|&c| c < mass) + 1
    }
}

fn cmd_output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `redis-benchmark -q ...`: the "N requests per second" figure.
fn redis_benchmark(
    port: u16,
    n: u64,
    clients: u32,
    pipeline: u32,
    extra: &[&str],
    cmd: &[&str],
) -> f64 {
    let mut c = Command::new("redis-benchmark");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-n", &n.to_string(), "-c", &clients.to_string()])
        .args(["-P", &pipeline.to_string(), "-q"])
        .args(extra)
        .args(cmd);
    let text = cmd_output(&mut c);
    for seg in text.split(['\r', '\n']) {
        if let Some(i) = seg.find(" requests per second") {
            let num = seg[..i].rsplit(' ').next().unwrap();
            return num
                .parse()
                .unwrap_or_else(|_| panic!("cannot parse {seg:?}"));
        }
    }
    panic!("no 'requests per second' in redis-benchmark output:\n{text}");
}

fn stat_delta(before: &serde_json::Value, after: &serde_json::Value, name: &str) -> i64 {
    stat_of(after, name) - stat_of(before, name)
}

// ---------------------------------------------------------------------------
// results table

struct Row {
    figure: String,
    measured: String,
    target: String,
    met: Option<bool>,
    /// Not measured in this run (the measured column says why).
    unmeasured: bool,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    /// The same figures as numbers, for the PNG.
    chart: Chart,
}

impl Report {
    fn add(&mut self, figure: &str, measured: String, target: &str, met: Option<bool>) {
        println!(
            "  => {figure}: {measured} (target {target}: {})",
            met_text(met)
        );
        self.rows.push(Row {
            figure: figure.into(),
            measured,
            target: target.into(),
            met,
            unmeasured: false,
        });
    }
    /// A figure this run could not measure; `why` goes in its measured column.
    fn unmeasured(&mut self, figure: &str, why: String, target: &str) {
        println!("  => {figure}: not measured: {why} (target {target})");
        self.rows.push(Row {
            figure: figure.into(),
            measured: why,
            target: target.into(),
            met: None,
            unmeasured: true,
        });
    }
    fn note(&mut self, s: String) {
        println!("     {s}");
        self.notes.push(s);
    }
    fn markdown(&self) -> String {
        let mut s = String::from("| figure | measured | target | met |\n|---|---|---|---|\n");
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} |\n",
                r.figure,
                r.measured,
                r.target,
                if r.unmeasured {
                    "not measured"
                } else {
                    met_text(r.met)
                }
            );
        }
        if !self.notes.is_empty() {
            s += "\nDetails of this run:\n\n";
            for n in &self.notes {
                s += &format!("- {n}\n");
            }
        }
        s
    }
}

fn met_text(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "(no target)",
    }
}

// ---------------------------------------------------------------------------
// figures

/// Hit throughput: PGCACHE.READ of a cached row against GET of the same bytes.
fn hit_throughput(r: &RedisServer, rep: &mut Report) {
    let mut c = r.con();
    let row = read(&mut c, "items", r#"{"id":1}"#).unwrap().unwrap();
    // The baseline is the cache-aside entry a user would have: the same
    // bytes with the same expiry (a key with a TTL costs Redis an extra
    // lookup in its expires table on every read, GET included).
    let pttl: i64 = redis::cmd("PTTL")
        .arg(r#"pg_cache:items:{"id":1}"#)
        .query(&mut c)
        .unwrap();
    assert!(pttl > 0, "the cache entry has a TTL");
    let _: () = redis::cmd("SET")
        .arg("bench:get")
        .arg(&row)
        .arg("PX")
        .arg(pttl)
        .query(&mut c)
        .unwrap();
    for events in ["none", "all"] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("pgcache.events")
            .arg(events)
            .query(&mut c)
            .unwrap();
        for (pipeline, n) in [(1u32, 200_000u64), (16, 1_000_000)] {
            let (mut get, mut rd, mut ratios) = (vec![], vec![], vec![]);
            for _ in 0..HIT_ROUNDS {
                let g = redis_benchmark(r.port(), n, 50, pipeline, &[], &["GET", "bench:get"]);
                let p = redis_benchmark(
                    r.port(),
                    n,
                    50,
                    pipeline,
                    &[],
                    &["PGCACHE.READ", "items", r#"{"id":1}"#],
                );
                ratios.push(p / g);
                get.push(g);
                rd.push(p);
            }
            let per_round = rounds(&ratios);
            let ratio = median(ratios);
            let target = match (events, pipeline) {
                ("none", 1) => 0.95,
                ("none", _) => 0.85,
                (_, 1) => 0.90,
                _ => 0.75,
            };
            let mode = if pipeline == 1 {
                "unpipelined".to_string()
            } else {
                format!("pipelined ({pipeline})")
            };
            let sub = if events == "all" {
                ", no subscriber"
            } else {
                ""
            };
            let (rd, get) = (median(rd), median(get));
            rep.add(
                &format!("hit throughput / GET, events {events}{sub}, {mode}"),
                format!("{ratio:.2} (READ {rd:.0}/s, GET {get:.0}/s; {per_round})"),
                &format!(">= {target}"),
                Some(ratio >= target),
            );
            rep.chart.rates.push(RateFigure {
                label: format!("hit, events {events}, {mode}"),
                baseline: "GET".into(),
                baseline_rate: get,
                pgcache_rate: rd,
                ratio,
                target: format!(">= {target}"),
                target_ratio: target,
                met: ratio >= target,
            });
        }
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("pgcache.events")
        .arg("none")
        .query(&mut c)
        .unwrap();
}

/// Cold misses over random ids of the 1M-row table, 50 clients, against
/// pgbench -M prepared selecting the same rows with the same concurrency.
fn cold_miss_throughput(pg: &PgServer, r: &RedisServer, rep: &mut Report) {
    let script = std::env::temp_dir().join(format!("pgcache-bench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set id random(1, 1000000)\nSELECT * FROM items WHERE id = :id;\n",
    )
    .unwrap();
    let mut c = r.con();
    let n = 60_000u64;
    let (mut ours, mut theirs, mut ratios, mut hit_share) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let _: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
            .arg("items")
            .query(&mut c)
            .unwrap();
        let before = stats(&mut c);
        // __rand_int__ is 12 zero-padded digits: a JSON string, which pgcache
        // reads as PostgreSQL's integer input would ("000123" is 123).
        let p = redis_benchmark(
            r.port(),
            n,
            50,
            1,
            &["-r", &ROWS.to_string()],
            &["PGCACHE.READ", "items", r#"{"id":"__rand_int__"}"#],
        );
        let after = stats(&mut c);
        let misses =
            stat_delta(&before, &after, "misses") + stat_delta(&before, &after, "coalesced_waits");
        hit_share.push(1.0 - misses as f64 / n as f64);
        let tps = writes::pgbench_tps(
            pg.port(),
            &[
                "-n",
                "-M",
                "prepared",
                "-c",
                "50",
                "-j",
                "2",
                "-T",
                "5",
                "-f",
                script.to_str().unwrap(),
            ],
        );
        ratios.push(p / tps);
        ours.push(p);
        theirs.push(tps);
    }
    let _ = std::fs::remove_file(&script);
    let per_round = rounds(&ratios);
    let ratio = median(ratios);
    let (ours, theirs) = (median(ours), median(theirs));
    rep.add(
        "cold-miss throughput / pgbench -M prepared, 50 clients, random ids of 1M rows",
        format!("{ratio:.2} (pgcache {ours:.0}/s, pgbench {theirs:.0} tps; {per_round})"),
        ">= 0.8",
        Some(ratio >= 0.8),
    );
    rep.chart.rates.push(RateFigure {
        label: "cold miss, 50 clients".into(),
        baseline: "pgbench -M prepared".into(),
        baseline_rate: theirs,
        pgcache_rate: ours,
        ratio,
        target: ">= 0.8".into(),
        target_ratio: 0.8,
        met: ratio >= 0.8,
    });
    rep.note(format!(
        "cold misses: {n} PGCACHE.READs per round; share answered from cache (a random id repeated within the round): {:.1}%; module pool pg_pool_size = {}",
        100.0 * median(hit_share),
        stat_of(&stats(&mut c), "pool_size")
    ));
}

/// MULTIREAD of 100 cold keys against 100 pipelined READs of cold keys.
fn multiread_vs_pipeline(r: &RedisServer, rep: &mut Report) {
    let mut c = r.con();
    let rounds = 15;
    let (mut multi, mut piped, mut multi_q, mut piped_q) = (vec![], vec![], vec![], vec![]);
    let mut next = 600_000;
    for _ in 0..rounds {
        let ids: Vec<i32> = (next..next + 100).collect();
        next += 100;
        let arr = format!(
            "[{}]",
            ids.iter()
                .map(|i| format!(r#"{{"id":{i}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let before = stats(&mut c);
        let t = Instant::now();
        let out = multiread(&mut c, "items", &arr).unwrap();
        multi.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(json(&out).as_array().unwrap().iter().all(|v| !v.is_null()));
        multi_q.push(stat_delta(&before, &stats(&mut c), "pg_queries") as f64);

        let ids: Vec<i32> = (next..next + 100).collect();
        next += 100;
        let mut pipe = redis::pipe();
        for i in &ids {
            pipe.cmd("PGCACHE.READ")
                .arg("items")
                .arg(format!(r#"{{"id":{i}}}"#));
        }
        let before = stats(&mut c);
        let t = Instant::now();
        let out: Vec<Option<String>> = pipe.query(&mut c).unwrap();
        piped.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.iter().all(Option::is_some));
        piped_q.push(stat_delta(&before, &stats(&mut c), "pg_queries") as f64);
    }
    let (m, p) = (median(multi), median(piped));
    let q = multi_q.iter().cloned().fold(0.0, f64::max);
    let piped_q = median(piped_q);
    let speedup = p / m;
    rep.add(
        "MULTIREAD of 100 cold keys vs 100 pipelined READs",
        format!(
            "{speedup:.1}x faster ({m:.2} ms vs {p:.2} ms); {q:.0} query per MULTIREAD (max of {rounds}), {piped_q:.0} for the 100 READs"
        ),
        ">= 5x, 1 query",
        Some(speedup >= 5.0 && q == 1.0),
    );
    rep.chart.panels.push(BarPanel {
        title: "100 cold keys, median time".into(),
        axis: "ms".into(),
        bars: vec![
            Bar {
                name: "100 pipelined READs".into(),
                value: p,
                label: format!("{p:.2} ms, {piped_q:.0} queries"),
                pgcache: false,
            },
            Bar {
                name: "one MULTIREAD".into(),
                value: m,
                label: format!("{m:.2} ms, {q:.0} query (max)"),
                pgcache: true,
            },
        ],
        limit: Some(("target: MULTIREAD 5x faster".into(), p / 5.0)),
    });
}

/// 1000 connections read one cold key at once: PostgreSQL sees one query.
fn thousand_readers(
    pg: &PgServer,
    r: &RedisServer,
    rt: &tokio::runtime::Runtime,
    rep: &mut Report,
) {
    let conns: Vec<redis::aio::MultiplexedConnection> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..1000 {
            v.push(r.async_con().await);
        }
        v
    });
    let mut worst_pg = 0;
    let mut worst_mod = 0;
    let mut coalesced = vec![];
    for (i, id) in [900_001, 900_002, 900_003].into_iter().enumerate() {
        pg.reset_stats();
        let mut c = r.con();
        let before = stats(&mut c);
        let barrier = Arc::new(tokio::sync::Barrier::new(conns.len()));
        let results: Vec<Option<String>> = rt.block_on(async {
            let tasks: Vec<_> = conns
                .iter()
                .cloned()
                .map(|mut con| {
                    let b = barrier.clone();
                    tokio::spawn(async move {
                        b.wait().await;
                        redis::cmd("PGCACHE.READ")
                            .arg("items")
                            .arg(format!(r#"{{"id":{id}}}"#))
                            .query_async::<Option<String>>(&mut con)
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut out = vec![];
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert!(
            results.iter().all(Option::is_some),
            "round {i}: a read failed"
        );
        let after = stats(&mut c);
        worst_mod = worst_mod.max(stat_delta(&before, &after, "pg_queries"));
        coalesced.push(stat_delta(&before, &after, "coalesced_waits"));
        worst_pg = worst_pg.max(pg.queries_on("items"));
    }
    rep.add(
        "1000 concurrent reads of one cold key",
        format!("{worst_pg} query (pg_stat_statements, worst of 3 keys; module pg_queries {worst_mod}); coalesced waits per key {coalesced:?}"),
        "1 query",
        Some(worst_pg == 1 && worst_mod == 1),
    );
    let readers = conns.len();
    let queries = |n: i64| format!("{n} {}", if n == 1 { "query" } else { "queries" });
    rep.chart.panels.push(BarPanel {
        title: format!("{readers} concurrent reads of one cold key"),
        axis: "count (worst of 3 keys)".into(),
        bars: vec![
            Bar {
                name: "reads sent".into(),
                value: readers as f64,
                label: format!("{readers} reads"),
                pgcache: false,
            },
            Bar {
                name: "PostgreSQL queries".into(),
                value: worst_pg as f64,
                label: format!("{} (module: {worst_mod})", queries(worst_pg)),
                pgcache: true,
            },
        ],
        limit: Some(("target: 1 query".into(), 1.0)),
    });
}

/// PING round trips (ms) on a sync connection for `d`.
fn pings_for(r: &RedisServer, d: Duration) -> Vec<f64> {
    let mut c = r.con();
    let mut v = Vec::new();
    let end = Instant::now() + d;
    while Instant::now() < end {
        let t = Instant::now();
        assert!(ping(&mut c));
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v
}

/// What the 64 clients of the PING figure do.
#[derive(Clone, Copy, PartialEq)]
enum PingLoad {
    /// PGCACHE.READ of random cold ids, against a PostgreSQL slowed by 20 ms.
    Misses,
    /// The control: BLPOP on an empty list with a 20 ms timeout, Redis's own
    /// blocking command. The same clients, waits and reply traffic with no
    /// module and no PostgreSQL: what this machine does to PING p99 anyway.
    Blpop,
}

/// PING round trips (ms) on `pinged` for 3 s while 64 clients run `load` on
/// `slow`; returns them with the reads done and errors.
fn pings_under(
    slow: &RedisServer,
    pinged: &RedisServer,
    rt: &tokio::runtime::Runtime,
    load: PingLoad,
    seed: u64,
) -> (Vec<f64>, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = rt.block_on(async {
        let mut v = vec![];
        for t in 0..64u64 {
            let mut con = slow.async_con().await;
            let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
            v.push(rt.spawn(async move {
                let mut rng = Rng::new(seed + t);
                while !stop.load(Ordering::Relaxed) {
                    let cmd = match load {
                        PingLoad::Misses => {
                            let id = rng.range(1, ROWS);
                            let mut c = redis::cmd("PGCACHE.READ");
                            c.arg("items").arg(format!(r#"{{"id":{id}}}"#));
                            c
                        }
                        PingLoad::Blpop => {
                            let mut c = redis::cmd("BLPOP");
                            c.arg(format!("bench:empty:{t}")).arg(0.02);
                            c
                        }
                    };
                    match cmd.query_async::<Option<redis::Value>>(&mut con).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        v
    });
    std::thread::sleep(Duration::from_millis(300));
    let pings = pings_for(pinged, Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    (
        pings,
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    )
}

/// PING p99 while 64 clients miss against a PostgreSQL slowed by 20 ms, and
/// while the same clients wait in BLPOP instead (the machine's floor with
/// the same reply traffic). A bystander, a second redis-server with no
/// module and no other client, is PINGed during the same misses: its p99 is
/// what the load does to a PING whose server has nothing else to do (the two
/// cores shared with PostgreSQL, the workers and the load generator), as
/// against what the loaded server's own work adds.
fn ping_under_slow_pg(
    slow: &RedisServer,
    proxy: &DelayProxy,
    rt: &tokio::runtime::Runtime,
    rep: &mut Report,
) {
    let bystander = RedisServer::start_plain();
    let (mut idle, mut busy, mut control, mut ratios, mut control_ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut bystander_busy, mut bystander_ratios) = (vec![], vec![]);
    let (mut pings, mut done_total, mut errors_total, mut blpops) = (0, 0, 0, 0);
    for round in 0..ROUNDS as u64 {
        proxy.set_delay_ms(0);
        let i99 = percentile(pings_for(slow, Duration::from_secs(2)), 0.99);
        let bi99 = percentile(pings_for(&bystander, Duration::from_secs(2)), 0.99);
        proxy.set_delay_ms(20);
        let seed = 1000 * (round + 1);
        let (b, done, errors) = pings_under(slow, slow, rt, PingLoad::Misses, seed);
        let (bb, _, _) = pings_under(slow, &bystander, rt, PingLoad::Misses, seed);
        proxy.set_delay_ms(0);
        let (cb, control_done, _) = pings_under(slow, slow, rt, PingLoad::Blpop, 0);
        pings += b.len();
        done_total += done;
        errors_total += errors;
        blpops += control_done;
        let (b99, c99, bb99) = (
            percentile(b, 0.99),
            percentile(cb, 0.99),
            percentile(bb, 0.99),
        );
        ratios.push(b99 / i99);
        control_ratios.push(c99 / i99);
        bystander_ratios.push(bb99 / bi99);
        idle.push(i99);
        busy.push(b99);
        control.push(c99);
        bystander_busy.push(bb99);
    }
    let (idle, busy99, control99) = (median(idle), median(busy), median(control));
    let bystander99 = median(bystander_busy);
    let per_round = rounds(&ratios);
    let ratio = median(ratios);
    let control_ratio = median(control_ratios.clone());
    let bystander_ratio = median(bystander_ratios.clone());
    rep.add(
        "PING p99, 64 clients missing against PostgreSQL + 20 ms / idle",
        format!("{ratio:.2}x ({busy99:.3} ms vs {idle:.3} ms idle; {per_round})"),
        "<= 2x",
        Some(ratio <= 2.0),
    );
    rep.add(
        "control: PING p99, the same 64 clients in BLPOP with a 20 ms timeout (no module) / idle",
        format!(
            "{control_ratio:.2}x ({control99:.3} ms; {}); misses / control: {:.2}x",
            rounds(&control_ratios),
            busy99 / control99
        ),
        "reported",
        None,
    );
    rep.add(
        "bystander: PING p99 of a second redis-server (no module, no other client) during the misses / its idle p99",
        format!(
            "{bystander_ratio:.2}x ({bystander99:.3} ms; {}); misses / bystander: {:.2}x",
            rounds(&bystander_ratios),
            busy99 / bystander99
        ),
        "reported",
        None,
    );
    rep.chart.panels.push(BarPanel {
        title: "PING p99, 64 clients waiting 20 ms".into(),
        axis: "ms".into(),
        bars: vec![
            Bar {
                name: "idle".into(),
                value: idle,
                label: format!("{idle:.3} ms"),
                pgcache: false,
            },
            Bar {
                name: "BLPOP".into(),
                value: control99,
                label: format!("{control99:.3} ms ({control_ratio:.2}x)"),
                pgcache: false,
            },
            Bar {
                name: "bystander".into(),
                value: bystander99,
                label: format!("{bystander99:.3} ms ({bystander_ratio:.2}x)"),
                pgcache: false,
            },
            Bar {
                name: "misses".into(),
                value: busy99,
                label: format!("{busy99:.3} ms ({ratio:.2}x)"),
                pgcache: true,
            },
        ],
        // The target is on the per-round ratio; 2x the median idle p99
        // shows it on this axis.
        limit: Some(("target: <= 2x idle".into(), 2.0 * idle)),
    });
    rep.note(format!(
        "slow-PostgreSQL runs ({ROUNDS} x 3 s, each after 2 s of idle PINGs): {done_total} reads done, {errors_total} errors, {pings} PINGs timed under load; control: {blpops} BLPOP timeouts"
    ));
}

struct AppRun {
    ops_per_s: f64,
    hit_rate: f64,
}

const APP_KEYS: usize = 100_000;
const APP_TASKS: usize = 32;
const APP_PG_CONNS: usize = 8;
const APP_SECS: u64 = 4;

/// Warm the `top` most popular ids into both caches: pgcache's entries
/// (through MULTIREAD) and the cache-aside keys (`app:items:<id>`).
fn warm(r: &RedisServer, pg_port: u16, top: usize, rt: &tokio::runtime::Runtime) {
    let mut c = r.con();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    for chunk in (1..=top as i32).collect::<Vec<_>>().chunks(1000) {
        let arr = format!(
            "[{}]",
            chunk
                .iter()
                .map(|i| format!(r#"{{"id":{i}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        multiread(&mut c, "items", &arr).unwrap();
    }
    let rows: Vec<(i32, String)> = rt.block_on(async {
        let cl = connect_pg(pg_port).await;
        cl.query(
            "SELECT id, row_to_json(t)::text FROM items t WHERE id <= $1",
            &[&(top as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    });
    for chunk in rows.chunks(5000) {
        let mut pipe = redis::pipe();
        for (id, v) in chunk {
            pipe.cmd("SET")
                .arg(format!("app:items:{id}"))
                .arg(v)
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        pipe.query::<()>(&mut c).unwrap();
    }
}

async fn connect_pg(port: u16) -> tokio_postgres::Client {
    let cs = format!("host=127.0.0.1 port={port} user=postgres dbname={DB_NAME}");
    let (client, conn) = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// One timed run of the application workload; `pg_port` is used only by
/// the cache-aside path (its own PostgreSQL connections).
fn app_run(
    r: &RedisServer,
    zipf: &Arc<Zipf>,
    aside: Option<u16>,
    seed: u64,
    rt: &tokio::runtime::Runtime,
) -> AppRun {
    let before = r.stats();
    let (ops, misses) = rt.block_on(async {
        // Ordinary application code: a deadpool-postgres pool of as many
        // connections as the module's pool, a connection checked out per query.
        let pool = aside.map(|port| {
            let cfg: tokio_postgres::Config =
                format!("host=127.0.0.1 port={port} user=postgres dbname={DB_NAME}")
                    .parse()
                    .unwrap();
            let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
            deadpool_postgres::Pool::builder(mgr)
                .max_size(APP_PG_CONNS)
                .build()
                .unwrap()
        });
        let mut cons = vec![];
        for _ in 0..APP_TASKS {
            cons.push(r.async_con().await);
        }
        let end = Instant::now() + Duration::from_secs(APP_SECS);
        let mut tasks = vec![];
        for (t, mut con) in cons.into_iter().enumerate() {
            let zipf = zipf.clone();
            let pg = pool.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(seed * 1000 + t as u64);
                let (mut ops, mut misses) = (0u64, 0u64);
                while Instant::now() < end {
                    let id = zipf.sample(&mut rng);
                    match &pg {
                        None => {
                            let v: Option<String> = redis::cmd("PGCACHE.READ")
                                .arg("items")
                                .arg(format!(r#"{{"id":{id}}}"#))
                                .query_async(&mut con)
                                .await
                                .unwrap();
                            assert!(v.is_some());
                        }
                        Some(pg) => {
                            let key = format!("app:items:{id}");
                            let v: Option<String> = redis::cmd("GET")
                                .arg(&key)
                                .query_async(&mut con)
                                .await
                                .unwrap();
                            if v.is_none() {
                                misses += 1;
                                let client = pg.get().await.unwrap();
                                let st = client
                                    .prepare_cached(
                                        "SELECT row_to_json(t)::text FROM items t WHERE id = $1",
                                    )
                                    .await
                                    .unwrap();
                                let row: String =
                                    client.query_one(&st, &[&id]).await.unwrap().get(0);
                                drop(client);
                                let _: () = redis::cmd("SET")
                                    .arg(&key)
                                    .arg(&row)
                                    .arg("EX")
                                    .arg(3600)
                                    .query_async(&mut con)
                                    .await
                                    .unwrap();
                            }
                        }
                    }
                    ops += 1;
                }
                (ops, misses)
            }));
        }
        let (mut ops, mut misses) = (0, 0);
        for t in tasks {
            let (o, m) = t.await.unwrap();
            ops += o;
            misses += m;
        }
        (ops, misses)
    });
    let misses = if aside.is_some() {
        misses as f64
    } else {
        let after = r.stats();
        (stat_delta(&before, &after, "misses") + stat_delta(&before, &after, "coalesced_waits"))
            as f64
    };
    AppRun {
        ops_per_s: ops as f64 / APP_SECS as f64,
        hit_rate: 1.0 - misses / ops as f64,
    }
}

/// The same application workload through PGCACHE.READ and through
/// cache-aside code, each with the same client library.
fn application(
    label: &str,
    chart_label: &str,
    r: &RedisServer,
    pg_port: u16,
    rt: &tokio::runtime::Runtime,
    rep: &mut Report,
) {
    let zipf = Arc::new(Zipf::new(APP_KEYS, 1.0));
    let top = zipf.top_for_mass(0.9);
    let (mut ours, mut theirs, mut ratios, mut hr_ours, mut hr_theirs) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..APP_ROUNDS as u64 {
        warm(r, pg_port, top, rt);
        let a = app_run(r, &zipf, None, round, rt);
        warm(r, pg_port, top, rt);
        let b = app_run(r, &zipf, Some(pg_port), round, rt);
        ratios.push(a.ops_per_s / b.ops_per_s);
        ours.push(a.ops_per_s);
        theirs.push(b.ops_per_s);
        hr_ours.push(a.hit_rate);
        hr_theirs.push(b.hit_rate);
    }
    let per_round = rounds(&ratios);
    let ratio = median(ratios);
    let (ours, theirs) = (median(ours), median(theirs));
    rep.add(
        &format!("application workload (90% hits, Zipf), PGCACHE.READ / cache-aside{label}"),
        format!(
            "{ratio:.2} ({ours:.0} vs {theirs:.0} ops/s; hit rate {:.1}% vs {:.1}%; {per_round})",
            100.0 * median(hr_ours),
            100.0 * median(hr_theirs)
        ),
        "> 1",
        Some(ratio > 1.0),
    );
    rep.chart.rates.push(RateFigure {
        label: format!("application workload{chart_label}"),
        baseline: "cache-aside".into(),
        baseline_rate: theirs,
        pgcache_rate: ours,
        ratio,
        target: "> 1".into(),
        target_ratio: 1.0,
        met: ratio > 1.0,
    });
}

/// p50 and p99 of the invalidation bench's line ("... p50 0.05 ms, p99
/// 3.47 ms, max 7.18 ms") as a chart panel; left out if the line has neither.
/// Not the max: one outlier on a busy machine would flatten the other bars.
fn invalidation_panel(line: &str, rep: &mut Report) {
    let ms_after = |key: &str| -> Option<f64> {
        let at = line.find(&format!("{key} "))? + key.len() + 1;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let bars: Vec<Bar> = ["p50", "p99"]
        .into_iter()
        .filter_map(|key| {
            ms_after(key).map(|ms| Bar {
                name: key.into(),
                value: ms,
                label: format!("{ms:.2} ms"),
                pgcache: true,
            })
        })
        .collect();
    if !bars.is_empty() {
        rep.chart.panels.push(BarPanel {
            title: "invalidation, commit to entry gone".into(),
            axis: "ms".into(),
            bars,
            limit: None,
        });
    }
}

// ---------------------------------------------------------------------------

/// "2 CPUs (nproc), AMD EPYC ...; Debian GNU/Linux 12 (bookworm)".
fn cpus_and_os() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("PRETTY_NAME=")
                .map(|s| s.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    format!("{nproc} CPUs (nproc), {cpu}; {os}")
}

fn machine() -> String {
    let first_line = |c: &mut Command| {
        c.output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    format!(
        "- {}\n- {}\n- {}\n- {}\n- {}\n",
        cpus_and_os(),
        first_line(Command::new(redis_server_bin()).arg("--version")),
        first_line(Command::new(pg_bindir().join("postgres")).arg("--version")),
        first_line(Command::new(pg_bindir().join("pgbench")).arg("--version")),
        first_line(Command::new("rustc").arg("--version")),
    )
}

fn write_results(text: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let (b, e) = ("<!-- suite:begin -->", "<!-- suite:end -->");
    let Ok(doc) = std::fs::read_to_string(path) else {
        return;
    };
    if let (Some(i), Some(j)) = (doc.find(b), doc.find(e)) {
        let new = format!("{}{b}\n{text}{}", &doc[..i], &doc[j..]);
        std::fs::write(path, new).unwrap();
        println!("(results written into BENCHMARKS.md)");
    }
}

/// The servers of every section but "writes" (which starts its own):
/// PostgreSQL with `items`, a Redis on it, and one behind the delay proxy.
struct Servers {
    pg: PgServer,
    r: RedisServer,
    proxy: DelayProxy,
    slow: RedisServer,
}

fn start_servers() -> Servers {
    println!("== suite: PostgreSQL with items(id int primary key, payload text), {ROWS} rows");
    let pg = PgServer::start_with_schema(&format!(
        "CREATE TABLE items(id int PRIMARY KEY, payload text);\n\
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
    ));
    let r = RedisServer::with_pg(&pg, &["events", "none"]);
    let proxy = DelayProxy::start(pg.port());
    let mut slow_args = proxy.module_args();
    slow_args.extend(["events", "none"].map(String::from));
    let slow = RedisServer::start(&slow_args);
    slow.wait_until_ready();
    Servers { pg, r, proxy, slow }
}

fn main() {
    let started = Instant::now();
    // PGCACHE_BENCH_ONLY=ping,app (any of hit, cold, multiread, thousand,
    // ping, app, writes) runs only those figures, prints them and leaves
    // BENCHMARKS.md and the chart alone: for working on one hot path.
    let only: Option<Vec<String>> = std::env::var("PGCACHE_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|f| f.trim().to_string()).collect());
    let runs = |figure: &str| only.as_ref().is_none_or(|o| o.iter().any(|f| f == figure));
    let servers = ["hit", "cold", "multiread", "thousand", "ping", "app"]
        .iter()
        .any(|f| runs(f))
        .then(start_servers);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rep = Report::default();
    println!("   ready after {:.1} s", started.elapsed().as_secs_f64());

    if let Some(Servers { pg, r, proxy, slow }) = &servers {
        if runs("hit") {
            println!("== hit throughput (redis-benchmark, 50 clients)");
            hit_throughput(r, &mut rep);
        }
        if runs("cold") {
            println!("== cold-miss throughput (redis-benchmark vs pgbench)");
            cold_miss_throughput(pg, r, &mut rep);
        }
        if runs("multiread") {
            println!("== MULTIREAD vs pipelined READs");
            multiread_vs_pipeline(r, &mut rep);
        }
        if runs("thousand") {
            println!("== 1000 concurrent reads of one cold key");
            thousand_readers(pg, r, &rt, &mut rep);
        }
        if runs("ping") {
            println!("== PING under a slow PostgreSQL");
            ping_under_slow_pg(slow, proxy, &rt, &mut rep);
        }
        if runs("app") {
            println!("== application workload");
            application("", "", r, pg.port(), &rt, &mut rep);
            proxy.set_delay_ms(1);
            application(
                ", PostgreSQL + 1 ms per round trip",
                ", PG + 1 ms",
                slow,
                proxy.port(),
                &rt,
                &mut rep,
            );
            proxy.set_delay_ms(0);
        }
    }
    // The writes section runs its own servers on a machine the others no
    // longer load.
    drop(servers);
    if runs("writes") {
        println!("== writes: pgbench -N per invalidation source, commit to entry gone");
        writes::writes(&rt, &mut rep);
    }
    if only.is_some() {
        println!("\n{}", rep.markdown());
        return;
    }
    // `make bench` runs the invalidation bench first and keeps its output.
    let inval = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/bench-invalidation.txt"
    ))
    .ok()
    .and_then(|t| {
        t.lines()
            .find_map(|l| l.split_once("updates): ").map(|(_, v)| v.to_string()))
    });
    if let Some(line) = &inval {
        invalidation_panel(line, &mut rep);
    }
    rep.add(
        "invalidation latency, commit to entry gone",
        inval.unwrap_or_else(|| "run `cargo bench --bench invalidation` (not found)".into()),
        "p50/p99 reported",
        None,
    );

    let took = started.elapsed().as_secs_f64();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let subtitle = format!(
        "{}; load average at the end {load}; suite run time {took:.0} s",
        cpus_and_os()
    );
    let chart = match chart::render(
        &rep.chart,
        &subtitle,
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CHART_PATH),
    ) {
        Ok(()) => {
            println!("(chart written to {CHART_PATH})");
            format!("![throughput and latency per figure]({CHART_PATH})\n\n")
        }
        Err(e) => {
            println!("(chart skipped: {e})");
            format!("Chart skipped in this run: {e}.\n\n")
        }
    };
    let md = format!(
        "Machine:\n\n{}- load average at the end (1/5/15 min): {load}\n\n{chart}{}\nSuite run time: {took:.0} s. Ratios are medians of the per-round ratios; throughputs are medians of their own.\n",
        machine(),
        rep.markdown()
    );
    println!("\n{md}");
    write_results(&md);
}
