//! The replication source's control connection: an ordinary session (not
//! the pool, whose connections queue behind fills; not the replication
//! connection, which is busy streaming) for the visibility barrier's
//! snapshots and for catalog lookups of the tables changes name.

use crate::error::describe;
use crate::listener::Resolver;
use crate::PgError;
use std::sync::Arc;
use std::time::Duration;

/// The control connection's `application_name`.
pub const APPLICATION_NAME: &str = "pgcache replication control";

pub struct Control {
    client: Arc<tokio_postgres::Client>,
    /// `pg_current_snapshot()`, prepared once: a statement given as text
    /// is prepared anew at each run, a second round trip per barrier.
    snapshot: tokio_postgres::Statement,
    driver: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Control {
    pub async fn connect(
        mut config: tokio_postgres::Config,
        tls: crate::tls::TlsConnector,
        timeout: Duration,
    ) -> Result<Control, PgError> {
        config
            .application_name(APPLICATION_NAME)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|e| PgError::Unavailable(describe(&e)))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let prepared = tokio::time::timeout(
            timeout,
            client.prepare("SELECT pg_catalog.pg_current_snapshot()::text"),
        )
        .await;
        let snapshot = match prepared {
            Ok(Ok(statement)) => statement,
            Ok(Err(e)) => {
                driver.abort();
                return Err(PgError::Unavailable(describe(&e)));
            }
            Err(_) => {
                driver.abort();
                return Err(PgError::Timeout(timeout.as_millis() as u64));
            }
        };
        let control = Control {
            client: Arc::new(client),
            snapshot,
            driver,
            timeout,
        };
        // idle_session_timeout (PostgreSQL 14+) must not cycle it; older
        // servers do not know the setting.
        let _ = control
            .client
            .batch_execute("SET idle_session_timeout = 0")
            .await;
        Ok(control)
    }

    /// `pg_current_snapshot()` as text (`xmin:xmax:xip,...`).
    pub async fn snapshot(&self) -> Result<String, PgError> {
        self.text(&self.snapshot).await
    }

    /// `pg_current_wal_insert_lsn()`: past every commit visible now, those
    /// under `synchronous_commit = off` not yet flushed (and so not yet
    /// streamed) included.
    pub async fn wal_insert_lsn(&self) -> Result<String, PgError> {
        self.text("SELECT pg_current_wal_insert_lsn()::text").await
    }

    /// The tables (schema, name) whose every change one of `publications`
    /// streams: all four operations published and no row filter (PostgreSQL
    /// 15; `to_jsonb` reads the column where the server has it). A
    /// partitioned table published via its root is listed as the root.
    pub async fn published_tables(
        &self,
        publications: &[String],
    ) -> Result<Vec<(String, String)>, PgError> {
        const SQL: &str = "SELECT DISTINCT t.schemaname::text, t.tablename::text \
             FROM pg_catalog.pg_publication_tables t \
             JOIN pg_catalog.pg_publication p ON p.pubname = t.pubname \
             WHERE t.pubname::text = ANY($1) \
             AND p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate \
             AND to_jsonb(t) ->> 'rowfilter' IS NULL";
        let names: Vec<&str> = publications.iter().map(String::as_str).collect();
        match tokio::time::timeout(self.timeout, self.client.query(SQL, &[&names])).await {
            Ok(Ok(rows)) => rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(|e| PgError::Unavailable(describe(&e))),
            Ok(Err(e)) => Err(PgError::Unavailable(describe(&e))),
            Err(_) => Err(PgError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// The slot's `wal_status` and `safe_wal_size` (bytes; `None` when
    /// `max_slot_wal_keep_size` is unlimited); `None` without the slot.
    pub async fn slot_health(&self, slot: &str) -> Result<Option<(String, Option<i64>)>, PgError> {
        const SQL: &str = "SELECT coalesce(wal_status, ''), safe_wal_size \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";
        match tokio::time::timeout(self.timeout, self.client.query_opt(SQL, &[&slot])).await {
            Ok(Ok(row)) => row
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
                .map_err(|e: tokio_postgres::Error| PgError::Unavailable(describe(&e))),
            Ok(Err(e)) => Err(PgError::Unavailable(describe(&e))),
            Err(_) => Err(PgError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// The one text value `sql` answers, under the query timeout.
    async fn text<T>(&self, sql: &T) -> Result<String, PgError>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        match tokio::time::timeout(self.timeout, self.client.query_one(sql, &[])).await {
            Ok(Ok(row)) => row
                .try_get::<_, String>(0)
                .map_err(|e| PgError::Unavailable(describe(&e))),
            Ok(Err(e)) => Err(PgError::Unavailable(describe(&e))),
            Err(_) => Err(PgError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    /// Catalog lookups on this connection.
    pub fn resolver(&self) -> Resolver {
        Resolver::new(self.client.clone(), self.timeout)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
