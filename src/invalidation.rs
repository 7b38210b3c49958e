//! Invalidation: the listener's notifications, table flushes
//! (PGCACHE.INVALIDATE_TABLE and TRUNCATE) and the flush after a gap.
//!
//! No gap: notifications sent while the listener is disconnected are lost,
//! so when it (re)connects every entry cached before is dropped by a
//! background flush, and until that flush ends no cached entry is served
//! (reads go to PostgreSQL). The module starts in that state too, so entries
//! loaded from an RDB or AOF file are never served as fresh.

use crate::cache;
use crate::fill::with_gil;
use crate::state::{self, shared, SETTINGS};
use pgcache_core::event::{EventType, Source};
use pgcache_core::notify::{parse_payload, row_keys, Operation};
use pgcache_core::{cache_key, CanonicalPk, Settings, TableSchema};
use pgcache_pg::listener::{self, ListenerEvent};
use redis_module::{raw, Context};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Listener states, as INFO shows them.
pub const LISTENER_OFF: u8 = 0;
pub const LISTENER_CONNECTING: u8 = 1;
pub const LISTENER_CONNECTED: u8 = 2;
pub const LISTENER_DISCONNECTED: u8 = 3;

pub static LISTENER_STATE: AtomicU8 = AtomicU8::new(LISTENER_OFF);

pub fn listener_state_name() -> &'static str {
    match LISTENER_STATE.load(Ordering::Relaxed) {
        LISTENER_CONNECTING => "connecting",
        LISTENER_CONNECTED => "connected",
        LISTENER_DISCONNECTED => "disconnected",
        _ => "off",
    }
}

/// While set, cached entries are not served: a gap flush is running.
pub static GAP_FLUSH: AtomicBool = AtomicBool::new(false);
static GAP_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Databases that may hold entries (bit n: database n; bit 63: 63 and up).
static USED_DBS: AtomicU64 = AtomicU64::new(0);

pub fn mark_db_used(db: i32) {
    USED_DBS.fetch_or(1u64 << db.clamp(0, 63), Ordering::Relaxed);
}

fn used_dbs() -> Vec<i32> {
    let bits = USED_DBS.load(Ordering::Relaxed);
    let mut dbs: Vec<i32> = (0..63).filter(|b| bits & (1u64 << b) != 0).collect();
    if bits & (1u64 << 63) != 0 {
        // Rare: databases past 62 are all visited.
        dbs.extend(63..databases());
    }
    dbs
}

/// `CONFIG GET databases`, read once at load (on the main thread).
static DATABASES: AtomicI32 = AtomicI32::new(16);

pub fn read_databases(ctx: &Context) {
    if let Ok(redis_module::RedisValue::Array(v)) = ctx.call("CONFIG", &["GET", "databases"][..]) {
        if let Some(
            redis_module::RedisValue::SimpleString(s) | redis_module::RedisValue::BulkString(s),
        ) = v.get(1)
        {
            if let Ok(n) = s.parse() {
                DATABASES.store(n, Ordering::Relaxed);
            }
        }
    }
}

fn databases() -> i32 {
    DATABASES.load(Ordering::Relaxed)
}

#[derive(Default)]
pub struct ListenerStats {
    pub notifications_received: AtomicU64,
    pub notifications_ignored: AtomicU64,
    pub entries_invalidated: AtomicU64,
    pub reconnects: AtomicU64,
    pub flushes: AtomicU64,
}

pub static LISTENER_STATS: LazyLock<ListenerStats> = LazyLock::new(ListenerStats::default);

static LISTENER_TASKS: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>> = Mutex::new(None);

/// Whether this instance is a replica: it then neither LISTENs nor writes.
pub static IS_REPLICA: AtomicBool = AtomicBool::new(false);

/// Logs from any thread, without taking Redis's lock.
fn log_warning(msg: &str) {
    redis_module::logging::log_warning(msg);
}

