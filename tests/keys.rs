//! Cache-key canonicalisation (SPEC §3): every spelling of one primary key
//! names one entry, and the key is `<cache_prefix><table>:<canonical pk>`.

mod common;

use common::*;
use serde_json::json;

#[test]
fn integer_key_spellings_are_one_entry() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let expected = pg.row_json("users", "id = 123").unwrap();
    pg.reset_stats();
    for spelling in [
        r#"{"id":123}"#,
        r#"{ "id" : 123 }"#,
        r#"{"id":"123"}"#,
        r#"{"id":"000123"}"#,
        "{\n\t\"id\": 123\n}",
        r#"{"id":" 123 "}"#,
        r#"{"id":"+123"}"#,
    ] {
        assert_eq!(
            read_row(&mut c, "users", spelling),
            expected,
            "spelling {spelling:?}"
        );
    }
    assert_eq!(
        pg.queries_on("users"),
        1,
        "all spellings share one entry:\n{}",
        pg.statements()
    );
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        vec![r#"pg_cache:users:{"id":123}"#.to_string()]
    );
}

#[test]
fn composite_member_order_does_not_matter() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    let a = read_row(
        &mut c,
        "products",
        r#"{"category":"garden","product_id":12}"#,
    );
    let b = read_row(
        &mut c,
        "products",
        r#"{"product_id":"12","category":"garden"}"#,
    );
    let d = read_row(
        &mut c,
        "products",
        r#"{ "product_id" : 12 , "category" : "garden" }"#,
    );
    assert_eq!(a, b);
    assert_eq!(a, d);
    assert_eq!(pg.queries_on("products"), 1, "{}", pg.statements());
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        vec![r#"pg_cache:products:{"category":"garden","product_id":12}"#.to_string()]
    );
}

#[test]
fn uuid_keys_are_case_blind_and_lower_case() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let expected = pg
        .row_json("uuid_items", "id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'")
        .unwrap();
    pg.reset_stats();
    let upper = read_row(
        &mut c,
        "uuid_items",
        r#"{"id":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}"#,
    );
    let lower = read_row(
        &mut c,
        "uuid_items",
        r#"{"id":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}"#,
    );
    assert_eq!(upper, expected);
    assert_eq!(lower, expected);
    assert_eq!(pg.queries_on("uuid_items"), 1, "{}", pg.statements());
    assert_eq!(
        keys(&mut c, "pg_cache:*"),
        vec![r#"pg_cache:uuid_items:{"id":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}"#.to_string()]
    );
    assert_eq!(
        read(
            &mut c,
            "uuid_items",
            r#"{"id":"00000000-0000-0000-0000-000000000000"}"#
        )
        .unwrap(),
        None
    );
    let e = expect_err(
        read(&mut c, "uuid_items", r#"{"id":"not-a-uuid"}"#),
        "a malformed uuid",
    );
    assert_mentions(&e, &["id"], "malformed uuid");
}

#[test]
fn text_keys_keep_their_text() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    // "007" is text here: no integer normalisation
    assert_eq!(
        read_row(&mut c, "text_items", r#"{"code":"007"}"#)["label"],
        "leading zeros stay"
    );
    assert_eq!(read(&mut c, "text_items", r#"{"code":"7"}"#).unwrap(), None);
    // non-ASCII stays UTF-8 in the key; escapes are minimal
    let u = read_row(
        &mut c,
        "text_items",
        r#"{"code":"\u00dcn\u00efc\u00f6d\u00e9 \u2713"}"#,
    );
    assert_eq!(u["label"], "unicode");
    let q = read_row(
        &mut c,
        "text_items",
        r#"{"code":"with \"quotes\" and \\ backslash"}"#,
    );
    assert_eq!(q["label"], "quoted");
    let s = read_row(&mut c, "text_items", r#"{"code":"semi;colon -- comment"}"#);
    assert_eq!(s["label"], "sql-ish");
    let all = keys(&mut c, "pg_cache:text_items:*");
    for k in [
        r#"pg_cache:text_items:{"code":"007"}"#,
        "pg_cache:text_items:{\"code\":\"Ünïcödé ✓\"}",
        r#"pg_cache:text_items:{"code":"with \"quotes\" and \\ backslash"}"#,
        r#"pg_cache:text_items:{"code":"semi;colon -- comment"}"#,
    ] {
        assert!(
            all.contains(&k.to_string()),
            "missing key {k}; keys: {all:?}"
        );
    }
    // the UTF-8 spelling hits the entry the \u spelling created
    pg.reset_stats();
    read_row(&mut c, "text_items", "{\"code\":\"Ünïcödé ✓\"}");
    assert_eq!(pg.queries_on("text_items"), 0);
}

#[test]
fn cache_prefix_is_honoured() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["cache_prefix", "myapp:rows:"]);
    let mut c = r.con();
    read_row(&mut c, "users", r#"{"id":"42"}"#);
    read_row(&mut c, "app.accounts", r#"{"id":1}"#);
    write(&mut c, "users", r#"{"id":43}"#, r#"{"id":43}"#).unwrap();
    assert_eq!(
        keys(&mut c, "*"),
        vec![
            r#"myapp:rows:app.accounts:{"id":1}"#.to_string(),
            r#"myapp:rows:users:{"id":42}"#.to_string(),
            r#"myapp:rows:users:{"id":43}"#.to_string(),
        ]
    );
    invalidate(&mut c, "users", r#"{"id":42}"#).unwrap();
    assert!(!exists(&mut c, r#"myapp:rows:users:{"id":42}"#));
}

#[test]
fn keys_from_write_and_read_meet() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    pg.reset_stats();
    write(
        &mut c,
        "products",
        r#"{ "product_id": "0005", "category": "books" }"#,
        r#"{"category":"books","product_id":5,"name":"written"}"#,
    )
    .unwrap();
    let got = read_row(&mut c, "products", r#"{"category":"books","product_id":5}"#);
    assert_eq!(
        got,
        json!({"category":"books","product_id":5,"name":"written"})
    );
    let arr = json(
        &multiread(
            &mut c,
            "products",
            r#"[{"product_id":5,"category":"books"}]"#,
        )
        .unwrap(),
    );
    assert_eq!(arr[0], got);
    assert_eq!(pg.queries_on("products"), 0, "{}", pg.statements());
}
