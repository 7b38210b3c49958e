//! PGCACHE.READ / WRITE / INVALIDATE / MULTIREAD / STATS, INFO and events,
//! against a real redis-server and a private PostgreSQL.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Column names of a JSON object, in order.
fn columns(v: &Value) -> Vec<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Same row as PostgreSQL's row_to_json: same values and same column order.
#[track_caller]
fn assert_row(got: &Value, expected: &Value) {
    assert_eq!(got, expected, "row differs from row_to_json");
    assert_eq!(
        columns(got),
        columns(expected),
        "columns not in table order"
    );
}

#[test]
fn read_miss_then_hit() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["default_ttl", "3600"]);
    let mut c = r.con();
    pg.reset_stats();
    let before = r.stats();

    let expected = pg.row_json("users", "id = 123").unwrap();
    pg.reset_stats();

    // miss: fetched from PostgreSQL, cached with default_ttl
    let got = read_row(&mut c, "users", r#"{"id": 123}"#);
    assert_row(&got, &expected);
    assert_eq!(
        pg.queries_on("users"),
        1,
        "a miss is one query:\n{}",
        pg.statements()
    );
    let key = r#"pg_cache:users:{"id":123}"#;
    assert!(
        exists(&mut c, key),
        "key {key} should exist; keys: {:?}",
        keys(&mut c, "*")
    );
    let t = ttl(&mut c, key);
    assert!(
        t > 3500 && t <= 3600,
        "TTL after a miss should be default_ttl, got {t}"
    );
    let stored: String = redis::cmd("GET").arg(key).query(&mut c).unwrap();
    assert_row(&json(&stored), &expected);

    // hit: same answer, no query, TTL untouched even with a TTL argument
    let hit = read_ttl(&mut c, "users", r#"{"id": 123}"#, "5")
        .unwrap()
        .unwrap();
    assert_row(&json(&hit), &expected);
    assert_eq!(pg.queries_on("users"), 1, "a hit must not query PostgreSQL");
    let t2 = ttl(&mut c, key);
    assert!(t2 > 3500, "a hit must leave the TTL as it is, got {t2}");

    let after = r.stats();
    assert_eq!(
        stat_of(&after, "misses") - stat_of(&before, "misses"),
        1,
        "{after}"
    );
    assert_eq!(
        stat_of(&after, "hits") - stat_of(&before, "hits"),
        1,
        "{after}"
    );
    assert_eq!(
        stat_of(&after, "pg_queries") - stat_of(&before, "pg_queries"),
        1,
        "{after}"
    );
}

#[test]
fn read_with_ttl_argument_and_zero_ttl() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["default_ttl", "3600"]);
    let mut c = r.con();

    let row = read_ttl(&mut c, "users", r#"{"id":5}"#, "120").unwrap();
    assert!(row.is_some());
    let t = ttl(&mut c, r#"pg_cache:users:{"id":5}"#);
    assert!(t > 100 && t <= 120, "TTL should be the given 120, got {t}");

    // default_ttl 0 means no expiry
    let r0 = RedisServer::with_pg(&pg, &["default_ttl", "0"]);
    let mut c0 = r0.con();
    read_row(&mut c0, "users", r#"{"id":6}"#);
    assert_eq!(
        ttl(&mut c0, r#"pg_cache:users:{"id":6}"#),
        -1,
        "default_ttl 0: no expiry"
    );
}

#[test]
fn read_missing_row_is_nil() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    let before = stat_of(&r.stats(), "not_found");
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    // negative_ttl is 0 by default: nothing remembered, each asks again
    assert_eq!(pg.queries_on("users"), 2, "{}", pg.statements());
    assert!(
        keys(&mut c, "pg_cache:*").is_empty(),
        "nothing cached for a missing row"
    );
    assert_eq!(stat_of(&r.stats(), "not_found") - before, 2);
}

#[test]
fn negative_ttl_remembers_missing_rows() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["negative_ttl", "60"]);
    let mut c = r.con();
    pg.reset_stats();
    assert_eq!(read(&mut c, "users", r#"{"id":424242}"#).unwrap(), None);
    assert_eq!(read(&mut c, "users", r#"{"id":424242}"#).unwrap(), None);
    assert_eq!(
        pg.queries_on("users"),
        1,
        "negative_ttl: the second nil comes from Redis"
    );
    // MULTIREAD sees the remembered absence too
    let arr = json(&multiread(&mut c, "users", r#"[{"id":424242}]"#).unwrap());
    assert_eq!(arr, json!([null]));
    assert_eq!(pg.queries_on("users"), 1);
}

#[test]
fn composite_key() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let expected = pg
        .row_json("products", "category = 'books' AND product_id = 7")
        .unwrap();
    pg.reset_stats();
    let got = read_row(
        &mut c,
        "products",
        r#"{"product_id": 7, "category": "books"}"#,
    );
    assert_row(&got, &expected);
    assert!(got["price"].is_number(), "decimal stays a number: {got}");
    assert!(exists(
        &mut c,
        r#"pg_cache:products:{"category":"books","product_id":7}"#
    ));
    let again = read_row(
        &mut c,
        "products",
        r#"{"category": "books", "product_id": 7}"#,
    );
    assert_row(&again, &expected);
    assert_eq!(pg.queries_on("products"), 1);
    assert_eq!(
        read(
            &mut c,
            "products",
            r#"{"category":"books","product_id":1000}"#
        )
        .unwrap(),
        None
    );
}

#[test]
fn schema_qualified_and_mixed_case_tables() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();

    let acc = read_row(&mut c, "app.accounts", r#"{"id":3}"#);
    assert_row(&acc, &pg.row_json("app.accounts", "id = 3").unwrap());
    assert!(
        exists(&mut c, r#"pg_cache:app.accounts:{"id":3}"#),
        "keys: {:?}",
        keys(&mut c, "*")
    );

    // app.users and users are different tables with different keys
    let au = read_row(&mut c, "app.users", r#"{"id":1}"#);
    assert_eq!(au["handle"], "app-user-1");
    let pu = read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(pu["name"], "User 1");
    assert!(exists(&mut c, r#"pg_cache:app.users:{"id":1}"#));
    assert!(exists(&mut c, r#"pg_cache:users:{"id":1}"#));

    // public.users is the same table (and entry) as users
    pg.reset_stats();
    let pu2 = read_row(&mut c, "public.users", r#"{"id":1}"#);
    assert_eq!(pu2, pu);
    assert_eq!(
        pg.queries_on("users"),
        0,
        "public.users must hit the users entry"
    );

    // "MixedCase" is the quoted table; MixedCase folds to mixedcase
    let mixed = read_row(&mut c, r#""MixedCase""#, r#"{"Id":2}"#);
    assert_row(
        &mixed,
        &pg.row_json(r#""MixedCase""#, r#""Id" = 2"#).unwrap(),
    );
    let lower = read_row(&mut c, "MixedCase", r#"{"id":1}"#);
    assert_eq!(lower["label"], "lower one");
    let lower2 = read_row(&mut c, "mixedcase", r#"{"id":1}"#);
    assert_eq!(lower2, lower);
}

#[test]
fn json_columns_nest_and_numbers_stay_numbers() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for id in [1, 2] {
        let got = read_row(&mut c, "docs", &format!(r#"{{"id":{id}}}"#));
        assert_row(&got, &pg.row_json("docs", &format!("id = {id}")).unwrap());
    }
    let d = read_row(&mut c, "docs", r#"{"id":1}"#);
    assert!(
        d["data"].is_object(),
        "json column must nest, not be a string: {d}"
    );
    assert_eq!(d["data"]["a"][2], json!({"b": null}));
    assert_eq!(d["meta"]["k"]["n"], json!(1.5));
    assert_eq!(d["tags"], json!(["x", "y"]));
    assert_eq!(d["score"], json!(2.5));
    assert_eq!(d["flag"], json!(true));
    assert_eq!(
        d["big"].as_u64(),
        Some(9007199254740993),
        "bigint must keep every digit: {d}"
    );
    assert!(d["amount"].is_number(), "numeric stays a number: {d}");
    let d2 = read_row(&mut c, "docs", r#"{"id":2}"#);
    assert_eq!(d2["data"], Value::Null);
    assert_eq!(d2["meta"], json!([]));
    assert_eq!(d2["big"], json!(-1));

    let b = read_row(&mut c, "big_items", r#"{"id":9007199254740993}"#);
    assert_eq!(b["label"], "beyond f64");
    assert!(exists(
        &mut c,
        r#"pg_cache:big_items:{"id":9007199254740993}"#
    ));
}

#[test]
fn write_stores_without_querying() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["default_ttl", "3600"]);
    let mut c = r.con();
    pg.reset_stats();

    let data = r#"{"id": 77, "name": "Written", "email": "w@example.com"}"#;
    assert_eq!(write(&mut c, "users", r#"{"id":77}"#, data).unwrap(), "OK");
    let key = r#"pg_cache:users:{"id":77}"#;
    assert!(exists(&mut c, key));
    let t = ttl(&mut c, key);
    assert!(t > 3500 && t <= 3600, "WRITE uses default_ttl, got {t}");
    let got = read_row(&mut c, "users", r#"{"id":"77"}"#);
    assert_eq!(got, json(data), "READ after WRITE returns the written data");
    assert_eq!(
        pg.queries_on("users"),
        0,
        "WRITE and the following hit never query rows"
    );
    // PostgreSQL is unchanged
    assert_eq!(
        pg.row_json("users", "id = 77").unwrap()["name"],
        "User 77",
        "WRITE must not write to PostgreSQL"
    );

    // with a TTL, and overwriting an existing entry
    let data2 = r#"{"id":77,"name":"Again"}"#;
    let ok: String = redis::cmd("PGCACHE.WRITE")
        .arg("users")
        .arg(r#"{"id":77}"#)
        .arg(data2)
        .arg("90")
        .query(&mut c)
        .unwrap();
    assert_eq!(ok, "OK");
    let t = ttl(&mut c, key);
    assert!(t > 60 && t <= 90, "WRITE TTL should be 90, got {t}");
    assert_eq!(read_row(&mut c, "users", r#"{"id":77}"#), json(data2));

    // a row that does not exist in PostgreSQL can be written too
    assert_eq!(
        write(&mut c, "users", r#"{"id":5000000}"#, r#"{"id":5000000}"#).unwrap(),
        "OK"
    );
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":5000000}"#),
        json!({"id": 5000000})
    );
    assert_eq!(pg.queries_on("users"), 0);
}

#[test]
fn invalidate_drops_entry() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    read_row(&mut c, "users", r#"{"id":9}"#);
    let key = r#"pg_cache:users:{"id":9}"#;
    assert!(exists(&mut c, key));
    // any spelling of the key invalidates the entry
    assert_eq!(
        invalidate(&mut c, "users", r#"{ "id" : "009" }"#).unwrap(),
        "OK"
    );
    assert!(!exists(&mut c, key), "INVALIDATE must drop the entry");
    // a changed row is seen after invalidation
    pg.execute("UPDATE users SET name = 'Renamed' WHERE id = 9");
    let got = read_row(&mut c, "users", r#"{"id":9}"#);
    assert_eq!(got["name"], "Renamed");
    assert_eq!(
        pg.queries_on("users"),
        2,
        "READ after INVALIDATE queries again"
    );
    // invalidating what is not cached is fine
    assert_eq!(
        invalidate(&mut c, "users", r#"{"id":424242}"#).unwrap(),
        "OK"
    );
    // composite key
    read_row(
        &mut c,
        "products",
        r#"{"category":"garden","product_id":3}"#,
    );
    assert_eq!(
        invalidate(
            &mut c,
            "products",
            r#"{"product_id":3,"category":"garden"}"#
        )
        .unwrap(),
        "OK"
    );
    assert!(!exists(
        &mut c,
        r#"pg_cache:products:{"category":"garden","product_id":3}"#
    ));
}

#[test]
fn multiread_aligned_with_one_query_for_all_misses() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["default_ttl", "3600"]);
    let mut c = r.con();
    let row = |id: i32| pg.row_json("users", &format!("id = {id}")).unwrap();
    let expected = [row(1), row(2), row(3), row(4)];

    read_row(&mut c, "users", r#"{"id":2}"#); // 2 is cached
    pg.reset_stats();
    let before = r.stats();
    let reply = multiread(
        &mut c,
        "users",
        r#"[{"id":1}, {"id":2}, {"id":999999}, {"id":"3"}, {"id":1}, {"id":4}]"#,
    )
    .unwrap();
    let arr = json(&reply);
    let arr = arr.as_array().expect("MULTIREAD returns a JSON array");
    assert_eq!(arr.len(), 6, "aligned with the input: {reply}");
    assert_row(&arr[0], &expected[0]);
    assert_row(&arr[1], &expected[1]);
    assert_eq!(arr[2], Value::Null);
    assert_row(&arr[3], &expected[2]);
    assert_row(&arr[4], &expected[0]);
    assert_row(&arr[5], &expected[3]);
    assert_eq!(
        pg.queries_on("users"),
        1,
        "all misses of one MULTIREAD are one query:\n{}",
        pg.statements()
    );
    let after = r.stats();
    assert_eq!(
        stat_of(&after, "pg_queries") - stat_of(&before, "pg_queries"),
        1
    );
    assert!(stat_of(&after, "hits") > stat_of(&before, "hits"));

    // misses were cached, with default_ttl
    for id in [1, 3, 4] {
        let key = format!(r#"pg_cache:users:{{"id":{id}}}"#);
        assert!(exists(&mut c, &key), "{key} should be cached");
        assert!(ttl(&mut c, &key) > 3500);
    }
    let again =
        json(&multiread(&mut c, "users", r#"[{"id":4},{"id":3},{"id":2},{"id":1}]"#).unwrap());
    assert_eq!(
        again,
        Value::Array(vec![
            expected[3].clone(),
            expected[2].clone(),
            expected[1].clone(),
            expected[0].clone()
        ])
    );
    assert_eq!(pg.queries_on("users"), 1, "all hits: no query");

    // with a TTL argument
    let with_ttl: String = redis::cmd("PGCACHE.MULTIREAD")
        .arg("users")
        .arg(r#"[{"id":10},{"id":11}]"#)
        .arg("200")
        .query(&mut c)
        .unwrap();
    assert_eq!(json(&with_ttl).as_array().unwrap().len(), 2);
    let t = ttl(&mut c, r#"pg_cache:users:{"id":11}"#);
    assert!(t > 150 && t <= 200, "MULTIREAD TTL 200, got {t}");

    // composite keys and an empty array
    let p = json(
        &multiread(
            &mut c,
            "products",
            r#"[{"category":"books","product_id":1},{"category":"nope","product_id":1}]"#,
        )
        .unwrap(),
    );
    assert_eq!(
        p[0],
        pg.row_json("products", "category='books' AND product_id=1")
            .unwrap()
    );
    assert_eq!(p[1], Value::Null);
    assert_eq!(json(&multiread(&mut c, "users", "[]").unwrap()), json!([]));
}

#[test]
fn multiread_only_duplicates_of_one_miss() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    let arr = json(&multiread(&mut c, "users", r#"[{"id":8},{"id":"8"},{"id":"0008"}]"#).unwrap());
    let expected = pg.row_json("users", "id = 8").unwrap();
    assert_eq!(arr, json!([expected, expected, expected]));
    assert_eq!(pg.queries_on("users"), 1, "{}", pg.statements());
}

#[test]
fn stats_and_info_fields() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "users", r#"{"id":1}"#);
    let s = r.stats();
    let fields = [
        "hits",
        "misses",
        "not_found",
        "fills_in_flight",
        "coalesced_waits",
        "pg_queries",
        "pg_errors",
        "timeouts",
        "busy_rejections",
        "stale_fills_discarded",
    ];
    for f in fields {
        stat_of(&s, f);
    }
    assert!(
        stat_of(&s, "hits") >= 1 && stat_of(&s, "misses") >= 1,
        "{s}"
    );
    assert_eq!(stat_of(&s, "fills_in_flight"), 0);

    let info: String = redis::cmd("INFO").arg("pgcache").query(&mut c).unwrap();
    assert!(!info.trim().is_empty(), "INFO pgcache is empty");
    for f in fields {
        assert!(
            info.lines()
                .any(|l| l.split(':').next().unwrap_or("").ends_with(f)),
            "INFO pgcache lacks {f}:\n{info}"
        );
    }
    // the same numbers: hits as counted by STATS
    let hits_line = info
        .lines()
        .find(|l| l.split(':').next().unwrap().ends_with("_hits") || l.starts_with("hits:"))
        .unwrap();
    let info_hits: i64 = hits_line.split(':').nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(info_hits, stat_of(&r.stats(), "hits"), "{info}");
}

#[test]
fn module_list_shows_pgcache() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let list: redis::Value = redis::cmd("MODULE").arg("LIST").query(&mut c).unwrap();
    let names: Vec<String> = match list {
        redis::Value::Array(mods) => mods
            .into_iter()
            .filter_map(|m| {
                let items: Vec<redis::Value> = redis::from_redis_value(&m).ok()?;
                let mut it = items.iter();
                while let Some(k) = it.next() {
                    let v = it.next()?;
                    if redis::from_redis_value::<String>(k).ok()? == "name" {
                        return redis::from_redis_value::<String>(v).ok();
                    }
                }
                None
            })
            .collect(),
        other => panic!("MODULE LIST: {other:?}"),
    };
    assert!(
        names.iter().any(|n| n == "pgcache"),
        "MODULE LIST names: {names:?}"
    );
}

/// The project's one version (the Cargo workspace's): `MODULE LIST` encodes
/// it as major*10000 + minor*100 + patch, `INFO pgcache` shows its text.
#[test]
fn module_list_and_info_show_the_version() {
    let text = env!("CARGO_PKG_VERSION");
    let parts: Vec<i64> = text
        .split(['.', '-', '+'])
        .take(3)
        .map(|p| p.parse().unwrap())
        .collect();
    let encoded = parts[0] * 10000 + parts[1] * 100 + parts[2];
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let list: Vec<Vec<redis::Value>> = redis::cmd("MODULE").arg("LIST").query(&mut c).unwrap();
    let ver = list
        .iter()
        .find_map(|m| {
            let mut name = None;
            let mut ver = None;
            for kv in m.chunks(2) {
                let k: String = redis::from_redis_value(&kv[0]).ok()?;
                match k.as_str() {
                    "name" => name = redis::from_redis_value::<String>(&kv[1]).ok(),
                    "ver" => ver = redis::from_redis_value::<i64>(&kv[1]).ok(),
                    _ => {}
                }
            }
            (name.as_deref() == Some("pgcache"))
                .then_some(ver)
                .flatten()
        })
        .expect("MODULE LIST has pgcache with a ver");
    assert_eq!(ver, encoded, "MODULE LIST ver for version {text}");
    assert_eq!(info_field(&mut c, "pgcache", "pgcache_version"), text);
}

// ---------------------------------------------------------------------------
// events

const SENTINEL: &str = "__harness_end__";

/// Subscribe on a separate connection, run `f`, then publish a sentinel and
/// collect everything published on `channel` before it.
fn capture_events(
    r: &RedisServer,
    channel: &str,
    f: impl FnOnce(&mut redis::Connection),
) -> Vec<Value> {
    let mut sub = r.con();
    let mut ps = sub.as_pubsub();
    ps.subscribe(channel).unwrap();
    ps.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut c = r.con();
    // wait until the subscription is registered
    for _ in 0..500 {
        let n: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut c)
            .unwrap();
        if n[0].1 >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f(&mut c);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(SENTINEL)
        .query(&mut c)
        .unwrap();
    let mut out = vec![];
    loop {
        let msg = ps
            .get_message()
            .expect("event message (or sentinel) within 30 s");
        let payload: String = msg.get_payload().unwrap();
        if payload == SENTINEL {
            return out;
        }
        out.push(
            serde_json::from_str(&payload)
                .unwrap_or_else(|e| panic!("event is not JSON ({e}): {payload}")),
        );
    }
}

#[test]
fn events_in_order_with_types_table_key_timestamp() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let t0 = unix_now();
    let events = capture_events(&r, "pg_cache_events", |c| {
        read_row(c, "users", r#"{"id": 1}"#); // miss
        read_row(c, "users", r#"{"id":"1"}"#); // hit
        write(c, "users", r#"{"id":2}"#, r#"{"id":2,"name":"W"}"#).unwrap();
        invalidate(c, "users", r#"{"id":2}"#).unwrap();
        multiread(c, "users", r#"[{"id":1},{"id":3},{"id":999999}]"#).unwrap();
        read_row(c, "products", r#"{"product_id":4,"category":"books"}"#);
    });
    let t1 = unix_now();
    let summary: Vec<(String, String, Value)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("?").to_string(),
                e["table"].as_str().unwrap_or("?").to_string(),
                e["key"].clone(),
            )
        })
        .collect();
    let want = vec![
        ("cache_miss", "users", json!({"id":1})),
        ("cache_hit", "users", json!({"id":1})),
        ("cache_write", "users", json!({"id":2})),
        ("cache_invalidate", "users", json!({"id":2})),
        ("cache_hit", "users", json!({"id":1})),
        ("cache_miss", "users", json!({"id":3})),
        ("cache_miss", "users", json!({"id":999999})),
        (
            "cache_miss",
            "products",
            json!({"category":"books","product_id":4}),
        ),
    ];
    let want: Vec<(String, String, Value)> = want
        .into_iter()
        .map(|(a, b, k)| (a.to_string(), b.to_string(), k))
        .collect();
    assert_eq!(summary, want, "events: {events:#?}");
    for e in &events {
        let ts = e["timestamp"]
            .as_f64()
            .unwrap_or_else(|| panic!("timestamp is a number: {e}"));
        assert!(
            ts >= t0 - 5.0 && ts <= t1 + 5.0,
            "timestamp {ts} is unix seconds: {e}"
        );
    }
    assert_eq!(events[3]["source"], "command", "{}", events[3]);
}

#[test]
fn events_none_publishes_nothing() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["events", "none"]);
    let events = capture_events(&r, "pg_cache_events", |c| {
        read_row(c, "users", r#"{"id":1}"#);
        read_row(c, "users", r#"{"id":1}"#);
        write(c, "users", r#"{"id":2}"#, r#"{"id":2}"#).unwrap();
        invalidate(c, "users", r#"{"id":2}"#).unwrap();
        multiread(c, "users", r#"[{"id":1},{"id":3}]"#).unwrap();
    });
    assert!(events.is_empty(), "events none: {events:?}");
}

#[test]
fn events_type_list_and_channel() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(
        &pg,
        &[
            "events",
            "cache_miss,cache_write",
            "events_channel",
            "my_events",
        ],
    );
    let mut other = vec![];
    let events = capture_events(&r, "my_events", |c| {
        other = capture_events(&r, "pg_cache_events", |c2| {
            read_row(c2, "users", r#"{"id":1}"#); // miss
        });
        read_row(c, "users", r#"{"id":1}"#); // hit: filtered
        read_row(c, "users", r#"{"id":5}"#); // miss
        write(c, "users", r#"{"id":2}"#, r#"{"id":2}"#).unwrap();
        invalidate(c, "users", r#"{"id":2}"#).unwrap(); // filtered
    });
    assert!(
        other.is_empty(),
        "nothing on the default channel: {other:?}"
    );
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["cache_miss", "cache_miss", "cache_write"],
        "{events:?}"
    );
}

/// Inside MULTI/EXEC or a Lua script Redis cannot block a client: a hit is
/// served, a miss answers at once with an error saying so (no client is
/// blocked and no fill is started there), and a read outside fills as usual.
#[test]
fn read_inside_multi_and_lua() {
    let pg = PgServer::start_new();
    let mut r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let expected = pg.row_json("users", "id = 7").unwrap();
    let key = r#"pg_cache:users:{"id":7}"#;

    // A miss inside a transaction: an error for that command only.
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let _: () = redis::cmd("PGCACHE.READ")
        .arg("users")
        .arg(r#"{"id":7}"#)
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("ECHO").arg("after").query(&mut c).unwrap();
    let exec = redis::cmd("EXEC").query::<redis::Value>(&mut c);
    let text = format!("{exec:?}");
    assert!(
        text.contains("cannot wait for PostgreSQL here"),
        "a miss in MULTI is an error naming the cause; got {text}"
    );
    assert_eq!(r.stat("fills_in_flight"), 0, "no fill was started");
    assert!(!exists(&mut c, key));
    // Read outside, it is cached; a hit inside a transaction is served.
    assert_row(&read_row(&mut c, "users", r#"{"id":7}"#), &expected);
    let (hit,): (String,) = redis::pipe()
        .atomic()
        .cmd("PGCACHE.READ")
        .arg("users")
        .arg(r#"{"id":7}"#)
        .query(&mut c)
        .unwrap();
    assert_row(&serde_json::from_str(&hit).unwrap(), &expected);

    // Lua: a hit is served; a miss is an error the script sees.
    let hit: String = redis::cmd("EVAL")
        .arg("return redis.call('PGCACHE.READ', 'users', ARGV[1])")
        .arg(0)
        .arg(r#"{"id":7}"#)
        .query(&mut c)
        .unwrap();
    assert_row(&serde_json::from_str(&hit).unwrap(), &expected);
    let miss = redis::cmd("EVAL")
        .arg("return redis.pcall('PGCACHE.READ', 'users', ARGV[1])")
        .arg(0)
        .arg(r#"{"id":8}"#)
        .query::<redis::Value>(&mut c);
    let text = format!("{miss:?}");
    assert!(
        text.contains("cannot wait for PostgreSQL here"),
        "got {text}"
    );
    assert_eq!(r.stat("fills_in_flight"), 0);
    assert!(r.alive());
}

/// With `loglevel debug` the module logs each fill (table, key, outcome,
/// time taken) and each invalidation; at other levels it logs none of them.
#[test]
fn debug_log_shows_fills_and_invalidations() {
    let pg = watched_pg();
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    let mut c = r.con();
    read_row(&mut c, "users", r#"{"id":5}"#);
    assert!(
        !r.log().contains("fill of"),
        "fills are not logged at the default level"
    );
    config_set(&mut c, "loglevel", "debug").unwrap();
    read_row(&mut c, "users", r#"{"id":1}"#);
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    pg.execute("UPDATE users SET name = 'logged' WHERE id = 1");
    wait_gone(&mut c, r#"pg_cache:users:{"id":1}"#);
    let key = r#"pg_cache:users:{"id":1}"#;
    wait_until("the debug lines are in the log", || {
        let log = r.log();
        let fill = log
            .lines()
            .find(|l| l.contains(&format!("fill of {key}: a row")))
            .ok_or("no fill line for id 1")?;
        if !(fill.contains(" in ") && fill.contains("ms")) {
            return Err(format!("the fill line has no time taken: {fill}"));
        }
        if !log.contains(r#"fill of pg_cache:users:{"id":999999}: no row"#) {
            return Err("no fill line for the missing row".into());
        }
        if !log.contains(r#"notification UPDATE users: {"id":1} invalidated"#) {
            return Err("no invalidation line".into());
        }
        Ok(())
    });
}

/// The pk of the keyed commands is a NOT_KEY key spec at argument 2 (what
/// Redis Cluster routes by, and what no ACL check reads); READ and
/// MULTIREAD are `may-replicate` (COMMAND INFO does not show that flag on
/// 7.0), so read-only scripts cannot call them.
#[test]
fn keyed_commands_declare_their_pk_as_a_routing_key() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for (command, access) in [
        ("pgcache.read", "RO"),
        ("pgcache.multiread", "RO"),
        ("pgcache.write", "OW"),
        ("pgcache.invalidate", "RM"),
    ] {
        let info: Value = redis_to_json(
            &redis::cmd("COMMAND")
                .arg("INFO")
                .arg(command)
                .query::<redis::Value>(&mut c)
                .unwrap(),
        );
        let entry = &info[0];
        assert_eq!(
            (&entry[3], &entry[4], &entry[5]),
            (&json!(2), &json!(2), &json!(1)),
            "{command}: first/last/step: {entry}"
        );
        let spec = entry[8][0].to_string();
        assert!(
            spec.contains("\"not_key\"") && spec.contains(&format!("\"{access}\"")),
            "{command}: key spec {spec}"
        );
    }
    for command in [
        "pgcache.stats",
        "pgcache.canonical",
        "pgcache.invalidate_table",
    ] {
        let info: Value = redis_to_json(
            &redis::cmd("COMMAND")
                .arg("INFO")
                .arg(command)
                .query::<redis::Value>(&mut c)
                .unwrap(),
        );
        assert_eq!(info[0][3], json!(0), "{command} has no key: {info}");
    }
    let getkeys: redis::RedisResult<redis::Value> = redis::cmd("COMMAND")
        .arg("GETKEYS")
        .arg("pgcache.read")
        .arg("users")
        .arg(r#"{"id":1}"#)
        .query(&mut c);
    assert!(getkeys.is_err(), "the pk is not a key: {getkeys:?}");
    // Still served, from a plain EVAL (a hit: a script cannot wait for a
    // miss); refused from a read-only one.
    read_row(&mut c, "users", r#"{"id":1}"#);
    let via_eval: redis::RedisResult<Option<String>> = redis::cmd("EVAL")
        .arg("return redis.call('PGCACHE.READ', 'users', ARGV[1])")
        .arg(0)
        .arg(r#"{"id":1}"#)
        .query(&mut c);
    assert!(
        via_eval.as_ref().is_ok_and(|row| row.is_some()),
        "READ from EVAL: {via_eval:?}"
    );
    let ro: redis::RedisResult<Option<String>> = redis::cmd("EVAL_RO")
        .arg("return redis.call('PGCACHE.READ', 'users', ARGV[1])")
        .arg(0)
        .arg(r#"{"id":1}"#)
        .query(&mut c);
    let e = ro.unwrap_err().to_string();
    assert!(e.contains("Write commands are not allowed"), "{e}");
}

#[test]
fn canonical_answers_the_canonical_pk() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let canonical: String = redis::cmd("PGCACHE.CANONICAL")
        .arg("users")
        .arg(r#"{ "id" : "000123" }"#)
        .query(&mut c)
        .unwrap();
    assert_eq!(canonical, r#"{"id":123}"#);
    let e = redis::cmd("PGCACHE.CANONICAL")
        .arg("users")
        .arg(r#"{"name":"x"}"#)
        .query::<String>(&mut c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("id"), "names the pk column: {e}");
    let e = redis::cmd("PGCACHE.CANONICAL")
        .arg("users")
        .query::<String>(&mut c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong number of arguments"), "{e}");
    // Outside a cluster any spelling is served.
    let row: Option<String> = redis::cmd("PGCACHE.READ")
        .arg("users")
        .arg(r#"{"id":"123"}"#)
        .query(&mut c)
        .unwrap();
    assert!(row.is_some());
}

/// A RESP reply as JSON (arrays and maps as arrays, strings as strings).
fn redis_to_json(v: &redis::Value) -> Value {
    use redis::Value as R;
    match v {
        R::Nil => Value::Null,
        R::Int(i) => json!(i),
        R::BulkString(b) => json!(String::from_utf8_lossy(b)),
        R::SimpleString(s) => json!(s),
        R::Okay => json!("OK"),
        R::Array(items) | R::Set(items) => Value::Array(items.iter().map(redis_to_json).collect()),
        R::Map(pairs) => Value::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [redis_to_json(k), redis_to_json(v)])
                .collect(),
        ),
        R::Double(d) => json!(d),
        R::Boolean(b) => json!(b),
        other => json!(format!("{other:?}")),
    }
}
