//! A randomized consistency test (issue 11): writers change rows in
//! PostgreSQL (UPDATE, DELETE, INSERT, key-changing UPDATE, multi-row
//! transactions) while readers fill the cache with READ and MULTIREAD, and
//! faults happen: the LISTEN backend is terminated, PostgreSQL restarts,
//! Redis restarts from its RDB file (or reloads it with DEBUG RELOAD), the
//! fill pool is resized, clients are killed mid-command. Afterwards, once the
//! module has settled, every entry and every READ must equal PostgreSQL
//! (SPEC §6: no stale fill, no gap).
//!
//! Replaying and soaking:
//! - the seed is printed; `PGCACHE_RANDOM_SEED=<seed>` replays its choices
//!   (the interleaving with the servers still varies from run to run);
//! - `PGCACHE_SOAK_SECONDS` sets how long the load runs (default 30);
//!   `make soak` runs this test for `SOAK_SECONDS` (300) with `--nocapture`.
//!
//! The checker is sound by construction: before it compares anything the
//! writers, readers and faults have stopped (every writer's transaction has
//! committed or rolled back), Redis and PostgreSQL are up, STATS says the
//! listener is connected with no gap flush and no fill in flight, and a
//! sentinel change committed after the last write has been applied (the
//! module applies notifications in commit order). Every change committed
//! before is then either notified and applied, or was committed before the
//! current LISTEN began and covered by the gap flush that has ended. A
//! difference found then is a module bug, not a race of the checker.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ids of `items` readers and writers use: small, so they collide often.
const ID_SPACE: i32 = 300;
/// `pairs (a, b)`: a in 1..=PAIR_A, b one of PAIR_B.
const PAIR_A: i32 = 20;
const PAIR_B: [&str; 3] = ["x", "y", "z"];
const WRITERS: usize = 3;
const READERS: usize = 5;
/// The database a reader's connection SELECTs: mostly 0, sometimes 1 or 2
/// (the module tracks which databases hold entries).
const READER_DBS: [i64; 5] = [0, 0, 0, 1, 2];
/// Now and then a reader's MULTIREAD goes to one of these (the first fill
/// of a database races the notifications like any other).
const RARE_DBS: (i64, i64) = (3, 15);
/// Module settings; the TTLs are distinct so that an entry's PTTL tells
/// which TTL it was stored with (and so roughly when).
const DEFAULT_TTL: u64 = 3600;
const NEGATIVE_TTL: u64 = 45;
const READER_TTLS: [u64; 4] = [600, 120, 30, 5];
const CONNECT_TIMEOUT_MS: u64 = 2000;
const QUERY_TIMEOUT_MS: u64 = 3000;
/// A READ unanswered this long hung (SPEC §7: every blocked client gets a
/// reply; the fixed module's safety net answers after 2 × (2 s + 3 s) + 1 s).
const NO_REPLY: Duration = Duration::from_secs(60);

const PREFIX: &str = "pg_cache:";
const SENTINEL_KEY: &str = r#"pg_cache:sentinel:{"id":1}"#;

// ---------------------------------------------------------------------------
// a seeded RNG (xorshift64, as in crates/core/src/pending.rs's tests)

struct Rng(u64);

impl Rng {
    /// splitmix64 of the seed, so that neighbouring seeds differ at once.
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in lo..=hi.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn id(&mut self) -> i32 {
        self.range(1, ID_SPACE as i64) as i32
    }

    fn pair(&mut self) -> (i32, &'static str) {
        (self.range(1, PAIR_A as i64) as i32, *self.pick(&PAIR_B))
    }

    fn sleep_ms(&mut self, lo: u64, hi: u64) {
        std::thread::sleep(Duration::from_millis(
            self.range(lo as i64, hi as i64) as u64
        ));
    }
}

fn seed_from_env() -> u64 {
    match std::env::var("PGCACHE_RANDOM_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("PGCACHE_RANDOM_SEED={s:?}: {e}"))
        }
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn soak_seconds() -> u64 {
    match std::env::var("PGCACHE_SOAK_SECONDS") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("PGCACHE_SOAK_SECONDS={s:?}: {e}")),
        _ => 30,
    }
}

// ---------------------------------------------------------------------------
// figures and the history of what happened

/// Named counters shared by every task, with the first examples of some.
#[derive(Default)]
struct Tally(
    Mutex<BTreeMap<String, u64>>,
    Mutex<BTreeMap<String, Vec<String>>>,
);

impl Tally {
    fn add(&self, name: &str) {
        self.add_n(name, 1);
    }

    /// `add`, keeping the first two texts seen under `name`.
    fn add_example(&self, name: &str, text: String) {
        self.add(name);
        let mut ex = self.1.lock().unwrap_or_else(|e| e.into_inner());
        let v = ex.entry(name.to_string()).or_default();
        if v.len() < 2 {
            v.push(clip(&text, 240));
        }
    }

    fn examples(&self) -> String {
        let ex = self.1.lock().unwrap_or_else(|e| e.into_inner());
        ex.iter()
            .flat_map(|(k, v)| v.iter().map(move |t| format!("    {k}: {t}")))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn add_n(&self, name: &str, n: u64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default() += n;
    }

    fn get(&self, name: &str) -> u64 {
        self.snapshot().get(name).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `prefix.*` counters, as "a 3, b 5".
    fn group(&self, prefix: &str) -> String {
        let dot = format!("{prefix}.");
        let parts: Vec<String> = self
            .snapshot()
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&dot).map(|k| format!("{k} {v}")))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    fn group_total(&self, prefix: &str) -> u64 {
        let dot = format!("{prefix}.");
        self.snapshot()
            .iter()
            .filter(|(k, _)| k.starts_with(&dot))
            .map(|(_, v)| v)
            .sum()
    }
}

/// One write or fault, for the report of a stale entry.
struct Event {
    /// seconds since the load began
    t: f64,
    who: String,
    what: String,
}

/// How many of the latest writes are kept per key.
const HISTORY_PER_KEY: usize = 12;

/// The latest writes of each key (by cache-key suffix, `items:{"id":5}`),
/// and the faults and steps of the test, in order.
#[derive(Default)]
struct History {
    by_key: HashMap<String, VecDeque<Arc<Event>>>,
    timeline: Vec<Arc<Event>>,
}

struct Shared {
    t0: Instant,
    stop: AtomicBool,
    tally: Tally,
    history: Mutex<History>,
    /// answers whose shape was wrong (a row of another key, not JSON, ...)
    bad_answers: Mutex<Vec<String>>,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Remembers a write of `keys`, or (no keys) a fault or step.
    fn record(&self, who: &str, what: String, keys: Vec<String>) {
        let event = Arc::new(Event {
            t: self.now(),
            who: who.to_string(),
            what,
        });
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if keys.is_empty() {
            h.timeline.push(event);
            return;
        }
        for key in keys {
            let q = h.by_key.entry(key).or_default();
            if q.len() == HISTORY_PER_KEY {
                q.pop_front();
            }
            q.push_back(event.clone());
        }
    }

