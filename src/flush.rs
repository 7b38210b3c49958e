//! Flushes: dropping every entry of a table (PGCACHE.INVALIDATE_TABLE, a
//! TRUNCATE) or everything cached before a gap, a batch at a time, so Redis
//! serves other clients between batches however many keys there are; and
//! the invalidation sources' drops of named keys (`drop_keys`).
//!
//! A flush deletes only pgcache's own entries: string keys
//! `<prefix><table>:<canonical pk>` (`pgcache_core::entry`), checked against
//! the table's schema when it is known; a key whose table PostgreSQL does
//! not have is left alone. A node that stops being a primary stops deleting
//! at once: every batch checks, under Redis's lock, that it still is one.

use crate::catalog;
use crate::entries;
use crate::events::{self, Origin};
use crate::log;
use crate::redis::gil;
use crate::redis::keys::{self, ScanCursor};
use crate::redis::reply::redis_string;
use crate::runtime;
use crate::settings;
use crate::stats::{self, STATS};
use pgcache_core::entry::{is_canonical_pk_of, looks_canonical, split_entry_key};
use pgcache_core::event::{EventType, Source};
use pgcache_core::fills::Db;
use pgcache_core::TableSchema;
use pgcache_pg::listener::Resolver;
use redis_module::{Context, RedisString};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Drops the entries of `pks` (canonical pks, each with the operation of
/// the change that names it) of `table`, as an invalidation source does,
/// in the caller's hold of Redis's lock: in every database that may hold
/// entries, with their fills in flight (in any database). An event is
/// published only for an entry actually dropped.
pub fn drop_keys<'a>(
    ctx: &Context,
    table: &TableSchema,
    pks: impl ExactSizeIterator<Item = (&'a str, &'static str)> + Clone,
    source: Source,
) {
    let settings = settings::current();
    let dbs = entries::used_dbs();
    let keys: Vec<String> = pks
        .clone()
        .map(|(pk, _)| entries::key(&settings.cache_prefix, table, pk))
        .collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let dropped = entries::invalidate(ctx, &refs, &dbs);
    let via = match source {
        Source::Notify => "notification",
        Source::Replication => "replication",
        Source::Command | Source::Flush => "drop",
    };
    for ((pk, op), was) in pks.zip(dropped) {
        log::debug_with(|| {
            format!(
                "pgcache: {via} {op} {}: {pk}{}",
                table.key_name,
                if was { " invalidated" } else { " (not cached)" }
            )
        });
        if was {
            stats::inc(&STATS.entries_invalidated);
            events::publish(
                ctx,
                &settings,
                EventType::Invalidate,
                &table.table_json,
                pk.as_bytes(),
                Some((source, Some(op))),
            );
        }
    }
}

/// Keys visited per hold of Redis's lock: small enough that other clients
/// wait at most about a millisecond. (A batch costs more than the raw scan:
/// each key is checked against its table's canonical form and deleted
/// through the key API; with 1000 PING p99 rose past the old code's during
/// a flush of a million entries, with 500 it fell below it.) Between
/// batches the flush sleeps (tokio's timer: about a millisecond), without
/// which the lock, which is not fair, starves Redis's main thread.
const SCAN_BATCH: usize = 500;

/// The table a flush drops.
#[derive(Clone)]
pub enum Target {
    Table(Arc<TableSchema>),
    /// Only its key name is known (a notification whose table could not be
    /// looked up): entries are recognised by their shape alone.
    Named(String),
}

impl Target {
    fn key_name(&self) -> &str {
        match self {
            Target::Table(t) => &t.key_name,
            Target::Named(n) => n,
        }
    }
}

/// Why a flush stopped before the end.
#[derive(Debug)]
pub enum Stopped {
    /// This node is no longer a primary.
    Demoted,
    /// A newer gap flush took over.
    Superseded,
    /// The lock thread or the task failed.
    Failed,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stopped::Demoted => "pgcache: the flush stopped: this node is no longer a primary",
            Stopped::Superseded => "pgcache: the flush was superseded",
            Stopped::Failed => "pgcache: internal error while flushing",
        })
    }
}

