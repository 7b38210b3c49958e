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
        let prepared = timed(
            timeout,
            client.prepare("SELECT pg_catalog.pg_current_snapshot()::text"),
        )
        .await;
        let snapshot = match prepared {
            Ok(statement) => statement,
            Err(e) => {
                driver.abort();
                return Err(e);
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
        timed(self.timeout, async {
            let rows = self.client.query(SQL, &[&names]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
        .await
    }

    /// The slot's `wal_status` and `safe_wal_size` (bytes; `None` when
    /// `max_slot_wal_keep_size` is unlimited); `None` without the slot.
    pub async fn slot_health(&self, slot: &str) -> Result<Option<(String, Option<i64>)>, PgError> {
        const SQL: &str = "SELECT coalesce(wal_status, ''), safe_wal_size \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";
        timed(self.timeout, async {
            let row = self.client.query_opt(SQL, &[&slot]).await?;
            row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
        })
        .await
    }

    /// The one text value `sql` answers, under the query timeout.
    async fn text<T>(&self, sql: &T) -> Result<String, PgError>
    where
        T: ?Sized + tokio_postgres::ToStatement,
    {
        timed(self.timeout, async {
            self.client
                .query_one(sql, &[])
                .await?
                .try_get::<_, String>(0)
        })
        .await
    }

    /// Catalog lookups on this connection.
    pub fn resolver(&self) -> Resolver {
        Resolver::new(self.client.clone(), self.timeout)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// `work` under `timeout`, its errors as the pool's.
async fn timed<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(PgError::Unavailable(describe(&e))),
        Err(_) => Err(PgError::Timeout(timeout.as_millis() as u64)),
    }
}
