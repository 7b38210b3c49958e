//! The suite's "writes" section: what each invalidation source costs
//! PostgreSQL's writers, and how soon each one drops an entry.
//!
//! - `pgbench -N` at 8 clients (`-c 8 -j 2`) on a PostgreSQL of its own
//!   (`pgbench -i -s 10`, `wal_level = logical` in every arm), in three arms,
//!   alternating rounds: **none** (no trigger, no publication, no Redis:
//!   PostgreSQL writing with nothing consuming), **notify** (`pgcache_watch`
//!   triggers on `pgbench_accounts`, a module LISTENing) and **replication**
//!   (publication `pgcache` of `pgbench_accounts`, a module loaded with
//!   `invalidation_source replication`), and a reference arm, **decoding**:
//!   the same publication streamed from a slot of its own by PostgreSQL's
//!   own `pg_recvlogical` into /dev/null, the least any consumer of logical
//!   replication costs (the walsender decodes all WAL, whatever the client
//!   does with it). `-N` updates `pgbench_accounts` and inserts into
//!   `pgbench_history` (no primary key: neither watched nor published).
//! - Commit to entry gone, per source: an entry of `pgbench_accounts` cached
//!   with `PGCACHE.READ`, an `UPDATE` of its row on a tokio-postgres
//!   connection, the time from the autocommit returning to the entry being
//!   gone (`EXISTS` polled); idle, then while `pgbench -N` runs at 4 clients.
//!
//! The replication arms need the module's replication source; a build
//! without it refuses the argument, and the section then says so and reports
//! the other figures.

use super::{cmd_output, connect_pg, median, percentile, rounds, Report};
use crate::chart::{Bar, BarPanel, RateFigure};
use crate::common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `pgbench -i -s`: 1M accounts, 160 MB.
const SCALE: u32 = 10;
const CLIENTS: u32 = 8;
const RUN_SECS: u64 = 12;
/// Rounds per arm: this 2-core machine's throughput varies by a third
/// between rounds, so the figures are medians of five.
const ROUNDS: usize = 5;
/// Commit-to-gone samples per source and condition.
const SAMPLES: usize = 300;
/// The concurrent `pgbench -N` of the latency figure under load.
const LOAD_CLIENTS: u32 = 4;
/// What the replication arm asks the module for (the proposal's defaults,
/// given explicitly so that the clean-up drops what the module used).
const SLOT: &str = "pgcache";
/// The decoding arm's slot.
const FLOOR_SLOT: &str = "pgcache_bench_floor";
const PUBLICATION: &str = "pgcache";
/// How long a source may take to be ready (slot creation included).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Accounts beyond pgbench's range (`aid` 1..=100000 x scale), so that the
/// concurrent pgbench never updates a row the latency figure times.
const LATENCY_ROWS: i32 = SAMPLES as i32;

fn first_latency_aid() -> i32 {
    100_000 * SCALE as i32 + 1
}

/// PostgreSQL's own settings for what bears on writes, instead of the
/// harness's (fsync, synchronous_commit and full_page_writes off, 16MB of
/// shared buffers, pg_stat_statements tracking nested statements, which
/// would time every statement of the notify arm's trigger function): what
/// production servers run. `PGCACHE_BENCH_WRITES_DURABLE=0` keeps the
/// harness's fsync, synchronous_commit and full_page_writes.
fn durable() -> bool {
    std::env::var("PGCACHE_BENCH_WRITES_DURABLE").map_or(true, |v| v != "0")
}

fn server_settings() -> Vec<&'static str> {
    let mut v = vec![
        "shared_buffers = '128MB'",
        "pg_stat_statements.track = 'top'",
    ];
    if durable() {
        v.extend([
            "fsync = on",
            "synchronous_commit = on",
            "full_page_writes = on",
        ]);
    }
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    None,
    Notify,
    Replication,
    Decoding,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::None => "none",
            Arm::Notify => "notify",
            Arm::Replication => "replication",
            Arm::Decoding => "decoding (pg_recvlogical)",
        }
    }
}

/// `pgbench <args> pgcache_test` against 127.0.0.1:`port`; its output.
fn pgbench_command(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new(pg_bindir().join("pgbench"));
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(DB_NAME);
    c
}

/// The "tps = N (without initial connection time)" figure of pgbench's output.
pub(crate) fn pgbench_tps(port: u16, args: &[&str]) -> f64 {
    let out = cmd_output(&mut pgbench_command(port, args));
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{out}"))
}

