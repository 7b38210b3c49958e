//! The replication client of `pgcache_pg::replication` against a real
//! PostgreSQL: startup (TCP, Unix socket, TLS), authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256), replication commands, and a logical
//! stream decoded with `pgcache_core::pgoutput`.
//!
//! The harness runs PostgreSQL with `synchronous_commit = off` and a
//! walsender decodes only flushed WAL, so the writes here commit with
//! `synchronous_commit = on` to be streamed at once.

mod common;

use common::*;
use pgcache_core::pgoutput::{
    format_lsn, parse_frame, parse_lsn, parse_message, status_update, Datum, Frame, Lsn, Message,
};
use pgcache_core::{Settings, SslMode};
use pgcache_pg::replication::{
    ReplicationConnection, ReplicationError, StreamReader, StreamWriter,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Connection settings for `user` on the test database of `pg`.
fn settings(pg: &PgServer, user: &str, password: &str, mode: SslMode) -> Settings {
    Settings {
        pg_host: pg.host().into(),
        pg_port: pg.port(),
        pg_user: user.into(),
        pg_database: DB_NAME.into(),
        pg_password: password.into(),
        pg_sslmode: mode,
        pg_connect_timeout_ms: 10_000,
        ..Default::default()
    }
}

async fn connect_with(s: &Settings) -> Result<ReplicationConnection, ReplicationError> {
    let (cfg, tls) = pgcache_pg::config_and_tls(s).expect("valid settings");
    ReplicationConnection::connect(&cfg, &tls).await
}

async fn connect(pg: &PgServer, user: &str) -> ReplicationConnection {
    connect_with(&settings(pg, user, "", SslMode::Disable))
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    unix - 946_684_800_000_000
}

/// `pg_replication_slots.confirmed_flush_lsn` of `slot`.
fn confirmed_flush(pg: &PgServer, slot: &str) -> Option<Lsn> {
    pg.query_text(&format!(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .and_then(|l| parse_lsn(&l))
}

fn text(d: &Datum) -> String {
    match d {
        Datum::Text(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

fn texts(ds: &[Datum]) -> String {
    ds.iter().map(text).collect::<Vec<_>>().join(",")
}

/// A pgoutput message, one line.
fn describe(m: &Message) -> String {
    match m {
        Message::Begin { .. } => "B".into(),
        Message::Commit { .. } => "C".into(),
        Message::Relation { name, .. } => format!("R {name}"),
        Message::Insert { new, .. } => format!("I {}", texts(new)),
        Message::Update { old, new, .. } => format!(
            "U {} -> {}",
            old.as_ref()
                .map_or("-".into(), |(k, o)| format!("{k:?}:{}", texts(o))),
            texts(new)
        ),
        Message::Delete { old: (k, o), .. } => format!("D {k:?}:{}", texts(o)),
        other => format!("{other:?}"),
    }
}

/// Reads up to the next Commit: the transaction's messages and the
/// Commit's end LSN. Keepalives are skipped.
async fn read_transaction(reader: &mut StreamReader) -> (Vec<String>, Lsn) {
    let mut out = Vec::new();
    loop {
        let frame = tokio::time::timeout(HANG, reader.next())
            .await
            .expect("a frame within HANG")
            .expect("no stream error")
            .expect("the stream goes on");
        match parse_frame(&frame).expect("a valid frame") {
            Frame::Keepalive { .. } => {}
            Frame::XLogData { data, .. } => {
                let m = parse_message(data).expect("a valid pgoutput message");
                out.push(describe(&m));
                if let Message::Commit { end_lsn, .. } = m {
                    return (out, end_lsn);
                }
            }
        }
    }
}

/// A replication connection to the slot `slot`, streaming `publication`.
async fn stream(
    pg: &PgServer,
    user: &str,
    slot: &str,
    publication: &str,
) -> (StreamReader, StreamWriter, i32) {
    let s = connect(pg, user)
        .await
        .start_replication(slot, 0, &[publication.to_string()])
        .await
        .unwrap_or_else(|e| panic!("START_REPLICATION {slot}: {e}"));
    let pid = s.backend_pid();
    let (r, w) = s.split();
    (r, w, pid)
}

fn logical_pg() -> PgServer {
    let mut pg = PgServer::start_new();
    pg.enable_logical_replication();
    pg
}

/// Prepends `lines` to pg_hba.conf (first match wins) and reloads; in
/// effect once `probe_user`, whom the old rules let in without a password
/// in plain text, is refused.
fn hba_prepend(pg: &PgServer, lines: &str, probe_user: &str) {
    let path = pg.data_dir().join("pg_hba.conf");
    let hba = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{lines}\n{hba}")).unwrap();
    pg.query_text("SELECT pg_reload_conf()::text");
    let probe = format!(
        "host=127.0.0.1 port={} user={probe_user} dbname={DB_NAME}",
        pg.port()
    );
    wait_until("pg_hba.conf reloaded", || match try_connect(&probe) {
        Err(_) => Ok(()),
        Ok(()) => Err(format!("{probe_user} still gets in")),
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_identifies_and_runs_queries() {
    let pg = logical_pg();
    let mut c = connect(&pg, "postgres").await;
    assert!(!c.uses_tls());
    let version: u32 = pg
        .query_text("SHOW server_version_num")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(c.server_version_num(), Some(version));

    let id = c.identify_system().await.unwrap();
    let system_id = pg
        .query_text("SELECT system_identifier::text FROM pg_control_system()")
        .unwrap();
    assert_eq!(id.system_id, system_id);
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname.as_deref(), Some(DB_NAME));
    let current = parse_lsn(&pg.query_text("SELECT pg_current_wal_lsn()::text").unwrap()).unwrap();
    assert!(id.xlogpos > 0 && id.xlogpos <= current, "{id:?}");

    // The session is a walsender with the pinned settings.
    let me = pg.query_text(&format!(
        "SELECT backend_type || ':' || application_name FROM pg_stat_activity WHERE pid = {}",
        c.backend_pid()
    ));
    assert_eq!(me.as_deref(), Some("walsender:pgcache"));
    let show = c
        .simple_query(
            "SELECT current_setting('DateStyle'); SELECT current_setting('TimeZone'), \
             current_setting('extra_float_digits'), current_setting('statement_timeout')",
        )
        .await
        .unwrap();
    assert_eq!(
        show,
        [[Some("UTC".into()), Some("3".into()), Some("0".into())]]
    );
    let ds = c.simple_query("SHOW DateStyle").await.unwrap();
    assert_eq!(ds, [[Some("ISO, MDY".to_string())]]);

    // Rows as text, NULL as None; several statements: the last one's rows.
    assert_eq!(
        c.simple_query("SELECT 1, NULL::text, 'x'").await.unwrap(),
        [[Some("1".into()), None, Some("x".into())]]
    );
    assert_eq!(
        c.simple_query("SELECT 1; SELECT 2, 3 UNION ALL SELECT 4, 5")
            .await
            .unwrap(),
        [
            [Some("2".to_string()), Some("3".into())],
            [Some("4".into()), Some("5".into())]
        ]
    );
    assert!(c
        .simple_query("CREATE TEMP TABLE tmp (a int)")
        .await
        .unwrap()
        .is_empty());
    assert!(c.simple_query("").await.unwrap().is_empty());

    // An error is the server's, and the connection stays usable.
    let e = c
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42P01"), "{e}");
    assert!(e.to_string().contains("no_such_table"), "{e}");
    assert_eq!(
        c.simple_query("SELECT 'still here'").await.unwrap(),
        [[Some("still here".to_string())]]
    );

    // PostgreSQL 15's syntax; the reply is one row: slot name, consistent
    // point, snapshot name (NULL with SNAPSHOT 'nothing'), output plugin.
    let created = c
        .simple_query(r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'nothing')"#)
        .await
        .unwrap();
    eprintln!("CREATE_REPLICATION_SLOT returned {created:?}");
    assert_eq!(created.len(), 1, "{created:?}");
    let row = &created[0];
    assert_eq!(row.len(), 4, "{row:?}");
    assert_eq!(row[0].as_deref(), Some("s"));
    let consistent = parse_lsn(row[1].as_deref().unwrap()).expect("an LSN");
    assert!(consistent >= id.xlogpos, "{row:?} vs {id:?}");
    assert_eq!(row[2], None);
    assert_eq!(row[3].as_deref(), Some("pgoutput"));
    assert_eq!(confirmed_flush(&pg, "s"), Some(consistent));
    let dup = c
        .simple_query(r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'nothing')"#)
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Some("42710"), "{dup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_changes_in_iso_and_utc_whatever_the_role_says() {
    let pg = logical_pg();
    // A publication name that needs quoting both as an identifier and as
    // a string literal.
    let publication = "Pub \"odd\", it's";
    pg.execute(
        r#"CREATE TABLE events (id int PRIMARY KEY, day date, at timestamptz, note text);
           CREATE PUBLICATION "Pub ""odd"", it's" FOR TABLE events;
           CREATE ROLE repl LOGIN REPLICATION;
           ALTER ROLE repl SET DateStyle = 'SQL, DMY';
           ALTER ROLE repl SET TimeZone = 'Asia/Tokyo';"#,
    );
    // The role's settings are in effect for its ordinary sessions.
    {
        let cs = format!(
            "host=127.0.0.1 port={} user=repl dbname={DB_NAME}",
            pg.port()
        );
        let (client, connection) = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT DATE '2024-03-05'::text, TIMESTAMPTZ '2024-03-05 12:34:56+00'::text",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "05/03/2024");
        assert_eq!(row.get::<_, String>(1), "05/03/2024 21:34:56 JST");
    }

    let mut c = connect(&pg, "repl").await;
    c.simple_query(r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'nothing')"#)
        .await
        .unwrap();
    let s = c.start_replication("s", 0, &[publication.into()]).await;
    let (mut reader, _writer) = s.unwrap().split();

    pg.execute(
        "SET synchronous_commit = on;
         BEGIN;
         INSERT INTO events VALUES (1, '2024-03-05', '2024-03-05 12:34:56.5+00', 'a');
         UPDATE events SET note = 'b' WHERE id = 1;
         DELETE FROM events WHERE id = 1;
         COMMIT;",
    );
    let (messages, _) = read_transaction(&mut reader).await;
    assert_eq!(
        messages,
        [
            "B",
            "R events",
            "I 1,2024-03-05,2024-03-05 12:34:56.5+00,a",
            "U - -> 1,2024-03-05,2024-03-05 12:34:56.5+00,b",
            "D Key:1,Null,Null,Null",
            "C",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_move_the_slot_and_keepalives_ask_for_them() {
    let pg = logical_pg();
    pg.execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE t;
         CREATE ROLE repl LOGIN REPLICATION;
         ALTER ROLE repl SET wal_sender_timeout = '2s';",
    );
    // Not in the implicit transaction of the statements above, which wrote.
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')");
    let before = confirmed_flush(&pg, "s").unwrap();
    let (mut reader, mut writer, _) = stream(&pg, "repl", "s", "p").await;
    pg.execute("SET synchronous_commit = on; INSERT INTO t VALUES (1)");
    let (messages, end_lsn) = read_transaction(&mut reader).await;
    assert_eq!(messages, ["B", "R t", "I 1", "C"]);
    assert!(end_lsn > before);

    // Acknowledged: the slot's confirmed position reaches the commit's end.
    writer
        .send(&status_update(end_lsn, pg_now(), false))
        .await
        .unwrap();
    wait_until(
        "confirmed_flush_lsn reaches the commit's end",
        || match confirmed_flush(&pg, "s") {
            Some(l) if l >= end_lsn => Ok(()),
            other => Err(format!(
                "{:?}, want {}",
                other.map(format_lsn),
                format_lsn(end_lsn)
            )),
        },
    );

    // With wal_sender_timeout 2 s, an idle walsender asks for a reply
    // after half of it; answering keeps the session alive past the
    // timeout.
    let started = std::time::Instant::now();
    let (mut keepalives, mut asked) = (Vec::new(), 0);
    while started.elapsed() < Duration::from_secs(5) {
        let frame = tokio::time::timeout(HANG, reader.next())
            .await
            .expect("a keepalive within HANG")
            .expect("the stream stays up while we answer")
            .expect("the stream goes on");
        if let Frame::Keepalive { wal_end, reply, .. } = parse_frame(&frame).unwrap() {
            keepalives.push((started.elapsed().as_millis(), reply));
            assert!(wal_end >= end_lsn);
            if reply {
                asked += 1;
                writer
                    .send(&status_update(end_lsn, pg_now(), false))
                    .await
                    .unwrap();
            }
        }
    }
    eprintln!("keepalives (ms since start, reply requested): {keepalives:?}");
    assert!(asked >= 2, "{keepalives:?}");

    // Without answers the walsender gives up at wal_sender_timeout: the
    // reader ends with an error, not a hang.
    let silent = std::time::Instant::now();
    let end = tokio::time::timeout(HANG, async {
        loop {
            match reader.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the walsender drops a silent client");
    eprintln!(
        "unanswered keepalives: after {:?} the reader got {end:?}",
        silent.elapsed()
    );
    assert!(end.is_err(), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_done_ends_the_stream() {
    let pg = logical_pg();
    pg.execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE t;",
    );
    // Not in the implicit transaction of the statements above, which wrote.
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')");
    let (mut reader, mut writer, _) = stream(&pg, "postgres", "s", "p").await;
    writer.copy_done().await.unwrap();
    let end = tokio::time::timeout(HANG, async {
        loop {
            match reader.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the copy ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(matches!(reader.next().await, Ok(None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_scram_md5_and_cleartext() {
    let pg = PgServer::start_new();
    pg.execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret-pw';
         CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear-secret-pw';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret-pw';
         CREATE ROLE no_repl LOGIN;",
    );
    assert!(pg
        .query_text("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'")
        .unwrap()
        .starts_with("md5"));
    hba_prepend(
        &pg,
        "host all scram_user 127.0.0.1/32 scram-sha-256\n\
         host all md5_user 127.0.0.1/32 md5\n\
         host all clear_user 127.0.0.1/32 password\n",
        "scram_user",
    );
    for (user, password) in [
        ("scram_user", "scram-secret-pw"),
        ("md5_user", "md5-secret-pw"),
        ("clear_user", "clear-secret-pw"),
    ] {
        let s = settings(&pg, user, password, SslMode::Disable);
        let mut c = connect_with(&s)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let id = c.identify_system().await.unwrap();
        assert_eq!(id.dbname.as_deref(), Some(DB_NAME), "{user}");

        let wrong = "wrong-secret-pw";
        let e = connect_with(&settings(&pg, user, wrong, SslMode::Disable))
            .await
            .unwrap_err();
        eprintln!("{user}, wrong password: {e}");
        assert_eq!(e.code(), Some("28P01"), "{user}: {e}");
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains(wrong) && !shown.contains(password),
            "{user}: {shown}"
        );
        assert!(shown.contains(user), "{user}: {shown}");

        let e = connect_with(&settings(&pg, user, "", SslMode::Disable))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ReplicationError::Config(_)) && e.to_string().contains("password"),
            "{user}: {e}"
        );
    }

    // LOGIN without REPLICATION: refused at startup.
    let e = connect_with(&settings(&pg, "no_repl", "", SslMode::Disable))
        .await
        .unwrap_err();
    eprintln!("a role without REPLICATION: {e}");
    assert_eq!(e.code(), Some("42501"), "{e}");
    assert!(e.to_string().contains("replication"), "{e}");
}

/// A self-signed certificate for `localhost`, installed in the data
/// directory, and TLS turned on; returns the certificate's PEM (its own
/// CA).
fn enable_tls(pg: &PgServer) -> tempfile::TempDir {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let data = pg.data_dir();
    let owner = std::fs::metadata(&data).unwrap();
    for (name, contents) in [
        ("server.crt", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = data.join(name);
        std::fs::write(&path, contents).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for setting in [
        "ssl_cert_file = 'server.crt'",
        "ssl_key_file = 'server.key'",
        "ssl = on",
    ] {
        pg.execute(&format!("ALTER SYSTEM SET {setting}"));
    }
    pg.query_text("SELECT pg_reload_conf()::text");
    wait_until("ssl on", || {
        match pg.query_text("SELECT setting FROM pg_settings WHERE name = 'ssl'") {
            Some(s) if s == "on" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
    dir
}

/// `pg_stat_ssl.ssl` of a backend.
fn ssl_of(pg: &PgServer, pid: i32) -> String {
    pg.query_text(&format!(
        "SELECT ssl::text FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE pid = {pid} AND backend_type = 'walsender'"
    ))
    .unwrap_or_else(|| format!("no walsender with pid {pid}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_pg_sslmode() {
    let pg = PgServer::start_new();
    let ca_dir = enable_tls(&pg);
    let ca = ca_dir.path().join("ca.pem").to_str().unwrap().to_string();
    pg.execute("CREATE ROLE tls_only LOGIN REPLICATION");
    hba_prepend(
        &pg,
        "hostssl all tls_only 127.0.0.1/32 trust\n\
         hostnossl all tls_only 127.0.0.1/32 reject\n",
        "tls_only",
    );

    for mode in [SslMode::Require, SslMode::Prefer] {
        let mut c = connect_with(&settings(&pg, "tls_only", "", mode))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(c.uses_tls(), "{mode:?}");
        assert_eq!(ssl_of(&pg, c.backend_pid()), "true", "{mode:?}");
        c.identify_system().await.unwrap();
    }
    // verify-full: the CA and a name the certificate has.
    let mut s = settings(&pg, "tls_only", "", SslMode::VerifyFull);
    s.pg_sslrootcert = ca.clone();
    s.pg_host = "localhost".into();
    let c = connect_with(&s).await.unwrap();
    assert_eq!(ssl_of(&pg, c.backend_pid()), "true");
    // ... and not one it lacks: refused, no fallback.
    s.pg_host = "127.0.0.1".into();
    let e = connect_with(&s).await.unwrap_err();
    eprintln!("verify-full, a host the certificate lacks: {e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    // disable: plain text, which this role may not use.
    let e = connect_with(&settings(&pg, "tls_only", "", SslMode::Disable))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("28000"), "{e}");
    let c = connect_with(&settings(&pg, "postgres", "", SslMode::Disable))
        .await
        .unwrap();
    assert!(!c.uses_tls());
    assert_eq!(ssl_of(&pg, c.backend_pid()), "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_on_the_server_prefer_goes_plain_and_require_refuses() {
    let pg = PgServer::start_new();
    let c = connect_with(&settings(&pg, "postgres", "", SslMode::Prefer))
        .await
        .unwrap();
    assert!(!c.uses_tls());
    assert_eq!(ssl_of(&pg, c.backend_pid()), "false");
    let e = connect_with(&settings(&pg, "postgres", "secret-pw", SslMode::Require))
        .await
        .unwrap_err();
    eprintln!("require against a server without TLS: {e}");
    assert!(matches!(e, ReplicationError::Io(_)), "{e:?}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(!e.to_string().contains("secret-pw"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_a_unix_socket() {
    let pg = PgServer::start_new();
    let dir = pg
        .data_dir()
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // require: ignored over a Unix socket, as with libpq.
    let mut s = settings(&pg, "postgres", "", SslMode::Require);
    s.pg_host = dir;
    let mut c = connect_with(&s).await.unwrap();
    assert!(!c.uses_tls());
    let id = c.identify_system().await.unwrap();
    assert_eq!(id.dbname.as_deref(), Some(DB_NAME));
    let how = pg.query_text(&format!(
        "SELECT coalesce(client_addr::text, 'local') || ':' || backend_type \
         FROM pg_stat_activity WHERE pid = {}",
        c.backend_pid()
    ));
    assert_eq!(how.as_deref(), Some("local:walsender"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_errors_termination_and_timeouts() {
    let pg = logical_pg();
    pg.execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE t;",
    );
    // Not in the implicit transaction of the statements above, which wrote.
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')");
    let e = connect(&pg, "postgres")
        .await
        .start_replication("missing", 0, &["p".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42704"), "{e}");

    // A name is never spliced into the command: all of this one is the
    // name of a slot that does not exist.
    let odd = "s\" LOGICAL 0/0 --";
    let e = connect(&pg, "postgres")
        .await
        .start_replication(odd, 0, &["p".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42704"), "{e}");
    assert!(e.to_string().contains(odd), "{e}");

    let (mut reader, _writer, pid) = stream(&pg, "postgres", "s", "p").await;
    let e = connect(&pg, "postgres")
        .await
        .start_replication("s", 0, &["p".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("55006"), "{e}");
    assert!(e.to_string().contains(&pid.to_string()), "{e}");

    // The walsender terminated: the reader ends, it does not hang.
    assert_eq!(
        pg.query_text(&format!("SELECT pg_terminate_backend({pid})::text")),
        Some("true".into())
    );
    let end = tokio::time::timeout(HANG, async {
        loop {
            match reader.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the reader ends");
    eprintln!("after pg_terminate_backend the reader got {end:?}");
    match &end {
        Err(e) => assert_eq!(e.code(), Some("57P01"), "{e}"),
        Ok(None) => {}
        Ok(Some(_)) => unreachable!(),
    }
    // Once ended, it stays ended.
    assert!(matches!(reader.next().await, Ok(None) | Err(_)));

    // A server that accepts the connection and never answers: the connect
    // timeout covers the whole startup.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = settings(&pg, "postgres", "", SslMode::Disable);
    s.pg_port = silent.local_addr().unwrap().port();
    s.pg_connect_timeout_ms = 300;
    let started = std::time::Instant::now();
    let e = connect_with(&s).await.unwrap_err();
    assert!(matches!(e, ReplicationError::Timeout(300)), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_is_cancel_safe_under_select() {
    const ROWS: usize = 20_000;
    let pg = logical_pg();
    pg.execute(
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         CREATE PUBLICATION p FOR TABLE t;",
    );
    // Not in the implicit transaction of the statements above, which wrote.
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')");
    let (mut reader, mut writer, _) = stream(&pg, "postgres", "s", "p").await;
    // Values up to 3 kB, so messages span reads.
    pg.execute(&format!(
        "SET synchronous_commit = on;
         INSERT INTO t SELECT g, repeat(chr(65 + g % 26), g % 3000)
         FROM generate_series(1, {ROWS}) g"
    ));
    let (mut inserts, mut updates_sent, mut flushed) = (0usize, 0usize, 0);
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{inserts} inserts");
        tokio::select! {
            m = reader.next() => {
                let frame = m.expect("no stream error").expect("the stream goes on");
                let Frame::XLogData { data, .. } = parse_frame(&frame).expect("a valid frame") else {
                    continue;
                };
                match parse_message(data).expect("a valid message") {
                    Message::Insert { new, .. } => {
                        inserts += 1;
                        let want_id = inserts;
                        let want_note = char::from(65 + (want_id % 26) as u8)
                            .to_string()
                            .repeat(want_id % 3000);
                        assert_eq!(text(&new[0]), want_id.to_string());
                        assert_eq!(text(&new[1]), want_note, "row {want_id}");
                    }
                    Message::Commit { end_lsn, .. } => {
                        flushed = end_lsn;
                        break;
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(1)) => {
                writer.send(&status_update(flushed, pg_now(), false)).await.unwrap();
                updates_sent += 1;
            }
        }
    }
    eprintln!("{inserts} inserts read, {updates_sent} status updates sent meanwhile");
    assert_eq!(inserts, ROWS);
    assert!(updates_sent > 0);
    writer
        .send(&status_update(flushed, pg_now(), false))
        .await
        .unwrap();
    wait_until(
        "the slot confirms the transaction",
        || match confirmed_flush(&pg, "s") {
            Some(l) if l >= flushed => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}