// ---------------------------------------------------------------------------
// table flushes

/// Callers of a table's flush, and entries dropped so far.
struct Running {
    /// Callers the scan under way answers, with the count at their arrival.
    current: Vec<(tokio::sync::oneshot::Sender<Result<u64, String>>, u64)>,
    /// Callers that arrived during it: one more scan answers them.
    next: Vec<(tokio::sync::oneshot::Sender<Result<u64, String>>, u64)>,
    dropped: u64,
}

static TABLE_FLUSHES: LazyLock<Mutex<HashMap<String, Running>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn table_flushes() -> std::sync::MutexGuard<'static, HashMap<String, Running>> {
    TABLE_FLUSHES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops every entry of a table (in every database that may hold entries)
/// and answers how many were dropped while the call waited. Fills in flight
/// for the table are detached first, so none started before the call is
/// cached. A call while the table's flush runs joins it: the flush scans
/// once more for every call that joined (one scan, however many joined),
/// since the running scan may have passed entries cached before them.
pub async fn table(target: Target, origin: Origin<'static>) -> Result<u64, String> {
    let key_name = target.key_name().to_owned();
    {
        let key_name = key_name.clone();
        gil::run(move |_| entries::detach_table_fills(&key_name))
            .await
            .map_err(|_| Stopped::Failed.to_string())?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let start = {
        let mut flushes = table_flushes();
        match flushes.get_mut(&key_name) {
            Some(running) => {
                let at = running.dropped;
                running.next.push((tx, at));
                false
            }
            None => {
                flushes.insert(
                    key_name.clone(),
                    Running {
                        current: vec![(tx, 0)],
                        next: Vec::new(),
                        dropped: 0,
                    },
                );
                true
            }
        }
    };
    if start {
        let name = key_name.clone();
        runtime::spawn_then(run_table_flush(target, origin), move |r| {
            if r.is_err() {
                // Its callers' senders go with the entry: they get an error.
                table_flushes().remove(&name);
            }
        });
    }
    rx.await
        .unwrap_or_else(|_| Err(Stopped::Failed.to_string()))
}

async fn run_table_flush(target: Target, origin: Origin<'static>) {
    let key_name = target.key_name().to_owned();
    let epoch = entries::writer_epoch();
    loop {
        let scope = Scope::Table(target.clone());
        let mut result: Result<(), Stopped> = Ok(());
        for db in entries::used_dbs() {
            let flushed = scan_db(db, &scope, epoch, origin, None, |n| {
                if let Some(r) = table_flushes().get_mut(&key_name) {
                    r.dropped += n;
                }
            })
            .await;
            if let Err(stopped) = flushed {
                result = Err(stopped);
                break;
            }
        }
        let mut flushes = table_flushes();
        let Some(running) = flushes.get_mut(&key_name) else {
            return;
        };
        let dropped = running.dropped;
        for (tx, at) in std::mem::take(&mut running.current) {
            let _ = tx.send(
                result
                    .as_ref()
                    .map(|()| dropped - at)
                    .map_err(|s| s.to_string()),
            );
        }
        if result.is_err() || running.next.is_empty() {
            for (tx, _) in std::mem::take(&mut running.next) {
                let _ = tx.send(Err(Stopped::Demoted.to_string()));
            }
            flushes.remove(&key_name);
            return;
        }
        running.current = std::mem::take(&mut running.next);
    }
}

// ---------------------------------------------------------------------------
// gap flushes

/// Starts gap flush `generation`: every database, every entry not stored
/// since the gap began; entries are trusted again when it ends, unless a
/// newer gap or a lost connection took over (which stops it).
pub fn gap(generation: u64, resolver: Option<Resolver>) {
    runtime::spawn("the gap flush", async move {
        let epoch = entries::writer_epoch();
        let scope = Scope::Gap(generation);
        let mut total = 0u64;
        for db in 0..entries::databases() {
            match scan_db(
                db,
                &scope,
                epoch,
                Some((Source::Flush, None)),
                resolver.as_ref(),
                |n| total += n,
            )
            .await
            {
                Ok(()) => {}
                Err(_) => return,
            }
        }
        let trusted = gil::run(move |_| entries::flush_done(generation))
            .await
            .unwrap_or(false);
        if trusted {
            log::notice(&format!(
                "pgcache: gap flush done, {total} entries dropped; entries are trusted again"
            ));
        }
    });
}

// ---------------------------------------------------------------------------
// the scan

enum Scope {
    Table(Target),
    /// Gap flush of this generation.
    Gap(u64),
}

/// What a flush learnt of table key names met in a gap flush.
#[derive(Default)]
struct Tables {
    /// No such table in PostgreSQL: its look-alike keys are not ours.
    missing: HashSet<String>,
    /// Could not be looked up: its keys are judged by their shape.
    unresolved: HashSet<String>,
}

/// Scans database `db`, deleting the entries in `scope`, a batch per hold
/// of Redis's lock; `dropped` is told each batch's count.
async fn scan_db(
    db: Db,
    scope: &Scope,
    epoch: u64,
    origin: Origin<'static>,
    resolver: Option<&Resolver>,
    mut dropped: impl FnMut(u64),
) -> Result<(), Stopped> {
    stats::inc(&STATS.flushes);
    let prefix = settings::current().cache_prefix.clone();
    let shared = Arc::new(ScopeShared::of(scope, prefix));
    let mut cursor = ScanCursor::new();
    let mut deferred: Vec<Vec<u8>> = Vec::new();
    let mut tables = Arc::new(Tables::default());
    loop {
        let step_shared = shared.clone();
        let step_tables = tables.clone();
        let step = gil::run_writing(move |ctx| {
            let r = flush_step(
                ctx,
                db,
                &step_shared,
                &step_tables,
                epoch,
                origin,
                &cursor,
                deferred,
            );
            (cursor, r)
        })
        .await
        .map_err(|_| Stopped::Failed)?;
        cursor = step.0;
        let outcome = step.1?;
        dropped(outcome.dropped);
        stats::add(&STATS.entries_invalidated, outcome.dropped);
        deferred = outcome.deferred;
        if !deferred.is_empty() {
            tables = Arc::new(learn_tables(&deferred, &shared.prefix, &tables, resolver).await);
        }
        if !outcome.more && deferred.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Looks up the tables of keys whose table was unknown.
async fn learn_tables(
    names: &[Vec<u8>],
    prefix: &str,
    known: &Tables,
    resolver: Option<&Resolver>,
) -> Tables {
    let mut out = Tables {
        missing: known.missing.clone(),
        unresolved: known.unresolved.clone(),
    };
    let wanted: HashSet<String> = names
        .iter()
        .filter_map(|n| split_entry_key(n.get(prefix.len()..)?).map(|e| e.table.to_owned()))
        .collect();
    for table in wanted {
        match catalog::resolve_key_name(&table, resolver).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                out.missing.insert(table);
            }
            Err(_) => {
                out.unresolved.insert(table);
            }
        }
    }
    out
}

/// A scope as the lock thread needs it.
struct ScopeShared {
    prefix: String,
    /// Table flush: the keys' start (`<prefix><table>:`) and target.
    table: Option<(String, Target)>,
    gap: Option<u64>,
}

impl ScopeShared {
    fn of(scope: &Scope, prefix: String) -> ScopeShared {
        match scope {
            Scope::Table(target) => ScopeShared {
                table: Some((format!("{prefix}{}:", target.key_name()), target.clone())),
                prefix,
                gap: None,
            },
            Scope::Gap(g) => ScopeShared {
                prefix,
                table: None,
                gap: Some(*g),
            },
        }
    }
}

struct StepOutcome {
    more: bool,
    dropped: u64,
    /// Keys whose table must be looked up before they are judged.
    deferred: Vec<Vec<u8>>,
}

/// Whether a key is an entry to drop: `Some((table json, where its pk
/// starts))`, `None` when it is not ours, or `Err` when its table must be
/// looked up first.
fn judge(name: &[u8], scope: &ScopeShared, tables: &Tables) -> Result<Option<(String, usize)>, ()> {
    let Some(rest) = name.strip_prefix(scope.prefix.as_bytes()) else {
        return Ok(None);
    };
    if let Some((start, target)) = &scope.table {
        let Some(pk) = name.strip_prefix(start.as_bytes()) else {
            return Ok(None);
        };
        let Ok(pk) = std::str::from_utf8(pk) else {
            return Ok(None);
        };
        let ours = pk.starts_with("{\"")
            && match target {
                Target::Table(t) => is_canonical_pk_of(t, pk),
                Target::Named(_) => looks_canonical(pk),
            };
        let table_json = match target {
            Target::Table(t) => t.table_json.clone(),
            Target::Named(n) => pgcache_core::event::table_json(n),
        };
        return Ok(ours.then_some((table_json, start.len())));
    }
    let Some(entry) = split_entry_key(rest) else {
        return Ok(None);
    };
    let pk_at = name.len() - entry.pk.len();
    match catalog::by_key_name(entry.table) {
        Some(t) => Ok(is_canonical_pk_of(&t, entry.pk).then(|| (t.table_json.clone(), pk_at))),
        None if tables.missing.contains(entry.table) => Ok(None),
        None if tables.unresolved.contains(entry.table) => Ok(looks_canonical(entry.pk)
            .then(|| (pgcache_core::event::table_json(entry.table), pk_at))),
        None => Err(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn flush_step(
    ctx: &Context,
    db: Db,
    scope: &ScopeShared,
    tables: &Tables,
    epoch: u64,
    origin: Origin<'static>,
    cursor: &ScanCursor,
    deferred: Vec<Vec<u8>>,
) -> Result<StepOutcome, Stopped> {
    if !entries::may_delete(epoch) {
        return Err(Stopped::Demoted);
    }
    if let Some(g) = scope.gap {
        if entries::flushing_generation() != Some(g) {
            return Err(Stopped::Superseded);
        }
    }
    keys::select_db(ctx, db);
    // Keys met before whose table is now known, then the next batch.
    let mut names = deferred;
    let mut visited = 0usize;
    let mut more = true;
    if names.is_empty() {
        while more && visited < SCAN_BATCH {
            let mut collect = |name: &[u8]| {
                visited += 1;
                if name.starts_with(scope.prefix.as_bytes()) {
                    names.push(name.to_vec());
                }
            };
            more = cursor.scan(ctx, &mut collect);
        }
    }
    let settings = settings::current();
    let mut deferred = Vec::new();
    let mut doomed: Vec<(RedisString, Vec<u8>, String, usize)> = Vec::new();
    for name in names {
        match judge(&name, scope, tables) {
            Ok(Some((table_json, pk_at))) => {
                if scope.gap.is_some() && entries::is_fresh(db, &name) {
                    continue;
                }
                doomed.push((redis_string(Some(ctx), &name), name, table_json, pk_at));
            }
            Ok(None) => {}
            Err(()) => deferred.push(name),
        }
    }
    let mut deleted: Vec<&RedisString> = Vec::new();
    for (rname, name, table_json, pk_at) in &doomed {
        if keys::delete_string(ctx, rname) {
            deleted.push(rname);
            if settings.events.invalidate {
                let pk = name.get(*pk_at..).unwrap_or(b"{}");
                events::publish(
                    ctx,
                    &settings,
                    EventType::Invalidate,
                    table_json,
                    pk,
                    origin,
                );
            }
        }
    }
    keys::replicate_del(ctx, &deleted);
    Ok(StepOutcome {
        more,
        dropped: deleted.len() as u64,
        deferred,
    })
}
