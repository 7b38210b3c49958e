//! Automatic invalidation through `sql/pgcache.sql` (SPEC §5): what
//! pgcache_watch's triggers send and how the module handles it, hostile
//! notifications, and PGCACHE.INVALIDATE_TABLE at scale (SPEC §2).
//!
//! Ordering is the tool that keeps these deterministic: the module handles
//! notifications one at a time in order, so once a later "barrier"
//! notification has dropped its key, every earlier one has been handled.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Barriers through `app.accounts` (watched): cache a row, change it, wait
/// until its entry is dropped. Each call uses the next row.
struct Barrier {
    next: i64,
}

impl Barrier {
    #[track_caller]
    fn pass(&mut self, pg: &PgServer, c: &mut redis::Connection) {
        let id = self.next;
        self.next += 1;
        read_row(c, "app.accounts", &format!(r#"{{"id":{id}}}"#));
        pg.execute(&format!(
            "UPDATE app.accounts SET owner = 'barrier' WHERE id = {id}"
        ));
        wait_gone(c, &format!(r#"pg_cache:app.accounts:{{"id":{id}}}"#));
    }
}

fn received(c: &mut redis::Connection) -> i64 {
    stat_of(&stats(c), "notifications_received")
}

#[test]
fn pgcache_watch_sends_keys_that_meet_the_entries() {
    let pg = PgServer::start_new();
    let sql = pgcache_sql();
    pg.execute(&sql);
    pg.execute(&sql);
    pg.execute(
        "CREATE TABLE wide (id INTEGER PRIMARY KEY, body TEXT); \
         INSERT INTO wide VALUES (1, 'small'), (2, 'small');",
    );
    pg.execute(
        "SELECT pgcache_watch('users'); SELECT pgcache_watch('users'); \
         SELECT pgcache_watch('wide'); SELECT pgcache_watch('app.accounts'); \
         SELECT pgcache_watch('\"MixedCase\"'); SELECT pgcache_watch('products')",
    );
    // idempotent: still one row trigger and one TRUNCATE trigger on users
    assert_eq!(
        pg.query_text(
            "SELECT count(*)::text FROM pg_trigger \
             WHERE tgrelid = 'users'::regclass AND NOT tgisinternal"
        )
        .as_deref(),
        Some("2")
    );
    let r = RedisServer::with_pg(&pg, &["negative_ttl", "60"]);
    let mut c = r.con();
    wait_listener_ready(&r);
    let mut barrier = Barrier { next: 10 };

    // one notification per change, though pgcache_watch ran twice
    read_row(&mut c, "users", r#"{"id":5}"#);
    let n0 = received(&mut c);
    pg.execute("UPDATE users SET name = 'once' WHERE id = 5");
    barrier.pass(&pg, &mut c);
    assert_eq!(
        received(&mut c),
        n0 + 2,
        "one UPDATE of a table watched twice must send one notification"
    );
    assert!(!exists(&mut c, r#"pg_cache:users:{"id":5}"#));
    assert_eq!(read_row(&mut c, "users", r#"{"id":5}"#)["name"], "once");

    // a 1 MB row: the UPDATE succeeds and invalidates
    read_row(&mut c, "wide", r#"{"id":1}"#);
    read_row(&mut c, "wide", r#"{"id":2}"#);
    pg.execute("UPDATE wide SET body = repeat('y', 1048576) WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:wide:{"id":1}"#);
    assert!(exists(&mut c, r#"pg_cache:wide:{"id":2}"#));
    let wide = read_row(&mut c, "wide", r#"{"id":1}"#);
    assert_eq!(wide["body"].as_str().map(str::len), Some(1_048_576));
    // and an INSERT of one
    pg.execute("INSERT INTO wide VALUES (3, repeat('z', 1048576))");

    // schema-qualified
    read_row(&mut c, "app.accounts", r#"{"id":1}"#);
    pg.execute("UPDATE app.accounts SET balance = 0 WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:app.accounts:{"id":1}"#);

    // a quoted mixed-case table; its lower-case namesake is left alone
    read_row(&mut c, r#""MixedCase""#, r#"{"Id":1}"#);
    read_row(&mut c, "mixedcase", r#"{"id":1}"#);
    let mixed: Vec<String> = keys(&mut c, "pg_cache:*")
        .into_iter()
        .filter(|k| k.contains("MixedCase"))
        .collect();
    assert_eq!(mixed.len(), 1, "one entry for \"MixedCase\": {mixed:?}");
    pg.execute(r#"UPDATE "MixedCase" SET "Label" = 'changed' WHERE "Id" = 1"#);
    wait_gone(&mut c, &mixed[0]);
    assert!(exists(&mut c, r#"pg_cache:mixedcase:{"id":1}"#));
    assert_eq!(
        read_row(&mut c, r#""MixedCase""#, r#"{"Id":1}"#)["Label"],
        "changed"
    );

    // an UPDATE that changes the primary key drops the old and the new key
    read_row(&mut c, "users", r#"{"id":7}"#);
    write(
        &mut c,
        "users",
        r#"{"id":7007}"#,
        r#"{"id":7007,"name":"ghost"}"#,
    )
    .unwrap();
    pg.execute("UPDATE users SET id = 7007 WHERE id = 7");
    wait_gone(&mut c, r#"pg_cache:users:{"id":7}"#);
    wait_gone(&mut c, r#"pg_cache:users:{"id":7007}"#);
    assert_eq!(read(&mut c, "users", r#"{"id":7}"#).unwrap(), None);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":7007}"#)["name"],
        "User 7"
    );

    // a composite key, changed in one column
    read_row(&mut c, "products", r#"{"category":"books","product_id":3}"#);
    pg.execute("UPDATE products SET product_id = 3003 WHERE category = 'books' AND product_id = 3");
    wait_gone(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":3}"#,
    );

    // INSERT drops a remembered not-found
    pg.reset_stats();
    assert_eq!(read(&mut c, "users", r#"{"id":5000}"#).unwrap(), None);
    assert_eq!(read(&mut c, "users", r#"{"id":5000}"#).unwrap(), None);
    assert_eq!(pg.queries_on("users"), 1, "the not-found is remembered");
    pg.execute("INSERT INTO users (id, name) VALUES (5000, 'inserted')");
    barrier.pass(&pg, &mut c);
    let row = read(&mut c, "users", r#"{"id":5000}"#)
        .unwrap()
        .unwrap_or_else(|| panic!("READ after the INSERT still answers the remembered nil"));
    assert_eq!(json(&row)["name"], "inserted");

    // DELETE
    read_row(&mut c, "users", r#"{"id":8}"#);
    pg.execute("DELETE FROM users WHERE id = 8");
    wait_gone(&mut c, r#"pg_cache:users:{"id":8}"#);
    assert_eq!(read(&mut c, "users", r#"{"id":8}"#).unwrap(), None);

    // TRUNCATE drops every entry of that table and nothing else
    for p in 1..=20 {
        read_row(
            &mut c,
            "products",
            &format!(r#"{{"category":"garden","product_id":{p}}}"#),
        );
    }
    read_row(&mut c, "users", r#"{"id":9}"#);
    read_row(&mut c, "app.accounts", r#"{"id":2}"#);
    read_row(&mut c, "wide", r#"{"id":2}"#);
    pg.execute("TRUNCATE products");
    wait_until("TRUNCATE drops the products entries", || {
        match keys(&mut c, "pg_cache:products:*").len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    });
    for k in [
        r#"pg_cache:users:{"id":9}"#,
        r#"pg_cache:app.accounts:{"id":2}"#,
        r#"pg_cache:wide:{"id":2}"#,
        r#"pg_cache:mixedcase:{"id":1}"#,
    ] {
        assert!(exists(&mut c, k), "TRUNCATE products dropped {k}");
    }
    assert_eq!(
        read(
            &mut c,
            "products",
            r#"{"category":"garden","product_id":1}"#
        )
        .unwrap(),
        None
    );

    // unwatch: no more notifications from users
    pg.execute("SELECT pgcache_unwatch('users')");
    pg.execute("SELECT pgcache_unwatch('users')");
    let n0 = received(&mut c);
    pg.execute("UPDATE users SET name = 'unwatched' WHERE id = 9");
    barrier.pass(&pg, &mut c);
    assert_eq!(
        received(&mut c),
        n0 + 1,
        "an unwatched table still sends notifications"
    );
    assert!(exists(&mut c, r#"pg_cache:users:{"id":9}"#));
    // and watching again works
    pg.execute("SELECT pgcache_watch('users')");
    pg.execute("UPDATE users SET name = 'watched again' WHERE id = 9");
    wait_gone(&mut c, r#"pg_cache:users:{"id":9}"#);
    assert!(ping(&mut c));
}

#[test]
fn hostile_notifications_are_counted_and_ignored() {
    let pg = PgServer::start_new();
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_watch('users'); SELECT pgcache_watch('app.accounts')");
    let mut r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_listener_ready(&r);
    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "users", r#"{"id":2}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);
    read_row(&mut c, "app.accounts", r#"{"id":1}"#);
    read_row(&mut c, r#""MixedCase""#, r#"{"Id":1}"#);
    let protected = keys(&mut c, "pg_cache:*");
    assert_eq!(protected.len(), 5);

    let long_name = "a".repeat(7800);
    let deep = format!("{}1{}", r#"{"a":"#.repeat(1200), "}".repeat(1200));
    let junk: String = (0..7900).map(|i| (b'!' + (i % 90) as u8) as char).collect();
    let payloads: Vec<String> = vec![
        "not json {".into(),
        "".into(),
        "null".into(),
        "42".into(),
        r#""a string""#.into(),
        // a JSON array whose element looks valid
        r#"[{"table":"users","operation":"DELETE","old_data":{"id":1}}]"#.into(),
        junk.replace('\'', "x"),
        deep,
        format!(r#"{{"table":"{long_name}","operation":"DELETE","old_data":{{"id":1}}}}"#),
        r#"{"table":"nosuchtable","operation":"DELETE","old_data":{"id":1}}"#.into(),
        r#"{"table":"nosuchtable","operation":"TRUNCATE"}"#.into(),
        // system catalogs
        r#"{"table":"pg_authid","operation":"DELETE","old_data":{"oid":10}}"#.into(),
        r#"{"schema":"pg_catalog","table":"pg_class","operation":"UPDATE","old_data":{"oid":1259}}"#
            .into(),
        r#"{"schema":"pg_catalog","table":"pg_class","operation":"TRUNCATE"}"#.into(),
        // rows without the primary key, or with a bad one
        r#"{"table":"users","operation":"UPDATE","old_data":{"name":"x"}}"#.into(),
        r#"{"table":"users","operation":"UPDATE","old_data":{"id":"not a number"}}"#.into(),
        r#"{"table":"users","operation":"UPDATE","old_data":[1],"new_data":{"id":1}}"#.into(),
        r#"{"table":"products","operation":"DELETE","old_data":{"category":"books"}}"#.into(),
        // no or bad table, no or bad operation
        r#"{"operation":"DELETE","old_data":{"id":1}}"#.into(),
        r#"{"table":"","operation":"TRUNCATE"}"#.into(),
        r#"{"table":["users"],"operation":"TRUNCATE"}"#.into(),
        r#"{"table":"users","operation":"DROP","old_data":{"id":1}}"#.into(),
        r#"{"table":"users","old_data":{"id":1}}"#.into(),
        // forged names
        r#"{"table":"users\"; DROP TABLE users; --","operation":"TRUNCATE"}"#.into(),
        r#"{"table":"users'); DROP TABLE users; --","operation":"DELETE","old_data":{"id":1}}"#
            .into(),
        r#"{"schema":"public\"; DROP TABLE users; --","table":"users","operation":"TRUNCATE"}"#
            .into(),
        r#"{"schema":"pg_catalog","table":"users","operation":"TRUNCATE"}"#.into(),
        // app.accounts without its schema is not on the search path
        r#"{"table":"accounts","operation":"TRUNCATE"}"#.into(),
    ];
    let sentinel = r#"pg_cache:users:{"id":999}"#;
    for (i, payload) in payloads.iter().enumerate() {
        assert!(payload.len() < 8000, "payload {i} too long for NOTIFY");
        let before = stats(&mut c);
        write(&mut c, "users", r#"{"id":999}"#, r#"{"id":999}"#).unwrap();
        // the hostile payload, then a valid one that drops the sentinel:
        // one transaction, delivered in this order
        pg.execute(&format!(
            "BEGIN; SELECT pg_notify('cache_invalidation', '{}'); \
             SELECT pg_notify('cache_invalidation', \
               '{{\"table\":\"users\",\"operation\":\"DELETE\",\"old_data\":{{\"id\":999}}}}'); \
             COMMIT",
            payload.replace('\'', "''")
        ));
        wait_gone(&mut c, sentinel);
        let after = stats(&mut c);
        let shown: String = payload.chars().take(120).collect();
        assert_eq!(
            stat_of(&after, "notifications_received"),
            stat_of(&before, "notifications_received") + 2,
            "payload {i} {shown:?}: {after}"
        );
        assert_eq!(
            stat_of(&after, "notifications_ignored"),
            stat_of(&before, "notifications_ignored") + 1,
            "payload {i} {shown:?} was not counted as ignored: {after}"
        );
        for k in &protected {
            assert!(
                exists(&mut c, k),
                "payload {i} {shown:?} dropped the entry {k}"
            );
        }
    }
    assert!(r.alive(), "Redis died");
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM users").as_deref(),
        Some("1000")
    );
    // the listener still works
    pg.execute("UPDATE users SET name = 'still listening' WHERE id = 2");
    wait_gone(&mut c, r#"pg_cache:users:{"id":2}"#);
    assert!(exists(&mut c, r#"pg_cache:users:{"id":1}"#));
    assert_eq!(listen_session_pids(&pg).len(), 1);
}

#[test]
fn invalidate_table_of_50000_entries_does_not_stall_redis() {
    let pg = PgServer::start_new();
    pg.execute(
        "CREATE TABLE many (id INTEGER PRIMARY KEY, v TEXT); \
         INSERT INTO many SELECT g, 'v' || g FROM generate_series(1, 50000) g; ANALYZE many;",
    );
    let r = RedisServer::with_pg(&pg, &["invalidation_channel", ""]);
    let mut c = r.con();
    for batch in 0..10 {
        let pks: Vec<String> = (batch * 5000 + 1..=(batch + 1) * 5000)
            .map(|id| format!(r#"{{"id":{id}}}"#))
            .collect();
        multiread(&mut c, "many", &format!("[{}]", pks.join(","))).unwrap();
    }
    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(dbsize, 50_002);

    let sent = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let pinger = {
        let (sent, done, during, total) =
            (sent.clone(), done.clone(), during.clone(), total.clone());
        let mut pc = r.con();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let armed = sent.load(Ordering::SeqCst);
                assert!(ping(&mut pc));
                total.fetch_add(1, Ordering::SeqCst);
                // sent after INVALIDATE_TABLE was, answered before its reply
                if armed && !done.load(Ordering::SeqCst) {
                    during.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    // let the pinger get going
    wait_until("the pinger runs", || match total.load(Ordering::SeqCst) {
        0 => Err("no PING yet".into()),
        _ => Ok(()),
    });
    let mut ic = r.con();
    let cmd = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("many")
        .get_packed_command();
    ic.send_packed_command(&cmd).unwrap();
    sent.store(true, Ordering::SeqCst);
    let reply = ic.recv_response().unwrap();
    done.store(true, Ordering::SeqCst);
    pinger.join().unwrap();
    let pings = total.load(Ordering::SeqCst);
    let dropped: i64 = redis::from_redis_value(&reply).unwrap();
    assert_eq!(dropped, 50_000);
    assert!(keys(&mut c, "pg_cache:many:*").is_empty());
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(dbsize, 2, "entries of other tables were dropped");
    let during = during.load(Ordering::SeqCst);
    assert!(
        during >= 1,
        "no PING was answered while INVALIDATE_TABLE ran ({pings} PINGs in all): \
         Redis stalled until the whole table was dropped"
    );
    eprintln!("{during} of {pings} PINGs answered while INVALIDATE_TABLE ran");
}
