//! The `notify` invalidation source: triggers NOTIFY, the listener
//! (`pgcache_pg::listener`) LISTENs, and this turns what it hears into trust
//! transitions (`entries`), dropped entries and table flushes (`flush`).
//!
//! Nothing is lost quietly: a notification whose table cannot be looked up
//! flushes that table (the payload names it) or, when it names no schema,
//! counts as a gap; a queue overflow is a gap; only malformed, forged or
//! unknown-table payloads are ignored (counted, and logged rate-limited).

use crate::catalog;
use crate::entries;
use crate::flush::{self, Target};
use crate::log;
use crate::redis::cluster;
use crate::redis::gil;
use crate::runtime;
use crate::settings;
use crate::stats::{self, STATS};
use pgcache_core::event::Source;
use pgcache_core::notify::{parse_payload, row_keys, Operation, Payload};
use pgcache_core::schema::key_name;
use pgcache_core::TableSchema;
use pgcache_pg::listener::{self as pg_listener, EventQueue, ListenerEvent, Resolver};
use redis_module::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Notifications received together, at most this many per batch.
const MAX_BATCH: usize = 512;

/// Payload bytes the queue holds at most; past it, notifications are
/// dropped and the module goes through a gap (see `pgcache_pg::listener`).
pub const QUEUE_BYTES: usize = 16 << 20;

static TASKS: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>> = Mutex::new(None);

/// Bumped by every start and stop: work a stopped listener queued for
/// Redis's lock (it may still run after the stop) checks it and does
/// nothing, so it never moves the trust state of its successor.
static SESSION: AtomicU64 = AtomicU64::new(0);

fn current(session: u64) -> bool {
    SESSION.load(Ordering::Acquire) == session
}

/// A failing connection is warned about once a minute.
static CONNECT_FAILED: log::Every = log::Every::new(Duration::from_secs(60));
/// Ignored payloads are logged (debug) once every ten seconds.
static IGNORED: log::Every = log::Every::new(Duration::from_secs(10));

/// Starts (or restarts) the listener, unless it is turned off; on a replica
/// nothing is started (it serves what its primary replicates). Under
/// Redis's lock (the main thread): the trust state moves in the same hold.
pub fn start() {
    stop();
    let session = SESSION.fetch_add(1, Ordering::AcqRel) + 1;
    let settings = settings::current();
    let enabled = settings.invalidation_enabled();
    entries::listener_started(enabled);
    if !enabled || entries::is_replica() {
        return;
    }
    entries::set_listener(entries::LISTENER_CONNECTING);
    let (tx, queue) = pg_listener::queue(QUEUE_BYTES);
    let target: pg_listener::Target = Box::new(|| pgcache_pg::config_and_tls(&settings::current()));
    let lookup_timeout = Duration::from_millis(settings.pg_query_timeout_ms);
    let listen = runtime::spawn_abortable(pg_listener::run(
        target,
        settings.invalidation_channel.clone(),
        lookup_timeout,
        tx,
    ));
    let handle = runtime::spawn_abortable(handle_events(queue, session));
    *TASKS.lock().unwrap_or_else(|e| e.into_inner()) = Some((listen, handle));
}

/// Stops the listener (a replica, or before a restart).
pub fn stop() {
    SESSION.fetch_add(1, Ordering::AcqRel);
    if let Some((listen, handle)) = TASKS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        listen.abort();
        handle.abort();
    }
    entries::set_listener(entries::LISTENER_OFF);
}

