//! TLS to PostgreSQL (SPEC §1: `pg_sslmode`, `pg_sslrootcert`).
//!
//! The tests make their own CAs and server certificate (rcgen), turn TLS on
//! in the harness's PostgreSQL (`ALTER SYSTEM` and a reload) and let the
//! role `tls_only` in over TLS alone (`hostssl` trust, `hostnossl` reject):
//! a module that reads as `tls_only` is talking TLS. The refusals are tried
//! as `postgres`, whom the server accepts in plain text too, so an answer
//! there would mean a fall back to plain text. `pg_stat_ssl` shows what
//! each of the module's sessions (application_name `pgcache`, or `pgcache
//! listener` for the listener) really uses.

mod common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

const SCHEMA: &str = "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 100) g;";

/// The role that PostgreSQL lets in over TLS only.
const TLS_ONLY: &str = "tls_only";

/// A CA that signed the server's certificate (for `localhost` only: not
/// for 127.0.0.1), and another CA that signed nothing the server has.
struct Pki {
    dir: tempfile::TempDir,
    server_cert: String,
    server_key: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pgcache-test-tls-")
            .tempdir()
            .unwrap();
        let ca = new_ca("pgcache test CA");
        let other = new_ca("pgcache other CA");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        Pki {
            dir,
            server_cert: cert.pem(),
            server_key: key.serialize_pem(),
        }
    }

    fn ca(&self) -> String {
        self.path("ca.pem")
    }

    fn other_ca(&self) -> String {
        self.path("other-ca.pem")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A file in the data directory, owned by the server's user (the key must
/// be, with mode 0600).
fn install(pg: &PgServer, name: &str, contents: &str) -> PathBuf {
    let data = pg.data_dir();
    let owner = std::fs::metadata(&data).unwrap();
    let path = data.join(name);
    std::fs::write(&path, contents).unwrap();
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// PostgreSQL with the test schema, the role `tls_only` (TLS only) and,
/// when `pki` is given, TLS on with its server certificate.
fn start_pg(pki: Option<&Pki>) -> PgServer {
    let pg = PgServer::start_with_schema(SCHEMA);
    pg.execute(&format!("CREATE ROLE {TLS_ONLY} LOGIN SUPERUSER"));
    // First match wins: these come before initdb's `host all all ... trust`.
    let hba_path = pg.data_dir().join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path).unwrap();
    std::fs::write(
        &hba_path,
        format!(
            "hostssl all {TLS_ONLY} 127.0.0.1/32 trust\n\
             hostnossl all {TLS_ONLY} 127.0.0.1/32 reject\n{hba}"
        ),
    )
    .unwrap();
    if let Some(pki) = pki {
        install(&pg, "server.crt", &pki.server_cert);
        install(&pg, "server.key", &pki.server_key);
        pg.execute("ALTER SYSTEM SET ssl_cert_file = 'server.crt'");
        pg.execute("ALTER SYSTEM SET ssl_key_file = 'server.key'");
        pg.execute("ALTER SYSTEM SET ssl = on");
    }
    pg.query_text("SELECT pg_reload_conf()::text");
    let want = if pki.is_some() { "on" } else { "off" };
    wait_until("PostgreSQL reloaded its configuration", || {
        let ssl = pg.query_text("SELECT setting FROM pg_settings WHERE name = 'ssl'");
        let rules = pg.query_text(&format!(
            "SELECT count(*)::text FROM pg_hba_file_rules WHERE '{TLS_ONLY}' = ANY(user_name)"
        ));
        if ssl.as_deref() == Some(want) && rules.as_deref() == Some("2") {
            Ok(())
        } else {
            Err(format!("ssl = {ssl:?}, {rules:?} rules for {TLS_ONLY}"))
        }
    });
    pg
}

/// Module arguments: this host and role, plus `extra`.
fn args(pg: &PgServer, host: &str, user: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "pg_host",
        host,
        "pg_port",
        &pg.port().to_string(),
        "pg_database",
        DB_NAME,
        "pg_user",
        user,
        "pg_connect_timeout_ms",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `pid:ssl:application_name:query` of the module's sessions as `user`
/// (the fill pool's are `pgcache`, the listener's `pgcache listener`).
fn module_sessions(pg: &PgServer, user: &str) -> Vec<String> {
    pg.query_texts(&format!(
        "SELECT a.pid || ':' || s.ssl || ':' || a.application_name || ':' || coalesce(a.query, '') \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'pgcache%' AND a.usename = '{user}' ORDER BY a.pid"
    ))
    .into_iter()
    .flatten()
    .collect()
}

/// Waits until a module stopped before has no session left, so the next
/// check sees only the next module's.
fn wait_no_module_sessions(pg: &PgServer) {
    wait_until("the previous module's sessions are gone", || {
        let left = pg.query_texts(
            "SELECT pid::text FROM pg_stat_activity WHERE application_name LIKE 'pgcache%'",
        );
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
}

/// READ works, and every session of the module (as `user`) has
/// `pg_stat_ssl.ssl = tls`.
#[track_caller]
fn assert_reads_with_tls(pg: &PgServer, r: &RedisServer, user: &str, tls: bool, what: &str) {
    let mut c = r.con();
    let row = read_row(&mut c, "users", r#"{"id":7}"#);
    assert_eq!(row["name"], "user 7", "{what}");
    let sessions = module_sessions(pg, user);
    assert!(!sessions.is_empty(), "{what}: no session of the module");
    for s in &sessions {
        let ssl = s.split(':').nth(1).unwrap();
        assert_eq!(
            ssl,
            tls.to_string(),
            "{what}: session {s} (all: {sessions:?})"
        );
    }
}

/// READ of a miss is refused with an error that names `words`, and the
/// listener does not connect either.
#[track_caller]
fn assert_refused(r: &RedisServer, words: &[&str], what: &str) {
    let mut c = r.con();
    let e = expect_err(read(&mut c, "users", r#"{"id":8}"#), what);
    assert_mentions(&e, words, what);
    assert!(!e.contains("secret-pw"), "{what}: the password leaked: {e}");
    let listener = stat_str(&r.stats(), "listener");
    assert_ne!(listener, "connected", "{what}: the listener connected");
}

#[test]
fn verify_full_checks_the_chain_and_the_host_name_and_never_falls_back() {
    let pki = Pki::new();
    let pg = start_pg(Some(&pki));
    let ca = pki.ca();

    // The right CA and a host the certificate names: fills and the
    // listener talk TLS (`tls_only` gets in over TLS alone).
    {
        let r = RedisServer::start(&args(
            &pg,
            "localhost",
            TLS_ONLY,
            &["pg_sslmode", "verify-full", "pg_sslrootcert", &ca],
        ));
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, TLS_ONLY, true, "verify-full, right CA");
        let listen: Vec<String> = module_sessions(&pg, TLS_ONLY)
            .into_iter()
            .filter(|s| s.contains(":pgcache listener:"))
            .collect();
        assert_eq!(listen.len(), 1, "one LISTEN session: {listen:?}");
        assert!(listen[0].contains(":true:"), "LISTEN over TLS: {listen:?}");
        assert_eq!(
            listen_session_pids(&pg).len(),
            1,
            "the listener's session is the module's"
        );
    }
    wait_no_module_sessions(&pg);

    // Another CA: refused, and no plain-text try although `postgres` may
    // come in in plain text.
    {
        let r = RedisServer::start(&args(
            &pg,
            "localhost",
            "postgres",
            &[
                "pg_sslmode",
                "verify-full",
                "pg_sslrootcert",
                &pki.other_ca(),
                "pg_password",
                "secret-pw",
            ],
        ));
        assert_refused(&r, &["certificate"], "verify-full, another CA");
        assert!(
            module_sessions(&pg, "postgres").is_empty(),
            "verify-full with another CA opened a session"
        );
    }

    // The right CA, but the certificate names `localhost`, not 127.0.0.1.
    {
        let r = RedisServer::start(&args(
            &pg,
            "127.0.0.1",
            "postgres",
            &["pg_sslmode", "verify-full", "pg_sslrootcert", &ca],
        ));
        assert_refused(&r, &["certificate", "127.0.0.1"], "verify-full, wrong host");
        assert!(
            module_sessions(&pg, "postgres").is_empty(),
            "verify-full with a host the certificate does not name opened a session"
        );
    }

    // Switching to verify-full at run time: the pool and the listener
    // reconnect with the new settings (pg_sslrootcert first: verify-full
    // without it is refused).
    {
        let r = RedisServer::start(&args(
            &pg,
            "localhost",
            TLS_ONLY,
            &["pg_sslmode", "disable"],
        ));
        let mut c = r.con();
        assert_refused(&r, &["no encryption"], "disable against a TLS-only role");
        let e = expect_err(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("pgcache.pg_sslmode")
                .arg("verify-full")
                .query::<String>(&mut c),
            "CONFIG SET pg_sslmode verify-full without pg_sslrootcert",
        );
        assert_mentions(&e, &["pg_sslrootcert"], "verify-full without a CA");
        let _: String = redis::cmd("CONFIG")
            .arg("SET")
            .arg("pgcache.pg_sslrootcert")
            .arg(&ca)
            .query(&mut c)
            .unwrap();
        let _: String = redis::cmd("CONFIG")
            .arg("SET")
            .arg("pgcache.pg_sslmode")
            .arg("verify-full")
            .query(&mut c)
            .unwrap();
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, TLS_ONLY, true, "verify-full set at run time");
    }
}

#[test]
fn require_and_prefer_encrypt_without_checking_the_certificate() {
    let pki = Pki::new();
    let pg = start_pg(Some(&pki));

    // require: no CA, and a host the certificate does not name.
    {
        let r = RedisServer::start(&args(
            &pg,
            "127.0.0.1",
            TLS_ONLY,
            &["pg_sslmode", "require"],
        ));
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, TLS_ONLY, true, "require");
    }
    wait_no_module_sessions(&pg);

    // prefer (the default) uses TLS where the server offers it.
    {
        let r = RedisServer::start(&args(&pg, "127.0.0.1", TLS_ONLY, &[]));
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, TLS_ONLY, true, "prefer, TLS offered");
    }
    wait_no_module_sessions(&pg);

    // disable: plain text, although the server offers TLS.
    {
        let r = RedisServer::start(&args(
            &pg,
            "127.0.0.1",
            "postgres",
            &["pg_sslmode", "disable"],
        ));
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, "postgres", false, "disable");
    }
}

#[test]
fn without_tls_on_the_server_require_and_verify_full_refuse_and_prefer_goes_plain() {
    let pki = Pki::new();
    let pg = start_pg(None);

    for extra in [
        vec!["pg_sslmode", "require"],
        vec!["pg_sslmode", "verify-full", "pg_sslrootcert", &pki.ca()],
    ] {
        let what = format!("{} against a server without TLS", extra[1]);
        let r = RedisServer::start(&args(&pg, "localhost", "postgres", &extra));
        assert_refused(&r, &["tls"], &what);
        assert!(
            module_sessions(&pg, "postgres").is_empty(),
            "{what}: a session was opened"
        );
    }

    for mode in ["prefer", "disable"] {
        wait_no_module_sessions(&pg);
        let r = RedisServer::start(&args(&pg, "127.0.0.1", "postgres", &["pg_sslmode", mode]));
        wait_listener_ready(&r);
        assert_reads_with_tls(&pg, &r, "postgres", false, mode);
    }
}

#[test]
fn verify_full_without_a_usable_ca_file_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases: [(&str, &[&str]); 3] = [
        ("", &["pg_sslrootcert", "verify-full"]),
        (
            missing.to_str().unwrap(),
            &["pg_sslrootcert", "missing.pem"],
        ),
        (
            not_pem.to_str().unwrap(),
            &["pg_sslrootcert", "not-a-cert.pem"],
        ),
    ];
    for (rootcert, words) in cases {
        let mut a = vec![
            "pg_host",
            "127.0.0.1",
            "pg_port",
            "1",
            "pg_password",
            "secret-pw",
            "pg_sslmode",
            "verify-full",
        ];
        if !rootcert.is_empty() {
            a.extend(["pg_sslrootcert", rootcert]);
        }
        let log = RedisServer::start_expect_refused(&a);
        let what = format!("verify-full with pg_sslrootcert {rootcert:?}");
        let line = log
            .lines()
            .find(|l| l.contains("pg_sslrootcert"))
            .unwrap_or_else(|| panic!("{what}: no log line names pg_sslrootcert:\n{log}"));
        assert_mentions(line, words, &what);
        assert!(
            !log.contains("secret-pw"),
            "{what}: the password leaked:\n{log}"
        );
    }
}
