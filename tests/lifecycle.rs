//! Lifecycle and run-time configuration: SHUTDOWN with fills in flight,
//! MODULE UNLOAD, and CONFIG SET of connection settings under load.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// SHUTDOWN while clients wait for fills: Redis exits at once, and every
/// waiting client gets an answer (the connection closes) instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_fills_in_flight_answers_every_client() {
    let pg = PgServer::start_new();
    let mut r = RedisServer::with_pg(&pg, &[]);
    let mut admin = r.async_con().await;
    let lock = pg.lock_table("users").await;
    let mut set = JoinSet::new();
    for id in 1..=8 {
        let mut con = r.async_con().await;
        set.spawn(async move { aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#)).await });
    }
    wait_for_stat(&mut admin, "fills_in_flight", 8).await;
    let started = Instant::now();
    let _ = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async::<()>(&mut admin)
        .await;
    let mut answered = 0;
    while let Some(done) = tokio::time::timeout(Duration::from_secs(20), set.join_next())
        .await
        .expect("a client blocked on a fill hung after SHUTDOWN")
    {
        let reply = done.unwrap();
        assert!(reply.is_err(), "no row can have come back: {reply:?}");
        answered += 1;
    }
    assert_eq!(answered, 8);
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.alive() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not exit after SHUTDOWN"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("exited {:?} after SHUTDOWN", started.elapsed());
    lock.release().await;
}

/// MODULE UNLOAD is refused (the background runtime runs the module's code)
/// and the module keeps working.
#[test]
fn module_unload_is_refused_cleanly() {
    let pg = PgServer::start_new();
    let r =
        RedisServer::start_with_server_args(&pg.module_args(), &["--enable-module-command", "yes"]);
    r.wait_until_ready();
    let mut c = r.con();
    let e = redis::cmd("MODULE")
        .arg("UNLOAD")
        .arg("pgcache")
        .query::<String>(&mut c)
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("unload"), "{e}");
    assert!(
        r.log().contains("MODULE UNLOAD is not supported"),
        "the log says why"
    );
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#)["id"], 1);
    let modules: redis::Value = redis::cmd("MODULE").arg("LIST").query(&mut c).unwrap();
    assert!(format!("{modules:?}").contains("pgcache"));
}

/// CONFIG SET of a connection setting rebuilds the pool: requests in flight
/// finish, later ones use the new settings, none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_set_connection_settings_under_load() {
    let pg = PgServer::start_new();
    let r = RedisServer::with_pg(&pg, &[]);
    let mut admin = r.async_con().await;
    let lock = pg.lock_table("users").await;
    let mut held = JoinSet::new();
    for id in 1..=4 {
        let mut con = r.async_con().await;
        held.spawn(async move { aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#)).await });
    }
    wait_for_stat(&mut admin, "fills_in_flight", 4).await;
    // A new pool (different size and timeout); the held fills stay on the old one.
    for (name, value) in [("pg_pool_size", "3"), ("pg_query_timeout_ms", "20000")] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(format!("pgcache.{name}"))
            .arg(value)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    lock.release().await;
    while let Some(done) = held.join_next().await {
        let row = done
            .unwrap()
            .expect("a fill in flight was dropped by the pool rebuild");
        assert!(row.is_some());
    }
    // The new pool serves, with its new size.
    let mut con = r.async_con().await;
    for id in 10..30 {
        assert!(aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#))
            .await
            .unwrap()
            .is_some());
    }
    let s = stats_async(&mut admin).await;
    assert_eq!(stat_of(&s, "pool_size"), 3, "{s}");
    // A bad connection setting is refused and changes nothing.
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("pgcache.pg_sslmode")
        .arg("verify-full")
        .query_async::<()>(&mut admin)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pg_sslrootcert"), "{e}");
    let mode: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("pgcache.pg_sslmode")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(mode[1], "prefer");
    assert!(aread(&mut con, "users", r#"{"id":31}"#)
        .await
        .unwrap()
        .is_some());
}
