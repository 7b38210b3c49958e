//! The client examples of `examples/` run as a user would run them: each is a
//! child process (python3 with redis-py from `.deps/python`, node with
//! node-redis from `examples/node/node_modules`, both installed by `make
//! deps`) pointed at a redis-server with pgcache and a PostgreSQL with the
//! demo schema of `make run` (`sql/demo.sql`, `users` watched by
//! `sql/pgcache.sql`'s triggers). Each must exit 0 and print what it saw; the
//! test checks the lines it expects (in order) and, where it can, the
//! server's side of what the example did. For the events examples the test
//! itself runs the UPDATE in PostgreSQL once the example says it waits for
//! one. Every child has a time limit: past it, it is killed and the test
//! fails with its output.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one example may run (they finish in about a second; each also
/// gives up by itself after `TIMEOUT_SECONDS` per wait).
const CHILD_LIMIT: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const RUN_MAKE_DEPS: &str =
    "run `make deps` (scripts/install-deps.sh installs the example clients)";

/// `.deps/python`, holding the redis-py that examples/python/requirements.txt pins.
fn python_deps() -> PathBuf {
    let req_path = repo().join("examples/python/requirements.txt");
    let req = std::fs::read_to_string(&req_path)
        .unwrap_or_else(|e| panic!("{}: {e}", req_path.display()));
    let version = req
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis=="))
        .unwrap_or_else(|| panic!("{} pins no redis==<version>", req_path.display()))
        .trim()
        .to_string();
    let dir = repo().join(".deps/python");
    let dist = dir.join(format!("redis-{version}.dist-info"));
    assert!(
        dist.is_dir(),
        "redis-py {version} (examples/python/requirements.txt) is not installed in {}: {RUN_MAKE_DEPS}",
        dir.display()
    );
    dir
}

/// `examples/node`, once its node_modules holds the node-redis that
/// package.json pins.
fn node_dir() -> PathBuf {
    let dir = repo().join("examples/node");
    let package: serde_json::Value = json(
        &std::fs::read_to_string(dir.join("package.json")).expect("examples/node/package.json"),
    );
    let pinned = package["dependencies"]["redis"]
        .as_str()
        .expect("examples/node/package.json depends on redis")
        .to_string();
    let installed = std::fs::read_to_string(dir.join("node_modules/redis/package.json"))
        .ok()
        .map(|text| json(&text)["version"].as_str().unwrap_or("").to_string());
    assert_eq!(
        installed.as_deref(),
        Some(pinned.as_str()),
        "node-redis {pinned} (examples/node/package.json) is not installed in {}/node_modules: {RUN_MAKE_DEPS}",
        dir.display()
    );
    dir
}

/// PostgreSQL with the demo schema and `users` watched, and Redis with the
/// module pointed at it (listener connected, entries trusted).
fn servers() -> (PgServer, RedisServer) {
    let demo = std::fs::read_to_string(repo().join("sql/demo.sql")).expect("sql/demo.sql");
    let pg = PgServer::start_with_schema(&demo);
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_watch('users')");
    let r = RedisServer::with_pg(&pg, &[]);
    (pg, r)
}

fn python(r_port: u16, script: &str) -> Command {
    let deps = python_deps();
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("examples/python").join(script))
        .current_dir(repo())
        .env("PYTHONPATH", deps)
        .env("PYTHONUNBUFFERED", "1");
    example_env(&mut cmd, r_port);
    cmd
}

fn node(r_port: u16, script: &str) -> Command {
    let dir = node_dir();
    let mut cmd = Command::new("node");
    cmd.arg(script).current_dir(dir);
    example_env(&mut cmd, r_port);
    cmd
}

fn example_env(cmd: &mut Command, r_port: u16) {
    cmd.env("REDIS_URL", format!("redis://127.0.0.1:{r_port}/0"))
        .env("TIMEOUT_SECONDS", "20")
        .env_remove("EVENTS_CHANNEL")
        .env_remove("WAIT_FOR_UPDATE");
}

/// A running example: its stdout line by line, both streams kept for a
/// failure message.
struct Example {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    out_reader: Option<JoinHandle<()>>,
}

impl Example {
    fn start(what: &str, mut cmd: Command) -> Example {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Example {
            what: what.to_string(),
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
            out_reader: Some(out_reader),
        }
    }

