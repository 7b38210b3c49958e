//! SPEC §6, Consistency: no stale fill and no gap.
//!
//! The race tests hold a fill's query inside PostgreSQL's executor, after
//! its snapshot was taken, so the row it will return is already decided;
//! meanwhile the row changes (or the key is invalidated, written, flushed,
//! or the listener has a gap), and only then is the fill released. The
//! module connects as a non-superuser role `cacher` and `users` has a
//! row-level-security policy `USING (gate())`, where `gate()` takes and
//! releases a shared advisory lock: while the test holds that lock
//! exclusively, every fill of `users` waits in `gate()`, snapshot taken.

mod common;

use common::gate::{start_gated, Gate, GATED_ROLE};
use common::*;
use serde_json::Value;
use std::thread::JoinHandle;

#[derive(Clone, Copy, Debug)]
enum Race {
    /// an UPDATE of the row, committed; its notification handled
    Notify,
    /// PGCACHE.INVALIDATE of the key
    Invalidate,
    /// PGCACHE.WRITE of the key
    Write,
    /// PGCACHE.INVALIDATE_TABLE users
    InvalidateTable,
    /// the listener's connection killed; it reconnects and flushes
    Gap,
}

struct Gated {
    pg: PgServer,
    r: RedisServer,
    gate: Gate,
    c: redis::Connection,
}

