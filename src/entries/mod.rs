//! The cache's data and its trust state: building an entry's key, looking it
//! up (served only when trusted), storing fills and writes, invalidating
//! keys (deleting them and detaching their fills in flight), which
//! databases hold entries, and the transitions of the trust state.
//!
//! Everything here runs under Redis's lock (a command handler, a reply
//! callback, or the lock thread), except the lock-free reads noted.

pub mod coverage;
mod inflight;
pub mod migrated;
mod trust;

pub use inflight::{now_ms, FillOutcome, Waiter};
pub use trust::{
    listener, listener_error, listener_name, set_listener, set_listener_error, LISTENER_CONNECTED,
    LISTENER_CONNECTING, LISTENER_DISCONNECTED, LISTENER_OFF,
};

use crate::redis::cluster;
use crate::redis::gil;
use crate::redis::keys::{self, Value};
use crate::redis::reply::redis_string;
use crate::scratch::{with_taken, KEEP};
use crate::stats::{self, STATS};
use pgcache_core::cluster::hash_tag;
use pgcache_core::fills::{Db, FillId, Join};
use pgcache_core::trust::{Phase, Serve, Store, Transition};
use pgcache_core::{
    cache_key, push_canonical_pk_bytes, push_key_start, KeyError, TableSchema, NEGATIVE_MARKER,
};
use redis_module::{raw, Context, RedisString};
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

// ---------------------------------------------------------------------------
// keys

thread_local! {
    static KEY_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Builds `<prefix><table>:<canonical pk of raw>` in a reused buffer and runs
/// `f` with it and where the pk starts in it (or why `raw_pk` is not a key
/// of the table): the hit path allocates no key.
pub fn with_key<R>(
    prefix: &str,
    table: &TableSchema,
    raw_pk: &[u8],
    f: impl FnOnce(Result<(&[u8], usize), KeyError>) -> R,
) -> R {
    with_taken(&KEY_BUFFER, |key| {
        key.clear();
        push_key_start(key, prefix, table);
        let pk_at = key.len();
        let r = match push_canonical_pk_bytes(key, table, raw_pk) {
            Ok(()) => f(Ok((key, pk_at))),
            Err(e) => f(Err(e)),
        };
        if key.capacity() > KEEP {
            *key = Vec::new();
        }
        r
    })
}

/// The key of a canonical pk (JSON text).
pub fn key(prefix: &str, table: &TableSchema, canonical_pk: &str) -> String {
    cache_key(prefix, table, canonical_pk)
}

// ---------------------------------------------------------------------------
// reading

/// What a cache key holds, as a read may see it.
pub enum Lookup<'a> {
    /// Not cached, or not trusted now.
    Missing,
    /// A cached row, or `NEGATIVE_MARKER` for a remembered "not found".
    Hit(&'a [u8]),
    /// The key holds something else: not ours.
    WrongType,
}

/// Looks an entry up in the selected database (`name` is `key` as a Redis
/// string) and hands it to `f` without copying it; an entry that is not
/// trusted now reads as `Missing`.
pub fn lookup<R>(ctx: &Context, name: &RedisString, key: &[u8], f: impl FnOnce(Lookup) -> R) -> R {
    match trust::serve() {
        Serve::All => {}
        Serve::None => return f(Lookup::Missing),
        Serve::Fresh => {
            if !trust::state().is_fresh(keys::selected_db(ctx), key) {
                return f(Lookup::Missing);
            }
        }
    }
    if migrated::is_restored(ctx, key) {
        return f(Lookup::Missing);
    }
    keys::read(ctx, name, |v| match v {
        Value::Missing => f(Lookup::Missing),
        Value::String(bytes) => f(Lookup::Hit(bytes)),
        Value::Other => f(Lookup::WrongType),
    })
}

// ---------------------------------------------------------------------------
// databases that may hold entries

/// Bit n: database n may hold entries (bit 63: databases 63 and up).
static USED_DBS: AtomicU64 = AtomicU64::new(0);
/// `CONFIG GET databases`, read at load.
static DATABASES: AtomicI32 = AtomicI32::new(16);

pub fn mark_db_used(db: Db) {
    USED_DBS.fetch_or(1u64 << db.clamp(0, 63), Ordering::Relaxed);
}

/// Databases that may hold entries: those a fill started or a write stored
/// in (or that SWAPDB swapped with one).
pub fn used_dbs() -> Vec<Db> {
    let bits = USED_DBS.load(Ordering::Relaxed);
    let mut dbs: Vec<Db> = (0..63).filter(|b| bits & (1u64 << b) != 0).collect();
    if bits & (1u64 << 63) != 0 {
        // Rare: databases past 62 are all visited.
        dbs.extend(63..databases());
    }
    dbs
}

/// After a load or a promotion: every database holding keys may hold
/// entries (the load, or the primary's replication stream, brought them;
/// no fill or write here marked them).
pub fn mark_dbs_holding_keys(ctx: &Context) {
    let selected = keys::selected_db(ctx);
    for db in 0..databases() {
        keys::select_db(ctx, db);
        if keys::db_size(ctx) > 0 {
            mark_db_used(db);
        }
    }
    keys::select_db(ctx, selected);
}

pub fn set_databases(n: i32) {
    DATABASES.store(n.max(1), Ordering::Relaxed);
}

pub fn databases() -> i32 {
    DATABASES.load(Ordering::Relaxed)
}

/// SWAPDB: entries of either database now live in the other.
pub fn databases_swapped(a: Db, b: Db) {
    let bits = USED_DBS.load(Ordering::Relaxed);
    let used = |db: Db| bits & (1u64 << db.clamp(0, 63)) != 0;
    if used(a) || used(b) {
        mark_db_used(a);
        mark_db_used(b);
    }
}

// ---------------------------------------------------------------------------
// fills

/// A fill to end: its key, database and id, and how long to cache it.
pub struct FillTarget<'a> {
    pub db: Db,
    pub key: String,
    pub id: FillId,
    pub ttl: u64,
    pub negative_ttl: u64,
    /// When the fill started (the debug log says how long it took).
    pub started: std::time::Instant,
    /// `FillPlan::covered`.
    pub covered: Option<u64>,
    /// The table's key name.
    pub table: &'a str,
}

