//! PostgreSQL stopped, restarted and slow (SPEC §7, §9): misses get error
//! replies, hits keep working, the module recovers by itself, every request
//! gets a reply, and a slow PostgreSQL never stalls other clients.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Retry a READ until it succeeds (the module reconnecting); panics after
/// `HANG`. Returns the number of failed attempts.
fn until_read_works(c: &mut redis::Connection, pk: &str) -> usize {
    let deadline = Instant::now() + HANG;
    let mut failures = 0;
    loop {
        match read(c, "users", pk) {
            Ok(Some(_)) => return failures,
            Ok(None) => panic!("READ users {pk}: nil for an existing row"),
            Err(e) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "the module did not recover after PostgreSQL came back: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn postgres_down_then_back() {
    let mut pg = PgServer::start_new();
    let r = RedisServer::with_pg(
        &pg,
        &[
            "pg_connect_timeout_ms",
            "1000",
            "pg_query_timeout_ms",
            "3000",
        ],
    );
    let mut c = r.con();
    let cached = read_row(&mut c, "users", r#"{"id":1}"#);
    read_row(&mut c, "products", r#"{"category":"books","product_id":1}"#);

    pg.stop();
    // hits are still served
    assert_eq!(read_row(&mut c, "users", r#"{"id":1}"#), cached);
    // misses get an error reply, never a hang or a nil
    for id in [2, 3, 4] {
        let e = expect_err(
            read(&mut c, "users", &format!(r#"{{"id":{id}}}"#)),
            "a miss while PostgreSQL is down",
        );
        eprintln!("miss while down: {e}");
    }
    expect_err(
        multiread(&mut c, "users", r#"[{"id":1},{"id":5}]"#),
        "MULTIREAD with a miss while PostgreSQL is down",
    );
    // a table seen before is still known: WRITE and INVALIDATE work
    assert_eq!(
        write(&mut c, "users", r#"{"id":9}"#, r#"{"id":9}"#).unwrap(),
        "OK"
    );
    assert_eq!(invalidate(&mut c, "users", r#"{"id":9}"#).unwrap(), "OK");
    assert!(ping(&mut c));
    let s = r.stats();
    assert!(
        stat_of(&s, "pg_errors") + stat_of(&s, "timeouts") >= 3,
        "errors are counted: {s}"
    );
    assert!(!r.log().is_empty());

    // back on the same port: misses work again without restarting Redis
    pg.start();
    let failures = until_read_works(&mut c, r#"{"id":2}"#);
    eprintln!("failed attempts before recovery: {failures}");
    for id in 10..30 {
        let got = read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        assert_eq!(got, pg.row_json("users", &format!("id = {id}")).unwrap());
    }
    assert_eq!(
        read_row(
            &mut c,
            "products",
            r#"{"category":"garden","product_id":2}"#
        )["name"],
        "garden item 2"
    );
}

#[test]
fn postgres_unreachable_from_the_start() {
    // PostgreSQL is started only after Redis: the module must connect later.
    let port = free_port();
    let r = RedisServer::start(&[
        "pg_host",
        "127.0.0.1",
        "pg_port",
        &port.to_string(),
        "pg_database",
        DB_NAME,
        "pg_connect_timeout_ms",
        "1000",
    ]);
    let mut c = r.con();
    let e = expect_err(
        read(&mut c, "users", r#"{"id":1}"#),
        "miss with no PostgreSQL",
    );
    eprintln!("no PostgreSQL: {e}");
    assert!(ping(&mut c));
    drop(c);
    drop(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_every_request_gets_a_reply() {
    let mut pg = PgServer::start_new();
    let r = RedisServer::with_pg(
        &pg,
        &[
            "pg_connect_timeout_ms",
            "1000",
            "pg_query_timeout_ms",
            "3000",
        ],
    );
    const CLIENTS: usize = 16;
    let stop = Arc::new(AtomicBool::new(false));
    let oks = Arc::new(AtomicI64::new(0));
    let errs = Arc::new(AtomicI64::new(0));
    {
        let mut c = r.con();
        for id in 1..=CLIENTS {
            read_row(&mut c, "users", &format!(r#"{{"id":{id}}}"#));
        }
    }

    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let mut con = r.async_con().await;
        let (stop, oks, errs) = (stop.clone(), oks.clone(), errs.clone());
        set.spawn(async move {
            let (mut sent, mut replies, mut n) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                // alternately a cached row and a row that is never cached
                let pk = if n % 2 == 0 {
                    format!(r#"{{"id":{}}}"#, client + 1)
                } else {
                    format!(r#"{{"id":{}}}"#, 100_000 + n)
                };
                sent += 1;
                let res = tokio::time::timeout(
                    HANG,
                    redis::cmd("PGCACHE.READ")
                        .arg("users")
                        .arg(&pk)
                        .query_async::<Option<String>>(&mut con),
                )
                .await;
                match res {
                    Err(_) => return (sent, replies, format!("no reply to READ {pk}")),
                    Ok(Ok(v)) => {
                        replies += 1;
                        if n % 2 == 0 {
                            assert!(v.is_some(), "a cached row came back nil");
                        }
                        oks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Err(e)) => {
                        replies += 1;
                        assert_eq!(
                            e.kind(),
                            redis::ErrorKind::ResponseError,
                            "only ERR replies expected: {e}"
                        );
                        assert!(n % 2 == 1, "a hit failed while PostgreSQL was down: {e}");
                        errs.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            (sent, replies, String::new())
        });
    }

    let wait_until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + HANG;
        while !f() {
            assert!(Instant::now() < deadline, "waited too long for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let step = |what: &'static str, f: &mut dyn FnMut()| {
        eprintln!("{what}");
        tokio::task::block_in_place(f);
    };
    step("load running", &mut || {
        let o = oks.load(Ordering::SeqCst);
        wait_until("first replies", &|| oks.load(Ordering::SeqCst) > o + 100)
    });
    step("stop PostgreSQL", &mut || pg.stop());
    step("wait for errors", &mut || {
        wait_until("error replies while down", &|| {
            errs.load(Ordering::SeqCst) > 20
        })
    });
    step("start PostgreSQL", &mut || pg.start());
    // recovered: misses succeed again (every odd request is a miss)
    step("wait for recovery", &mut || {
        let e = errs.load(Ordering::SeqCst);
        let o = oks.load(Ordering::SeqCst);
        wait_until("successful misses after the restart", &|| {
            oks.load(Ordering::SeqCst) > o + 200 && errs.load(Ordering::SeqCst) == e && {
                std::thread::sleep(Duration::from_millis(200));
                errs.load(Ordering::SeqCst) == e
            }
        })
    });
    stop.store(true, Ordering::SeqCst);

    let (mut sent, mut replies) = (0, 0);
    while let Some(res) = set.join_next().await {
        let (s, rep, problem) = res.expect("client task");
        assert!(problem.is_empty(), "{problem}");
        sent += s;
        replies += rep;
    }
    eprintln!(
        "requests {sent}, replies {replies}, ok {}, errors {}",
        oks.load(Ordering::SeqCst),
        errs.load(Ordering::SeqCst)
    );
    assert_eq!(replies, sent, "every request gets a reply");
    let s = r.stats();
    assert_eq!(stat_of(&s, "fills_in_flight"), 0, "{s}");
    let mut c = r.con();
    assert!(ping(&mut c));
    assert_eq!(read_row(&mut c, "users", r#"{"id":500}"#)["id"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_postgres_does_not_stall_other_clients() {
    let pg = PgServer::start_new();
    let proxy = DelayProxy::start(pg.port());
    let mut args = proxy.module_args();
    args.extend(["pg_query_timeout_ms".to_string(), "30000".to_string()]);
    let r = RedisServer::start(&args);
    let mut admin = r.async_con().await;
    // at full speed, before the proxy slows PostgreSQL
    warm_up(&mut admin).await;

    proxy.set_delay_ms(300);
    const MISSES: usize = 20;
    let done = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for i in 0..MISSES {
        let mut con = r.async_con().await;
        let done = done.clone();
        set.spawn(async move {
            let id = 200 + i;
            let got = aread(&mut con, "users", &format!(r#"{{"id":{id}}}"#)).await;
            done.fetch_add(1, Ordering::SeqCst);
            (id, got)
        });
    }
    let s = wait_for_stat(&mut admin, "fills_in_flight", 1).await;
    let done_at_stats = done.load(Ordering::SeqCst);
    let mut other = r.async_con().await;
    let pong: String = redis::cmd("PING").query_async(&mut other).await.unwrap();
    let done_at_ping = done.load(Ordering::SeqCst);
    assert_eq!(pong, "PONG");
    // other commands on other connections are served while misses wait
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut other)
        .await
        .unwrap();
    eprintln!("stats while misses pend: {s}");
    assert_eq!(
        done_at_stats, 0,
        "STATS answered only after a miss finished: PostgreSQL I/O blocks Redis"
    );
    assert_eq!(
        done_at_ping, 0,
        "PING answered only after a miss finished: PostgreSQL I/O blocks Redis"
    );
    while let Some(res) = set.join_next().await {
        let (id, got) = res.unwrap();
        let got = got
            .unwrap_or_else(|e| panic!("slow miss {id}: {e}"))
            .unwrap();
        assert_eq!(
            json(&got),
            pg.row_json("users", &format!("id = {id}")).unwrap()
        );
    }
    assert_eq!(done.load(Ordering::SeqCst), MISSES);
}

#[test]
fn query_timeout_answers_with_an_error() {
    let pg = PgServer::start_new();
    let proxy = DelayProxy::start(pg.port());
    let mut args = proxy.module_args();
    args.extend(["pg_query_timeout_ms".to_string(), "300".to_string()]);
    let r = RedisServer::start(&args);
    let mut c = r.con();
    assert_eq!(read(&mut c, "users", r#"{"id":999999}"#).unwrap(), None);
    let before = r.stats();

    proxy.set_delay_ms(2000);
    let e = expect_err(
        read(&mut c, "users", r#"{"id":42}"#),
        "a fill slower than pg_query_timeout_ms",
    );
    let lower = e.to_lowercase();
    assert!(
        lower.contains("timeout") || lower.contains("timed out"),
        "the error should say it timed out: {e}"
    );
    assert!(!exists(&mut c, r#"pg_cache:users:{"id":42}"#));
    let after = r.stats();
    assert!(
        stat_of(&after, "timeouts") > stat_of(&before, "timeouts"),
        "timeouts counter: {after}"
    );

    // PostgreSQL fast again (and the delayed bytes drained): reads work
    proxy.set_delay_ms(0);
    std::thread::sleep(Duration::from_millis(2500));
    let got = read_row(&mut c, "users", r#"{"id":42}"#);
    assert_eq!(got, pg.row_json("users", "id = 42").unwrap());
    let got = read_row(&mut c, "users", r#"{"id":43}"#);
    assert_eq!(got, pg.row_json("users", "id = 43").unwrap());
}
