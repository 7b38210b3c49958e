//! Misses: admitting them, joining or starting their fills, and ending
//! fills (caching through `entries`, then answering every waiting client).
//!
//! The path of a miss: the command handler blocks its client and joins the
//! key's fill in `entries` (a new fill is queued here, `fetch::enqueue`); the
//! table's fetcher runs one query for what is queued; the rows come back in
//! chunks (`Completion`), run on Redis's main thread in the reply callback of
//! a client they answer, or under Redis's lock from the lock thread.

mod fetch;

use crate::entries::{self, FillOutcome, FillTarget, Waiter};
use crate::redis::blocked::{BlockedReply, MainThreadWork, Responder};
use crate::redis::keys;
use crate::redis::reply::err;
use crate::stats::{self, STATS};
use pgcache_core::fills::{Db, FillId, Join};
use pgcache_core::{json_array, Settings, TableSchema};
use redis_module::{Context, RedisResult, RedisValue};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// A fill's settings, captured when it starts.
pub struct FillPlan {
    pub table: Arc<TableSchema>,
    pub db: Db,
    pub ttl: u64,
    pub negative_ttl: u64,
    /// When the fill started, for the debug log's time taken.
    pub started: std::time::Instant,
    /// The coverage epoch the table was covered in at the start (`None`:
    /// not covered, not to be cached).
    pub covered: Option<u64>,
}

impl FillPlan {
    /// The table, the client's database, the TTL asked for (else
    /// `default_ttl`) and `negative_ttl`.
    pub fn new(
        settings: &Settings,
        table: &Arc<TableSchema>,
        db: Db,
        ttl: Option<u64>,
    ) -> FillPlan {
        FillPlan {
            table: table.clone(),
            db,
            ttl: ttl.unwrap_or(settings.default_ttl),
            negative_ttl: settings.negative_ttl,
            started: std::time::Instant::now(),
            covered: entries::coverage::covered_at_start(&table.key_name),
        }
    }
}

/// Keys whose fills were started together (a READ's one key, a MULTIREAD's
/// missing keys): one plan, always in the same query.
pub struct FetchGroup {
    plan: Arc<FillPlan>,
    /// The blocked client that started the group, when the group's own
    /// fills answer it wholly (a READ; a MULTIREAD that joined no other
    /// fill): it can carry the group's completion to the main thread.
    carrier: Option<crate::redis::blocked::Carrier>,
    /// Cache keys and their fills, aligned with `pks`.
    keys: Vec<(String, FillId)>,
    /// Canonical primary keys (JSON objects).
    pks: Vec<String>,
}

/// Some keys of a group and their rows, in a chunk.
struct Piece {
    plan: Arc<FillPlan>,
    keys: Vec<(String, FillId)>,
    /// Aligned with `keys`, or the query's error.
    rows: Result<Vec<Option<String>>, String>,
}

/// A chunk of fills to end under Redis's lock.
struct Completion {
    pieces: Vec<Piece>,
    /// The chunk's turn (see `fetch::HANDOFF_TURN`), released once it ran.
    _turn: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Completion {
    fn into_work(self) -> MainThreadWork {
        Box::new(move |ctx: &Context| self.run(ctx))
    }

    /// Ends every fill of the chunk: caches (or not) and answers its
    /// waiters. Each key on its own: a panic in one leaves the others right.
    /// The context's selected database is restored (a carrier's is its
    /// client's).
    fn run(self, ctx: &Context) {
        stats::inc(&STATS.completion_chunks);
        let selected = keys::selected_db(ctx);
        for piece in self.pieces {
            let mut rows = piece.rows.map(Vec::into_iter);
            for (key, id) in piece.keys {
                let outcome: FillOutcome = match &mut rows {
                    Ok(rows) => Ok(rows.next().flatten()),
                    Err(e) => Err(e.clone()),
                };
                let target = FillTarget {
                    db: piece.plan.db,
                    key,
                    id,
                    ttl: piece.plan.ttl,
                    negative_ttl: piece.plan.negative_ttl,
                    started: piece.plan.started,
                    covered: piece.plan.covered,
                    table: &piece.plan.table.key_name,
                };
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    for waiter in entries::complete_fill(ctx, &target, &outcome) {
                        waiter(&outcome);
                    }
                }));
            }
        }
        keys::select_db(ctx, selected);
    }
}

fn busy(limit: usize) -> redis_module::RedisError {
    err(format!(
        "pgcache: too many fills in flight (max_inflight {limit}); try again"
    ))
}

/// A READ's answer from a fill's outcome.
fn read_answer(outcome: &FillOutcome) -> RedisResult {
    match outcome {
        Ok(Some(row)) => Ok(RedisValue::StringBuffer(row.as_bytes().to_vec())),
        Ok(None) => Ok(RedisValue::Null),
        Err(e) => Err(err(e)),
    }
}

