//! Issue 11, task A: load, configuration and context defects of commit
//! 55053e4 (review ids H5, H6, M2, M7, M8, M10).
//!
//! Every test here fails on the module of 55053e4 and states what the fixed
//! module does, following the contract of the issue (trust states, error
//! texts, `fills_uncached_oom`). The exceptions, parts that the baseline
//! already gets right, say so in their doc comments.

mod common;

use common::*;
use redis::ConnectionLike;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The error text of a miss that cannot wait (MULTI, Lua, RM_Call).
const CANNOT_WAIT: &str = "cannot wait for PostgreSQL here";

// ---------------------------------------------------------------------------
// small helpers

/// Send a command and return the reply as it came, errors nested in arrays
/// included (`query` would turn the first nested error into an `Err`).
/// Panics when no reply comes: the server hung or died.
#[track_caller]
fn raw(c: &mut redis::Connection, args: &[&str]) -> Value2 {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match c.req_command(&cmd) {
        Ok(v) => Value2(v),
        Err(e) => panic!("{args:?}: no reply (the server hung or died): {e}"),
    }
}

/// The lines of a Redis crash report that say what crashed.
fn crash_summary(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let Some(at) = lines.iter().position(|l| l.contains("crashed by signal")) else {
        return "no crash report in the log".into();
    };
    let mut out: Vec<&str> = lines[at..].iter().take(3).copied().collect();
    if let Some(eip) = lines[at..].iter().position(|l| l.starts_with("EIP:")) {
        out.extend(lines[at + eip..].iter().skip(1).take(1));
    }
    out.join(" | ")
}

/// `raw` on a harness server: when no reply comes, says whether the server
/// died and what its crash report says.
#[track_caller]
fn raw_on(r: &mut RedisServer, c: &mut redis::Connection, args: &[&str]) -> Value2 {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match c.req_command(&cmd) {
        Ok(v) => Value2(v),
        Err(e) if !r.alive() => panic!(
            "{args:?}: redis-server died ({e}): {}",
            crash_summary(&r.log())
        ),
        Err(e) => panic!("{args:?}: no reply within {HANG:?} although the server is up: {e}"),
    }
}

/// A reply, with accessors for what the tests look at.
#[derive(Debug)]
struct Value2(redis::Value);

impl Value2 {
    /// The text of an error reply (`ERR ...`), if it is one.
    fn error(&self) -> Option<String> {
        error_text(&self.0)
    }

    /// A bulk or simple string, if it is one.
    fn text(&self) -> Option<String> {
        string_of(&self.0)
    }
}

fn error_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::ServerError(e) => {
            Some(format!("{} {}", e.code(), e.details().unwrap_or_default()))
        }
        _ => None,
    }
}

fn string_of(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Okay => Some("OK".into()),
        _ => None,
    }
}

#[track_caller]
fn assert_cannot_wait(reply: &Value2, what: &str) {
    match reply.error() {
        Some(e) => assert!(
            e.contains(CANNOT_WAIT),
            "{what}: the error should contain {CANNOT_WAIT:?}; got {e:?}"
        ),
        None => panic!("{what}: expected an error containing {CANNOT_WAIT:?}; got {reply:?}"),
    }
}

