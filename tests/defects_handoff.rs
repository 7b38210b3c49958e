//! Issue 11, defects 14 and 15: every blocked client has a safety net, and
//! big batches of completed fills reach Redis in chunks of keys.

mod common;

use common::*;
use std::time::Duration;

/// Module arguments with short PostgreSQL timeouts: the safety net of a
/// blocked client is 2 × (connect + query) + 1 s = 2.2 s.
fn short_timeouts(pg: &PgServer) -> Vec<String> {
    let mut args = pg.module_args();
    args.extend(
        ["pg_connect_timeout_ms", "300", "pg_query_timeout_ms", "300"]
            .iter()
            .map(|s| s.to_string()),
    );
    args
}

/// Defect 14: a fill whose answer never comes (the `lose_fills` test fault
/// registers fills and never runs them, as a lost task would) must not hang
/// its clients or its key: each blocked client gets a "timed out" error from
/// its safety-net timeout, a second READ of the same key (joined to the lost
/// fill) too, and the lost fill is reaped so that nothing stays in flight.
/// The baseline has no safety net (and no such fault): it answers the row.
#[test]
fn a_lost_fill_is_answered_by_the_safety_net() {
    let pg = PgServer::start_new();
    let r = RedisServer::start_with_env(
        &short_timeouts(&pg),
        &[("PGCACHE_TEST_FAULTS", "lose_fills")],
    );
    r.wait_until_ready();
    let mut c = r.con_with_read_timeout(Duration::from_secs(30));
    assert!(
        r.log().contains("test faults are on"),
        "the module says a test fault is on"
    );
    let before = stats(&mut c);

    // Two clients miss the same key: the second joins the first's fill.
    let joined = {
        let mut c2 = r.con_with_read_timeout(Duration::from_secs(30));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            read(&mut c2, "users", r#"{"id":1}"#)
        })
    };
    let first = read(&mut c, "users", r#"{"id":1}"#);
    let second = joined.join().unwrap();
    for (who, reply) in [("first", first), ("joined", second)] {
        let e = expect_err(reply, &format!("the {who} READ of a lost fill"));
        assert!(e.contains("timed out"), "{who}: {e}");
    }
    let e = expect_err(
        multiread(&mut c, "users", r#"[{"id":2},{"id":3}]"#),
        "a MULTIREAD of lost fills",
    );
    assert!(e.contains("timed out"), "{e}");

    // The lost fills are reaped: nothing stays in flight, their key is free.
    wait_until("lost fills reaped", || {
        let s = stats(&mut c);
        if stat_of(&s, "fills_in_flight") == 0 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let after = stats(&mut c);
    assert!(
        stat_of(&after, "coalesced_waits") > stat_of(&before, "coalesced_waits"),
        "the second READ joined the lost fill: {after}"
    );
    assert!(
        stat_of(&after, "blocked_timeouts") >= stat_of(&before, "blocked_timeouts") + 3,
        "{after}"
    );
    assert!(
        stat_of(&after, "fills_reaped") >= stat_of(&before, "fills_reaped") + 3,
        "{after}"
    );
    assert!(ping(&mut c), "Redis answers");
    assert!(
        r.log().contains("got no answer within"),
        "the reaping is logged"
    );
}

/// Defect 15: a MULTIREAD of 1000 misses is one query, and its 1000 fills
/// are ended in chunks of at most 128 keys (each one turn of Redis's main
/// thread or one hold of its lock), not in one callback. Every row is
/// right and cached. The baseline ends it in one callback (and has no
/// `completion_chunks` figure).
#[test]
fn a_big_multiread_is_completed_in_chunks_of_keys() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con_with_read_timeout(Duration::from_secs(30));
    let before = stats(&mut c);
    pg.reset_stats();
    let ids: Vec<i64> = (1..=1000).collect();
    let pks: Vec<String> = ids.iter().map(|id| format!(r#"{{"id":{id}}}"#)).collect();
    let answer = multiread(&mut c, "users", &format!("[{}]", pks.join(","))).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&answer).unwrap();
    assert_eq!(rows.len(), 1000);
    for (id, row) in ids.iter().zip(&rows) {
        assert_eq!(row["id"], *id, "{row}");
    }
    assert_eq!(pg.queries_on("users"), 1, "{}", pg.statements());
    let after = stats(&mut c);
    let chunks = stat_of(&after, "completion_chunks") - stat_of(&before, "completion_chunks");
    assert!(
        chunks >= 1000 / 128,
        "1000 fills ended in {chunks} chunks: {after}"
    );
    assert_eq!(keys(&mut c, "pg_cache:users:*").len(), 1000);
    // Hits now, in one pass.
    let again = multiread(&mut c, "users", &format!("[{}]", pks.join(","))).unwrap();
    assert_eq!(again, answer);
}
