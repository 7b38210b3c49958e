//! A small PostgreSQL logical-replication client: transport only.
//!
//! tokio-postgres cannot stream replication (no `replication=database`
//! startup parameter, no CopyBoth), so this speaks the protocol itself with
//! `postgres-protocol`'s message builders, parser and authentication
//! (cleartext, MD5, SCRAM-SHA-256). What the frames carry is decoded by
//! `pgcache_core::pgoutput`; this module only moves bytes.
//!
//! - Settings come from `crate::config_and_tls`, and TLS goes through the
//!   same connector as fills (`crate::tls`), so every `pg_sslmode` means
//!   the same here; Unix sockets never use TLS.
//! - The session pins `DateStyle=ISO`, `TimeZone=UTC` and
//!   `extra_float_digits=3`: pgoutput sends values as text in the
//!   walsender's own settings, and role or database defaults must not
//!   change how keys are spelled.
//! - Every length from the wire is checked and every message is bounded
//!   (`MAX_MESSAGE`): anything the server sends is an error, never a panic.

use crate::tls::TlsConnector;
use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pgcache_core::pgoutput::{format_lsn, Lsn};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message};
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// The largest message accepted from the server. PostgreSQL builds each
/// message in memory under its 1 GiB allocation limit, so anything larger
/// is a broken or hostile stream, refused before buffering it.
pub const MAX_MESSAGE: usize = 1 << 30;

/// The session settings the walsender must use whatever the role's or
/// database's defaults say (see the module comment). `statement_timeout=0`:
/// the fill pool's query timeout must not cut a replication session.
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c statement_timeout=0";

/// What can go wrong. Messages never include the password: it is only ever
/// hashed or sent, and the configuration is never rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// An ErrorResponse: the SQLSTATE and the server's message (with its
    /// detail, when it sent one).
    #[error("PostgreSQL error {code}: {message}")]
    Server { code: String, message: String },
    #[error("replication connection: {0}")]
    Io(String),
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("replication connection settings: {0}")]
    Config(String),
    #[error("replication connection timed out after {0} ms")]
    Timeout(u64),
}

impl ReplicationError {
    /// The SQLSTATE of a server error (`42704`: no such slot, `55006`: slot
    /// in use, `28P01`: wrong password, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

fn io_err(what: &str) -> impl Fn(std::io::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::Io(format!("{what}: {e}"))
}

fn protocol(what: impl Into<String>) -> ReplicationError {
    ReplicationError::Protocol(what.into())
}

/// A plain or TLS socket, boxed so that one type serves TCP, TLS and Unix.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}
type BoxSocket = Box<dyn Socket>;

/// The system a replication connection is attached to (`IDENTIFY_SYSTEM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database (`None` for a physical replication connection).
    pub dbname: Option<String>,
}

/// A replication connection after startup, in simple-query mode: SQL and
/// replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, ...)
/// work, until `start_replication` turns it into a stream.
pub struct ReplicationConnection {
    socket: BoxSocket,
    buf: BytesMut,
    params: HashMap<String, String>,
    backend_pid: i32,
    tls: bool,
    /// Set while a query is in flight and cleared at its ReadyForQuery: a
    /// query abandoned midway (error, dropped future) leaves the
    /// connection out of step, and it refuses further use.
    desynced: bool,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("backend_pid", &self.backend_pid)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects with `cfg`'s hosts (in order), ports, user, password,
    /// database, application name and sslmode; the whole of connecting and
    /// authenticating is bounded by `cfg`'s connect timeout.
    pub async fn connect(cfg: &tokio_postgres::Config, tls: &TlsConnector) -> Result<Self> {
        match cfg.get_connect_timeout() {
            Some(t) => tokio::time::timeout(*t, connect_any(cfg, tls))
                .await
                .unwrap_or(Err(ReplicationError::Timeout(t.as_millis() as u64))),
            None => connect_any(cfg, tls).await,
        }
    }

    /// `server_version` as a number (`15.19` is 150019, `9.6.24` 90624).
    pub fn server_version_num(&self) -> Option<u32> {
        parse_server_version(self.params.get("server_version")?)
    }

    /// A run-time parameter the server reported (ParameterStatus).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The walsender's process id (BackendKeyData).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Whether the session is encrypted.
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    async fn write(&mut self, out: &[u8]) -> Result<()> {
        let what = "sending to the server";
        self.socket.write_all(out).await.map_err(io_err(what))?;
        self.socket.flush().await.map_err(io_err(what))
    }