    fn bad_answer(&self, text: String) {
        let mut b = self.bad_answers.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() < 100 {
            b.push(format!("t={:.2}s {text}", self.now()));
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// At most `max` characters of `text`.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

fn item_key(id: i64) -> String {
    format!(r#"items:{{"id":{id}}}"#)
}

fn pair_key(a: i64, b: &str) -> String {
    format!(r#"pairs:{{"a":{a},"b":{}}}"#, Value::from(b))
}

// ---------------------------------------------------------------------------
// PostgreSQL: schema and writers

/// Which invalidation source the run uses.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Notify,
    Replication,
}

/// The module's invalidation sessions: the notify listener, or the
/// replication source's walsender and control connection.
fn source_session_pids(pg: &PgServer) -> Vec<String> {
    let mut pids = listen_session_pids(pg);
    pids.extend(
        pg.query_texts(
            "SELECT pid::text FROM pg_stat_activity \
             WHERE application_name LIKE 'pgcache replication%' AND pid <> pg_backend_pid()",
        )
        .into_iter()
        .flatten(),
    );
    pids
}

fn schema(source: Source) -> String {
    let watch =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/pgcache.sql"))
            .expect("sql/pgcache.sql");
    format!(
        r#"
CREATE TABLE items (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, note TEXT);
INSERT INTO items SELECT g, g * 10, 'note ' || g FROM generate_series(1, {ID_SPACE}) g WHERE g % 3 <> 0;
CREATE TABLE pairs (a INTEGER, b TEXT, v INTEGER NOT NULL, PRIMARY KEY (a, b));
INSERT INTO pairs SELECT a, b, a * 100
  FROM generate_series(1, {PAIR_A}) a, unnest(ARRAY['x', 'y', 'z']) WITH ORDINALITY AS u(b, n)
 WHERE (a + n) % 2 = 0;
CREATE TABLE sentinel (id INTEGER PRIMARY KEY, v INTEGER NOT NULL);
INSERT INTO sentinel VALUES (1, 0);
{watch}
SELECT pgcache_{how}('items');
SELECT pgcache_{how}('pairs');
SELECT pgcache_{how}('sentinel');
"#,
        how = match source {
            Source::Notify => "watch",
            Source::Replication => "publish",
        }
    )
}

/// One statement a writer runs.
#[derive(Clone, Debug)]
enum Stmt {
    ItemUpdate {
        id: i32,
        note: Option<String>,
    },
    ItemDelete {
        id: i32,
    },
    ItemInsert {
        id: i32,
        v: i32,
        note: Option<String>,
    },
    /// key-changing UPDATE
    ItemMove {
        from: i32,
        to: i32,
    },
    /// one statement, several rows
    ItemRange {
        lo: i32,
        hi: i32,
    },
    PairUpdate {
        a: i32,
        b: &'static str,
    },
    PairDelete {
        a: i32,
        b: &'static str,
    },
    PairInsert {
        a: i32,
        b: &'static str,
        v: i32,
    },
    /// key-changing UPDATE of a composite key
    PairMove {
        a: i32,
        b: &'static str,
        to_a: i32,
        to_b: &'static str,
    },
}

impl Stmt {
    fn kind(&self) -> &'static str {
        match self {
            Stmt::ItemUpdate { .. } => "update",
            Stmt::ItemDelete { .. } => "delete",
            Stmt::ItemInsert { .. } => "insert",
            Stmt::ItemMove { .. } => "key_change",
            Stmt::ItemRange { .. } => "range_update",
            Stmt::PairUpdate { .. } => "pair_update",
            Stmt::PairDelete { .. } => "pair_delete",
            Stmt::PairInsert { .. } => "pair_insert",
            Stmt::PairMove { .. } => "pair_key_change",
        }
    }

    fn keys(&self) -> Vec<String> {
        match *self {
            Stmt::ItemUpdate { id, .. } | Stmt::ItemDelete { id } | Stmt::ItemInsert { id, .. } => {
                vec![item_key(id.into())]
            }
            Stmt::ItemMove { from, to } => vec![item_key(from.into()), item_key(to.into())],
            Stmt::ItemRange { lo, hi } => (lo..=hi).map(|id| item_key(id.into())).collect(),
            Stmt::PairUpdate { a, b }
            | Stmt::PairDelete { a, b }
            | Stmt::PairInsert { a, b, .. } => {
                vec![pair_key(a.into(), b)]
            }
            Stmt::PairMove { a, b, to_a, to_b } => {
                vec![pair_key(a.into(), b), pair_key(to_a.into(), to_b)]
            }
        }
    }

    fn random(rng: &mut Rng) -> Stmt {
        let note = |rng: &mut Rng| -> Option<String> {
            match rng.below(8) {
                0 => None,
                1 => Some(r#"with "quotes" and \ backslash"#.to_string()),
                2 => Some(format!("ünïcödé ✓ {}", rng.below(1000))),
                _ => Some(format!("n{}", rng.below(1_000_000))),
            }
        };
        match rng.below(100) {
            0..=29 => Stmt::ItemUpdate {
                id: rng.id(),
                note: note(rng),
            },
            30..=41 => Stmt::ItemDelete { id: rng.id() },
            42..=56 => Stmt::ItemInsert {
                id: rng.id(),
                v: rng.below(100_000) as i32,
                note: note(rng),
            },
            57..=68 => Stmt::ItemMove {
                from: rng.id(),
                to: rng.id(),
            },
            69..=73 => {
                let lo = rng.id();
                Stmt::ItemRange {
                    lo,
                    hi: (lo + rng.range(1, 12) as i32).min(ID_SPACE),
                }
            }
            74..=81 => {
                let (a, b) = rng.pair();
                Stmt::PairUpdate { a, b }
            }
            82..=87 => {
                let (a, b) = rng.pair();
                Stmt::PairDelete { a, b }
            }
            88..=94 => {
                let (a, b) = rng.pair();
                Stmt::PairInsert {
                    a,
                    b,
                    v: rng.below(100_000) as i32,
                }
            }
            _ => {
                let (a, b) = rng.pair();
                let (to_a, to_b) = rng.pair();
                Stmt::PairMove { a, b, to_a, to_b }
            }
        }
    }

    /// Runs the statement; its rows' new `v`s, for the history.
    async fn run<C: tokio_postgres::GenericClient + Sync>(
        &self,
        c: &C,
    ) -> Result<Vec<i32>, tokio_postgres::Error> {
        let rows = match self {
            Stmt::ItemUpdate { id, note } => {
                c.query(
                    "UPDATE items SET v = v + 1, note = $2 WHERE id = $1 RETURNING v",
                    &[id, note],
                )
                .await?
            }
            Stmt::ItemDelete { id } => {
                c.query("DELETE FROM items WHERE id = $1 RETURNING v", &[id])
                    .await?
            }
            Stmt::ItemInsert { id, v, note } => {
                c.query(
                    "INSERT INTO items (id, v, note) VALUES ($1, $2, $3) RETURNING v",
                    &[id, v, note],
                )
                .await?
            }
            Stmt::ItemMove { from, to } => {
                c.query(
                    "UPDATE items SET id = $2 WHERE id = $1 RETURNING v",
                    &[from, to],
                )
                .await?
            }
            Stmt::ItemRange { lo, hi } => {
                c.query(
                    "UPDATE items SET v = v + 1 WHERE id BETWEEN $1 AND $2 RETURNING v",
                    &[lo, hi],
                )
                .await?
            }
            Stmt::PairUpdate { a, b } => {
                c.query(
                    "UPDATE pairs SET v = v + 1 WHERE a = $1 AND b = $2 RETURNING v",
                    &[a, b],
                )
                .await?
            }
            Stmt::PairDelete { a, b } => {
                c.query(
                    "DELETE FROM pairs WHERE a = $1 AND b = $2 RETURNING v",
                    &[a, b],
                )
                .await?
            }
            Stmt::PairInsert { a, b, v } => {
                c.query(
                    "INSERT INTO pairs (a, b, v) VALUES ($1, $2, $3) RETURNING v",
                    &[a, b, v],
                )
                .await?
            }
            Stmt::PairMove { a, b, to_a, to_b } => {
                c.query(
                    "UPDATE pairs SET a = $3, b = $4 WHERE a = $1 AND b = $2 RETURNING v",
                    &[a, b, to_a, to_b],
                )
                .await?
            }
        };
        Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
    }
}

/// Why a write failed: a race between writers (counted, expected), a fault
/// (PostgreSQL down), or something else (printed).
fn write_error_kind(e: &tokio_postgres::Error, closed: bool) -> String {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => "race.duplicate_key".into(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => "race.deadlock".into(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => "race.serialization".into(),
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::CRASH_SHUTDOWN =>
        {
            "fault.pg_shutdown".into()
        }
        None if closed || e.is_closed() => "fault.connection_lost".into(),
        None => "fault.io".into(),
        Some(c) => format!("other.{}", c.code()),
    }
}

/// An error's text, with the server's message where there is one.
fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

fn writer(idx: usize, seed: u64, cs: String, sh: Arc<Shared>) {
    let mut rng = Rng::new(seed ^ (0x1000 + idx as u64));
    let who = format!("writer{idx}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client: Option<tokio_postgres::Client> = None;
        while !sh.stopped() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match tokio_postgres::connect(&cs, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client = Some(c);
                    }
                    Err(_) => {
                        sh.tally.add("write_error.fault.connect");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let c = client.as_mut().unwrap();
            let tx_len = if rng.chance(8) { rng.range(2, 5) } else { 1 };
            let stmts: Vec<Stmt> = (0..tx_len).map(|_| Stmt::random(&mut rng)).collect();
            let result: Result<Vec<Vec<i32>>, tokio_postgres::Error> = if stmts.len() == 1 {
                stmts[0].run(&*c).await.map(|v| vec![v])
            } else {
                async {
                    let tx = c.transaction().await?;
                    let mut out = Vec::new();
                    for s in &stmts {
                        out.push(s.run(&tx).await?);
                    }
                    tx.commit().await?;
                    Ok(out)
                }
                .await
            };
            let keys: Vec<String> = stmts.iter().flat_map(Stmt::keys).collect();
            let desc: Vec<String> = stmts.iter().map(|s| format!("{s:?}")).collect();
            let desc = if stmts.len() > 1 {
                format!("BEGIN; {}; COMMIT", desc.join("; "))
            } else {
                desc.join("")
            };
            match result {
                Ok(vs) => {
                    if stmts.len() > 1 {
                        sh.tally.add("write.transaction");
                    }
                    for s in &stmts {
                        sh.tally.add(&format!("write.{}", s.kind()));
                    }
                    sh.record(&who, format!("{desc} -> committed, v = {vs:?}"), keys);
                }
                Err(e) => {
                    let closed = client.as_ref().is_none_or(|c| c.is_closed());
                    let kind = write_error_kind(&e, closed);
                    let text = pg_error_text(&e);
                    if kind.starts_with("race") {
                        sh.tally.add(&format!("write_error.{kind}"));
                    } else {
                        sh.tally
                            .add_example(&format!("write_error.{kind}"), format!("{desc}: {text}"));
                    }
                    // the outcome of a COMMIT cut off by a fault is unknown
                    sh.record(&who, format!("{desc} -> error {kind}: {text}"), keys);
                }
            }
            rng.sleep_ms(0, 3);
        }
    });
}

// ---------------------------------------------------------------------------
// readers

fn redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}/")
}

fn connect_redis(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(redis_url(port))?.get_connection_with_timeout(Duration::from_secs(5))
}

/// A READ's pk, sometimes spelled otherwise (every spelling names one key).
fn item_pk(rng: &mut Rng, id: i32) -> String {
    match rng.below(10) {
        0 => format!(r#"{{"id":"{id}"}}"#),
        1 => format!(r#"{{ "id" : {id} }}"#),
        _ => format!(r#"{{"id":{id}}}"#),
    }
}

fn pair_pk(rng: &mut Rng, a: i32, b: &str) -> String {
    match rng.below(4) {
        0 => format!(r#"{{"b":"{b}","a":{a}}}"#),
        1 => format!(r#"{{"a":"{a}","b":"{b}"}}"#),
        _ => format!(r#"{{"a":{a},"b":"{b}"}}"#),
    }
}

/// What a READ of `table` with these key members must answer: nil, or an
/// object whose key columns are the ones asked for.
/// A MULTIREAD answer of `items`: an array with one row (or null) per id
/// asked for, each of the shape `shape_ok` accepts.
fn items_answer_ok(got: &str, ids: &[i32]) -> bool {
    match serde_json::from_str::<Value>(got) {
        Ok(Value::Array(rows)) => {
            rows.len() == ids.len()
                && rows
                    .iter()
                    .zip(ids)
                    .all(|(row, &id)| shape_ok(row, &[("id", id.into())]))
        }
        _ => false,
    }
}

fn shape_ok(answer: &Value, want: &[(&str, Value)]) -> bool {
    answer.is_null()
        || (answer.is_object() && want.iter().all(|(col, v)| answer.get(*col) == Some(v)))
}

fn reader_error_kind(e: &redis::RedisError) -> (String, bool) {
    if e.is_timeout() {
        return ("no_reply".into(), true);
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return ("connection".into(), true);
    }
    let text = err_text(e);
    let lower = text.to_lowercase();
    let kind = if lower.starts_with("loading") {
        "loading".to_string()
    } else if lower.contains("max_inflight") || lower.contains("busy") {
        "busy".to_string()
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "timeout".to_string()
    } else {
        // the first words, without numbers, as the bucket
        let words: String = text
            .split_whitespace()
            .take(6)
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        format!("err: {words}")
    };
    (kind, false)
}

fn reader(idx: usize, seed: u64, port: u16, sh: Arc<Shared>) {
    let mut rng = Rng::new(seed ^ (0x2000 + idx as u64));
    let mut con: Option<redis::Connection> = None;
    let mut home_db = 0;
    while !sh.stopped() {
        if con.is_none() {
            let db = *rng.pick(&READER_DBS);
            home_db = db;
            let connected = connect_redis(port).and_then(|mut c| {
                redis::cmd("SELECT").arg(db).query::<()>(&mut c)?;
                Ok(c)
            });
            match connected {
                Ok(c) => {
                    // a hang detector: see NO_REPLY
                    let _ = c.set_read_timeout(Some(NO_REPLY));
                    con = Some(c);
                }
                Err(_) => {
                    sh.tally.add("read_error.connect");
                    rng.sleep_ms(50, 200);
                    continue;
                }
            }
        }
        let c = con.as_mut().unwrap();
        let ttl = if rng.chance(25) {
            Some(rng.pick(&READER_TTLS).to_string())
        } else {
            None
        };
        let op = rng.below(100);
        let (what, result): (String, redis::RedisResult<()>) = if rng.chance(1) {
            let db = rng.range(RARE_DBS.0, RARE_DBS.1);
            let ids: Vec<i32> = (0..rng.range(10, 20)).map(|_| rng.id()).collect();
            let arg = format!(
                "[{}]",
                ids.iter()
                    .map(|id| format!(r#"{{"id":{id}}}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            sh.tally.add("reads.multiread_rare_db");
            let mut in_db = || -> redis::RedisResult<String> {
                redis::cmd("SELECT").arg(db).query::<()>(c)?;
                let got = redis::cmd("PGCACHE.MULTIREAD")
                    .arg("items")
                    .arg(&arg)
                    .query::<String>(c);
                redis::cmd("SELECT").arg(home_db).query::<()>(c)?;
                got
            };
            let r = in_db().map(|got| {
                let ok = items_answer_ok(&got, &ids);
                if !ok {
                    sh.bad_answer(format!("MULTIREAD items {arg} in db {db} answered {got:?}"));
                }
            });
            (format!("MULTIREAD items {arg} in db {db}"), r)
        } else if op < 55 {
            let id = rng.id();
            let pk = item_pk(&mut rng, id);
            let mut cmd = redis::cmd("PGCACHE.READ");
            cmd.arg("items").arg(&pk);
            if let Some(t) = &ttl {
                cmd.arg(t);
            }
            sh.tally.add("reads.read");
            let r = cmd.query::<Option<String>>(c).map(|got| {
                let v = got.as_deref().map_or(Value::Null, |s| {
                    serde_json::from_str(s).unwrap_or(Value::String(s.to_string()))
                });
                if !shape_ok(&v, &[("id", id.into())]) {
                    sh.bad_answer(format!("READ items {pk} answered {got:?}"));
                }
            });
            (format!("READ items {pk}"), r)
        } else if op < 85 {
            let n = rng.range(2, 20) as usize;
            let mut ids: Vec<i32> = (0..n).map(|_| rng.id()).collect();
            if rng.chance(50) {
                // duplicates
                let d = ids[rng.below(n as u64) as usize];
                let at = rng.below(n as u64) as usize;
                ids[at] = d;
            }
            let pks: Vec<String> = ids.iter().map(|&id| item_pk(&mut rng, id)).collect();
            let arg = format!("[{}]", pks.join(","));
            let mut cmd = redis::cmd("PGCACHE.MULTIREAD");
            cmd.arg("items").arg(&arg);
            if let Some(t) = &ttl {
                cmd.arg(t);
            }
            sh.tally.add("reads.multiread");
            sh.tally.add_n("reads.multiread_keys", n as u64);
            let r = cmd.query::<String>(c).map(|got| {
                let ok = items_answer_ok(&got, &ids);
                if !ok {
                    sh.bad_answer(format!("MULTIREAD items {arg} answered {got:?}"));
                }
            });
            (format!("MULTIREAD items {arg}"), r)
        } else if op < 95 {
            let (a, b) = rng.pair();
            let pk = pair_pk(&mut rng, a, b);
            let mut cmd = redis::cmd("PGCACHE.READ");
            cmd.arg("pairs").arg(&pk);
            if let Some(t) = &ttl {
                cmd.arg(t);
            }
            sh.tally.add("reads.pair_read");
            let r = cmd.query::<Option<String>>(c).map(|got| {
                let v = got.as_deref().map_or(Value::Null, |s| {
                    serde_json::from_str(s).unwrap_or(Value::String(s.to_string()))
                });
                if !shape_ok(&v, &[("a", a.into()), ("b", b.into())]) {
                    sh.bad_answer(format!("READ pairs {pk} answered {got:?}"));
                }
            });
            (format!("READ pairs {pk}"), r)
        } else {
            let keys: Vec<(i32, &str)> = (0..rng.range(2, 8)).map(|_| rng.pair()).collect();
            let pks: Vec<String> = keys.iter().map(|&(a, b)| pair_pk(&mut rng, a, b)).collect();
            let arg = format!("[{}]", pks.join(","));
            sh.tally.add("reads.pair_multiread");
            let r = redis::cmd("PGCACHE.MULTIREAD")
                .arg("pairs")
                .arg(&arg)
                .query::<String>(c)
                .map(|got| {
                    let ok = match serde_json::from_str::<Value>(&got) {
                        Ok(Value::Array(rows)) => {
                            rows.len() == keys.len()
                                && rows.iter().zip(&keys).all(|(row, &(a, b))| {
                                    shape_ok(row, &[("a", a.into()), ("b", b.into())])
                                })
                        }
                        _ => false,
                    };
                    if !ok {
                        sh.bad_answer(format!("MULTIREAD pairs {arg} answered {got:?}"));
                    }
                });
            (format!("MULTIREAD pairs {arg}"), r)
        };
        if let Err(e) = result {
            let (kind, reconnect) = reader_error_kind(&e);
            sh.tally.add_example(
                &format!("read_error.{kind}"),
                format!("{what}: {}", err_text(&e)),
            );
            if kind == "no_reply" {
                sh.bad_answer(format!("reader{idx}: {what}: no reply within {NO_REPLY:?}"));
            }
            if reconnect {
                con = None;
                rng.sleep_ms(10, 100);
            }
        }
        rng.sleep_ms(0, 2);
    }
}

// ---------------------------------------------------------------------------
// Redis: a server we can stop and start again on the same port and dir

struct SoakRedis {
    port: u16,
    dir: tempfile::TempDir,
    module_args: Vec<String>,
    child: Option<Child>,
}

impl SoakRedis {
    fn start(module_args: Vec<String>) -> SoakRedis {
        let dir = tempfile::Builder::new()
            .prefix("pgcache-test-soak-redis-")
            .tempdir()
            .expect("tempdir");
        let mut r = SoakRedis {
            port: 0,
            dir,
            module_args,
            child: None,
        };
        for attempt in 0..5 {
            r.port = free_port();
            if r.try_spawn() {
                return r;
            }
            eprintln!("redis-server: port {} taken (attempt {attempt})", r.port);
        }
        panic!("redis-server did not start; log:\n{}", r.log_tail(40));
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize)
    }

    /// The log written since `offset` (a `log_len`).
    fn log_since(&self, offset: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.get(offset..).unwrap_or_default().to_string()
    }

    /// "keys loaded: N" of the last RDB load logged since `offset`.
    fn keys_loaded_since(&self, offset: usize) -> String {
        self.log_since(offset)
            .lines()
            .rev()
            .find_map(|l| l.split("keys loaded: ").nth(1))
            .and_then(|rest| rest.split(',').next())
            .map_or("? (no load logged)".into(), str::to_string)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING
    /// (after loading the RDB file, if there is one). False if the port was
    /// taken.
    fn try_spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "redis-server already running");
        let log_len = self.log_len();
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--dbfilename", "soak.rdb"])
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--loadmodule")
            .arg(module_path())
            .args(&self.module_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("spawn redis-server"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                if self.log_since(log_len).contains("Address already in use") {
                    return false;
                }
                panic!(
                    "redis-server exited ({status}) at start; log:\n{}",
                    self.log_tail(40)
                );
            }
            if let Ok(mut c) = connect_redis(self.port) {
                if matches!(redis::cmd("PING").query::<String>(&mut c), Ok(s) if s == "PONG") {
                    return true;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING; log:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same port and dir (so from the RDB file there).
    fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.try_spawn() {
            assert!(
                Instant::now() < deadline,
                "port {} stays taken after the restart",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn con(&self) -> redis::Connection {
        connect_redis(self.port).expect("connect to redis")
    }
}

impl Drop for SoakRedis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis log tail (port {}) ----\n{}",
                self.port,
                self.log_tail(60)
            );
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// faults

const FAULTS: &[(&str, u64)] = &[
    ("listener_kill", 25),
    ("pg_restart", 12),
    ("redis_restart", 12),
    ("redis_debug_reload", 6),
    ("pool_resize", 20),
    ("client_kill_all", 12),
    ("client_kill_blocked", 13),
    ("slow_pg", 8),
    ("listener_outage", 10),
];

fn pick_fault(rng: &mut Rng) -> &'static str {
    let total: u64 = FAULTS.iter().map(|f| f.1).sum();
    let mut n = rng.below(total);
    for &(name, w) in FAULTS {
        if n < w {
            return name;
        }
        n -= w;
    }
    unreachable!()
}

/// Keys in every database (`INFO keyspace`).
fn total_keys(c: &mut redis::Connection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("keyspace")
        .query(c)
        .unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            l.split("keys=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .sum()
}

fn fault(name: &str, rng: &mut Rng, pg: &mut PgServer, r: &mut SoakRedis, sh: &Shared) -> String {
    match name {
        "listener_kill" => {
            let pids = source_session_pids(pg);
            if pids.is_empty() {
                sh.tally.add("listener_kill_skipped");
                return "no LISTEN session (listener reconnecting): skipped".into();
            }
            for pid in &pids {
                pg.query_texts(&format!("SELECT pg_terminate_backend({pid})::text"));
            }
            format!("terminated LISTEN backend(s) {pids:?}")
        }
        "pg_restart" => {
            pg.stop();
            let down = rng.range(0, 1500) as u64;
            std::thread::sleep(Duration::from_millis(down));
            pg.start();
            format!("PostgreSQL stopped (fast) and started after {down} ms")
        }
        "redis_restart" => {
            let save = rng.chance(75);
            let mut c = r.con();
            let n = total_keys(&mut c);
            let saved = if save {
                match redis::cmd("SAVE").query::<String>(&mut c) {
                    Ok(_) => format!("SAVE of {n} keys"),
                    Err(e) => format!("SAVE failed ({e})"),
                }
            } else {
                "no SAVE (the previous RDB file stays)".to_string()
            };
            drop(c);
            // Sometimes PostgreSQL is down while Redis starts: the listener
            // has not connected since the load for a while.
            let pg_down = rng.chance(20);
            if pg_down {
                pg.stop();
            }
            let offset = r.log_len();
            r.restart();
            let mut down_for = String::new();
            if pg_down {
                let ms = rng.range(300, 2000);
                std::thread::sleep(Duration::from_millis(ms as u64));
                pg.start();
                down_for = format!(", PostgreSQL down from before the restart until {ms} ms after");
            }
            format!(
                "{saved}, SIGKILL, restarted on port {}: keys loaded {}{down_for}",
                r.port,
                r.keys_loaded_since(offset)
            )
        }
        "listener_outage" => {
            // The listener is cut off and cannot reconnect for a while, but
            // the writers' and the pool's open sessions go on: changes are
            // committed and rows filled while no notification is heard.
            let pids = source_session_pids(pg);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let admin = rt.block_on(async {
                let (c, conn) =
                    tokio_postgres::connect(&pg.conn_string_for("postgres"), tokio_postgres::NoTls)
                        .await
                        .expect("connect to the postgres database");
                tokio::spawn(conn);
                c
            });
            let sql = |allow: bool| {
                format!("{HARNESS_MARK} ALTER DATABASE {DB_NAME} ALLOW_CONNECTIONS {allow}")
            };
            rt.block_on(admin.batch_execute(&sql(false)))
                .expect("ALLOW_CONNECTIONS false");
            for pid in &pids {
                rt.block_on(admin.batch_execute(&format!(
                    "{HARNESS_MARK} SELECT pg_terminate_backend({pid})"
                )))
                .expect("pg_terminate_backend");
            }
            let ms = rng.range(500, 3000);
            std::thread::sleep(Duration::from_millis(ms as u64));
            rt.block_on(admin.batch_execute(&sql(true)))
                .expect("ALLOW_CONNECTIONS true");
            if pids.is_empty() {
                sh.tally.add("listener_outage_without_listener");
            }
            format!("no new sessions for {ms} ms; LISTEN backend(s) {pids:?} terminated")
        }
        "redis_debug_reload" => {
            let mut c = r.con();
            let offset = r.log_len();
            match redis::cmd("DEBUG").arg("RELOAD").query::<String>(&mut c) {
                Ok(_) => format!("DEBUG RELOAD: keys loaded {}", r.keys_loaded_since(offset)),
                Err(e) => format!("DEBUG RELOAD failed: {e}"),
            }
        }
        "pool_resize" => {
            let n = rng.range(1, 8);
            let mut c = r.con();
            match redis::cmd("CONFIG")
                .arg("SET")
                .arg("pgcache.pg_pool_size")
                .arg(n)
                .query::<String>(&mut c)
            {
                Ok(_) => format!("pg_pool_size {n}"),
                Err(e) => format!("CONFIG SET pgcache.pg_pool_size {n} failed: {e}"),
            }
        }
        "client_kill_all" => {
            let mut c = r.con();
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .query(&mut c)
                .unwrap_or(-1);
            format!("CLIENT KILL TYPE normal: {n} killed")
        }
        "client_kill_blocked" => {
            // Hold the fills of `items` inside PostgreSQL (a table lock), so
            // that readers are blocked in PGCACHE.* when they are killed.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let lock = rt.block_on(pg.lock_table("items"));
            let held = rng.range(100, 600) as u64;
            std::thread::sleep(Duration::from_millis(held));
            let mut c = r.con();
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("normal")
                .query(&mut c)
                .unwrap_or_default();
            let mut killed = 0;
            let mut seen = 0;
            for line in list.lines() {
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|f| f.strip_prefix(name))
                        .unwrap_or("")
                        .to_string()
                };
                if field("cmd=").starts_with("pgcache.") && field("flags=").contains('b') {
                    seen += 1;
                    if rng.chance(60) {
                        let _: redis::RedisResult<String> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("ID")
                            .arg(field("id="))
                            .query(&mut c);
                        killed += 1;
                    }
                }
            }
            rng.sleep_ms(0, 300);
            rt.block_on(lock.release());
            sh.tally.add_n("blocked_clients_killed", killed);
            format!(
                "items locked for {held} ms: {seen} clients blocked in PGCACHE.*, {killed} killed"
            )
        }
        "slow_pg" => {
            // Fills of the locked tables wait in PostgreSQL, some past
            // pg_query_timeout_ms; writers of them wait too.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let lock = rt.block_on(pg.lock_table("items"));
            let both = rng.chance(30);
            if both {
                rt.block_on(lock.execute("LOCK TABLE pairs IN ACCESS EXCLUSIVE MODE"));
            }
            let held = rng.range(500, 5000) as u64;
            std::thread::sleep(Duration::from_millis(held));
            rt.block_on(lock.release());
            format!(
                "{} locked for {held} ms",
                if both { "items and pairs" } else { "items" }
            )
        }
        other => unreachable!("{other}"),
    }
}

// ---------------------------------------------------------------------------
// settling and checking

fn opt_i64(s: &Value, name: &str) -> Option<i64> {
    s.get(name).and_then(Value::as_i64)
}

/// Waits until the module says it is settled: listener connected, no gap
/// flush, no fill in flight (and, where the fields exist, trusted).
fn wait_settled(r: &SoakRedis, what: &str) -> Value {
    let mut c = r.con();
    let mut out = Value::Null;
    wait_until(what, || {
        let s = stats(&mut c);
        let ok = stat_str(&s, "listener") == "connected"
            && stat_of(&s, "gap_flush_running") == 0
            && stat_of(&s, "fills_in_flight") == 0
            && opt_i64(&s, "entries_trusted").is_none_or(|v| v == 1)
            && s.get("trust_state")
                .and_then(Value::as_str)
                .is_none_or(|v| v == "trusted");
        if ok {
            out = s;
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    out
}

/// Commits a change of the sentinel row (whose entry is cached) after every
/// write, and waits until its notification dropped the entry: the module
/// applies notifications in commit order, so every earlier one is applied.
fn sentinel_barrier(pg: &PgServer, r: &SoakRedis) {
    let mut c = r.con();
    wait_until("the sentinel row is cached", || {
        read(&mut c, "sentinel", r#"{"id":1}"#).map_err(|e| err_text(&e))?;
        if exists(&mut c, SENTINEL_KEY) {
            Ok(())
        } else {
            Err("READ sentinel did not cache it".into())
        }
    });
    pg.execute("UPDATE sentinel SET v = v + 1 WHERE id = 1");
    wait_until(
        "the sentinel's notification is applied (its entry dropped)",
        || {
            if exists(&mut c, SENTINEL_KEY) {
                Err("the sentinel entry is still cached".into())
            } else {
                Ok(())
            }
        },
    );
}

/// The rows of PostgreSQL now, by cache-key suffix (`items:{"id":5}`).
fn pg_rows(pg: &PgServer) -> HashMap<String, Value> {
    let mut rows = HashMap::new();
    for text in pg
        .query_texts("SELECT row_to_json(t)::text FROM items t")
        .into_iter()
        .flatten()
    {
        let v = json(&text);
        rows.insert(item_key(v["id"].as_i64().unwrap()), v);
    }
    for text in pg
        .query_texts("SELECT row_to_json(t)::text FROM pairs t")
        .into_iter()
        .flatten()
    {
        let v = json(&text);
        rows.insert(
            pair_key(v["a"].as_i64().unwrap(), v["b"].as_str().unwrap()),
            v,
        );
    }
    rows
}

fn scan_keys(c: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut cursor = "0".to_string();
    let mut out = BTreeSet::new();
    loop {
        let (next, batch): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(c)
            .expect("SCAN");
        out.extend(batch);
        if next == "0" {
            return out.into_iter().collect();
        }
        cursor = next;
    }
}

/// The suffix of an entry's key (`items:{"id":5}`) in the test's own
/// spelling, or None if it is not one the module should write.
fn canonical_suffix(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX)?;
    let (table, pk) = rest.split_once(':')?;
    let pk: Value = serde_json::from_str(pk).ok()?;
    let suffix = match table {
        "items" => item_key(pk.get("id")?.as_i64()?),
        "pairs" => pair_key(pk.get("a")?.as_i64()?, pk.get("b")?.as_str()?),
        _ => return None,
    };
    (suffix == rest).then_some(suffix)
}

/// When an entry with this PTTL was stored, for each TTL it may have had.
fn stored_when(pttl_ms: i64, elapsed: f64) -> String {
    if pttl_ms < 0 {
        return "no expiry: not stored by a fill of this test".into();
    }
    let mut guesses = Vec::new();
    for ttl in [DEFAULT_TTL, NEGATIVE_TTL]
        .into_iter()
        .chain(READER_TTLS.iter().copied())
    {
        let age = ttl as f64 - pttl_ms as f64 / 1000.0;
        if age >= 0.0 && age <= elapsed + 60.0 {
            guesses.push(format!("t≈{:.1}s if TTL {ttl}", elapsed - age));
        }
    }
    guesses.join(", ")
}

/// Writes and faults that touched `suffix`, most recent last.
fn history_of(sh: &Shared, suffix: &str) -> String {
    let h = sh.history.lock().unwrap_or_else(|e| e.into_inner());
    h.by_key
        .get(suffix)
        .into_iter()
        .flatten()
        .map(|e| format!("      t={:.3}s {}: {}", e.t, e.who, e.what))
        .collect::<Vec<_>>()
        .join("\n")
}

fn faults_timeline(sh: &Shared) -> String {
    let h = sh.history.lock().unwrap_or_else(|e| e.into_inner());
    h.timeline
        .iter()
        .map(|e| format!("  t={:.3}s {}: {}", e.t, e.who, e.what))
        .collect::<Vec<_>>()
        .join("\n")
}

fn show(v: Option<&Value>) -> String {
    v.map_or("no row".into(), Value::to_string)
}

/// Every entry under `pg_cache:items:` and `pg_cache:pairs:` holds the row
/// PostgreSQL has for its key, or the negative marker for a row it lacks.
/// Returns (entries checked, problems).
fn check_entries(
    c: &mut redis::Connection,
    rows: &HashMap<String, Value>,
    sh: &Shared,
) -> (usize, Vec<String>) {
    let elapsed = sh.now();
    let mut checked = 0;
    let mut problems = Vec::new();
    for table in ["items", "pairs"] {
        for key in scan_keys(c, &format!("{PREFIX}{table}:*")) {
            let Some(suffix) = canonical_suffix(&key) else {
                problems.push(format!("{key}: not a canonical key of the module"));
                continue;
            };
            let value: Option<String> = match redis::cmd("GET").arg(&key).query(c) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{key}: GET failed: {e}"));
                    continue;
                }
            };
            let Some(value) = value else {
                continue; // expired since SCAN
            };
            checked += 1;
            let pg_row = rows.get(&suffix);
            let good = if value.is_empty() {
                pg_row.is_none()
            } else {
                serde_json::from_str::<Value>(&value).ok().as_ref() == pg_row
            };
            if !good {
                let pttl: i64 = redis::cmd("PTTL").arg(&key).query(c).unwrap_or(-3);
                problems.push(format!(
                    "STALE ENTRY {key}\n    Redis holds: {}\n    PostgreSQL:  {}\n    \
                     PTTL {pttl} ms (stored {})\n    the latest writes of its key (faults: see the timeline):\n{}",
                    if value.is_empty() {
                        "\"\" (negative marker: no row)".to_string()
                    } else {
                        value.clone()
                    },
                    show(pg_row),
                    stored_when(pttl, elapsed),
                    history_of(sh, &suffix)
                ));
            }
        }
    }
    (checked, problems)
}

fn parse_answer(s: Option<&str>) -> Option<Value> {
    s.map(|s| serde_json::from_str(s).unwrap_or(Value::String(s.to_string())))
}

/// A READ and a MULTIREAD of every key of the id spaces equal PostgreSQL.
/// Returns (reads made, problems).
fn check_reads(
    c: &mut redis::Connection,
    rows: &HashMap<String, Value>,
    rng: &mut Rng,
    singles: bool,
) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut n = 0;
    let mut items: Vec<(String, String)> = (1..=ID_SPACE)
        .map(|id| (format!(r#"{{"id":{id}}}"#), item_key(id.into())))
        .collect();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for a in 1..=PAIR_A {
        for b in PAIR_B {
            pairs.push((format!(r#"{{"a":{a},"b":"{b}"}}"#), pair_key(a.into(), b)));
        }
    }
    for (table, keys) in [("items", &mut items), ("pairs", &mut pairs)] {
        for (pk, suffix) in keys.iter().filter(|_| singles) {
            n += 1;
            match read(c, table, pk) {
                Ok(got) => {
                    let got = parse_answer(got.as_deref());
                    if got.as_ref() != rows.get(suffix) {
                        problems.push(format!(
                            "STALE READ {table} {pk}: READ answered {}, PostgreSQL has {}",
                            show(got.as_ref()),
                            show(rows.get(suffix))
                        ));
                    }
                }
                Err(e) => problems.push(format!("READ {table} {pk} failed: {}", err_text(&e))),
            }
        }
        // shuffled, in batches, with duplicates
        for i in (1..keys.len()).rev() {
            keys.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for chunk in keys.chunks(50) {
            let mut batch: Vec<&(String, String)> = chunk.iter().collect();
            batch.push(&chunk[rng.below(chunk.len() as u64) as usize]);
            let arg = format!(
                "[{}]",
                batch
                    .iter()
                    .map(|(pk, _)| pk.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            n += 1;
            match multiread(c, table, &arg) {
                Ok(s) => {
                    let got = json(&s);
                    let Some(got) = got.as_array().filter(|a| a.len() == batch.len()) else {
                        problems.push(format!("MULTIREAD {table} {arg}: answered {s}"));
                        continue;
                    };
                    for (row, (pk, suffix)) in got.iter().zip(&batch) {
                        let want = rows.get(suffix);
                        if (row.is_null() && want.is_some())
                            || (!row.is_null() && Some(row) != want)
                        {
                            problems.push(format!(
                                "STALE MULTIREAD {table} {pk}: answered {row}, PostgreSQL has {}",
                                show(want)
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!("MULTIREAD {table} failed: {}", err_text(&e))),
            }
        }
    }
    (n, problems)
}

// ---------------------------------------------------------------------------
// the test

/// Issue 11 / SPEC §6 (no stale fill, no gap), under random load and faults:
/// after 3 writers and 5 readers (databases 0, 1 and 2) ran for
/// `PGCACHE_SOAK_SECONDS` while a fault struck every 1-3 s (LISTEN backend
/// terminated, the listener kept out for seconds while other sessions go
/// on, PostgreSQL restarted, Redis restarted from its RDB file (sometimes
/// with PostgreSQL down) or DEBUG RELOADed, pool resized, clients killed
/// while blocked in a fill,
/// tables locked so that fills wait or time out), the load went on a few
/// seconds without faults, and the module settled, every entry of `items`
/// and `pairs` in each database (0-2 for most reads, 3-15 now and then) holds PostgreSQL's
/// row (or the negative marker for a row that does not exist), a READ and a
/// MULTIREAD of every key answer PostgreSQL's row, no answer had the wrong
/// shape during the load, and no command went unanswered for 60 s.
#[test]
fn random_writes_reads_and_faults_leave_no_stale_entry() {
    run(Source::Notify);
}

/// The same with `invalidation_source replication`: no trigger; the
/// module resumes from its marker after the stream, PostgreSQL or Redis
/// went away.
#[test]
fn random_writes_reads_and_faults_leave_no_stale_entry_by_replication() {
    run(Source::Replication);
}

fn run(source: Source) {
    let seed = seed_from_env();
    let seconds = soak_seconds();
    eprintln!(
        "consistency_random: seed {seed} (replay: PGCACHE_RANDOM_SEED={seed}), \
         {seconds} s of load (PGCACHE_SOAK_SECONDS)"
    );
    let mut rng = Rng::new(seed);

    let mut pg = PgServer::start_with_schema(&schema(source));
    let mut module_args = pg.module_args();
    if source == Source::Replication {
        pg.enable_logical_replication();
        module_args.extend(["invalidation_source", "replication"].map(String::from));
    }
    module_args.extend(
        [
            "default_ttl",
            &DEFAULT_TTL.to_string(),
            "negative_ttl",
            &NEGATIVE_TTL.to_string(),
            "pg_connect_timeout_ms",
            &CONNECT_TIMEOUT_MS.to_string(),
            "pg_query_timeout_ms",
            &QUERY_TIMEOUT_MS.to_string(),
        ]
        .map(String::from),
    );
    let mut r = SoakRedis::start(module_args);
    wait_settled(&r, "the module is ready at start");

    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        tally: Tally::default(),
        history: Mutex::new(History::default()),
        bad_answers: Mutex::new(Vec::new()),
    });
    let mut threads = Vec::new();
    for i in 0..WRITERS {
        let (cs, sh) = (pg.conn_string(), sh.clone());
        threads.push(std::thread::spawn(move || writer(i, seed, cs, sh)));
    }
    for i in 0..READERS {
        let (port, sh) = (r.port, sh.clone());
        threads.push(std::thread::spawn(move || reader(i, seed, port, sh)));
    }

    // faults, from this thread (it owns both servers' processes)
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // The last seconds of load have no fault, so that the check also sees
    // entries filled under writes after the last gap flush.
    let quiet = Duration::from_millis(rng.range(1500, 4000) as u64);
    let faults_until = deadline.checked_sub(quiet).unwrap_or(deadline);
    while Instant::now() < faults_until {
        rng.sleep_ms(1000, 3000);
        if Instant::now() >= faults_until {
            break;
        }
        assert!(
            r.alive(),
            "redis-server died during the load (not killed by the test)"
        );
        let name = pick_fault(&mut rng);
        let what = fault(name, &mut rng, &mut pg, &mut r, &sh);
        sh.tally.add(&format!("fault.{name}"));
        sh.record("faults", format!("{name}: {what}"), Vec::new());
    }
    sh.record(
        "settle",
        format!("no more faults; load goes on for {quiet:?}"),
        Vec::new(),
    );
    // a fault may have run past `faults_until`: the quiet time follows it
    let load_end = deadline.max(Instant::now() + quiet);
    while Instant::now() < load_end {
        std::thread::sleep(Duration::from_millis(50));
    }

    // settle: stop the load, both servers up, the module trusted and caught up
    sh.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("a writer or reader thread panicked");
    }
    let load_seconds = sh.now();
    assert!(pg.is_running());
    assert!(
        r.alive(),
        "redis-server died during the load (not killed by the test)"
    );
    sh.record("settle", "load stopped".into(), Vec::new());
    let settled = wait_settled(&r, "the module settles after the load");
    sentinel_barrier(&pg, &r);
    let after_barrier = wait_settled(&r, "the module is still settled after the barrier");
    sh.record("settle", "sentinel barrier passed".into(), Vec::new());

    // check
    let rows = pg_rows(&pg);
    let mut c = r.con();
    let (mut entries_checked, mut reads_checked) = (0, 0);
    let (mut entry_problems, mut read_problems) = (Vec::new(), Vec::new());
    let mut entries_by_db = Vec::new();
    for db in 0..=RARE_DBS.1 {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
        let (n, p) = check_entries(&mut c, &rows, &sh);
        entries_checked += n;
        if n > 0 {
            entries_by_db.push(format!("db {db}: {n}"));
        }
        entry_problems.extend(p.into_iter().map(|p| format!("db {db}: {p}")));
    }
    // READ and MULTIREAD of every key in the readers' databases, MULTIREAD
    // in the others
    for db in 0..=RARE_DBS.1 {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
        let (n, p) = check_reads(&mut c, &rows, &mut rng, READER_DBS.contains(&db));
        reads_checked += n;
        read_problems.extend(p.into_iter().map(|p| format!("db {db}: {p}")));
    }
    let _: () = redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
    let (stale_entries, stale_reads) = (entry_problems.len(), read_problems.len());
    let mut problems = entry_problems;
    problems.extend(read_problems);
    let bad_answers = sh
        .bad_answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let final_stats = stats(&mut c);

    let t = &sh.tally;
    eprintln!(
        "consistency_random figures:\n\
         \x20 seed {seed}, {load_seconds:.1} s of load\n\
         \x20 writes committed: {}\n\
         \x20 write errors: {}\n\
         \x20 reads: {}\n\
         \x20 read errors: {}\n\
         \x20 first errors of each kind (races left out):\n{}\n\
         \x20 faults: {}\n\
         \x20 blocked clients killed: {}\n\
         \x20 rows in PostgreSQL at the end: {}\n\
         \x20 entries checked {entries_checked} ({}), stale or bad entries {stale_entries}; \
         READ/MULTIREAD checks {reads_checked}, wrong answers {stale_reads}; \
         answers of the wrong shape during the load {}\n\
         \x20 STATS when settled: {settled}\n\
         \x20 STATS after the barrier: {after_barrier}\n\
         \x20 STATS at the end: {final_stats}",
        t.group("write"),
        t.group("write_error"),
        t.group("reads"),
        t.group("read_error"),
        t.examples(),
        t.group("fault"),
        t.get("blocked_clients_killed"),
        rows.len(),
        entries_by_db.join(", "),
        bad_answers.len(),
    );
    assert!(
        t.group_total("write") > 0 && t.group_total("reads") > 0,
        "the load did nothing"
    );
    // the fault works: listen_session_pids finds the module's LISTEN session
    assert!(
        t.get("fault.listener_kill") < 3
            || t.get("listener_kill_skipped") < t.get("fault.listener_kill"),
        "no listener_kill found a LISTEN session to terminate: the fault does nothing"
    );
    eprintln!("faults:\n{}", faults_timeline(&sh));
    if !problems.is_empty() || !bad_answers.is_empty() {
        let shown: Vec<&String> = problems.iter().take(30).collect();
        panic!(
            "seed {seed}: {stale_entries} stale/bad entries, {stale_reads} wrong READ/MULTIREAD \
             answers after settling, {} bad answers during the load:\n{}\n{}",
            bad_answers.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            bad_answers.join("\n")
        );
    }
}
