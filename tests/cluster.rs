//! pgcache on Redis Cluster (issue 14, SPEC §10, ../shared/design/cluster.md).
//!
//! Every test builds its own small loopback cluster (`common::cluster`): 3
//! primaries, plus a replica each where a failover needs one, node timeout
//! 2000 ms, the module on every node pointed at one PostgreSQL whose `users`
//! is watched (`sql/pgcache.sql`). Run them one at a time (the machine has
//! two cores; the failover and resharding timings mean something only
//! then):
//!
//!     cargo test --release --test cluster -- --test-threads=1 --nocapture
//!
//! Each test ends with every `users` entry on every node (SCAN, GET)
//! sitting in a slot its node serves and equal to PostgreSQL's
//! `row_to_json` of the row. The failover and resharding tests print their
//! figures (eprintln) for the issue's note.
//!
//! Commands are sent to the node that owns the slot of the pk argument, as
//! a stock cluster client does once the module declares the pk as a key
//! (`Router`), unless a test says otherwise.

mod common;

use common::cluster::*;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// helpers

fn pk(id: i64) -> String {
    format!(r#"{{"id":{id}}}"#)
}

/// Several unmet expectations of one test, reported together.
struct Problems {
    what: &'static str,
    list: Vec<String>,
}

impl Problems {
    fn new(what: &'static str) -> Problems {
        Problems {
            what,
            list: Vec::new(),
        }
    }
    fn add(&mut self, msg: impl Into<String>) {
        self.list.push(msg.into());
    }
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.list.push(msg());
        }
    }
    #[track_caller]
    fn finish(self) {
        if !self.list.is_empty() {
            let mut s = format!("{}: {} unmet expectation(s):", self.what, self.list.len());
            for (i, p) in self.list.iter().enumerate() {
                s.push_str(&format!("\n  {}. {p}", i + 1));
            }
            panic!("{s}");
        }
    }
}

/// Every `users` row as PostgreSQL renders it, by id.
fn pg_users(pg: &PgServer) -> HashMap<i64, Value> {
    pg.query_texts("SELECT row_to_json(t.*)::text FROM users t")
        .into_iter()
        .flatten()
        .map(|s| {
            let v: Value = serde_json::from_str(&s).unwrap();
            (v["id"].as_i64().unwrap(), v)
        })
        .collect()
}

/// What `audit_users` found.
#[derive(Debug, Default)]
struct Audit {
    /// Entries checked, by node.
    per_node: BTreeMap<usize, usize>,
    /// Entries in a slot their node does not serve.
    orphans: Vec<String>,
    /// Entries whose value differs from PostgreSQL's row.
    stale: Vec<String>,
}

impl Audit {
    fn clean(&self) -> bool {
        self.orphans.is_empty() && self.stale.is_empty()
    }
    fn describe(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .take(6)
                .map(|s| format!("\n    {s}"))
                .collect::<String>()
                + &if v.len() > 6 {
                    format!("\n    ... and {} more", v.len() - 6)
                } else {
                    String::new()
                }
        };
        format!(
            "{} entries in slots their node does not serve{}\n  {} stale entries{}\n  entries per node: {:?}",
            self.orphans.len(),
            list(&self.orphans),
            self.stale.len(),
            list(&self.stale),
            self.per_node
        )
    }
}

/// Every `pg_cache:users:*` entry on every running node: in a slot the node
/// serves (a primary's own, a replica's primary's), and equal to
/// PostgreSQL's row.
fn audit_users(cluster: &Cluster, pg: &PgServer) -> Audit {
    let rows = pg_users(pg);
    let view = cluster.view();
    let mut audit = Audit::default();
    for i in 0..cluster.nodes() {
        if cluster.is_stopped(i) {
            continue;
        }
        let served = served_slots_in(&view, cluster.id(i));
        let keys = cluster.scan_keys(i, "pg_cache:users:*");
        audit.per_node.insert(i, keys.len());
        let mut c = cluster.con_readonly(i);
        let mut local = Vec::new();
        for key in keys {
            let slot = slot_of(key.as_bytes());
            if served.iter().any(|&(a, b)| a <= slot && slot <= b) {
                local.push(key);
                continue;
            }
            audit.orphans.push(format!(
                "node {i} (port {}) holds {key} of slot {slot}, served by port {}",
                cluster.port(i),
                view.iter()
                    .find(|v| v.is_master() && v.serves(slot))
                    .map(|v| v.port)
                    .unwrap_or(0)
            ));
        }
        for chunk in local.chunks(500) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("GET").arg(key);
            }
            let values: Vec<redis::RedisResult<Option<String>>> =
                match pipe.query::<Vec<Option<String>>>(&mut c) {
                    Ok(v) => v.into_iter().map(Ok).collect(),
                    Err(_) => chunk
                        .iter()
                        .map(|key| redis::cmd("GET").arg(key).query(&mut c))
                        .collect(),
                };
            for (key, value) in chunk.iter().zip(values) {
                let cached = match value {
                    Ok(Some(v)) => v,
                    Ok(None) => continue,
                    Err(e) => {
                        audit.stale.push(format!("node {i}: GET {key}: {e}"));
                        continue;
                    }
                };
                let id = key
                    .strip_prefix("pg_cache:users:")
                    .and_then(|k| serde_json::from_str::<Value>(k).ok())
                    .and_then(|k| k["id"].as_i64());
                let expected = id.and_then(|id| rows.get(&id));
                let got: Option<Value> = serde_json::from_str(&cached).ok();
                if expected.is_none() || got.as_ref() != expected {
                    audit.stale.push(format!(
                        "node {i} (port {}): {key} = {cached}, PostgreSQL has {}",
                        cluster.port(i),
                        expected.map(|v| v.to_string()).unwrap_or("no row".into())
                    ));
                }
            }
        }
    }
    audit
}