    async fn read(&mut self) -> Result<Backend> {
        let (tag, frame) = read_frame(&mut self.socket, &mut self.buf).await?;
        parse_backend(tag, frame)
    }

    /// Simple query protocol: rows as text (`None` is NULL). Several
    /// statements may be sent at once; the rows of the last statement are
    /// returned (none if it returned none). Not cancel-safe: a dropped call
    /// leaves the connection unusable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        if self.desynced {
            return Err(protocol("an earlier query was abandoned midway; reconnect"));
        }
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)
            .map_err(|e| ReplicationError::Config(format!("query text: {e}")))?;
        self.desynced = true;
        self.write(&out).await?;
        let (mut rows, mut last, mut error) = (Vec::new(), Vec::new(), None);
        loop {
            match self.read().await? {
                Backend::Msg(Message::RowDescription(_)) => rows.clear(),
                Backend::Msg(Message::DataRow(body)) => rows.push(text_row(&body)?),
                Backend::Msg(Message::CommandComplete(_) | Message::EmptyQueryResponse) => {
                    last = std::mem::take(&mut rows)
                }
                Backend::Msg(Message::ErrorResponse(body)) => {
                    error = Some(server_error(body.fields()))
                }
                Backend::Msg(Message::ParameterStatus(p)) => self.note_parameter(&p)?,
                Backend::Msg(Message::NoticeResponse(_)) => {}
                Backend::Msg(Message::ReadyForQuery(_)) => break,
                Backend::CopyBoth => {
                    return Err(protocol("the query started a copy; use start_replication"))
                }
                Backend::Msg(_) => return Err(protocol("unexpected message answering a query")),
            }
        }
        self.desynced = false;
        error.map_or(Ok(last), Err)
    }

    /// `IDENTIFY_SYSTEM`: the system id, timeline, WAL position and database.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let bad = || protocol("IDENTIFY_SYSTEM: unexpected reply");
        let row = match rows.as_slice() {
            [row] if row.len() >= 4 => row,
            _ => return Err(bad()),
        };
        let field = |i: usize| row.get(i).and_then(|v| v.clone());
        Ok(SystemIdentity {
            system_id: field(0).ok_or_else(bad)?,
            timeline: field(1).and_then(|t| t.parse().ok()).ok_or_else(bad)?,
            xlogpos: field(2)
                .and_then(|l| pgcache_core::pgoutput::parse_lsn(&l))
                .ok_or_else(bad)?,
            dbname: field(3),
        })
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start` with pgoutput protocol
    /// version 1 for `publications` (logical messages off), waiting for the
    /// server to switch to CopyBoth. The server starts at the slot's
    /// confirmed position when `start` is older.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publications: &[String],
    ) -> Result<ReplicationStream> {
        if self.desynced {
            return Err(protocol("an earlier query was abandoned midway; reconnect"));
        }
        let sql = start_replication_sql(slot, start, publications);
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out)
            .map_err(|e| ReplicationError::Config(format!("slot or publication name: {e}")))?;
        self.write(&out).await?;
        loop {
            match self.read().await? {
                Backend::CopyBoth => break,
                // The server follows an error with ReadyForQuery; the
                // connection is given up either way.
                Backend::Msg(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()))
                }
                Backend::Msg(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Backend::Msg(_) => {
                    return Err(protocol("unexpected message answering START_REPLICATION"))
                }
            }
        }
        Ok(ReplicationStream {
            socket: self.socket,
            buf: self.buf,
            backend_pid: self.backend_pid,
        })
    }

    fn note_parameter(
        &mut self,
        p: &postgres_protocol::message::backend::ParameterStatusBody,
    ) -> Result<()> {
        let bad = |_| protocol("ParameterStatus is not UTF-8");
        self.params.insert(
            p.name().map_err(bad)?.into(),
            p.value().map_err(bad)?.into(),
        );
        Ok(())
    }
}

/// The command text, every name quoted: the slot as an identifier, and the
/// publications as the option value pgoutput splits like an identifier
/// list (each name double-quoted, joined by commas), that whole value as a
/// string literal. No user text reaches the command unquoted.
fn start_replication_sql(slot: &str, start: Lsn, publications: &[String]) -> String {
    let names: Vec<String> = publications.iter().map(|p| quote_ident(p)).collect();
    format!(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, \
         messages 'false')",
        quote_ident(slot),
        format_lsn(start),
        quote_literal(&names.join(","))
    )
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `server_version` ("15.19 (Debian ...)", "16beta1", "9.6.24") as
/// `server_version_num` spells it.
fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next().flatten()?;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        major.checked_mul(10000)?.checked_add(minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + minor.min(99) * 100 + patch.min(99))
    }
}

/// A server message, with CopyBothResponse (`W`, unknown to
/// postgres-protocol 0.6.12) told apart before the generic parser.
enum Backend {
    CopyBoth,
    Msg(Message),
}

fn parse_backend(tag: u8, mut frame: BytesMut) -> Result<Backend> {
    if tag == b'W' {
        // Format (1 byte), column count (2) and a format code (2) per
        // column: nothing pgcache needs, but the length must add up.
        return match frame.get(5..).unwrap_or_default() {
            [_format, hi, lo, codes @ ..]
                if codes.len() == 2 * usize::from(u16::from_be_bytes([*hi, *lo])) =>
            {
                Ok(Backend::CopyBoth)
            }
            _ => Err(protocol("malformed CopyBothResponse")),
        };
    }
    match Message::parse(&mut frame) {
        Ok(Some(m)) => Ok(Backend::Msg(m)),
        Ok(None) => Err(protocol("truncated message")),
        Err(e) => Err(protocol(format!("message {:?}: {e}", tag as char))),
    }
}

/// The next whole message in `buf` (tag and the frame with its header),
/// if one is there; nothing is consumed otherwise.
fn take_frame(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len < 4 {
        return Err(protocol(format!(
            "message {:?} has an invalid length {len}",
            tag as char
        )));
    }
    if len > MAX_MESSAGE {
        return Err(protocol(format!(
            "message {:?} of {len} bytes exceeds the 1 GiB limit",
            tag as char
        )));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    Ok(Some((tag, buf.split_to(len + 1))))
}

/// Makes room for the rest of the message being received, at most 8 MiB at
/// a time (a header claiming a huge message does not allocate it at once).
fn reserve_for_next(buf: &mut BytesMut) {
    let missing = match buf.get(1..5) {
        Some(&[a, b, c, d]) => {
            (u32::from_be_bytes([a, b, c, d]) as usize + 1).saturating_sub(buf.len())
        }
        _ => 5 - buf.len().min(5),
    };
    buf.reserve(missing.clamp(64 * 1024, 8 << 20));
}

/// Reads until a whole message is buffered. Cancel-safe: data read is
/// kept in `buf`, and a message is taken out only whole.
async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    socket: &mut R,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut)> {
    loop {
        if let Some(frame) = take_frame(buf)? {
            return Ok(frame);
        }
        reserve_for_next(buf);
        let n = socket
            .read_buf(buf)
            .await
            .map_err(io_err("reading from the server"))?;
        if n == 0 {
            return Err(ReplicationError::Io(
                "the server closed the connection".into(),
            ));
        }
    }
}

/// An ErrorResponse as `ReplicationError::Server`: SQLSTATE, message and
/// detail.
fn server_error(mut fields: ErrorFields<'_>) -> ReplicationError {
    let (mut code, mut message, mut detail) = (None, None, None);
    loop {
        match fields.next() {
            Ok(Some(f)) => {
                let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
                match f.type_() {
                    b'C' => code = Some(value),
                    b'M' => message = Some(value),
                    b'D' => detail = Some(value),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(_) => return protocol("malformed ErrorResponse"),
        }
    }
    let mut message = message.unwrap_or_else(|| "(no message)".into());
    if let Some(detail) = detail {
        message = format!("{message}. {detail}");
    }
    ReplicationError::Server {
        code: code.unwrap_or_else(|| "XX000".into()),
        message,
    }
}

/// A DataRow's columns as text (the simple query protocol sends text).
fn text_row(body: &DataRowBody) -> Result<Vec<Option<String>>> {
    let ranges: Vec<_> = body
        .ranges()
        .collect()
        .map_err(|e| protocol(format!("malformed DataRow: {e}")))?;
    let column = |range: std::ops::Range<usize>| {
        let bytes = body.buffer().get(range).unwrap_or_default();
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| protocol("DataRow column is not UTF-8"))
    };
    ranges
        .into_iter()
        .map(|r| r.map(column).transpose())
        .collect()
}

// ---------------------------------------------------------------------------
// connecting

/// Tries each host of `cfg` in order; the last failure is returned.
async fn connect_any(
    cfg: &tokio_postgres::Config,
    tls: &TlsConnector,
) -> Result<ReplicationConnection> {
    let hosts = cfg.get_hosts();
    let addrs = cfg.get_hostaddrs();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(ReplicationError::Config("no host to connect to".into()));
    }
    let mut last = None;
    for i in 0..count {
        let port = cfg
            .get_ports()
            .get(i)
            .or_else(|| cfg.get_ports().first())
            .copied()
            .unwrap_or(5432);
        let attempt = match (hosts.get(i), addrs.get(i)) {
            (Some(Host::Unix(dir)), _) => connect_unix(dir, port, cfg).await,
            // `hostaddr` is where to connect; `host` the name TLS checks.
            (host, Some(ip)) => {
                let name = match host {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => ip.to_string(),
                };
                connect_tcp(&[SocketAddr::new(*ip, port)], &name, cfg, tls).await
            }
            (Some(Host::Tcp(name)), None) => {
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(found) => connect_tcp(&found.collect::<Vec<_>>(), name, cfg, tls).await,
                    Err(e) => Err(ReplicationError::Io(format!("cannot resolve {name}: {e}"))),
                }
            }
            (None, None) => continue,
        };
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ReplicationError::Config("no host to connect to".into())))
}

async fn connect_unix(
    dir: &Path,
    port: u16,
    cfg: &tokio_postgres::Config,
) -> Result<ReplicationConnection> {
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let socket = UnixStream::connect(&path)
        .await
        .map_err(|e| ReplicationError::Io(format!("cannot connect to {}: {e}", path.display())))?;
    // PostgreSQL has no TLS over Unix sockets (as libpq).
    startup(Box::new(socket), false, cfg).await
}

async fn connect_tcp(
    addrs: &[SocketAddr],
    host: &str,
    cfg: &tokio_postgres::Config,
    tls: &TlsConnector,
) -> Result<ReplicationConnection> {
    let mut last = ReplicationError::Io(format!("{host} resolved to no address"));
    for addr in addrs {
        let tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(e) => {
                last = ReplicationError::Io(format!("cannot connect to {addr}: {e}"));
                continue;
            }
        };
        set_keepalive(&tcp, cfg);
        let (socket, encrypted) = negotiate_tls(tcp, cfg.get_ssl_mode(), host, tls).await?;
        return startup(socket, encrypted, cfg).await;
    }
    Err(last)
}

/// Small messages (status updates) go out at once; dead peers are noticed
/// by TCP keepalive as configured (tokio-postgres's defaults: on, 2 h).
/// Best effort: a socket option that cannot be set is not fatal.
fn set_keepalive(tcp: &TcpStream, cfg: &tokio_postgres::Config) {
    let _ = tcp.set_nodelay(true);
    if cfg.get_keepalives() {
        let mut ka = socket2::TcpKeepalive::new().with_time(cfg.get_keepalives_idle());
        if let Some(interval) = cfg.get_keepalives_interval() {
            ka = ka.with_interval(interval);
        }
        if let Some(retries) = cfg.get_keepalives_retries() {
            ka = ka.with_retries(retries);
        }
        let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
    }
}

/// SSLRequest as tokio-postgres sends it; then the fill pool's connector,
/// so `pg_sslmode` (and verify-full's checks) apply exactly as for fills.
async fn negotiate_tls(
    mut tcp: TcpStream,
    mode: SslMode,
    host: &str,
    tls: &TlsConnector,
) -> Result<(BoxSocket, bool)> {
    if mode == SslMode::Disable {
        return Ok((Box::new(tcp), false));
    }
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await.map_err(io_err("SSLRequest"))?;
    // One byte read straight from the socket: nothing the server sends
    // before the handshake can be buffered and later taken as TLS data.
    let mut answer = [0u8];
    tcp.read_exact(&mut answer)
        .await
        .map_err(io_err("SSLRequest"))?;
    match answer[0] {
        b'S' => {
            let mut connector = tls.clone();
            let connect = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut connector, host)
                .map_err(|e| ReplicationError::Config(format!("TLS: {e}")))?;
            let stream = TlsConnect::connect(connect, tcp)
                .await
                .map_err(|e| ReplicationError::Io(format!("TLS handshake with {host}: {e}")))?;
            Ok((Box::new(stream), true))
        }
        b'N' if mode == SslMode::Require => Err(ReplicationError::Io(format!(
            "{host} does not support TLS, which pg_sslmode requires"
        ))),
        b'N' => Ok((Box::new(tcp), false)),
        other => Err(protocol(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        ))),
    }
}

/// StartupMessage, authentication and the server's parameters, up to the
/// first ReadyForQuery.
async fn startup(
    socket: BoxSocket,
    tls: bool,
    cfg: &tokio_postgres::Config,
) -> Result<ReplicationConnection> {
    let user = cfg
        .get_user()
        .ok_or_else(|| ReplicationError::Config("no user name".into()))?;
    let mut params = vec![
        ("user", user),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
        ("options", SESSION_OPTIONS),
        (
            "application_name",
            cfg.get_application_name().unwrap_or("pgcache"),
        ),
    ];
    if let Some(db) = cfg.get_dbname() {
        params.push(("database", db));
    }
    let mut conn = ReplicationConnection {
        socket,
        buf: BytesMut::with_capacity(64 * 1024),
        params: HashMap::new(),
        backend_pid: 0,
        tls,
        desynced: false,
    };
    let mut out = BytesMut::new();
    frontend::startup_message(params, &mut out)
        .map_err(|e| ReplicationError::Config(format!("startup parameters: {e}")))?;
    conn.write(&out).await?;
    authenticate(&mut conn, user, cfg.get_password()).await?;
    loop {
        match conn.read().await? {
            Backend::Msg(Message::ParameterStatus(p)) => conn.note_parameter(&p)?,
            Backend::Msg(Message::BackendKeyData(k)) => conn.backend_pid = k.process_id(),
            Backend::Msg(Message::NoticeResponse(_)) => {}
            Backend::Msg(Message::ReadyForQuery(_)) => return Ok(conn),
            Backend::Msg(Message::ErrorResponse(body)) => return Err(server_error(body.fields())),
            _ => return Err(protocol("unexpected message during startup")),
        }
    }
}

/// Whatever the server asks for among trust, cleartext, MD5 and
/// SCRAM-SHA-256 (without channel binding, which the client says it does
/// not support), up to AuthenticationOk.
async fn authenticate(
    conn: &mut ReplicationConnection,
    user: &str,
    password: Option<&[u8]>,
) -> Result<()> {
    let need_password = || {
        password.ok_or_else(|| {
            ReplicationError::Config("the server asks for a password and none is set".into())
        })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let message = match conn.read().await? {
            Backend::Msg(m) => m,
            Backend::CopyBoth => return Err(protocol("CopyBothResponse during authentication")),
        };
        let mut out = BytesMut::new();
        let encode = |e: std::io::Error| ReplicationError::Config(format!("password: {e}"));
        match message {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(need_password()?, &mut out).map_err(encode)?
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), need_password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut out).map_err(encode)?
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut has_scram = false;
                while let Some(m) = mechanisms
                    .next()
                    .map_err(|e| protocol(format!("SASL mechanisms: {e}")))?
                {
                    has_scram |= m == SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(protocol(
                        "the server offers no SASL mechanism pgcache supports",
                    ));
                }
                let s = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                    .map_err(encode)?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| protocol("SASL continue before SASL start"))?;
                s.update(body.data())
                    .map_err(|e| protocol(format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut out).map_err(encode)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                // Checks the server's signature: the server knew the
                // password too. Then AuthenticationOk follows.
                scram
                    .take()
                    .ok_or_else(|| protocol("SASL final before SASL start"))?
                    .finish(body.data())
                    .map_err(|e| protocol(format!("SCRAM: the server's proof failed: {e}")))?;
                continue;
            }
            Message::ErrorResponse(body) => return Err(server_error(body.fields())),
            Message::NoticeResponse(_) => continue,
            _ => {
                return Err(ReplicationError::Config(
                    "the server asks for an authentication method pgcache does not support \
                     (trust, password, md5 and scram-sha-256 are)"
                        .into(),
                ))
            }
        }
        conn.write(&out).await?;
    }
}

// ---------------------------------------------------------------------------
// streaming

/// A connection in CopyBoth mode after `START_REPLICATION`.
pub struct ReplicationStream {
    socket: BoxSocket,
    buf: BytesMut,
    backend_pid: i32,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// The walsender's process id.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Separate halves, so one task can wait for data and send status
    /// updates on a timer in the same `select!`.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        let (read, write) = tokio::io::split(self.socket);
        (
            StreamReader {
                read,
                buf: self.buf,
                done: false,
            },
            StreamWriter { write },
        )
    }
}

/// The receiving half of a replication stream.
pub struct StreamReader {
    read: ReadHalf<BoxSocket>,
    /// Bytes received and not yet returned (bytes already buffered at the
    /// CopyBothResponse included).
    buf: BytesMut,
    done: bool,
}

impl StreamReader {
    /// The next CopyData body: XLogData (`w`) or keepalive (`k`), for
    /// `pgcache_core::pgoutput::parse_frame`. `Ok(None)` once the server
    /// ends the copy (CopyDone, or CommandComplete at shutdown). A server
    /// error (the walsender terminated, ...) is `Server` with its SQLSTATE.
    ///
    /// Cancel-safe: received bytes stay in the buffer and a message is
    /// taken out only whole, so dropping this future (a `select!` branch
    /// losing) loses nothing.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        while !self.done {
            let (tag, mut frame) = read_frame(&mut self.read, &mut self.buf).await?;
            match tag {
                b'd' => {
                    frame.advance(5);
                    return Ok(Some(frame.freeze()));
                }
                b'c' | b'C' | b'Z' => self.done = true,
                b'E' => {
                    self.done = true;
                    return match parse_backend(tag, frame)? {
                        Backend::Msg(Message::ErrorResponse(body)) => {
                            Err(server_error(body.fields()))
                        }
                        _ => Err(protocol("malformed ErrorResponse")),
                    };
                }
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "unexpected message {:?} in the replication stream",
                        other as char
                    )))
                }
            }
        }
        Ok(None)
    }
}

/// The sending half of a replication stream.
pub struct StreamWriter {
    write: WriteHalf<BoxSocket>,
}

impl StreamWriter {
    /// Sends one CopyData message (a status update from
    /// `pgcache_core::pgoutput::status_update`) and flushes it. Not
    /// cancel-safe: call it from a `select!` branch's body, not as the
    /// branch's future.
    pub async fn send(&mut self, copy_data_body: &[u8]) -> Result<()> {
        let mut out = BytesMut::with_capacity(copy_data_body.len() + 5);
        frontend::CopyData::new(copy_data_body)
            .map_err(|e| protocol(format!("CopyData: {e}")))?
            .write(&mut out);
        self.send_raw(&out).await
    }

    /// Ends the copy from our side: the walsender answers with CopyDone, so
    /// the reader then returns `Ok(None)`.
    pub async fn copy_done(&mut self) -> Result<()> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        self.send_raw(&out).await
    }

    async fn send_raw(&mut self, out: &[u8]) -> Result<()> {
        let what = "sending to the server";
        self.write.write_all(out).await.map_err(io_err(what))?;
        self.write.flush().await.map_err(io_err(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted() {
        let sql =
            start_replication_sql("s\"x", 0x1_0000_00A0, &["p".into(), "It's, \"odd\"".into()]);
        assert_eq!(
            sql,
            "START_REPLICATION SLOT \"s\"\"x\" LOGICAL 1/A0 (proto_version '1', \
             publication_names '\"p\",\"It''s, \"\"odd\"\"\"', messages 'false')"
        );
    }

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.19 (Debian 15.19-1)"), Some(150019));
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("x"), None);
    }

    #[test]
    fn frames_are_bounded_and_taken_whole() {
        let mut buf = BytesMut::from(&b"d\0\0\0\x06ab"[..]);
        let (tag, frame) = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!((tag, &frame[5..]), (b'd', &b"ab"[..]));
        assert!(buf.is_empty());
        let mut partial = BytesMut::from(&b"d\0\0\0\x06a"[..]);
        assert!(take_frame(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 6, "nothing consumed");
        let mut huge = BytesMut::from(&b"d\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            take_frame(&mut huge),
            Err(ReplicationError::Protocol(_))
        ));
        let mut short = BytesMut::from(&b"d\0\0\0\x03"[..]);
        assert!(take_frame(&mut short).is_err());
    }

    #[test]
    fn copy_both_and_garbage_never_panic() {
        let w = BytesMut::from(&b"W\0\0\0\x07\0\0\0"[..]);
        assert!(matches!(parse_backend(b'W', w), Ok(Backend::CopyBoth)));
        let bad = BytesMut::from(&b"W\0\0\0\x07\0\0\x05"[..]);
        assert!(parse_backend(b'W', bad).is_err());
        for tag in [b'E', b'D', b'T', b'R', b'S', b'K', b'Z', b'?'] {
            for body in [&b""[..], b"\0", b"\xff\xff", b"C42704"] {
                let mut f = BytesMut::new();
                f.extend_from_slice(&[tag]);
                f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                f.extend_from_slice(body);
                let _ = parse_backend(tag, f);
            }
        }
    }
}
