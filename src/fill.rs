//! Misses: blocking the client, running the fill on the background runtime,
//! caching the row and answering every client that waits for it.
//!
//! Every blocked client is answered: a `Replier` that is dropped unanswered
//! (a panic, an abandoned fill) replies with an error on its way out, and a
//! panicking fill is caught and turned into an error for its waiters.

use crate::cache::{self, err};
use crate::state::{self, shared, FillKey, STATS};
use pgcache_core::{FillId, PendingFetches, TableSchema, NEGATIVE_MARKER};
use pgcache_pg::PgError;
use redis_module::{raw, Context, RedisResult, RedisValue, ThreadSafeContext};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

/// A blocked client and the means to answer it, through the raw module API
/// (the crate's error replies mangle non-ASCII text).
pub struct Replier {
    blocked: *mut raw::RedisModuleBlockedClient,
    /// Thread-safe context bound to the blocked client: replies made on it
    /// reach the client when it is unblocked, with or without Redis's lock.
    ctx: *mut raw::RedisModuleCtx,
}

// SAFETY: the blocked-client handle and its thread-safe context are made for
// use from other threads; a Replier is used by one thread at a time.
unsafe impl Send for Replier {}

impl Replier {
    pub fn block(ctx: &Context) -> Replier {
        unsafe {
            let blocked = raw::RedisModule_BlockClient.unwrap()(ctx.ctx, None, None, None, 0);
            let ctx = raw::RedisModule_GetThreadSafeContext.unwrap()(blocked);
            Replier { blocked, ctx }
        }
    }

    pub fn reply(self, result: RedisResult) {
        cache::reply(&Context::new(self.ctx), result);
        let mut answered = self;
        answered.finish();
    }

    fn finish(&mut self) {
        if self.blocked.is_null() {
            return;
        }
        unsafe {
            raw::RedisModule_FreeThreadSafeContext.unwrap()(self.ctx);
            raw::RedisModule_UnblockClient.unwrap()(self.blocked, std::ptr::null_mut());
        }
        self.blocked = std::ptr::null_mut();
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        if !self.blocked.is_null() {
            cache::reply(
                &Context::new(self.ctx),
                Err(err("pgcache: the request was abandoned (internal error)")),
            );
            self.finish();
        }
    }
}

/// How a client's command answers: now, or through its blocked client.
pub enum Responder {
    Direct,
    /// Answered later; the user name is the client's, taken in the command
    /// handler (a background task's context is always user `default`).
    Blocked(Replier, Vec<u8>),
}

impl Responder {
    /// Answers `result`; for a direct reply the handler returns it.
    pub fn answer(self, result: RedisResult) -> RedisResult {
        match self {
            Responder::Direct => result,
            Responder::Blocked(r, _) => {
                r.reply(result);
                Ok(RedisValue::NoReply)
            }
        }
    }

    /// Answers with bytes borrowed from Redis (no copy for a direct reply).
    pub fn answer_bytes(self, ctx: &Context, bytes: &[u8]) -> RedisResult {
        match self {
            Responder::Direct => {
                cache::reply_bytes(ctx, bytes);
                Ok(RedisValue::NoReply)
            }
            Responder::Blocked(r, _) => {
                r.reply(Ok(RedisValue::StringBuffer(bytes.to_vec())));
                Ok(RedisValue::NoReply)
            }
        }
    }

    /// The ACL user the command runs as: `None` means the context's own.
    pub fn user(&self) -> Option<&[u8]> {
        match self {
            Responder::Direct => None,
            Responder::Blocked(_, user) => Some(user),
        }
    }

    /// The blocked client, blocking it now if the command had not yet.
    pub fn into_replier(self, ctx: &Context) -> Replier {
        match self {
            Responder::Direct => Replier::block(ctx),
            Responder::Blocked(r, _) => r,
        }
    }
}

/// The result of one key's fill: the row as JSON, `None` where no row has the
/// key, or the error message.
pub type Outcome = Result<Option<String>, String>;

/// Who waits for a fill.
pub enum Waiter {
    /// A READ.
    Read(Replier),
    /// A MULTIREAD, for these positions of its input.
    Batch(Arc<Batch>, Vec<usize>),
}

impl Waiter {
    fn deliver(self, outcome: &Outcome) {
        match self {
            Waiter::Read(r) => r.reply(match outcome {
                Ok(Some(row)) => Ok(RedisValue::StringBuffer(row.as_bytes().to_vec())),
                Ok(None) => Ok(RedisValue::Null),
                Err(e) => Err(err(e)),
            }),
            Waiter::Batch(batch, positions) => batch.deliver(&positions, outcome),
        }
    }
}

/// A MULTIREAD waiting for some of its keys.
pub struct Batch(Mutex<BatchState>);