/// Starts (or restarts) the listener, unless it is turned off or this
/// instance is a replica (which serves what its primary replicates).
pub fn start_listener() {
    stop_listener();
    let settings = SETTINGS.load();
    if settings.invalidation_channel.is_empty() || IS_REPLICA.load(Ordering::Relaxed) {
        GAP_FLUSH.store(false, Ordering::Relaxed);
        return;
    }
    let (config, tls) = match pgcache_pg::config_and_tls(&settings) {
        Ok(c) => c,
        Err(e) => {
            GAP_FLUSH.store(false, Ordering::Relaxed);
            log_warning(&format!("pgcache: listener not started: {e}"));
            return;
        }
    };
    // Until the listener is connected and the gap flush is over, nothing
    // cached before is trusted.
    GAP_FLUSH.store(true, Ordering::Relaxed);
    LISTENER_STATE.store(LISTENER_CONNECTING, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let rt = state::runtime();
    let listen = rt.spawn(listener::run(
        config,
        tls,
        settings.invalidation_channel.clone(),
        tx,
    ));
    let handle = rt.spawn(handle_events(rx));
    *LISTENER_TASKS.lock().unwrap_or_else(|e| e.into_inner()) = Some((listen, handle));
}

pub fn stop_listener() {
    if let Some((listen, handle)) = LISTENER_TASKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        listen.abort();
        handle.abort();
    }
    LISTENER_STATE.store(LISTENER_OFF, Ordering::Relaxed);
}

