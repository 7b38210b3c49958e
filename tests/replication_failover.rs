//! The replication source (SPEC §11) around its slot and across failovers:
//! a slot another consumer holds, a slot whose creation waits for open
//! transactions, a Redis replica promoted (it resumes from the marker its
//! primary replicated), a PostgreSQL standby promoted (a new timeline:
//! the gap rule), and PostgreSQL down when Redis starts.

mod common;

use common::*;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

fn slot_active(pg: &PgServer) -> Option<String> {
    pg.query_text("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'pgcache'")
}

#[track_caller]
fn wait_slot_released(pg: &PgServer) {
    wait_until("the slot is released", || match slot_active(pg) {
        Some(a) if a == "false" => Ok(()),
        other => Err(format!("active: {other:?}")),
    });
}

fn name_of(c: &mut redis::Connection, id: i64) -> Option<String> {
    read(c, "users", &format!(r#"{{"id":{id}}}"#))
        .unwrap()
        .map(|row| json(&row)["name"].as_str().unwrap_or("").to_owned())
}

#[track_caller]
fn assert_hit(c: &mut redis::Connection, id: i64, what: &str) {
    let before = stat_of(&stats(c), "hits");
    name_of(c, id);
    assert_eq!(stat_of(&stats(c), "hits"), before + 1, "{what}: a hit");
}

/// A child process killed when dropped (a failed test leaves none behind).
struct ChildGuard(Child);

impl ChildGuard {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `psql` session kept open on stdin: statements are sent one by one.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn open(pg: &PgServer) -> Session {
        let mut child = Command::new(pg_bindir().join("psql"))
            .arg(pg.conn_string())
            .args(["-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.take();
        Session { child, stdin }
    }

    fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("session open");
        writeln!(stdin, "{sql}").expect("write to psql");
        stdin.flush().unwrap();
    }

    /// Ends the session (psql exits at the end of its input) and checks
    /// it had no error.
    fn close(mut self) {
        use std::io::Read;
        self.stdin.take();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let status = self.child.wait().expect("wait for psql");
        assert!(status.success(), "psql failed: {err}");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another consumer (`pg_recvlogical`) streams from the slot: the module
/// says who holds it, serves nothing cached and caches nothing, retries,
/// and streams once the slot is free.
#[test]
fn a_slot_in_use_is_refused_then_taken_once_free() {
    let pg = replication_pg();
    pg.execute("SELECT pg_create_logical_replication_slot('pgcache', 'pgoutput')");
    let port = pg.port().to_string();
    let mut cmd = Command::new(pg_bindir().join("pg_recvlogical"));
    cmd.args(["-h", pg.host(), "-p", port.as_str(), "-U", "postgres"])
        .args(["-d", "pgcache_test", "--slot", "pgcache", "--start"])
        .args(["-o", "proto_version=1", "-o", "publication_names=pgcache"])
        .args(["-f", "/dev/null", "--no-loop"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut holder = ChildGuard(cmd.spawn().expect("pg_recvlogical"));
    wait_until("pg_recvlogical holds the slot", || match slot_active(&pg) {
        Some(a) if a == "true" => Ok(()),
        other => Err(format!("active: {other:?}")),
    });
    let r = RedisServer::start(&replication_module_args(&pg, &[]));
    let mut c = r.con();
    wait_until("the module says the slot is in use", || {
        let log = r.log();
        if log.contains("replication_slot 'pgcache' is in use by process") {
            Ok(())
        } else {
            Err(tail(&log, 10))
        }
    });
    let s = stats(&mut c);
    assert!(
        ["connecting", "disconnected"].contains(&stat_str(&s, "replication").as_str()),
        "{s}"
    );
    assert_eq!(stat_of(&s, "entries_trusted"), 0, "{s}");
    assert!(
        info_field(&mut c, "pgcache", "pgcache_listener_last_error").contains("in use by process"),
        "{}",
        info(&mut c, "pgcache")
    );
    // Served from PostgreSQL, not cached: a change now would not be seen.
    assert!(name_of(&mut c, 1).is_some());
    assert!(!exists(&mut c, &user_key(1)), "cached while not streaming");
    holder.stop();
    let s = wait_replication_streaming(&r);
    assert_eq!(
        stat_str(&s, "replication_last_gap_reason"),
        "no_marker",
        "{s}"
    );
    assert_eq!(
        r.log()
            .matches("replication_slot 'pgcache' is in use")
            .count(),
        1,
        "the refusal is logged once, not on every retry:\n{}",
        tail(&r.log(), 20)
    );
    name_of(&mut c, 1);
    assert!(exists(&mut c, &user_key(1)));
    pg.execute("UPDATE users SET name = 'after the holder left' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("after the holder left"));
}

/// Creating the slot waits for every transaction holding an xid to end:
/// meanwhile Redis answers, the state says `creating_slot`, and READ is
/// answered from PostgreSQL without caching. Once the open transaction
/// commits, the slot exists and invalidation works.
#[test]
fn slot_creation_waits_for_open_transactions_and_caches_nothing_meanwhile() {
    let pg = replication_pg();
    let mut open = Session::open(&pg);
    open.send("BEGIN;");
    open.send("UPDATE users SET name = 'held' WHERE id = 1;");
    wait_until("the open transaction holds an xid", || {
        match pg.query_text(
            "SELECT count(*)::text FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND state = 'idle in transaction'",
        ) {
            Some(n) if n == "1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let r = RedisServer::start(&replication_module_args(&pg, &[]));
    let mut c = r.con();
    wait_until("creating_slot", || {
        let s = stats(&mut c);
        if stat_str(&s, "replication") == "creating_slot" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    // Redis is not held up, and nothing is cached while the slot is made.
    std::thread::sleep(Duration::from_millis(500));
    assert!(ping(&mut c));
    let before = pg.query_text("SELECT name FROM users WHERE id = 1");
    assert_eq!(name_of(&mut c, 1), before, "the committed row");
    assert!(
        !exists(&mut c, &user_key(1)),
        "cached before the slot exists"
    );
    let s = stats(&mut c);
    assert_eq!(stat_str(&s, "replication"), "creating_slot", "{s}");
    assert_eq!(stat_of(&s, "entries_trusted"), 0, "{s}");
    open.send("COMMIT;");
    open.close();
    let s = wait_replication_streaming(&r);
    assert_eq!(
        stat_str(&s, "replication_last_gap_reason"),
        "slot_missing",
        "{s}"
    );
    assert!(r.log().contains("created replication slot 'pgcache'"));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("held"));
    assert!(exists(&mut c, &user_key(1)));
    pg.execute("UPDATE users SET name = 'streamed' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("streamed"));
}

/// A Redis replica does not stream; its primary's entries and marker reach
/// it. Promoted after the primary died, with changes committed meanwhile,
/// it resumes from the replicated marker: the changed entry is dropped, an
/// unchanged one is still a hit, nothing is flushed.
#[test]
fn a_promoted_redis_replica_resumes_from_the_replicated_marker() {
    let pg = replication_pg();
    let args = replication_module_args(&pg, &[]);
    let primary = RedisServer::start_with_server_args(&args, &["--repl-diskless-sync-delay", "0"]);
    wait_replication_streaming(&primary);
    let port = primary.port().to_string();
    let replica =
        RedisServer::start_with_server_args(&args, &["--replicaof", "127.0.0.1", port.as_str()]);
    let mut p = primary.con();
    let mut rc = replica.con();
    wait_until("the replica's link is up", || {
        let i = info(&mut rc, "replication");
        if i.contains("master_link_status:up") {
            Ok(())
        } else {
            Err(i)
        }
    });
    assert_eq!(
        stat_str(&stats(&mut rc), "replication"),
        "off",
        "a replica does not stream"
    );
    for id in [1, 2] {
        name_of(&mut p, id);
    }
    // Whatever marker the replica holds, every change after it is
    // replayed; every change before it was deleted (and the DEL replicated)
    // before the marker was written.
    let marker = wait_replication_marker(&primary);
    wait_until("the entries and the marker reach the replica", || {
        if exists(&mut rc, &user_key(1))
            && exists(&mut rc, &user_key(2))
            && get(&mut rc, "pg_cache:__replication").is_some()
        {
            Ok(())
        } else {
            Err(format!("{:?}", keys(&mut rc, "*")))
        }
    });
    // The primary dies with nothing more written; its slot is released.
    let _ = redis::cmd("SHUTDOWN").arg("NOSAVE").query::<()>(&mut p);
    drop(primary);
    wait_slot_released(&pg);
    assert!(
        get(&mut rc, "pg_cache:__replication").is_some(),
        "{marker:?}"
    );
    pg.execute("UPDATE users SET name = 'while no primary' WHERE id = 1");
    let _: String = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut rc)
        .unwrap();
    let s = wait_replication_streaming(&replica);
    assert_eq!(stat_of(&s, "replication_resumes"), 1, "{s}");
    assert_eq!(stat_of(&s, "replication_gap_flushes"), 0, "{s}");
    assert!(!exists(&mut rc, &user_key(1)), "the change was replayed");
    assert_hit(&mut rc, 2, "an unchanged entry after the promotion");
    assert_eq!(name_of(&mut rc, 1).as_deref(), Some("while no primary"));
    // And it streams: a change now drops its entry.
    pg.execute("UPDATE users SET name = 'after promotion' WHERE id = 2");
    wait_gone(&mut rc, &user_key(2));
}

/// A PostgreSQL standby promoted goes on on a new timeline: what the
/// marker says about the old one cannot be trusted there (nor is the slot
/// carried over in PostgreSQL 15), so it is a gap: everything cached is
/// dropped, and streaming goes on from the new primary.
#[test]
fn a_promoted_postgresql_standby_is_a_new_timeline_and_a_gap() {
    let mut pg = replication_pg();
    let standby = PgServer::standby_of(&pg);
    let r = RedisServer::start(&replication_module_args(&pg, &[]));
    wait_replication_streaming(&r);
    let mut c = r.con();
    for id in [1, 2] {
        name_of(&mut c, id);
    }
    let marker = wait_replication_marker(&r);
    assert_eq!(marker["timeline"], 1, "{marker}");
    // Everything committed on the primary has reached the standby.
    pg.execute("UPDATE users SET name = 'before failover' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    name_of(&mut c, 1);
    wait_until("the standby has replayed the UPDATE", || {
        match standby.query_text("SELECT name FROM users WHERE id = 1") {
            Some(n) if n == "before failover" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    pg.stop();
    standby.promote();
    // A slot of the same name on the new primary (as failover tooling may
    // make) must not be taken as the old one.
    standby.execute("SELECT pg_create_logical_replication_slot('pgcache', 'pgoutput')");
    standby.execute("UPDATE users SET name = 'on the new primary' WHERE id = 2");
    let before = stats(&mut c);
    config_set(&mut c, "pgcache.pg_port", &standby.port().to_string()).unwrap();
    wait_until("streaming from the new primary after a gap flush", || {
        let s = stats(&mut c);
        if stat_of(&s, "replication_gap_flushes") > stat_of(&before, "replication_gap_flushes")
            && stat_str(&s, "replication") == "streaming"
            && stat_of(&s, "entries_trusted") == 1
            && stat_of(&s, "gap_flush_running") == 0
        {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let s = stats(&mut c);
    assert_eq!(
        stat_str(&s, "replication_last_gap_reason"),
        "other_timeline",
        "{s}"
    );
    assert!(!exists(&mut c, &user_key(1)), "flushed");
    assert!(!exists(&mut c, &user_key(2)), "flushed");
    assert_eq!(name_of(&mut c, 2).as_deref(), Some("on the new primary"));
    wait_until("the marker names timeline 2", || {
        match get(&mut c, "pg_cache:__replication").map(|m| json(&m)) {
            Some(m) if m["timeline"] == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    standby.execute("UPDATE users SET name = 'streamed from timeline 2' WHERE id = 2");
    wait_gone(&mut c, &user_key(2));
    assert_eq!(
        name_of(&mut c, 2).as_deref(),
        Some("streamed from timeline 2")
    );
}

/// PostgreSQL down when Redis starts: a miss answers an error at once,
/// Redis goes on serving, the source retries; once PostgreSQL is up it
/// creates the slot and streams.
#[test]
fn postgresql_down_at_start_then_up() {
    let mut pg = replication_pg();
    pg.stop();
    let r = RedisServer::start(&replication_module_args(
        &pg,
        &["pg_connect_timeout_ms", "1000"],
    ));
    let mut c = r.con();
    expect_err(
        read(&mut c, "users", r#"{"id":1}"#),
        "a miss with PostgreSQL down",
    );
    assert!(ping(&mut c));
    wait_until("the source says it cannot start", || {
        let s = stats(&mut c);
        if stat_str(&s, "replication") == "disconnected" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert!(r.log().contains("replication cannot start"));
    pg.start();
    let s = wait_replication_streaming(&r);
    assert_eq!(
        stat_str(&s, "replication_last_gap_reason"),
        "slot_missing",
        "{s}"
    );
    name_of(&mut c, 1);
    assert!(exists(&mut c, &user_key(1)));
    pg.execute("UPDATE users SET name = 'up' WHERE id = 1");
    wait_gone(&mut c, &user_key(1));
    assert_eq!(name_of(&mut c, 1).as_deref(), Some("up"));
}