struct BatchState {
    /// Each input position's answer as JSON text (`null` for no row).
    slots: Vec<Option<String>>,
    /// Distinct keys still pending.
    pending: usize,
    replier: Option<Replier>,
}

impl Batch {
    pub fn new(slots: Vec<Option<String>>, pending: usize, replier: Replier) -> Arc<Batch> {
        Arc::new(Batch(Mutex::new(BatchState {
            slots,
            pending,
            replier: Some(replier),
        })))
    }

    fn deliver(&self, positions: &[usize], outcome: &Outcome) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(_) = st.replier else { return };
        match outcome {
            Err(e) => {
                if let Some(r) = st.replier.take() {
                    r.reply(Err(err(e)));
                }
                return;
            }
            Ok(row) => {
                for &p in positions {
                    if let Some(slot) = st.slots.get_mut(p) {
                        *slot = Some(row.clone().unwrap_or_else(|| "null".into()));
                    }
                }
            }
        }
        st.pending -= 1;
        if st.pending == 0 {
            let json = json_array(st.slots.iter().map(|s| s.as_deref().unwrap_or("null")));
            if let Some(r) = st.replier.take() {
                r.reply(Ok(RedisValue::StringBuffer(json.into_bytes())));
            }
        }
    }
}

/// `[a,b,...]` from JSON texts.
pub fn json_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// Runs `f` holding Redis's lock, from a background thread. A panic in `f`
/// is caught: waiters it dropped answer with an error as they unwind.
pub fn with_gil(f: impl FnOnce(&Context)) {
    let tsc = ThreadSafeContext::new();
    let guard = tsc.lock();
    let _ = catch_unwind(AssertUnwindSafe(|| f(&guard)));
}

/// Runs `work` on the background runtime, catching a panic as an error.
pub fn spawn_guarded<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, PgError>> + Send + 'static,
    then: impl FnOnce(Result<T, String>) + Send + 'static,
) {
    state::runtime().spawn(async move {
        let result = match state::runtime().spawn(work).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(join) if join.is_panic() => {
                Err("pgcache: internal error in a background task".to_string())
            }
            Err(_) => Err("pgcache: background task cancelled".to_string()),
        };
        then(result);
    });
}

/// A fill's settings, captured when it starts.
pub struct FillPlan {
    pub table: Arc<TableSchema>,
    pub db: i32,
    pub ttl: u64,
    pub negative_ttl: u64,
}

/// Misses waiting for a connection, per table oid (see `pgcache_core::pending`).
static PENDING: LazyLock<Mutex<PendingFetches<u32, FetchGroup>>> =
    LazyLock::new(|| Mutex::new(PendingFetches::new()));

/// Most keys one batched query asks for (a MULTIREAD's keys are never split).
const MAX_KEYS_PER_QUERY: usize = 500;

fn pending() -> MutexGuard<'static, PendingFetches<u32, FetchGroup>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keys whose fills were started together (a READ's one key, a MULTIREAD's
/// missing keys): one plan, always in the same query.
pub struct FetchGroup {
    plan: FillPlan,
    /// Cache keys and their fills, aligned with `pks`.
    keys: Vec<(String, FillId)>,
    /// Canonical primary keys (JSON objects).
    pks: Vec<String>,
}

impl FetchGroup {
    pub fn new(plan: FillPlan) -> FetchGroup {
        FetchGroup {
            plan,
            keys: Vec::new(),
            pks: Vec::new(),
        }
    }

