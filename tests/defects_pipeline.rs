//! Issue 11, task D: the listener, the notification pipeline and catalog
//! lookups (review of 55053e4, findings M1, M5 and M6).
//!
//! - M1: a listener that never connects (PostgreSQL is a hot standby, where
//!   LISTEN fails) must leave the module in `starting`: reads answered,
//!   nothing cached, the failure visible in STATS and warned about rarely.
//! - M5: the notification pipeline is bounded: TRUNCATEs of one table are
//!   coalesced, a queue overflow is handled as one gap, and ignored payloads
//!   are logged rate-limited.
//! - M6: catalog lookups are bounded: failed lookups are remembered for a
//!   few seconds, concurrent lookups of one spelling share one query,
//!   lookups count against `max_inflight`, and concurrent table flushes of
//!   one table join.
//!
//! Orderings are forced, not hoped for: notifications are followed by a
//! sentinel notification (applied in commit order), and commands that must
//! run concurrently are queued while Redis's main thread sleeps in
//! `DEBUG SLEEP`, so that Redis reads them all in one event-loop iteration,
//! before any background work can take Redis's lock.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// private helpers

/// The Redis log from byte `from` on.
fn log_since(r: &RedisServer, from: usize) -> String {
    let log = r.log();
    log.get(from..).unwrap_or("").to_string()
}

/// A Redis log line's level marker: `pid:role dd Mon yyyy hh:mm:ss.mmm <c> msg`,
/// with `.` debug, `-` verbose, `*` notice, `#` warning.
fn is_warning_line(line: &str) -> bool {
    line.split_whitespace().nth(5) == Some("#")
}

/// A redis-server with the module and `DEBUG` enabled for local clients.
fn redis_with_debug<S: AsRef<str>>(module_args: &[S]) -> RedisServer {
    let r = RedisServer::start_with_server_args(module_args, &["--enable-debug-command", "local"]);
    r.wait_until_ready();
    r
}

/// Sends `cmds`, one per fresh connection, while Redis's main thread sleeps
/// in `DEBUG SLEEP 1`: Redis then reads them all in one event-loop
/// iteration, holding its lock, so every command is dispatched before any
/// background work (a lookup, a fill, a flush) can complete. Returns the
/// replies in order, errors as their text.
fn fire_together(r: &RedisServer, cmds: &[redis::Cmd]) -> Vec<Result<redis::Value, String>> {
    let mut cons: Vec<redis::Connection> = cmds.iter().map(|_| r.con()).collect();
    for c in &mut cons {
        assert!(ping(c), "connection not ready");
    }
    let mut sleeper = r.con();
    sleeper
        .send_packed_command(
            &redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1")
                .get_packed_command(),
        )
        .unwrap();
    // Let Redis read the DEBUG SLEEP first (an ordering aid: if it were read
    // after the commands, they would merely be less concurrent).
    std::thread::sleep(Duration::from_millis(300));
    for (c, cmd) in cons.iter_mut().zip(cmds) {
        c.send_packed_command(&cmd.get_packed_command()).unwrap();
    }
    let slept = sleeper.recv_response();
    assert!(slept.is_ok(), "DEBUG SLEEP failed: {slept:?}");
    cons.iter_mut()
        .map(|c| {
            c.recv_response()
                .and_then(redis::Value::extract_error)
                .map_err(|e| err_text(&e))
        })
        .collect()
}

fn read_cmd(table: &str, pk: &str) -> redis::Cmd {
    let mut c = redis::cmd("PGCACHE.READ");
    c.arg(table).arg(pk);
    c
}

/// `INFO memory`'s `used_memory_peak`.
fn used_memory_peak(c: &mut redis::Connection) -> i64 {
    info_field(c, "memory", "used_memory_peak")
        .parse()
        .expect("used_memory_peak is an integer")
}

/// Calls of the catalog lookup (`to_regclass`) PostgreSQL saw.
fn catalog_lookups(pg: &PgServer) -> i64 {
    pg.queries_on("to_regclass")
}

// ---------------------------------------------------------------------------
// 1. a listener that never connects (M1)

