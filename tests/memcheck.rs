//! The module's core scenarios, kept modest so that they also run under
//! valgrind: `make memcheck` runs this file with `PGCACHE_VALGRIND=1`, which
//! starts every redis-server under memcheck (see `common::valgrind`); each
//! test ends with `SHUTDOWN NOSAVE` and fails if memcheck reported an error
//! (invalid read/write/free, uninitialised value, "definitely lost" leak...).
//! Without the variable they run natively, as part of the normal suite.
//!
//! Covered: READ miss/hit/no row, MULTIREAD with misses, WRITE, INVALIDATE,
//! INVALIDATE_TABLE, events, error replies to bad input, invalidation by a
//! PostgreSQL notification, clients killed (CLIENT KILL) while blocked on a
//! miss, and PostgreSQL restarted with fills in flight.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// SHUTDOWN NOSAVE, then memcheck's verdict (a no-op check without valgrind).
fn finish(mut r: RedisServer) {
    assert!(r.alive(), "redis-server died; log:\n{}", r.log());
    match r.shutdown_checked() {
        Ok(log) if !log.is_empty() => {
            // the summaries, for the record
            let summary: Vec<&str> = log
                .lines()
                .skip_while(|l| !l.contains("HEAP SUMMARY"))
                .filter(|l| l.contains(':'))
                .collect();
            eprintln!("valgrind:\n{}", summary.join("\n"));
        }
        Ok(_) => {}
        Err(report) => panic!("{report}"),
    }
}

fn redis_cmd(con: &mut redis::Connection, args: &[&[u8]]) -> redis::RedisResult<redis::Value> {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(con)
}

/// `blocked_clients` of INFO clients.
async fn blocked_clients(con: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO clients has no blocked_clients: {info}"))
}

