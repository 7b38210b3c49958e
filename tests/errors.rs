//! Every bad input gets an `ERR` reply naming what is wrong (SPEC §9), and
//! hostile input leaves the server up and the database untouched.

mod common;

use common::*;
use redis::RedisResult;

fn cmd(c: &mut redis::Connection, args: &[&[u8]]) -> RedisResult<redis::Value> {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(c)
}

#[test]
fn bad_json() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for bad in [r#"{"id":"#, "id=1", "", r#"{"id":1}}"#, r#"{'id':1}"#] {
        let e = expect_err(read(&mut c, "users", bad), &format!("READ with pk {bad:?}"));
        assert_mentions(&e, &["json"], &format!("READ with pk {bad:?}"));
        let e = expect_err(invalidate(&mut c, "users", bad), "INVALIDATE bad JSON");
        assert_mentions(&e, &["json"], "INVALIDATE bad JSON");
        let e = expect_err(
            write(&mut c, "users", bad, r#"{"id":1}"#),
            "WRITE bad pk JSON",
        );
        assert_mentions(&e, &["json"], "WRITE bad pk JSON");
    }
    let e = expect_err(
        multiread(&mut c, "users", r#"[{"id":1},"#),
        "MULTIREAD bad JSON",
    );
    assert_mentions(&e, &["json"], "MULTIREAD bad JSON");
    let e = expect_err(
        write(&mut c, "users", r#"{"id":1}"#, r#"{"id":1"#),
        "WRITE bad data JSON",
    );
    assert_mentions(&e, &["json"], "WRITE bad data JSON");
}

#[test]
fn pk_must_be_exactly_the_primary_key() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for (table, pk, names) in [
        ("users", "{}", &["id"][..]),
        ("users", r#"{"user_id":1}"#, &["id"][..]),
        ("users", r#"{"id":1,"name":"x"}"#, &["id"][..]),
        ("users", "[1]", &["id"][..]),
        ("users", "1", &["id"][..]),
        ("users", r#"{"id":null}"#, &["id"][..]),
        ("users", r#"{"id":true}"#, &["id"][..]),
        ("users", r#"{"id":{"x":1}}"#, &["id"][..]),
        ("users", r#"{"id":"12abc"}"#, &["id"][..]),
        ("users", r#"{"id":1.5}"#, &["id"][..]),
        (
            "products",
            r#"{"category":"books"}"#,
            &["category", "product_id"][..],
        ),
        (
            "products",
            r#"{"product_id":1}"#,
            &["category", "product_id"][..],
        ),
        (
            "products",
            r#"{"category":"books","product_id":1,"price":2}"#,
            &["category", "product_id"][..],
        ),
        (
            "products",
            r#"{"category":"books","id":1}"#,
            &["category", "product_id"][..],
        ),
        (r#""MixedCase""#, r#"{"id":1}"#, &["Id"][..]),
    ] {
        let what = format!("READ {table} {pk}");
        let e = expect_err(read(&mut c, table, pk), &what);
        assert_mentions(&e, names, &what);
        let e = expect_err(
            invalidate(&mut c, table, pk),
            &format!("INVALIDATE {table} {pk}"),
        );
        assert_mentions(&e, names, &what);
        let e = expect_err(
            write(&mut c, table, pk, "{}"),
            &format!("WRITE {table} {pk}"),
        );
        assert_mentions(&e, names, &what);
        let e = expect_err(
            multiread(&mut c, table, &format!("[{pk}]")),
            &format!("MULTIREAD {table} [{pk}]"),
        );
        assert_mentions(&e, names, &what);
    }
    assert!(keys(&mut c, "*").is_empty(), "no entry for refused keys");
}

#[test]
fn integers_out_of_range_for_the_column() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for (table, pk) in [
        ("users", r#"{"id":2147483648}"#),
        ("users", r#"{"id":"-2147483649"}"#),
        ("users", r#"{"id":99999999999999999999999}"#),
        ("small_items", r#"{"id":32768}"#),
        ("small_items", r#"{"id":"-40000"}"#),
        ("big_items", r#"{"id":9223372036854775808}"#),
    ] {
        let e = expect_err(read(&mut c, table, pk), &format!("READ {table} {pk}"));
        assert_mentions(&e, &["id"], &format!("READ {table} {pk}"));
    }
    // the edges are fine
    assert_eq!(
        read_row(&mut c, "small_items", r#"{"id":32767}"#)["label"],
        "max"
    );
    assert_eq!(read(&mut c, "users", r#"{"id":2147483647}"#).unwrap(), None);
    assert_eq!(
        read(&mut c, "users", r#"{"id":-2147483648}"#).unwrap(),
        None
    );
}

#[test]
fn unknown_table_and_table_without_primary_key() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let e = expect_err(read(&mut c, "nosuchtable", r#"{"id":1}"#), "unknown table");
    assert_mentions(&e, &["nosuchtable"], "unknown table");
    let e = expect_err(
        read(&mut c, "nosuchschema.users", r#"{"id":1}"#),
        "unknown schema",
    );
    assert_mentions(&e, &["nosuchschema"], "unknown schema");
    let e = expect_err(
        multiread(&mut c, "nosuchtable", r#"[{"id":1}]"#),
        "MULTIREAD unknown table",
    );
    assert_mentions(&e, &["nosuchtable"], "MULTIREAD unknown table");
    let e = expect_err(
        write(&mut c, "nosuchtable", r#"{"id":1}"#, r#"{"id":1}"#),
        "WRITE unknown table",
    );
    assert_mentions(&e, &["nosuchtable"], "WRITE unknown table");
    let e = expect_err(
        invalidate(&mut c, "nosuchtable", r#"{"id":1}"#),
        "INVALIDATE unknown table",
    );
    assert_mentions(&e, &["nosuchtable"], "INVALIDATE unknown table");

    let e = expect_err(
        read(&mut c, "no_pk", r#"{"a":1}"#),
        "table without a primary key",
    );
    assert_mentions(&e, &["no_pk"], "table without a primary key");
    // a view has no primary key either
    pg.execute("CREATE VIEW users_view AS SELECT * FROM users");
    let e = expect_err(read(&mut c, "users_view", r#"{"id":1}"#), "a view");
    assert_mentions(&e, &["users_view"], "a view");
    assert!(keys(&mut c, "*").is_empty());
}

#[test]
fn tables_allowlist() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["tables", "users,products"]);
    let mut c = r.con();
    read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);
    pg.reset_stats();
    for (table, pk) in [
        ("app.accounts", r#"{"id":1}"#),
        ("docs", r#"{"id":1}"#),
        ("app.users", r#"{"id":1}"#),
    ] {
        let what = format!("READ {table} outside the allowlist");
        let e = expect_err(read(&mut c, table, pk), &what);
        let bare = table.rsplit('.').next().unwrap();
        assert_mentions(&e, &[bare], &what);
        expect_err(multiread(&mut c, table, &format!("[{pk}]")), &what);
    }
    assert_eq!(pg.queries_on("accounts"), 0, "{}", pg.statements());
    assert_eq!(pg.queries_on("docs"), 0, "{}", pg.statements());
    assert_eq!(keys(&mut c, "*").len(), 2);
}

#[test]
fn system_catalogs_are_refused() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for (table, pk, name) in [
        ("pg_catalog.pg_class", r#"{"oid":1259}"#, "pg_class"),
        ("pg_class", r#"{"oid":1259}"#, "pg_class"),
        ("pg_authid", r#"{"oid":10}"#, "pg_authid"),
        ("pg_catalog.pg_authid", r#"{"oid":10}"#, "pg_authid"),
        ("pg_catalog.pg_proc", r#"{"oid":1}"#, "pg_proc"),
        (
            "information_schema.sql_features",
            r#"{"feature_id":"B011"}"#,
            "sql_features",
        ),
        (
            "pg_toast.pg_toast_1255",
            r#"{"chunk_id":1,"chunk_seq":0}"#,
            "pg_toast",
        ),
    ] {
        let what = format!("READ {table}");
        let e = expect_err(read(&mut c, table, pk), &what);
        assert_mentions(&e, &[name], &what);
        expect_err(multiread(&mut c, table, &format!("[{pk}]")), &what);
        expect_err(write(&mut c, table, pk, "{}"), &format!("WRITE {table}"));
    }
    assert!(keys(&mut c, "*").is_empty(), "{:?}", keys(&mut c, "*"));
}

#[test]
fn bad_ttl() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    for ttl in ["-1", "abc", "1.5", "", "10s", "99999999999999999999999"] {
        let what = format!("READ with TTL {ttl:?}");
        let e = expect_err(read_ttl(&mut c, "users", r#"{"id":1}"#, ttl), &what);
        assert_mentions(&e, &["ttl"], &what);
        let e = expect_err(
            redis::cmd("PGCACHE.WRITE")
                .arg("users")
                .arg(r#"{"id":1}"#)
                .arg(r#"{"id":1}"#)
                .arg(ttl)
                .query::<String>(&mut c),
            &format!("WRITE with TTL {ttl:?}"),
        );
        assert_mentions(&e, &["ttl"], &what);
        let e = expect_err(
            redis::cmd("PGCACHE.MULTIREAD")
                .arg("users")
                .arg(r#"[{"id":1}]"#)
                .arg(ttl)
                .query::<String>(&mut c),
            &format!("MULTIREAD with TTL {ttl:?}"),
        );
        assert_mentions(&e, &["ttl"], &what);
    }
    assert_eq!(
        pg.queries_on("users"),
        0,
        "a bad TTL is refused before any query"
    );
    assert!(keys(&mut c, "*").is_empty());
}

#[test]
fn wrong_arity() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let id = br#"{"id":1}"#.as_slice();
    for args in [
        vec![b"PGCACHE.READ".as_slice()],
        vec![b"PGCACHE.READ", b"users"],
        vec![b"PGCACHE.READ", b"users", id, b"10", b"extra"],
        vec![b"PGCACHE.WRITE", b"users", id],
        vec![b"PGCACHE.WRITE", b"users", id, id, b"10", b"extra"],
        vec![b"PGCACHE.INVALIDATE", b"users"],
        vec![b"PGCACHE.INVALIDATE", b"users", id, b"extra"],
        vec![b"PGCACHE.MULTIREAD", b"users"],
        vec![b"PGCACHE.MULTIREAD", b"users", b"[]", b"10", b"extra"],
        vec![b"PGCACHE.STATS", b"extra"],
    ] {
        let what = format!(
            "{:?}",
            args.iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
        );
        let e = expect_err(cmd(&mut c, &args), &what);
        assert_mentions(&e, &["argument"], &what);
    }
}

#[test]
fn multiread_input_errors() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["max_batch", "3"]);
    let mut c = r.con();
    let e = expect_err(
        multiread(&mut c, "users", r#"{"id":1}"#),
        "MULTIREAD of an object",
    );
    assert_mentions(&e, &["array"], "MULTIREAD of an object");
    let e = expect_err(multiread(&mut c, "users", "[1,2]"), "MULTIREAD of numbers");
    assert_mentions(&e, &["id"], "MULTIREAD of numbers");
    let e = expect_err(
        multiread(&mut c, "users", r#"[{"id":1},{"uid":2}]"#),
        "MULTIREAD with one wrong pk",
    );
    assert_mentions(&e, &["id"], "MULTIREAD with one wrong pk");
    // at the limit: fine; over it: refused
    let ok = json(&multiread(&mut c, "users", r#"[{"id":1},{"id":2},{"id":3}]"#).unwrap());
    assert_eq!(ok.as_array().unwrap().len(), 3);
    pg.reset_stats();
    let e = expect_err(
        multiread(&mut c, "users", r#"[{"id":4},{"id":5},{"id":6},{"id":7}]"#),
        "MULTIREAD over max_batch",
    );
    assert_mentions(&e, &["batch"], "MULTIREAD over max_batch");
    assert_eq!(pg.queries_on("users"), 0);
    assert!(!exists(&mut c, r#"pg_cache:users:{"id":4}"#));
}

#[test]
fn write_data_must_be_a_json_object() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    for data in ["[1,2]", r#""text""#, "42", "null", "not json", ""] {
        let what = format!("WRITE data {data:?}");
        expect_err(write(&mut c, "users", r#"{"id":1}"#, data), &what);
    }
    assert!(keys(&mut c, "*").is_empty());
}

// ---------------------------------------------------------------------------
// hostile input

#[track_caller]
fn assert_still_up(r: &mut RedisServer, pg: &PgServer) {
    assert!(r.alive(), "redis-server went down");
    let mut c = r.con();
    assert!(ping(&mut c));
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM users").as_deref(),
        Some("1000"),
        "the users table must be intact"
    );
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM products")
            .as_deref(),
        Some("300")
    );
    // and the module still works
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["name"], "User 1");
}

#[test]
fn hostile_table_names() {
    let pg = PgServer::start_new();
    let mut r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let pk = br#"{"id":1}"#.as_slice();
    let names: Vec<Vec<u8>> = vec![
        b"users; DROP TABLE users".to_vec(),
        b"\"users; DROP TABLE users\"".to_vec(),
        b"users\"; DROP TABLE users; --".to_vec(),
        b"users'; DROP TABLE users; --".to_vec(),
        b"users --".to_vec(),
        b"users/*".to_vec(),
        b"\"users".to_vec(),
        b"users\"".to_vec(),
        b"'users'".to_vec(),
        b"users\0".to_vec(),
        b"us\0ers; DROP TABLE products".to_vec(),
        b"\0".to_vec(),
        b"".to_vec(),
        b"products) UNION SELECT * FROM pg_authid --".to_vec(),
        b"a.b.c.d".to_vec(),
        b"..".to_vec(),
        "ユーザー".as_bytes().to_vec(),
        vec![0xff, 0xfe, b'u'],
        vec![b'x'; 1 << 20],
    ];
    for name in &names {
        let shown = String::from_utf8_lossy(&name[..name.len().min(60)]).to_string();
        for command in [b"PGCACHE.READ".as_slice(), b"PGCACHE.INVALIDATE"] {
            expect_err(
                cmd(&mut c, &[command, name, pk]),
                &format!("table {shown:?}"),
            );
        }
        expect_err(
            cmd(&mut c, &[b"PGCACHE.WRITE", name, pk, pk]),
            &format!("WRITE table {shown:?}"),
        );
        expect_err(
            cmd(&mut c, &[b"PGCACHE.MULTIREAD", name, b"[{\"id\":1}]"]),
            &format!("MULTIREAD table {shown:?}"),
        );
    }
    // a quoted identifier that does name a table is fine
    assert_eq!(
        read_row(&mut c, "\"users\"", r#"{"id":2}"#)["name"],
        "User 2"
    );
    assert_still_up(&mut r, &pg);
}

#[test]
fn hostile_keys_and_values() {
    let pg = PgServer::start_new();
    let mut r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let mb = 1 << 20;

    // 1 MB keys
    let big_int = format!(r#"{{"id":"{}"}}"#, "9".repeat(mb));
    let e = expect_err(read(&mut c, "users", &big_int), "1 MB integer pk");
    assert_mentions(&e, &["id"], "1 MB integer pk");
    let big_num = format!(r#"{{"id":{}}}"#, "9".repeat(mb));
    expect_err(read(&mut c, "users", &big_num), "1 MB number pk");
    let big_text = format!(r#"{{"code":"{}"}}"#, "a".repeat(mb));
    match read(&mut c, "text_items", &big_text) {
        Ok(None) | Err(_) => {}
        Ok(Some(v)) => panic!("1 MB text key returned a row: {}", &v[..100.min(v.len())]),
    }
    let big_member = format!(r#"{{"{}":1}}"#, "k".repeat(mb));
    let e = expect_err(read(&mut c, "users", &big_member), "1 MB member name");
    assert_mentions(&e, &["id"], "1 MB member name");
    let big_array = format!("[{}]", vec![r#"{"id":1}"#; 100_000].join(","));
    expect_err(
        multiread(&mut c, "users", &big_array),
        "MULTIREAD of 100000 keys (max_batch 10000)",
    );

    // 100000-deep nesting
    let deep_arr = format!(
        r#"{{"id":{}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    expect_err(read(&mut c, "users", &deep_arr), "deeply nested pk");
    let deep_obj = format!("{}1{}", r#"{"id":"#.repeat(100_000), "}".repeat(100_000));
    expect_err(read(&mut c, "users", &deep_obj), "deeply nested pk object");
    expect_err(
        multiread(&mut c, "users", &deep_arr),
        "deeply nested MULTIREAD",
    );
    expect_err(
        multiread(
            &mut c,
            "users",
            &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        "deeply nested MULTIREAD array",
    );
    // deep data in WRITE: refused or stored, but never a crash
    let _ = write(&mut c, "users", r#"{"id":1}"#, &deep_obj);
    let _ = invalidate(&mut c, "users", r#"{"id":1}"#);

    // NUL bytes
    let e = expect_err(
        cmd(&mut c, &[b"PGCACHE.READ", b"users", b"{\"id\":1}\0"]),
        "NUL after the JSON",
    );
    assert_mentions(&e, &["json"], "NUL after the JSON");
    expect_err(
        cmd(&mut c, &[b"PGCACHE.READ", b"users", b"{\"id\":\"1\0\"}"]),
        "raw NUL in a JSON string",
    );
    let e = expect_err(
        read(&mut c, "users", r#"{"id":"1\u0000"}"#),
        "escaped NUL in an integer",
    );
    assert_mentions(&e, &["id"], "escaped NUL in an integer");
    match read(&mut c, "text_items", r#"{"code":"al\u0000pha"}"#) {
        Ok(None) | Err(_) => {}
        Ok(Some(v)) => panic!("NUL in a text key returned a row: {v}"),
    }
    expect_err(
        cmd(&mut c, &[b"PGCACHE.READ", b"users", b"{\"id\0\":1}"]),
        "NUL in a member name",
    );

    // SQL in values and member names travels as data
    assert_eq!(
        read(
            &mut c,
            "text_items",
            r#"{"code":"x'); DROP TABLE users; --"}"#
        )
        .unwrap(),
        None
    );
    assert_eq!(
        read(&mut c, "text_items", r#"{"code":"' OR '1'='1"}"#).unwrap(),
        None
    );
    let e = expect_err(
        read(&mut c, "users", r#"{"id\"; DROP TABLE users; --":1}"#),
        "SQL in a member name",
    );
    assert_mentions(&e, &["id"], "SQL in a member name");
    let e = expect_err(
        read(&mut c, "users", r#"{"id":"1; DROP TABLE users"}"#),
        "SQL in an integer",
    );
    assert_mentions(&e, &["id"], "SQL in an integer");
    // invalid UTF-8
    expect_err(
        cmd(
            &mut c,
            &[b"PGCACHE.READ", b"text_items", b"{\"code\":\"\xff\xfe\"}"],
        ),
        "invalid UTF-8 in the pk",
    );

    assert_still_up(&mut r, &pg);
}