/// M1: pointed at a hot standby, the module's LISTEN fails forever
/// ("cannot execute LISTEN during recovery"). READs must still answer the
/// right rows (from the standby), but nothing may be cached (a fill cached
/// while no listener ever connected could never be invalidated): after a
/// READ its key is absent and the next READ of it queries PostgreSQL again.
/// STATS shows `trust_state` `starting` and the failure in
/// `listener_last_error`; the log warns about it, at most twice over 6 s of
/// retries. The baseline caches every such fill (and grows `fresh` without
/// bound) and has no such fields.
#[test]
fn listener_on_a_standby_caches_nothing_and_says_why() {
    let pg = PgServer::start_new();
    let standby = PgServer::standby_of(&pg);
    let r = RedisServer::start(&standby.module_args());
    let mut c = r.con();

    let row1 = pg.row_json("users", "id = 1").unwrap();
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":1}"#),
        row1,
        "READ through the standby answers the row"
    );
    let key1 = r#"pg_cache:users:{"id":1}"#;
    assert_eq!(
        get(&mut c, key1),
        None,
        "the fill was cached although the listener never connected \
         (its invalidations can never arrive)"
    );
    let before = standby.queries_on("users");
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), row1);
    wait_until(
        "the second READ of the key queries the standby again",
        || {
            let now = standby.queries_on("users");
            if now > before {
                Ok(())
            } else {
                Err(format!("{now} queries on users, {before} before the READ"))
            }
        },
    );
    for id in 2..=20 {
        let pk = format!(r#"{{"id":{id}}}"#);
        assert_eq!(
            read_row(&mut c, "users", &pk),
            pg.row_json("users", &format!("id = {id}")).unwrap()
        );
    }
    let products = read_row(&mut c, "products", r#"{"category":"books","product_id":2}"#);
    assert_eq!(products["name"], "books item 2");
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        Vec::<String>::new(),
        "nothing may be cached while the listener has never connected"
    );

    // the state and the reason are visible
    let mut s = Value::Null;
    wait_until("STATS shows the listener's last error", || {
        s = stats(&mut c);
        if stat_str(&s, "listener_last_error").is_empty() {
            Err(s.to_string())
        } else {
            Ok(())
        }
    });
    assert_eq!(stat_str(&s, "trust_state"), "starting", "{s}");
    assert_eq!(stat_of(&s, "entries_trusted"), 0, "{s}");
    assert_ne!(stat_str(&s, "listener"), "connected", "{s}");
    assert!(
        stat_str(&s, "listener_last_error").contains("recovery"),
        "listener_last_error should carry PostgreSQL's reason: {s}"
    );

    // warned, but not on every retry
    let recovery_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("recovery"))
            .map(str::to_string)
            .collect()
    };
    wait_until("the log warns that the listener cannot LISTEN", || {
        let lines = recovery_lines(&r.log());
        if lines.iter().any(|l| is_warning_line(l)) {
            Ok(())
        } else {
            Err(format!("lines about recovery: {lines:?}"))
        }
    });
    let failures_before = standby.log().matches("cannot execute LISTEN").count();
    std::thread::sleep(Duration::from_secs(6));
    let failures = standby.log().matches("cannot execute LISTEN").count();
    assert!(
        failures > failures_before,
        "the listener should keep retrying (the standby saw {failures_before} \
         failed LISTENs, then {failures} after 6 s)"
    );
    let lines = recovery_lines(&r.log());
    assert!(
        lines.len() <= 2,
        "{} log lines about the failing LISTEN over {failures} retries (at most one \
         warning a minute): {lines:#?}",
        lines.len()
    );

    // still nothing cached, still starting
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), row1);
    assert_eq!(
        get(&mut c, key1),
        None,
        "cached after 6 s of failed LISTENs"
    );
    let s = stats(&mut c);
    assert_eq!(stat_str(&s, "trust_state"), "starting", "{s}");
    assert!(
        stat_of(&s, "fills_uncached_gap") >= 22,
        "every READ above was a fill answered without caching: {s}"
    );
}

