//! Module settings: defaults, strict parsing of load arguments, and the one
//! validation path that both load arguments and `CONFIG SET` go through.

use thiserror::Error;

/// A bad setting; the message names it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SettingError {
    #[error("unknown argument '{0}'")]
    Unknown(String),
    #[error("argument '{0}' has no value")]
    MissingValue(String),
    #[error("invalid value for '{name}': {reason}")]
    Invalid { name: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What tells the module that rows changed (SPEC 6 and 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationSource {
    /// Triggers NOTIFY `invalidation_channel`; the module LISTENs.
    Notify,
    /// The module streams pgoutput from `replication_slot`.
    Replication,
    /// Nothing: entries live by their TTL.
    None,
}

impl InvalidationSource {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationSource::Notify => "notify",
            InvalidationSource::Replication => "replication",
            InvalidationSource::None => "none",
        }
    }
}

/// Which event types are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMask {
    pub hit: bool,
    pub miss: bool,
    pub write: bool,
    pub invalidate: bool,
}

impl EventMask {
    pub const ALL: EventMask = EventMask {
        hit: true,
        miss: true,
        write: true,
        invalidate: true,
    };
    pub const NONE: EventMask = EventMask {
        hit: false,
        miss: false,
        write: false,
        invalidate: false,
    };

    fn parse(raw: &str) -> Result<EventMask, String> {
        match raw.trim() {
            "all" => return Ok(EventMask::ALL),
            "none" | "" => return Ok(EventMask::NONE),
            _ => {}
        }
        let mut mask = EventMask::NONE;
        for part in raw.split(',').map(str::trim) {
            match part {
                "cache_hit" => mask.hit = true,
                "cache_miss" => mask.miss = true,
                "cache_write" => mask.write = true,
                "cache_invalidate" => mask.invalidate = true,
                other => {
                    return Err(format!(
                        "unknown event type '{other}' (expected all, none, or a comma list of cache_hit, cache_miss, cache_write, cache_invalidate)"
                    ))
                }
            }
        }
        Ok(mask)
    }

    fn render(self) -> String {
        if self == EventMask::ALL {
            return "all".into();
        }
        if self == EventMask::NONE {
            return "none".into();
        }
        let mut parts = Vec::new();
        for (on, name) in [
            (self.hit, "cache_hit"),
            (self.miss, "cache_miss"),
            (self.write, "cache_write"),
            (self.invalidate, "cache_invalidate"),
        ] {
            if on {
                parts.push(name);
            }
        }
        parts.join(",")
    }
}

/// What `CONFIG GET` answers for a password that is set.
pub const REDACTED: &str = "(redacted)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_database: String,
    pub pg_user: String,
    pub pg_password: String,
    pub pg_password_file: String,
    /// The password read from `pg_password_file`, when that is set.
    pub password_from_file: Option<String>,
    pub pg_url: String,
    pub pg_sslmode: SslMode,
    pub pg_sslrootcert: String,
    pub pg_pool_size: usize,
    pub pg_connect_timeout_ms: u64,
    pub pg_query_timeout_ms: u64,
    pub default_ttl: u64,
    pub negative_ttl: u64,
    pub cache_prefix: String,
    pub events: EventMask,
    pub events_channel: String,
    pub invalidation_channel: String,
    pub invalidation_source: InvalidationSource,
    pub replication_slot: String,
    /// Publication names, in order.
    pub replication_publication: Vec<String>,
    /// How far the position acknowledged to PostgreSQL trails the applied one.
    pub replication_ack_delay_ms: u64,
    /// Keys of one table in one batch beyond which the table is flushed.
    pub replication_txn_key_limit: usize,
    /// Allowlist of table key names (`users`, `app.users`); empty allows any.
    pub tables: Vec<String>,
    pub max_batch: usize,
    pub max_inflight: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pg_host: "localhost".into(),
            pg_port: 5432,
            pg_database: "postgres".into(),
            pg_user: "postgres".into(),
            pg_password: String::new(),
            pg_password_file: String::new(),
            password_from_file: None,
            pg_url: String::new(),
            pg_sslmode: SslMode::Prefer,
            pg_sslrootcert: String::new(),
            pg_pool_size: 8,
            pg_connect_timeout_ms: 5000,
            pg_query_timeout_ms: 5000,
            default_ttl: 3600,
            negative_ttl: 0,
            cache_prefix: "pg_cache:".into(),
            events: EventMask::ALL,
            events_channel: "pg_cache_events".into(),
            invalidation_channel: "cache_invalidation".into(),
            invalidation_source: InvalidationSource::Notify,
            replication_slot: "pgcache".into(),
            replication_publication: vec!["pgcache".into()],
            replication_ack_delay_ms: 5000,
            replication_txn_key_limit: 10_000,
            tables: Vec::new(),
            max_batch: 10_000,
            max_inflight: 10_000,
        }
    }
}

