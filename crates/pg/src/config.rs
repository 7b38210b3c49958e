use crate::PgError;
use pgcache_core::{Settings, SslMode};
use std::time::Duration;

/// The connection settings for one PostgreSQL connection. `pg_url`, where
/// given, overrides host, port, database, user and password.
pub fn connect_config(s: &Settings) -> Result<tokio_postgres::Config, PgError> {
    let mut cfg = if s.pg_url.is_empty() {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&s.pg_host)
            .port(s.pg_port)
            .dbname(&s.pg_database)
            .user(&s.pg_user);
        cfg
    } else {
        s.pg_url
            .parse::<tokio_postgres::Config>()
            // The parser's message can quote the URL; say only what is wrong.
            .map_err(|_| PgError::Config("pg_url is not a valid PostgreSQL URL".into()))?
    };
    if cfg.get_password().is_none() || s.password_from_file.is_some() {
        let pw = s.effective_password();
        if !pw.is_empty() {
            cfg.password(pw);
        }
    }
    cfg.connect_timeout(Duration::from_millis(s.pg_connect_timeout_ms))
        .application_name("pgcache")
        .options(format!("-c statement_timeout={}", s.pg_query_timeout_ms))
        .ssl_mode(match s.pg_sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
    Ok(cfg)
}