/// A READ's miss of `key` (its canonical pk is `pk_json`): joins the key's
/// fill or starts one; the client blocks until it ends.
pub fn read_miss(
    ctx: &Context,
    settings: &Settings,
    plan: FillPlan,
    key: String,
    pk_json: &str,
    responder: Responder,
) -> RedisResult {
    let db = plan.db;
    if entries::new_fills(db, std::iter::once(&key)) > 0
        && entries::fills_in_flight() >= settings.max_inflight
    {
        stats::inc(&STATS.busy_rejections);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let reply = responder.into_blocked(ctx, settings.answer_deadline_ms())?;
    let carrier = reply.carrier();
    let waiter: Waiter = Box::new(move |outcome| reply.answer(read_answer(outcome)));
    match entries::join_fill(db, &key, &plan.table, waiter) {
        Join::Joined => stats::inc(&STATS.coalesced_waits),
        Join::Started(id) => start(FetchGroup {
            plan: Arc::new(plan),
            carrier: Some(carrier),
            keys: vec![(key, id)],
            pks: vec![pk_json.to_owned()],
        }),
    }
    Ok(RedisValue::NoReply)
}

/// Runs a new group's fills (or, under the `lose_fills` test fault, loses
/// them: only the safety nets answer their clients then).
fn start(group: FetchGroup) {
    if crate::test_faults::lose_fills() {
        return;
    }
    fetch::enqueue(group);
}

/// A MULTIREAD waiting for some of its keys. It is answered once every key
/// is in, even after an error (the first error is the answer).
struct Batch(Mutex<BatchState>);

struct BatchState {
    /// Each input position's answer as JSON text (`null` for no row).
    slots: Vec<Option<String>>,
    /// Distinct keys still pending.
    pending: usize,
    error: Option<String>,
    reply: Option<BlockedReply>,
}

impl Batch {
    fn deliver(&self, positions: &[usize], outcome: &FillOutcome) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Err(e) => {
                st.error.get_or_insert_with(|| e.clone());
            }
            Ok(row) => {
                for &p in positions {
                    if let Some(slot) = st.slots.get_mut(p) {
                        *slot = Some(row.clone().unwrap_or_else(|| "null".into()));
                    }
                }
            }
        }
        st.pending = st.pending.saturating_sub(1);
        if st.pending > 0 {
            return;
        }
        let Some(reply) = st.reply.take() else { return };
        match st.error.take() {
            Some(e) => reply.answer(Err(err(e))),
            None => {
                let json = json_array(st.slots.iter().map(|s| s.as_deref().unwrap_or("null")));
                reply.answer(Ok(RedisValue::StringBuffer(json.into_bytes())));
            }
        }
    }
}

/// A MULTIREAD's misses: `missing` holds each distinct missing key, its
/// canonical pk and the input positions it answers; `slots` the answers of
/// the hits. All new fills of the call are one group: one query.
pub fn multiread_misses(
    ctx: &Context,
    settings: &Settings,
    plan: FillPlan,
    slots: Vec<Option<String>>,
    missing: Vec<(String, String, Vec<usize>)>,
    responder: Responder,
) -> RedisResult {
    let db = plan.db;
    let new = entries::new_fills(db, missing.iter().map(|(k, _, _)| k));
    if new > 0 && entries::fills_in_flight() + new > settings.max_inflight {
        stats::inc(&STATS.busy_rejections);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let reply = responder.into_blocked(ctx, settings.answer_deadline_ms())?;
    let carrier = reply.carrier();
    let batch = Arc::new(Batch(Mutex::new(BatchState {
        slots,
        pending: missing.len(),
        error: None,
        reply: Some(reply),
    })));
    let mut joined_other_fills = false;
    let mut group = FetchGroup {
        plan: Arc::new(plan),
        carrier: None,
        keys: Vec::new(),
        pks: Vec::new(),
    };
    for (key, pk_json, positions) in missing {
        let batch = batch.clone();
        let waiter: Waiter = Box::new(move |outcome| batch.deliver(&positions, outcome));
        match entries::join_fill(db, &key, &group.plan.table, waiter) {
            Join::Joined => {
                stats::inc(&STATS.coalesced_waits);
                joined_other_fills = true;
            }
            Join::Started(id) => {
                group.keys.push((key, id));
                group.pks.push(pk_json);
            }
        }
    }
    if !group.keys.is_empty() {
        if !joined_other_fills {
            // Answered when its own group ends: it can carry the group.
            group.carrier = Some(carrier);
        }
        start(group);
    }
    Ok(RedisValue::NoReply)
}

/// The safety net for fills: those whose answer is overdue are ended with
/// an error (their keys are free for new fills again). Under Redis's lock.
pub fn reap_overdue(settings: &Settings) {
    let waiters = entries::reap_overdue_fills(settings.answer_deadline_ms());
    if waiters.is_empty() {
        return;
    }
    crate::log::warning(&format!(
        "pgcache: {} fill(s) got no answer within {} ms; their clients get an error",
        waiters.len(),
        settings.answer_deadline_ms()
    ));
    let outcome: FillOutcome = Err("pgcache: the fill timed out (its answer was lost)".into());
    for waiter in waiters {
        let _ = catch_unwind(AssertUnwindSafe(|| waiter(&outcome)));
    }
}
