use std::time::Duration;
use thiserror::Error;
use tokio_postgres::error::SqlState;

/// What can go wrong talking to PostgreSQL. Messages never include the
/// password: connection errors come from the server or the socket, and the
/// configuration is never rendered.
#[derive(Debug, Error)]
pub enum PgError {
    #[error("invalid PostgreSQL settings: {0}")]
    Config(String),
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    #[error("PostgreSQL query timed out after {0} ms")]
    Timeout(u64),
    #[error("PostgreSQL canceled the query (statement_timeout is the query timeout): {0}")]
    Canceled(String),
    #[error("unknown table '{0}'")]
    UnknownTable(String),
    #[error("invalid table name '{0}': {1}")]
    BadTableName(String, String),
    #[error("table '{0}' has no primary key")]
    NoPrimaryKey(String),
    #[error("table '{0}' is a system catalog; pgcache does not serve system catalogs")]
    SystemCatalog(String),
    #[error("table '{table}' cannot be cached: its primary-key column '{column}' {reason}")]
    UnsupportedKey {
        table: String,
        column: String,
        reason: String,
    },
    #[error("query on table '{table}' failed: {message}")]
    Query {
        table: String,
        message: String,
        /// The table's definition changed since its schema was cached.
        schema_changed: bool,
    },
}

impl PgError {
    pub(crate) fn from_pool(e: deadpool_postgres::PoolError, timeout: Duration) -> PgError {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Timeout(_) => PgError::Timeout(timeout.as_millis() as u64),
            PoolError::Backend(e) => PgError::Unavailable(describe(&e)),
            other => PgError::Unavailable(other.to_string()),
        }
    }

    pub(crate) fn query(table: &str, e: tokio_postgres::Error) -> PgError {
        if e.is_closed() || e.as_db_error().is_none() {
            return PgError::Unavailable(describe(&e));
        }
        let code = e.code().cloned();
        let schema_changed = matches!(
            code,
            Some(SqlState::UNDEFINED_TABLE)
                | Some(SqlState::UNDEFINED_COLUMN)
                | Some(SqlState::FEATURE_NOT_SUPPORTED)
                | Some(SqlState::DATATYPE_MISMATCH)
                | Some(SqlState::UNDEFINED_FUNCTION)
        );
        if code == Some(SqlState::QUERY_CANCELED) {
            // statement_timeout (set to the query timeout) fired.
            return PgError::Canceled(describe(&e));
        }
        PgError::Query {
            table: table.to_owned(),
            message: describe(&e),
            schema_changed,
        }
    }

    /// A well-formed answer about the request (unknown table, no primary
    /// key, ...), not a failure of PostgreSQL or of the connection.
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            PgError::UnknownTable(_)
                | PgError::BadTableName(..)
                | PgError::NoPrimaryKey(_)
                | PgError::SystemCatalog(_)
                | PgError::UnsupportedKey { .. }
        )
    }

    /// Whether the cached schema of the table should be dropped.
    pub fn schema_changed(&self) -> bool {
        matches!(
            self,
            PgError::Query {
                schema_changed: true,
                ..
            }
        )
    }
}

/// The most useful text of a tokio-postgres error: the server's message when
/// there is one, else the error and its source.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}