/// Joins the fill in flight for `key` in `db`, or starts one (the caller
/// then runs it and ends it with `complete_fill`). Admission
/// (`max_inflight`) is the caller's: see `new_fills`.
pub fn join_fill(db: Db, key: &str, table: &TableSchema, waiter: Waiter) -> Join {
    mark_db_used(db);
    inflight::registry().join(db, key, &table.key_name, now_ms(), waiter)
}

/// How many of `keys` would start new fills in `db` (not joinable now).
pub fn new_fills(db: Db, keys: impl Iterator<Item = impl AsRef<str>>) -> usize {
    let reg = inflight::registry();
    keys.filter(|k| !reg.is_active(db, k.as_ref())).count()
}

pub fn fills_in_flight() -> usize {
    inflight::registry().in_flight()
}

/// Whether Redis is over `maxmemory` (never, without one).
fn over_maxmemory() -> bool {
    // SAFETY: a plain read of Redis's memory figures, under its lock.
    unsafe { raw::RedisModule_GetUsedMemoryRatio.map_or(0.0, |f| f()) >= 1.0 }
}

/// Ends a fill with its outcome: caches it unless an invalidation overtook
/// it, entries are not trusted now, or Redis is out of memory, and hands
/// back its waiters to answer. `ctx`'s selected database is changed.
pub fn complete_fill(ctx: &Context, fill: &FillTarget, outcome: &FillOutcome) -> Vec<Waiter> {
    let Some(finished) = inflight::registry().finish(fill.db, &fill.key, fill.id) else {
        return Vec::new();
    };
    crate::log::debug_with(|| {
        let took = format!(
            " in {:.3} ms",
            fill.started.elapsed().as_secs_f64() * 1000.0
        );
        match outcome {
            Ok(Some(_)) if finished.cacheable => {
                format!("pgcache: fill of {}: a row{took}", fill.key)
            }
            Ok(None) if finished.cacheable => {
                format!("pgcache: fill of {}: no row{took}", fill.key)
            }
            Ok(_) => format!(
                "pgcache: fill of {}{took}: overtaken by an invalidation; not cached",
                fill.key
            ),
            Err(e) => format!("pgcache: fill of {} failed{took}: {e}", fill.key),
        }
    });
    match outcome {
        Ok(row) if finished.cacheable => {
            let value: Option<(&[u8], u64)> = match row {
                Some(json) => Some((json.as_bytes(), fill.ttl)),
                None if fill.negative_ttl > 0 => Some((NEGATIVE_MARKER, fill.negative_ttl)),
                None => None,
            };
            if let Some((value, ttl)) = value {
                store_fill(ctx, fill, value, ttl);
            }
        }
        Ok(_) => {
            stats::inc(&STATS.stale_fills_discarded);
        }
        Err(_) => {
            stats::inc(&STATS.fill_errors);
        }
    }
    if matches!(outcome, Ok(None)) {
        stats::inc(&STATS.not_found);
    }
    finished.waiters
}

