//! Module arguments (SPEC §1): the seed's load line, refused loads naming
//! the bad argument, configs, and the password never shown.

mod common;

use common::*;

#[test]
fn seed_load_line_works() {
    let pg = PgServer::start_new();
    // The seed's line, unchanged, plus where our PostgreSQL listens.
    let r = RedisServer::start(&[
        "pg_host",
        "localhost",
        "pg_database",
        DB_NAME,
        "pg_user",
        "postgres",
        "pg_password",
        "secret",
        "default_ttl",
        "3600",
        "cache_prefix",
        "pg_cache:",
        "pg_port",
        &pg.port().to_string(),
    ]);
    let mut c = r.con();
    let row = read_row(&mut c, "users", r#"{"id": 123}"#);
    assert_eq!(row, pg.row_json("users", "id = 123").unwrap());
    assert!(exists(&mut c, r#"pg_cache:users:{"id":123}"#));
    let row = read_row(
        &mut c,
        "products",
        r#"{"category": "electronics", "product_id": 45}"#,
    );
    assert_eq!(row["name"], "electronics item 45");
}

#[test]
fn module_loads_with_defaults_and_no_postgres() {
    // No arguments at all: defaults (localhost:5432 may or may not have a
    // PostgreSQL) must not stop the module loading.
    let r = RedisServer::start::<&str>(&[
        "pg_port",
        &free_port().to_string(),
        "pg_connect_timeout_ms",
        "500",
    ]);
    let mut c = r.con();
    assert!(ping(&mut c));
    // a miss with PostgreSQL unreachable is an error reply, not a hang
    expect_err(
        read(&mut c, "users", r#"{"id":1}"#),
        "miss without PostgreSQL",
    );
}

#[test]
fn bad_arguments_refuse_the_load_naming_the_argument() {
    let port = free_port().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["no_such_arg", "1"], "no_such_arg"),
        (
            vec!["pg_host", "localhost", "bogus_name", "x"],
            "bogus_name",
        ),
        (vec!["pg_port", &port, "default_ttl"], "default_ttl"),
        (vec!["pg_host"], "pg_host"),
        (vec!["pg_port", "abc"], "pg_port"),
        (vec!["pg_port", "70000"], "pg_port"),
        (vec!["pg_port", "-1"], "pg_port"),
        (vec!["default_ttl", "-5"], "default_ttl"),
        (vec!["default_ttl", "ten"], "default_ttl"),
        (vec!["negative_ttl", "-1"], "negative_ttl"),
        (vec!["pg_sslmode", "bogus"], "pg_sslmode"),
        (vec!["events", "cache_bogus"], "events"),
        (vec!["events", "cache_hit,nonsense"], "events"),
        (vec!["max_batch", "many"], "max_batch"),
        (vec!["pg_pool_size", "x"], "pg_pool_size"),
        (vec!["pg_query_timeout_ms", "soon"], "pg_query_timeout_ms"),
        (vec!["pg_connect_timeout_ms", "-3"], "pg_connect_timeout_ms"),
        (vec!["pg_url", "not-a-url"], "pg_url"),
        (
            vec!["pg_password_file", "/nonexistent/pgcache/password"],
            "pg_password_file",
        ),
    ];
    for (args, name) in cases {
        let log = RedisServer::start_expect_refused(&args);
        let module_lines: Vec<&str> = log.lines().filter(|l| l.contains(name)).collect();
        assert!(
            !module_lines.is_empty(),
            "load with {args:?} was refused, but the log does not name {name:?}:\n{log}"
        );
    }
}

#[test]
fn configs_reflect_arguments() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(
        &pg,
        &[
            "default_ttl",
            "120",
            "cache_prefix",
            "pfx:",
            "max_batch",
            "55",
            "events",
            "none",
            "tables",
            "users,products",
            "negative_ttl",
            "7",
        ],
    );
    let mut c = r.con();
    assert_eq!(config_value(&mut c, "pgcache.default_ttl"), "120");
    assert_eq!(config_value(&mut c, "pgcache.cache_prefix"), "pfx:");
    assert_eq!(config_value(&mut c, "pgcache.max_batch"), "55");
    assert_eq!(config_value(&mut c, "pgcache.events"), "none");
    assert_eq!(config_value(&mut c, "pgcache.tables"), "users,products");
    assert_eq!(config_value(&mut c, "pgcache.negative_ttl"), "7");
    assert_eq!(
        config_value(&mut c, "pgcache.pg_port"),
        pg.port().to_string()
    );
    assert_eq!(config_value(&mut c, "pgcache.pg_database"), DB_NAME);
    // defaults
    assert_eq!(
        config_value(&mut c, "pgcache.events_channel"),
        "pg_cache_events"
    );
    assert_eq!(config_value(&mut c, "pgcache.pg_pool_size"), "8");
    assert_eq!(config_value(&mut c, "pgcache.pg_query_timeout_ms"), "5000");
    assert_eq!(
        config_value(&mut c, "pgcache.pg_connect_timeout_ms"),
        "5000"
    );
    assert_eq!(
        config_value(&mut c, "pgcache.invalidation_channel"),
        "cache_invalidation"
    );
    assert_eq!(config_value(&mut c, "pgcache.pg_sslmode"), "prefer");
    let all = config_get(&mut c, "pgcache.*");
    for name in [
        "pg_host",
        "pg_port",
        "pg_database",
        "pg_user",
        "pg_password",
        "default_ttl",
        "negative_ttl",
        "cache_prefix",
        "events",
        "events_channel",
        "tables",
        "max_batch",
        "pg_pool_size",
        "pg_query_timeout_ms",
        "pg_connect_timeout_ms",
    ] {
        assert!(
            all.iter().any(|(k, _)| k == &format!("pgcache.{name}")),
            "CONFIG GET pgcache.* lacks {name}: {all:?}"
        );
    }
}

#[test]
fn config_set_default_ttl_applies_to_the_next_fill() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &["default_ttl", "3600"]);
    let mut c = r.con();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("pgcache.default_ttl")
        .arg("77")
        .query(&mut c)
        .unwrap();
    assert_eq!(config_value(&mut c, "pgcache.default_ttl"), "77");
    read_row(&mut c, "users", r#"{"id":1}"#);
    let t = ttl(&mut c, r#"pg_cache:users:{"id":1}"#);
    assert!(
        t > 50 && t <= 77,
        "TTL after CONFIG SET default_ttl 77: {t}"
    );
    // an invalid value is refused and names the config
    let e = expect_err(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("pgcache.default_ttl")
            .arg("-4")
            .query::<()>(&mut c),
        "CONFIG SET default_ttl -4",
    );
    assert_mentions(&e, &["default_ttl"], "CONFIG SET default_ttl -4");
    assert_eq!(config_value(&mut c, "pgcache.default_ttl"), "77");
}

#[test]
fn password_is_never_shown() {
    let pg = PgServer::start_new();
    let secret = "S3cr3t-Pa55-xyzzy";
    let r = RedisServer::with_pg(&pg, &["pg_password", secret]);
    let mut c = r.con();
    read_row(&mut c, "users", r#"{"id":1}"#);
    let v = config_value(&mut c, "pgcache.pg_password");
    assert!(
        !v.contains(secret),
        "CONFIG GET pgcache.pg_password shows it: {v:?}"
    );
    let all = config_get(&mut c, "*");
    assert!(
        !all.iter().any(|(_, v)| v.contains(secret)),
        "CONFIG GET * shows the password"
    );
    let info: String = redis::cmd("INFO").arg("everything").query(&mut c).unwrap();
    assert!(!info.contains(secret), "INFO shows the password");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("loglevel")
        .arg("debug")
        .query(&mut c)
        .unwrap();
    read_row(&mut c, "users", r#"{"id":2}"#);
    assert!(!r.log().contains(secret), "the log shows the password");
}

#[test]
fn password_file_keeps_it_out_of_module_list() {
    let pg = PgServer::start_new();
    let secret = "FileSecret-42-plugh";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, format!("{secret}\nsecond line ignored\n")).unwrap();
    let r = RedisServer::with_pg(&pg, &["pg_password_file", file.to_str().unwrap()]);
    let mut c = r.con();
    assert_eq!(read_row(&mut c, "users", r#"{"id":3}"#)["name"], "User 3");
    let list: redis::Value = redis::cmd("MODULE").arg("LIST").query(&mut c).unwrap();
    assert!(
        !format!("{list:?}").contains(secret),
        "MODULE LIST shows the password"
    );
    let v = config_value(&mut c, "pgcache.pg_password");
    assert!(!v.contains(secret));
}

#[test]
fn pg_url_overrides_the_separate_settings() {
    let pg = PgServer::start_new();
    let url = format!("postgresql://postgres@127.0.0.1:{}/{}", pg.port(), DB_NAME);
    let r = RedisServer::start(&[
        "pg_host",
        "nonexistent.invalid",
        "pg_port",
        "1",
        "pg_database",
        "nope",
        "pg_url",
        &url,
    ]);
    let mut c = r.con();
    assert_eq!(read_row(&mut c, "users", r#"{"id":4}"#)["name"], "User 4");
}

#[test]
fn sslmode_disable_and_require() {
    let pg = PgServer::start_new(); // no TLS configured on this server
    let r = RedisServer::with_pg(&pg, &["pg_sslmode", "disable"]);
    let mut c = r.con();
    assert_eq!(read_row(&mut c, "users", r#"{"id":4}"#)["name"], "User 4");
    let r = RedisServer::with_pg(&pg, &["pg_sslmode", "prefer"]);
    let mut c = r.con();
    assert_eq!(read_row(&mut c, "users", r#"{"id":4}"#)["name"], "User 4");
    // require never falls back to plain text
    let r = RedisServer::with_pg(
        &pg,
        &["pg_sslmode", "require", "pg_connect_timeout_ms", "2000"],
    );
    let mut c = r.con();
    expect_err(
        read(&mut c, "users", r#"{"id":4}"#),
        "sslmode require against a non-TLS server",
    );
}
