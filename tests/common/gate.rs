//! The gate: a fill's query held inside PostgreSQL's executor after its
//! snapshot was taken, so the row it will return is already decided while
//! the test changes the row (or invalidates the key, or drops the listener).
//!
//! The module connects as the non-superuser role `cacher` and `users` has a
//! row-level-security policy `USING (gate())`, where `gate()` takes and
//! releases a shared advisory lock: while the test holds that lock
//! exclusively (`Gate::close`), every fill of `users` waits in `gate()`,
//! snapshot taken.

use super::{
    pgcache_sql, query_texts_on, wait_listener_ready, wait_until, PgServer, RedisServer,
    HARNESS_MARK,
};

/// The module's role in the gated tests: not a superuser, so that RLS
/// applies; not `app`, since a role named like the `app` schema would put
/// `app.users` first on its search path.
pub const GATED_ROLE: &str = "cacher";

/// `sql/pgcache.sql`, `users` and `also_watched` watched, the role `cacher`
/// (allowed to read them), and the gate on `users`.
pub fn gated_setup(also_watched: &[&str]) -> String {
    let watched: Vec<&str> = std::iter::once("users")
        .chain(also_watched.iter().copied())
        .collect();
    let watch: String = watched
        .iter()
        .map(|t| format!("SELECT pgcache_watch('{t}');\n"))
        .collect();
    format!(
        r#"
{sql}
{watch}CREATE ROLE {GATED_ROLE} LOGIN;
GRANT SELECT ON {tables} TO {GATED_ROLE};
CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_lock_shared(42);
    PERFORM pg_advisory_unlock_shared(42);
    RETURN true;
END
$$;
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY gated ON users FOR SELECT USING (gate());
"#,
        sql = pgcache_sql(),
        tables = watched.join(", "),
    )
}

/// A PostgreSQL with the gate (see `gated_setup`), a module connected to it
/// as `cacher` with its listener ready, and the gate, open. Nothing is read
/// yet: the module's catalog is empty and no database has an entry.
pub async fn start_gated(also_watched: &[&str]) -> (PgServer, RedisServer, Gate) {
    let pg = PgServer::start_new();
    pg.execute(&gated_setup(also_watched));
    let r = RedisServer::start(&pg.module_args_as(GATED_ROLE));
    wait_listener_ready(&r);
    let gate = Gate::new(&pg).await;
    (pg, r, gate)
}

/// The session that holds advisory lock 42 exclusively while the gate is
/// closed.
pub struct Gate {
    locker: tokio_postgres::Client,
    /// The test database, where the sessions waiting in the gate are seen.
    conn: String,
}

impl Gate {
    /// Open; the session's connection task runs on the caller's runtime.
    pub async fn new(pg: &PgServer) -> Gate {
        Gate {
            locker: pg.client().await,
            conn: pg.conn_string(),
        }
    }

    pub async fn close(&self) {
        self.locker
            .batch_execute(&format!("{HARNESS_MARK} SELECT pg_advisory_lock(42)"))
            .await
            .unwrap();
    }

    pub async fn open(&self) {
        self.locker
            .batch_execute(&format!("{HARNESS_MARK} SELECT pg_advisory_unlock(42)"))
            .await
            .unwrap();
    }

    /// How many sessions wait for an advisory lock: fills held in the gate.
    pub fn waiting(&self) -> i64 {
        query_texts_on(
            &self.conn,
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .into_iter()
        .next()
        .flatten()
        .unwrap()
        .parse()
        .unwrap()
    }

    /// Wait until a fill waits in the gate (`what`: which fill).
    #[track_caller]
    pub fn wait_held(&self, what: &str) {
        wait_until(what, || match self.waiting() {
            0 => Err("no session waits on the advisory lock".into()),
            _ => Ok(()),
        });
    }
}