fn store_fill(ctx: &Context, fill: &FillTarget, value: &[u8], ttl: u64) {
    let decision = trust::state().may_store(fill.db, fill.key.as_bytes());
    match decision {
        Store::Yes | Store::Fresh => {}
        Store::Untrusted => {
            stats::inc(&STATS.fills_uncached_gap);
            crate::log::debug_with(|| {
                format!(
                    "pgcache: {} not cached: entries are not trusted now (a gap)",
                    fill.key
                )
            });
            return;
        }
        Store::Replica => return,
    }
    if !fill.covered.is_some_and(coverage::unchanged_since) {
        stats::inc(&STATS.fills_uncached_unpublished);
        if coverage::first_warning(fill.table) {
            crate::log::warning(&format!(
                "pgcache: rows of {} are not cached: it is not in replication_publication, so its changes would not be heard (SELECT pgcache_publish('{}'))",
                fill.table, fill.table
            ));
        }
        return;
    }
    if gil::replica_traffic_unwelcome() {
        stats::inc(&STATS.fills_uncached_paused);
        crate::log::debug_with(|| {
            format!(
                "pgcache: {} not cached: writes are paused (a failover waits for replicas)",
                fill.key
            )
        });
        return;
    }
    if !cluster::serves_tag(hash_tag(fill.key.as_bytes())) {
        stats::inc(&STATS.cluster_uncached_fills);
        crate::log::debug_with(|| {
            format!(
                "pgcache: {} not cached: this node does not serve its hash slot now",
                fill.key
            )
        });
        return;
    }
    if over_maxmemory() {
        stats::inc(&STATS.fills_uncached_oom);
        crate::log::debug_with(|| format!("pgcache: {} not cached: over maxmemory", fill.key));
        return;
    }
    keys::select_db(ctx, fill.db);
    let name = redis_string(Some(ctx), fill.key.as_bytes());
    // No log line per stored fill: formatting it cost the main thread on
    // every miss, whatever the log level.
    if let Err(e) = keys::store(ctx, &name, value, ttl) {
        crate::log::warning(&format!("pgcache: could not cache {}: {e}", fill.key));
    }
}

/// Reaps fills whose answer is overdue (lost: the safety net) and hands
/// back their waiters, to be answered with an error.
pub fn reap_overdue_fills(deadline_ms: u64) -> Vec<Waiter> {
    let cutoff = now_ms().saturating_sub(deadline_ms);
    let reaped = inflight::registry().reap(cutoff);
    stats::add(&STATS.fills_reaped, reaped.len() as u64);
    reaped
}

// ---------------------------------------------------------------------------
// writes and invalidations

/// PGCACHE.WRITE: stores `value` under `key` in the client's database; a fill
/// in flight for the key must not overwrite it.
///
/// In a cluster, a node that does not serve the key's slot stably (the
/// WRITE came with ASKING to a slot being imported) stores nothing and
/// drops its copy: an entry there would make the migration fail (BUSYKEY).
/// `Ok(false)` then.
pub fn write(ctx: &Context, key: &[u8], value: &[u8], ttl: u64) -> Result<bool, String> {
    let db = keys::selected_db(ctx);
    inflight::registry().detach_key(&String::from_utf8_lossy(key));
    let name = redis_string(Some(ctx), key);
    if !cluster::serves_tag(hash_tag(key)) {
        stats::inc(&STATS.cluster_writes_uncached);
        if keys::delete_string(ctx, &name) {
            keys::replicate_del(ctx, &[&name]);
        }
        return Ok(false);
    }
    trust::state().written(db, key);
    mark_db_used(db);
    keys::store(ctx, &name, value, ttl).map(|()| true)
}

/// Invalidates `keys`: detaches their fills in flight in every database and
/// deletes them in `dbs` (one replicated DEL per database). Returns, per
/// key, whether an entry was deleted. The context's selected database is
/// restored.
pub fn invalidate(ctx: &Context, keys_to_drop: &[&str], dbs: &[Db]) -> Vec<bool> {
    {
        let mut reg = inflight::registry();
        for key in keys_to_drop {
            reg.detach_key(key);
        }
    }
    let mut dropped = vec![false; keys_to_drop.len()];
    if keys_to_drop.is_empty() {
        return dropped;
    }
    let names: Vec<RedisString> = keys_to_drop
        .iter()
        .map(|k| redis_string(Some(ctx), k.as_bytes()))
        .collect();
    let selected = keys::selected_db(ctx);
    for &db in dbs {
        keys::select_db(ctx, db);
        let mut deleted: Vec<&RedisString> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if keys::delete_string(ctx, name) {
                dropped[i] = true;
                deleted.push(name);
            }
        }
        keys::replicate_del(ctx, &deleted);
    }
    keys::select_db(ctx, selected);
    dropped
}