// ---------------------------------------------------------------------------
// 2. a bounded notification pipeline (M5)

/// M5 (a): 1000 TRUNCATE notifications for `users` in one transaction (each
/// payload different, so PostgreSQL delivers them all) drop the users
/// entries with at most 5 flushes, not one full scan each; another table's
/// entries stay. A sentinel notification sent after them marks the point
/// where all were applied. The baseline runs 1000 flushes.
#[test]
fn truncate_notifications_of_one_table_are_coalesced() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    let ids: Vec<String> = (1..=100).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    multiread(&mut c, "users", &format!("[{}]", ids.join(","))).unwrap();
    let sentinel_pk = r#"{"category":"books","product_id":1}"#;
    let sentinel = format!("pg_cache:products:{sentinel_pk}");
    read_row(&mut c, "products", sentinel_pk);
    read_row(&mut c, "products", r#"{"category":"books","product_id":2}"#);
    assert_eq!(keys(&mut c, "pg_cache:users:*").len(), 100);
    let s0 = stats(&mut c);

    pg.execute(
        r#"DO $$ BEGIN
             PERFORM pg_notify('cache_invalidation',
               format('{"schema":"public","table":"users","operation":"TRUNCATE","n":%s}', g))
             FROM generate_series(1, 1000) g;
           END $$"#,
    );
    pg.execute(
        r#"SELECT pg_notify('cache_invalidation',
             '{"schema":"public","table":"products","operation":"DELETE","old_data":{"category":"books","product_id":1}}')"#,
    );
    wait_gone(&mut c, &sentinel);
    let mut s = Value::Null;
    wait_until("all 1001 notifications are counted", || {
        s = stats(&mut c);
        let n = stat_of(&s, "notifications_received") - stat_of(&s0, "notifications_received");
        if n >= 1001 {
            Ok(())
        } else {
            Err(format!("{n} received"))
        }
    });
    assert_eq!(
        keys(&mut c, "pg_cache:users:*"),
        Vec::<String>::new(),
        "the TRUNCATEs did not drop the users entries"
    );
    assert!(exists(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":2}"#
    ));
    let flushes = stat_of(&s, "flushes") - stat_of(&s0, "flushes");
    assert!(
        flushes <= 5,
        "1000 TRUNCATE notifications of one table cost {flushes} flushes \
         (each a scan of the keyspace); they should be coalesced: {s}"
    );
    assert!(flushes >= 1, "no flush ran: {s}");
    assert_eq!(stat_str(&s, "trust_state"), "trusted", "{s}");
}