/// Every setting, in the order the README documents them. Each is a load
/// argument and a config `pgcache.<name>`.
pub const NAMES: &[&str] = &[
    "pg_host",
    "pg_port",
    "pg_database",
    "pg_user",
    "pg_password",
    "pg_password_file",
    "pg_url",
    "pg_sslmode",
    "pg_sslrootcert",
    "pg_pool_size",
    "pg_connect_timeout_ms",
    "pg_query_timeout_ms",
    "default_ttl",
    "negative_ttl",
    "cache_prefix",
    "events",
    "events_channel",
    "invalidation_channel",
    "invalidation_source",
    "replication_slot",
    "replication_publication",
    "replication_ack_delay_ms",
    "replication_txn_key_limit",
    "tables",
    "max_batch",
    "max_inflight",
];

/// Settings whose change needs a new PostgreSQL connection pool (its size
/// and timeouts included).
pub fn rebuilds_pool(name: &str) -> bool {
    name.starts_with("pg_")
}

/// Settings that change where the invalidation listener connects or what it
/// listens to: only these restart it (a restart is a gap, which drops the
/// cache). Timeouts and the pool size apply at its next reconnect.
pub fn restarts_listener(name: &str) -> bool {
    matches!(
        name,
        "pg_host"
            | "pg_port"
            | "pg_database"
            | "pg_user"
            | "pg_password"
            | "pg_password_file"
            | "pg_url"
            | "pg_sslmode"
            | "pg_sslrootcert"
            | "invalidation_channel"
            | "invalidation_source"
            | "replication_slot"
            | "replication_publication"
    )
}

/// Characters `cache_prefix` may end with: pgcache owns the keys under the
/// prefix, so it must end where a word cannot go on (`pg` would also cover
/// `pg_sessions:...`).
pub const PREFIX_SEPARATORS: &[char] = &[':', '/', '|', '.', '#'];

/// Whether a `pg_url` carries a password (in its user info or as a
/// `password` parameter): what `redact_url` would hide.
pub fn url_has_password(url: &str) -> bool {
    redact_url(url) != url
}

fn invalid(name: &str, reason: impl Into<String>) -> SettingError {
    SettingError::Invalid {
        name: name.into(),
        reason: reason.into(),
    }
}

