//! pgcache's PostgreSQL layer: the fill pool, catalog lookups and fills.
//!
//! No Redis here. Every operation is bounded by the query timeout; SQL text
//! comes from `pgcache_core::sql` (catalog names, quoted) and every value is
//! a bind parameter.

mod catalog;
mod config;
pub mod control;
mod error;
pub mod listener;
pub mod replication;
pub mod tls;

pub use config::{config_and_tls, connect_config};
pub use error::PgError;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use pgcache_core::{canonical_pk, json_array, Settings, TableSchema};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Counters kept by the PostgreSQL layer (relaxed atomics: cheap, approximate
/// ordering is fine for statistics).
#[derive(Default, Debug)]
pub struct PgStats {
    pub queries: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
}

/// The pool and its settings; `reconfigure` swaps in a new pool.
pub struct Pg {
    pool: RwLock<Pool>,
    /// Catalog lookups share the pool with fills; at most half of it
    /// (at least one connection) looks tables up at once, so lookups of
    /// new table spellings never take every connection from fills.
    lookup_slots: RwLock<Arc<tokio::sync::Semaphore>>,
    query_timeout_ms: AtomicU64,
    pub stats: PgStats,
}

fn lookup_slots(settings: &Settings) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(
        (settings.pg_pool_size / 2).max(1),
    ))
}

/// Takes a connection out of the pool on drop unless `keep` was called: a
/// connection abandoned mid-query (timeout, error) is not handed to the next
/// fill, which would queue behind the abandoned query.
struct Conn(Option<Object>);

impl Conn {
    fn client(&self) -> &Object {
        self.0.as_ref().expect("connection present until dropped")
    }
    fn keep(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            drop(Object::take(obj));
        }
    }
}

fn build_pool(settings: &Settings) -> Result<Pool, PgError> {
    let (cfg, tls) = config::config_and_tls(settings)?;
    let manager = Manager::from_config(
        cfg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pg_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_millis(settings.pg_query_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(settings.pg_connect_timeout_ms)))
        .recycle_timeout(Some(Duration::from_millis(settings.pg_connect_timeout_ms)))
        .build()
        .map_err(|e| PgError::Config(e.to_string()))
}

impl Pg {
    /// Builds the pool; no connection is opened until the first fill.
    pub fn new(settings: &Settings) -> Result<Pg, PgError> {
        Ok(Pg {
            pool: RwLock::new(build_pool(settings)?),
            lookup_slots: RwLock::new(lookup_slots(settings)),
            query_timeout_ms: AtomicU64::new(settings.pg_query_timeout_ms),
            stats: PgStats::default(),
        })
    }

    /// Applies new connection settings: fills already running finish on the
    /// old pool, new fills use the new one.
    pub fn reconfigure(&self, settings: &Settings) -> Result<(), PgError> {
        let pool = build_pool(settings)?;
        self.query_timeout_ms
            .store(settings.pg_query_timeout_ms, Ordering::Relaxed);
        let old = std::mem::replace(
            &mut *self.pool.write().unwrap_or_else(|e| e.into_inner()),
            pool,
        );
        old.close();
        *self.lookup_slots.write().unwrap_or_else(|e| e.into_inner()) = lookup_slots(settings);
        Ok(())
    }

    fn pool(&self) -> Pool {
        self.pool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (max size, connections open, connections in use)
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let s = self.pool().status();
        (s.max_size, s.size, s.size.saturating_sub(s.available))
    }