async fn handle_events(mut rx: mpsc::UnboundedReceiver<ListenerEvent>) {
    // An event read while gathering a batch of notifications, handled next.
    let mut next: Option<ListenerEvent> = None;
    loop {
        let event = match next.take() {
            Some(e) => e,
            None => match rx.recv().await {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            ListenerEvent::Connected => {
                // Stop serving what was cached before the gap first, then say so.
                GAP_FLUSH.store(true, Ordering::Relaxed);
                LISTENER_STATE.store(LISTENER_CONNECTED, Ordering::Relaxed);
                with_gil(|ctx| {
                    ctx.log_notice(
                        "pgcache: invalidation listener connected; dropping entries cached before",
                    )
                });
                begin_gap_flush();
            }
            ListenerEvent::Disconnected(reason) => {
                let was = LISTENER_STATE.swap(LISTENER_DISCONNECTED, Ordering::Relaxed);
                if was == LISTENER_CONNECTED {
                    LISTENER_STATS.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if was != LISTENER_DISCONNECTED {
                    with_gil(|ctx| {
                        ctx.log_warning(&format!(
                            "pgcache: invalidation listener disconnected: {reason}; reconnecting"
                        ))
                    });
                }
            }
            ListenerEvent::Notification(first) => {
                // What has arrived meanwhile is handled together, in order,
                // with one hold of Redis's lock.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(ListenerEvent::Notification(p)) => batch.push(p),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let n = batch.len() as u64;
                LISTENER_STATS
                    .notifications_received
                    .fetch_add(n, Ordering::Relaxed);
                // A panic is counted and the listener goes on.
                if state::runtime()
                    .spawn(handle_notifications(batch))
                    .await
                    .is_err()
                {
                    LISTENER_STATS
                        .notifications_ignored
                        .fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }
}

fn ignored(why: String) {
    LISTENER_STATS
        .notifications_ignored
        .fetch_add(1, Ordering::Relaxed);
    with_gil(|ctx| ctx.log_debug(&format!("pgcache: notification ignored: {why}")));
}

/// Notifications received together, at most this many per batch.
const MAX_BATCH: usize = 512;

/// Keys to drop: the table, its keys, the trigger's operation.
type Drops = Vec<(Arc<TableSchema>, Vec<CanonicalPk>, &'static str)>;

async fn handle_notifications(batch: Vec<String>) {
    let mut drops: Drops = Vec::new();
    for payload in batch {
        let parsed = match parse_payload(&payload) {
            Ok(p) => p,
            Err(e) => {
                ignored(e.to_string());
                continue;
            }
        };
        let table = match lookup_table(&parsed.table).await {
            Ok(t) => t,
            Err(e) => {
                ignored(format!("table {}: {e}", parsed.table));
                continue;
            }
        };
        if parsed.operation == Operation::Truncate {
            // In order: what came before the TRUNCATE first.
            apply_drops(std::mem::take(&mut drops));
            flush(Scope::Table(table), (Source::Notify, Some("TRUNCATE"))).await;
            continue;
        }
        match row_keys(&table, &parsed) {
            Ok(keys) => drops.push((table, keys, parsed.operation.as_str())),
            Err(e) => ignored(e.to_string()),
        }
    }
    apply_drops(drops);
}

fn apply_drops(drops: Drops) {
    if drops.is_empty() {
        return;
    }
    with_gil(|ctx| {
        let settings = SETTINGS.load();
        let dbs = used_dbs();
        for (table, keys, op) in &drops {
            for pk in keys {
                if drop_entry(ctx, &settings, table, pk, &dbs, (Source::Notify, Some(op))) {
                    LISTENER_STATS
                        .entries_invalidated
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
}

/// Drops one entry in `dbs` (fills in flight for it are not cached) and
/// publishes its `cache_invalidate` event; a notification publishes only for
/// an entry it actually dropped. Returns whether an entry was dropped.
pub fn drop_entry(
    ctx: &Context,
    settings: &Settings,
    table: &TableSchema,
    pk: &CanonicalPk,
    dbs: &[i32],
    source: (Source, Option<&str>),
) -> bool {
    let key = cache_key(&settings.cache_prefix, table, pk);
    let mut dropped = false;
    for &db in dbs {
        cache::select_db(ctx, db);
        shared().fills.invalidate(&(db, key.clone()));
        dropped |= cache::delete(ctx, &key).unwrap_or(0) > 0;
    }
    ctx.log_debug(&format!(
        "pgcache: invalidated {key} ({})",
        source.1.unwrap_or("INVALIDATE")
    ));
    if dropped || source.0 == Source::Command {
        cache::publish(
            ctx,
            settings,
            EventType::Invalidate,
            table,
            &pk.json,
            Some(source),
        );
    }
    dropped
}

/// A table named by a payload or a command, from the catalog cache or
/// PostgreSQL's catalog.
pub async fn lookup_table(spelling: &str) -> Result<Arc<TableSchema>, pgcache_pg::PgError> {
    if let Some(t) = shared().table(spelling.as_bytes()) {
        return Ok(t);
    }
    let t = Arc::new(state::pg().resolve_table(spelling).await?);
    shared().remember_table(spelling.as_bytes(), t.clone());
    Ok(t)
}

/// Set while Redis loads an RDB/AOF file or a full sync: what it loads was
/// cached before a gap.
static LOADING: AtomicBool = AtomicBool::new(false);

/// Loading started: nothing loaded is trusted. Loading ended: flush it (once
/// the listener is connected; its connect flushes otherwise).
pub fn loading(started: bool) {
    if started {
        LOADING.store(true, Ordering::Relaxed);
        if LISTENER_STATE.load(Ordering::Relaxed) != LISTENER_OFF {
            GAP_FLUSH.store(true, Ordering::Relaxed);
        }
    } else {
        LOADING.store(false, Ordering::Relaxed);
        if LISTENER_STATE.load(Ordering::Relaxed) == LISTENER_CONNECTED {
            begin_gap_flush();
        }
    }
}

fn begin_gap_flush() {
    GAP_FLUSH.store(true, Ordering::Relaxed);
    let generation = GAP_GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    state::runtime().spawn(async move {
        // Entries still being loaded from an RDB/AOF file must be flushed too.
        while LOADING.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let dropped = flush(Scope::All, (Source::Flush, None)).await;
        // A newer gap restarted the flush: that one clears the flag.
        with_gil(|_| {
            if GAP_GENERATION.load(Ordering::Relaxed) == generation {
                GAP_FLUSH.store(false, Ordering::Relaxed);
                shared().fresh.clear();
            }
        });
        with_gil(|ctx| {
            ctx.log_notice(&format!(
                "pgcache: gap flush done, {dropped} entries dropped"
            ))
        });
    });
}

pub enum Scope {
    Table(Arc<TableSchema>),
    All,
}

/// Keys visited per hold of Redis's lock: small enough that other clients
/// wait at most a millisecond or two.
const SCAN_BATCH: usize = 1000;

/// An RM_Scan cursor. Not redis-module's `KeysCursor`: its `scan` retains
/// every key name it visits and never releases it (redis-module 2.0.8), a
/// leak of ~48 bytes per key scanned.
struct Cursor(*mut raw::RedisModuleScanCursor);
// SAFETY: the cursor is only used while Redis's lock is held, by one task.
unsafe impl Send for Cursor {}

impl Cursor {
    fn new() -> Cursor {
        Cursor(unsafe { raw::RedisModule_ScanCursorCreate.unwrap()() })
    }

    /// One step of the scan: `f` sees each key name, borrowed from Redis.
    /// False when the scan is over.
    fn scan<F: FnMut(&[u8])>(&self, ctx: &Context, f: &mut F) -> bool {
        extern "C" fn visit<F: FnMut(&[u8])>(
            _ctx: *mut raw::RedisModuleCtx,
            name: *mut raw::RedisModuleString,
            _key: *mut raw::RedisModuleKey,
            data: *mut std::ffi::c_void,
        ) {
            let mut len = 0usize;
            // SAFETY: Redis passes a live key name and our `f` as `data`.
            unsafe {
                let ptr = raw::RedisModule_StringPtrLen.unwrap()(name, &mut len);
                let f = &mut *data.cast::<F>();
                f(std::slice::from_raw_parts(ptr.cast::<u8>(), len));
            }
        }
        // SAFETY: the cursor is alive; Redis's lock is held (ctx).
        unsafe {
            raw::RedisModule_Scan.unwrap()(ctx.ctx, self.0, Some(visit::<F>), (f as *mut F).cast())
                != 0
        }
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        // SAFETY: created by ScanCursorCreate, destroyed once.
        unsafe { raw::RedisModule_ScanCursorDestroy.unwrap()(self.0) }
    }
}

/// Drops every entry in scope, a batch at a time, letting Redis serve other
/// clients between batches. Fills in flight for the scope are not cached.
pub async fn flush(scope: Scope, source: (Source, Option<&'static str>)) -> u64 {
    LISTENER_STATS.flushes.fetch_add(1, Ordering::Relaxed);
    let prefix = SETTINGS.load().cache_prefix.clone();
    let key_prefix = match &scope {
        Scope::Table(t) => format!("{prefix}{}:", t.key_name),
        Scope::All => prefix,
    };
    with_gil(|_| {
        let mut sh = shared();
        match &scope {
            Scope::Table(t) => {
                sh.fills.invalidate_table(&t.key_name);
            }
            Scope::All => {
                // From here on, what is stored is fresh and kept.
                sh.fills.invalidate_all();
                sh.fresh.clear();
            }
        }
    });
    let mut total = 0u64;
    // A gap flush visits every database: what was loaded from a file is not
    // in `used_dbs`.
    let dbs = match scope {
        Scope::Table(_) => used_dbs(),
        Scope::All => (0..databases()).collect(),
    };
    for db in dbs {
        let cursor = Cursor::new();
        loop {
            let mut more = false;
            with_gil(|ctx| {
                let (m, n) = flush_batch(ctx, db, &cursor, &scope, &key_prefix, source);
                more = m;
                total += n;
            });
            if !more {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    LISTENER_STATS
        .entries_invalidated
        .fetch_add(total, Ordering::Relaxed);
    total
}

/// The part after the prefix of a cache key: `<table>:{...}` (All) or
/// `{...}` (Table). Anything else is not ours and is left alone.
fn entry_suffix<'a>(name: &'a [u8], key_prefix: &str, scope: &Scope) -> Option<&'a [u8]> {
    let rest = name.strip_prefix(key_prefix.as_bytes())?;
    if rest.last() != Some(&b'}') {
        return None;
    }
    match scope {
        Scope::Table(_) => (rest.first() == Some(&b'{')).then_some(rest),
        Scope::All => rest.windows(2).any(|w| w == b":{").then_some(rest),
    }
}

fn flush_batch(
    ctx: &Context,
    db: i32,
    cursor: &Cursor,
    scope: &Scope,
    key_prefix: &str,
    source: (Source, Option<&'static str>),
) -> (bool, u64) {
    cache::select_db(ctx, db);
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut visited = 0usize;
    let mut more = true;
    while more && visited < SCAN_BATCH {
        let mut collect = |name: &[u8]| {
            visited += 1;
            if entry_suffix(name, key_prefix, scope).is_some() {
                names.push(name.to_vec());
            }
        };
        more = cursor.scan(ctx, &mut collect);
    }
    if matches!(scope, Scope::All) {
        let sh = shared();
        names.retain(|n| {
            std::str::from_utf8(n).map_or(true, |k| !sh.fresh.contains(&(db, k.to_owned())))
        });
    }
    if names.is_empty() {
        return (more, 0);
    }
    let refs: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    let dropped = cache::delete_many(ctx, &refs).unwrap_or(0);
    let settings = SETTINGS.load();
    if settings.events.invalidate {
        for name in &names {
            let Some(rest) = entry_suffix(name, key_prefix, scope) else {
                continue;
            };
            let rest = String::from_utf8_lossy(rest);
            match scope {
                Scope::Table(t) => cache::publish(
                    ctx,
                    &settings,
                    EventType::Invalidate,
                    t,
                    &rest,
                    Some(source),
                ),
                Scope::All => {
                    if let Some(split) = rest.find(":{") {
                        cache::publish_named(
                            ctx,
                            &settings,
                            EventType::Invalidate,
                            &rest[..split],
                            &rest[split + 1..],
                            Some(source),
                        );
                    }
                }
            }
        }
    }
    (more, dropped)
}

/// Reads see no entry while a gap flush runs.
pub fn entries_trusted() -> bool {
    !GAP_FLUSH.load(Ordering::Relaxed)
}