/// One statement on a connection of its own; PostgreSQL's message on failure.
fn try_sql(port: u16, rt: &tokio::runtime::Runtime, sql: &str) -> Result<(), String> {
    rt.block_on(async {
        connect_pg(port)
            .await
            .batch_execute(sql)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => e.to_string(),
            })
    })
}

/// The writes' PostgreSQL: `wal_level = logical`, `server_settings`,
/// pgbench's tables, the project's SQL and the latency figure's rows.
fn start_pg() -> PgServer {
    let mut pg = PgServer::start_with_schema("SELECT 1");
    pg.enable_logical_replication();
    for s in server_settings() {
        // one statement per call: ALTER SYSTEM refuses a transaction block
        pg.execute(&format!("ALTER SYSTEM SET {s}"));
    }
    pg.stop();
    pg.start();
    cmd_output(&mut pgbench_command(
        pg.port(),
        &["-i", "-q", "-s", &SCALE.to_string()],
    ));
    pg.execute(&pgcache_sql());
    // The replication source's SQL functions, where the branch has them.
    let repl_sql =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/pgcache_replication.sql");
    if let Ok(sql) = std::fs::read_to_string(repl_sql) {
        pg.execute(&sql);
    }
    let first = first_latency_aid();
    pg.execute(&format!(
        "INSERT INTO pgbench_accounts (aid, bid, abalance, filler) \
         SELECT g, 1, 0, '' FROM generate_series({first}, {}) g",
        first + LATENCY_ROWS - 1
    ));
    pg.execute("VACUUM ANALYZE pgbench_accounts");
    pg
}

