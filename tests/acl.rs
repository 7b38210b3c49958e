//! Redis ACLs bind the keys pgcache derives: a user limited to
//! `~pg_cache:users:*` reads `users` through pgcache and nothing else.

mod common;

use common::*;

fn as_user(r: &RedisServer, user: &str) -> redis::Connection {
    let mut c = r.con();
    let _: String = redis::cmd("AUTH")
        .arg(user)
        .arg("any")
        .query(&mut c)
        .unwrap();
    c
}

/// The reply must be a NOPERM error mentioning `words`.
#[track_caller]
fn noperm<T: std::fmt::Debug>(r: redis::RedisResult<T>, words: &[&str], what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected NOPERM, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), Some("NOPERM"), "{what}: {e}");
            assert_mentions(&e.to_string(), words, what);
        }
    }
}

fn setuser(c: &mut redis::Connection, spec: &[&str]) {
    let _: String = redis::cmd("ACL").arg("SETUSER").arg(spec).query(c).unwrap();
}

#[test]
fn derived_keys_obey_the_users_key_patterns() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut admin = r.con();
    setuser(
        &mut admin,
        &[
            "reader",
            "on",
            "nopass",
            "~pg_cache:users:*",
            "+pgcache.read",
            "+pgcache.multiread",
            "+ping",
        ],
    );
    setuser(
        &mut admin,
        &[
            "writer",
            "on",
            "nopass",
            "~pg_cache:users:*",
            "+pgcache.read",
            "+pgcache.write",
            "+pgcache.invalidate",
            "+pgcache.invalidate_table",
        ],
    );
    setuser(
        &mut admin,
        &[
            "readonly",
            "on",
            "nopass",
            "%R~pg_cache:users:*",
            "+pgcache.read",
            "+pgcache.write",
            "+pgcache.invalidate",
        ],
    );

    // reader: users yes, products no; no WRITE command at all
    let mut c = as_user(&r, "reader");
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["id"], 1);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":1}"#)["id"],
        1,
        "a hit too"
    );
    noperm(
        read(
            &mut c,
            "products",
            r#"{"category":"electronics","product_id":1}"#,
        ),
        &["NOPERM", "pg_cache:products:"],
        "READ products as reader",
    );
    assert!(
        !exists(
            &mut admin,
            r#"pg_cache:products:{"category":"electronics","product_id":1}"#
        ),
        "nothing was cached for a refused read"
    );
    noperm(
        multiread(
            &mut c,
            "products",
            r#"[{"category":"electronics","product_id":1}]"#,
        ),
        &["NOPERM"],
        "MULTIREAD products as reader",
    );
    noperm(
        write(&mut c, "users", r#"{"id":1}"#, r#"{"id":1}"#),
        &["NOPERM", "pgcache.write"],
        "WRITE as reader",
    );

    // writer: writes and invalidates users only
    let mut c = as_user(&r, "writer");
    assert_eq!(
        write(&mut c, "users", r#"{"id":7}"#, r#"{"id":7,"name":"w"}"#).unwrap(),
        "OK"
    );
    assert_eq!(invalidate(&mut c, "users", r#"{"id":7}"#).unwrap(), "OK");
    noperm(
        write(
            &mut c,
            "products",
            r#"{"category":"x","product_id":1}"#,
            "{}",
        ),
        &["NOPERM", "pg_cache:products:"],
        "WRITE products as writer",
    );

    let n: i64 = redis::cmd("PGCACHE.INVALIDATE_TABLE")
        .arg("users")
        .query(&mut c)
        .unwrap();
    assert!(n >= 1, "writer flushes users: {n}");
    noperm(
        redis::cmd("PGCACHE.INVALIDATE_TABLE")
            .arg("products")
            .query::<i64>(&mut c),
        &["NOPERM", "pg_cache:products:*"],
        "INVALIDATE_TABLE products as writer",
    );

    // read-only key pattern: reads pass, writes and invalidations do not
    let mut c = as_user(&r, "readonly");
    assert_eq!(read_row(&mut c, "users", r#"{"id":2}"#)["id"], 2);
    noperm(
        write(&mut c, "users", r#"{"id":2}"#, r#"{"id":2}"#),
        &["NOPERM"],
        "WRITE with a read-only key pattern",
    );
    noperm(
        invalidate(&mut c, "users", r#"{"id":2}"#),
        &["NOPERM"],
        "INVALIDATE with a read-only key pattern",
    );
    assert!(
        exists(&mut admin, r#"pg_cache:users:{"id":2}"#),
        "the refused INVALIDATE dropped nothing"
    );

    // the default user is unrestricted
    assert_eq!(
        read_row(
            &mut admin,
            "products",
            r#"{"category":"electronics","product_id":1}"#
        )["product_id"],
        1
    );
}

/// The default user's rules are read on every hit: restricting its keys
/// refuses hits at once, and lifting the restriction allows them again.
#[test]
fn default_user_rule_changes_apply_to_hits_at_once() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let product = r#"{"category":"books","product_id":3}"#;
    for _ in 0..2 {
        assert_eq!(read_row(&mut c, "users", r#"{"id":3}"#)["id"], 3);
        assert_eq!(read_row(&mut c, "products", product)["product_id"], 3);
    }
    setuser(&mut c, &["default", "resetkeys", "~pg_cache:users:*"]);
    assert_eq!(
        read_row(&mut c, "users", r#"{"id":3}"#)["id"],
        3,
        "a hit the new pattern allows"
    );
    noperm(
        read(&mut c, "products", product),
        &["NOPERM", "pg_cache:products:"],
        "a hit the new pattern refuses",
    );
    // Another connection of the default user sees the same rules.
    noperm(
        read(&mut r.con(), "products", product),
        &["NOPERM"],
        "a hit on a new connection",
    );
    setuser(&mut c, &["default", "allkeys"]);
    assert_eq!(read_row(&mut c, "products", product)["product_id"], 3);
}