/// Wait until at least `n` clients are blocked (on fills held by a lock).
async fn wait_blocked(con: &mut redis::aio::MultiplexedConnection, n: i64) {
    let deadline = Instant::now() + HANG;
    loop {
        let b = blocked_clients(con).await;
        if b >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {b} of {n} clients blocked within {HANG:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until no client is blocked and no fill is in flight.
async fn wait_settled(con: &mut redis::aio::MultiplexedConnection) {
    let deadline = Instant::now() + HANG;
    loop {
        let b = blocked_clients(con).await;
        let s = stats_async(con).await;
        if b == 0 && stat_of(&s, "fills_in_flight") == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{b} clients still blocked / fills in flight: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection of its own and its CLIENT ID.
async fn con_with_id(r: &RedisServer) -> (redis::aio::MultiplexedConnection, i64) {
    let mut con = r.async_con().await;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .unwrap();
    (con, id)
}

async fn client_kill(admin: &mut redis::aio::MultiplexedConnection, id: i64) {
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(admin)
        .await
        .unwrap();
    assert_eq!(killed, 1, "CLIENT KILL ID {id}");
}

/// A READ or MULTIREAD on its own connection, as a task.
fn spawn_cmd(
    set: &mut JoinSet<(usize, redis::RedisResult<Option<String>>)>,
    tag: usize,
    mut con: redis::aio::MultiplexedConnection,
    cmd: &'static str,
    table: &'static str,
    arg: String,
) {
    set.spawn(async move {
        let r = tokio::time::timeout(
            HANG,
            redis::cmd(cmd).arg(table).arg(&arg).query_async(&mut con),
        )
        .await
        .unwrap_or_else(|_| panic!("{cmd} {table} {arg}: no reply within {HANG:?}"));
        (tag, r)
    });
}

fn user_row(pg: &PgServer, id: i64) -> Value {
    pg.row_json("users", &format!("id = {id}")).unwrap()
}

// ---------------------------------------------------------------------------

#[test]
fn commands_events_errors_and_notifications() {
    let pg = PgServer::start_new();
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_watch('users')");
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    let mut c = r.con();

    let mut sub = r.con();
    let mut ps = sub.as_pubsub();
    ps.subscribe("pg_cache_events").unwrap();
    wait_until("the event subscription", || {
        let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("pg_cache_events")
            .query(&mut c)
            .unwrap();
        (n[0].1 >= 1).then_some(()).ok_or_else(|| format!("{n:?}"))
    });

    // READ: miss, hit, no row; other key shapes
    let u1 = user_row(&pg, 1);
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), u1);
    assert_eq!(read_row(&mut c, "users", r#"{"id":"1"}"#), u1);
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    assert_eq!(
        read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#)["name"],
        "books item 1"
    );
    assert_eq!(read_row(&mut c, "docs", r#"{"id":1}"#)["id"], 1);
    assert_eq!(
        read_row(&mut c, "text_items", r#"{"code":"Ünïcödé ✓"}"#)["label"],
        "unicode"
    );
    assert_eq!(
        read_row(&mut c, "app.accounts", r#"{"id":3}"#)["owner"],
        "owner3"
    );

    // MULTIREAD: a hit, misses, a duplicate and a missing row
    let got = json(
        &multiread(
            &mut c,
            "users",
            r#"[{"id":1},{"id":2},{"id":3},{"id":2},{"id":999998}]"#,
        )
        .unwrap(),
    );
    assert_eq!(
        got,
        Value::Array(vec![
            u1.clone(),
            user_row(&pg, 2),
            user_row(&pg, 3),
            user_row(&pg, 2),
            Value::Null
        ])
    );
    assert_eq!(json(&multiread(&mut c, "users", "[]").unwrap()), json("[]"));

    // WRITE, READ of the written entry, INVALIDATE, READ from PostgreSQL again
    assert_eq!(
        write(
            &mut c,
            "users",
            r#"{"id":4}"#,
            r#"{"id":4,"name":"Written"}"#
        )
        .unwrap(),
        "OK"
    );
    assert_eq!(read_row(&mut c, "users", r#"{"id":4}"#)["name"], "Written");
    assert_eq!(invalidate(&mut c, "users", r#"{"id":4}"#).unwrap(), "OK");
    assert_eq!(read_row(&mut c, "users", r#"{"id":4}"#), user_row(&pg, 4));
    let _ = read_ttl(&mut c, "users", r#"{"id":5}"#, "60").unwrap();

    // INVALIDATE_TABLE
    let dropped: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("users")
        .query(&mut c)
        .unwrap();
    assert!(dropped >= 4, "INVALIDATE_TABLE dropped {dropped}");
    assert!(keys(&mut c, "pg_cache:users:*").is_empty());
    // ... over several scan batches
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("PGCACHE.WRITE")
            .arg("users")
            .arg(format!(r#"{{"id":{}}}"#, 10_000 + i))
            .arg(format!(r#"{{"id":{}}}"#, 10_000 + i))
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    let dropped: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("public.users")
        .query(&mut c)
        .unwrap();
    assert_eq!(dropped, 3000);

    // error replies to bad input
    expect_err(read(&mut c, "users", "{not json"), "bad JSON");
    expect_err(read(&mut c, "users", r#"{"id":1"#), "truncated JSON");
    expect_err(read(&mut c, "users", r#"{"name":"x"}"#), "wrong key column");
    expect_err(read(&mut c, "users", r#"{"id":[1]}"#), "array as key value");
    expect_err(read(&mut c, "nosuchtable", r#"{"id":1}"#), "unknown table");
    expect_err(
        read(&mut c, "no_pk", r#"{"a":1}"#),
        "table without a primary key",
    );
    expect_err(read(&mut c, "users;drop", r#"{"id":1}"#), "bad table name");
    expect_err(
        multiread(&mut c, "users", r#"[{"id":1},"x"]"#),
        "MULTIREAD with a bad element",
    );
    expect_err(
        multiread(&mut c, "users", r#"{"id":1}"#),
        "MULTIREAD of no array",
    );
    expect_err(
        multiread(&mut c, "nosuchtable", r#"[{"id":1}]"#),
        "MULTIREAD of an unknown table",
    );
    expect_err(
        write(&mut c, "users", r#"{"id":1}"#, "{bad"),
        "WRITE of bad JSON",
    );
    expect_err(
        write(&mut c, "nosuchtable", r#"{"id":1}"#, "{}"),
        "WRITE to an unknown table",
    );
    expect_err(
        invalidate(&mut c, "nosuchtable", r#"{"id":1}"#),
        "INVALIDATE of an unknown table",
    );
    expect_err(
        redis::cmd("PGCACHE.INVALIDATE_TABLE")
            .arg("nosuchtable")
            .query::<i64>(&mut c),
        "INVALIDATE_TABLE of an unknown table",
    );
    expect_err(
        redis::cmd("PGCACHE.READ")
            .arg("users")
            .query::<String>(&mut c),
        "READ without a key",
    );
    expect_err(
        read_ttl(&mut c, "users", r#"{"id":1}"#, "-5"),
        "READ with a bad TTL",
    );
    expect_err(
        redis_cmd(&mut c, &[b"PGCACHE.READ", b"users", b"{\"id\":1}\0"]),
        "NUL after the JSON",
    );
    expect_err(
        redis_cmd(
            &mut c,
            &[b"PGCACHE.READ", b"users", b"{\"id\":\"\xff\xfe\"}"],
        ),
        "invalid UTF-8",
    );
    let deep_arr = format!(r#"{{"id":{}1{}}}"#, "[".repeat(50_000), "]".repeat(50_000));
    expect_err(read(&mut c, "users", &deep_arr), "deeply nested key");
    let deep_obj = format!("{}1{}", r#"{"id":"#.repeat(50_000), "}".repeat(50_000));
    expect_err(read(&mut c, "users", &deep_obj), "deeply nested key object");
    expect_err(
        multiread(
            &mut c,
            "users",
            &format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)),
        ),
        "deeply nested MULTIREAD",
    );
    let _ = write(&mut c, "users", r#"{"id":1}"#, &deep_obj);
    let _ = invalidate(&mut c, "users", r#"{"id":1}"#);

    // invalidation by a notification from the pgcache_watch trigger
    assert_eq!(read_row(&mut c, "users", r#"{"id":7}"#), user_row(&pg, 7));
    pg.execute("UPDATE users SET name = 'Notified' WHERE id = 7");
    wait_until("the notification's invalidation", || {
        if exists(&mut c, r#"pg_cache:users:{"id":7}"#) {
            Err("still cached".into())
        } else {
            Ok(())
        }
    });
    assert_eq!(read_row(&mut c, "users", r#"{"id":7}"#)["name"], "Notified");
    pg.execute("DELETE FROM users WHERE id = 8");
    pg.execute("INSERT INTO users (id, name) VALUES (8, 'Again')");

    // module configs: the getter runs for CONFIG GET and CONFIG SET
    let all: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("pgcache.*")
        .query(&mut c)
        .unwrap();
    assert!(all.len() >= 2, "{all:?}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("pgcache.default_ttl")
        .arg("120")
        .query(&mut c)
        .unwrap();
    expect_err(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("pgcache.default_ttl")
            .arg("-4")
            .query::<()>(&mut c),
        "CONFIG SET of a bad value",
    );

    // STATS and INFO
    let s = r.stats();
    assert!(stat_of(&s, "hits") >= 1, "{s}");
    assert!(stat_of(&s, "misses") >= 1, "{s}");
    assert!(stat_of(&s, "notifications_received") >= 1, "{s}");
    let info: String = redis::cmd("INFO").arg("pgcache").query(&mut c).unwrap();
    assert!(info.contains("listener"), "{info}");

    // the events published meanwhile
    const SENTINEL: &str = "__memcheck_end__";
    let _: i64 = redis::cmd("PUBLISH")
        .arg("pg_cache_events")
        .arg(SENTINEL)
        .query(&mut c)
        .unwrap();
    ps.set_read_timeout(Some(HANG)).unwrap();
    let mut types = BTreeSet::new();
    loop {
        let payload: String = ps.get_message().unwrap().get_payload().unwrap();
        if payload == SENTINEL {
            break;
        }
        types.insert(json(&payload)["type"].as_str().unwrap_or("?").to_string());
    }
    for t in ["cache_miss", "cache_hit", "cache_write", "cache_invalidate"] {
        assert!(types.contains(t), "no {t} event among {types:?}");
    }
    drop(ps);
    drop(sub);
    assert!(ping(&mut c));
    drop(c);
    finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_killed_while_blocked_on_a_miss() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "300000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;

    // Held fills: READs of one key (coalesced), MULTIREADs, a READ of another.
    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    let mut ids = vec![];
    for i in 0..8usize {
        let (con, id) = con_with_id(&r).await;
        ids.push(id);
        match i {
            0..=3 => spawn_cmd(
                &mut set,
                i,
                con,
                "PGCACHE.READ",
                "users",
                r#"{"id":10}"#.into(),
            ),
            4 | 5 => spawn_cmd(
                &mut set,
                i,
                con,
                "PGCACHE.MULTIREAD",
                "users",
                r#"[{"id":11},{"id":10},{"id":12}]"#.into(),
            ),
            _ => spawn_cmd(
                &mut set,
                i,
                con,
                "PGCACHE.READ",
                "users",
                format!(r#"{{"id":{}}}"#, 20 + i),
            ),
        }
    }
    wait_blocked(&mut admin, 8).await;
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    // kill half of them, among each kind
    let killed = [0usize, 1, 4, 6];
    for &k in &killed {
        client_kill(&mut admin, ids[k]).await;
    }
    lock.release().await;
    while let Some(res) = set.join_next().await {
        let (tag, reply) = res.unwrap();
        if killed.contains(&tag) {
            assert!(reply.is_err(), "killed client {tag} got a reply: {reply:?}");
            continue;
        }
        let got = json(
            &reply
                .unwrap_or_else(|e| panic!("client {tag}: {e}"))
                .unwrap(),
        );
        match tag {
            2 | 3 => assert_eq!(got, user_row(&pg, 10)),
            5 => assert_eq!(
                got,
                Value::Array(vec![
                    user_row(&pg, 11),
                    user_row(&pg, 10),
                    user_row(&pg, 12)
                ])
            ),
            7 => assert_eq!(got, user_row(&pg, 27)),
            _ => unreachable!(),
        }
    }
    wait_settled(&mut admin).await;

    // Every blocked client killed: the fills finish for nobody.
    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    let mut ids = vec![];
    for i in 0..4usize {
        let (con, id) = con_with_id(&r).await;
        ids.push(id);
        let arg = if i % 2 == 0 {
            r#"{"id":30}"#.to_string()
        } else {
            r#"[{"id":30},{"id":31}]"#.to_string()
        };
        let cmd = if i % 2 == 0 {
            "PGCACHE.READ"
        } else {
            "PGCACHE.MULTIREAD"
        };
        spawn_cmd(&mut set, i, con, cmd, "users", arg);
    }
    wait_blocked(&mut admin, 4).await;
    for &id in &ids {
        client_kill(&mut admin, id).await;
    }
    lock.release().await;
    while let Some(res) = set.join_next().await {
        assert!(res.unwrap().1.is_err());
    }
    wait_settled(&mut admin).await;

    // Kills racing the fills' completion.
    for round in 0..3i64 {
        let lock = pg.lock_table("users").await;
        let mut set = JoinSet::new();
        let mut ids = vec![];
        for i in 0..4usize {
            let (con, id) = con_with_id(&r).await;
            ids.push(id);
            spawn_cmd(
                &mut set,
                i,
                con,
                "PGCACHE.READ",
                "users",
                format!(r#"{{"id":{}}}"#, 40 + round),
            );
        }
        wait_blocked(&mut admin, 4).await;
        let release = tokio::spawn(lock.release());
        for &id in &ids[..2] {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut admin)
                .await;
        }
        release.await.unwrap();
        while let Some(res) = set.join_next().await {
            let (tag, reply) = res.unwrap();
            if tag >= 2 {
                assert_eq!(json(&reply.unwrap().unwrap()), user_row(&pg, 40 + round));
            }
        }
    }
    wait_settled(&mut admin).await;

    // A setting that rebuilds the connection pool, changed with fills in
    // flight; then a kill of the last waiter.
    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    let mut ids = vec![];
    for i in 0..3usize {
        let (con, id) = con_with_id(&r).await;
        ids.push(id);
        spawn_cmd(
            &mut set,
            i,
            con,
            "PGCACHE.READ",
            "users",
            format!(r#"{{"id":{}}}"#, 60 + i),
        );
    }
    wait_blocked(&mut admin, 3).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("pgcache.pg_pool_size")
        .arg("3")
        .query_async(&mut admin)
        .await
        .unwrap();
    client_kill(&mut admin, ids[2]).await;
    lock.release().await;
    while let Some(res) = set.join_next().await {
        let (tag, reply) = res.unwrap();
        match reply {
            Ok(row) if tag < 2 => {
                assert_eq!(json(&row.unwrap()), user_row(&pg, 60 + tag as i64))
            }
            Err(e) if tag < 2 => assert_eq!(e.kind(), redis::ErrorKind::ResponseError, "{e}"),
            Ok(row) => panic!("killed client {tag} got a reply: {row:?}"),
            Err(_) => {}
        }
    }
    wait_settled(&mut admin).await;

    // the server is fine: hits, misses, the entries filled for killed clients
    assert_eq!(
        json(
            &aread(&mut admin, "users", r#"{"id":10}"#)
                .await
                .unwrap()
                .unwrap()
        ),
        user_row(&pg, 10)
    );
    assert_eq!(
        json(
            &aread(&mut admin, "users", r#"{"id":50}"#)
                .await
                .unwrap()
                .unwrap()
        ),
        user_row(&pg, 50)
    );
    let s = stats_async(&mut admin).await;
    assert_eq!(stat_of(&s, "fills_in_flight"), 0, "{s}");
    drop(admin);
    finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_with_fills_in_flight() {
    let mut pg = PgServer::start_new();
    let r = RedisServer::with_pg(
        &pg,
        &[
            "pg_connect_timeout_ms",
            "5000",
            "pg_query_timeout_ms",
            "300000",
        ],
    );
    let mut admin = r.async_con().await;
    let u1 = user_row(&pg, 1);

    for round in 0..2i64 {
        // cached once the listener is back (its reconnect flushes the cache)
        wait_listener_ready(&r);
        assert_eq!(
            json(
                &aread(&mut admin, "users", r#"{"id":1}"#)
                    .await
                    .unwrap()
                    .unwrap()
            ),
            u1
        );
        // fills held by a lock when PostgreSQL stops
        let lock = pg.lock_table("users").await;
        let mut set = JoinSet::new();
        for i in 0..6usize {
            let con = r.async_con().await;
            let base = 100 * (round + 1);
            match i {
                0..=2 => spawn_cmd(
                    &mut set,
                    i,
                    con,
                    "PGCACHE.READ",
                    "users",
                    format!(r#"{{"id":{}}}"#, base + (i as i64 % 2)),
                ),
                _ => spawn_cmd(
                    &mut set,
                    i,
                    con,
                    "PGCACHE.MULTIREAD",
                    "users",
                    format!(
                        r#"[{{"id":1}},{{"id":{}}},{{"id":{}}}]"#,
                        base,
                        base + 10 + i as i64
                    ),
                ),
            }
        }
        wait_blocked(&mut admin, 6).await;
        wait_for_stat(&mut admin, "fills_in_flight", 1).await;
        // fast shutdown: the sessions (the lock's, the fills') are terminated
        pg.stop();
        drop(lock);
        while let Some(res) = set.join_next().await {
            let (tag, reply) = res.unwrap();
            // an error reply (or, rarely, the row if it was read in time)
            if let Err(e) = &reply {
                assert_eq!(
                    e.kind(),
                    redis::ErrorKind::ResponseError,
                    "client {tag}: {e}"
                );
            }
        }
        // while down: hits served, misses answered with an error
        assert_eq!(
            json(
                &aread(&mut admin, "users", r#"{"id":1}"#)
                    .await
                    .unwrap()
                    .unwrap()
            ),
            u1
        );
        assert!(aread(&mut admin, "users", r#"{"id":999}"#).await.is_err());
        if round == 1 {
            // a fill in flight as PostgreSQL comes back
            let mut c2 = r.async_con().await;
            let pending = tokio::spawn(async move {
                let _ = aread(&mut c2, "users", r#"{"id":998}"#).await;
            });
            pg.start();
            pending.await.unwrap();
        } else {
            pg.start();
        }
        let deadline = Instant::now() + HANG;
        loop {
            match aread(&mut admin, "users", &format!(r#"{{"id":{}}}"#, 300 + round)).await {
                Ok(Some(row)) => {
                    assert_eq!(json(&row), user_row(&pg, 300 + round));
                    break;
                }
                Ok(None) => panic!("nil for an existing row"),
                Err(e) => {
                    assert!(Instant::now() < deadline, "no recovery: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    wait_listener_ready(&r);
    wait_settled(&mut admin).await;
    let got: String = redis::cmd("PGCACHE.MULTIREAD")
        .arg("users")
        .arg(r#"[{"id":100},{"id":101},{"id":1}]"#)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        json(&got),
        Value::Array(vec![user_row(&pg, 100), user_row(&pg, 101), u1])
    );
    drop(admin);
    finish(r);
}