/// `audit_users` until it is clean (stale entries may still be on their
/// way out: invalidation is asynchronous); Err with the last audit after
/// `bound`.
fn entries_match_pg(cluster: &Cluster, pg: &PgServer, bound: Duration) -> Result<Audit, String> {
    let deadline = Instant::now() + bound;
    loop {
        let a = audit_users(cluster, pg);
        if a.clean() {
            return Ok(a);
        }
        // an orphan does not go away by waiting
        if Instant::now() > deadline || (!a.orphans.is_empty() && a.stale.is_empty()) {
            return Err(format!(
                "after waiting up to {bound:?}, not every entry is in a served slot and equal to PostgreSQL:\n  {}",
                a.describe()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[track_caller]
fn assert_entries_match_pg(cluster: &Cluster, pg: &PgServer) -> Audit {
    match entries_match_pg(cluster, pg, Duration::from_secs(10)) {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

/// Ids from `ids` grouped by the primary serving their pk's slot.
fn ids_by_owner(
    cluster: &Cluster,
    ids: impl IntoIterator<Item = i64>,
) -> BTreeMap<usize, Vec<i64>> {
    let owners = cluster.slot_owners();
    let mut m: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for id in ids {
        let owner = owners[usize::from(slot_of(pk(id).as_bytes()))];
        m.entry(owner).or_default().push(id);
    }
    m
}

/// The first `n` ids of every primary.
fn ids_on_every_primary(cluster: &Cluster, n: usize) -> BTreeMap<usize, Vec<i64>> {
    let mut m = ids_by_owner(cluster, 1..=1000);
    for v in m.values_mut() {
        v.truncate(n);
    }
    assert_eq!(m.len(), 3, "ids 1..=1000 land on every primary: {m:?}");
    m
}

/// The row PostgreSQL has.
fn pg_row(pg: &PgServer, id: i64) -> Value {
    pg.row_json("users", &format!("id = {id}")).unwrap()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `.deps/python`, where `make deps` installs the pinned redis-py.
fn python_deps() -> PathBuf {
    let dir = repo().join(".deps/python");
    assert!(
        dir.join("redis/cluster.py").exists(),
        "redis-py is not installed in {}: run `make deps` (scripts/install-deps.sh)",
        dir.display()
    );
    dir
}

/// Run a Python program with redis-py on the path; (exit ok, stdout,
/// stderr). Killed after 60 s.
fn run_python(program: &str, args: &[String]) -> (bool, String, String) {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(program)
        .args(args)
        .env("PYTHONPATH", python_deps())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let child = cmd.spawn().expect("run python3");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(out)) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("python3: {e}"),
        Err(_) => {
            // SAFETY: kill(2) of our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("the python program did not finish within 60 s")
        }
    }
}

/// A COMMAND INFO entry, the parts that matter here.
#[derive(Debug)]
struct CommandInfo {
    flags: Vec<String>,
    first: i64,
    last: i64,
    step: i64,
    /// Each key spec: its flags, and its begin_search and find_keys
    /// rendered as text.
    key_specs: Vec<(Vec<String>, String, String)>,
}

fn text_of(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Okay => "OK".into(),
        redis::Value::Int(n) => n.to_string(),
        other => render(other),
    }
}

/// A reply as text: arrays as `[a, b]`, maps as `{k: v}`.
fn render(v: &redis::Value) -> String {
    match v {
        redis::Value::Array(items) | redis::Value::Set(items) => {
            format!(
                "[{}]",
                items.iter().map(render).collect::<Vec<_>>().join(", ")
            )
        }
        redis::Value::Map(pairs) => format!(
            "{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("{}: {}", render(k), render(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        redis::Value::Nil => "nil".into(),
        other => text_of(other),
    }
}

fn items(v: &redis::Value) -> Vec<redis::Value> {
    match v {
        redis::Value::Array(items) | redis::Value::Set(items) => items.clone(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        _ => Vec::new(),
    }
}

/// The value after `name` in a flat name/value array.
fn field(v: &[redis::Value], name: &str) -> Option<redis::Value> {
    v.chunks(2)
        .find(|p| p.len() == 2 && text_of(&p[0]) == name)
        .map(|p| p[1].clone())
}

fn command_info(c: &mut redis::Connection, name: &str) -> Option<CommandInfo> {
    let v: redis::Value = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(name)
        .query(c)
        .unwrap();
    let entry = items(&v).into_iter().next()?;
    let e = items(&entry);
    if e.len() < 6 {
        return None;
    }
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => *n,
        _ => i64::MIN,
    };
    let key_specs = e
        .get(8)
        .map(items)
        .unwrap_or_default()
        .iter()
        .map(|spec| {
            let s = items(spec);
            let mut flags: Vec<String> = field(&s, "flags")
                .map(|f| items(&f).iter().map(text_of).collect())
                .unwrap_or_default();
            flags.sort();
            (
                flags,
                field(&s, "begin_search")
                    .map(|v| render(&v))
                    .unwrap_or_default(),
                field(&s, "find_keys")
                    .map(|v| render(&v))
                    .unwrap_or_default(),
            )
        })
        .collect();
    Some(CommandInfo {
        flags: items(&e[2]).iter().map(text_of).collect(),
        first: int(&e[3]),
        last: int(&e[4]),
        step: int(&e[5]),
        key_specs,
    })
}

/// The reply to a command sent to non-owner node `other` must be `MOVED
/// <slot> 127.0.0.1:<port>` (`to` = (slot, port) of the owner).
fn expect_moved(
    p: &mut Problems,
    what: &str,
    r: redis::RedisResult<redis::Value>,
    to: (u16, u16),
    other: usize,
) {
    let want = format!("MOVED {} 127.0.0.1:{}", to.0, to.1);
    match r {
        Err(e) if err_text(&e) == want => {}
        Ok(v) => p.add(format!(
            "{what} sent to non-owner node {other}: expected {want}, got a reply: {}",
            render(&v)
        )),
        Err(e) => p.add(format!(
            "{what} sent to non-owner node {other}: expected {want}, got {}",
            err_text(&e)
        )),
    }
}

/// A 3+3 cluster, 300 rows read and 20000 more read once each (misses all
/// along) while rows are UPDATEd, and a failover of the first primary to
/// its replica in the middle: shared by the failover tests.
fn failover_under_load(manual: bool) {
    let what = if manual { "manual" } else { "automatic" };
    let t_test = Instant::now();
    let pg = watched_pg();
    // rows read once each during the load: a continuous stream of misses,
    // so fills (replicated SETs) run while the failover pauses writes
    pg.execute(
        "INSERT INTO users (name, email) \
         SELECT 'Extra ' || g, 'extra' || g || '@example.com' FROM generate_series(1, 20000) g",
    );
    let mut cluster = Cluster::start(&pg, 3, 1);
    eprintln!(
        "[{what} failover] cluster of 3+3 ready in {:?}",
        cluster.setup_time()
    );
    let ids: Vec<i64> = (1..=300).collect();
    let mut router = Router::new(&cluster, Duration::from_secs(5));
    for &id in &ids {
        router
            .read("users", &pk(id))
            .unwrap_or_else(|e| panic!("warm-up READ {}: {e}", pk(id)));
    }
    let primaries = cluster.primaries();
    let victim = primaries[0];
    let replica = cluster.replicas_of(victim)[0];
    let on_victim = ids_by_owner(&cluster, ids.iter().copied())
        .get(&victim)
        .map(Vec::len)
        .unwrap_or(0);
    eprintln!(
        "[{what} failover] primary node {victim} (port {}, {on_victim} of the {} ids read) \
         fails over to its replica node {replica} (port {}); dbsizes {:?}",
        cluster.port(victim),
        ids.len(),
        cluster.port(replica),
        cluster.dbsizes()
    );
    let load = ReadUpdateLoad::start(
        &cluster,
        &pg,
        LoadSpec {
            read_ids: ids.clone(),
            update_ids: ids.iter().rev().copied().collect(),
            update_every: Duration::from_millis(20),
            readers: 1,
            miss_ids: (1001..=21000).collect(),
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let t_fail = load.elapsed().as_secs_f64();
    let rep = cluster.failover(replica, manual);
    let t_done = load.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(2000));
    let report = load.stop();
    let during = report
        .ok_times
        .iter()
        .filter(|&&t| f64::from(t) >= t_fail && f64::from(t) < t_done)
        .count();
    eprintln!("[{what} failover] {rep}");
    eprintln!(
        "[{what} failover] {report}\n[{what} failover] reads answered while the failover ran \
         ({:.2}s..{:.2}s): {during}; after it: {}",
        t_fail,
        t_done,
        report.oks_after(t_done)
    );
    assert!(
        report.oks_after(t_done) > 0,
        "no READ was answered after the failover: {report}"
    );
    cluster.wait_modules_ready(Duration::from_secs(20));
    let audit = assert_entries_match_pg(&cluster, &pg);
    eprintln!(
        "[{what} failover] stale entries: 0, entries checked per node {:?}; test took {:?}",
        audit.per_node,
        t_test.elapsed()
    );
}

// ---------------------------------------------------------------------------
// the harness itself

/// cluster.md §2.2: observed with CLUSTER KEYSLOT on 7.0.15.
const SLOT_VECTORS: &[(&str, u16)] = &[
    (r#"pg_cache:users:{"id":123}"#, 10886),
    (r#"{"id":123}"#, 10886),
    (r#""id":123"#, 10886),
    (r#"{ "id" : 123 }"#, 4228),
    (r#"{"id":"123"}"#, 4473),
    (r#"{"id":"000123"}"#, 9273),
    (r#"pg_cache:orders:{"id":7,"tenant_id":5}"#, 10350),
    (r#"{"id":7,"tenant_id":5}"#, 10350),
    (r#"{"tenant_id":5,"id":7}"#, 11599),
    (r#"pg_cache:t:{"code":"a}b"}"#, 15062),
    (r#"{"code":"a}b"}"#, 15062),
    (r#""code":"a"#, 15062),
    (r#"pg_cache:we{ird:{"id":1}"#, 4358),
    (r#"{"id":1}"#, 14401),
    (r#"{pgcache}:users:{"id":123}"#, 14315),
    (r#"[{"id":123},{"id":124}]"#, 10886),
    ("pg_cache:users:{}", 9031),
    (r#"pg_cache:users:{"name":"Zoë"}"#, 14877),
];

#[test]
fn cluster_harness_starts_and_agrees() {
    let t = Instant::now();
    for &(key, slot) in SLOT_VECTORS {
        assert_eq!(slot_of(key.as_bytes()), slot, "slot_of({key:?})");
    }
    assert_eq!(
        crc16_xmodem(b"123456789"),
        0x31c3,
        "CRC16/XMODEM check value"
    );
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 1);
    eprintln!(
        "cluster of 3 primaries + 3 replicas formed and ready in {:?}",
        cluster.setup_time()
    );
    assert_eq!(cluster.nodes(), 6);

    // topology: 3 primaries with one replica each, every slot served once
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{:?}", cluster.view());
    let mut covered = 0usize;
    for &p in &primaries {
        let r = cluster.replicas_of(p);
        assert_eq!(r.len(), 1, "primary {p} has one replica: {r:?}");
        assert_eq!(cluster.primary_of(r[0]), Some(p));
        assert_eq!(cluster.served_slots(r[0]), cluster.served_slots(p));
        covered += cluster
            .served_slots(p)
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum::<usize>();
    }
    assert_eq!(covered, usize::from(SLOTS));
    let owners = cluster.slot_owners();
    for slot in [0u16, 5460, 5461, 10922, 10923, 16383] {
        assert_eq!(owners[usize::from(slot)], cluster.node_for_slot(slot));
        assert!(primaries.contains(&owners[usize::from(slot)]));
    }

    // the slot function agrees with the server's
    for &(key, slot) in SLOT_VECTORS {
        assert_eq!(
            cluster.keyslot(0, key.as_bytes()),
            slot,
            "CLUSTER KEYSLOT {key:?}"
        );
    }
    let mut c = cluster.con(3);
    for n in 0..400u32 {
        let key: Vec<u8> = match n % 4 {
            0 => format!("k{n}").into_bytes(),
            1 => format!(r#"pg_cache:users:{{"id":{n}}}"#).into_bytes(),
            2 => format!("a{{{n}}}b{{x}}").into_bytes(),
            _ => vec![(n % 256) as u8, b'{', (n / 7 % 256) as u8, b'}', 0xff],
        };
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query(&mut c)
            .unwrap();
        assert_eq!(slot_of(&key), server, "slot_of({key:?})");
    }

    // every node loads the module and holds nothing
    cluster.on_every_node(|i, c| {
        let list: redis::Value = redis::cmd("MODULE").arg("LIST").query(c).unwrap();
        assert!(
            render(&list).contains("pgcache"),
            "node {i}: MODULE LIST {}",
            render(&list)
        );
        assert_eq!(cluster.dbsize(i), 0, "node {i}");
    });
    // a keyed command on a non-owner is MOVED to the owner (what Router follows)
    let key = "plain-key";
    let owner = cluster.node_for_key(key.as_bytes());
    let other = primaries.iter().copied().find(|&p| p != owner).unwrap();
    let e = redis::cmd("SET")
        .arg(key)
        .arg("v")
        .query::<()>(&mut cluster.con(other))
        .unwrap_err();
    assert_eq!(e.kind(), redis::ErrorKind::Moved, "{e}");
    assert_eq!(
        redirect_of(&e),
        Some((slot_of(key.as_bytes()), cluster.port(owner)))
    );
    let mut router = Router::new(&cluster, Duration::from_secs(5));
    let mut set = redis::cmd("SET");
    set.arg(key).arg("v");
    let _: () = router.query(&set, key.as_bytes()).unwrap();
    assert_eq!(
        cluster.count_keys_in_slot(owner, slot_of(key.as_bytes())),
        1
    );
    assert_eq!(cluster.scan_keys(owner, "plain-*"), vec![key.to_string()]);
    assert!(cluster.cluster_check().success());
    eprintln!("harness test took {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------
// a. key specs

#[test]
fn command_info_declares_the_pk_as_a_not_key_key_spec() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let mut c = cluster.con(0);
    let mut p = Problems::new("COMMAND INFO (cluster.md §2.1)");
    let begin = "[type, index, spec, [index, 2]]";
    let find = "[type, range, spec, [lastkey, 0, keystep, 1, limit, 0]]";
    let keyed: [(&str, &[&str], &[&str]); 4] = [
        (
            "pgcache.read",
            // Also `may-replicate`, which COMMAND INFO does not list on
            // 7.0: tests/commands.rs checks that EVAL_RO refuses them.
            &["readonly"],
            &["RO", "access", "not_key"],
        ),
        (
            "pgcache.multiread",
            // Also `may-replicate`, which COMMAND INFO does not list on
            // 7.0: tests/commands.rs checks that EVAL_RO refuses them.
            &["readonly"],
            &["RO", "access", "not_key"],
        ),
        (
            "pgcache.write",
            &["write", "denyoom"],
            &["OW", "update", "not_key"],
        ),
        (
            "pgcache.invalidate",
            &["write"],
            &["RM", "delete", "not_key"],
        ),
    ];
    for (name, flags, spec_flags) in keyed {
        let Some(info) = command_info(&mut c, name) else {
            p.add(format!("{name}: COMMAND INFO has no entry"));
            continue;
        };
        p.check((info.first, info.last, info.step) == (2, 2, 1), || {
            format!(
                "{name}: first/last/step should be 2 2 1, is {} {} {}",
                info.first, info.last, info.step
            )
        });
        for f in flags {
            p.check(info.flags.iter().any(|x| x == f), || {
                format!("{name}: flags {:?} lack {f}", info.flags)
            });
        }
        p.check(!info.flags.iter().any(|x| x == "movablekeys"), || {
            format!(
                "{name}: flags {:?} must not include movablekeys",
                info.flags
            )
        });
        let mut want: Vec<String> = spec_flags.iter().map(|s| s.to_string()).collect();
        want.sort();
        match info.key_specs.as_slice() {
            [(f, b, k)] => {
                p.check(*f == want, || {
                    format!("{name}: key spec flags should be {want:?}, are {f:?}")
                });
                p.check(b == begin, || {
                    format!("{name}: begin_search should be {begin}, is {b}")
                });
                p.check(k == find, || format!("{name}: find_keys should be {find}, is {k}"));
            }
            other => p.add(format!(
                "{name}: should have exactly one key spec (flags {want:?}, begin_search index 2), has {other:?}"
            )),
        }
    }
    for name in [
        "pgcache.invalidate_table",
        "pgcache.stats",
        "pgcache.canonical",
    ] {
        let Some(info) = command_info(&mut c, name) else {
            p.add(format!(
                "{name}: COMMAND INFO has no entry (the command does not exist)"
            ));
            continue;
        };
        p.check(
            (info.first, info.last, info.step) == (0, 0, 0) && info.key_specs.is_empty(),
            || format!("{name}: should declare no key, has {info:?}"),
        );
        if name != "pgcache.invalidate_table" {
            // CANONICAL is not `fast`: a table seen first is looked up.
            let wanted: &[&str] = if name == "pgcache.stats" {
                &["readonly", "fast"]
            } else {
                &["readonly"]
            };
            for &f in wanted {
                p.check(info.flags.iter().any(|x| x == f), || {
                    format!("{name}: flags {:?} lack {f}", info.flags)
                });
            }
        }
    }
    // COMMAND GETKEYS: a NOT_KEY spec is no key
    let getkeys: [&[&str]; 4] = [
        &["pgcache.read", "users", r#"{"id":1}"#],
        &["pgcache.multiread", "users", r#"[{"id":1},{"id":2}]"#],
        &["pgcache.write", "users", r#"{"id":1}"#, r#"{"id":1}"#],
        &["pgcache.invalidate", "users", r#"{"id":1}"#],
    ];
    for args in getkeys {
        let r: redis::RedisResult<Vec<String>> =
            redis::cmd("COMMAND").arg("GETKEYS").arg(args).query(&mut c);
        match r {
            Err(e) if err_text(&e).contains("The command has no key arguments") => {}
            other => p.add(format!(
                "COMMAND GETKEYS {}: expected `ERR The command has no key arguments`, got {other:?}",
                args.join(" ")
            )),
        }
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// b. a stock cluster client routes the commands

const REDIS_PY_READS: &str = r#"
import json, sys
from redis.cluster import RedisCluster
rc = RedisCluster(host="127.0.0.1", port=int(sys.argv[1]), decode_responses=True)
out = []
for i in range(1, int(sys.argv[2]) + 1):
    pk = json.dumps({"id": i}, separators=(",", ":"))
    try:
        out.append({"id": i, "row": rc.execute_command("PGCACHE.READ", "users", pk)})
    except Exception as e:
        out.append({"id": i, "err": "%s: %s" % (type(e).__name__, e)})
print(json.dumps(out))
"#;

#[test]
fn stock_cluster_clients_route_reads() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let mut p = Problems::new("routing by stock cluster clients");
    let n = 60;
    let (ok, stdout, stderr) = run_python(
        REDIS_PY_READS,
        &[cluster.port(1).to_string(), n.to_string()],
    );
    if !ok {
        p.add(format!("the redis-py program failed:\n{stderr}"));
    } else {
        let replies: Vec<Value> = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("redis-py output is not JSON ({e}): {stdout}\n{stderr}"));
        let errors: Vec<String> = replies
            .iter()
            .filter_map(|r| {
                r.get("err")
                    .map(|e| format!("id {}: {}", r["id"], e.as_str().unwrap_or("")))
            })
            .collect();
        p.check(errors.is_empty(), || {
            format!(
                "redis-py RedisCluster execute_command(\"PGCACHE.READ\", \"users\", pk): {} of {n} failed, first: {}",
                errors.len(),
                errors.iter().take(2).cloned().collect::<Vec<_>>().join("; ")
            )
        });
        for r in replies.iter().filter(|r| r.get("row").is_some()) {
            let id = r["id"].as_i64().unwrap();
            let got: Option<Value> = r["row"].as_str().and_then(|s| serde_json::from_str(s).ok());
            p.check(got.as_ref() == Some(&pg_row(&pg, id)), || {
                format!(
                    "redis-py READ {}: got {}, PostgreSQL has {}",
                    pk(id),
                    r["row"],
                    pg_row(&pg, id)
                )
            });
        }
    }

    // redis-cli -c, sent to a node that does not own the pk's slot
    for id in [101i64, 202, 303] {
        let owner = cluster.node_for_key(pk(id).as_bytes());
        let other = (owner + 1) % 3;
        let run = redis_cli(
            &[
                "-c".into(),
                "-p".into(),
                cluster.port(other).to_string(),
                "PGCACHE.READ".into(),
                "users".into(),
                pk(id),
            ],
            Duration::from_secs(20),
        );
        let got: Option<Value> = serde_json::from_str(run.output.trim()).ok();
        p.check(
            run.success() && got.as_ref() == Some(&pg_row(&pg, id)),
            || {
                format!(
                    "redis-cli -c -p {} PGCACHE.READ users {}: {:?} {:?}",
                    cluster.port(other),
                    pk(id),
                    run.status,
                    run.output.trim()
                )
            },
        );
    }
    if let Err(e) = entries_match_pg(&cluster, &pg, Duration::from_secs(5)) {
        p.add(e);
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// c. entries only in owned slots; MOVED on a non-owner

#[test]
fn entries_live_only_on_the_owner_and_non_owners_redirect() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let mut p = Problems::new("entries in owned slots only");
    let by_owner = ids_on_every_primary(&cluster, 10);
    let mut router = Router::new(&cluster, Duration::from_secs(5));
    for ids in by_owner.values() {
        for &id in ids {
            router.read("users", &pk(id)).unwrap();
        }
    }
    let primaries = cluster.primaries();
    for (&owner, ids) in &by_owner {
        for &id in ids {
            let key = user_key(id);
            let slot = slot_of(key.as_bytes());
            assert_eq!(cluster.keyslot(owner, key.as_bytes()), slot);
            assert_eq!(
                cluster.keyslot(owner, pk(id).as_bytes()),
                slot,
                "slot(key) = slot(pk)"
            );
            for &n in &primaries {
                let count = cluster.count_keys_in_slot(n, slot);
                let want = i64::from(n == owner);
                p.check(count == want, || {
                    format!(
                        "CLUSTER COUNTKEYSINSLOT {slot} ({key}) on node {n} is {count}, \
                         want {want} (owner {owner})"
                    )
                });
            }
        }
    }

    // a command on a non-owner is redirected to the owner, and stores nothing there
    let (&owner, ids) = by_owner.iter().next().unwrap();
    let other = primaries.iter().copied().find(|&n| n != owner).unwrap();
    // a row of the owner's not read yet: a miss
    let id = (1..=1000)
        .find(|&i| cluster.node_for_key(pk(i).as_bytes()) == owner && !ids.contains(&i))
        .unwrap();
    let slot = slot_of(pk(id).as_bytes());
    let mut oc = cluster.con(other);
    let data = format!(r#"{{"id":{id},"name":"written"}}"#);
    let commands: [(&str, Vec<String>); 3] = [
        ("PGCACHE.READ", vec![pk(id)]),
        ("PGCACHE.WRITE", vec![pk(id), data]),
        ("PGCACHE.INVALIDATE", vec![pk(id)]),
    ];
    for (name, args) in commands {
        let what = format!("{name} users {}", args.join(" "));
        let r = redis::cmd(name).arg("users").arg(&args).query(&mut oc);
        expect_moved(&mut p, &what, r, (slot, cluster.port(owner)), other);
        let stray = cluster.count_keys_in_slot(other, slot);
        p.check(stray == 0, || {
            format!(
                "after {what} on non-owner node {other}, it holds {stray} key(s) in slot {slot}"
            )
        });
    }
    // on the owner it is served
    let row = router.read("users", &pk(id)).unwrap();
    p.check(row.as_deref().map(json) == Some(pg_row(&pg, id)), || {
        format!("READ {} on the owner: {row:?}", pk(id))
    });
    if let Err(e) = entries_match_pg(&cluster, &pg, Duration::from_secs(5)) {
        p.add(e);
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// d. UPDATE invalidates on every shard

#[test]
fn updates_invalidate_entries_on_every_shard() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let by_owner = ids_on_every_primary(&cluster, 5);
    let mut router = Router::new(&cluster, Duration::from_secs(5));
    for ids in by_owner.values() {
        for &id in ids {
            router.read("users", &pk(id)).unwrap();
        }
    }
    for (&owner, ids) in &by_owner {
        let mut c = cluster.con(owner);
        for &id in ids {
            assert!(
                exists(&mut c, &user_key(id)),
                "{} cached on its owner {owner}",
                user_key(id)
            );
        }
    }
    let before: Vec<i64> = cluster
        .primaries()
        .iter()
        .map(|&n| stat_of(&stats(&mut cluster.con(n)), "notifications_received"))
        .collect();
    let all: Vec<String> = by_owner
        .values()
        .flatten()
        .map(|id| id.to_string())
        .collect();
    pg.execute(&format!(
        "UPDATE users SET name = 'updated ' || id WHERE id IN ({})",
        all.join(",")
    ));
    let t = Instant::now();
    for (&owner, ids) in &by_owner {
        let mut c = cluster.con(owner);
        for &id in ids {
            let key = user_key(id);
            wait_until_within(
                &format!("the UPDATE drops {key} on its owner node {owner}"),
                Duration::from_secs(10),
                || {
                    if exists(&mut c, &key) {
                        Err("still cached".into())
                    } else {
                        Ok(())
                    }
                },
            );
        }
    }
    eprintln!(
        "UPDATE of {} rows on 3 shards: every entry dropped within {:?}",
        all.len(),
        t.elapsed()
    );
    let after: Vec<i64> = cluster
        .primaries()
        .iter()
        .map(|&n| stat_of(&stats(&mut cluster.con(n)), "notifications_received"))
        .collect();
    eprintln!("notifications_received per primary: before {before:?}, after {after:?}");
    for ids in by_owner.values() {
        for &id in ids {
            let row = json(&router.read("users", &pk(id)).unwrap().unwrap());
            assert_eq!(row, pg_row(&pg, id));
            assert_eq!(row["name"], format!("updated {id}"));
        }
    }
    assert_entries_match_pg(&cluster, &pg);
}

// ---------------------------------------------------------------------------
// e. MULTIREAD across slots

#[test]
fn multiread_across_every_primary_answers_every_row_in_order() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let by_owner = ids_on_every_primary(&cluster, 4);
    // interleave the shards, with a missing row in the middle
    let mut ids: Vec<i64> = Vec::new();
    for k in 0..4 {
        for v in by_owner.values() {
            ids.push(v[k]);
        }
        if k == 1 {
            ids.push(999_999);
        }
    }
    let arg = format!(
        "[{}]",
        ids.iter().map(|&id| pk(id)).collect::<Vec<_>>().join(",")
    );
    let target = cluster.node_for_key(arg.as_bytes());
    let mut p = Problems::new("MULTIREAD across slots");
    let reply = multiread(&mut cluster.con(target), "users", &arg);
    match reply {
        Err(e) => p.add(format!(
            "MULTIREAD on node {target} (the node of its first pk): {e}"
        )),
        Ok(s) => {
            let got = json(&s);
            let arr = got.as_array().cloned().unwrap_or_default();
            p.check(arr.len() == ids.len(), || {
                format!(
                    "MULTIREAD answered {} elements for {} pks: {s}",
                    arr.len(),
                    ids.len()
                )
            });
            for (k, (&id, v)) in ids.iter().zip(arr.iter()).enumerate() {
                let want = pg
                    .row_json("users", &format!("id = {id}"))
                    .unwrap_or(Value::Null);
                p.check(*v == want, || {
                    format!("element {k} ({}): got {v}, PostgreSQL has {want}", pk(id))
                });
            }
        }
    }
    let dbsizes = cluster.dbsizes();
    eprintln!(
        "MULTIREAD of {} pks (3 shards) on node {target}: dbsize per node {dbsizes:?}; STATS of node {target}: misses {}, pg_queries {}",
        ids.len(),
        cluster.stat(target, "misses"),
        cluster.stat(target, "pg_queries")
    );
    // every entry cached is on a node serving it
    if let Err(e) = entries_match_pg(&cluster, &pg, Duration::from_secs(5)) {
        p.add(e);
    }
    // a second MULTIREAD answers the same
    if let Ok(s) = multiread(&mut cluster.con(target), "users", &arg) {
        let n = json(&s).as_array().map(Vec::len).unwrap_or(0);
        p.check(n == ids.len(), || format!("second MULTIREAD: {s}"));
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// f. WRITE, INVALIDATE, INVALIDATE_TABLE

#[test]
fn write_invalidate_and_invalidate_table_in_a_cluster() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let by_owner = ids_on_every_primary(&cluster, 30);
    let mut router = Router::new(&cluster, Duration::from_secs(5));

    // WRITE then INVALIDATE on the owner
    for ids in by_owner.values() {
        let id = ids[0];
        let owner = cluster.node_for_key(pk(id).as_bytes());
        let data = format!(r#"{{"id":{id},"name":"written"}}"#);
        let mut c = cluster.con(owner);
        assert_eq!(write(&mut c, "users", &pk(id), &data).unwrap(), "OK");
        assert_eq!(get(&mut c, &user_key(id)).as_deref(), Some(data.as_str()));
        assert_eq!(
            read(&mut c, "users", &pk(id)).unwrap().as_deref(),
            Some(data.as_str())
        );
        assert_eq!(invalidate(&mut c, "users", &pk(id)).unwrap(), "OK");
        assert!(
            !exists(&mut c, &user_key(id)),
            "INVALIDATE dropped {}",
            user_key(id)
        );
        assert_eq!(
            json(&read(&mut c, "users", &pk(id)).unwrap().unwrap()),
            pg_row(&pg, id)
        );
    }

    // INVALIDATE_TABLE on one node empties the table on every primary
    for ids in by_owner.values() {
        for &id in ids {
            router.read("users", &pk(id)).unwrap();
        }
    }
    let before = cluster.dbsizes();
    let primaries = cluster.primaries();
    let on = primaries[0];
    let t = Instant::now();
    let dropped: redis::RedisResult<i64> = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("users")
        .query(&mut cluster.con(on));
    let dropped = dropped.unwrap_or_else(|e| panic!("INVALIDATE_TABLE users on node {on}: {e}"));
    let mut left = Vec::new();
    let emptied = (|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            left = primaries
                .iter()
                .map(|&n| (n, cluster.scan_keys(n, "pg_cache:users:*").len()))
                .collect();
            if left.iter().all(|&(_, k)| k == 0) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    eprintln!(
        "INVALIDATE_TABLE users on node {on}: replied {dropped}; dbsizes before {before:?}; \
         every primary empty after {:?}: {emptied} (entries left per node {left:?})",
        t.elapsed()
    );
    assert!(
        emptied,
        "INVALIDATE_TABLE users on node {on} (replied {dropped}) left users entries on primaries \
         (node, entries) {left:?} after 10 s; before: dbsizes {before:?}"
    );
    for ids in by_owner.values() {
        let id = ids[1];
        assert_eq!(
            json(&router.read("users", &pk(id)).unwrap().unwrap()),
            pg_row(&pg, id)
        );
    }
    assert_entries_match_pg(&cluster, &pg);
}

// ---------------------------------------------------------------------------
// g. ACL on derived keys

#[test]
fn acl_checks_the_derived_key_never_the_raw_pk() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let users: [(&str, &[&str]); 4] = [
        ("all", &["+@all", "~pg_cache:*"]),
        ("narrow", &["+pgcache.read", "~pg_cache:users:*"]),
        ("elsewhere", &["+@all", "~other:*"]),
        ("braces", &["+@all", "~{*"]),
    ];
    cluster.on_every_node(|_, c| {
        for (name, rules) in users {
            let _: String = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(name)
                .arg("on")
                .arg("nopass")
                .arg(rules)
                .query(c)
                .unwrap();
        }
    });
    let by_owner = ids_on_every_primary(&cluster, 2);
    let mut p = Problems::new("ACL in cluster mode");
    for ids in by_owner.values() {
        for &id in ids {
            let owner = cluster.node_for_key(pk(id).as_bytes());
            for (name, _) in users {
                let mut c = cluster.con(owner);
                let _: String = redis::cmd("AUTH").arg(name).arg("x").query(&mut c).unwrap();
                let r = read(&mut c, "users", &pk(id));
                let rules = users.iter().find(|u| u.0 == name).unwrap().1;
                match (name, r) {
                    ("all" | "narrow", Ok(Some(row))) => {
                        let fresh = json(&row) == pg_row(&pg, id);
                        p.check(fresh, || {
                            format!("user {name}: READ {} answered {row}", pk(id))
                        })
                    }
                    ("all" | "narrow", other) => p.add(format!(
                        "user {name} ({rules:?}) must READ {} on its owner: {other:?}",
                        pk(id)
                    )),
                    (_, Err(e)) if e.code() == Some("NOPERM") => {
                        let text = err_text(&e);
                        let modules =
                            text.contains("derived by pgcache") && text.contains("pg_cache:users:");
                        p.check(modules, || {
                            format!(
                                "user {name}: the NOPERM should be the module's, naming the \
                                 derived key: {text}"
                            )
                        });
                    }
                    (_, other) => p.add(format!(
                        "user {name} ({rules:?}): READ {} should be NOPERM (derived key {}), \
                         got {other:?}",
                        pk(id),
                        user_key(id)
                    )),
                }
            }
        }
    }
    if let Err(e) = entries_match_pg(&cluster, &pg, Duration::from_secs(5)) {
        p.add(e);
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// h. canonical spellings

#[test]
fn non_canonical_spellings_are_refused_with_the_canonical_form() {
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let mut p = Problems::new("canonical spellings in cluster mode");

    let canon: redis::RedisResult<String> = redis::cmd("PGCACHE.CANONICAL")
        .arg("users")
        .arg(r#"{"id":"1"}"#)
        .query(&mut cluster.con(0));
    p.check(canon.as_deref() == Ok(r#"{"id":1}"#), || {
        format!(r#"PGCACHE.CANONICAL users {{"id":"1"}} should answer {{"id":1}}, got {canon:?}"#)
    });
    let canon: redis::RedisResult<String> = redis::cmd("PGCACHE.CANONICAL")
        .arg("products")
        .arg(r#"{"product_id":"1","category":"books"}"#)
        .query(&mut cluster.con(0));
    p.check(
        canon.as_deref() == Ok(r#"{"category":"books","product_id":1}"#),
        || format!("PGCACHE.CANONICAL products (unsorted, a string for an integer): {canon:?}"),
    );

    // sent where a stock client sends it: the node of the raw argument's slot
    let refused: [(&str, &str, &str); 4] = [
        ("users", r#"{ "id" : 1 }"#, r#"{"id":1}"#),
        ("users", r#"{"id":"1"}"#, r#"{"id":1}"#),
        ("users", r#"{"id":"0001"}"#, r#"{"id":1}"#),
        (
            "products",
            r#"{"product_id":1,"category":"books"}"#,
            r#"{"category":"books","product_id":1}"#,
        ),
    ];
    for (table, raw, canonical) in refused {
        let node = cluster.node_for_key(raw.as_bytes());
        let mut c = cluster.con(node);
        for cmd in ["PGCACHE.READ", "PGCACHE.WRITE", "PGCACHE.INVALIDATE"] {
            let mut q = redis::cmd(cmd);
            q.arg(table).arg(raw);
            if cmd == "PGCACHE.WRITE" {
                q.arg(r#"{"x":1}"#);
            }
            let r: redis::RedisResult<redis::Value> = q.query(&mut c);
            match r {
                Err(e) if err_text(&e).starts_with("ERR") && err_text(&e).contains(canonical) => {}
                other => p.add(format!(
                    "{cmd} {table} {raw} (slot {}, canonical {canonical} slot {}): expected an ERR containing {canonical}, got {}",
                    slot_of(raw.as_bytes()),
                    slot_of(canonical.as_bytes()),
                    match other {
                        Ok(v) => format!("a reply: {}", render(&v)),
                        Err(e) => err_text(&e),
                    }
                )),
            }
        }
    }
    // trailing whitespace keeps the hash tag: accepted
    let raw = "{\"id\":1} ";
    let node = cluster.node_for_key(raw.as_bytes());
    let r = read(&mut cluster.con(node), "users", raw);
    p.check(
        matches!(&r, Ok(Some(row)) if json(row) == pg_row(&pg, 1)),
        || format!("READ users {raw:?} (same hash tag as the canonical form) should answer the row: {r:?}"),
    );
    // `{` in the prefix is refused at load in cluster mode
    let mut args = pg.module_args();
    args.extend(["cache_prefix".to_string(), "{pg}:".to_string()]);
    match RedisServer::builder()
        .module_args(&args)
        .server_args(&["--cluster-enabled", "yes"])
        .try_start()
    {
        Start::Up(_) => p.add(
            "a cluster node loaded pgcache with cache_prefix {pg}: (braces in the prefix pin \
             every entry to one slot; must be refused in cluster mode)"
                .to_string(),
        ),
        Start::Refused(log) => p.check(log.contains("{pg}:"), || {
            format!(
                "the refusal of cache_prefix {{pg}}: should name it; log:\n{}",
                tail(&log, 10)
            )
        }),
    }
    // outside cluster mode nothing changes
    let standalone = RedisServer::with_pg(&pg, &[]);
    let r = read(&mut standalone.con(), "users", r#"{ "id" : 1 }"#);
    p.check(
        matches!(&r, Ok(Some(row)) if json(row) == pg_row(&pg, 1)),
        || format!("standalone: READ users {{ \"id\" : 1 }} should still answer the row: {r:?}"),
    );
    if let Err(e) = entries_match_pg(&cluster, &pg, Duration::from_secs(5)) {
        p.add(e);
    }
    p.finish();
}

// ---------------------------------------------------------------------------
// i, j. failover under load

#[test]
fn manual_failover_under_reads_and_updates() {
    failover_under_load(true);
}

#[test]
fn automatic_failover_under_reads_and_updates() {
    failover_under_load(false);
}

// ---------------------------------------------------------------------------
// k. resharding under load

#[test]
fn resharding_under_reads_and_updates() {
    let t_test = Instant::now();
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let moving = 1000usize;
    // redis-cli moves the source's lowest slots first
    let first = cluster.served_slots(from)[0].0;
    let moved_range = (first, first + moving as u16 - 1);
    let in_range = |id: i64| {
        let s = slot_of(pk(id).as_bytes());
        moved_range.0 <= s && s <= moved_range.1
    };
    let hot: Vec<i64> = (1..=1000).filter(|&id| in_range(id)).collect();
    let cold: Vec<i64> = (1..=1000).filter(|&id| !in_range(id)).take(60).collect();
    let mut ids = hot.clone();
    ids.extend(&cold);
    let mut router = Router::new(&cluster, Duration::from_secs(5));
    for &id in &ids {
        router.read("users", &pk(id)).unwrap();
    }
    eprintln!(
        "[reshard] {} of the ids read hash into slots {}..={} of node {from}; dbsizes {:?}",
        hot.len(),
        moved_range.0,
        moved_range.1,
        cluster.dbsizes()
    );
    let load = ReadUpdateLoad::start(
        &cluster,
        &pg,
        LoadSpec {
            read_ids: ids.clone(),
            update_ids: hot.iter().chain(cold.iter().take(20)).copied().collect(),
            update_every: Duration::from_millis(20),
            readers: 1,
            miss_ids: Vec::new(),
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let run = cluster.reshard(from, to, moving);
    std::thread::sleep(Duration::from_millis(1000));
    let report = load.stop();
    eprintln!(
        "[reshard] redis-cli --cluster reshard of {moving} slots from node {from} to node {to}: \
         {:?} after {:?}",
        run.status, run.elapsed
    );
    eprintln!("[reshard] {report}");
    let bad: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.contains("BUSYKEY") || l.contains("still hold keys") || l.contains("[ERR]"))
        .collect();
    assert!(
        run.success() && bad.is_empty(),
        "redis-cli --cluster reshard {moving} slots from node {from} to node {to} failed ({:?}): {}\n\
         ---- its output (tail) ----\n{}",
        run.status,
        bad.iter().take(3).copied().collect::<Vec<_>>().join(" | "),
        tail(&run.output, 15)
    );
    cluster.wait_ok(Duration::from_secs(20));
    assert_eq!(
        cluster
            .served_slots(to)
            .iter()
            .filter(|r| r.0 == moved_range.0)
            .count(),
        1,
        "node {to} serves the moved slots: {:?}",
        cluster.served_slots(to)
    );
    let audit = assert_entries_match_pg(&cluster, &pg);
    eprintln!(
        "[reshard] no entry outside its node's slots, stale entries: 0; entries per node {:?}; test took {:?}",
        audit.per_node,
        t_test.elapsed()
    );
}

// ---------------------------------------------------------------------------
// the README's redis-py program

/// examples/python/cluster.py, which the README's Redis Cluster section
/// holds verbatim, runs against a real cluster and ends with every row
/// cached on its owner.
#[test]
fn readme_cluster_example_runs_verbatim() {
    let program = std::fs::read_to_string(repo().join("examples/python/cluster.py"))
        .expect("examples/python/cluster.py");
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    assert!(
        readme.contains(&format!("```python\n{program}```\n")),
        "README.md's Redis Cluster section must hold examples/python/cluster.py verbatim"
    );
    let pg = watched_pg();
    let cluster = Cluster::start(&pg, 3, 0);
    let run = |what: &str| -> String {
        let mut cmd = Command::new("python3");
        cmd.arg(repo().join("examples/python/cluster.py"))
            .env("PYTHONPATH", python_deps())
            .env("REDIS_CLUSTER", format!("127.0.0.1:{}", cluster.port(0)))
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let out = cmd.output().expect("run python3");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success(),
            "{what} run of examples/python/cluster.py failed:\n{stdout}\n{stderr}"
        );
        stdout
    };
    let first = run("first");
    assert!(
        first.contains("MULTIREAD users ids 1-5 on 3 nodes"),
        "{first}"
    );
    let hits_before: i64 = (0..3).map(|i| cluster.stat(i, "hits")).sum();
    run("second");
    let hits_after: i64 = (0..3).map(|i| cluster.stat(i, "hits")).sum();
    // The second run: its READ of id 1 hits (the first run's MULTIREAD
    // cached every row on its owner), its INVALIDATE drops id 1, and its
    // MULTIREAD hits the other four.
    assert_eq!(hits_after - hits_before, 5, "hits of the second run");
    for i in cluster.primaries() {
        for key in cluster.scan_keys(i, "pg_cache:*") {
            let slot = slot_of(key.as_bytes());
            assert!(
                cluster
                    .served_slots(i)
                    .iter()
                    .any(|&(a, b)| (a..=b).contains(&slot)),
                "{key} (slot {slot}) on node {i}, which does not serve it"
            );
        }
    }
}
