use crate::PgError;
use pgcache_core::{Settings, SslMode};
use std::time::Duration;
use tokio_postgres::config::SslMode as TpSslMode;

/// The connection settings for one PostgreSQL connection. `pg_url`, where
/// given, overrides host, port, database, user and password.
///
/// Also builds the TLS connector for these settings (an error if
/// `pg_sslmode`/`pg_sslrootcert` cannot be used) and keeps it for the
/// invalidation listener, which connects with `tls::current()`.
pub fn connect_config(s: &Settings) -> Result<tokio_postgres::Config, PgError> {
    config_and_tls(s).map(|(cfg, _)| cfg)
}

/// The connection settings and the TLS connector that goes with them.
pub fn config_and_tls(
    s: &Settings,
) -> Result<(tokio_postgres::Config, crate::tls::TlsConnector), PgError> {
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
    // Checked (and, for verify-full, the CA file read) before anything
    // connects: a bad TLS setting is a configuration error.
    let tls = crate::tls::connector(s)?;
    let mode = ssl_mode(s, &cfg);
    cfg.connect_timeout(Duration::from_millis(s.pg_connect_timeout_ms))
        .application_name("pgcache")
        .options(format!("-c statement_timeout={}", s.pg_query_timeout_ms))
        .ssl_mode(mode);
    Ok((cfg, tls))
}

/// tokio-postgres's mode for `pg_sslmode`: `require` and `verify-full` are
/// its `Require` (TLS or no connection; what is checked is the connector's
/// business). A `pg_url` asking for `sslmode=require` is never weakened.
/// Over Unix sockets there is no TLS, as with libpq.
fn ssl_mode(s: &Settings, cfg: &tokio_postgres::Config) -> TpSslMode {
    let all_unix = cfg
        .get_hosts()
        .iter()
        .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    if all_unix && !cfg.get_hosts().is_empty() {
        return TpSslMode::Disable;
    }
    match s.pg_sslmode {
        SslMode::Require | SslMode::VerifyFull => TpSslMode::Require,
        _ if cfg.get_ssl_mode() == TpSslMode::Require => TpSslMode::Require,
        SslMode::Disable => TpSslMode::Disable,
        SslMode::Prefer => TpSslMode::Prefer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(f: impl FnOnce(&mut Settings)) -> TpSslMode {
        let mut s = Settings::default();
        f(&mut s);
        connect_config(&s).unwrap().get_ssl_mode()
    }

    #[test]
    fn ssl_modes_map_to_tokio_postgres() {
        assert_eq!(mode_of(|_| {}), TpSslMode::Prefer);
        assert_eq!(
            mode_of(|s| s.pg_sslmode = SslMode::Disable),
            TpSslMode::Disable
        );
        assert_eq!(
            mode_of(|s| s.pg_sslmode = SslMode::Require),
            TpSslMode::Require
        );
        let mut s = Settings {
            pg_sslmode: SslMode::VerifyFull,
            pg_password: "secret-pw".into(),
            ..Settings::default()
        };
        let e = connect_config(&s).unwrap_err().to_string();
        assert!(e.contains("pg_sslrootcert"), "{e}");
        assert!(!e.contains("secret-pw"), "{e}");
        s.pg_sslrootcert = "/nonexistent/pgcache-ca.pem".into();
        let e = connect_config(&s).unwrap_err().to_string();
        assert!(
            e.contains("pg_sslrootcert") && !e.contains("secret-pw"),
            "{e}"
        );
    }

    #[test]
    fn a_url_asking_for_tls_is_not_weakened() {
        assert_eq!(
            mode_of(|s| s.pg_url = "postgresql://h/db?sslmode=require".into()),
            TpSslMode::Require
        );
        assert_eq!(
            mode_of(|s| {
                s.pg_url = "postgresql://h/db?sslmode=require".into();
                s.pg_sslmode = SslMode::Disable;
            }),
            TpSslMode::Require
        );
        assert_eq!(
            mode_of(|s| s.pg_url = "postgresql://h/db?sslmode=disable".into()),
            TpSslMode::Prefer
        );
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        assert_eq!(
            mode_of(|s| {
                s.pg_host = "/var/run/postgresql".into();
                s.pg_sslmode = SslMode::Require;
            }),
            TpSslMode::Disable
        );
    }
}