    pub fn add(&mut self, key: String, id: FillId, pk_json: String) {
        self.keys.push((key, id));
        self.pks.push(pk_json);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Groups taken for one query. Dropped before `complete` (a panic), it
/// answers their waiters with an error and ends their fills.
struct Taken(Vec<FetchGroup>);

impl Taken {
    fn complete(mut self, outcome: Result<Vec<Option<String>>, String>, schema_changed: bool) {
        let groups = std::mem::take(&mut self.0);
        if schema_changed {
            if let Some(g) = groups.first() {
                let oid = g.plan.table.oid;
                with_gil(|_| shared().forget_table(oid));
            }
        }
        complete_groups(groups, outcome);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            complete_groups(std::mem::take(&mut self.0), Err(INTERNAL.to_string()));
        }
    }
}

const INTERNAL: &str = "pgcache: internal error in a background task";

/// Queues a fill of `group`'s keys and starts the task that will run it, or
/// find it already taken by a query that started meanwhile.
pub fn enqueue(group: FetchGroup) {
    let oid = group.plan.table.oid;
    pending().push(oid, group.keys.len(), group);
    state::runtime().spawn(async move {
        let fetch = state::runtime().spawn(fetch_queued(oid));
        if fetch.await.is_err() {
            // The task died before or after its take: take once more so no
            // queued group is left without a task (see pgcache_core::pending).
            let groups = take_queued(oid);
            if !groups.is_empty() {
                complete_groups(groups, Err(INTERNAL.to_string()));
            }
        }
    });
}

fn take_queued(oid: u32) -> Vec<FetchGroup> {
    pending().take(&oid, MAX_KEYS_PER_QUERY, |a, b| {
        Arc::ptr_eq(&a.plan.table, &b.plan.table)
    })
}

/// One query for whatever is queued for table `oid` once a connection is free.
async fn fetch_queued(oid: u32) {
    let started = Instant::now();
    let fetched = state::pg()
        .fetch_taken(|| {
            let mut groups = take_queued(oid);
            let table = groups.first()?.plan.table.clone();
            let pks: Vec<String> = groups
                .iter_mut()
                .flat_map(|g| std::mem::take(&mut g.pks))
                .collect();
            Some((table, pks, Taken(groups)))
        })
        .await;
    let Some((taken, result)) = fetched else {
        return;
    };
    record_latency(started);
    let schema_changed = matches!(&result, Err(e) if e.schema_changed());
    taken.complete(result.map_err(|e| e.to_string()), schema_changed);
}

/// Most fills ended in one hold of Redis's lock: a batch of hundreds would
/// hold it for a millisecond or more and delay every other client.
const COMPLETIONS_PER_LOCK: usize = 16;

/// Ends the fills of `groups` with the rows of their query (aligned with
/// the groups' keys, in order) or its error, on the worker that read the
/// answer (handing them to another thread, tried, adds a wake-up to every
/// miss's latency). Each key is ended on its own: a panic in one leaves the
/// others' fills correct.
fn complete_groups(groups: Vec<FetchGroup>, outcome: Result<Vec<Option<String>>, String>) {
    let mut rows = match outcome {
        Ok(rows) => Ok(rows.into_iter()),
        Err(e) => Err(e),
    };
    let mut ends: Vec<(&FillPlan, &str, FillId, Outcome)> = Vec::new();
    for group in &groups {
        for (key, id) in &group.keys {
            let one: Outcome = match &mut rows {
                Ok(rows) => Ok(rows.next().flatten()),
                Err(e) => Err(e.clone()),
            };
            ends.push((&group.plan, key, *id, one));
        }
    }
    for (i, chunk) in ends.chunks(COMPLETIONS_PER_LOCK).enumerate() {
        if i > 0 {
            // Redis's lock is not fair: without a pause this thread takes it
            // again before the main thread, woken by the release, runs.
            std::thread::yield_now();
        }
        with_gil(|ctx| {
            for (plan, key, id, one) in chunk {
                let _ = catch_unwind(AssertUnwindSafe(|| complete(ctx, plan, key, *id, one)));
            }
        });
    }
}

fn record_latency(started: Instant) {
    STATS
        .fill_latency
        .record(started.elapsed().as_micros().min(u64::MAX as u128) as u64);
}

/// Ends a fill under Redis's lock: caches the result unless an invalidation
/// overtook it, then answers its waiters.
fn complete(ctx: &Context, plan: &FillPlan, key: &str, id: FillId, outcome: &Outcome) {
    let fill_key: FillKey = (plan.db, key.to_owned());
    let Some(finished) = shared().fills.finish(&fill_key, id) else {
        return;
    };
    match outcome {
        Ok(row) if finished.cacheable && !cache::is_replica(ctx) => {
            cache::select_db(ctx, plan.db);
            crate::invalidation::mark_db_used(plan.db);
            let stored = match row {
                Some(json) => cache::store(ctx, key, json, plan.ttl),
                None if plan.negative_ttl > 0 => {
                    let marker = std::str::from_utf8(NEGATIVE_MARKER).unwrap_or_default();
                    cache::store(ctx, key, marker, plan.negative_ttl)
                }
                None => Ok(()),
            };
            if let Err(e) = stored {
                ctx.log_warning(&format!("pgcache: could not cache {key}: {e}"));
            } else {
                ctx.log_debug(&format!("pgcache: filled {key}"));
            }
        }
        Ok(_) if !finished.cacheable => {
            STATS.stale_fills_discarded.fetch_add(1, Ordering::Relaxed);
            ctx.log_debug(&format!(
                "pgcache: fill of {key} overtaken by an invalidation; not cached"
            ));
        }
        Ok(_) => {}
        Err(e) => {
            STATS.fill_errors.fetch_add(1, Ordering::Relaxed);
            ctx.log_debug(&format!("pgcache: fill of {key} failed: {e}"));
        }
    }
    if matches!(outcome, Ok(None)) {
        STATS.not_found.fetch_add(1, Ordering::Relaxed);
    }
    for waiter in finished.waiters {
        waiter.deliver(outcome);
    }
}
