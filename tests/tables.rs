//! Tables (SPEC §3, issue 12): table names in keys are unambiguous;
//! partitioned tables are cached under the name read and invalidated by
//! changes in any partition; schema changes never make a READ answer another
//! key's row nor leave an entry that invalidation cannot reach.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// How long the module may take to notice a schema change (it revalidates
/// its catalog on an interval of about 2 s and on fill errors). A bound, not
/// a timing assertion.
const SCHEMA_CHANGE_BOUND: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds; panics with `what` and the last thing seen
/// after `SCHEMA_CHANGE_BOUND`.
#[track_caller]
fn eventually<F: FnMut() -> Result<(), String>>(what: &str, cond: F) {
    wait_until_within(what, SCHEMA_CHANGE_BOUND, cond)
}

/// `v` of a READ's row, or None for nil; panics on an error.
#[track_caller]
fn read_v(c: &mut redis::Connection, table: &str, pk: &str) -> Option<String> {
    read(c, table, pk)
        .unwrap_or_else(|e| panic!("PGCACHE.READ {table} {pk} failed: {e}"))
        .map(|s| {
            json(&s)["v"]
                .as_str()
                .unwrap_or_else(|| panic!("READ {table} {pk}: row without a text v: {s}"))
                .to_string()
        })
}

fn invalidate_table(c: &mut redis::Connection, table: &str) -> i64 {
    redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg(table)
        .query(c)
        .unwrap_or_else(|e| panic!("PGCACHE.INVALIDATE_TABLE {table}: {e}"))
}

// ---------------------------------------------------------------------------
// table names in keys