/// The threads of process `pid`: (tid, name as `comm` shows it).
fn threads(pid: u32) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .filter_map(|t| t.ok())
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let name = fs::read_to_string(t.path().join("comm")).ok()?;
            Some((tid, name.trim().to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Threads of `pid` that are not in `before`, leaving out jemalloc's
/// background threads (jemalloc starts them on demand). A new thread may
/// not have set its name yet (it shows `redis-server` until it does).
fn new_threads(pid: u32, before: &[(u32, String)]) -> Vec<(u32, String)> {
    threads(pid)
        .into_iter()
        .filter(|(tid, name)| {
            name != "jemalloc_bg_thd" && !before.iter().any(|(old, _)| old == tid)
        })
        .collect()
}

/// READ until it answers a row (errors are allowed meanwhile: a pool that
/// notices a connection PostgreSQL closed); panics after `HANG`.
#[track_caller]
fn read_eventually(c: &mut redis::Connection, table: &str, pk: &str) -> Value {
    let mut out = Value::Null;
    wait_until(
        &format!("PGCACHE.READ {table} {pk} answers a row"),
        || match read(c, table, pk) {
            Ok(Some(s)) => {
                out = json(&s);
                Ok(())
            }
            Ok(None) => panic!("PGCACHE.READ {table} {pk} returned nil"),
            Err(e) => Err(err_text(&e)),
        },
    );
    out
}

/// A plain redis-server (the module not loaded) that allows MODULE and DEBUG.
fn plain_redis() -> RedisServer {
    RedisServer::builder()
        .without_module()
        .server_args(&[
            "--enable-module-command",
            "yes",
            "--enable-debug-command",
            "yes",
        ])
        .start()
}

/// Run `args` and check that the server answered without an error and is
/// still up.
#[track_caller]
fn must_survive(r: &mut RedisServer, c: &mut redis::Connection, args: &[&str], after: &str) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let reply = c.req_command(&cmd);
    if !r.alive() {
        let log = r.log();
        let crash = crash_summary(&log);
        panic!(
            "redis-server died running {args:?} after {after} (reply {reply:?}): {crash}\n\
             log tail:\n{}",
            tail(&log, 30)
        );
    }
    match reply {
        Ok(v) => assert!(
            error_text(&v).is_none(),
            "{args:?} after {after} answered an error: {v:?}"
        ),
        Err(e) => panic!("{args:?} after {after}: no reply although the server is up: {e}"),
    }
    assert!(ping(c), "no PONG after {args:?} ({after})");
}

/// MODULE LOAD of pgcache with these arguments.
fn module_load(c: &mut redis::Connection, args: &[String]) -> Value2 {
    let path = module_path();
    let mut all = vec!["MODULE", "LOAD", path.to_str().unwrap()];
    all.extend(args.iter().map(String::as_str));
    raw(c, &all)
}

// ---------------------------------------------------------------------------
// 1. A refused MODULE LOAD leaves nothing behind (H6)

/// H6: `MODULE LOAD` refused for a bad argument (a typo, `pg_prot`) must not
/// leave server-event callbacks behind: FLUSHALL, FLUSHDB, DEBUG RELOAD and
/// SAVE all keep the server up. Then a correct MODULE LOAD succeeds and a
/// READ works.
#[test]
fn refused_module_load_leaves_no_event_callbacks() {
    let pg = PgServer::start_new();
    let mut r = plain_redis();
    let mut c = r.con_with_read_timeout(HANG);

    let refused = module_load(&mut c, &["pg_prot".into(), "5432".into()]);
    assert!(
        refused.error().is_some(),
        "MODULE LOAD with the unknown argument pg_prot was accepted: {refused:?}"
    );
    assert!(
        r.log().contains("pg_prot"),
        "the log does not name the bad argument pg_prot:\n{}",
        tail(&r.log(), 20)
    );
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    let after = "a refused MODULE LOAD (pg_prot)";
    must_survive(&mut r, &mut c, &["FLUSHALL"], after);
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    must_survive(&mut r, &mut c, &["FLUSHDB"], after);
    let _: () = redis::cmd("SET").arg("k2").arg("v").query(&mut c).unwrap();
    must_survive(&mut r, &mut c, &["DEBUG", "RELOAD"], after);
    assert!(exists(&mut c, "k2"), "DEBUG RELOAD lost a key");
    must_survive(&mut r, &mut c, &["SAVE"], after);
    must_survive(&mut r, &mut c, &["FLUSHALL"], after);

    // a correct load works afterwards
    let loaded = module_load(&mut c, &pg.module_args());
    assert_eq!(
        loaded.text().as_deref(),
        Some("OK"),
        "MODULE LOAD with correct arguments after a refused one: {loaded:?}"
    );
    let row = read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(row, pg.row_json("users", "id = 1").unwrap());
    must_survive(&mut r, &mut c, &["FLUSHALL"], "a correct MODULE LOAD");
    assert!(r.alive());
}

/// H6: a MODULE LOAD refused late (`pg_sslmode verify-full` with a CA file
/// that does not exist, found when the pool is made) leaves no thread of the
/// module behind (no `pgcache-worker`, no other new thread), and the server
/// survives FLUSHALL. A correct MODULE LOAD then succeeds (and does start
/// `pgcache-worker` threads, which shows the check can see them) and a READ
/// works.
#[test]
fn refused_module_load_leaves_no_threads() {
    let pg = PgServer::start_new();
    let mut r = plain_redis();
    let mut c = r.con_with_read_timeout(HANG);
    let pid = r.pid();
    let before = threads(pid);

    let mut args = pg.module_args();
    args.extend(
        [
            "pg_sslmode",
            "verify-full",
            "pg_sslrootcert",
            "/nonexistent/ca.pem",
        ]
        .map(String::from),
    );
    let refused = module_load(&mut c, &args);
    assert!(
        refused.error().is_some(),
        "MODULE LOAD with verify-full and a missing CA file was accepted: {refused:?}"
    );
    // Threads a module stops on its way out may take a moment to exit.
    wait_until(
        "no thread of a refused MODULE LOAD is left (pgcache-worker or unnamed)",
        || match new_threads(pid, &before) {
            left if left.is_empty() => Ok(()),
            left => Err(format!("new threads: {left:?}")),
        },
    );
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    must_survive(
        &mut r,
        &mut c,
        &["FLUSHALL"],
        "a refused MODULE LOAD (missing CA file)",
    );

    let loaded = module_load(&mut c, &pg.module_args());
    assert_eq!(
        loaded.text().as_deref(),
        Some("OK"),
        "MODULE LOAD with correct arguments after a refused one: {loaded:?}"
    );
    let row = read_row(&mut c, "users", r#"{"id":2}"#);
    assert_eq!(row, pg.row_json("users", "id = 2").unwrap());
    wait_until(
        "a loaded module runs pgcache-worker threads (else the check above proves nothing)",
        || {
            let names = threads(pid);
            if names.iter().any(|(_, n)| n == "pgcache-worker") {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    );
    must_survive(&mut r, &mut c, &["FLUSHALL"], "a correct MODULE LOAD");
}

// ---------------------------------------------------------------------------
// 2. cache_prefix is non-empty and ends in a separator (H5)

/// H5: a `cache_prefix` that is empty or does not end in one of `: / | . #`
/// refuses the load, with a log line naming `cache_prefix`; prefixes ending
/// in each separator load, and `app:cache:` is the one entries are stored
/// under.
#[test]
fn cache_prefix_is_checked_at_load() {
    let port = free_port().to_string();
    for bad in ["", "pg", "pg_cache", "app:cache"] {
        let log = RedisServer::start_expect_refused(&[
            "pg_port",
            port.as_str(),
            "pg_connect_timeout_ms",
            "500",
            "cache_prefix",
            bad,
        ]);
        assert!(
            log.lines().any(|l| l.contains("cache_prefix")),
            "load with cache_prefix {bad:?} was refused, but no log line names cache_prefix:\n{}",
            tail(&log, 20)
        );
    }
    let pg = PgServer::start_new();
    for good in ["p/", "p|", "p.", "p#", "p:"] {
        let mut args = pg.module_args();
        args.extend(["cache_prefix".to_string(), good.to_string()]);
        let r = RedisServer::start(&args);
        let mut c = r.con();
        assert_eq!(config_value(&mut c, "pgcache.cache_prefix"), good);
    }
    let r = RedisServer::with_pg(&pg, &["cache_prefix", "app:cache:"]);
    let mut c = r.con();
    let row = read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(row, pg.row_json("users", "id = 1").unwrap());
    assert!(
        exists(&mut c, r#"app:cache:users:{"id":1}"#),
        "the entry is not under the prefix app:cache:: {:?}",
        keys(&mut c, "*")
    );
}

/// H5: `CONFIG SET pgcache.cache_prefix` refuses `""` and `pg` with an error
/// naming `cache_prefix` and keeps the value; `other/` is accepted and new
/// entries are stored under it.
#[test]
fn cache_prefix_is_checked_by_config_set() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for bad in ["", "pg"] {
        let e = expect_err(
            config_set(&mut c, "pgcache.cache_prefix", bad),
            &format!("CONFIG SET pgcache.cache_prefix {bad:?}"),
        );
        assert_mentions(&e, &["cache_prefix"], "CONFIG SET cache_prefix");
        assert_eq!(
            config_value(&mut c, "pgcache.cache_prefix"),
            "pg_cache:",
            "a refused CONFIG SET cache_prefix {bad:?} changed the value"
        );
    }
    config_set(&mut c, "pgcache.cache_prefix", "other/").expect("CONFIG SET cache_prefix other/");
    assert_eq!(config_value(&mut c, "pgcache.cache_prefix"), "other/");
    let row = read_row(&mut c, "users", r#"{"id":3}"#);
    assert_eq!(row, pg.row_json("users", "id = 3").unwrap());
    assert!(
        exists(&mut c, r#"other/users:{"id":3}"#),
        "the entry is not under the new prefix: {:?}",
        keys(&mut c, "*")
    );
}

// ---------------------------------------------------------------------------
// 3. flushes delete only pgcache's entries (H5)

/// Keys that look like entries but that pgcache never writes, and keys
/// outside its prefix: (key, type, value as `GET`/`HGET f` shows it).
const LOOK_ALIKES: &[(&str, &str, &str)] = &[
    // not JSON after the table
    ("pg_cache:cart:{u42}", "string", "cart of u42"),
    // a non-canonical spelling of an integer key (pgcache writes {"id":7})
    (
        r#"pg_cache:users:{"id":"7"}"#,
        "string",
        r#"{"id":7,"name":"not from pgcache"}"#,
    ),
    // not the primary-key columns
    (r#"pg_cache:users:{"nope":1}"#, "string", r#"{"nope":1}"#),
    // an entry's name, but a hash
    (r#"pg_cache:users:{"id":8}"#, "hash", "a user's hash"),
    // a string, but no such table in PostgreSQL
    (r#"pg_cache:nosuchtable:{"id":1}"#, "string", r#"{"id":1}"#),
    // outside the prefix
    ("cart:{u42}", "string", "outside the prefix"),
    (r#"session:{"id":1}"#, "string", "a session"),
];

fn create_look_alikes(c: &mut redis::Connection) {
    for (key, kind, value) in LOOK_ALIKES {
        match *kind {
            "hash" => {
                let _: i64 = redis::cmd("HSET")
                    .arg(*key)
                    .arg("f")
                    .arg(*value)
                    .query(c)
                    .unwrap();
            }
            _ => {
                let _: () = redis::cmd("SET").arg(*key).arg(*value).query(c).unwrap();
            }
        }
    }
}

#[track_caller]
fn assert_look_alikes_survive(c: &mut redis::Connection, after: &str) {
    for (key, kind, value) in LOOK_ALIKES {
        let t: String = redis::cmd("TYPE").arg(*key).query(c).unwrap();
        assert_eq!(
            t, *kind,
            "{after} deleted or changed {key:?}, a key pgcache never wrote (TYPE {t})"
        );
        let got: Option<String> = match *kind {
            "hash" => redis::cmd("HGET").arg(*key).arg("f").query(c).unwrap(),
            _ => redis::cmd("GET").arg(*key).query(c).unwrap(),
        };
        assert_eq!(got.as_deref(), Some(*value), "{after} changed {key:?}");
    }
}

/// H5: PGCACHE.INVALIDATE_TABLE and the gap flush after a listener
/// reconnect delete pgcache's own entries only: with the default prefix,
/// keys that merely look like entries (not JSON, a non-canonical pk
/// spelling, not the pk columns, a hash, an unknown table) and keys outside
/// the prefix survive both, while the real entries are gone.
#[test]
fn flushes_delete_only_pgcache_entries() {
    let pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    for id in 1..=5 {
        read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert!(exists(&mut c, &user_key(id)), "{} not cached", user_key(id));
    }
    create_look_alikes(&mut c);

    let dropped: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("users")
        .query(&mut c)
        .unwrap();
    for id in 1..=5 {
        assert!(
            !exists(&mut c, &user_key(id)),
            "INVALIDATE_TABLE users left {}",
            user_key(id)
        );
    }
    assert_look_alikes_survive(&mut c, "PGCACHE.INVALIDATE_TABLE users");
    assert_eq!(
        dropped, 5,
        "INVALIDATE_TABLE users answers how many it dropped"
    );

    // the same after a listener gap
    for id in 1..=5 {
        read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert!(exists(&mut c, &user_key(id)), "{} not cached", user_key(id));
    }
    let before = stats(&mut c);
    kill_listener(&pg);
    wait_reconnected_and_flushed(&r, &before);
    for id in 1..=5 {
        assert!(
            !exists(&mut c, &user_key(id)),
            "the gap flush left {}",
            user_key(id)
        );
    }
    assert_look_alikes_survive(&mut c, "the gap flush after a listener reconnect");
}

// ---------------------------------------------------------------------------
// 4. maxmemory (M2)

const BLOB_ROWS: i64 = 40_000;

/// The `body` of row `id` of `blobs`: 1 000 bytes.
fn blob_body(id: i64) -> String {
    format!("{}{id:010}", "x".repeat(990))
}

/// M2: with `maxmemory 8mb` and `noeviction`, MULTIREAD of 40 000 rows of
/// 1 000 bytes (40 MB) answers every row correctly but stops caching once
/// Redis is over maxmemory: `used_memory` stays below 20 MB and
/// `fills_uncached_oom` counts the fills answered without caching. READs
/// keep answering correctly afterwards.
#[test]
fn fills_respect_maxmemory() {
    let pg = PgServer::start_new();
    pg.execute(&format!(
        "CREATE TABLE blobs (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
         INSERT INTO blobs SELECT g, repeat('x', 990) || lpad(g::text, 10, '0')
         FROM generate_series(1, {BLOB_ROWS}) g;
         ANALYZE blobs;"
    ));
    let r = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
    );
    wait_listener_ready(&r);
    let mut c = r.con_with_read_timeout(HANG);

    let batch = 500;
    let mut id = 1;
    while id <= BLOB_ROWS {
        let ids: Vec<i64> = (id..(id + batch).min(BLOB_ROWS + 1)).collect();
        let pks: Vec<String> = ids.iter().map(|i| format!(r#"{{"id":{i}}}"#)).collect();
        let reply = multiread(&mut c, "blobs", &format!("[{}]", pks.join(",")))
            .unwrap_or_else(|e| panic!("MULTIREAD of blobs {id}..: {e}"));
        let arr = json(&reply);
        let arr = arr.as_array().expect("MULTIREAD answers a JSON array");
        assert_eq!(
            arr.len(),
            ids.len(),
            "MULTIREAD of blobs {id}..: one per key"
        );
        for (want, got) in ids.iter().zip(arr) {
            assert_eq!(got["id"], *want, "MULTIREAD of blobs {id}..: {got}");
            assert_eq!(
                got["body"].as_str(),
                Some(blob_body(*want).as_str()),
                "MULTIREAD of blobs {id}..: row {want} has a wrong body"
            );
        }
        id += batch;
    }

    let used: i64 = info_field(&mut c, "memory", "used_memory").parse().unwrap();
    assert!(
        used < 20 * 1024 * 1024,
        "with maxmemory 8mb (noeviction), fills of 40 MB of rows left used_memory at {used} bytes"
    );
    let s = stats(&mut c);
    assert!(
        stat_of(&s, "fills_uncached_oom") > 0,
        "no fill was counted as answered without caching over maxmemory: {s}"
    );
    for id in [1, 12_345, BLOB_ROWS] {
        let row = read_row(&mut c, "blobs", &format!(r#"{{"id":{id}}}"#));
        assert_eq!(row["id"], id);
        assert_eq!(row["body"].as_str(), Some(blob_body(id).as_str()));
    }
}

// ---------------------------------------------------------------------------
// 5. tuning does not wipe the cache (M7)

/// Wait until a change of `users` row `id`, whose entry is cached, was
/// applied: the entry is gone.
#[track_caller]
fn sentinel_round_trip(pg: &PgServer, c: &mut redis::Connection, id: i64, round: &str) {
    assert!(
        exists(c, &user_key(id)),
        "the sentinel {} is not cached",
        user_key(id)
    );
    pg.execute(&format!(
        "UPDATE users SET email = 'sentinel {round}' WHERE id = {id}"
    ));
    wait_gone_for(c, &user_key(id), "the sentinel's notification is applied");
}

/// Read users 1..=5 again: all hits (`hits` grows by 5, no query on
/// `users`), and the rows are right.
#[track_caller]
fn assert_still_hits(pg: &PgServer, c: &mut redis::Connection, after: &str) {
    let queries = pg.queries_on("users");
    let before = stats(c);
    for id in 1..=5 {
        let row = read_row(c, "users", &format!(r#"{{"id":{id}}}"#));
        assert_eq!(row["id"], id);
    }
    let s = stats(c);
    assert_eq!(
        stat_of(&s, "hits") - stat_of(&before, "hits"),
        5,
        "entries cached before {after} were not hits: {s}"
    );
    assert_eq!(
        pg.queries_on("users"),
        queries,
        "entries cached before {after} were queried again:\n{}",
        pg.statements()
    );
}

/// M7: CONFIG SET of pool and timeout settings (`pg_pool_size`,
/// `pg_query_timeout_ms`, `pg_connect_timeout_ms`) changes nothing for the
/// listener: the LISTEN backend is the same, `listener_reconnects` does not
/// move, and entries cached before are still hits.
#[test]
fn tuning_configs_keep_the_listener_and_the_cache() {
    let pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    for id in [1, 2, 3, 4, 5, 999] {
        read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert!(exists(&mut c, &user_key(id)), "{} not cached", user_key(id));
    }
    let pids = listen_session_pids(&pg);
    assert_eq!(pids.len(), 1, "one LISTEN session: {pids:?}");
    let before = stats(&mut c);

    for (name, value) in [
        ("pgcache.pg_pool_size", "3"),
        ("pgcache.pg_query_timeout_ms", "7000"),
        ("pgcache.pg_connect_timeout_ms", "6000"),
    ] {
        config_set(&mut c, name, value).unwrap_or_else(|e| panic!("CONFIG SET {name}: {e}"));
        assert_eq!(config_value(&mut c, name), value);
    }
    // whatever the module does about it has happened once a change made
    // after it was applied and the listener is ready
    sentinel_round_trip(&pg, &mut c, 999, "after tuning");
    wait_listener_ready(&r);

    let now = listen_session_pids(&pg);
    assert_eq!(
        now, pids,
        "CONFIG SET of pool size and timeouts replaced the LISTEN session"
    );
    let s = stats(&mut c);
    assert_eq!(
        stat_of(&s, "listener_reconnects"),
        stat_of(&before, "listener_reconnects"),
        "{s}"
    );
    assert_still_hits(&pg, &mut c, "CONFIG SET of pool size and timeouts");
}

/// M7: with `idle_session_timeout = '300ms'` on the module's role (set
/// before Redis starts), an idle listener is not disconnected: after 2 s
/// idle the LISTEN backend is the same, `listener_reconnects` is 0 and
/// cached entries are still hits. (The harness's short-lived connections
/// keep working with that setting; checked first.)
#[test]
fn idle_session_timeout_does_not_drop_the_listener() {
    let pg = watched_pg();
    pg.execute("ALTER ROLE postgres SET idle_session_timeout = '300ms'");
    assert_eq!(
        pg.query_text("SELECT current_setting('idle_session_timeout')")
            .as_deref(),
        Some("300ms"),
        "the role setting does not apply to new sessions"
    );
    pg.execute("SELECT 1");

    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    for id in 1..=5 {
        read_eventually(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert!(exists(&mut c, &user_key(id)), "{} not cached", user_key(id));
    }
    let pids = listen_session_pids(&pg);
    assert_eq!(pids.len(), 1, "one LISTEN session: {pids:?}");

    // idle for several idle_session_timeout periods
    std::thread::sleep(Duration::from_secs(2));

    let now = listen_session_pids(&pg);
    assert_eq!(
        now, pids,
        "idle_session_timeout replaced the LISTEN session"
    );
    let s = stats(&mut c);
    assert_eq!(
        stat_of(&s, "listener_reconnects"),
        0,
        "the idle listener was disconnected: {s}"
    );
    assert_still_hits(&pg, &mut c, "2 s of idle_session_timeout = 300ms");
}

// ---------------------------------------------------------------------------
// 6. contexts that cannot block (M10)

/// `redismodule.h` from the cargo registry's copy of redis-module 2.0.8.
fn redismodule_include_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let src = cargo_home.join("registry/src");
    let found = fs::read_dir(&src).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| e.path().join("redis-module-2.0.8/src/include"))
            .find(|p| p.join("redismodule.h").exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "redismodule.h not found under {}/*/redis-module-2.0.8/src/include/ \
             (run `cargo fetch`, or set CARGO_HOME)",
            src.display()
        )
    })
}

/// Build tests/fixtures/rmcall.c into `dir`; returns the .so path.
fn build_rmcall(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rmcall.c");
    let out = dir.join("rmcall.so");
    let result = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-I"])
        .arg(redismodule_include_dir())
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .output()
        .expect("run cc");
    assert!(
        result.status.success(),
        "cc {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    out
}

/// Wait until no fill is in flight (a fill a refused miss may have started
/// has ended and done whatever it does), the server staying up.
#[track_caller]
fn settle(r: &mut RedisServer, c: &mut redis::Connection, after: &str) {
    wait_until(&format!("no fill in flight after {after}"), || {
        if !r.alive() {
            panic!(
                "redis-server died after {after}; log tail:\n{}",
                tail(&r.log(), 30)
            );
        }
        let s = stats(c);
        match stat_of(&s, "fills_in_flight") {
            0 => Ok(()),
            _ => Err(s.to_string()),
        }
    });
}

/// Later RM_Calls answer their own replies (no reply landed in a pooled
/// temporary client).
#[track_caller]
fn assert_rmcall_replies_are_own(r: &mut RedisServer, c: &mut redis::Connection, after: &str) {
    for i in 0..5 {
        let pong = raw_on(r, c, &["RMCALL.CALL", "PING"]);
        assert_eq!(
            pong.text().as_deref(),
            Some("PONG"),
            "RMCALL.CALL PING #{i} after {after}"
        );
        let word = format!("echo-{i}");
        let echo = raw_on(r, c, &["RMCALL.CALL", "ECHO", &word]);
        assert_eq!(
            echo.text().as_deref(),
            Some(word.as_str()),
            "RMCALL.CALL ECHO #{i} after {after}"
        );
    }
}

/// M10: another module's `RedisModule_Call` of a miss cannot block its
/// temporary client: READ, MULTIREAD and a catalog miss through
/// `RMCALL.CALL` answer at once with an error containing `cannot wait for
/// PostgreSQL here`; later RM_Calls answer their own replies (PING, ECHO);
/// hits through RM_Call are answered as usual; the server stays up.
#[test]
fn rm_call_of_a_miss_answers_an_error_and_a_hit_the_row() {
    let pg = PgServer::start_new();
    let dir = tempfile::tempdir().unwrap();
    let so = build_rmcall(dir.path());
    let mut r = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--loadmodule", so.to_str().unwrap()],
    );
    wait_listener_ready(&r);
    let mut c = r.con_with_read_timeout(HANG);
    // the fixture works, and the catalog knows users
    assert_rmcall_replies_are_own(&mut r, &mut c, "start-up");
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);

    let reply = raw_on(
        &mut r,
        &mut c,
        &["RMCALL.CALL", "PGCACHE.READ", "users", r#"{"id":1}"#],
    );
    assert_cannot_wait(&reply, "a READ miss through RM_Call");
    settle(&mut r, &mut c, "a READ miss through RM_Call");
    assert_rmcall_replies_are_own(&mut r, &mut c, "a READ miss through RM_Call");
    let expected = pg.row_json("users", "id = 1").unwrap();
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), expected);
    let hit = raw_on(
        &mut r,
        &mut c,
        &["RMCALL.CALL", "PGCACHE.READ", "users", r#"{"id":1}"#],
    );
    assert_eq!(
        hit.text().map(|s| json(&s)),
        Some(expected),
        "a READ hit through RM_Call: {hit:?}"
    );

    let pks = r#"[{"id":2},{"id":3}]"#;
    let reply = raw_on(
        &mut r,
        &mut c,
        &["RMCALL.CALL", "PGCACHE.MULTIREAD", "users", pks],
    );
    assert_cannot_wait(&reply, "a MULTIREAD miss through RM_Call");
    settle(&mut r, &mut c, "a MULTIREAD miss through RM_Call");
    assert_rmcall_replies_are_own(&mut r, &mut c, "a MULTIREAD miss through RM_Call");
    let expected = json(&multiread(&mut c, "users", pks).unwrap());
    assert_eq!(
        expected,
        serde_json::json!([
            pg.row_json("users", "id = 2").unwrap(),
            pg.row_json("users", "id = 3").unwrap()
        ])
    );
    let hit = raw_on(
        &mut r,
        &mut c,
        &["RMCALL.CALL", "PGCACHE.MULTIREAD", "users", pks],
    );
    assert_eq!(
        hit.text().map(|s| json(&s)),
        Some(expected),
        "a MULTIREAD of hits through RM_Call: {hit:?}"
    );

    // a table never looked up: the catalog lookup cannot wait either
    let reply = raw_on(
        &mut r,
        &mut c,
        &[
            "RMCALL.CALL",
            "PGCACHE.READ",
            "products",
            r#"{"category":"books","product_id":1}"#,
        ],
    );
    assert_cannot_wait(&reply, "a catalog miss through RM_Call");
    settle(&mut r, &mut c, "a catalog miss through RM_Call");
    assert_rmcall_replies_are_own(&mut r, &mut c, "a catalog miss through RM_Call");

    assert!(ping(&mut c));
    assert!(r.alive(), "redis-server died");
}

/// M10, nested: another module's command inside MULTI/EXEC that calls
/// PGCACHE.READ through `RM_Call`. Its temporary client has no ACL user and
/// is met here for the first time inside the transaction (a fresh server):
/// the hit answers the row, the miss the `cannot wait` error, and Redis
/// stays up. Then the same from a Lua script.
#[test]
fn rm_call_inside_multi_and_a_script_answers_without_crashing() {
    let pg = PgServer::start_new();
    let dir = tempfile::tempdir().unwrap();
    let so = build_rmcall(dir.path());
    let mut r = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--loadmodule", so.to_str().unwrap()],
    );
    wait_listener_ready(&r);
    let mut c = r.con_with_read_timeout(HANG);
    let expected = pg.row_json("users", "id = 1").unwrap();
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), expected);

    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    for id in [1, 2] {
        let _: () = redis::cmd("RMCALL.CALL")
            .arg("PGCACHE.READ")
            .arg("users")
            .arg(format!(r#"{{"id":{id}}}"#))
            .query(&mut c)
            .unwrap();
    }
    let exec = raw_on(&mut r, &mut c, &["EXEC"]);
    let redis::Value::Array(items) = &exec.0 else {
        panic!("EXEC answered {exec:?}");
    };
    assert_eq!(items.len(), 2, "{exec:?}");
    assert_eq!(
        string_of(&items[0]).map(|s| json(&s)),
        Some(expected.clone()),
        "the hit through RM_Call inside MULTI: {exec:?}"
    );
    assert!(
        error_text(&items[1]).is_some_and(|e| e.contains(CANNOT_WAIT)),
        "the miss through RM_Call inside MULTI: {exec:?}"
    );
    assert!(r.alive(), "redis-server died");

    let hit = raw_on(
        &mut r,
        &mut c,
        &[
            "EVAL",
            "return redis.call('RMCALL.CALL', 'PGCACHE.READ', 'users', ARGV[1])",
            "0",
            r#"{"id":1}"#,
        ],
    );
    assert_eq!(
        hit.text().map(|s| json(&s)),
        Some(expected),
        "the hit through RM_Call from a script: {hit:?}"
    );
    assert!(ping(&mut c));
    assert!(r.alive(), "redis-server died");
}

/// M10: inside MULTI/EXEC a miss (READ, MULTIREAD, and a table never looked
/// up) is an element error containing `cannot wait for PostgreSQL here`,
/// while a hit in the same transaction answers the row; inside a Lua script
/// (`redis.call`) the same. No client hangs and the server stays up.
#[test]
fn multi_and_lua_miss_answers_an_error_and_a_hit_the_row() {
    let pg = PgServer::start_new();
    let mut r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    let mut c = r.con_with_read_timeout(HANG);
    let row1 = pg.row_json("users", "id = 1").unwrap();
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), row1);

    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    for args in [
        ["PGCACHE.READ", "users", r#"{"id":4}"#],
        ["PGCACHE.READ", "users", r#"{"id":1}"#],
        ["PGCACHE.MULTIREAD", "users", r#"[{"id":5},{"id":1}]"#],
        [
            "PGCACHE.READ",
            "products",
            r#"{"category":"books","product_id":1}"#,
        ],
    ] {
        let queued = raw_on(&mut r, &mut c, &args);
        assert_eq!(queued.text().as_deref(), Some("QUEUED"), "{args:?}");
    }
    let _: () = redis::cmd("ECHO").arg("after").query(&mut c).unwrap();
    let exec = raw_on(&mut r, &mut c, &["EXEC"]);
    let redis::Value::Array(items) = &exec.0 else {
        panic!("EXEC answers an array: {exec:?}");
    };
    assert_eq!(items.len(), 5, "{exec:?}");
    let as_reply = |v: &redis::Value| Value2(v.clone());
    assert_cannot_wait(&as_reply(&items[0]), "a READ miss inside MULTI");
    assert_eq!(
        string_of(&items[1]).map(|s| json(&s)),
        Some(row1.clone()),
        "a READ hit inside MULTI: {:?}",
        items[1]
    );
    assert_cannot_wait(&as_reply(&items[2]), "a MULTIREAD miss inside MULTI");
    assert_cannot_wait(&as_reply(&items[3]), "a catalog miss inside MULTI");
    assert_eq!(string_of(&items[4]).as_deref(), Some("after"));
    settle(&mut r, &mut c, "misses inside MULTI");

    let script = "return redis.call('PGCACHE.READ', ARGV[1], ARGV[2])";
    let eval = |r: &mut RedisServer, c: &mut redis::Connection, table: &str, pk: &str| {
        raw_on(r, c, &["EVAL", script, "0", table, pk])
    };
    let miss = eval(&mut r, &mut c, "users", r#"{"id":2}"#);
    assert_cannot_wait(&miss, "a READ miss inside a Lua script");
    settle(&mut r, &mut c, "a miss inside a Lua script");
    let row2 = pg.row_json("users", "id = 2").unwrap();
    assert_eq!(read_row(&mut c, "users", r#"{"id":2}"#), row2);
    let hit = eval(&mut r, &mut c, "users", r#"{"id":2}"#);
    assert_eq!(
        hit.text().map(|s| json(&s)),
        Some(row2),
        "a READ hit inside a Lua script: {hit:?}"
    );
    let catalog = eval(&mut r, &mut c, "text_items", r#"{"code":"alpha"}"#);
    assert_cannot_wait(&catalog, "a catalog miss inside a Lua script");
    settle(&mut r, &mut c, "a catalog miss inside a Lua script");

    assert!(ping(&mut c));
    assert!(r.alive(), "redis-server died");
}

// ---------------------------------------------------------------------------
// 7. secrets and CONFIG REWRITE (M8)

/// M8: secrets cannot be set at run time (CONFIG REWRITE would persist them
/// redacted): `CONFIG SET pgcache.pg_password`, and `pg_url` with a
/// password in the authority or as `?password=`, are refused with an error
/// naming `pg_password_file`, and CONFIG GET shows what it showed before. A
/// `pg_url` without a password and `pg_password_file` are accepted, and the
/// module keeps working.
#[test]
fn secrets_are_refused_by_config_set() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let port = pg.port();

    let password_before = config_value(&mut c, "pgcache.pg_password");
    let e = expect_err(
        config_set(&mut c, "pgcache.pg_password", "x"),
        "CONFIG SET pgcache.pg_password x",
    );
    assert_mentions(&e, &["pg_password_file"], "CONFIG SET pg_password");
    assert!(!e.contains(" x "), "the error shows the secret: {e}");
    assert_eq!(
        config_value(&mut c, "pgcache.pg_password"),
        password_before,
        "a refused CONFIG SET pg_password changed what CONFIG GET shows"
    );

    let url_before = config_value(&mut c, "pgcache.pg_url");
    for url in [
        format!("postgresql://u:pw@127.0.0.1:{port}/db"),
        format!("postgresql://postgres@127.0.0.1:{port}/{DB_NAME}?password=pw"),
    ] {
        let e = expect_err(
            config_set(&mut c, "pgcache.pg_url", &url),
            &format!("CONFIG SET pgcache.pg_url {url}"),
        );
        assert_mentions(
            &e,
            &["pg_password_file"],
            "CONFIG SET pg_url with a password",
        );
        assert!(
            !e.contains("pw@") && !e.contains("=pw"),
            "the error shows the secret: {e}"
        );
        assert_eq!(
            config_value(&mut c, "pgcache.pg_url"),
            url_before,
            "a refused CONFIG SET pg_url {url} changed what CONFIG GET shows"
        );
    }
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["id"], 1);

    let plain = format!("postgresql://postgres@127.0.0.1:{port}/{DB_NAME}");
    config_set(&mut c, "pgcache.pg_url", &plain).expect("CONFIG SET pg_url without a password");
    assert_eq!(config_value(&mut c, "pgcache.pg_url"), plain);
    assert_eq!(read_eventually(&mut c, "users", r#"{"id":2}"#)["id"], 2);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    fs::write(&file, "unused-with-trust\n").unwrap();
    config_set(&mut c, "pgcache.pg_password_file", file.to_str().unwrap())
        .expect("CONFIG SET pg_password_file");
    assert_eq!(
        config_value(&mut c, "pgcache.pg_password_file"),
        file.to_str().unwrap()
    );
    assert_eq!(read_eventually(&mut c, "users", r#"{"id":3}"#)["id"], 3);
}

const PW_ROLE: &str = "pwuser";
const PW_SECRET: &str = "Round-Trip-s3cret";

/// Can `user` (with `password`, if any) connect to the test database?
fn pg_login(pg: &PgServer, user: &str, password: Option<&str>) -> Result<(), String> {
    let mut conn = format!(
        "host=127.0.0.1 port={} user={user} dbname={DB_NAME} connect_timeout=10",
        pg.port()
    );
    if let Some(p) = password {
        conn.push_str(&format!(" password={p}"));
    }
    try_connect(&conn)
}

/// A role that logs in with a password only (scram-sha-256), for the module.
fn password_role(pg: &PgServer) {
    pg.execute(&format!(
        "CREATE ROLE {PW_ROLE} LOGIN PASSWORD '{PW_SECRET}'; GRANT SELECT ON users TO {PW_ROLE};"
    ));
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = fs::read_to_string(&hba).unwrap();
    fs::write(
        &hba,
        format!("host all {PW_ROLE} 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    pg.query_text("SELECT pg_reload_conf()::text");
    wait_until("PostgreSQL asks pwuser for a password", || {
        match pg_login(pg, PW_ROLE, None) {
            Ok(()) => Err("pwuser logged in without a password".into()),
            Err(_) => Ok(()),
        }
    });
    pg_login(pg, PW_ROLE, Some(PW_SECRET)).expect("pwuser logs in with its password");
    pg_login(pg, "postgres", None).expect("the harness's role still logs in");
}

/// A redis-server started from a config file whose `loadmodule` line has
/// `module_args`.
fn redis_from_config_file(module_args: &[String]) -> RedisServer {
    RedisServer::builder()
        .module_args(module_args)
        .config_file()
        .start()
}

/// CONFIG REWRITE on `c`, then a restart from the rewritten file; a
/// connection to the restarted server.
fn rewrite_and_restart(r: &mut RedisServer, mut c: redis::Connection) -> redis::Connection {
    let _: () = redis::cmd("CONFIG")
        .arg("REWRITE")
        .query(&mut c)
        .expect("CONFIG REWRITE");
    drop(c);
    r.restart();
    r.con_with_read_timeout(HANG)
}

/// M8, the round trip that must keep working: redis-server started from a
/// config file whose `loadmodule` line has `pg_user`/`pg_password` of a role
/// that needs its password; READ works; CONFIG REWRITE; restarted from that
/// file, a READ of a fresh key (a query) still works. The baseline passes
/// this test: a load-line password survives the rewrite.
#[test]
fn config_rewrite_keeps_a_load_line_password() {
    let pg = PgServer::start_new();
    password_role(&pg);
    let mut args = pg.module_args_as(PW_ROLE);
    args.extend(["pg_password".to_string(), PW_SECRET.to_string()]);

    let mut r = redis_from_config_file(&args);
    let mut c = r.con_with_read_timeout(HANG);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":1}"#),
        pg.row_json("users", "id = 1").unwrap()
    );
    let mut c = rewrite_and_restart(&mut r, c);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":2}"#),
        pg.row_json("users", "id = 2").unwrap(),
        "after CONFIG REWRITE and a restart the module cannot read"
    );
    assert!(!r.log().contains(PW_SECRET), "the log shows the password");
}

/// M8 / SPEC §1: a secret given at run time through `pg_password_file`
/// survives CONFIG REWRITE and a restart: the load line has no password (a
/// READ fails), CONFIG SET pgcache.pg_password_file makes READs work, and
/// after CONFIG REWRITE and a restart a READ of a fresh key still works.
/// The baseline passes this test.
#[test]
fn config_rewrite_keeps_a_password_file_set_at_run_time() {
    let pg = PgServer::start_new();
    password_role(&pg);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass-line");
    fs::write(&file, format!("{PW_SECRET}\n")).unwrap();
    let mut args = pg.module_args_as(PW_ROLE);
    args.extend(["pg_connect_timeout_ms".to_string(), "2000".to_string()]);

    let mut r = redis_from_config_file(&args);
    let mut c = r.con_with_read_timeout(HANG);
    expect_err(
        read(&mut c, "users", r#"{"id":1}"#),
        "a READ without the role's password",
    );
    config_set(&mut c, "pgcache.pg_password_file", file.to_str().unwrap())
        .expect("CONFIG SET pg_password_file");
    assert_eq!(
        read_eventually(&mut c, "users", r#"{"id":1}"#),
        pg.row_json("users", "id = 1").unwrap()
    );
    let mut c = rewrite_and_restart(&mut r, c);
    assert_eq!(
        read_eventually(&mut c, "users", r#"{"id":2}"#),
        pg.row_json("users", "id = 2").unwrap(),
        "after CONFIG REWRITE and a restart the module cannot read"
    );
}
