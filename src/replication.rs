//! The `replication` invalidation source: streams pgoutput from a logical
//! replication slot (`pgcache_pg::replication`), turns each committed change
//! into the keys READ uses (`pgcache_core::replication`), and drops them,
//! once the commit is visible to other sessions, with the progress marker
//! written after them (design: `logical-replication.md`).
//!
//! - **No stale fill.** A commit can be streamed before other sessions see
//!   it (a synchronous standby not answering). Applying it then would let a
//!   fill that starts right after read the old row and cache it. So a batch
//!   is applied only once `pg_current_snapshot()` on the control connection
//!   shows every one of its transactions ended; a fill registered before the
//!   apply is detached by it, one registered after reads the new row.
//! - **Gap-free.** The marker (`<prefix>__replication`, db 0) holds the end
//!   of the last applied commit and the server, timeline and slot; it is
//!   written after the deletes it covers, so RDB, AOF and replicas carry it
//!   with them. On every (re)connection the resume rule decides between
//!   replaying from the marker (nothing flushed; nothing served until the
//!   replay reaches where PostgreSQL was) and a gap flush.
//! - Whatever cannot be mapped to a key exactly flushes its table.

use crate::catalog;
use crate::entries;
use crate::flush::{self, Target};
use crate::log;
use crate::redis::gil;
use crate::redis::keys;
use crate::redis::reply::redis_string;
use crate::runtime;
use crate::settings;
use crate::stats::{self, REPLICATION, STATS};
use pgcache_core::event::Source;
use pgcache_core::pgoutput::{self, format_lsn, parse_frame, parse_message, Frame, Lsn, Message};
use pgcache_core::replication::{
    change_keys, key_map, operation, plan, truncation_note, truncation_note_columns, Drops, KeyMap,
    Marker, Plan, Relation, Server, SlotAction, SlotState, Snapshot,
};
use pgcache_core::schema::key_name;
use pgcache_core::sql::{quote_ident, quote_literal};
use pgcache_core::{Settings, TableSchema};
use pgcache_pg::control::Control;
use pgcache_pg::listener::Resolver;
use pgcache_pg::replication::{ReplicationConnection, StreamReader, StreamWriter};
use redis_module::Context;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

static TASK: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

/// Bumped by every start and stop: work queued for Redis's lock by a
/// stopped session checks it and does nothing.
static SESSION: AtomicU64 = AtomicU64::new(0);

fn current(session: u64) -> bool {
    SESSION.load(Ordering::Acquire) == session
}

static CONNECT_FAILED: log::Every = log::Every::new(Duration::from_secs(60));
static UNMAPPED: log::Every = log::Every::new(Duration::from_secs(60));

