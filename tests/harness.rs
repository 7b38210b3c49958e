//! Checks of the test harness itself (no module needed): the private
//! PostgreSQL, the query counter, restart on the same port, the delaying
//! proxy, a plain redis-server, and which server (Redis or Valkey) runs.

mod common;

use common::*;
use std::time::Instant;

#[test]
fn private_postgres_counts_queries_and_restarts_on_same_port() {
    let mut pg = PgServer::start_new();
    assert_ne!(pg.port(), 5432);
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM users").as_deref(),
        Some("1000")
    );
    let row = pg.row_json("users", "id = 7").unwrap();
    assert_eq!(row["name"], "User 7");

    pg.reset_stats();
    assert_eq!(pg.queries_on("users"), 0, "harness queries must not count");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = pg.client().await;
        for i in 1..=3 {
            c.query("SELECT name FROM users WHERE id = $1", &[&i])
                .await
                .unwrap();
        }
        c.query("SELECT name FROM products LIMIT 1", &[])
            .await
            .unwrap();
    });
    assert_eq!(pg.queries_on("users"), 3, "{}", pg.statements());
    assert_eq!(pg.queries_on("products"), 1);

    let port = pg.port();
    pg.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.start();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM products")
            .as_deref(),
        Some("300")
    );
}

#[test]
fn delaying_proxy_forwards_and_delays() {
    let pg = PgServer::start_new();
    let proxy = DelayProxy::start(pg.port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cs = format!(
            "host=127.0.0.1 port={} user=postgres dbname={DB_NAME}",
            proxy.port()
        );
        let (c, conn) = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = c
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, i64>(0), 1000);
        proxy.set_delay_ms(300);
        let t = Instant::now();
        c.query_one("SELECT 1", &[]).await.unwrap();
        // Not a performance assertion: checks the proxy really delays.
        assert!(t.elapsed().as_millis() >= 300);
    });
}

#[test]
fn plain_redis_server_starts_on_a_free_port() {
    let r = RedisServer::start_plain();
    assert_ne!(r.port(), 6379);
    let mut c = r.con();
    assert!(ping(&mut c));
}

/// `PGCACHE_SERVER` picks the server the whole suite runs on: Valkey's INFO
/// has `server_name:valkey` and a `valkey_version`, Redis's has neither.
#[test]
fn the_server_under_test_is_the_one_asked_for() {
    let r = RedisServer::start_plain();
    let mut c = r.con();
    let server = info(&mut c, "server");
    match server_kind() {
        ServerKind::Valkey => {
            assert!(server.contains("server_name:valkey"), "{server}");
            assert!(server.contains("valkey_version:8."), "{server}");
        }
        ServerKind::Redis => {
            assert!(!server.contains("valkey"), "{server}");
            assert!(server.contains("redis_version:"), "{server}");
        }
    }
}
