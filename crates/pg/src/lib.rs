//! pgcache's PostgreSQL layer: the fill pool, catalog lookups and fills.
//!
//! No Redis here. Every operation is bounded by the query timeout; SQL text
//! comes from `pgcache_core::sql` (catalog names, quoted) and every value is
//! a bind parameter.

mod catalog;
mod config;
mod error;
pub mod listener;
pub mod tls;

pub use config::{config_and_tls, connect_config};
pub use error::PgError;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use pgcache_core::{Settings, TableSchema};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
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
    query_timeout_ms: AtomicU64,
    pub stats: PgStats,
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

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms.load(Ordering::Relaxed))
    }

    /// Runs `op` on a pooled connection, bounded by the query timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, PgError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = (Conn, Result<T, PgError>)>,
    {
        let timeout = self.timeout();
        let work = async {
            let obj = self
                .pool()
                .get()
                .await
                .map_err(|e| PgError::from_pool(e, timeout))?;
            let (conn, result) = op(Conn(Some(obj))).await;
            match &result {
                Ok(_) => conn.keep(),
                Err(e) if e.is_answer() => conn.keep(),
                Err(_) => drop(conn),
            }
            result
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(timeout.as_millis() as u64)),
        };
        match &result {
            Ok(_) => {}
            Err(PgError::Timeout(_) | PgError::Canceled(_)) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_answer() => {}
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Looks a table up by the name a user gave, as PostgreSQL resolves it.
    pub async fn resolve_table(&self, name: &str) -> Result<TableSchema, PgError> {
        let name = name.to_owned();
        self.run(|conn| async move {
            let r = catalog::resolve(conn.client(), &name).await;
            (conn, r)
        })
        .await
    }

    /// One row by key (`params` in `TableSchema::pk` order), as JSON text.
    pub async fn fetch_one(
        &self,
        table: &TableSchema,
        params: &[String],
    ) -> Result<Option<String>, PgError> {
        self.run(|conn| async move {
            let r = async {
                let client = conn.client();
                let stmt = client
                    .prepare_cached(&table.select_one)
                    .await
                    .map_err(|e| PgError::query(&table.key_name, e))?;
                let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                let row = client
                    .query_opt(&stmt, &args)
                    .await
                    .map_err(|e| PgError::query(&table.key_name, e))?;
                Ok(row.map(|r| r.get::<_, String>(0)))
            }
            .await;
            (conn, r)
        })
        .await
    }

    /// Many rows in one query: `keys_json` is a JSON array of `n` canonical
    /// keys; the answer is aligned with it.
    pub async fn fetch_many(
        &self,
        table: &TableSchema,
        keys_json: &str,
        n: usize,
    ) -> Result<Vec<Option<String>>, PgError> {
        self.run(|conn| async move {
            let r = async {
                let client = conn.client();
                let stmt = client
                    .prepare_cached(&table.select_many)
                    .await
                    .map_err(|e| PgError::query(&table.key_name, e))?;
                self.stats.queries.fetch_add(1, Ordering::Relaxed);
                let rows = client
                    .query(&stmt, &[&keys_json])
                    .await
                    .map_err(|e| PgError::query(&table.key_name, e))?;
                let mut out = vec![None; n];
                for row in rows {
                    let ord: i64 = row.get(0);
                    if let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) {
                        *slot = Some(row.get::<_, String>(1));
                    }
                }
                Ok(out)
            }
            .await;
            (conn, r)
        })
        .await
    }
}