/// Schema `app`'s table `users2` and public's table `"app.users2"` are two
/// tables: each READ answers its own row, under its own key, and neither
/// INVALIDATE_TABLE nor a trigger of one touches the other's entries.
#[test]
fn dotted_table_name_and_schema_table_do_not_share_entries() {
    let pg = PgServer::start_with_schema(
        r#"CREATE SCHEMA app;
           CREATE TABLE app.users2 (id int PRIMARY KEY, v text);
           INSERT INTO app.users2 VALUES (1, 'schema app');
           CREATE TABLE "app.users2" (id int PRIMARY KEY, v text);
           INSERT INTO "app.users2" VALUES (1, 'public dotted');"#,
    );
    pg.execute(&pgcache_sql());
    pg.execute(r#"SELECT pgcache_watch('app.users2'); SELECT pgcache_watch('"app.users2"')"#);
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    let mut c = r.con();
    let schema_key = r#"pg_cache:app.users2:{"id":1}"#;
    let dotted_key = r#"pg_cache:"app.users2":{"id":1}"#;

    assert_eq!(
        read_v(&mut c, "app.users2", r#"{"id":1}"#).as_deref(),
        Some("schema app")
    );
    assert_eq!(
        read_v(&mut c, r#""app.users2""#, r#"{"id":1}"#).as_deref(),
        Some("public dotted"),
        "READ \"app.users2\" answered app.users2's row"
    );
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        vec![dotted_key.to_string(), schema_key.to_string()]
    );
    // hits, each its own
    assert_eq!(
        read_v(&mut c, "app.users2", r#"{"id":1}"#).as_deref(),
        Some("schema app")
    );
    assert_eq!(
        read_v(&mut c, r#""app.users2""#, r#"{"id":1}"#).as_deref(),
        Some("public dotted")
    );

    // INVALIDATE_TABLE of one leaves the other's entries
    assert_eq!(invalidate_table(&mut c, "app.users2"), 1);
    assert!(!exists(&mut c, schema_key));
    assert!(
        exists(&mut c, dotted_key),
        "INVALIDATE_TABLE app.users2 dropped \"app.users2\"'s entry"
    );
    read_v(&mut c, "app.users2", r#"{"id":1}"#);
    assert_eq!(invalidate_table(&mut c, r#""app.users2""#), 1);
    assert!(!exists(&mut c, dotted_key));
    assert!(
        exists(&mut c, schema_key),
        "INVALIDATE_TABLE \"app.users2\" dropped app.users2's entry"
    );

    // a trigger of one drops only its own entry
    read_v(&mut c, r#""app.users2""#, r#"{"id":1}"#);
    pg.execute(r#"UPDATE "app.users2" SET v = 'dotted changed' WHERE id = 1"#);
    wait_gone(&mut c, dotted_key);
    assert!(
        exists(&mut c, schema_key),
        "an UPDATE of \"app.users2\" dropped app.users2's entry"
    );
    assert_eq!(
        read_v(&mut c, r#""app.users2""#, r#"{"id":1}"#).as_deref(),
        Some("dotted changed")
    );
    pg.execute("UPDATE app.users2 SET v = 'schema changed' WHERE id = 1");
    wait_gone(&mut c, schema_key);
    assert_eq!(
        read_v(&mut c, "app.users2", r#"{"id":1}"#).as_deref(),
        Some("schema changed")
    );
}

/// The key format: each name part bare when it matches `[a-z_][a-z0-9_]*`,
/// else double-quoted with `"` doubled; the schema left out for public.
#[test]
fn key_names_quote_parts_that_need_it() {
    let pg = PgServer::start_with_schema(
        r#"CREATE TABLE "MixedCase" (id int PRIMARY KEY, v text);
           INSERT INTO "MixedCase" VALUES (1, 'mixed');
           CREATE TABLE plain_t1 (id int PRIMARY KEY, v text);
           INSERT INTO plain_t1 VALUES (1, 'plain');
           CREATE TABLE "we""ird" (id int PRIMARY KEY, v text);
           INSERT INTO "we""ird" VALUES (1, 'weird');
           CREATE SCHEMA "App";
           CREATE TABLE "App".t (id int PRIMARY KEY, v text);
           INSERT INTO "App".t VALUES (1, 'capital schema');
           CREATE SCHEMA s2;
           CREATE TABLE s2."Tbl" (id int PRIMARY KEY, v text);
           INSERT INTO s2."Tbl" VALUES (1, 'capital table');"#,
    );
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for (table, v) in [
        (r#""MixedCase""#, "mixed"),
        ("plain_t1", "plain"),
        (r#""we""ird""#, "weird"),
        (r#""App".t"#, "capital schema"),
        (r#"s2."Tbl""#, "capital table"),
    ] {
        assert_eq!(
            read_v(&mut c, table, r#"{"id":1}"#).as_deref(),
            Some(v),
            "READ {table}"
        );
    }
    let mut want: Vec<String> = [
        r#"pg_cache:"MixedCase":{"id":1}"#,
        r#"pg_cache:plain_t1:{"id":1}"#,
        r#"pg_cache:"we""ird":{"id":1}"#,
        r#"pg_cache:"App".t:{"id":1}"#,
        r#"pg_cache:s2."Tbl":{"id":1}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(keys(&mut c, "pg_cache:*"), want);
}

// ---------------------------------------------------------------------------
// partitioned tables

/// `orders`, partitioned by region into orders_eu and orders_us, with rows
/// in both.
const ORDERS: &str = "
CREATE TABLE orders (id int, region text, v text, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
INSERT INTO orders VALUES (1, 'eu', 'eu1'), (2, 'eu', 'eu2'), (3, 'eu', 'eu3'),
                          (1, 'us', 'us1'), (2, 'us', 'us2');
";

fn order_pk(id: i64, region: &str) -> String {
    format!(r#"{{"id":{id},"region":"{region}"}}"#)
}

fn order_key(id: i64, region: &str) -> String {
    format!("pg_cache:orders:{}", order_pk(id, region))
}

/// `orders` watched with `pgcache_watch`; a Redis with the module (and
/// `extra_args`), its listener ready.
fn watched_orders(extra_args: &[&str]) -> (PgServer, RedisServer) {
    orders_invalidated_by(Source::Notify, extra_args)
}

/// Which invalidation source a test runs with (SPEC §6 and §11).
#[derive(Clone, Copy)]
enum Source {
    Notify,
    Replication,
}

/// `orders` watched (`Notify`) or published (`Replication`, no trigger),
/// and a Redis whose source is ready.
fn orders_invalidated_by(source: Source, extra_args: &[&str]) -> (PgServer, RedisServer) {
    let mut pg = PgServer::start_with_schema(ORDERS);
    pg.execute(&pgcache_sql());
    let mut args: Vec<&str> = extra_args.to_vec();
    match source {
        Source::Notify => pg.execute("SELECT pgcache_watch('orders')"),
        Source::Replication => {
            pg.enable_logical_replication();
            pg.execute("SELECT pgcache_publish('orders')");
            args.extend(["invalidation_source", "replication"]);
        }
    }
    let r = RedisServer::with_pg(&pg, &args);
    wait_listener_ready(&r);
    if let Source::Replication = source {
        wait_replication_streaming(&r);
    }
    (pg, r)
}

/// Reads each order through `orders`; each must exist and be cached.
#[track_caller]
///
/// A READ may be answered without being cached while a flush of `orders`
/// runs (after DDL, the event trigger drops the table's entries, and the
/// flush detaches fills in flight): read again until the entry is there.
fn read_orders(c: &mut redis::Connection, ids: &[(i64, &str)]) {
    for &(id, region) in ids {
        wait_until(&format!("orders {id}/{region} is read and cached"), || {
            if read_v(c, "orders", &order_pk(id, region)).is_none() {
                return Err(format!("orders {id}/{region} read as nil"));
            }
            if exists(c, &order_key(id, region)) {
                Ok(())
            } else {
                Err(format!("{} not cached", order_key(id, region)))
            }
        });
    }
}

/// READs `pk` until its entry `key` is cached: after a schema change a READ
/// may be answered uncached while the table's flush runs (it detaches
/// fills in flight).
fn read_until_cached(c: &mut redis::Connection, table: &str, pk: &str, key: &str) {
    wait_until(&format!("READ {table} {pk} is cached as {key}"), || {
        read_v(c, table, pk);
        if exists(c, key) {
            Ok(())
        } else {
            Err(format!("{key} not cached"))
        }
    });
}

/// UPDATEs through the parent or a partition and DELETEs drop the entries
/// read through the parent.
#[test]
fn partition_row_changes_invalidate_parent_entries() {
    partition_row_changes_invalidate_parent_entries_with(Source::Notify);
}

/// The same with the replication source.
#[test]
fn partition_row_changes_invalidate_parent_entries_by_replication() {
    partition_row_changes_invalidate_parent_entries_with(Source::Replication);
}

fn partition_row_changes_invalidate_parent_entries_with(source: Source) {
    let (pg, r) = orders_invalidated_by(source, &[]);
    let mut c = r.con();
    read_orders(&mut c, &[(1, "eu"), (2, "eu"), (1, "us")]);

    pg.execute("UPDATE orders SET v = 'eu1 via parent' WHERE id = 1 AND region = 'eu'");
    wait_gone_for(
        &mut c,
        &order_key(1, "eu"),
        "an UPDATE through orders drops the entry",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "eu")).as_deref(),
        Some("eu1 via parent")
    );

    pg.execute("UPDATE orders_us SET v = 'us1 via partition' WHERE id = 1");
    wait_gone_for(
        &mut c,
        &order_key(1, "us"),
        "an UPDATE through the partition orders_us drops the parent's entry",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "us")).as_deref(),
        Some("us1 via partition")
    );

    pg.execute("DELETE FROM orders WHERE id = 2 AND region = 'eu'");
    wait_gone_for(&mut c, &order_key(2, "eu"), "a DELETE drops the entry");
    assert_eq!(read_v(&mut c, "orders", &order_pk(2, "eu")), None);
}

/// An UPDATE that moves a row to another partition drops the entry of its
/// old key and the (negative) entry of its new key.
#[test]
fn row_moved_between_partitions() {
    row_moved_between_partitions_with(Source::Notify);
}

/// The same with the replication source.
#[test]
fn row_moved_between_partitions_by_replication() {
    row_moved_between_partitions_with(Source::Replication);
}

fn row_moved_between_partitions_with(source: Source) {
    let (pg, r) = orders_invalidated_by(source, &["negative_ttl", "300"]);
    let mut c = r.con();
    read_orders(&mut c, &[(3, "eu")]);
    assert_eq!(read_v(&mut c, "orders", &order_pk(3, "us")), None);
    assert!(
        exists(&mut c, &order_key(3, "us")),
        "negative_ttl: the missing row is remembered"
    );

    pg.execute("UPDATE orders SET region = 'us' WHERE id = 3 AND region = 'eu'");
    wait_gone_for(
        &mut c,
        &order_key(3, "eu"),
        "a row moved out of orders_eu: its old key's entry is dropped",
    );
    wait_gone_for(
        &mut c,
        &order_key(3, "us"),
        "a row moved into orders_us: its new key's negative entry is dropped",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(3, "us")).as_deref(),
        Some("eu3"),
        "the moved row under its new key"
    );
    assert_eq!(read_v(&mut c, "orders", &order_pk(3, "eu")), None);
}

/// TRUNCATE of one partition drops its entries; TRUNCATE of the parent
/// drops all.
#[test]
fn truncate_of_a_partition_and_of_the_parent() {
    truncate_of_a_partition_and_of_the_parent_with(Source::Notify);
}

/// The same with the replication source.
#[test]
fn truncate_of_a_partition_and_of_the_parent_by_replication() {
    truncate_of_a_partition_and_of_the_parent_with(Source::Replication);
}

fn truncate_of_a_partition_and_of_the_parent_with(source: Source) {
    let (pg, r) = orders_invalidated_by(source, &[]);
    let mut c = r.con();
    let eu = [(1, "eu"), (2, "eu"), (3, "eu")];
    read_orders(&mut c, &eu);
    read_orders(&mut c, &[(1, "us"), (2, "us")]);

    pg.execute("TRUNCATE orders_eu");
    for (id, region) in eu {
        wait_gone_for(
            &mut c,
            &order_key(id, region),
            "TRUNCATE orders_eu drops the eu entries read through orders",
        );
    }
    assert_eq!(read_v(&mut c, "orders", &order_pk(1, "eu")), None);

    read_orders(&mut c, &[(1, "us"), (2, "us")]);
    pg.execute("TRUNCATE orders");
    wait_until("TRUNCATE orders drops every entry of orders", || {
        let left = keys(&mut c, "pg_cache:orders:*");
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still cached: {left:?}"))
        }
    });
    assert_eq!(read_v(&mut c, "orders", &order_pk(1, "us")), None);
}

/// Partitions created or attached after `pgcache_watch`: their row changes
/// and TRUNCATEs invalidate the parent's entries too.
#[test]
fn partitions_added_after_watch_are_covered() {
    let (pg, r) = watched_orders(&[]);
    let mut c = r.con();
    pg.execute(
        "CREATE TABLE orders_asia PARTITION OF orders FOR VALUES IN ('asia');
         CREATE TABLE orders_sa (LIKE orders);
         ALTER TABLE orders ATTACH PARTITION orders_sa FOR VALUES IN ('sa');
         INSERT INTO orders VALUES (1, 'asia', 'asia1'), (2, 'asia', 'asia2'),
                                   (1, 'sa', 'sa1'), (2, 'sa', 'sa2');",
    );
    read_orders(&mut c, &[(1, "asia"), (2, "asia"), (1, "sa"), (2, "sa")]);

    pg.execute("UPDATE orders_asia SET v = 'asia1 new' WHERE id = 1");
    wait_gone_for(
        &mut c,
        &order_key(1, "asia"),
        "an UPDATE in a partition created after pgcache_watch",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "asia")).as_deref(),
        Some("asia1 new")
    );
    pg.execute("UPDATE orders SET v = 'sa1 new' WHERE id = 1 AND region = 'sa'");
    wait_gone_for(
        &mut c,
        &order_key(1, "sa"),
        "an UPDATE in a partition attached after pgcache_watch",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "sa")).as_deref(),
        Some("sa1 new")
    );

    pg.execute("TRUNCATE orders_asia");
    wait_gone_for(
        &mut c,
        &order_key(2, "asia"),
        "TRUNCATE of a partition created after pgcache_watch",
    );
    pg.execute("TRUNCATE orders_sa");
    wait_gone_for(
        &mut c,
        &order_key(2, "sa"),
        "TRUNCATE of a partition attached after pgcache_watch",
    );
    assert_eq!(read_v(&mut c, "orders", &order_pk(2, "sa")), None);
}

/// A READ of a partition by its own name is served under the parent's
/// entries: no key of the partition's name ever exists, and the parent's
/// invalidation covers it.
#[test]
fn reading_a_partition_by_name_uses_the_parents_entries() {
    let (pg, r) = watched_orders(&[]);
    let mut c = r.con();
    assert_eq!(
        read_v(&mut c, "orders_eu", &order_pk(1, "eu")).as_deref(),
        Some("eu1")
    );
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        vec![order_key(1, "eu")],
        "READ orders_eu is cached under orders' key"
    );
    pg.reset_stats();
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "eu")).as_deref(),
        Some("eu1")
    );
    assert_eq!(
        pg.queries_on("orders"),
        0,
        "READ orders hits the entry READ orders_eu made:\n{}",
        pg.statements()
    );
    pg.execute("UPDATE orders_eu SET v = 'eu1 new' WHERE id = 1");
    wait_gone(&mut c, &order_key(1, "eu"));
    assert_eq!(
        read_v(&mut c, "orders_eu", &order_pk(1, "eu")).as_deref(),
        Some("eu1 new")
    );
    assert!(keys(&mut c, "pg_cache:orders_eu*").is_empty());
}

/// The seed README's trigger on a partitioned table (it fires in the
/// partitions and names them) invalidates the entries read through the
/// parent.
#[test]
fn seed_trigger_on_a_partitioned_table() {
    let pg = PgServer::start_with_schema(&format!(
        "{ORDERS}\n{SEED_FUNCTION}\n\
         CREATE TRIGGER orders_cache_trigger AFTER INSERT OR UPDATE OR DELETE ON orders \
         FOR EACH ROW EXECUTE FUNCTION notify_cache_invalidation();"
    ));
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    let mut c = r.con();
    read_orders(&mut c, &[(1, "eu"), (1, "us")]);

    pg.execute("UPDATE orders SET v = 'eu1 seed' WHERE id = 1 AND region = 'eu'");
    wait_gone_for(
        &mut c,
        &order_key(1, "eu"),
        "the seed trigger's UPDATE of orders_eu drops orders' entry",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "eu")).as_deref(),
        Some("eu1 seed")
    );
    pg.execute("UPDATE orders_us SET v = 'us1 seed' WHERE id = 1");
    wait_gone_for(
        &mut c,
        &order_key(1, "us"),
        "the seed trigger's UPDATE through orders_us drops orders' entry",
    );
    assert_eq!(
        read_v(&mut c, "orders", &order_pk(1, "us")).as_deref(),
        Some("us1 seed")
    );
}

// ---------------------------------------------------------------------------
// schema changes

/// PostgreSQL with `ddl` and `pgcache.sql` loaded (the test runs
/// `pgcache_watch`); a Redis with the module, its listener ready.
fn watched_table(ddl: &str) -> (PgServer, RedisServer) {
    let pg = PgServer::start_with_schema(ddl);
    pg.execute(&pgcache_sql());
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    (pg, r)
}

/// The primary key widened to (id, tenant) and a second row with id 1: a
/// READ of `{"id":1}` is refused naming `tenant` (never answering the other
/// tenant's row), the old entry goes, the new keys read their own rows, and
/// the trigger installed before the change invalidates the new entries.
#[test]
fn primary_key_widened() {
    let (pg, r) = watched_table(
        "CREATE TABLE acct (id int PRIMARY KEY, tenant int NOT NULL, v text);
         INSERT INTO acct VALUES (1, 1, 'original'), (2, 1, 'two');
         ",
    );
    pg.execute("SELECT pgcache_watch('acct')");
    let mut c = r.con();
    let old_key = r#"pg_cache:acct:{"id":1}"#;
    assert_eq!(
        read_v(&mut c, "acct", r#"{"id":1}"#).as_deref(),
        Some("original")
    );
    assert!(exists(&mut c, old_key));

    pg.execute(
        "ALTER TABLE acct DROP CONSTRAINT acct_pkey, ADD PRIMARY KEY (id, tenant);
         INSERT INTO acct VALUES (1, 2, 'other tenant');",
    );
    eventually(
        "READ acct {\"id\":1} is refused, naming tenant",
        || match read(&mut c, "acct", r#"{"id":1}"#) {
            Ok(Some(s)) => {
                assert!(
                    !s.contains("other tenant"),
                    "READ acct {{\"id\":1}} answered another key's row: {s}"
                );
                Err(format!("a row: {s}"))
            }
            Ok(None) => Err("nil".into()),
            Err(e) => {
                let text = err_text(&e);
                if text.to_lowercase().contains("tenant") {
                    Ok(())
                } else {
                    Err(format!("an error not naming tenant: {text}"))
                }
            }
        },
    );
    eventually("the old-format entry acct {\"id\":1} is dropped", || {
        if exists(&mut c, old_key) {
            Err(format!("{old_key} still cached"))
        } else {
            Ok(())
        }
    });
    assert_eq!(
        read_v(&mut c, "acct", r#"{"id":1,"tenant":2}"#).as_deref(),
        Some("other tenant")
    );
    assert_eq!(
        read_v(&mut c, "acct", r#"{"id":1,"tenant":1}"#).as_deref(),
        Some("original")
    );
    let e = expect_err(read(&mut c, "acct", r#"{"id":1}"#), "READ acct {\"id\":1}");
    assert_mentions(
        &e,
        &["tenant"],
        "READ acct {\"id\":1} after the key widened",
    );

    // the trigger pgcache_watch installed before the change finds the new key
    let new_key = r#"pg_cache:acct:{"id":1,"tenant":2}"#;
    read_until_cached(&mut c, "acct", r#"{"id":1,"tenant":2}"#, new_key);
    pg.execute("UPDATE acct SET v = 'other tenant changed' WHERE id = 1 AND tenant = 2");
    wait_gone_for(
        &mut c,
        new_key,
        "an UPDATE after the key widened (pgcache_watch not re-run) drops the new-format entry",
    );
    assert_eq!(
        read_v(&mut c, "acct", r#"{"id":1,"tenant":2}"#).as_deref(),
        Some("other tenant changed")
    );
}

/// The key column's type changed from integer to bigint: a key beyond
/// integer's range is eventually readable, and entries stay reachable.
#[test]
fn key_type_changed() {
    let (pg, r) = watched_table(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'one');",
    );
    pg.execute("SELECT pgcache_watch('t')");
    let mut c = r.con();
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("one"));

    pg.execute(
        "ALTER TABLE t ALTER COLUMN id TYPE bigint;
         INSERT INTO t VALUES (3000000000, 'big');",
    );
    eventually("READ t {\"id\":3000000000} answers the row", || match read(
        &mut c,
        "t",
        r#"{"id":3000000000}"#,
    ) {
        Ok(Some(s)) if json(&s)["v"] == "big" => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(err_text(&e)),
    });
    read_until_cached(
        &mut c,
        "t",
        r#"{"id":3000000000}"#,
        r#"pg_cache:t:{"id":3000000000}"#,
    );
    pg.execute("UPDATE t SET v = 'big changed' WHERE id = 3000000000");
    wait_gone(&mut c, r#"pg_cache:t:{"id":3000000000}"#);
    assert_eq!(
        read_v(&mut c, "t", r#"{"id":3000000000}"#).as_deref(),
        Some("big changed")
    );
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("one"));
}

/// The key column renamed: the new name is eventually the key, the old one
/// is refused naming the new, the old-format entry goes, and the trigger
/// installed before the rename invalidates new entries.
#[test]
fn key_column_renamed() {
    let (pg, r) = watched_table(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'one'), (2, 'two');",
    );
    pg.execute("SELECT pgcache_watch('t')");
    let mut c = r.con();
    let old_key = r#"pg_cache:t:{"id":1}"#;
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("one"));
    assert!(exists(&mut c, old_key));

    pg.execute("ALTER TABLE t RENAME COLUMN id TO uid");
    eventually("READ t {\"uid\":1} answers the row", || {
        match read(&mut c, "t", r#"{"uid":1}"#) {
            Ok(Some(s)) if json(&s)["v"] == "one" => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(err_text(&e)),
        }
    });
    eventually("READ t {\"id\":1} is refused, naming uid", || {
        match read(&mut c, "t", r#"{"id":1}"#) {
            Err(e) if err_text(&e).contains("uid") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    eventually("the old-format entry t {\"id\":1} is dropped", || {
        if exists(&mut c, old_key) {
            Err(format!("{old_key} still cached"))
        } else {
            Ok(())
        }
    });

    let new_key = r#"pg_cache:t:{"uid":1}"#;
    read_until_cached(&mut c, "t", r#"{"uid":1}"#, new_key);
    pg.execute("UPDATE t SET v = 'uno' WHERE uid = 1");
    wait_gone_for(
        &mut c,
        new_key,
        "an UPDATE after the rename (pgcache_watch not re-run) drops the new-format entry",
    );
    assert_eq!(read_v(&mut c, "t", r#"{"uid":1}"#).as_deref(), Some("uno"));
}

/// A table dropped and recreated with other content: the old table's
/// cached row is not served for the new table.
#[test]
fn table_dropped_and_recreated() {
    let (pg, r) = watched_table(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'old');",
    );
    pg.execute("SELECT pgcache_watch('t')");
    let mut c = r.con();
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("old"));

    pg.execute(
        "DROP TABLE t;
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'new');
         SELECT pgcache_watch('t');",
    );
    eventually(
        "READ t {\"id\":1} answers the new table's row",
        || match read(&mut c, "t", r#"{"id":1}"#) {
            Ok(Some(s)) if json(&s)["v"] == "new" => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(err_text(&e)),
        },
    );
    // and the new table's entries are invalidated
    pg.execute("UPDATE t SET v = 'newer' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:t:{"id":1}"#);
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("newer"));
}

/// A non-key column dropped: READs keep answering (no error loop) and the
/// entries stay reachable by invalidation.
#[test]
fn non_key_column_dropped() {
    let (pg, r) = watched_table(
        "CREATE TABLE t (id int PRIMARY KEY, extra text, v text);
         INSERT INTO t VALUES (1, 'x', 'one'), (2, 'y', 'two'), (3, 'z', 'three');",
    );
    pg.execute("SELECT pgcache_watch('t')");
    let mut c = r.con();
    assert_eq!(read_v(&mut c, "t", r#"{"id":1}"#).as_deref(), Some("one"));

    pg.execute("ALTER TABLE t DROP COLUMN extra");
    // READs across more than one revalidation interval: every one answers
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for (id, v) in [(1, "one"), (2, "two")] {
            assert_eq!(
                read_v(&mut c, "t", &format!(r#"{{"id":{id}}}"#)).as_deref(),
                Some(v),
                "READ t {{\"id\":{id}}} after a non-key column was dropped"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fresh = read_row(&mut c, "t", r#"{"id":3}"#);
    assert!(
        fresh.get("extra").is_none(),
        "a fill after the drop has no dropped column: {fresh}"
    );
    for (id, v) in [(1, "uno"), (2, "dos")] {
        let key = format!(r#"pg_cache:t:{{"id":{id}}}"#);
        read_until_cached(&mut c, "t", &format!(r#"{{"id":{id}}}"#), &key);
        pg.execute(&format!("UPDATE t SET v = '{v}' WHERE id = {id}"));
        wait_gone_for(&mut c, &key, "an UPDATE after a column was dropped");
        assert_eq!(
            read_v(&mut c, "t", &format!(r#"{{"id":{id}}}"#)).as_deref(),
            Some(v)
        );
    }
}