impl Gated {
    async fn start() -> Gated {
        let (pg, r, gate) = start_gated(&[]).await;
        let mut c = r.con();
        // warm the module's catalog; the gate is open
        let row = read_row(&mut c, "users", r#"{"id":1000}"#);
        assert_eq!(row["id"], 1000);
        // the gate works: the module's fill really runs as the gated role
        assert_eq!(
            pg.query_text(&format!(
                "SELECT count(*)::text FROM pg_stat_activity WHERE usename = '{GATED_ROLE}'"
            ))
            .map(|n| n.parse::<i64>().unwrap() > 0),
            Some(true),
            "the module does not connect as {GATED_ROLE}"
        );
        Gated { pg, r, gate, c }
    }

    /// Close the gate, start a READ of `id` on its own connection, and wait
    /// until its query waits in the gate (snapshot taken).
    async fn hold_fill(&mut self, id: i64) -> JoinHandle<redis::RedisResult<Option<String>>> {
        self.gate.close().await;
        assert!(
            !exists(&mut self.c, &user_key(id)),
            "{} is cached before the race",
            user_key(id)
        );
        let mut fc = self.r.con();
        let pk = format!(r#"{{"id":{id}}}"#);
        let h = std::thread::spawn(move || read(&mut fc, "users", &pk));
        self.gate
            .wait_held("the fill waits in gate(), after its snapshot");
        assert!(stat_of(&stats(&mut self.c), "fills_in_flight") >= 1);
        h
    }

    /// One race: hold a fill of `id`, invalidate its key by `how`, release
    /// it, then check that the old row was not cached.
    async fn race(&mut self, how: Race, id: i64, round: usize) {
        let key = user_key(id);
        let sentinel = 999;
        let before = stats(&mut self.c);
        let old = self
            .pg
            .row_json("users", &format!("id = {id}"))
            .expect("row exists");
        let new_name = format!("{how:?} round {round}");

        let fill = self.hold_fill(id).await;
        let mut written: Option<String> = None;
        match how {
            Race::Notify => {
                // the UPDATE of `id`, then one of a cached sentinel row, in
                // one transaction: the notifications arrive in that order,
                // so once the sentinel is gone the first was handled
                write(
                    &mut self.c,
                    "users",
                    &format!(r#"{{"id":{sentinel}}}"#),
                    r#"{"sentinel":true}"#,
                )
                .unwrap();
                self.pg.execute(&format!(
                    "BEGIN; \
                     UPDATE users SET name = '{new_name}' WHERE id = {id}; \
                     UPDATE users SET email = 'sentinel{round}' WHERE id = {sentinel}; \
                     COMMIT"
                ));
                let c = &mut self.c;
                wait_until("the sentinel's notification is handled", || {
                    if exists(c, &user_key(sentinel)) {
                        Err("sentinel still cached".into())
                    } else {
                        Ok(())
                    }
                });
                let after = stats(&mut self.c);
                assert!(
                    stat_of(&after, "notifications_received")
                        >= stat_of(&before, "notifications_received") + 2,
                    "{after}"
                );
            }
            Race::Invalidate => {
                assert_eq!(
                    invalidate(&mut self.c, "users", &format!(r#"{{"id":{id}}}"#)).unwrap(),
                    "OK"
                );
            }
            Race::Write => {
                let data = format!(r#"{{"id":{id},"name":"written in round {round}"}}"#);
                assert_eq!(
                    write(&mut self.c, "users", &format!(r#"{{"id":{id}}}"#), &data).unwrap(),
                    "OK"
                );
                written = Some(data);
            }
            Race::InvalidateTable => {
                let _: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
                    .arg("users")
                    .query(&mut self.c)
                    .unwrap();
            }
            Race::Gap => {
                let pids = listen_session_pids(&self.pg);
                assert_eq!(pids.len(), 1, "one listener session: {pids:?}");
                self.pg
                    .query_texts(&format!("SELECT pg_terminate_backend({})::text", pids[0]));
                let c = &mut self.c;
                wait_until("the listener reconnected and flushed", || {
                    let s = stats(c);
                    let ok = stat_of(&s, "listener_reconnects")
                        > stat_of(&before, "listener_reconnects")
                        && stat_of(&s, "flushes") > stat_of(&before, "flushes")
                        && stat_str(&s, "listener") == "connected"
                        && stat_of(&s, "gap_flush_running") == 0;
                    if ok {
                        Ok(())
                    } else {
                        Err(s.to_string())
                    }
                });
            }
        }
        // the fill is still held: nothing was answered or cached yet
        assert!(!fill.is_finished(), "{how:?}: the held fill answered early");
        self.gate.open().await;

        // its client gets an answer (the row as its snapshot saw it)
        let got = fill
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{how:?} round {round}: the held READ failed: {e}"))
            .unwrap_or_else(|| panic!("{how:?} round {round}: the held READ returned nil"));
        assert_eq!(json(&got)["id"], id);
        if let Race::Notify = how {
            // the race is real: the query's snapshot predates the UPDATE
            assert_eq!(
                json(&got),
                old,
                "round {round}: the held fill did not read the old row; the test lost its race"
            );
        }
        let c = &mut self.c;
        wait_until("the fill is counted as discarded", || {
            let s = stats(c);
            if stat_of(&s, "stale_fills_discarded") > stat_of(&before, "stale_fills_discarded")
                && stat_of(&s, "fills_in_flight") == 0
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        });

        let cached = get(&mut self.c, &key);
        match how {
            Race::Notify => {
                if let Some(v) = &cached {
                    let v = json(v);
                    assert_ne!(v, old, "round {round}: the stale row was cached");
                    assert_eq!(v["name"], new_name.as_str(), "round {round}: {v}");
                }
                let now = read_row(&mut self.c, "users", &format!(r#"{{"id":{id}}}"#));
                assert_eq!(
                    now["name"],
                    new_name.as_str(),
                    "round {round}: READ after the race served a stale row"
                );
            }
            Race::Write => {
                assert_eq!(
                    cached, written,
                    "round {round}: the fill overwrote the entry PGCACHE.WRITE stored"
                );
            }
            Race::Invalidate | Race::InvalidateTable | Race::Gap => {
                assert_eq!(
                    cached, None,
                    "{how:?} round {round}: the fill cached the row after its key was invalidated"
                );
            }
        }
        // leave the key uncached for the next round
        invalidate(&mut self.c, "users", &format!(r#"{{"id":{id}}}"#)).unwrap();
        assert_eq!(self.gate.waiting(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_committed_during_a_fill_is_not_cached_stale() {
    let mut g = Gated::start().await;
    // the same rows again and again, each time with a new value
    for round in 0..20 {
        g.race(Race::Notify, 1 + (round as i64 % 4), round).await;
    }
    assert!(g.r.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_write_or_flush_during_a_fill_is_not_undone() {
    let mut g = Gated::start().await;
    for round in 0..6 {
        g.race(Race::Invalidate, 10 + round as i64, round).await;
        g.race(Race::Write, 20 + round as i64, round).await;
        g.race(Race::InvalidateTable, 30 + round as i64, round)
            .await;
    }
    assert!(g.r.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_gap_during_a_fill_is_not_undone() {
    let mut g = Gated::start().await;
    for round in 0..3 {
        g.race(Race::Gap, 40 + round as i64, round).await;
    }
    // and the listener still works
    read_row(&mut g.c, "users", r#"{"id":50}"#);
    g.pg.execute("UPDATE users SET name = 'after gaps' WHERE id = 50");
    let c = &mut g.c;
    wait_until("the notification after the gaps is handled", || {
        if exists(c, &user_key(50)) {
            Err("still cached".into())
        } else {
            Ok(())
        }
    });
    let v: Value = read_row(&mut g.c, "users", r#"{"id":50}"#);
    assert_eq!(v["name"], "after gaps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiread_fill_caches_only_the_keys_not_invalidated_meanwhile() {
    let mut g = Gated::start().await;
    for round in 0..3 {
        let (a, b) = (60 + 2 * round as i64, 61 + 2 * round as i64);
        let before = stats(&mut g.c);
        let old_b = g.pg.row_json("users", &format!("id = {b}")).unwrap();
        g.gate.close().await;
        let mut fc = g.r.con();
        let pks = format!(r#"[{{"id":{a}}},{{"id":{b}}}]"#);
        let h = std::thread::spawn(move || multiread(&mut fc, "users", &pks));
        g.gate.wait_held("the MULTIREAD fill waits in gate()");
        let new_name = format!("multi round {round}");
        write(&mut g.c, "users", r#"{"id":999}"#, r#"{"sentinel":true}"#).unwrap();
        g.pg.execute(&format!(
            "BEGIN; UPDATE users SET name = '{new_name}' WHERE id = {a}; \
             UPDATE users SET email = 'multi{round}' WHERE id = 999; COMMIT"
        ));
        let c = &mut g.c;
        wait_until("the sentinel's notification is handled", || {
            if exists(c, &user_key(999)) {
                Err("sentinel still cached".into())
            } else {
                Ok(())
            }
        });
        assert!(!h.is_finished(), "the held MULTIREAD answered early");
        g.gate.open().await;
        let got = json(&h.join().unwrap().expect("the held MULTIREAD"));
        assert_eq!(got[1], old_b, "round {round}: {got}");
        let c = &mut g.c;
        wait_until("the fill is over, counted as discarded", || {
            let s = stats(c);
            if stat_of(&s, "fills_in_flight") == 0
                && stat_of(&s, "stale_fills_discarded") > stat_of(&before, "stale_fills_discarded")
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        });
        if let Some(v) = get(&mut g.c, &user_key(a)) {
            assert_eq!(
                json(&v)["name"],
                new_name.as_str(),
                "round {round}: the MULTIREAD cached the stale row of the updated key"
            );
        }
        assert_eq!(
            get(&mut g.c, &user_key(b)).map(|v| json(&v)),
            Some(old_b),
            "round {round}: the key nobody touched should be cached by the MULTIREAD"
        );
        assert_eq!(
            read_row(&mut g.c, "users", &format!(r#"{{"id":{a}}}"#))["name"],
            new_name.as_str()
        );
    }
}

// ---------------------------------------------------------------------------
// no gap: the listener's connection drops, PostgreSQL restarts, an RDB file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_while_the_listener_is_disconnected_is_not_served_after() {
    let pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    for id in 1..=3 {
        read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
    }
    let pids = listen_session_pids(&pg);
    assert_eq!(pids.len(), 1, "one LISTEN session: {pids:?}");
    let before = stats(&mut c);

    // A session opened now outlives the ban on new connections, which keeps
    // the listener disconnected for as long as the test wants.
    let s = pg.client().await;
    let (admin, conn) =
        tokio_postgres::connect(&pg.conn_string_for("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "{HARNESS_MARK} ALTER DATABASE {DB_NAME} ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    s.batch_execute(&format!(
        "{HARNESS_MARK} SELECT pg_terminate_backend({})",
        pids[0]
    ))
    .await
    .unwrap();
    wait_until("the listener notices its connection is gone", || {
        let st = stats(&mut c);
        if stat_of(&st, "listener_reconnects") > stat_of(&before, "listener_reconnects") {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    let st = stats(&mut c);
    let state = stat_str(&st, "listener");
    assert!(
        state == "disconnected" || state == "connecting",
        "the listener cannot connect, yet STATS says {state:?}: {st}"
    );
    let info: String = redis::cmd("INFO").arg("pgcache").query(&mut c).unwrap();
    assert!(
        !info.contains("pgcache_listener:connected"),
        "INFO says connected while it cannot be:\n{info}"
    );
    // the change nobody hears about
    s.batch_execute(&format!(
        "{HARNESS_MARK} UPDATE users SET name = 'changed in the gap' WHERE id = 2"
    ))
    .await
    .unwrap();
    admin
        .batch_execute(&format!(
            "{HARNESS_MARK} ALTER DATABASE {DB_NAME} ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();

    let after = wait_reconnected_and_flushed(&r, &before);
    assert!(
        stat_of(&after, "entries_invalidated") >= stat_of(&before, "entries_invalidated") + 3,
        "the gap flush dropped fewer than the 3 entries: {after}"
    );
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":2}"#)["name"],
        "changed in the gap",
        "an entry cached before the gap was served after the reconnect"
    );
    let now = listen_session_pids(&pg);
    assert_eq!(
        now.len(),
        1,
        "exactly one LISTEN session after the reconnect: {now:?}"
    );
    assert_ne!(now, pids);
    // the new listener hears changes
    pg.execute("UPDATE users SET name = 'heard' WHERE id = 2");
    wait_until("the notification after the reconnect is handled", || {
        if exists(&mut c, &user_key(2)) {
            Err("still cached".into())
        } else {
            Ok(())
        }
    });
}

#[test]
fn update_right_after_a_postgres_restart_is_not_served_stale() {
    let mut pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    for id in 1..=3 {
        read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
    }
    let before = stats(&mut c);

    pg.stop();
    wait_until("the listener notices PostgreSQL is gone", || {
        let st = stats(&mut c);
        if stat_str(&st, "listener") != "connected" {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    // hits are still served while PostgreSQL is down
    assert_eq!(read_row(&mut c, "users", r#"{"id":3}"#)["id"], 3);
    pg.start();
    // at once, quite likely before the listener is back
    pg.execute("UPDATE users SET name = 'after restart' WHERE id = 1");

    wait_reconnected_and_flushed(&r, &before);
    let st = stats(&mut c);
    assert!(
        stat_of(&st, "listener_reconnects") > stat_of(&before, "listener_reconnects"),
        "{st}"
    );
    // The fill pool may need a moment to notice its connections died; an
    // error reply is allowed then, a stale row never.
    let mut errors = Vec::new();
    wait_until("a READ after the restart succeeds", || {
        match read(&mut c, "users", r#"{"id":1}"#) {
            Ok(Some(s)) => {
                let v = json(&s);
                assert_eq!(
                    v["name"], "after restart",
                    "a row cached before the restart was served after it: {v}"
                );
                Ok(())
            }
            Ok(None) => panic!("READ users 1 returned nil"),
            Err(e) => {
                errors.push(err_text(&e));
                Err(err_text(&e))
            }
        }
    });
    if !errors.is_empty() {
        eprintln!("READ errors while the pool recovered: {errors:?}");
    }
    // the listener works again
    read_row(&mut c, "users", r#"{"id":2}"#);
    pg.execute("UPDATE users SET name = 'heard' WHERE id = 2");
    wait_until("the notification after the restart is handled", || {
        if exists(&mut c, &user_key(2)) {
            Err("still cached".into())
        } else {
            Ok(())
        }
    });
    assert_eq!(listen_session_pids(&pg).len(), 1);
}

#[test]
fn entries_loaded_from_an_rdb_file_are_not_served_as_fresh() {
    let pg = watched_pg();
    let data = tempfile::Builder::new()
        .prefix("pgcache-test-rdb-")
        .tempdir()
        .unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let server_args = ["--dir", dir.as_str(), "--dbfilename", "pgcache-test.rdb"];
    let args = pg.module_args();

    let r = RedisServer::start_with_server_args(&args, &server_args);
    wait_listener_ready(&r);
    let mut c = r.con();
    let pks: Vec<String> = (1..=5).map(|id| format!(r#"{{"id":{id}}}"#)).collect();
    multiread(&mut c, "users", &format!("[{}]", pks.join(","))).unwrap();
    let _: () = redis::cmd("SET")
        .arg("not-a-cache-entry")
        .arg("kept")
        .query(&mut c)
        .unwrap();
    // and one entry in another database
    let mut c3 = r.con();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut c3).unwrap();
    read_row(&mut c3, "users", r#"{"id":6}"#);
    assert!(exists(&mut c3, r#"pg_cache:users:{"id":6}"#));
    let _: String = redis::cmd("SAVE").query(&mut c).unwrap();
    assert_eq!(keys(&mut c, "pg_cache:users:*").len(), 5);
    drop(c);
    drop(c3);
    drop(r);

    // changed while no listener runs: no notification reaches anyone
    pg.execute("UPDATE users SET name = 'changed offline' WHERE id <= 6");

    let r = RedisServer::start_with_server_args(&args, &server_args);
    let mut c = r.con();
    let kept: Option<String> = redis::cmd("GET")
        .arg("not-a-cache-entry")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("kept"),
        "the RDB file was not loaded; the test proves nothing"
    );
    // at once, before the listener may be connected: never the saved rows
    let first = read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(
        first["name"], "changed offline",
        "an entry loaded from the RDB file was served: {first}"
    );
    let mut c3 = r.con();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut c3).unwrap();
    let in3 = read_row(&mut c3, "users", r#"{"id":6}"#);
    assert_eq!(
        in3["name"], "changed offline",
        "an entry loaded from the RDB file into database 3 was served: {in3}"
    );
    let st = wait_listener_ready(&r);
    assert!(stat_of(&st, "flushes") >= 1, "{st}");
    for id in 1..=5 {
        let v = read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert_eq!(
            v["name"], "changed offline",
            "an entry loaded from the RDB file was served: {v}"
        );
    }
    let in3 = read_row(&mut c3, "users", r#"{"id":6}"#);
    assert_eq!(
        in3["name"], "changed offline",
        "an entry loaded from the RDB file into database 3 was served: {in3}"
    );
    let still: Option<String> = redis::cmd("GET")
        .arg("not-a-cache-entry")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        still.as_deref(),
        Some("kept"),
        "the gap flush dropped a key that is not an entry"
    );
}