/// M5 (b): while Redis's main thread sleeps (`DEBUG SLEEP 8`, so the module
/// can apply nothing), one transaction sends 200 000 notifications of
/// ~200 bytes (40 MB, for uncached rows). The module's queue (at most 16 MiB
/// of payloads) overflows; the overflow is handled as one gap: STATS counts
/// it in `notification_queue_overflows`, the module settles trusted again,
/// every entry cached before is gone, READs answer the current rows, and
/// memory stays modest. The baseline queues all 40 MB without bound, applies
/// every payload, keeps the entries cached before, and has no counter.
#[test]
fn notification_queue_overflow_is_one_gap() {
    let pg = PgServer::start_new();
    let mut r = redis_with_debug(&pg.module_args());
    let mut c = r.con();
    wait_listener_ready(&r);
    let ids: Vec<String> = (1..=50).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    multiread(&mut c, "users", &format!("[{}]", ids.join(","))).unwrap();
    for p in 1..=20 {
        read_row(
            &mut c,
            "products",
            &format!(r#"{{"category":"books","product_id":{p}}}"#),
        );
    }
    let cached = keys(&mut c, "pg_cache:*");
    assert_eq!(cached.len(), 70);
    let peak_before = used_memory_peak(&mut c);
    let s0 = stats(&mut c);

    let mut sleeper = r.con();
    sleeper
        .send_packed_command(
            &redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("8")
                .get_packed_command(),
        )
        .unwrap();
    // let Redis start sleeping before the notifications arrive
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    pg.execute(
        r#"DO $$ BEGIN
             PERFORM pg_notify('cache_invalidation',
               format('{"schema":"public","table":"users","operation":"UPDATE","old_data":{"id":%s},"new_data":{"id":%s},"pad":"%s%s"}',
                      101 + g % 900, 101 + g % 900, g, repeat('x', 100)))
             FROM generate_series(1, 200000) g;
           END $$"#,
    );
    let committed = started.elapsed();
    let slept = sleeper.recv_response();
    let asleep = started.elapsed();
    assert!(slept.is_ok(), "DEBUG SLEEP failed: {slept:?}");
    // a check of the scenario, not of the module: the 40 MB were committed
    // while Redis's main thread was still asleep
    assert!(
        committed < asleep,
        "setup: the notifications took {committed:?} to commit, longer than Redis slept \
         ({asleep:?}); the scenario did not happen"
    );

    // A sentinel after the flood: once its entry (cached before) is gone, the
    // flood has been handled (applied, or turned into a gap and flushed).
    let sentinel = r#"pg_cache:products:{"category":"books","product_id":1}"#;
    pg.execute(
        r#"SELECT pg_notify('cache_invalidation',
             '{"schema":"public","table":"products","operation":"DELETE","old_data":{"category":"books","product_id":1}}')"#,
    );
    wait_gone(&mut c, sentinel);
    let s = wait_listener_ready(&r);
    let peak = used_memory_peak(&mut c);
    eprintln!("used_memory_peak: {peak_before} before the flood, {peak} after");
    let left: Vec<String> = cached
        .iter()
        .filter(|k| exists(&mut c, k))
        .cloned()
        .collect();
    assert!(
        left.is_empty(),
        "after the notification queue overflowed, {} entries cached before are still \
         there (the overflow lost notifications, so it must be handled as a gap): {:?}; {s}",
        left.len(),
        &left[..left.len().min(5)]
    );
    assert!(r.alive(), "Redis died");
    let s = stats(&mut c);
    assert!(
        stat_of(&s, "notification_queue_overflows") > stat_of(&s0, "notification_queue_overflows"),
        "the overflow is counted: {s}"
    );
    assert_eq!(stat_str(&s, "trust_state"), "trusted", "{s}");
    // READs answer current rows: no trigger notifies this change, so only
    // the flush of the old entries lets READs see it
    pg.execute("UPDATE users SET name = 'changed' WHERE id <= 50");
    for id in [1, 25, 50] {
        assert_eq!(
            read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#)),
            pg.row_json("users", &format!("id = {id}")).unwrap()
        );
    }
    assert_eq!(
        read_row(&mut c, "products", r#"{"category":"books","product_id":3}"#),
        pg.row_json("products", "category = 'books' AND product_id = 3")
            .unwrap()
    );
    assert!(
        peak < 200 * 1024 * 1024,
        "used_memory peaked at {peak} bytes while the notifications queued"
    );
}

/// M5 (c): 1000 malformed payloads (`not json <i>`) with `loglevel debug`:
/// each is counted in `notifications_ignored`, but the log has at most 10
/// lines about ignored notifications (and at least one). The baseline
/// writes one line per payload.
#[test]
fn ignored_notifications_are_logged_rate_limited() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    config_set(&mut c, "loglevel", "debug").unwrap();
    let sentinel_pk = r#"{"category":"books","product_id":1}"#;
    read_row(&mut c, "products", sentinel_pk);
    let protected = r#"pg_cache:users:{"id":1}"#;
    read_row(&mut c, "users", r#"{"id":1}"#);
    let s0 = stats(&mut c);
    let log_from = r.log().len();

    pg.execute(
        "DO $$ BEGIN \
           PERFORM pg_notify('cache_invalidation', 'not json ' || g) \
           FROM generate_series(1, 1000) g; \
         END $$",
    );
    pg.execute(
        r#"SELECT pg_notify('cache_invalidation',
             '{"schema":"public","table":"products","operation":"DELETE","old_data":{"category":"books","product_id":1}}')"#,
    );
    wait_gone(&mut c, &format!("pg_cache:products:{sentinel_pk}"));
    let s = stats(&mut c);
    assert_eq!(
        stat_of(&s, "notifications_ignored") - stat_of(&s0, "notifications_ignored"),
        1000,
        "{s}"
    );
    assert!(
        exists(&mut c, protected),
        "a malformed payload dropped an entry"
    );
    let log = log_since(&r, log_from);
    let about: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("ignor"))
        .collect();
    assert!(
        about.len() <= 10,
        "{} log lines about ignored notifications for 1000 malformed payloads \
         (should be rate-limited); first ones: {:#?}",
        about.len(),
        &about[..about.len().min(5)]
    );
    assert!(
        !about.is_empty(),
        "with loglevel debug, ignored notifications should be logged at all"
    );
}

