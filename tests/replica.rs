//! SPEC §6 on a replica: the module does not LISTEN and writes no keys of
//! its own; it serves what the primary replicates and answers a miss from
//! PostgreSQL without caching it. Promoted, it starts its listener.

mod common;

use common::*;

/// Everything the primary wrote so far has reached the replica.
#[track_caller]
fn replication_barrier(p: &mut redis::Connection, rc: &mut redis::Connection, n: &mut u32) {
    *n += 1;
    let marker = format!("replication-barrier-{n}");
    let _: () = redis::cmd("SET").arg(&marker).arg("1").query(p).unwrap();
    wait_until("the barrier key reaches the replica", || {
        if exists(rc, &marker) {
            Ok(())
        } else {
            Err(info(rc, "replication"))
        }
    });
}

#[test]
fn replica_serves_replicated_entries_and_caches_nothing_itself() {
    let pg = PgServer::start_new();
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_watch('users')");
    // no 5 s wait before the full sync
    let primary = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--repl-diskless-sync-delay", "0"],
    );
    wait_listener_ready(&primary);
    let port = primary.port().to_string();
    let replica = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--replicaof", "127.0.0.1", port.as_str()],
    );
    let mut p = primary.con();
    let mut rc = replica.con();
    wait_until("the replica's link to the primary is up", || {
        let info = info(&mut rc, "replication");
        if info.contains("master_link_status:up") {
            Ok(())
        } else {
            Err(info)
        }
    });
    let mut n = 0;
    replication_barrier(&mut p, &mut rc, &mut n);
    let rs = stats(&mut rc);
    assert_eq!(
        stat_str(&rs, "listener"),
        "off",
        "a replica must not LISTEN: {rs}"
    );
    assert_eq!(
        listen_session_pids(&pg).len(),
        1,
        "only the primary LISTENs (pg_stat_activity)"
    );

    // a fill on the primary reaches the replica, where it is a hit
    let k1 = r#"pg_cache:users:{"id":1}"#;
    let row = read_row(&mut p, "users", r#"{"id":1}"#);
    wait_until("the primary's entry reaches the replica", || {
        if exists(&mut rc, k1) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(get(&mut rc, k1), get(&mut p, k1));
    pg.reset_stats();
    let hits = stat_of(&stats(&mut rc), "hits");
    assert_eq!(read_row(&mut rc, "users", r#"{"id":1}"#), row);
    assert_eq!(
        stat_of(&stats(&mut rc), "hits"),
        hits + 1,
        "a hit on the replica"
    );
    assert_eq!(pg.queries_on("users"), 0, "a hit asks PostgreSQL nothing");

    // a miss on the replica is answered from PostgreSQL, not cached
    let k2 = r#"pg_cache:users:{"id":2}"#;
    let misses = stat_of(&stats(&mut rc), "misses");
    assert_eq!(
        read_row(&mut rc, "users", r#"{"id":2}"#),
        pg.row_json("users", "id = 2").unwrap()
    );
    assert_eq!(stat_of(&stats(&mut rc), "misses"), misses + 1);
    assert_eq!(pg.queries_on("users"), 1);
    replication_barrier(&mut p, &mut rc, &mut n);
    assert!(!exists(&mut rc, k2), "the replica cached a row itself");
    assert!(
        !exists(&mut p, k2),
        "the replica's miss reached the primary"
    );
    // and asked again, it asks PostgreSQL again
    read_row(&mut rc, "users", r#"{"id":2}"#);
    assert_eq!(pg.queries_on("users"), 2);
    // negative results are not remembered there either
    assert_eq!(read(&mut rc, "users", r#"{"id":424242}"#).unwrap(), None);
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut rc).unwrap();
    let pdbsize: i64 = redis::cmd("DBSIZE").query(&mut p).unwrap();
    assert_eq!(
        dbsize, pdbsize,
        "the replica holds keys the primary does not"
    );

    // an UPDATE's notification on the primary drops the entry on both
    pg.execute("UPDATE users SET name = 'changed' WHERE id = 1");
    wait_until(
        "the entry is dropped on the primary and the replica",
        || match (exists(&mut p, k1), exists(&mut rc, k1)) {
            (false, false) => Ok(()),
            other => Err(format!("(primary, replica) hold it: {other:?}")),
        },
    );
    assert_eq!(read_row(&mut rc, "users", r#"{"id":1}"#)["name"], "changed");
    assert!(primary.stats()["listener"] == "connected");

    // promoted, the replica starts its own listener
    let _: String = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut rc)
        .unwrap();
    wait_listener_ready(&replica);
    wait_until("two LISTEN sessions", || {
        let pids = listen_session_pids(&pg);
        if pids.len() == 2 {
            Ok(())
        } else {
            Err(format!("{pids:?}"))
        }
    });
    // and caches, and hears notifications
    read_row(&mut rc, "users", r#"{"id":3}"#);
    assert!(exists(&mut rc, r#"pg_cache:users:{"id":3}"#));
    pg.execute("UPDATE users SET name = 'heard' WHERE id = 3");
    wait_until("the promoted replica's listener drops the entry", || {
        if exists(&mut rc, r#"pg_cache:users:{"id":3}"#) {
            Err("still cached".into())
        } else {
            Ok(())
        }
    });
}