/// `SHOW` of the settings the section depends on, for the notes.
fn shown_settings(pg: &PgServer) -> String {
    [
        "wal_level",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "pg_stat_statements.track",
    ]
    .iter()
    .map(|name| {
        let v = pg
            .query_text(&format!("SELECT current_setting('{name}')"))
            .unwrap_or_default();
        format!("{name} = {v}")
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// The publication: `pgcache_publish` where the SQL has it, else the
/// statement it stands for.
fn publish(pg: &PgServer, rt: &tokio::runtime::Runtime) -> Result<&'static str, String> {
    match try_sql(pg.port(), rt, "SELECT pgcache_publish('pgbench_accounts')") {
        Ok(()) => Ok("pgcache_publish('pgbench_accounts')"),
        // 42883: undefined_function
        Err(e) if e.contains("(42883)") => try_sql(
            pg.port(),
            rt,
            &format!(
                "CREATE PUBLICATION {PUBLICATION} FOR TABLE pgbench_accounts \
                 WITH (publish_via_partition_root = true)"
            ),
        )
        .map(|()| "CREATE PUBLICATION (no pgcache_publish function in this branch's SQL)"),
        Err(e) => Err(format!("pgcache_publish('pgbench_accounts'): {e}")),
    }
}

/// Whether a walsender streams from the module's slot.
fn slot_active(pg: &PgServer) -> bool {
    slot_streaming(pg, SLOT)
}

fn slot_streaming(pg: &PgServer, slot: &str) -> bool {
    pg.query_text(&format!(
        "SELECT count(*)::text FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
    ))
    .as_deref()
        == Some("1")
}

/// Waits (up to 15 s) for `slot`'s walsender to end, then drops the slot.
fn drop_slot(pg: &PgServer, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while slot_streaming(pg, slot) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    pg.query_texts(&format!(
        "SELECT pg_drop_replication_slot(slot_name)::text FROM pg_replication_slots \
         WHERE slot_name = '{slot}'"
    ));
}

/// What a refused module load says: the module's own lines of the log
/// ("pgcache: refusing to load: ..."), else Redis's lines about the module,
/// else the log's tail.
fn refusal(log: &str) -> String {
    // "<pid>:M <date> # <pgcache> pgcache: ..." -> "pgcache: ..."
    let message = |l: &str| {
        let l = l.split_once(" # ").map_or(l, |(_, m)| m).trim();
        l.strip_prefix("<pgcache> ").unwrap_or(l).to_string()
    };
    let own: Vec<String> = log
        .lines()
        .filter(|l| l.contains("pgcache: "))
        .map(message)
        .collect();
    if !own.is_empty() {
        return own.join(" / ");
    }
    let redis: Vec<String> = log
        .lines()
        .filter(|l| l.contains("odule"))
        .map(message)
        .collect();
    if redis.is_empty() {
        tail(log, 5).replace('\n', " / ")
    } else {
        redis.join(" / ")
    }
}

/// Waits until the module's source is ready: no gap flush running, and for
/// notify the listener connected; for replication, tolerant of how the
/// module reports it: STATS `replication` = `streaming` where the field
/// exists (else `listener` = `connected`), `invalidation_source` =
/// `replication` where it exists, and in PostgreSQL an active slot `SLOT`.
fn wait_ready(pg: &PgServer, r: &RedisServer, arm: Arm) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    let text = |s: &Value, name: &str| s.get(name).and_then(Value::as_str).map(str::to_owned);
    loop {
        let s = r.stats();
        let gap_over = s.get("gap_flush_running").and_then(Value::as_i64) == Some(0)
            || s.get("gap_flush_running").is_none();
        let listener = text(&s, "listener");
        let ok = gap_over
            && match arm {
                Arm::None | Arm::Decoding => true,
                Arm::Notify => listener.as_deref() == Some("connected"),
                Arm::Replication => {
                    let streaming = match text(&s, "replication") {
                        Some(state) => state == "streaming",
                        None => listener.as_deref() == Some("connected"),
                    };
                    let source = text(&s, "invalidation_source");
                    streaming
                        && source.as_deref().is_none_or(|v| v == "replication")
                        && slot_active(pg)
                }
            };
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            let field = |name: &str| {
                s.get(name)
                    .map_or("(absent)".to_string(), |v| v.to_string())
            };
            return Err(format!(
                "not ready within {READY_WITHIN:?}: STATS replication {}, invalidation_source {}, listener {}, trust_state {}, gap_flush_running {}, listener_last_error {}; slot '{SLOT}' active: {}",
                field("replication"),
                field("invalidation_source"),
                field("listener"),
                field("trust_state"),
                field("gap_flush_running"),
                field("listener_last_error"),
                slot_active(pg)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What an arm runs beside PostgreSQL.
enum Consumer {
    Redis(RedisServer),
    /// `pg_recvlogical` of the decoding arm, held only to be killed when
    /// dropped.
    Client(#[allow(dead_code)] Running),
}

impl Consumer {
    fn redis(self) -> RedisServer {
        match self {
            Consumer::Redis(r) => r,
            Consumer::Client(_) => panic!("this arm has no Redis"),
        }
    }
}

/// The decoding arm's client: `pg_recvlogical` streaming `FLOOR_SLOT`
/// (pgoutput, the module's publication) into /dev/null, once its walsender
/// is active.
fn recvlogical(pg: &PgServer) -> Result<Running, String> {
    pg.query_texts(&format!(
        "SELECT lsn::text FROM pg_create_logical_replication_slot('{FLOOR_SLOT}', 'pgoutput')"
    ));
    let mut c = Command::new(pg_bindir().join("pg_recvlogical"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
    ])
    .args([
        "-d",
        DB_NAME,
        "-S",
        FLOOR_SLOT,
        "--start",
        "-f",
        "/dev/null",
    ])
    .args(["-o", "proto_version=1", "-o"])
    .arg(format!("publication_names={PUBLICATION}"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut c);
    let client = Running(c.spawn().map_err(|e| format!("pg_recvlogical: {e}"))?);
    let deadline = Instant::now() + READY_WITHIN;
    while !slot_streaming(pg, FLOOR_SLOT) {
        if Instant::now() > deadline {
            return Err(format!(
                "pg_recvlogical did not stream within {READY_WITHIN:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(client)
}

/// Sets up `arm` on `pg`: its trigger or publication and its consumer.
fn arm_up(
    pg: &PgServer,
    arm: Arm,
    rt: &tokio::runtime::Runtime,
    rep: &mut Report,
    noted: &mut bool,
) -> Result<Option<Consumer>, String> {
    match arm {
        Arm::None => Ok(None),
        Arm::Notify => {
            pg.execute("SELECT pgcache_watch('pgbench_accounts')");
            let r = RedisServer::with_pg(pg, &["events", "none"]);
            wait_ready(pg, &r, arm)?;
            Ok(Some(Consumer::Redis(r)))
        }
        Arm::Decoding => {
            publish(pg, rt)?;
            recvlogical(pg).map(|c| Some(Consumer::Client(c)))
        }
        Arm::Replication => {
            let how = publish(pg, rt)?;
            if !*noted {
                *noted = true;
                rep.note(format!(
                    "writes, replication arm: publication made by {how}"
                ));
            }
            let mut args = pg.module_args();
            args.extend(
                [
                    "events",
                    "none",
                    "invalidation_source",
                    "replication",
                    "replication_slot",
                    SLOT,
                    "replication_publication",
                    PUBLICATION,
                ]
                .map(String::from),
            );
            match RedisServer::try_start(&args) {
                Start::Refused(log) => Err(format!("module refused to load: {}", refusal(&log))),
                Start::Up(r) => {
                    wait_ready(pg, &r, arm)?;
                    Ok(Some(Consumer::Redis(r)))
                }
            }
        }
    }
}

/// Undoes `arm_up`: the consumer stopped, then the trigger removed or the
/// slot and publication dropped, so that the next arm starts clean.
fn arm_down(pg: &PgServer, arm: Arm, consumer: Option<Consumer>) {
    drop(consumer);
    // A walsender ends when it notices its client gone.
    match arm {
        Arm::None => {}
        Arm::Notify => pg.execute("SELECT pgcache_unwatch('pgbench_accounts')"),
        Arm::Replication => {
            drop_slot(pg, SLOT);
            pg.execute(&format!("DROP PUBLICATION IF EXISTS {PUBLICATION}"));
        }
        Arm::Decoding => {
            drop_slot(pg, FLOOR_SLOT);
            pg.execute(&format!("DROP PUBLICATION IF EXISTS {PUBLICATION}"));
        }
    }
}

/// What pgbench does before a run without `-n`, plus a checkpoint: each run
/// starts from the same state.
fn before_run(pg: &PgServer) {
    pg.execute("TRUNCATE pgbench_history");
    pg.execute("VACUUM pgbench_branches, pgbench_tellers");
    pg.execute("CHECKPOINT");
}

fn pgbench_run(pg: &PgServer) -> f64 {
    pgbench_tps(
        pg.port(),
        &[
            "-N",
            "-n",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &RUN_SECS.to_string(),
        ],
    )
}

/// A child process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Until dropped, `pgbench -N` at `LOAD_CLIENTS` clients.
fn pgbench_load(pg: &PgServer) -> Running {
    let mut c = pgbench_command(
        pg.port(),
        &[
            "-N",
            "-n",
            "-c",
            &LOAD_CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            "600",
        ],
    );
    c.stdout(Stdio::null()).stderr(Stdio::null());
    die_with_parent(&mut c);
    Running(c.spawn().expect("spawn pgbench"))
}

fn wait_no_pgbench(pg: &PgServer) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pg
        .query_text(
            "SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'pgbench'",
        )
        .as_deref()
        != Some("0")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the throughput figure of one arm against none is named and judged.
struct ArmFigure {
    /// The table's name for the arm.
    figure: &'static str,
    /// The arm's name in the figure and the chart.
    client: &'static str,
    /// The ratio to reach, if any.
    target: Option<f64>,
    chart_target: &'static str,
    /// What a row says when the arm could not run.
    unavailable: &'static str,
    /// Appended to the measured value.
    comment: &'static str,
}

/// `SAMPLES` times: cache a row, update it, time from the commit returning
/// to its entry being gone (ms), by polling `EXISTS` on one connection.
///
/// Not by subscribing to the module's `cache_invalidate` event: the module
/// publishes it off Redis's main thread, and an idle server's event loop
/// sends it only when it next wakes (serverCron, every 100 ms at the
/// default `hz 10`). Timed that way this figure read 92-98 ms at p50 (the
/// samples fell in step with the wake-ups), and a manual check, one UPDATE
/// at a random moment against redis-cli SUBSCRIBE, read 7-98 ms at `hz 10`
/// and under 20 ms at `hz 100`: the wake-up, not the invalidation.
fn commit_to_gone(
    pg: &PgServer,
    r: &RedisServer,
    rt: &tokio::runtime::Runtime,
    under_load: bool,
) -> Result<Vec<f64>, String> {
    let mut c = r.con();
    let client = rt.block_on(connect_pg(pg.port()));
    let load = under_load.then(|| {
        let l = pgbench_load(pg);
        std::thread::sleep(Duration::from_secs(1));
        l
    });
    let mut out = Vec::with_capacity(SAMPLES);
    let mut result = Ok(());
    'samples: for i in 0..SAMPLES {
        let aid = first_latency_aid() + (i as i32 % LATENCY_ROWS);
        let pk = format!(r#"{{"aid":{aid}}}"#);
        let key = format!("pg_cache:pgbench_accounts:{pk}");
        // A source still catching up may serve without caching: a few tries.
        let cached_by = Instant::now() + Duration::from_secs(5);
        loop {
            if let Err(e) = read(&mut c, "pgbench_accounts", &pk) {
                result = Err(format!(
                    "PGCACHE.READ pgbench_accounts {pk}: {}",
                    err_text(&e)
                ));
                break 'samples;
            }
            if exists(&mut c, &key) {
                break;
            }
            if Instant::now() > cached_by {
                result = Err(format!(
                    "PGCACHE.READ does not cache {key} (trust_state {})",
                    r.stats()["trust_state"]
                ));
                break 'samples;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = rt.block_on(client.execute(
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = $1",
            &[&aid],
        )) {
            result = Err(format!("UPDATE of aid {aid}: {e}"));
            break;
        }
        let committed = Instant::now();
        while exists(&mut c, &key) {
            if committed.elapsed() > Duration::from_secs(10) {
                result = Err(format!(
                    "{key} still cached 10 s after its UPDATE committed"
                ));
                break 'samples;
            }
        }
        out.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    drop(load);
    if under_load {
        wait_no_pgbench(pg);
    }
    result.map(|()| out)
}

struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

fn latency_of(v: &[f64]) -> Latency {
    Latency {
        p50: percentile(v.to_vec(), 0.5),
        p99: percentile(v.to_vec(), 0.99),
        max: v.iter().cloned().fold(f64::NAN, f64::max),
    }
}

/// The section: throughput rounds, then latency per source.
pub fn writes(rt: &tokio::runtime::Runtime, rep: &mut Report) {
    let started = Instant::now();
    let pg = start_pg();
    println!(
        "   PostgreSQL for writes ready after {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        shown_settings(&pg)
    );
    let mut noted = false;
    let arms = [Arm::None, Arm::Notify, Arm::Replication, Arm::Decoding];
    let mut tps: Vec<Vec<f64>> = vec![vec![]; arms.len()];
    // Why an arm that may be missing (the replication source of an older
    // build, pg_recvlogical) could not run.
    let mut failed: Vec<Option<String>> = vec![None; arms.len()];
    for round in 0..ROUNDS {
        for (i, &arm) in arms.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            before_run(&pg);
            match arm_up(&pg, arm, rt, rep, &mut noted) {
                Ok(consumer) => {
                    let t = pgbench_run(&pg);
                    println!("   round {}: {} {t:.0} tps", round + 1, arm.name());
                    tps[i].push(t);
                    arm_down(&pg, arm, consumer);
                }
                Err(e) => {
                    arm_down(&pg, arm, None);
                    if matches!(arm, Arm::None | Arm::Notify) {
                        panic!("writes: the {} arm cannot start: {e}", arm.name());
                    }
                    println!("{} arm unavailable: {e}", arm.name());
                    failed[i] = Some(e);
                }
            }
        }
    }
    let unavailable = failed[2].clone();
    let sync = if durable() {
        "synchronous_commit on"
    } else {
        "synchronous_commit off"
    };
    let none = median(tps[0].clone());
    let against_none = |rep: &mut Report, i: usize, fig: ArmFigure| {
        let figure = format!(
            "pgbench -N, {CLIENTS} clients ({sync}), {} / no invalidation",
            fig.figure
        );
        let table_target = fig
            .target
            .map_or("reported".to_string(), |t| format!(">= {t}"));
        if let Some(e) = &failed[i] {
            rep.unmeasured(&figure, format!("{}: {e}", fig.unavailable), &table_target);
            return;
        }
        let per: Vec<f64> = tps[i].iter().zip(&tps[0]).map(|(a, b)| a / b).collect();
        let ratio = median(per.clone());
        let rate = median(tps[i].clone());
        let met = fig.target.map(|t| ratio >= t);
        rep.add(
            &figure,
            format!(
                "{ratio:.2} ({} {rate:.0} tps, none {none:.0} tps; {}){}",
                fig.client,
                rounds(&per),
                fig.comment
            ),
            &table_target,
            met,
        );
        rep.chart.rates.push(RateFigure {
            label: format!("pgbench -N, {CLIENTS} clients, {}", fig.client),
            baseline: "no invalidation".into(),
            baseline_rate: none,
            pgcache_rate: rate,
            ratio,
            target: fig.chart_target.into(),
            target_ratio: fig.target.unwrap_or(f64::NAN),
            met: met.unwrap_or(true),
        });
    };
    against_none(
        rep,
        1,
        ArmFigure {
            figure: "notify (triggers + LISTEN)",
            client: "notify",
            target: None,
            chart_target: "none",
            unavailable: "",
            comment: "",
        },
    );
    against_none(
        rep,
        2,
        ArmFigure {
            figure: "replication (publication + slot)",
            client: "replication",
            target: Some(0.9),
            chart_target: ">= 0.9",
            unavailable: "replication source unavailable",
            comment: "",
        },
    );
    against_none(
        rep,
        3,
        ArmFigure {
            figure: "decoding: pg_recvlogical of the same publication",
            client: "pg_recvlogical",
            target: None,
            chart_target: "reference",
            unavailable: "unavailable",
            comment: ": PostgreSQL's own cost of logical decoding, with the cheapest client",
        },
    );
    if failed[2].is_none() && failed[3].is_none() {
        // Round by round: the module's cost beyond decoding.
        let per: Vec<f64> = tps[2].iter().zip(&tps[3]).map(|(a, b)| a / b).collect();
        rep.add(
            &format!(
                "pgbench -N, {CLIENTS} clients ({sync}), replication / decoding (the module against pg_recvlogical)"
            ),
            format!("{:.2} ({})", median(per.clone()), rounds(&per)),
            "reported",
            None,
        );
    }

    // Commit to entry gone, per source.
    let mut bars = vec![];
    for arm in [Arm::Notify, Arm::Replication] {
        let figure = |load: bool| {
            format!(
                "invalidation latency, commit to entry gone, {} ({SAMPLES} UPDATEs of pgbench_accounts{})",
                arm.name(),
                if load {
                    format!(", pgbench -N at {LOAD_CLIENTS} clients running")
                } else {
                    ", idle".into()
                }
            )
        };
        if let (Arm::Replication, Some(e)) = (arm, &unavailable) {
            for load in [false, true] {
                rep.unmeasured(
                    &figure(load),
                    format!("replication source unavailable: {e}"),
                    "p50/p99 reported",
                );
            }
            continue;
        }
        let measured = arm_up(&pg, arm, rt, rep, &mut noted).map(|r| {
            let r = r.expect("a source has a Redis").redis();
            let idle = commit_to_gone(&pg, &r, rt, false);
            let loaded = idle
                .as_ref()
                .ok()
                .map(|_| commit_to_gone(&pg, &r, rt, true));
            arm_down(&pg, arm, Some(Consumer::Redis(r)));
            (idle, loaded)
        });
        let (idle, loaded) = match measured {
            Ok((idle, loaded)) => (idle, loaded.unwrap_or_else(|| Err("not run".into()))),
            Err(e) => {
                arm_down(&pg, arm, None);
                (Err(e.clone()), Err(e))
            }
        };
        for (load, res) in [(false, idle), (true, loaded)] {
            match res {
                Ok(v) => {
                    let l = latency_of(&v);
                    rep.add(
                        &figure(load),
                        format!(
                            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                            l.p50, l.p99, l.max
                        ),
                        "p50/p99 reported",
                        None,
                    );
                    if !load {
                        for (what, ms) in [("p50", l.p50), ("p99", l.p99)] {
                            bars.push(Bar {
                                name: format!("{} {what}", arm.name()),
                                value: ms,
                                label: format!("{ms:.2} ms"),
                                pgcache: true,
                            });
                        }
                    }
                }
                Err(e) if arm == Arm::Replication => {
                    println!("replication source unavailable: {e}");
                    rep.unmeasured(
                        &figure(load),
                        format!("replication source unavailable: {e}"),
                        "p50/p99 reported",
                    );
                }
                Err(e) => panic!("writes: {}: {e}", figure(load)),
            }
        }
    }
    if !bars.is_empty() {
        rep.chart.panels.push(BarPanel {
            title: "commit to entry gone, per source (idle)".into(),
            axis: "ms".into(),
            bars,
            limit: None,
        });
    }
    rep.note(format!(
        "writes: PostgreSQL of its own, pgbench -i -s {SCALE}; {}; {ROUNDS} rounds of {RUN_SECS} s per arm (pgbench -N -n -c {CLIENTS} -j 2), arms alternating, each run after TRUNCATE pgbench_history, VACUUM of branches and tellers and a CHECKPOINT; baseline: no trigger, no publication, no Redis; decoding: pg_recvlogical -o proto_version=1 of a slot of its own, into /dev/null; latency: time from the UPDATE's autocommit returning to EXISTS of the entry answering 0 (polled on one connection); section run time {:.0} s",
        shown_settings(&pg),
        started.elapsed().as_secs_f64()
    ));
}