// ---------------------------------------------------------------------------
// 3. bounded catalog lookups (M6)

/// M6 (a): 50 READs of an unknown table all answer the unknown-table
/// error, and PostgreSQL sees at most 2 catalog lookups (`to_regclass`):
/// failures are remembered. Only for a few seconds: 6 s later one more READ
/// looks the table up again (so a table created meanwhile becomes readable).
/// The baseline looks the table up 50 times.
#[test]
fn failed_catalog_lookups_are_remembered_briefly() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    read_row(&mut c, "users", r#"{"id":1}"#);
    pg.reset_stats();
    for i in 0..50 {
        let e = expect_err(
            read(&mut c, "nope", r#"{"id":1}"#),
            "READ of an unknown table",
        );
        assert_mentions(
            &e,
            &["nope", "table"],
            &format!("READ {i} of an unknown table"),
        );
        assert!(!e.contains("max_inflight"), "READ {i}: {e}");
    }
    let lookups = catalog_lookups(&pg);
    assert!(
        lookups <= 2,
        "50 READs of the unknown table `nope` cost {lookups} catalog lookups; \
         a failed lookup should be remembered:\n{}",
        pg.statements()
    );
    // remembered for a few seconds only
    std::thread::sleep(Duration::from_secs(6));
    pg.execute("CREATE TABLE nope (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO nope VALUES (1, 'now here')");
    let row = read_row(&mut c, "nope", r#"{"id":1}"#);
    assert_eq!(
        row["v"], "now here",
        "6 s later the table is looked up again"
    );
    wait_until("the READ after 6 s did a new lookup", || {
        let now = catalog_lookups(&pg);
        if now > lookups {
            Ok(())
        } else {
            Err(format!("{now} lookups"))
        }
    });
}

/// M6 (b): 20 concurrent READs of a spelling never seen before
/// (`public.users`), with PostgreSQL's answers delayed 300 ms, all answer
/// the row and share one catalog lookup. The baseline runs 20.
#[test]
fn concurrent_lookups_of_one_spelling_share_one_query() {
    let pg = PgServer::start_new();
    let proxy = DelayProxy::start(pg.port());
    let r = redis_with_debug(&proxy.module_args());
    let mut c = r.con();
    wait_listener_ready(&r);
    // the pool is warm: a pooled connection and `users` known
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    let row1 = pg.row_json("users", "id = 1").unwrap();
    proxy.set_delay_ms(300);
    pg.reset_stats();
    let cmds: Vec<redis::Cmd> = (0..20)
        .map(|_| read_cmd("public.users", r#"{"id":1}"#))
        .collect();
    let replies = fire_together(&r, &cmds);
    proxy.set_delay_ms(0);
    for (i, reply) in replies.iter().enumerate() {
        let v = reply
            .as_ref()
            .unwrap_or_else(|e| panic!("READ {i} of public.users failed: {e}"));
        let s: Option<String> = redis::from_redis_value(v).unwrap();
        let s = s.unwrap_or_else(|| panic!("READ {i} of public.users answered nil"));
        assert_eq!(json(&s), row1, "READ {i}");
    }
    let lookups = catalog_lookups(&pg);
    assert_eq!(
        lookups,
        1,
        "20 concurrent READs of one new spelling cost {lookups} catalog lookups:\n{}",
        pg.statements()
    );
}

/// M6 (c): catalog lookups count against `max_inflight`. With
/// `max_inflight 5` and PostgreSQL's answers delayed 500 ms, 20 concurrent
/// READs of 20 different unknown tables: at least 15 get the `max_inflight`
/// busy error at once, the others the unknown-table error, and PostgreSQL
/// sees at most 5 lookups. The baseline runs all 20 lookups.
#[test]
fn catalog_lookups_count_against_max_inflight() {
    let pg = PgServer::start_new();
    let proxy = DelayProxy::start(pg.port());
    let mut args = proxy.module_args();
    args.extend(["max_inflight".to_string(), "5".to_string()]);
    let r = redis_with_debug(&args);
    let mut c = r.con();
    wait_listener_ready(&r);
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    proxy.set_delay_ms(500);
    pg.reset_stats();
    let cmds: Vec<redis::Cmd> = (1..=20)
        .map(|i| read_cmd(&format!("nope_{i}"), r#"{"id":1}"#))
        .collect();
    let replies = fire_together(&r, &cmds);
    proxy.set_delay_ms(0);
    let mut busy = 0;
    let mut unknown = 0;
    for (i, reply) in replies.iter().enumerate() {
        match reply {
            Ok(v) => panic!("READ of nope_{} answered {v:?}", i + 1),
            Err(e) if e.contains("max_inflight") => busy += 1,
            Err(e) => {
                assert_mentions(e, &[&format!("nope_{}", i + 1)], "unknown-table error");
                unknown += 1;
            }
        }
    }
    let lookups = catalog_lookups(&pg);
    assert!(
        busy >= 15,
        "{busy} of 20 concurrent lookups were refused as busy (max_inflight 5), \
         {unknown} looked up; PostgreSQL saw {lookups} lookups"
    );
    assert_eq!(busy + unknown, 20);
    assert!(
        lookups <= 5,
        "{lookups} catalog lookups with max_inflight 5:\n{}",
        pg.statements()
    );
}

/// M6 (d): 10 concurrent `PGCACHE.INVALIDATE_TABLE users` over 50 000
/// entries join one running flush (or one follow-up): all answer integers,
/// every users entry is gone, and `flushes` grows by at most 3. The
/// baseline runs 10 full scans at once.
#[test]
fn concurrent_table_flushes_join() {
    let pg = PgServer::start_new();
    let mut r = redis_with_debug(&pg.module_args());
    let mut c = r.con();
    wait_listener_ready(&r);
    read_row(&mut c, "users", r#"{"id":1}"#);
    let mut pipe = redis::pipe();
    for id in 2..=50_000 {
        pipe.cmd("PGCACHE.WRITE")
            .arg("users")
            .arg(format!(r#"{{"id":{id}}}"#))
            .arg(format!(r#"{{"id":{id}}}"#))
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(dbsize, 50_001);
    let s0 = stats(&mut c);
    let cmds: Vec<redis::Cmd> = (0..10)
        .map(|_| {
            let mut cmd = redis::cmd("PGCACHE.INVALIDATE_TABLE");
            cmd.arg("users");
            cmd
        })
        .collect();
    let replies = fire_together(&r, &cmds);
    for (i, reply) in replies.iter().enumerate() {
        match reply {
            Ok(redis::Value::Int(n)) => assert!(*n >= 0, "INVALIDATE_TABLE {i}: {n}"),
            other => panic!("INVALIDATE_TABLE {i} answered {other:?}"),
        }
    }
    assert_eq!(
        keys(&mut c, "pg_cache:users:*"),
        Vec::<String>::new(),
        "users entries left after the INVALIDATE_TABLE calls answered"
    );
    assert!(exists(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":1}"#
    ));
    let s = stats(&mut c);
    let flushes = stat_of(&s, "flushes") - stat_of(&s0, "flushes");
    assert!(
        flushes <= 3,
        "10 concurrent INVALIDATE_TABLE users ran {flushes} flushes (full scans); \
         they should join: {s}"
    );
    assert!(r.alive(), "Redis died");
}