    /// Whether a new query could have a connection at once (an idle one,
    /// or room to open one).
    pub fn has_free_connection(&self) -> bool {
        let s = self.pool().status();
        s.available > 0 || s.size < s.max_size
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms.load(Ordering::Relaxed))
    }

    /// A pooled connection, waited for under the query timeout.
    async fn connection(&self, timeout: Duration) -> Result<Conn, PgError> {
        match tokio::time::timeout(timeout, self.pool().get()).await {
            Ok(Ok(obj)) => Ok(Conn(Some(obj))),
            Ok(Err(e)) => Err(PgError::from_pool(e, timeout)),
            Err(_) => Err(PgError::Timeout(timeout.as_millis() as u64)),
        }
    }

    /// Runs `op` on `conn` under the query timeout; the connection goes back
    /// to the pool only if it is known to be idle and healthy.
    async fn run_on<T, F, Fut>(&self, conn: Conn, timeout: Duration, op: F) -> Result<T, PgError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = (Conn, Result<T, PgError>)>,
    {
        let work = async {
            let (conn, result) = op(conn).await;
            match &result {
                Ok(_) => conn.keep(),
                Err(e) if e.is_answer() => conn.keep(),
                Err(_) => drop(conn),
            }
            result
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(timeout.as_millis() as u64)),
        }
    }

    fn count<T>(&self, result: &Result<T, PgError>) {
        match result {
            Ok(_) => {}
            Err(PgError::Timeout(_) | PgError::Canceled(_)) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_answer() => {}
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Runs `op` on a pooled connection: waiting for it and running `op` are
    /// each bounded by the query timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, PgError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = (Conn, Result<T, PgError>)>,
    {
        let timeout = self.timeout();
        let result = match self.connection(timeout).await {
            Ok(conn) => self.run_on(conn, timeout, op).await,
            Err(e) => Err(e),
        };
        self.count(&result);
        result
    }

    /// Looks a table up by the name a user gave, as PostgreSQL resolves it,
    /// on a pooled connection (at most half the pool at once, see
    /// `lookup_slots`; waiting for a slot counts against the query timeout).
    pub async fn resolve_table(&self, name: &str) -> Result<TableSchema, PgError> {
        let slots = self
            .lookup_slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let timeout = self.timeout();
        let _slot = match tokio::time::timeout(timeout, slots.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(PgError::Unavailable("pool closed".into())),
            Err(_) => return Err(PgError::Timeout(timeout.as_millis() as u64)),
        };
        let name = name.to_owned();
        self.run(|conn| async move {
            let r = catalog::resolve(conn.client(), &name).await;
            (conn, r)
        })
        .await
    }

    /// Waits for a pooled connection, then asks `take` for the rows to fetch
    /// (a table, canonical primary keys as JSON text, and the caller's
    /// bookkeeping `W`) and fetches them in one query. Asking only once a
    /// connection is free is what batches misses: those queued while the
    /// pool was busy are all taken by the next free connection.
    ///
    /// `None` when `take` had nothing to do. When no connection could be had,
    /// `take` is still called and its work gets the error, so whatever is
    /// queued is always answered.
    pub async fn fetch_taken<W>(
        &self,
        take: impl FnOnce() -> Option<(Arc<TableSchema>, Vec<String>, W)>,
    ) -> Option<(W, Result<Vec<Option<String>>, PgError>)> {
        let timeout = self.timeout();
        let conn = self.connection(timeout).await;
        let Some((table, pks, work)) = take() else {
            if let Ok(conn) = conn {
                conn.keep();
            }
            return None;
        };
        let result = match conn {
            Ok(conn) => {
                self.run_on(conn, timeout, |conn| async {
                    let r = self.fetch_rows(conn.client(), &table, &pks).await;
                    (conn, r)
                })
                .await
            }
            Err(e) => Err(e),
        };
        self.count(&result);
        Some((work, result))
    }

    /// Rows by canonical primary key (JSON objects), aligned with `pks`, as
    /// JSON text; `None` where no row has the key. One key is a prepared
    /// single-row select; more are one query joining the table to the keys.
    async fn fetch_rows(
        &self,
        client: &Object,
        table: &TableSchema,
        pks: &[String],
    ) -> Result<Vec<Option<String>>, PgError> {
        let query_err = |e| PgError::query(&table.key_name, e);
        // A key that matches two rows: the table's key changed since it was
        // looked up (say, widened). Never answer one of them; the schema is
        // forgotten and looked up again.
        let changed = || {
            PgError::Query {
            table: table.key_name.clone(),
            message: "the table's primary key changed since it was looked up (a key matched two rows); retry".into(),
            schema_changed: true,
        }
        };
        if let [pk] = pks {
            let params = canonical_pk(table, pk.as_bytes())
                .map_err(|e| PgError::Config(format!("bad queued key: {e}")))?
                .params;
            let stmt = client
                .prepare_cached(&table.select_one)
                .await
                .map_err(query_err)?;
            let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            self.stats.queries.fetch_add(1, Ordering::Relaxed);
            let rows = client.query(&stmt, &args).await.map_err(query_err)?;
            if rows.len() > 1 {
                return Err(changed());
            }
            return Ok(vec![rows.first().map(|r| r.get::<_, String>(0))]);
        }
        let keys_json = json_array(pks);
        let stmt = client
            .prepare_cached(&table.select_many)
            .await
            .map_err(query_err)?;
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let rows = client
            .query(&stmt, &[&keys_json])
            .await
            .map_err(query_err)?;
        let mut out = vec![None; pks.len()];
        for row in rows {
            let ord: i64 = row.get(0);
            if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) {
                if slot.is_some() {
                    return Err(changed());
                }
                *slot = Some(row.get::<_, String>(1));
            }
        }
        Ok(out)
    }

    /// `pg_notify(channel, payload)` on a pooled connection: every listener
    /// of the channel gets the payload once this returns.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), PgError> {
        let (channel, payload) = (channel.to_owned(), payload.to_owned());
        self.run(|conn| async move {
            let r = conn
                .client()
                .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await
                .map(|_| ())
                .map_err(|e| PgError::query("(pg_notify)", e));
            (conn, r)
        })
        .await
    }

    /// The fingerprints (`pgcache_core::sql::fingerprint`) of these tables
    /// now, on a pooled connection; `None` for a table that is gone.
    pub async fn fingerprints(
        &self,
        oids: Vec<u32>,
    ) -> Result<Vec<(u32, Option<String>)>, PgError> {
        self.run(|conn| async move {
            let r = catalog::fingerprints(conn.client(), &oids)
                .await
                .map_err(|e| PgError::query("(catalog)", e));
            (conn, r)
        })
        .await
    }
}
