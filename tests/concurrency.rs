//! Many concurrent clients, coalesced misses, the bound on fills in flight,
//! and fills racing invalidations (SPEC §6, §7).
//!
//! Fills are held in flight deterministically by a transaction holding an
//! ACCESS EXCLUSIVE lock on the table: the module's SELECT waits for it.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Every users row as row_to_json renders it, by id.
fn all_users(pg: &PgServer) -> HashMap<i64, Value> {
    pg.query_texts("SELECT row_to_json(u)::text FROM users u")
        .into_iter()
        .map(|t| {
            let v = json(&t.unwrap());
            (v["id"].as_i64().unwrap(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_read_correct_rows() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let expected = Arc::new(all_users(&pg));
    pg.reset_stats();

    const CLIENTS: i64 = 64;
    const READS: i64 = 60;
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let mut con = r.async_con().await;
        let expected = expected.clone();
        set.spawn(async move {
            let mut requested = vec![];
            for i in 0..READS {
                // ids above 1000 do not exist
                let id = (client * 37 + i * 11) % 1100 + 1;
                requested.push(id);
                let spelling = if i % 2 == 0 {
                    format!(r#"{{"id":{id}}}"#)
                } else {
                    format!(r#"{{ "id" : "{id}" }}"#)
                };
                let got = aread(&mut con, "users", &spelling)
                    .await
                    .unwrap_or_else(|e| panic!("client {client}: READ {id}: {e}"));
                match expected.get(&id) {
                    Some(row) => assert_eq!(
                        got.as_deref().map(json).as_ref(),
                        Some(row),
                        "client {client} id {id}"
                    ),
                    None => assert_eq!(got, None, "client {client} id {id}"),
                }
                if i % 10 == 9 {
                    // a MULTIREAD now and then
                    let ids: Vec<i64> = (0..5).map(|k| (id + k * 101) % 1100 + 1).collect();
                    let arr = format!(
                        "[{}]",
                        ids.iter()
                            .map(|x| format!(r#"{{"id":{x}}}"#))
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                    let reply: String = redis::cmd("PGCACHE.MULTIREAD")
                        .arg("users")
                        .arg(&arr)
                        .query_async(&mut con)
                        .await
                        .unwrap_or_else(|e| panic!("client {client}: MULTIREAD: {e}"));
                    let got = json(&reply);
                    for (k, x) in ids.iter().enumerate() {
                        assert_eq!(
                            got[k],
                            expected.get(x).cloned().unwrap_or(Value::Null),
                            "MULTIREAD element {k} (id {x})"
                        );
                    }
                    requested.extend(ids);
                }
            }
            requested
        });
    }
    let mut requested = vec![];
    while let Some(res) = set.join_next().await {
        requested.extend(res.expect("client task"));
    }
    let existing: std::collections::HashSet<i64> = requested
        .iter()
        .copied()
        .filter(|id| expected.contains_key(id))
        .collect();
    let missing_requests = requested
        .iter()
        .filter(|id| !expected.contains_key(id))
        .count() as i64;
    let queries = pg.queries_on("users");
    assert!(
        queries <= existing.len() as i64 + missing_requests,
        "{queries} queries for {} distinct rows and {missing_requests} missing-row requests",
        existing.len()
    );
    let s = r.stats();
    assert!(stat_of(&s, "hits") > 0, "{s}");
    assert_eq!(stat_of(&s, "pg_errors"), 0, "{s}");
    assert_eq!(stat_of(&s, "fills_in_flight"), 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_misses_share_one_query() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;
    let expected = pg.row_json("users", "id = 500").unwrap();
    pg.reset_stats();
    let before = stats_async(&mut admin).await;

    const N: usize = 200;
    let mut cons = vec![];
    for _ in 0..N {
        cons.push(r.async_con().await);
    }
    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    for (i, mut con) in cons.into_iter().enumerate() {
        set.spawn(async move {
            let pk = if i % 3 == 0 {
                r#"{"id":500}"#.to_string()
            } else if i % 3 == 1 {
                r#"{"id":"500"}"#.to_string()
            } else {
                r#"{ "id" : "0500" }"#.to_string()
            };
            aread(&mut con, "users", &pk).await
        });
    }
    // the first miss is waiting on PostgreSQL; the others should join it
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let s = stats_async(&mut admin).await;
        if stat_of(&s, "coalesced_waits") - stat_of(&before, "coalesced_waits") >= (N - 1) as i64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    lock.release().await;

    let mut replies = 0;
    while let Some(res) = set.join_next().await {
        let got = res.unwrap().expect("READ").expect("row");
        assert_eq!(json(&got), expected);
        replies += 1;
    }
    assert_eq!(replies, N);
    assert_eq!(
        pg.queries_on("users"),
        1,
        "{N} concurrent misses of one key must share one query:\n{}",
        pg.statements()
    );
    let after = stats_async(&mut admin).await;
    let coalesced = stat_of(&after, "coalesced_waits") - stat_of(&before, "coalesced_waits");
    assert!(coalesced > 0, "coalesced_waits did not grow: {after}");
    assert_eq!(
        stat_of(&after, "pg_queries") - stat_of(&before, "pg_queries"),
        1,
        "{after}"
    );
    assert_eq!(stat_of(&after, "fills_in_flight"), 0, "{after}");
}

/// Cold misses of different keys that wait for a connection are fetched
/// together: with one pooled connection held by a locked query, 44 READs and
/// a MULTIREAD queue up, and the next free connection takes them all in one
/// query. Every client still gets its own row (or nil).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_misses_waiting_for_a_connection_share_one_query() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_pool_size", "1", "pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;
    let expected = Arc::new(all_users(&pg));
    pg.reset_stats();
    let before = stats_async(&mut admin).await;

    let lock = pg.lock_table("users").await;
    // The first miss takes the only connection and waits on the lock.
    let mut first_con = r.async_con().await;
    let first = tokio::spawn(async move { aread(&mut first_con, "users", r#"{"id":1}"#).await });
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let mut set = JoinSet::new();
    // ids 5001.. do not exist: nil answers must land on the right clients.
    let ids: Vec<i64> = (2..=40).chain(5001..=5005).collect();
    for &id in &ids {
        let mut con = r.async_con().await;
        set.spawn(async move {
            (
                id,
                aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#)).await,
            )
        });
    }
    let mut multi_con = r.async_con().await;
    let multi = tokio::spawn(async move {
        redis::cmd("PGCACHE.MULTIREAD")
            .arg("users")
            .arg(r#"[{"id":41},{"id":42},{"id":43},{"id":2},{"id":41},{"id":5006}]"#)
            .query_async::<String>(&mut multi_con)
            .await
    });
    // 1 + 44 READs + 4 new keys of the MULTIREAD (2 joins a READ's fill).
    wait_for_stat(&mut admin, "fills_in_flight", 49).await;
    lock.release().await;

    assert_eq!(
        first.await.unwrap().unwrap().map(|t| json(&t)).as_ref(),
        expected.get(&1)
    );
    while let Some(res) = set.join_next().await {
        let (id, got) = res.unwrap();
        let got = got.unwrap_or_else(|e| panic!("READ {id}: {e}"));
        assert_eq!(got.map(|t| json(&t)).as_ref(), expected.get(&id), "id {id}");
    }
    let rows = json(&multi.await.unwrap().unwrap());
    let want: Vec<Value> = [41, 42, 43, 2, 41, 5006]
        .iter()
        .map(|id| expected.get(id).cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(rows, Value::Array(want));

    assert_eq!(
        pg.queries_on("users"),
        2,
        "the locked query, then one for all 48 queued keys:\n{}",
        pg.statements()
    );
    let after = stats_async(&mut admin).await;
    assert_eq!(
        stat_of(&after, "pg_queries") - stat_of(&before, "pg_queries"),
        2,
        "{after}"
    );
    assert_eq!(stat_of(&after, "fills_in_flight"), 0, "{after}");
    // Everything was cached: reading it all again issues no query.
    for id in ids.iter().chain(&[1, 41, 42, 43]) {
        let got = aread(&mut admin, "users", &format!(r#"{{"id":{id}}}"#))
            .await
            .unwrap();
        assert_eq!(got.map(|t| json(&t)).as_ref(), expected.get(id), "id {id}");
    }
    let again = stats_async(&mut admin).await;
    assert_eq!(
        stat_of(&again, "pg_queries"),
        stat_of(&after, "pg_queries") + 5,
        "only the 5 nonexistent ids (no negative_ttl) go back to PostgreSQL: {again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_in_flight_are_bounded() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["max_inflight", "2", "pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;
    read_row(&mut r.con(), "users", r#"{"id":100}"#); // cached: a hit later

    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    for id in [1, 2] {
        let mut con = r.async_con().await;
        set.spawn(async move { aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#)).await });
    }
    wait_for_stat(&mut admin, "fills_in_flight", 2).await;

    // past the bound: an error at once (the lock is still held)
    let mut con = r.async_con().await;
    let e = expect_err(
        aread(&mut con, "users", r#"{"id":3}"#).await,
        "a third fill",
    );
    eprintln!("busy reply: {e}");
    let s = stats_async(&mut admin).await;
    assert!(stat_of(&s, "busy_rejections") >= 1, "{s}");
    // hits and other commands are still served
    assert_eq!(
        json(
            &aread(&mut con, "users", r#"{"id":100}"#)
                .await
                .unwrap()
                .unwrap()
        )["id"],
        100
    );
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");

    lock.release().await;
    while let Some(res) = set.join_next().await {
        assert!(res.unwrap().unwrap().is_some());
    }
    // room again
    assert!(aread(&mut con, "users", r#"{"id":3}"#)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_during_fill_is_not_undone() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;
    let before = stats_async(&mut admin).await;

    let lock = pg.lock_table("users").await;
    lock.execute("UPDATE users SET name = 'Changed' WHERE id = 5")
        .await;
    let mut con = r.async_con().await;
    let fill = tokio::spawn(async move { aread(&mut con, "users", r#"{"id":5}"#).await });
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let ok: String = redis::cmd("PGCACHE.INVALIDATE")
        .arg("users")
        .arg(r#"{"id":5}"#)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(ok, "OK");
    lock.release().await;

    let answered = fill.await.unwrap().expect("the fill answers its client");
    assert!(answered.is_some());
    let mut c = r.con();
    assert!(
        !exists(&mut c, r#"pg_cache:users:{"id":5}"#),
        "a fill that started before INVALIDATE must not be cached"
    );
    let after = stats_async(&mut admin).await;
    assert!(
        stat_of(&after, "stale_fills_discarded") > stat_of(&before, "stale_fills_discarded"),
        "{after}"
    );
    assert_eq!(read_row(&mut c, "users", r#"{"id":5}"#)["name"], "Changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_during_fill_is_not_overwritten() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;

    let lock = pg.lock_table("users").await;
    let mut con = r.async_con().await;
    let fill = tokio::spawn(async move { aread(&mut con, "users", r#"{"id":6}"#).await });
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let written = r#"{"id":6,"name":"From WRITE"}"#;
    let ok: String = redis::cmd("PGCACHE.WRITE")
        .arg("users")
        .arg(r#"{"id":6}"#)
        .arg(written)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(ok, "OK");
    lock.release().await;

    let answered = fill
        .await
        .unwrap()
        .expect("the fill answers its client")
        .unwrap();
    assert_eq!(
        json(&answered)["name"],
        "User 6",
        "the fill's client gets the row"
    );
    let mut c = r.con();
    let stored: String = redis::cmd("GET")
        .arg(r#"pg_cache:users:{"id":6}"#)
        .query(&mut c)
        .unwrap();
    assert_eq!(
        json(&stored),
        json(written),
        "WRITE must win over the fill in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_nothing_behind() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;

    let lock = pg.lock_table("users").await;
    let mut victim = r.async_con().await;
    let victim_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut victim)
        .await
        .unwrap();
    let pending = tokio::spawn(async move {
        let _ = redis::cmd("PGCACHE.READ")
            .arg("users")
            .arg(r#"{"id":7}"#)
            .query_async::<Option<String>>(&mut victim)
            .await;
    });
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    // A second reader of the key waits on the victim's fill.
    let coalesced_before = stat_of(&stats_async(&mut admin).await, "coalesced_waits");
    let mut follower_con = r.async_con().await;
    let follower =
        tokio::spawn(async move { aread(&mut follower_con, "users", r#"{"id":7}"#).await });
    wait_for_stat(&mut admin, "coalesced_waits", coalesced_before + 1).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(victim_id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    lock.release().await;
    let _ = pending.await;
    // The fill the killed client started still answers the follower and
    // caches the row.
    let row = follower.await.unwrap().unwrap().expect("row 7 exists");
    assert_eq!(json(&row)["id"], 7);
    assert_eq!(
        redis::cmd("EXISTS")
            .arg(r#"pg_cache:users:{"id":7}"#)
            .query_async::<i64>(&mut admin)
            .await
            .unwrap(),
        1,
        "the row was cached"
    );

    // the fill finishes and nothing is left in flight; the server is fine
    let deadline = std::time::Instant::now() + HANG;
    loop {
        let s = stats_async(&mut admin).await;
        if stat_of(&s, "fills_in_flight") == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fill never finished: {s}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut c = r.con();
    assert!(ping(&mut c));
    assert_eq!(read_row(&mut c, "users", r#"{"id":7}"#)["id"], 7);
}

/// A MULTIREAD that joins another client's fill and starts one of its own
/// cannot carry its own fill to Redis's main thread (its answer waits for
/// the other fill too): when its fill runs alone, it is ended from a worker
/// instead. Every client still gets its rows, in order, and both are cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiread_joining_another_fill_gets_all_its_rows() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["pg_query_timeout_ms", "120000"]);
    let mut admin = r.async_con().await;
    warm_up(&mut admin).await;
    let expected = all_users(&pg);
    let before = stats_async(&mut admin).await;

    let lock = pg.lock_table("users").await;
    let mut read_con = r.async_con().await;
    let read = tokio::spawn(async move { aread(&mut read_con, "users", r#"{"id":11}"#).await });
    wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let mut multi_con = r.async_con().await;
    let multi = tokio::spawn(async move {
        redis::cmd("PGCACHE.MULTIREAD")
            .arg("users")
            .arg(r#"[{"id":12},{"id":11},{"id":5001}]"#)
            .query_async::<String>(&mut multi_con)
            .await
    });
    wait_for_stat(
        &mut admin,
        "coalesced_waits",
        stat_of(&before, "coalesced_waits") + 1,
    )
    .await;
    lock.release().await;

    let row = read.await.unwrap().unwrap().expect("row 11 exists");
    assert_eq!(Some(&json(&row)), expected.get(&11));
    let rows = json(&multi.await.unwrap().unwrap());
    assert_eq!(
        rows,
        Value::Array(vec![
            expected[&12].clone(),
            expected[&11].clone(),
            Value::Null
        ])
    );
    let after = stats_async(&mut admin).await;
    assert_eq!(stat_of(&after, "fills_in_flight"), 0, "{after}");
    for key in [r#"pg_cache:users:{"id":11}"#, r#"pg_cache:users:{"id":12}"#] {
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(n, 1, "{key} cached");
    }
}