/// The replication connection's `application_name`.
const APPLICATION_NAME: &str = "pgcache replication";
/// Transactions applied together, at most.
const MAX_BATCH_TXNS: usize = 1000;
/// After a batch is applied the stream is left unread this long, so that
/// what a busy server sends meanwhile is read in one gulp and applied as
/// one batch (reading each message as it came parked the thread once per
/// message). A commit on an idle stream is still applied as soon as it
/// arrives; a busy one waits at most this much longer.
const APPLY_PAUSE: Duration = Duration::from_millis(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Status updates go out this often (the walsender drops a client silent
/// for `wal_sender_timeout`), each asking for a keepalive back.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The publications' tables are read again this often: a table that left
/// them is flushed (pgoutput says nothing of it) and no longer cached.
const COVERAGE_INTERVAL: Duration = Duration::from_secs(10);
/// The slot's `wal_status` and `safe_wal_size` are read this often.
const SLOT_HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// Idle progress (keepalives) is written to the marker at most this often.
const IDLE_MARKER_INTERVAL: Duration = Duration::from_secs(1);

/// The marker's key: under the prefix, but not an entry's shape (no `:{`),
/// so no flush ever deletes it.
pub fn marker_key(settings: &Settings) -> String {
    format!("{}__replication", settings.cache_prefix)
}

/// Starts (or restarts) the source. Under Redis's lock (the main thread).
pub fn start() {
    stop();
    let session = SESSION.fetch_add(1, Ordering::AcqRel) + 1;
    entries::listener_started(true);
    if entries::is_replica() {
        return;
    }
    entries::set_listener(entries::LISTENER_CONNECTING);
    set_state(stats::REPLICATION_CONNECTING);
    let handle = runtime::spawn_stream(run(session));
    *TASK.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
}

/// Another source starts: the marker is deleted, since entries cached from
/// now on are not covered by the stream's progress (a table outside the
/// publications may be cached), so a later replication source starts with
/// a gap flush rather than resuming from it.
pub fn forget_marker() {
    let key = marker_key(&settings::current());
    runtime::spawn("forgetting the replication marker", async move {
        let _ = gil::run(move |ctx| {
            if entries::is_replica() {
                return;
            }
            let selected = keys::selected_db(ctx);
            keys::select_db(ctx, 0);
            let name = redis_string(Some(ctx), key.as_bytes());
            if keys::delete_string(ctx, &name) {
                keys::replicate_del(ctx, &[&name]);
            }
            keys::select_db(ctx, selected);
        })
        .await;
    });
}

pub fn stop() {
    SESSION.fetch_add(1, Ordering::AcqRel);
    if let Some(task) = TASK.lock().unwrap_or_else(|e| e.into_inner()).take() {
        task.abort();
    }
    entries::set_listener(entries::LISTENER_OFF);
    set_state(stats::REPLICATION_OFF);
}

fn set_state(state: u8) {
    REPLICATION.state.store(state, Ordering::Relaxed);
}

/// Aborts a task when dropped: a session runs in its own task (so that a
/// panic in it ends the session, not the source), which must not outlive
/// the source's task when that is aborted.
struct AbortOnDrop(JoinHandle<Result<(), Ended>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a session ended; `streamed` when it got as far as streaming.
struct Ended {
    streamed: bool,
    reason: String,
}

fn ended(streamed: bool, reason: impl Into<String>) -> Ended {
    Ended {
        streamed,
        reason: reason.into(),
    }
}

async fn run(session: u64) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut task = AbortOnDrop(tokio::spawn(stream(session)));
        let outcome = match (&mut task.0).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => ended(true, "internal error in the replication source"),
        };
        drop(task);
        if !current(session) {
            return;
        }
        let was = entries::listener();
        let reason = outcome.reason.clone();
        let _ = gil::run(move |_| {
            if current(session) {
                entries::source_lost(was, &reason);
            }
        })
        .await;
        set_state(stats::REPLICATION_DISCONNECTED);
        if outcome.streamed {
            log::warning(&format!(
                "pgcache: replication stream ended: {}; reconnecting",
                outcome.reason
            ));
            backoff = FIRST_BACKOFF;
        } else {
            CONNECT_FAILED.log(log::warning, || {
                format!(
                    "pgcache: replication cannot start: {}; retrying (until it streams, cached entries are not served and fills are not cached)",
                    outcome.reason
                )
            });
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Reads the marker (db 0).
async fn read_marker(key: String) -> Result<Option<Vec<u8>>, Ended> {
    gil::run(move |ctx| {
        keys::select_db(ctx, 0);
        let name = redis_string(Some(ctx), key.as_bytes());
        keys::read(ctx, &name, |v| match v {
            keys::Value::String(b) => Some(b.to_vec()),
            _ => None,
        })
    })
    .await
    .map_err(|_| ended(false, "internal error reading the progress marker"))
}

/// Writes the marker in the caller's hold of Redis's lock (db 0; the
/// selected database is restored); false while a gap flush runs: until it
/// ends, entries cached before the gap are still there, and an RDB saved
/// now must not say they were covered.
fn write_marker(ctx: &Context, key: &str, marker: &Marker) -> bool {
    if entries::flushing_generation().is_some() || !entries::listener_is_connected() {
        return false;
    }
    let selected = keys::selected_db(ctx);
    keys::select_db(ctx, 0);
    let name = redis_string(Some(ctx), key.as_bytes());
    if let Err(e) = keys::store(ctx, &name, marker.encode().as_bytes(), 0) {
        log::warning(&format!(
            "pgcache: cannot write the replication marker: {e}"
        ));
    }
    keys::select_db(ctx, selected);
    true
}

fn text(rows: &[Vec<Option<String>>], row: usize, col: usize) -> Option<&str> {
    rows.get(row)?.get(col)?.as_deref()
}

/// One connection's life: connect, decide, stream until it fails.
async fn stream(session: u64) -> Result<(), Ended> {
    let settings = arc_swap::Guard::into_inner(settings::current());
    let (mut config, tls) =
        pgcache_pg::config_and_tls(&settings).map_err(|e| ended(false, e.to_string()))?;
    let timeout = Duration::from_millis(settings.pg_query_timeout_ms);
    let control = Control::connect(config.clone(), tls.clone(), timeout)
        .await
        .map_err(|e| ended(false, e.to_string()))?;
    config.application_name(APPLICATION_NAME);
    let mut conn = ReplicationConnection::connect(&config, &tls)
        .await
        .map_err(|e| ended(false, e.to_string()))?;
    let fail = |what: &str, e: &dyn std::fmt::Display| ended(false, format!("{what}: {e}"));
    if conn.server_version_num().is_some_and(|v| v < 130000) {
        return Err(ended(
            false,
            "invalidation_source replication needs PostgreSQL 13 or later",
        ));
    }
    let ident = conn
        .identify_system()
        .await
        .map_err(|e| fail("IDENTIFY_SYSTEM failed", &e))?;
    let server = Server {
        system_id: ident.system_id.clone(),
        timeline: ident.timeline,
        database: ident.dbname.clone().unwrap_or_default(),
        xlogpos: ident.xlogpos,
    };
    let wal_level = conn
        .simple_query("SELECT current_setting('wal_level')")
        .await
        .map_err(|e| fail("cannot read wal_level", &e))?;
    if text(&wal_level, 0, 0) != Some("logical") {
        return Err(ended(
            false,
            format!(
                "invalidation_source replication needs wal_level = logical (it is {}; changing it needs a PostgreSQL restart)",
                text(&wal_level, 0, 0).unwrap_or("unknown")
            ),
        ));
    }
    check_publications(&mut conn, &settings.replication_publication).await?;
    let slot_name = settings.replication_slot.clone();
    let slot = read_slot(&mut conn, &slot_name).await?;
    if let Some(s) = &slot {
        if s.plugin != "pgoutput" || s.database != server.database {
            return Err(ended(
                false,
                format!(
                    "replication_slot '{slot_name}' exists for plugin '{}' in database '{}', not pgoutput in '{}': choose another replication_slot",
                    s.plugin, s.database, server.database
                ),
            ));
        }
    }
    let marker_key = marker_key(&settings);
    let marker = match read_marker(marker_key.clone()).await? {
        Some(bytes) => match Marker::decode(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                log::warning(&format!(
                    "pgcache: the replication marker {marker_key} is not valid ({e}); everything cached is flushed"
                ));
                None
            }
        },
        None => None,
    };
    let decided = plan(marker.as_ref(), &server, &slot_name, slot.as_ref());
    let published = published(&control, &settings, false).await?;
    let tables: Arc<[String]> = published.iter().cloned().collect();
    let mut uncovered = cover(published, false).await?;
    if let (Plan::Resume { .. }, Some(m)) = (&decided, &marker) {
        // Left the publications while this source was away (a restart).
        for t in m.tables.iter() {
            if !tables.contains(t) && !uncovered.contains(t) {
                uncovered.push(t.clone());
            }
        }
    }
    let start = match &decided {
        Plan::Resume { from } => *from,
        Plan::Gap {
            reason,
            slot: action,
        } => {
            if *action != SlotAction::Use {
                if *action == SlotAction::Recreate {
                    log::warning(&format!(
                        "pgcache: replication slot '{slot_name}' {}; dropping and recreating it (everything cached is flushed)",
                        reason.describe()
                    ));
                    conn.simple_query(&format!(
                        "DROP_REPLICATION_SLOT {}",
                        quote_ident(&slot_name)
                    ))
                    .await
                    .map_err(|e| fail("cannot drop the lost slot", &e))?;
                }
                set_state(stats::REPLICATION_CREATING_SLOT);
                // Waits for every transaction holding an xid to end: this
                // task may wait, Redis does not.
                let created = conn
                    .simple_query(&format!(
                        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                        quote_ident(&slot_name)
                    ))
                    .await
                    .map_err(|e| fail("cannot create the replication slot", &e))?;
                log::notice(&format!(
                    "pgcache: created replication slot '{slot_name}' at {}",
                    text(&created, 0, 1).unwrap_or("?")
                ));
                text(&created, 0, 1)
                    .and_then(pgoutput::parse_lsn)
                    .unwrap_or(0)
            } else {
                slot.as_ref().and_then(|s| s.confirmed_flush).unwrap_or(0)
            }
        }
    };
    // Resumed entries are trusted once everything visible now is applied:
    // IDENTIFY_SYSTEM's position is the flushed WAL, which misses commits
    // made with synchronous_commit = off and not flushed yet.
    let insert_lsn = control
        .wal_insert_lsn()
        .await
        .map_err(|e| fail("cannot read the WAL position", &e))?;
    let catch_up = pgoutput::parse_lsn(&insert_lsn)
        .unwrap_or(0)
        .max(server.xlogpos);
    // For a gap, the slot's own position: what streams is what commits
    // after it (the server moves a start below it forward anyway).
    let stream = conn
        .start_replication(&slot_name, start, &settings.replication_publication)
        .await
        .map_err(|e| fail("START_REPLICATION failed", &e))?;
    let resolver = control.resolver();
    // Streaming: the trust state moves in the same hold as the listener
    // state, so INFO never shows one without the other.
    let resumed = matches!(decided, Plan::Resume { .. });
    let gap_reason = match &decided {
        Plan::Gap { reason, .. } => Some(*reason),
        Plan::Resume { .. } => None,
    };
    let flush = gil::run(move |_| {
        if !current(session) {
            return Err(());
        }
        entries::set_listener(entries::LISTENER_CONNECTED);
        entries::set_listener_error("");
        Ok(if resumed {
            entries::replication_resumed();
            None
        } else {
            entries::listener_connected()
        })
    })
    .await
    .map_err(|_| ended(false, "internal error"))?
    .map_err(|()| ended(false, "stopped"))?;
    match gap_reason {
        None => {
            stats::inc(&STATS.replication_resumes);
            log::notice(&format!(
                "pgcache: replication resumed from {} (slot '{slot_name}'); nothing flushed",
                format_lsn(start)
            ));
        }
        Some(reason) => {
            stats::inc(&STATS.replication_gap_flushes);
            *REPLICATION
                .last_gap_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = reason.as_str().to_owned();
            log::notice(&format!(
                "pgcache: replication streaming (slot '{slot_name}'); {}: dropping entries cached before",
                reason.describe()
            ));
            if let Some(generation) = flush {
                flush::gap(generation, Some(resolver.clone()));
            }
        }
    }
    flush_uncovered(uncovered).await?;
    REPLICATION.applied_lsn.store(start, Ordering::Relaxed);
    REPLICATION
        .server_lsn
        .store(server.xlogpos, Ordering::Relaxed);
    let mut applier = Applier {
        session,
        settings,
        marker: Marker {
            system_id: server.system_id.clone(),
            timeline: server.timeline,
            database: server.database.clone(),
            slot: slot_name,
            lsn: start,
            tables,
        },
        persisted: if resumed { start } else { 0 },
        persisted_tables: marker.map_or_else(|| Arc::from(Vec::new()), |m| m.tables),
        marker_key,
        control,
        resolver,
        catch_up_to: if resumed { Some(catch_up) } else { None },
        relations: HashMap::new(),
        snapshot: None,
        acked_history: VecDeque::new(),
        acked: 0,
        last_status: Instant::now(),
        last_idle_marker: Instant::now(),
        last_coverage: Instant::now(),
        last_slot_health: Instant::now(),
    };
    applier.read_slot_health().await?;
    set_state(if resumed {
        stats::REPLICATION_CATCHING_UP
    } else {
        stats::REPLICATION_STREAMING
    });
    applier.acked_history.push_back((Instant::now(), start));
    applier.check_caught_up(start).await;
    let (reader, writer) = stream.split();
    applier.stream(reader, writer).await
}

/// The tables (key names) the publications stream every change of.
async fn published(
    control: &Control,
    settings: &Settings,
    streamed: bool,
) -> Result<BTreeSet<String>, Ended> {
    let tables = control
        .published_tables(&settings.replication_publication)
        .await
        .map_err(|e| {
            ended(
                streamed,
                format!("cannot read the publications' tables: {e}"),
            )
        })?;
    Ok(tables
        .iter()
        .map(|(schema, name)| key_name(schema, name))
        .collect())
}

/// Makes `tables` the covered ones (`entries::coverage`); those covered
/// before and not now.
async fn cover(tables: BTreeSet<String>, streamed: bool) -> Result<Vec<String>, Ended> {
    gil::run(move |_| entries::coverage::cover_only(tables.into_iter().collect()))
        .await
        .map_err(|_| ended(streamed, "internal error"))
}

/// Flushes the tables that left the publications: their changes are no
/// longer streamed.
async fn flush_uncovered(tables: Vec<String>) -> Result<(), Ended> {
    for name in tables {
        log::notice(&format!(
            "pgcache: {name} is no longer in replication_publication; its entries are dropped and its rows no longer cached"
        ));
        stats::inc(&STATS.replication_tables_flushed);
        flush::table(
            Target::Named(name),
            Some((Source::Replication, Some("UNPUBLISH"))),
        )
        .await
        .map_err(|e| ended(true, format!("a table flush failed: {e}")))?;
    }
    Ok(())
}

async fn check_publications(
    conn: &mut ReplicationConnection,
    names: &[String],
) -> Result<(), Ended> {
    let list = names
        .iter()
        .map(|n| quote_literal(n))
        .collect::<Vec<_>>()
        .join(",");
    let rows = conn
        .simple_query(&format!(
            "SELECT pubname FROM pg_catalog.pg_publication WHERE pubname IN ({list})"
        ))
        .await
        .map_err(|e| ended(false, format!("cannot read the publications: {e}")))?;
    for name in names {
        if !rows
            .iter()
            .any(|r| r.first().and_then(|v| v.as_deref()) == Some(name))
        {
            return Err(ended(
                false,
                format!(
                    "replication_publication '{name}' does not exist: create it with SELECT pgcache_publish('<table>') (sql/pgcache.sql)"
                ),
            ));
        }
    }
    Ok(())
}

async fn read_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<Option<SlotState>, Ended> {
    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(plugin, ''), coalesce(database, ''), confirmed_flush_lsn::text, \
             coalesce(wal_status, ''), active_pid::text \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await
        .map_err(|e| ended(false, format!("cannot read the replication slot: {e}")))?;
    if rows.is_empty() {
        return Ok(None);
    }
    if let Some(pid) = text(&rows, 0, 4) {
        return Err(ended(
            false,
            format!("replication_slot '{slot}' is in use by process {pid}"),
        ));
    }
    Ok(Some(SlotState {
        plugin: text(&rows, 0, 0).unwrap_or("").to_owned(),
        database: text(&rows, 0, 1).unwrap_or("").to_owned(),
        confirmed_flush: text(&rows, 0, 2).and_then(pgoutput::parse_lsn),
        wal_status: text(&rows, 0, 3).unwrap_or("").to_owned(),
    }))
}

/// Records the slot's WAL status and free WAL for INFO; warns once per
/// change to `unreserved` or `lost`.
fn slot_health(status: &str, safe_wal_size: Option<i64>) {
    REPLICATION
        .slot_safe_wal_size
        .store(safe_wal_size.unwrap_or(-1), Ordering::Relaxed);
    let mut was = REPLICATION
        .slot_wal_status
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if *was != status && (status == "unreserved" || status == "lost") {
        log::warning(&format!(
            "pgcache: replication slot WAL status is '{status}': the module is further behind than max_slot_wal_keep_size allows; PostgreSQL {} the slot, and the next connection drops everything cached",
            if status == "lost" { "gave up" } else { "will give up" }
        ));
    }
    status.clone_into(&mut was);
}

/// How a relation's changes are applied.
enum Mapping {
    Keys(KeyMap),
    /// Its entries cannot be named key by key: each change flushes it.
    Flush(Target),
    /// Not a table pgcache caches (no primary key, a key type it cannot
    /// use): nothing to drop.
    NotCached,
}

struct RelationState {
    key_name: String,
    mapping: Mapping,
    /// A truncation notes table: where its rows name the root.
    notes: Option<(usize, usize)>,
}

/// One committed transaction, not applied yet.
struct Committed {
    xid: u32,
    end_lsn: Lsn,
    drops: Drops,
}

struct Applier {
    session: u64,
    settings: Arc<Settings>,
    /// What the marker should say: applied up to `marker.lsn`.
    marker: Marker,
    /// What the marker in Redis says (0: not written in this session).
    persisted: Lsn,
    persisted_tables: Arc<[String]>,
    marker_key: String,
    control: Control,
    resolver: Resolver,
    /// Resumed: entries are trusted once applied reaches this.
    catch_up_to: Option<Lsn>,
    relations: HashMap<u32, RelationState>,
    /// The latest snapshot read: a transaction visible in it stays visible.
    snapshot: Option<Snapshot>,
    /// Applied positions with when they were applied: what is acknowledged
    /// trails the applied by `replication_ack_delay_ms`.
    acked_history: VecDeque<(Instant, Lsn)>,
    acked: Lsn,
    last_status: Instant,
    last_idle_marker: Instant,
    last_coverage: Instant,
    last_slot_health: Instant,
}

/// The transaction being decoded.
struct Open {
    xid: u32,
    drops: Drops,
}

/// `f`'s output if it is ready at its first poll. (Not
/// `timeout(Duration::ZERO, f)`: tokio rounds a deadline up to its timer's
/// next millisecond, so that waited for whatever arrived meanwhile: a
/// stream busier than a message a millisecond was applied only when it
/// paused, or once `MAX_BATCH_TXNS` transactions had piled up.)
async fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

fn pg_now() -> i64 {
    // Microseconds since 2000-01-01, PostgreSQL's epoch.
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_UNIX_SECS * 1_000_000
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Applier {
    async fn stream(
        &mut self,
        mut reader: StreamReader,
        mut writer: StreamWriter,
    ) -> Result<(), Ended> {
        let mut open: Option<Open> = None;
        let mut committed: Vec<Committed> = Vec::new();
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Apply what committed once nothing more is waiting to be read
            // (or the batch is full).
            let body = if committed.is_empty() {
                tokio::select! {
                    m = reader.next() => Some(m),
                    _ = tick.tick() => None,
                }
            } else if committed.len() >= MAX_BATCH_TXNS {
                None
            } else {
                // What is already received joins the batch.
                poll_once(reader.next()).await
            };
            let body = match body {
                None => {
                    if !committed.is_empty() {
                        let drained = committed.len() < MAX_BATCH_TXNS;
                        let batch = std::mem::take(&mut committed);
                        self.apply(batch, &mut writer).await?;
                        if drained {
                            tokio::time::sleep(APPLY_PAUSE).await;
                        }
                    } else if open.is_none() {
                        self.persist().await?;
                    }
                    if self.last_coverage.elapsed() >= COVERAGE_INTERVAL {
                        self.last_coverage = Instant::now();
                        self.refresh_coverage().await?;
                    }
                    if self.last_slot_health.elapsed() >= SLOT_HEALTH_INTERVAL {
                        self.last_slot_health = Instant::now();
                        self.read_slot_health().await?;
                    }
                    self.send_status(&mut writer, false).await?;
                    continue;
                }
                Some(Ok(Some(body))) => body,
                Some(Ok(None)) => return Err(ended(true, "the server ended the stream")),
                Some(Err(e)) => return Err(ended(true, e.to_string())),
            };
            let frame = parse_frame(&body).map_err(|e| ended(true, e.to_string()))?;
            match frame {
                Frame::Keepalive { wal_end, reply, .. } => {
                    REPLICATION.server_lsn.fetch_max(wal_end, Ordering::Relaxed);
                    if open.is_none() && committed.is_empty() {
                        self.idle_at(wal_end).await;
                    }
                    self.track_lag();
                    if reply {
                        self.send_status(&mut writer, true).await?;
                    }
                }
                Frame::XLogData { wal_end, data, .. } => {
                    REPLICATION.server_lsn.fetch_max(wal_end, Ordering::Relaxed);
                    let message = parse_message(data).map_err(|e| ended(true, e.to_string()))?;
                    self.message(message, &mut open, &mut committed).await?;
                }
            }
        }
    }

    async fn message(
        &mut self,
        message: Message<'_>,
        open: &mut Option<Open>,
        committed: &mut Vec<Committed>,
    ) -> Result<(), Ended> {
        let limit = self.settings.replication_txn_key_limit;
        match &message {
            Message::Begin { xid, .. } => {
                *open = Some(Open {
                    xid: *xid,
                    drops: Drops::default(),
                });
            }
            Message::Commit { end_lsn, .. } => {
                let Some(txn) = open.take() else {
                    return Err(ended(true, "a Commit without its Begin"));
                };
                committed.push(Committed {
                    xid: txn.xid,
                    end_lsn: *end_lsn,
                    drops: txn.drops,
                });
            }
            Message::Relation { .. } => {
                if let Some(rel) = Relation::from_message(&message) {
                    self.resolve(rel).await;
                }
            }
            Message::Insert { oid, .. }
            | Message::Update { oid, .. }
            | Message::Delete { oid, .. } => {
                let Some(txn) = open.as_mut() else {
                    return Err(ended(true, "a change outside a transaction"));
                };
                txn.drops.changes += 1;
                let op = operation(&message);
                if let Some(cols) = self.relations.get(oid).and_then(|r| r.notes) {
                    // A partition's TRUNCATE: flush its root's entries.
                    if let Some((schema, name)) = truncation_note(cols, &message) {
                        let root = key_name(&schema, &name);
                        let table = catalog::by_key_name(&root);
                        txn.drops.flush_table(root, table, "TRUNCATE");
                    }
                    return Ok(());
                }
                match self.relations.get(oid).map(|r| &r.mapping) {
                    Some(Mapping::Keys(map)) => match change_keys(map, &message) {
                        Ok(keys) => txn.drops.add_keys(&map.table, keys, op, limit),
                        Err(why) => {
                            UNMAPPED.log(log::warning, || {
                                format!(
                                    "pgcache: a change of {} cannot be mapped to a key ({why}); flushing the table",
                                    map.table.key_name
                                )
                            });
                            txn.drops.flush_table(
                                map.table.key_name.clone(),
                                Some(map.table.clone()),
                                op,
                            );
                        }
                    },
                    Some(Mapping::Flush(target)) => {
                        let name = self.relations[oid].key_name.clone();
                        let table = match target {
                            Target::Table(t) => Some(t.clone()),
                            Target::Named(_) => None,
                        };
                        txn.drops.flush_table(name, table, op);
                    }
                    Some(Mapping::NotCached) => {}
                    None => {
                        return Err(ended(
                            true,
                            format!("a change of relation {oid} before its Relation message"),
                        ))
                    }
                }
            }
            Message::Truncate { oids, .. } => {
                let Some(txn) = open.as_mut() else {
                    return Err(ended(true, "a TRUNCATE outside a transaction"));
                };
                for oid in oids {
                    match self.relations.get(oid) {
                        Some(RelationState {
                            mapping: Mapping::Keys(map),
                            ..
                        }) => txn.drops.flush_table(
                            map.table.key_name.clone(),
                            Some(map.table.clone()),
                            "TRUNCATE",
                        ),
                        Some(RelationState {
                            mapping: Mapping::Flush(target),
                            key_name,
                            ..
                        }) => {
                            let table = match target {
                                Target::Table(t) => Some(t.clone()),
                                Target::Named(_) => None,
                            };
                            txn.drops.flush_table(key_name.clone(), table, "TRUNCATE");
                        }
                        Some(_) => {}
                        None => {
                            return Err(ended(
                                true,
                                format!("a TRUNCATE of relation {oid} before its Relation message"),
                            ))
                        }
                    }
                }
            }
            Message::Origin { .. } | Message::Type { .. } | Message::Logical { .. } => {}
        }
        Ok(())
    }

    /// Looks the relation's table up in the module's catalog and maps its
    /// key columns.
    async fn resolve(&mut self, rel: Relation) {
        let name = rel.key_name();
        let spelling = format!("{}.{}", quote_ident(&rel.schema), quote_ident(&rel.name));
        let found =
            catalog::payload_table(Some(&rel.schema), &rel.name, &spelling, &self.resolver).await;
        let mapping = match found {
            Ok(None) => Mapping::NotCached,
            Err(e) => {
                log::warning(&format!(
                    "pgcache: cannot look up {name}, published for replication ({e}); its changes flush it"
                ));
                Mapping::Flush(Target::Named(name.clone()))
            }
            Ok(Some(table)) => match key_map(table.clone(), &rel) {
                Ok(map) => Mapping::Keys(map),
                Err(why) => {
                    // The table may have changed since it was looked up.
                    let fresh = catalog::recheck_payload_table(
                        &table,
                        Some(&rel.schema),
                        &rel.name,
                        &spelling,
                        &self.resolver,
                    )
                    .await;
                    match fresh.map(|f| key_map(f, &rel)) {
                        Some(Ok(map)) => {
                            // What was cached under the old schema goes.
                            runtime::spawn("a table flush", async move {
                                let _ = flush::table(
                                    Target::Table(table),
                                    Some((Source::Replication, Some("ALTER"))),
                                )
                                .await;
                            });
                            Mapping::Keys(map)
                        }
                        _ => {
                            log::warning(&format!(
                                "pgcache: {why}; changes of {name} flush the table"
                            ));
                            Mapping::Flush(Target::Table(table))
                        }
                    }
                }
            },
        };
        let notes = truncation_note_columns(&rel);
        self.relations.insert(
            rel.oid,
            RelationState {
                key_name: name,
                mapping,
                notes,
            },
        );
    }

    /// Waits until every transaction of the batch is visible to new
    /// sessions (design §4), re-reading the snapshot with backoff.
    async fn barrier(&mut self, xids: &[u32], writer: &mut StreamWriter) -> Result<(), Ended> {
        let mut wait = Duration::from_millis(1);
        let mut waited = false;
        loop {
            if let Some(s) = &self.snapshot {
                if xids.iter().all(|&x| s.visible(x)) {
                    return Ok(());
                }
            }
            if waited {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(50));
                // A long wait (a synchronous standby not answering) must
                // not silence the stream.
                self.send_status(writer, false).await?;
            }
            let text = self
                .control
                .snapshot()
                .await
                .map_err(|e| ended(true, format!("the control connection failed: {e}")))?;
            self.snapshot = Some(
                Snapshot::parse(&text)
                    .ok_or_else(|| ended(true, format!("unexpected snapshot '{text}'")))?,
            );
            if !waited
                && !self
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| xids.iter().all(|&x| s.visible(x)))
            {
                stats::inc(&STATS.replication_barrier_waits);
            }
            waited = true;
        }
    }

    async fn apply(
        &mut self,
        batch: Vec<Committed>,
        writer: &mut StreamWriter,
    ) -> Result<(), Ended> {
        let xids: Vec<u32> = batch.iter().map(|c| c.xid).collect();
        self.barrier(&xids, writer).await?;
        let end_lsn = batch.iter().map(|c| c.end_lsn).max().unwrap_or(0);
        let limit = self.settings.replication_txn_key_limit;
        let mut drops = Drops::default();
        let transactions = batch.len() as u64;
        for c in batch {
            drops.merge(c.drops, limit);
        }
        stats::add(&STATS.replication_transactions, transactions);
        stats::inc(&STATS.replication_batches);
        stats::add(&STATS.replication_changes, drops.changes);
        let session = self.session;
        let flushes: Vec<(String, Option<Arc<TableSchema>>, &'static str)> =
            std::mem::take(&mut drops.tables)
                .into_iter()
                .map(|(name, (table, op))| (name, table, op))
                .collect();
        let mut marker = self.marker.clone();
        marker.lsn = end_lsn.max(self.marker.lsn);
        let key = self.marker_key.clone();
        let keys = std::mem::take(&mut drops.keys);
        let marker_now = flushes.is_empty();
        if !keys.is_empty() || marker_now {
            let m = marker.clone();
            let applied = gil::run_writing(move |ctx| {
                if !current(session) || entries::is_replica() {
                    return None;
                }
                apply_keys(ctx, &keys);
                Some(marker_now && write_marker(ctx, &key, &m))
            })
            .await
            .unwrap_or(None);
            match applied {
                None => return Err(ended(true, "stopped")),
                Some(true) => {
                    self.persisted = marker.lsn;
                    self.persisted_tables = marker.tables.clone();
                }
                Some(false) => {}
            }
        }
        if !marker_now {
            for (name, table, op) in flushes {
                stats::inc(&STATS.replication_tables_flushed);
                let target = match table {
                    Some(t) => Target::Table(t),
                    None => Target::Named(name),
                };
                if let Err(e) = flush::table(target, Some((Source::Replication, Some(op)))).await {
                    return Err(ended(true, format!("a table flush failed: {e}")));
                }
            }
            self.marker = marker.clone();
            self.persist().await?;
        }
        self.marker = marker;
        self.applied(end_lsn).await;
        Ok(())
    }

    /// Reads the publications' tables again. A newly covered table is in
    /// the marker before its rows are cached; one that left is flushed.
    async fn refresh_coverage(&mut self) -> Result<(), Ended> {
        let set = published(&self.control, &self.settings, true).await?;
        let sorted: Arc<[String]> = set.iter().cloned().collect();
        if sorted == self.marker.tables {
            return Ok(());
        }
        self.marker.tables = sorted;
        self.persist().await?;
        flush_uncovered(cover(set, true).await?).await
    }

    /// Reads the slot's WAL status for INFO; warns when PostgreSQL is about
    /// to give the slot up (`unreserved`: past `max_slot_wal_keep_size`).
    async fn read_slot_health(&mut self) -> Result<(), Ended> {
        let slot = self.settings.replication_slot.clone();
        let health = self
            .control
            .slot_health(&slot)
            .await
            .map_err(|e| ended(true, format!("cannot read the slot: {e}")))?;
        let (status, safe) = health.unwrap_or_default();
        slot_health(&status, safe);
        Ok(())
    }

    /// Writes the marker if it moved (and no gap flush runs).
    async fn persist(&mut self) -> Result<(), Ended> {
        if self.marker.lsn <= self.persisted && self.marker.tables == self.persisted_tables {
            return Ok(());
        }
        let key = self.marker_key.clone();
        let m = self.marker.clone();
        let session = self.session;
        let written = gil::run_writing(move |ctx| {
            if !current(session) || entries::is_replica() {
                return None;
            }
            Some(write_marker(ctx, &key, &m))
        })
        .await
        .unwrap_or(None);
        match written {
            None => Err(ended(true, "stopped")),
            Some(true) => {
                self.persisted = self.marker.lsn;
                self.persisted_tables = self.marker.tables.clone();
                Ok(())
            }
            Some(false) => Ok(()),
        }
    }

    /// Nothing open or unapplied: the server's position is applied too
    /// (else a quiet slot in a busy database would hold WAL forever).
    async fn idle_at(&mut self, wal_end: Lsn) {
        if wal_end <= self.marker.lsn {
            return;
        }
        self.marker.lsn = wal_end;
        if self.last_idle_marker.elapsed() >= IDLE_MARKER_INTERVAL || self.catch_up_to.is_some() {
            self.last_idle_marker = Instant::now();
            if self.persist().await.is_err() {
                return;
            }
        }
        self.applied(wal_end).await;
    }

    async fn applied(&mut self, lsn: Lsn) {
        REPLICATION.applied_lsn.fetch_max(lsn, Ordering::Relaxed);
        self.acked_history.push_back((Instant::now(), lsn));
        self.track_lag();
        self.check_caught_up(lsn).await;
    }

    async fn check_caught_up(&mut self, lsn: Lsn) {
        let Some(target) = self.catch_up_to else {
            return;
        };
        if lsn < target {
            return;
        }
        self.catch_up_to = None;
        let session = self.session;
        let trusted = gil::run(move |_| current(session) && entries::replication_caught_up())
            .await
            .unwrap_or(false);
        set_state(stats::REPLICATION_STREAMING);
        if trusted {
            log::notice(&format!(
                "pgcache: replication caught up at {}; entries are trusted again",
                format_lsn(lsn)
            ));
        }
    }

    fn track_lag(&self) {
        let applied = REPLICATION.applied_lsn.load(Ordering::Relaxed);
        let server = REPLICATION.server_lsn.load(Ordering::Relaxed);
        if applied >= server {
            REPLICATION.behind_since_ms.store(0, Ordering::Relaxed);
        } else if REPLICATION.behind_since_ms.load(Ordering::Relaxed) == 0 {
            REPLICATION
                .behind_since_ms
                .store(unix_ms(), Ordering::Relaxed);
        }
    }

    /// Acknowledges what was applied `replication_ack_delay_ms` ago: when
    /// asked, and about once a second.
    async fn send_status(
        &mut self,
        writer: &mut StreamWriter,
        reply_now: bool,
    ) -> Result<(), Ended> {
        let delay = Duration::from_millis(self.settings.replication_ack_delay_ms);
        let now = Instant::now();
        while let Some(&(at, lsn)) = self.acked_history.front() {
            if now.duration_since(at) < delay {
                break;
            }
            self.acked = self.acked.max(lsn);
            self.acked_history.pop_front();
        }
        let due = reply_now || self.last_status.elapsed() >= STATUS_INTERVAL;
        if !due {
            return Ok(());
        }
        self.last_status = now;
        // Unless answering, ask for a keepalive back: its position is the
        // idle progress (`idle_at`). A 0 position is ignored by the server.
        writer
            .send(&pgoutput::status_update(self.acked, pg_now(), !reply_now))
            .await
            .map_err(|e| ended(true, format!("cannot send a status update: {e}")))?;
        REPLICATION.acked_lsn.store(self.acked, Ordering::Relaxed);
        Ok(())
    }
}

/// Drops the keys of a batch, in one hold of Redis's lock.
fn apply_keys(
    ctx: &Context,
    drops: &std::collections::BTreeMap<
        String,
        (
            Arc<TableSchema>,
            std::collections::BTreeMap<String, &'static str>,
        ),
    >,
) {
    for (table, pks) in drops.values() {
        flush::drop_keys(
            ctx,
            table,
            pks.iter().map(|(pk, op)| (pk.as_str(), *op)),
            Source::Replication,
        );
    }
}