    /// Kill the child (if it still runs) and fail with everything it printed.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        panic!(
            "{}: {why}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            self.what,
            self.stdout.join("\n")
        );
    }

    fn drain(&mut self) {
        if let Some(h) = self.out_reader.take() {
            let _ = h.join();
        }
        while let Ok(line) = self.lines.try_recv() {
            self.stdout.push(line);
        }
    }

    /// Read stdout until a line contains `needle`; fail after `CHILD_LIMIT`
    /// or if the example ends first.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + CHILD_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no line with {needle:?} within {CHILD_LIMIT:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("ended without printing a line with {needle:?}"))
                }
            }
        }
    }

    /// Wait for the exit (killing it after `CHILD_LIMIT`); the exit status
    /// and all of stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + CHILD_LIMIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => self.fail(&format!("still running after {CHILD_LIMIT:?}: killed")),
                Err(e) => self.fail(&format!("wait: {e}")),
            }
        };
        self.drain();
        let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
        (status, self.stdout.join("\n"), stderr)
    }

    /// `finish`, which must be a success whose stdout has `expected` lines
    /// (each a part of a line), in this order; returns stdout.
    fn succeeds_with(self, expected: &[&str]) -> String {
        let what = self.what.clone();
        let (status, stdout, stderr) = self.finish();
        let report = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        assert!(status.success(), "{what} failed ({status})\n{report}");
        // Each expected part is looked for after the end of the one before
        // (two may share a line).
        let mut rest = stdout.as_str();
        for want in expected {
            match rest.find(want) {
                Some(at) => rest = &rest[at + want.len()..],
                None => panic!("{what}: no {want:?} (after what was expected before it)\n{report}"),
            }
        }
        stdout
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Python (redis-py)

#[test]
fn python_plain() {
    python_deps(); // before starting servers: fail fast without `make deps`
    let (_pg, r) = servers();
    Example::start("examples/python/plain.py", python(r.port(), "plain.py")).succeeds_with(&[
        "trust_state trusted",
        r#"INVALIDATE users {"id": 1} -> OK"#,
        r#"READ users {"id": 1} -> miss, fetched from PostgreSQL: {"id":1,"name":"Alice","#,
        r#"READ users {"id": 1} -> hit, from Redis: name 'Alice', entry TTL"#,
        r#"READ users {"id": 99} -> None (no such row)"#,
        "MULTIREAD users [1, 2, 99] -> ['Alice', 'Bob', None]",
        r#"WRITE users {"id": 6} -> OK; READ -> 'Frank' from the cache"#,
        r#"INVALIDATE users {"id": 6} -> OK; READ -> None"#,
        "READ nosuch -> ResponseError: unknown table 'nosuch'",
        r#"READ users {"id": "one"} -> ResponseError: invalid value for primary-key column 'id'"#,
        "STATS: hits +",
        "OK: plain.py done",
    ]);
    served_and_cleaned(&r);
}

#[test]
fn python_pipeline() {
    python_deps(); // before starting servers: fail fast without `make deps`
    let (_pg, r) = servers();
    Example::start("examples/python/pipeline.py", python(r.port(), "pipeline.py")).succeeds_with(
        &[
            "pipeline of 107 commands answered",
            "100 READs -> 100 rows: Alice x20, Bob x20, Carol x20, Dave x20, Erin x20",
            r#"READ users {"id": 99} -> None"#,
            "READ nosuch -> ResponseError: unknown table 'nosuch'",
            // one miss per distinct key (the rest of the pipeline waits for
            // it), the missing row, and hits
            "STATS: misses +6, hits +95,",
            "MULTI/EXEC: the hit is answered; the miss -> ResponseError: pgcache: cannot wait for PostgreSQL here",
            "OK: pipeline.py done",
        ],
    );
    let mut c = r.con();
    for id in 1..=5 {
        assert!(
            exists(&mut c, &user_key(id)),
            "users {id} cached by the pipeline"
        );
    }
}

#[test]
fn python_events() {
    events_example(
        "examples/python/events.py",
        |port| python(port, "events.py"),
        r#"{"id": 1}"#,
        "OK: events.py done",
    );
}

// ---------------------------------------------------------------------------
// Node.js (node-redis)

#[test]
fn node_plain() {
    node_dir(); // before starting servers: fail fast without `make deps`
    let (_pg, r) = servers();
    Example::start("examples/node/plain.mjs", node(r.port(), "plain.mjs")).succeeds_with(&[
        "trust_state trusted",
        r#"INVALIDATE users {"id":1} -> OK"#,
        r#"READ users {"id":1} -> miss, fetched from PostgreSQL: {"id":1,"name":"Alice","#,
        r#"READ users {"id":1} -> hit, from Redis: name 'Alice', entry TTL"#,
        r#"READ users {"id":99} -> null (no such row)"#,
        r#"MULTIREAD users [1, 2, 99] -> ["Alice","Bob",null]"#,
        r#"WRITE users {"id":6} -> OK; READ -> 'Frank' from the cache"#,
        r#"INVALIDATE users {"id":6} -> OK; READ -> null"#,
        "READ nosuch -> SimpleError: ERR unknown table 'nosuch'",
        "STATS: hits +",
        "OK: plain.mjs done",
    ]);
    served_and_cleaned(&r);
}

#[test]
fn node_pipeline() {
    node_dir(); // before starting servers: fail fast without `make deps`
    let (_pg, r) = servers();
    Example::start("examples/node/pipeline.mjs", node(r.port(), "pipeline.mjs")).succeeds_with(&[
        "Promise.all of 100 READs answered in",
        "Alice x20, Bob x20, Carol x20, Dave x20, Erin x20",
        "STATS: misses +5, hits +95,",
        "allSettled: users 1 -> a row, users 99 -> null, nosuch -> SimpleError: ERR unknown table 'nosuch'",
        "execAsPipeline: 5 READs and a MULTIREAD of 5 keys",
        "MULTI/EXEC: the hit is answered; the miss -> ERR pgcache: cannot wait for PostgreSQL here",
        "OK: pipeline.mjs done",
    ]);
}

#[test]
fn node_events() {
    events_example(
        "examples/node/events.mjs",
        |port| node(port, "events.mjs"),
        r#"{"id":1}"#,
        "OK: events.mjs done",
    );
}

// ---------------------------------------------------------------------------

/// After a plain example: users 1 is cached (what it read), users 6 (its
/// WRITE, then INVALIDATE) is not.
fn served_and_cleaned(r: &RedisServer) {
    let mut c = r.con();
    let alice = get(&mut c, &user_key(1)).expect("users 1 cached by the example");
    assert_eq!(json(&alice)["name"], "Alice", "{alice}");
    assert!(
        !exists(&mut c, &user_key(6)),
        "the example's WRITE of users 6 was invalidated"
    );
}

/// An events example: it subscribes and sees its own invalidate, miss and
/// hit; once it says it waits, the test UPDATEs users 1 in PostgreSQL and the
/// example must print the notification's invalidation and the new row.
fn events_example(what: &str, cmd: impl Fn(u16) -> Command, key: &str, done: &str) {
    cmd(0); // checks the client is installed before starting servers
    let (pg, r) = servers();
    let mut ex = Example::start(what, cmd(r.port()));
    ex.wait_for_line("subscribed to pg_cache_events");
    ex.wait_for_line("waiting up to");
    pg.execute("UPDATE users SET name = 'Alice A.' WHERE id = 1");
    ex.succeeds_with(&[
        &format!("event: cache_invalidate users {key} source=command"),
        &format!("event: cache_miss users {key}"),
        &format!("event: cache_hit users {key}"),
        &format!("event: cache_invalidate users {key} source=notify operation=UPDATE"),
        "the UPDATE in PostgreSQL dropped the entry",
        &format!("event: cache_miss users {key}"),
        "a miss again, the new row: name 'Alice A.'",
        done,
    ]);
}

/// The examples check what they see: against a Redis without pgcache they
/// fail, saying so.
#[test]
fn examples_fail_without_the_module() {
    let r = RedisServer::start_plain();
    let runs = [
        ("examples/python/plain.py", python(r.port(), "plain.py")),
        ("examples/python/events.py", python(r.port(), "events.py")),
        ("examples/node/pipeline.mjs", node(r.port(), "pipeline.mjs")),
    ];
    for (what, cmd) in runs {
        let (status, stdout, stderr) = Example::start(what, cmd).finish();
        assert!(
            !status.success() && stderr.contains("FAILED:") && stderr.contains("is the pgcache module loaded"),
            "{what} against a Redis without pgcache: {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
}