fn int_in(name: &str, raw: &str, min: u64, max: u64) -> Result<u64, SettingError> {
    let n: u64 = raw
        .trim()
        .parse()
        .map_err(|_| invalid(name, format!("'{raw}' is not a non-negative integer")))?;
    if n < min || n > max {
        return Err(invalid(name, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

/// The allowlist's entries (comma-separated table names as PostgreSQL
/// reads them; a comma inside double quotes belongs to a name), in
/// key-name form.
fn allowlist(raw: &str) -> Result<Vec<String>, String> {
    let mut entries = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in raw.char_indices().chain([(raw.len(), ',')]) {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                let entry = raw[start..i.min(raw.len())].trim();
                start = i + 1;
                if entry.is_empty() {
                    continue;
                }
                entries.push(crate::schema::key_name_of_spelling(entry).ok_or_else(|| {
                    format!("'{entry}' is not a table name (name or schema.name, parts quoted where PostgreSQL needs it)")
                })?);
            }
            _ => {}
        }
    }
    Ok(entries)
}

impl Settings {
    /// Parses module load arguments strictly: name/value pairs in any order,
    /// every name known, every value valid.
    pub fn from_module_args<S: AsRef<str>>(args: &[S]) -> Result<Settings, SettingError> {
        let mut settings = Settings::default();
        let mut it = args.iter();
        while let Some(name) = it.next() {
            let name = name.as_ref();
            if !NAMES.contains(&name) {
                return Err(SettingError::Unknown(name.into()));
            }
            let value = it
                .next()
                .ok_or_else(|| SettingError::MissingValue(name.into()))?;
            settings.set(name, value.as_ref())?;
        }
        Ok(settings)
    }

    /// Sets one setting by name after validating the value.
    pub fn set(&mut self, name: &str, raw: &str) -> Result<(), SettingError> {
        match name {
            "pg_host" => {
                if raw.trim().is_empty() {
                    return Err(invalid(name, "must not be empty"));
                }
                self.pg_host = raw.into();
            }
            "pg_port" => self.pg_port = int_in(name, raw, 1, 65535)? as u16,
            "pg_database" => self.pg_database = raw.into(),
            "pg_user" => self.pg_user = raw.into(),
            "pg_password" => self.pg_password = raw.into(),
            "pg_password_file" => {
                if raw.is_empty() {
                    self.password_from_file = None;
                } else {
                    let text = std::fs::read_to_string(raw)
                        .map_err(|e| invalid(name, format!("cannot read '{raw}': {e}")))?;
                    let first = text.lines().next().unwrap_or("").to_owned();
                    self.password_from_file = Some(first);
                }
                self.pg_password_file = raw.into();
            }
            "pg_url" => {
                if !(raw.is_empty()
                    || raw.starts_with("postgresql://")
                    || raw.starts_with("postgres://"))
                {
                    return Err(invalid(name, "expected a postgresql:// URL"));
                }
                self.pg_url = raw.into();
            }
            "pg_sslmode" => {
                self.pg_sslmode = match raw {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(invalid(
                            name,
                            format!("'{raw}' is not one of disable, prefer, require, verify-full"),
                        ))
                    }
                }
            }
            "pg_sslrootcert" => self.pg_sslrootcert = raw.into(),
            "pg_pool_size" => self.pg_pool_size = int_in(name, raw, 1, 1024)? as usize,
            "pg_connect_timeout_ms" => {
                self.pg_connect_timeout_ms = int_in(name, raw, 1, 3_600_000)?
            }
            "pg_query_timeout_ms" => self.pg_query_timeout_ms = int_in(name, raw, 1, 3_600_000)?,
            "default_ttl" => self.default_ttl = int_in(name, raw, 0, i64::MAX as u64 / 1000)?,
            "negative_ttl" => self.negative_ttl = int_in(name, raw, 0, i64::MAX as u64 / 1000)?,
            "cache_prefix" => {
                if raw.is_empty() {
                    return Err(invalid(
                        name,
                        "must not be empty: pgcache owns the keys under it (the default is pg_cache:)",
                    ));
                }
                if !raw.ends_with(PREFIX_SEPARATORS) {
                    return Err(invalid(
                        name,
                        format!(
                            "'{raw}' must end in a separator, one of : / | . # (pgcache owns every key under the prefix; e.g. {raw}:)"
                        ),
                    ));
                }
                self.cache_prefix = raw.into();
            }
            "events" => self.events = EventMask::parse(raw).map_err(|r| invalid(name, r))?,
            "events_channel" => {
                if raw.is_empty() {
                    return Err(invalid(name, "must not be empty"));
                }
                self.events_channel = raw.into();
            }
            "invalidation_channel" => self.invalidation_channel = raw.into(),
            "invalidation_source" => {
                self.invalidation_source = match raw {
                    "notify" => InvalidationSource::Notify,
                    "replication" => InvalidationSource::Replication,
                    "none" => InvalidationSource::None,
                    _ => {
                        return Err(invalid(
                            name,
                            format!("'{raw}' is not one of notify, replication, none"),
                        ))
                    }
                }
            }
            "replication_slot" => {
                // PostgreSQL's own rule for slot names.
                if raw.is_empty()
                    || raw.len() > 63
                    || !raw
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(invalid(
                        name,
                        format!("'{raw}' is not a slot name (1 to 63 of a-z, 0-9 and _)"),
                    ));
                }
                self.replication_slot = raw.into();
            }
            "replication_publication" => {
                let names: Vec<String> = raw.split(',').map(|n| n.trim().to_owned()).collect();
                if let Some(bad) = names.iter().find(|n| n.is_empty() || n.len() > 63) {
                    return Err(invalid(
                        name,
                        format!(
                            "'{bad}' is not a publication name (a comma list of names of 1 to 63 bytes)"
                        ),
                    ));
                }
                self.replication_publication = names;
            }
            "replication_ack_delay_ms" => {
                self.replication_ack_delay_ms = int_in(name, raw, 0, 3_600_000)?
            }
            "replication_txn_key_limit" => {
                self.replication_txn_key_limit = int_in(name, raw, 1, 10_000_000)? as usize
            }
            "tables" => self.tables = allowlist(raw).map_err(|r| invalid(name, r))?,
            "max_batch" => self.max_batch = int_in(name, raw, 1, 1_000_000)? as usize,
            "max_inflight" => self.max_inflight = int_in(name, raw, 1, 10_000_000)? as usize,
            _ => return Err(SettingError::Unknown(name.into())),
        }
        Ok(())
    }

    /// The value `CONFIG GET` shows; the password is never shown.
    pub fn get(&self, name: &str) -> Option<String> {
        Some(match name {
            "pg_host" => self.pg_host.clone(),
            "pg_port" => self.pg_port.to_string(),
            "pg_database" => self.pg_database.clone(),
            "pg_user" => self.pg_user.clone(),
            "pg_password" => {
                if self.pg_password.is_empty() {
                    String::new()
                } else {
                    REDACTED.into()
                }
            }
            "pg_password_file" => self.pg_password_file.clone(),
            "pg_url" => redact_url(&self.pg_url),
            "pg_sslmode" => self.pg_sslmode.as_str().into(),
            "pg_sslrootcert" => self.pg_sslrootcert.clone(),
            "pg_pool_size" => self.pg_pool_size.to_string(),
            "pg_connect_timeout_ms" => self.pg_connect_timeout_ms.to_string(),
            "pg_query_timeout_ms" => self.pg_query_timeout_ms.to_string(),
            "default_ttl" => self.default_ttl.to_string(),
            "negative_ttl" => self.negative_ttl.to_string(),
            "cache_prefix" => self.cache_prefix.clone(),
            "events" => self.events.render(),
            "events_channel" => self.events_channel.clone(),
            "invalidation_channel" => self.invalidation_channel.clone(),
            "invalidation_source" => self.invalidation_source.as_str().into(),
            "replication_slot" => self.replication_slot.clone(),
            "replication_publication" => self.replication_publication.join(","),
            "replication_ack_delay_ms" => self.replication_ack_delay_ms.to_string(),
            "replication_txn_key_limit" => self.replication_txn_key_limit.to_string(),
            // `set` drops one `public.`: a table named `public.x` in
            // `public` (key name `public.x`) is shown as `public.public.x`.
            "tables" => self
                .tables
                .iter()
                .map(|t| {
                    if t.starts_with("public.") {
                        format!("public.{t}")
                    } else {
                        t.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            "max_batch" => self.max_batch.to_string(),
            "max_inflight" => self.max_inflight.to_string(),
            _ => return None,
        })
    }

    /// The password to connect with: the file's when `pg_password_file` is set.
    pub fn effective_password(&self) -> &str {
        self.password_from_file
            .as_deref()
            .unwrap_or(&self.pg_password)
    }

    /// The safety net of a client blocked on PostgreSQL (a fill or a table
    /// lookup): its answer is due within one connection and one query, each
    /// waited for once (the pool) and run once; past twice that and a
    /// second, the answer is lost and the client gets an error.
    pub fn answer_deadline_ms(&self) -> u64 {
        2 * (self.pg_connect_timeout_ms + self.pg_query_timeout_ms) + 1000
    }

    /// Whether an invalidation source runs (else entries live by TTL only).
    pub fn invalidation_enabled(&self) -> bool {
        match self.invalidation_source {
            InvalidationSource::Notify => !self.invalidation_channel.is_empty(),
            InvalidationSource::Replication => true,
            InvalidationSource::None => false,
        }
    }

    /// Whether a table (by key name) may be read through.
    pub fn table_allowed(&self, key_name: &str) -> bool {
        self.tables.is_empty() || self.tables.iter().any(|t| t == key_name)
    }
}

/// Hides the password part of a `postgresql://user:password@host/db` URL,
/// and `password=` query parameters, as tokio-postgres (which reads
/// `pg_url`) finds them: its credentials end at the first `@`, even past a
/// `/` or `?` in an unencoded password, RFC 3986's at the last `@` before
/// the path (the later of the two is hidden), and it percent-decodes
/// parameter names. Idempotent, so what `CONFIG GET` shows can be set again.
pub fn redact_url(url: &str) -> String {
    let mut shown = redact_url_once(url);
    // Hiding a span can join what remains into a longer one (an unencoded
    // `/`, `?` or `&` inside it); a few passes reach the fixed point.
    for _ in 0..8 {
        let again = redact_url_once(&shown);
        if again == shown {
            break;
        }
        shown = again;
    }
    shown
}

fn redact_url_once(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    // Byte ranges of `url` to hide.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    if let Some(first_at) = rest.find('@') {
        let host_end = rest[first_at..]
            .find(['/', '?'])
            .map_or(rest.len(), |e| first_at + e);
        let at = rest[..host_end].rfind('@').unwrap_or(first_at);
        if let Some(colon) = rest[..at].find(':') {
            spans.push((start + colon + 1, start + at));
        }
    }
    // Every `?` or `&` may start a parameter, whichever `?` starts the query.
    for (i, _) in rest.match_indices(['?', '&']) {
        let p = i + 1;
        let end = rest[p..].find('&').map_or(rest.len(), |e| p + e);
        if let Some((name, _)) = rest[p..end].split_once('=') {
            if percent_decoded(name) == b"password" {
                spans.push((start + p + name.len() + 1, start + end));
            }
        }
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(url.len() + REDACTED.len());
    let mut done = 0;
    for (s, e) in spans {
        if s >= done {
            out.push_str(&url[done..s]);
            out.push_str(REDACTED);
        }
        done = done.max(e);
    }
    out.push_str(&url[done..]);
    out
}

/// `%XX` decoded; a `%` not followed by two hex digits stays as it is.
fn percent_decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.filter(|h| b[i] == b'%' && h.bytes().all(|c| c.is_ascii_hexdigit())) {
            Some(h) => {
                out.push(u8::from_str_radix(h, 16).unwrap_or(0));
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_load_line_parses() {
        let s = Settings::from_module_args(&[
            "pg_host",
            "localhost",
            "pg_database",
            "myapp",
            "pg_user",
            "postgres",
            "pg_password",
            "secret",
            "default_ttl",
            "3600",
            "cache_prefix",
            "pg_cache:",
        ])
        .unwrap();
        assert_eq!(s.pg_database, "myapp");
        assert_eq!(s.pg_password, "secret");
        assert_eq!(s.get("pg_password").unwrap(), REDACTED);
        assert_eq!(s.default_ttl, 3600);
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = |args: &[&str]| Settings::from_module_args(args).unwrap_err().to_string();
        assert!(err(&["pg_hots", "x"]).contains("'pg_hots'"));
        assert!(err(&["pg_port"]).contains("'pg_port' has no value"));
        assert!(err(&["pg_port", "abc"]).contains("'pg_port'"));
        assert!(err(&["pg_port", "70000"]).contains("'pg_port'"));
        assert!(err(&["default_ttl", "-1"]).contains("'default_ttl'"));
        assert!(err(&["pg_sslmode", "sometimes"]).contains("'pg_sslmode'"));
        assert!(err(&["events", "cache_hit,bogus"]).contains("bogus"));
        assert!(err(&["pg_url", "mysql://x"]).contains("'pg_url'"));
        assert!(err(&["pg_password_file", "/nonexistent/pw"]).contains("'pg_password_file'"));
        assert!(err(&["max_batch", "0"]).contains("'max_batch'"));
    }

    #[test]
    fn cache_prefix_must_end_in_a_separator() {
        let mut s = Settings::default();
        for bad in ["", "pg", "pg_", "cache-"] {
            let e = s.set("cache_prefix", bad).unwrap_err().to_string();
            assert!(e.contains("'cache_prefix'"), "{bad:?}: {e}");
        }
        assert_eq!(s.cache_prefix, "pg_cache:");
        for good in ["app:cache:", "x/", "a|", "b.", "c#", ":"] {
            s.set("cache_prefix", good).unwrap();
            assert_eq!(s.cache_prefix, good);
        }
    }

    #[test]
    fn which_settings_restart_the_listener() {
        for name in [
            "pg_pool_size",
            "pg_query_timeout_ms",
            "pg_connect_timeout_ms",
            "default_ttl",
        ] {
            assert!(!restarts_listener(name), "{name}");
        }
        for name in ["pg_host", "pg_url", "pg_password", "invalidation_channel"] {
            assert!(restarts_listener(name), "{name}");
        }
        assert!(rebuilds_pool("pg_pool_size") && !rebuilds_pool("events"));
        assert!(url_has_password("postgresql://u:pw@h/db"));
        assert!(url_has_password("postgresql://h/db?password=x"));
        assert!(!url_has_password("postgresql://u@h/db"));
    }

    #[test]
    fn every_name_round_trips() {
        let s = Settings::default();
        for name in NAMES {
            let shown = s
                .get(name)
                .unwrap_or_else(|| panic!("{name} has no getter"));
            let mut t = s.clone();
            if *name != "pg_password_file" || !shown.is_empty() {
                t.set(name, &shown)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    #[test]
    fn replication_settings() {
        let err = |args: &[&str]| Settings::from_module_args(args).unwrap_err().to_string();
        let s = Settings::from_module_args(&[
            "invalidation_source",
            "replication",
            "replication_slot",
            "cache_1",
            "replication_publication",
            "a, b",
        ])
        .unwrap();
        assert_eq!(s.invalidation_source, InvalidationSource::Replication);
        assert!(s.invalidation_enabled());
        assert_eq!(s.get("replication_publication").unwrap(), "a,b");
        assert_eq!(s.get("replication_slot").unwrap(), "cache_1");
        assert!(err(&["invalidation_source", "trigger"]).contains("notify, replication, none"));
        for bad in ["", "Upper", "has-dash", &"x".repeat(64)] {
            assert!(
                err(&["replication_slot", bad]).contains("replication_slot"),
                "{bad}"
            );
        }
        assert!(err(&["replication_publication", "a,,b"]).contains("replication_publication"));
        let none = Settings::from_module_args(&["invalidation_source", "none"]).unwrap();
        assert!(!none.invalidation_enabled());
        let quiet = Settings::from_module_args(&["invalidation_channel", ""]).unwrap();
        assert!(!quiet.invalidation_enabled());
    }

    #[test]
    fn events_and_tables() {
        let mut s = Settings::default();
        s.set("events", "cache_hit, cache_write").unwrap();
        assert!(s.events.hit && s.events.write && !s.events.miss);
        assert_eq!(s.get("events").unwrap(), "cache_hit,cache_write");
        s.set("events", "none").unwrap();
        assert_eq!(s.events, EventMask::NONE);
        s.set("tables", "public.users, app.accounts").unwrap();
        assert!(
            s.table_allowed("users")
                && s.table_allowed("app.accounts")
                && !s.table_allowed("products")
        );
    }

    /// Found by fuzz/fuzz_targets/module_args.rs: `public.public.x` (the
    /// table `public.x` in `public`) came back from get as `public.x`,
    /// which set reads as the table `x`.
    #[test]
    fn tables_round_trip() {
        let mut s = Settings::default();
        s.set("tables", "\"public.x\", public.y, App.z,\"A,b\"")
            .unwrap();
        assert_eq!(s.tables, ["\"public.x\"", "y", "app.z", "\"A,b\""]);
        let shown = s.get("tables").unwrap();
        assert_eq!(shown, "\"public.x\",y,app.z,\"A,b\"");
        assert!(s.set("tables", "a.b.c").is_err());
        let mut t = Settings::default();
        t.set("tables", &shown).unwrap();
        assert_eq!(t, s);
    }

    #[test]
    fn password_file_first_line() {
        let path = std::env::temp_dir().join(format!("pgcache-pw-{}", std::process::id()));
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        let s = Settings::from_module_args(&["pg_password_file", path.to_str().unwrap()]).unwrap();
        assert_eq!(s.effective_password(), "s3cret");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn url_password_redacted() {
        assert_eq!(
            redact_url("postgresql://u:pw@h:5/db"),
            "postgresql://u:(redacted)@h:5/db"
        );
        assert_eq!(redact_url("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            redact_url("postgresql://h/db?sslmode=disable&password=x"),
            "postgresql://h/db?sslmode=disable&password=(redacted)"
        );
    }

    /// Found by fuzz/fuzz_targets/module_args.rs.
    #[test]
    fn url_redaction_follows_tokio_postgres() {
        // A `?` before the `://` made the old code slice past the end.
        let odd = "h?password=xxxxxxxxxxxxxxxx://u";
        assert_eq!(redact_url(odd), odd);
        // tokio-postgres ends the credentials at the first `@`, so these
        // unencoded passwords are "p/w" and "p?w".
        assert_eq!(
            redact_url("postgresql://u:p/w@h/db"),
            "postgresql://u:(redacted)@h/db"
        );
        assert_eq!(
            redact_url("postgresql://u:p?w@h/db?password=secret"),
            "postgresql://u:(redacted)@h/db?password=(redacted)"
        );
        // It percent-decodes parameter names.
        assert_eq!(
            redact_url("postgres://h/db?pass%77ord=secret&x=1"),
            "postgres://h/db?pass%77ord=(redacted)&x=1"
        );
        // An unencoded `@` in a password: RFC 3986's reading is hidden too.
        assert_eq!(
            redact_url("postgresql://u:p@ss@h/db"),
            "postgresql://u:(redacted)@h/db"
        );
        // What CONFIG GET shows is already redacted: showing it again
        // changes nothing (the round trip through CONFIG SET).
        for url in [
            "postgres://x;s://u@[::1tp(@[::1]m:5432!?",
            "postgresql://h?password=a:b&c@d&e",
        ] {
            let shown = redact_url(url);
            assert_eq!(redact_url(&shown), shown, "{url}");
        }
    }
}
