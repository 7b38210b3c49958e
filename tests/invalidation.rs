//! Invalidation beyond PGCACHE.INVALIDATE: PGCACHE.INVALIDATE_TABLE, and
//! automatic invalidation through LISTEN/NOTIFY (SPEC §2, §5, §6).

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The seed README's trigger, verbatim.
static SEED_TRIGGER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{SEED_FUNCTION}{}",
        r#"
CREATE TRIGGER users_cache_trigger
    AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW
    EXECUTE FUNCTION notify_cache_invalidation();
CREATE TRIGGER products_cache_trigger
    AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW
    EXECUTE FUNCTION notify_cache_invalidation();
"#
    )
});

/// pids of backends whose last statement was a LISTEN (the module's
/// listener connection).
fn listener_pids(pg: &PgServer) -> Vec<String> {
    pg.query_texts(
        "SELECT pid::text FROM pg_stat_activity \
         WHERE query ILIKE '%LISTEN%' AND query NOT ILIKE '%pg_stat_activity%' AND pid <> pg_backend_pid() ORDER BY pid",
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Wait until the module's listener is connected (other than `not`).
fn wait_for_listener(pg: &PgServer, not: &[String]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = listener_pids(pg);
        if pids.iter().any(|p| !not.contains(p)) {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "the module never LISTENed on PostgreSQL (pg_stat_activity shows no LISTEN)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn invalidate_table_drops_every_entry_of_the_table() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["cache_prefix", "c:"]);
    let mut c = r.con();
    let ids: Vec<String> = (1..=300).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    multiread(&mut c, "users", &format!("[{}]", ids.join(","))).unwrap();
    let mut pipe = redis::pipe();
    for i in 2000..22000 {
        pipe.cmd("PGCACHE.WRITE")
            .arg("users")
            .arg(format!(r#"{{"id":{i}}}"#))
            .arg(format!(r#"{{"id":{i}}}"#))
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);
    read_row(&mut c, "app.users", r#"{"id":1}"#);
    let _: () = redis::cmd("SET")
        .arg("c:users:unrelated")
        .arg("x")
        .query(&mut c)
        .unwrap();

    let dropped: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("users")
        .query(&mut c)
        .unwrap();
    assert_eq!(dropped, 20_300);
    assert!(keys(&mut c, "c:users:{*").is_empty());
    assert!(exists(
        &mut c,
        r#"c:products:{"category":"books","product_id":1}"#
    ));
    assert!(exists(&mut c, r#"c:app.users:{"id":1}"#));
    // the entries are gone: a READ queries again
    pg.reset_stats();
    read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(pg.queries_on("users"), 1);
    let again: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("public.users")
        .query(&mut c)
        .unwrap();
    assert_eq!(again, 1);

    let e = expect_err(
        redis::cmd("PGCACHE.INVALIDATE_TABLE")
            .arg("nosuchtable")
            .query::<i64>(&mut c),
        "INVALIDATE_TABLE of an unknown table",
    );
    assert_mentions(&e, &["nosuchtable"], "INVALIDATE_TABLE of an unknown table");
    expect_err(
        redis::cmd("PGCACHE.INVALIDATE_TABLE").query::<i64>(&mut c),
        "INVALIDATE_TABLE without a table",
    );
}

#[test]
fn seed_trigger_notifications_invalidate_entries() {
    let pg = PgServer::start_new();
    pg.execute(&SEED_TRIGGER);
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_for_listener(&pg, &[]);

    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "users", r#"{"id":2}"#);
    read_row(&mut c, "users", r#"{"id":3}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":9}"#);

    pg.execute("UPDATE users SET name = 'Updated' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:users:{"id":1}"#);
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["name"], "Updated");

    pg.execute("DELETE FROM users WHERE id = 2");
    wait_gone(&mut c, r#"pg_cache:users:{"id":2}"#);
    assert_eq!(read(&mut c, "users", r#"{"id":2}"#).unwrap(), None);

    // the key itself changes: both old and new keys are dropped
    write(&mut c, "users", r#"{"id":3003}"#, r#"{"id":3003}"#).unwrap();
    pg.execute("UPDATE users SET id = 3003 WHERE id = 3");
    wait_gone(&mut c, r#"pg_cache:users:{"id":3}"#);
    wait_gone(&mut c, r#"pg_cache:users:{"id":3003}"#);

    pg.execute("UPDATE products SET price = 1 WHERE category = 'books' AND product_id = 9");
    wait_gone(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":9}"#,
    );
    assert!(ping(&mut c));
}

#[test]
fn notify_invalidation_publishes_events_with_source_and_operation() {
    let pg = PgServer::start_new();
    pg.execute(&SEED_TRIGGER);
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_for_listener(&pg, &[]);
    read_row(&mut c, "users", r#"{"id":5}"#);

    let mut sub = r.con();
    let mut ps = sub.as_pubsub();
    ps.subscribe("pg_cache_events").unwrap();
    ps.set_read_timeout(Some(HANG)).unwrap();
    pg.execute("UPDATE users SET name = 'Evented' WHERE id = 5");
    let msg = ps.get_message().expect("an invalidation event");
    let ev = json(&msg.get_payload::<String>().unwrap());
    assert_eq!(ev["type"], "cache_invalidate", "{ev}");
    assert_eq!(ev["table"], "users", "{ev}");
    assert_eq!(ev["key"], serde_json::json!({"id":5}), "{ev}");
    assert_eq!(ev["source"], "notify", "{ev}");
    assert_eq!(ev["operation"], "UPDATE", "{ev}");
}

#[test]
fn bad_payloads_are_ignored() {
    let pg = PgServer::start_new();
    pg.execute(&SEED_TRIGGER);
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_for_listener(&pg, &[]);
    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);

    let deep = format!("{}{}", "[".repeat(3000), "]".repeat(3000));
    for payload in [
        "not json",
        "",
        "[]",
        "null",
        r#"{"table":"nosuchtable","operation":"UPDATE","old_data":{"id":1}}"#,
        r#"{"table":"users","operation":"UPDATE","old_data":{"idx":1}}"#,
        r#"{"table":"users","operation":"UPDATE","old_data":{"id":"x"}}"#,
        r#"{"table":"users","operation":"UPDATE","old_data":null,"new_data":null}"#,
        r#"{"table":"products","operation":"DELETE","old_data":{"id":1}}"#,
        r#"{"table":"users; DROP TABLE users","operation":"DELETE","old_data":{"id":1}}"#,
        r#"{"table":"pg_authid","operation":"DELETE","old_data":{"oid":10}}"#,
        &deep,
    ] {
        pg.execute(&format!(
            "SELECT pg_notify('cache_invalidation', '{}')",
            payload.replace('\'', "''")
        ));
    }
    // a valid notification after them is still handled: the listener lives
    write(&mut c, "users", r#"{"id":7}"#, r#"{"id":7}"#).unwrap();
    pg.execute(
        r#"SELECT pg_notify('cache_invalidation', '{"table":"users","operation":"DELETE","old_data":{"id":7}}')"#,
    );
    wait_gone(&mut c, r#"pg_cache:users:{"id":7}"#);
    // and nothing else was dropped
    assert!(exists(&mut c, r#"pg_cache:users:{"id":1}"#));
    assert!(exists(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":1}"#
    ));
    assert!(ping(&mut c));
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM users").as_deref(),
        Some("1000")
    );
}

#[test]
fn entries_cached_before_a_listener_gap_are_not_served() {
    let pg = PgServer::start_new();
    pg.execute(&SEED_TRIGGER);
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let before = wait_for_listener(&pg, &[]);
    read_row(&mut c, "users", r#"{"id":1}"#);

    // drop the listener's connection; an update during the gap is lost
    pg.query_texts(&format!(
        "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity WHERE pid IN ({})",
        before.join(",")
    ));
    pg.execute("UPDATE users SET name = 'During the gap' WHERE id = 1");
    wait_for_listener(&pg, &before);

    pg.reset_stats();
    let got = read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(
        got["name"], "During the gap",
        "an entry cached before the listener gap was served"
    );
    assert_eq!(pg.queries_on("users"), 1);
}

#[test]
fn pgcache_watch_triggers() {
    let pg = PgServer::start_new();
    let sql = pgcache_sql();
    pg.execute(&sql);
    pg.execute(&sql); // idempotent
    pg.execute(
        "CREATE TABLE wide (id INTEGER PRIMARY KEY, body TEXT); \
         INSERT INTO wide VALUES (1, repeat('x', 100000));",
    );
    pg.execute(
        "SELECT pgcache_watch('users'); SELECT pgcache_watch('products'); \
         SELECT pgcache_watch('wide'); SELECT pgcache_watch('app.accounts')",
    );
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    wait_for_listener(&pg, &[]);

    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "app.accounts", r#"{"id":1}"#);
    read_row(&mut c, "wide", r#"{"id":1}"#);
    for p in 1..=5 {
        read_row(
            &mut c,
            "products",
            &format!(r#"{{"category":"garden","product_id":{p}}}"#),
        );
    }

    pg.execute("UPDATE users SET name = 'Watched' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:users:{"id":1}"#);
    pg.execute("UPDATE app.accounts SET owner = 'o' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:app.accounts:{"id":1}"#);
    // a row far over NOTIFY's 8000-byte limit: the write succeeds and invalidates
    pg.execute("UPDATE wide SET body = repeat('y', 200000) WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:wide:{"id":1}"#);
    // TRUNCATE drops the table's entries
    read_row(&mut c, "users", r#"{"id":2}"#);
    pg.execute("TRUNCATE products");
    let deadline = Instant::now() + HANG;
    while !keys(&mut c, "pg_cache:products:*").is_empty() {
        assert!(
            Instant::now() < deadline,
            "TRUNCATE did not drop the entries"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(exists(&mut c, r#"pg_cache:users:{"id":2}"#));

    // unwatch: no more invalidation from users
    pg.execute("SELECT pgcache_unwatch('users')");
    pg.execute("UPDATE users SET name = 'Unwatched' WHERE id = 2");
    // a notification for app.accounts after it shows the listener has caught up
    read_row(&mut c, "app.accounts", r#"{"id":2}"#);
    pg.execute("UPDATE app.accounts SET owner = 'p' WHERE id = 2");
    wait_gone(&mut c, r#"pg_cache:app.accounts:{"id":2}"#);
    assert!(exists(&mut c, r#"pg_cache:users:{"id":2}"#));
}
