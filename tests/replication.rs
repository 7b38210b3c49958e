//! Invalidation by logical replication (SPEC §11; design:
//! `logical-replication.md`): `invalidation_source replication` streams
//! pgoutput from a slot, with no trigger on any table, resumes from its
//! progress marker without flushing, and applies a change only once it is
//! visible to other sessions.

mod common;

use common::*;
use std::time::Duration;

fn start_redis(pg: &PgServer, extra: &[&str]) -> RedisServer {
    RedisServer::start(&replication_module_args(pg, extra))
}

fn name_of(c: &mut redis::Connection, id: i64) -> Option<String> {
    read(c, "users", &format!(r#"{{"id":{id}}}"#))
        .unwrap()
        .map(|row| json(&row)["name"].as_str().unwrap_or("").to_owned())
}

#[test]
fn insert_update_delete_invalidate_without_triggers() {
    let pg = replication_pg();
    let triggers = pg.query_text("SELECT count(*)::text FROM pg_trigger WHERE NOT tgisinternal");
    assert_eq!(triggers.as_deref(), Some("0"), "no trigger on any table");
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    // UPDATE
    assert!(name_of(&mut c, 1).is_some());
    assert!(exists(&mut c, &user_key(1)));
    pg.execute("UPDATE users SET name = 'renamed' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("renamed"));
    // DELETE
    pg.execute("DELETE FROM users WHERE id = 2");
    // (it was not cached: cache it first)
    let _ = name_of(&mut c, 3);
    pg.execute("DELETE FROM users WHERE id = 3");
    wait_gone(&mut c, &user_key(3));
    assert_eq!(name_of(&mut c, 3), None);
    let s = stats(&mut c);
    assert!(stat_of(&s, "replication_transactions") >= 3, "{s}");
    assert!(stat_of(&s, "replication_changes") >= 3, "{s}");
    assert_eq!(stat_str(&s, "invalidation_source"), "replication");
}

/// The walsender of the module's replication connection.
fn walsender_pid(pg: &PgServer) -> Option<String> {
    pg.query_text(
        "SELECT pid::text FROM pg_stat_activity WHERE application_name = 'pgcache replication' \
         AND backend_type = 'walsender'",
    )
}

fn hits(c: &mut redis::Connection) -> i64 {
    stat_of(&stats(c), "hits")
}

/// A READ of a cached entry is served from it.
#[track_caller]
fn assert_hit(c: &mut redis::Connection, id: i64, what: &str) {
    assert!(exists(c, &user_key(id)), "{what}: users {id} is cached");
    let before = hits(c);
    name_of(c, id);
    assert_eq!(hits(c), before + 1, "{what}: users {id} was a hit");
}

#[test]
fn key_changes_truncate_and_key_types() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    // A key-changing UPDATE drops the old and the new key (a negative
    // entry of the new one included).
    let _ = name_of(&mut c, 1);
    assert_eq!(
        read(&mut c, "users", r#"{"id":1001}"#).unwrap(),
        None,
        "no row 1001 yet"
    );
    pg.execute("UPDATE users SET id = 1001 WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    assert!(name_of(&mut c, 1001).is_some(), "the new key is not stale");
    // Composite keys.
    let pk = r#"{"category":"books","product_id":1}"#;
    read_row(&mut c, "products", pk);
    pg.execute("UPDATE products SET product_id = 777 WHERE category = 'books' AND product_id = 1");
    wait_until("the composite key is dropped", || {
        match read(&mut c, "products", pk).unwrap() {
            None => Ok(()),
            Some(row) => Err(row),
        }
    });
    // uuid and text keys, spelled differently by the client.
    let u = pg
        .query_text("SELECT id::text FROM uuid_items ORDER BY id LIMIT 1")
        .unwrap();
    let upper = format!(r#"{{"id":"{}"}}"#, u.to_uppercase());
    read_row(&mut c, "uuid_items", &upper);
    let code = pg
        .query_text("SELECT code FROM text_items ORDER BY code LIMIT 1")
        .unwrap();
    read_row(&mut c, "text_items", &format!(r#"{{"code":"{code}"}}"#));
    pg.execute("UPDATE uuid_items SET label = 'changed'");
    pg.execute("UPDATE text_items SET label = 'changed'");
    wait_until("uuid and text entries are dropped", || {
        let n = keys(&mut c, "pg_cache:uuid_items:*").len()
            + keys(&mut c, "pg_cache:text_items:*").len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    });
    assert_eq!(
        json(&read(&mut c, "uuid_items", &upper).unwrap().unwrap())["label"],
        "changed"
    );
    // TRUNCATE flushes the table.
    for id in [2, 3] {
        let _ = name_of(&mut c, id);
    }
    pg.execute("TRUNCATE users CASCADE");
    wait_until("TRUNCATE flushes users", || {
        let n = keys(&mut c, "pg_cache:users:*").len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    });
    assert_eq!(name_of(&mut c, 2), None);
    assert!(stat_of(&stats(&mut c), "replication_tables_flushed") >= 1);
}

#[test]
fn a_killed_stream_resumes_without_a_flush() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    let before = wait_replication_streaming(&r);
    let mut c = r.con();
    for id in [1, 2] {
        let _ = name_of(&mut c, id);
    }
    wait_replication_marker(&r);
    let pid = walsender_pid(&pg).expect("the module's walsender");
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    pg.execute("UPDATE users SET name = 'while away' WHERE id = 1");
    wait_until("resumed", || {
        let s = stats(&mut c);
        if stat_of(&s, "replication_resumes") > stat_of(&before, "replication_resumes")
            && stat_str(&s, "replication") == "streaming"
            && stat_of(&s, "entries_trusted") == 1
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("while away"));
    assert_hit(&mut c, 2, "after the resume");
    let s = stats(&mut c);
    assert_eq!(
        stat_of(&s, "replication_gap_flushes"),
        stat_of(&before, "replication_gap_flushes"),
        "no gap flush: {s}"
    );
}

/// While Redis asks modules not to replicate (`CLIENT PAUSE WRITE`, as a
/// manual failover does), the stream's deletes wait; they are made once
/// the pause ends.
#[test]
fn the_streams_deletes_wait_while_writes_are_paused() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    assert!(name_of(&mut c, 1).is_some());
    let before = stat_of(&stats(&mut c), "replication_transactions");
    let paused_at = std::time::Instant::now();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("WRITE")
        .query::<()>(&mut c)
        .unwrap();
    pg.execute("UPDATE users SET name = 'after the pause' WHERE id = 1");
    // Counted as the batch is applied, before its deletes wait.
    wait_until("the change is received", || {
        let s = stats(&mut c);
        if stat_of(&s, "replication_transactions") > before {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let held = exists(&mut c, &user_key(1));
    let within_pause = paused_at.elapsed() < Duration::from_millis(4500);
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query::<()>(&mut c)
        .unwrap();
    if within_pause {
        assert!(held, "the entry was deleted while writes were paused");
    }
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("after the pause"));
}

const PRODUCT: &str = r#"{"category":"electronics","product_id":1}"#;

fn product_key() -> String {
    format!("pg_cache:products:{PRODUCT}")
}

#[test]
fn a_redis_restart_from_rdb_replays_what_changed_meanwhile() {
    let pg = replication_pg();
    let mut r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    {
        let mut c = r.con();
        for id in [1, 2] {
            let _ = name_of(&mut c, id);
        }
        read(&mut c, "products", PRODUCT).unwrap().unwrap();
        assert!(exists(&mut c, &product_key()));
    }
    let marker = wait_replication_marker(&r);
    assert_eq!(marker["slot"], "pgcache", "{marker}");
    assert_eq!(marker["v"], 2, "{marker}");
    let tables: Vec<&str> = marker["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(
        tables,
        ["app.users", "products", "text_items", "users", "uuid_items"],
        "the published tables, sorted: {marker}"
    );
    let _: () = redis::cmd("SAVE").query(&mut r.con()).unwrap();
    r.restart_after(|| {
        pg.execute("UPDATE users SET name = 'while redis was down' WHERE id = 1");
        // Its changes are no longer streamed: the marker's table list
        // tells the restarted module to flush it.
        pg.execute("SELECT pgcache_unpublish('products')");
    });
    let s = wait_replication_streaming(&r);
    assert_eq!(stat_of(&s, "replication_resumes"), 1, "{s}");
    assert_eq!(stat_of(&s, "replication_gap_flushes"), 0, "{s}");
    let mut c = r.con();
    assert!(
        !exists(&mut c, &product_key()),
        "an entry of a table unpublished while Redis was down"
    );
    assert!(r
        .log()
        .contains("products is no longer in replication_publication"));
    assert_hit(&mut c, 2, "an unchanged entry after the restart");
    let fresh = name_of(&mut c, 1);
    assert_eq!(
        fresh.as_deref(),
        Some("while redis was down"),
        "{}\n{}",
        stats(&mut c),
        tail(&r.log(), 30)
    );
}

#[test]
fn a_dropped_slot_falls_back_to_the_gap_rule() {
    let pg = replication_pg();
    let mut r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    {
        let mut c = r.con();
        let _ = name_of(&mut c, 2);
    }
    wait_replication_marker(&r);
    let _: () = redis::cmd("SAVE").query(&mut r.con()).unwrap();
    r.restart_after(|| {
        wait_until("the slot is released", || {
            match pg.query_text(
                "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'pgcache'",
            ) {
                Some(a) if a == "false" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        pg.execute("SELECT pg_drop_replication_slot('pgcache')");
    });
    let s = wait_replication_streaming(&r);
    assert_eq!(stat_of(&s, "replication_gap_flushes"), 1, "{s}");
    assert_eq!(stat_str(&s, "replication_last_gap_reason"), "slot_missing");
    let mut c = r.con();
    assert!(
        !exists(&mut c, &user_key(2)),
        "flushed: changes since are unknowable"
    );
    assert!(r.log().contains("created replication slot"));
}

/// Design §4: a commit streamed while a synchronous standby has not
/// answered is not visible to other sessions; applying it then would let a
/// fill cache the old row for good. The barrier holds it until visible.
#[test]
fn a_change_is_applied_only_once_visible() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    let old = name_of(&mut c, 1).unwrap();
    pg.execute("ALTER SYSTEM SET synchronous_standby_names = 'nosuch_standby'");
    pg.execute("SELECT pg_reload_conf()");
    let conn = pg.conn_string();
    let writer = std::thread::spawn(move || {
        std::process::Command::new(pg_bindir().join("psql"))
            .arg(&conn)
            .args(["-v", "ON_ERROR_STOP=1", "-c"])
            .arg("SET synchronous_commit = on; UPDATE users SET name = 'committed' WHERE id = 1")
            .output()
            .expect("psql")
    });
    wait_until("the writer waits for the standby", || {
        match pg
            .query_text("SELECT count(*)::text FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        {
            Some(n) if n == "1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The commit is flushed, so streamed and decoded within milliseconds;
    // it is not visible, so it must not be applied.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        name_of(&mut c, 1).as_deref(),
        Some(old.as_str()),
        "still the visible row"
    );
    // A fill now reads the old row (the commit is invisible) and caches it.
    invalidate(&mut c, "users", r#"{"id":1}"#).unwrap();
    assert_eq!(name_of(&mut c, 1).as_deref(), Some(old.as_str()));
    assert!(exists(&mut c, &user_key(1)));
    pg.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
    let out = writer.join().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("canceling wait for synchronous replication"),
        "{out:?}"
    );
    pg.execute("ALTER SYSTEM RESET synchronous_standby_names");
    pg.execute("SELECT pg_reload_conf()");
    wait_gone_for(
        &mut c,
        &user_key(1),
        "the change, applied once visible, drops the entry the fill cached",
    );
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("committed"));
    assert!(stat_of(&stats(&mut c), "replication_barrier_waits") >= 1);
}

#[test]
fn a_large_transaction_flushes_its_table_past_the_key_limit() {
    let pg = replication_pg();
    pg.execute("INSERT INTO text_items SELECT 'bulk' || g, 'x' FROM generate_series(1, 3000) g");
    let r = start_redis(&pg, &["replication_txn_key_limit", "1000"]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    read_row(&mut c, "text_items", r#"{"code":"bulk1"}"#);
    read_row(&mut c, "users", r#"{"id":2}"#);
    pg.execute("UPDATE text_items SET label = 'y'");
    wait_until("the table is flushed", || {
        let n = keys(&mut c, "pg_cache:text_items:*").len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    });
    let s = stats(&mut c);
    assert!(stat_of(&s, "replication_tables_flushed") >= 1, "{s}");
    assert_eq!(
        json(
            &read(&mut c, "text_items", r#"{"code":"bulk1"}"#)
                .unwrap()
                .unwrap()
        )["label"],
        "y"
    );
    assert_hit(&mut c, 2, "another table's entry");
}

#[test]
fn a_postgresql_restart_resumes_without_a_flush() {
    let mut pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    for id in [1, 2] {
        let _ = name_of(&mut c, id);
    }
    wait_replication_marker(&r);
    pg.stop();
    pg.start();
    pg.execute("UPDATE users SET name = 'after the restart' WHERE id = 1");
    wait_until("resumed after PostgreSQL restarted", || {
        let s = stats(&mut c);
        if stat_of(&s, "replication_resumes") >= 1 && stat_of(&s, "entries_trusted") == 1 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("after the restart"));
    assert_hit(&mut c, 2, "after PostgreSQL restarted");
    assert_eq!(
        stat_of(&stats(&mut c), "replication_gap_flushes"),
        1,
        "only the first connection's"
    );
}

/// The slot is confirmed as the module applies, and while nothing it
/// publishes changes (WAL of other tables), so WAL does not pile up.
#[test]
fn positions_are_confirmed_including_while_idle() {
    let pg = replication_pg();
    pg.execute("CREATE TABLE unpublished (id int PRIMARY KEY, v text)");
    let r = start_redis(&pg, &["replication_ack_delay_ms", "0"]);
    wait_replication_streaming(&r);
    pg.execute("INSERT INTO unpublished SELECT g, 'x' FROM generate_series(1, 1000) g");
    let target = pg.query_text("SELECT pg_current_wal_lsn()::text").unwrap();
    wait_until(
        "the slot is confirmed past WAL it had nothing to send for",
        || {
            let ok = pg.query_text(&format!(
            "SELECT (confirmed_flush_lsn >= '{target}'::pg_lsn)::text FROM pg_replication_slots \
             WHERE slot_name = 'pgcache'"
        ));
            if ok.as_deref() == Some("true") {
                Ok(())
            } else {
                Err(format!("{ok:?}"))
            }
        },
    );
    let mut c = r.con();
    let s = stats(&mut c);
    assert_ne!(stat_str(&s, "replication_acked_lsn"), "0/0", "{s}");
}

/// `max_slot_wal_keep_size` let PostgreSQL give the slot up while Redis was
/// down: a clear warning, the slot recreated, everything cached dropped.
#[test]
fn a_lost_slot_is_recreated_with_a_gap_flush() {
    let pg = replication_pg();
    let mut r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    {
        let mut c = r.con();
        let _ = name_of(&mut c, 2);
    }
    wait_replication_marker(&r);
    let _: () = redis::cmd("SAVE").query(&mut r.con()).unwrap();
    r.restart_after(|| {
        pg.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
        pg.execute("SELECT pg_reload_conf()");
        pg.execute("CREATE TABLE filler AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 150000) g");
        wait_until("the slot is lost", || {
            pg.execute("SELECT pg_switch_wal()");
            pg.execute("CHECKPOINT");
            match pg.query_text("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgcache'") {
                Some(s) if s == "lost" => Ok(()),
                other => {
                    pg.execute("INSERT INTO filler SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g");
                    Err(format!("{other:?}"))
                }
            }
        });
        pg.execute("ALTER SYSTEM RESET max_slot_wal_keep_size");
        pg.execute("SELECT pg_reload_conf()");
    });
    let s = wait_replication_streaming(&r);
    assert_eq!(
        stat_str(&s, "replication_last_gap_reason"),
        "slot_lost",
        "{s}"
    );
    let mut c = r.con();
    assert!(
        !exists(&mut c, &user_key(2)),
        "flushed: the changes since are unknowable"
    );
    let log = r.log();
    assert!(
        log.contains("lost WAL it needed"),
        "a clear warning: {}",
        tail(&log, 20)
    );
    pg.execute("UPDATE users SET name = 'after the new slot' WHERE id = 2");
    let _ = name_of(&mut c, 3);
    pg.execute("UPDATE users SET name = 'streams again' WHERE id = 3");
    wait_gone(&mut c, &user_key(3));
}

/// pgoutput says nothing of a table outside the publication, so its rows
/// are answered but never cached (a warning names it and the fix). Once
/// published it is cached; once unpublished again, its entries are dropped
/// and it is no longer cached.
#[test]
fn tables_outside_the_publication_are_answered_but_not_cached() {
    let pg = replication_pg();
    pg.execute(
        "CREATE TABLE extra (id int PRIMARY KEY, v text); \
         INSERT INTO extra VALUES (1, 'one'), (2, 'two')",
    );
    let r = start_redis(&pg, &["negative_ttl", "60"]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    let key = |id: i64| format!(r#"pg_cache:extra:{{"id":{id}}}"#);
    let row = read(&mut c, "extra", r#"{"id":1}"#).unwrap();
    assert_eq!(json(row.as_deref().unwrap())["v"], "one");
    assert!(
        !exists(&mut c, &key(1)),
        "cached, but no change would drop it"
    );
    assert_eq!(read(&mut c, "extra", r#"{"id":9}"#).unwrap(), None);
    assert!(!exists(&mut c, &key(9)), "a negative entry neither");
    assert_eq!(stat_of(&stats(&mut c), "fills_uncached_unpublished"), 2);
    assert_eq!(
        r.log().matches("rows of extra are not cached").count(),
        1,
        "one warning per table:\n{}",
        tail(&r.log(), 10)
    );
    assert!(r.log().contains("SELECT pgcache_publish('extra')"));
    // A published table alongside is cached as ever.
    name_of(&mut c, 1);
    assert!(exists(&mut c, &user_key(1)));

    pg.execute("SELECT pgcache_publish('extra')");
    wait_until("extra is cached once published", || {
        read(&mut c, "extra", r#"{"id":1}"#).unwrap();
        if exists(&mut c, &key(1)) {
            Ok(())
        } else {
            Err(stats(&mut c).to_string())
        }
    });
    pg.execute("UPDATE extra SET v = 'streamed' WHERE id = 1");
    wait_gone(&mut c, &key(1));

    read(&mut c, "extra", r#"{"id":2}"#).unwrap();
    assert!(exists(&mut c, &key(2)));
    pg.execute("SELECT pgcache_unpublish('extra')");
    wait_gone_for(
        &mut c,
        &key(2),
        "entries of a table that left the publication are dropped",
    );
    assert!(r
        .log()
        .contains("extra is no longer in replication_publication"));
    read(&mut c, "extra", r#"{"id":2}"#).unwrap();
    assert!(!exists(&mut c, &key(2)), "and it is no longer cached");
    assert!(exists(&mut c, &user_key(1)), "other tables keep theirs");
}

/// What `notify` caches is not covered by the slot's progress (a table
/// outside the publication may be cached), so starting it deletes the
/// marker, and switching back to `replication` is a gap, not a resume.
#[test]
fn switching_to_another_source_forgets_the_marker() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    wait_replication_marker(&r);
    let mut c = r.con();
    config_set(&mut c, "pgcache.invalidation_source", "notify").unwrap();
    wait_until("the marker is deleted", || {
        match get(&mut c, "pg_cache:__replication") {
            None => Ok(()),
            Some(m) => Err(m),
        }
    });
    let before = stats(&mut c);
    config_set(&mut c, "pgcache.invalidation_source", "replication").unwrap();
    let s = wait_replication_streaming(&r);
    assert_eq!(
        stat_of(&s, "replication_gap_flushes"),
        stat_of(&before, "replication_gap_flushes") + 1,
        "{s}"
    );
    assert_eq!(stat_str(&s, "replication_last_gap_reason"), "no_marker");
    assert_eq!(
        stat_of(&s, "replication_resumes"),
        stat_of(&before, "replication_resumes")
    );
}

/// INFO shows the slot's `wal_status` and `safe_wal_size` (read at connect
/// and every 30 s): -1 while `max_slot_wal_keep_size` is unlimited, the
/// bytes left before PostgreSQL gives the slot up once it is set.
#[test]
fn the_slots_wal_status_and_room_are_shown() {
    let pg = replication_pg();
    let r = start_redis(&pg, &[]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    assert_eq!(
        info_field(&mut c, "pgcache", "pgcache_replication_slot_wal_status"),
        "reserved"
    );
    assert_eq!(
        info_field(&mut c, "pgcache", "pgcache_replication_slot_safe_wal_size"),
        "-1",
        "unlimited"
    );
    pg.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '64MB'");
    pg.execute("SELECT pg_reload_conf()");
    // With the marker written, the reconnection resumes.
    wait_replication_marker(&r);
    let before = stats(&mut c);
    let pid = walsender_pid(&pg).expect("the module's walsender");
    pg.execute(&format!("SELECT pg_terminate_backend({pid})"));
    wait_until("resumed", || {
        let s = stats(&mut c);
        if stat_of(&s, "replication_resumes") > stat_of(&before, "replication_resumes")
            && stat_str(&s, "replication") == "streaming"
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let safe: i64 = info_field(&mut c, "pgcache", "pgcache_replication_slot_safe_wal_size")
        .parse()
        .unwrap();
    assert!(
        safe > 0 && safe <= 80 << 20,
        "safe_wal_size {safe} within max_slot_wal_keep_size"
    );
}

/// An entry dropped by the stream publishes `cache_invalidate` with source
/// `replication` and the operation of the row's change, as `notify` does.
#[test]
fn stream_invalidations_publish_events_with_source_and_operation() {
    let pg = replication_pg();
    let r = start_redis(&pg, &["negative_ttl", "60"]);
    wait_replication_streaming(&r);
    let mut c = r.con();
    name_of(&mut c, 5);
    assert_eq!(read(&mut c, "users", r#"{"id":424242}"#).unwrap(), None);
    let mut sub = r.con();
    let mut ps = sub.as_pubsub();
    ps.subscribe("pg_cache_events").unwrap();
    ps.set_read_timeout(Some(HANG)).unwrap();
    let mut next = || {
        let msg = ps.get_message().expect("an invalidation event");
        json(&msg.get_payload::<String>().unwrap())
    };
    pg.execute("UPDATE users SET name = 'Evented' WHERE id = 5");
    let ev = next();
    assert_eq!(ev["type"], "cache_invalidate", "{ev}");
    assert_eq!(ev["table"], "users", "{ev}");
    assert_eq!(ev["key"], serde_json::json!({"id":5}), "{ev}");
    assert_eq!(ev["source"], "replication", "{ev}");
    assert_eq!(ev["operation"], "UPDATE", "{ev}");
    pg.execute("INSERT INTO users (id, name, email) VALUES (424242, 'new', 'new@example.com')");
    let ev = next();
    assert_eq!(ev["key"], serde_json::json!({"id":424242}), "{ev}");
    assert_eq!(ev["source"], "replication", "{ev}");
    assert_eq!(ev["operation"], "INSERT", "{ev}");
}

/// A marker that a load brings while another source runs (an RDB saved by
/// the replication source, loaded under `notify`) is deleted too: it does
/// not cover what `notify` caches.
#[test]
fn a_marker_loaded_under_another_source_is_deleted() {
    let pg = replication_pg();
    let r = RedisServer::start_with_server_args(
        &pg.module_args(),
        &["--enable-debug-command", "local"],
    );
    wait_listener_ready(&r);
    let mut c = r.con();
    let marker = r#"{"v":2,"system_id":"1","timeline":1,"database":"pgcache_test","slot":"pgcache","lsn":"0/1","tables":["users"]}"#;
    let _: () = redis::cmd("SET")
        .arg("pg_cache:__replication")
        .arg(marker)
        .query(&mut c)
        .unwrap();
    let _: String = redis::cmd("DEBUG").arg("RELOAD").query(&mut c).unwrap();
    wait_until("the loaded marker is deleted", || {
        match get(&mut c, "pg_cache:__replication") {
            None => Ok(()),
            Some(m) => Err(m),
        }
    });
}