/// Detaches the fills in flight of a table (by key name).
pub fn detach_table_fills(key_name: &str) {
    inflight::registry().detach_table(key_name);
}

/// FLUSHALL / FLUSHDB: fills in flight must not bring rows back.
pub fn detach_all_fills() {
    inflight::registry().detach_all();
}

/// Whether an entry stored since the running gap flush began.
pub fn is_fresh(db: Db, key: &[u8]) -> bool {
    trust::state().is_fresh(db, key)
}

/// Whether work that deletes, begun at `epoch`, may go on: this node is
/// still a primary and has not been demoted since.
pub fn may_delete(epoch: u64) -> bool {
    trust::writer_epoch() == epoch && trust::state().phase() != Phase::Replica
}

pub fn writer_epoch() -> u64 {
    trust::writer_epoch()
}

/// Whether this node is a replica (it then writes nothing of its own).
pub fn is_replica() -> bool {
    trust::state().phase() == Phase::Replica
}

/// The running gap flush's generation, if one runs.
pub fn flushing_generation() -> Option<u64> {
    match trust::state().phase() {
        Phase::Flushing(g) => Some(g),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// trust transitions (under Redis's lock: the fills they detach cannot
// complete in between)

fn transition(f: impl FnOnce(&mut pgcache_core::trust::TrustState) -> Transition) -> Option<u64> {
    let t = {
        let mut state = trust::state();
        let t = f(&mut state);
        trust::publish(&state);
        t
    };
    if t.detach_fills {
        inflight::registry().detach_all();
    }
    t.flush
}

/// The listener is (re)started, or turned off.
pub fn listener_started(enabled: bool) {
    transition(|t| {
        if enabled {
            t.listener_started()
        } else {
            t.listener_disabled()
        }
    });
}

/// LISTEN is in effect: the gap flush to start, if any.
pub fn listener_connected() -> Option<u64> {
    transition(|t| t.listener_connected())
}

/// Whether the source's connection is up (for the trust state).
pub fn listener_is_connected() -> bool {
    listener() == LISTENER_CONNECTED
}

/// The replication source resumed from its marker (no flush).
pub fn replication_resumed() {
    transition(|t| t.resumed());
}

/// The resumed source caught up: true when entries are trusted again.
pub fn replication_caught_up() -> bool {
    let mut state = trust::state();
    let done = state.caught_up();
    trust::publish(&state);
    done
}

/// The invalidation source's connection is gone (`was`: its state
/// before): state, error, trust transition and the reconnect count move in
/// the caller's one hold of Redis's lock, so STATS and INFO show them
/// together.
pub fn source_lost(was: u8, reason: &str) {
    set_listener(LISTENER_DISCONNECTED);
    set_listener_error(reason);
    listener_lost();
    if was == LISTENER_CONNECTED {
        stats::inc(&STATS.listener_reconnects);
    }
}

pub fn listener_lost() {
    transition(|t| t.listener_lost());
}

/// Notifications were lost while connected: the gap flush to start.
pub fn gap() -> Option<u64> {
    transition(|t| t.gap())
}

/// Gap flush `generation` ended: true when entries are trusted again.
pub fn flush_done(generation: u64) -> bool {
    let mut state = trust::state();
    let done = state.flush_done(generation);
    trust::publish(&state);
    done
}

pub fn loading_started() {
    transition(|t| t.loading_started());
}

pub fn loading_ended() -> Option<u64> {
    transition(|t| t.loading_ended())
}

pub fn set_replica(replica: bool) {
    transition(|t| t.set_replica(replica));
}

/// The trust state for INFO: phase, whether trusted, fresh entries. In a
/// crash report, `None` when its lock is taken.
pub fn trust_figures(for_crash_report: bool) -> Option<(Phase, bool, usize)> {
    let t = if for_crash_report {
        trust::try_state()?
    } else {
        trust::state()
    };
    Some((t.phase(), t.trusted(), t.fresh_len()))
}