async fn handle_events(mut queue: EventQueue, session: u64) {
    let mut resolver: Option<Resolver> = None;
    // An event read while gathering a batch of notifications, handled next.
    let mut next: Option<ListenerEvent> = None;
    loop {
        let event = match next.take() {
            Some(e) => e,
            None => match queue.recv().await {
                Some(e) => e,
                None => return,
            },
        };
        if queue.take_overflow() {
            overflowed(session, resolver.clone()).await;
        }
        match event {
            ListenerEvent::Connected(r) => {
                resolver = Some(r.clone());
                let flush = gil::run(move |_| {
                    if !current(session) {
                        return None;
                    }
                    entries::set_listener(entries::LISTENER_CONNECTED);
                    entries::set_listener_error("");
                    entries::listener_connected()
                })
                .await
                .ok()
                .flatten();
                log::notice(
                    "pgcache: invalidation listener connected; dropping entries cached before",
                );
                if let Some(generation) = flush {
                    flush::gap(generation, Some(r));
                }
            }
            ListenerEvent::Disconnected(reason) => {
                resolver = None;
                let was = entries::listener();
                // In one hold of Redis's lock, so that STATS and INFO show
                // the state, the trust state and the count together.
                let error = reason.clone();
                let _ = gil::run(move |_| {
                    if current(session) {
                        entries::source_lost(was, &error);
                    }
                })
                .await;
                if was == entries::LISTENER_CONNECTED {
                    log::warning(&format!(
                        "pgcache: invalidation listener disconnected: {reason}; reconnecting"
                    ));
                } else {
                    CONNECT_FAILED.log(log::warning, || {
                        format!(
                            "pgcache: invalidation listener cannot connect: {reason}; retrying (until it connects, cached entries are not served and fills are not cached)"
                        )
                    });
                }
            }
            ListenerEvent::Notification(first) => {
                // What has arrived meanwhile is handled together, in order.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Some(ListenerEvent::Notification(p)) => batch.push(p),
                        Some(other) => {
                            next = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                stats::add(&STATS.notifications_received, batch.len() as u64);
                handle_batch(session, batch, resolver.as_ref()).await;
            }
        }
    }
}

/// Notifications were dropped: one gap, whatever the number lost.
async fn overflowed(session: u64, resolver: Option<Resolver>) {
    stats::inc(&STATS.notification_queue_overflows);
    log::warning(&format!(
        "pgcache: more than {} MiB of notifications were waiting; some were dropped, so everything cached is flushed",
        QUEUE_BYTES >> 20
    ));
    gap(session, resolver).await;
}

async fn gap(session: u64, resolver: Option<Resolver>) {
    let started = gil::run(move |_| {
        if current(session) {
            entries::gap()
        } else {
            None
        }
    })
    .await;
    if let Ok(Some(generation)) = started {
        flush::gap(generation, resolver);
    }
}

fn ignored(why: impl FnOnce() -> String) {
    stats::inc(&STATS.notifications_ignored);
    IGNORED.log(log::debug, || {
        format!("pgcache: notification ignored: {}", why())
    });
}

/// Keys to drop: the table, its canonical pks, the trigger's operation.
type Drops = Vec<(Arc<TableSchema>, Vec<String>, &'static str)>;

async fn handle_batch(session: u64, batch: Vec<String>, resolver: Option<&Resolver>) {
    let mut drops: Drops = Vec::new();
    // Tables to flush, each once per batch (a TRUNCATE, or a payload that
    // cannot be applied key by key).
    let mut flushes: Vec<(Target, &'static str)> = Vec::new();
    let mut lost = false;
    for text in batch {
        let payload = match parse_payload(&text) {
            Ok(p) => p,
            Err(e) => {
                ignored(|| e.to_string());
                continue;
            }
        };
        let table = match resolve(&payload, resolver).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                ignored(|| format!("unknown table {}", payload.table));
                continue;
            }
            Err(e) => {
                // The change cannot be applied key by key: drop the table
                // (by its key name) or, without a schema, everything.
                log::warning(&format!(
                    "pgcache: cannot look up the table of a notification ({}): {e}; flushing it",
                    payload.table
                ));
                match &payload.schema {
                    Some(schema) => add_flush(
                        &mut flushes,
                        Target::Named(key_name(schema, &payload.name)),
                        payload.operation.as_str(),
                    ),
                    None => lost = true,
                }
                continue;
            }
        };
        if payload.operation == Operation::Truncate {
            // A node's own INVALIDATE_TABLE broadcast: it flushed already.
            if payload.origin.is_some() && payload.origin.as_deref() == cluster::my_id() {
                continue;
            }
            add_flush(&mut flushes, Target::Table(table), "TRUNCATE");
            continue;
        }
        let op = payload.operation.as_str();
        match row_keys(&table, &payload) {
            Ok(keys) => {
                let keys = keys.into_iter().map(|k| k.json).collect();
                drops.push((table, keys, op));
            }
            Err(e) => {
                // The table's key may have changed since its schema was
                // read (the trigger finds the key columns as it runs):
                // look it up again. If it changed, the old schema's entries
                // all go; else the payload is malformed or forged, or holds
                // a value no key can spell exactly.
                let fresh = match resolver {
                    Some(r) => {
                        catalog::recheck_payload_table(
                            &table,
                            payload.schema.as_deref(),
                            &payload.name,
                            &payload.table,
                            r,
                        )
                        .await
                    }
                    None => None,
                };
                if let Some(fresh) = fresh {
                    add_flush(&mut flushes, Target::Table(table), op);
                    if let Ok(keys) = row_keys(&fresh, &payload) {
                        drops.push((fresh, keys.into_iter().map(|k| k.json).collect(), op));
                    }
                } else if unmappable_value(&table, &e) {
                    log::warning(&format!(
                        "pgcache: a notification for {} holds a key no entry can be named by ({e}); flushing the table",
                        table.key_name
                    ));
                    add_flush(&mut flushes, Target::Table(table), op);
                } else {
                    ignored(|| e.to_string());
                }
            }
        }
    }
    // Keys of a table flushed anyway need no drop of their own.
    drops.retain(|(t, _, _)| !flushes.iter().any(|(f, _)| f_key(f) == t.key_name));
    if !drops.is_empty() {
        let _ = gil::run_writing(move |ctx| apply_drops(ctx, &drops)).await;
    }
    for (target, op) in flushes {
        runtime::spawn("a table flush", async move {
            let _ = flush::table(target, Some((Source::Notify, Some(op)))).await;
        });
    }
    if lost {
        gap(session, resolver.cloned()).await;
    }
}

/// Whether `e` is a value a trigger can send for a column of this kind that
/// pgcache refuses as a key (a non-ASCII citext, a numeric too long, a date
/// outside 0001-9999): the row may be cached under no key, but to be sure
/// the table is flushed. Values no trigger sends for the column's type are
/// forged and ignored.
fn unmappable_value(table: &TableSchema, e: &pgcache_core::KeyError) -> bool {
    use pgcache_core::PkKind;
    let pgcache_core::KeyError::Value { column, .. } = e else {
        return false;
    };
    table.pk.iter().any(|c| {
        &c.name == column
            && matches!(
                c.kind,
                PkKind::Citext
                    | PkKind::Numeric
                    | PkKind::Name
                    | PkKind::Date
                    | PkKind::Timestamp
                    | PkKind::Timestamptz
            )
    })
}

fn f_key(t: &Target) -> &str {
    match t {
        Target::Table(t) => &t.key_name,
        Target::Named(n) => n,
    }
}

fn add_flush(flushes: &mut Vec<(Target, &'static str)>, target: Target, op: &'static str) {
    if !flushes.iter().any(|(f, _)| f_key(f) == f_key(&target)) {
        flushes.push((target, op));
    }
}

async fn resolve(
    payload: &Payload,
    resolver: Option<&Resolver>,
) -> Result<Option<Arc<TableSchema>>, pgcache_pg::PgError> {
    match resolver {
        Some(r) => {
            catalog::payload_table(payload.schema.as_deref(), &payload.name, &payload.table, r)
                .await
        }
        None => Err(pgcache_pg::PgError::Unavailable(
            "the listener is not connected".into(),
        )),
    }
}

/// Drops the keys of a batch, in one hold of Redis's lock.
fn apply_drops(ctx: &Context, drops: &Drops) {
    if entries::is_replica() {
        return;
    }
    for (table, pks, op) in drops {
        flush::drop_keys(
            ctx,
            table,
            pks.iter().map(|pk| (pk.as_str(), *op)),
            Source::Notify,
        );
    }
}
