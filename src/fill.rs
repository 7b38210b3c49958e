//! Misses: blocking the client, running the fill on the background runtime,
//! caching the row and answering every client that waits for it.
//!
//! Every blocked client is answered: a `Replier` that is dropped unanswered
//! (a panic, an abandoned fill) replies with an error on its way out, and a
//! panicking fill is caught and turned into an error for its waiters.

use crate::cache::{self, err};
use crate::state::{self, shared, FillKey, STATS};
use pgcache_core::{json_array, FillId, PendingFetches, TableSchema, NEGATIVE_MARKER};
use pgcache_pg::PgError;
use redis_module::{raw, Context, RedisResult, RedisValue, ThreadSafeContext};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

/// A blocked client's handles: the blocked-client handle, and a thread-safe
/// context bound to it, on which replies reach the client when it is
/// unblocked, made with or without Redis's lock.
struct Handles {
    blocked: *mut raw::RedisModuleBlockedClient,
    ctx: *mut raw::RedisModuleCtx,
}

// SAFETY: both handles are made for use from other threads; the mutex in
// `BlockState`'s owner serialises their use.
unsafe impl Send for Handles {}

/// Where a blocked client stands.
enum BlockState {
    /// Waiting; whoever answers it also unblocks it.
    Blocked(Handles),
    /// Already unblocked by a worker with a fill's completion, which Redis's
    /// main thread is about to run in the client's reply callback: an
    /// answer goes to the reply context only (a second unblock would free
    /// the handle twice).
    Carrying(Handles),
    Answered,
}

type SharedBlock = Arc<Mutex<BlockState>>;

fn lock_block(b: &SharedBlock) -> MutexGuard<'_, BlockState> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// A blocked client and the means to answer it, through the raw module API
/// (the crate's error replies mangle non-ASCII text). Dropped unanswered, it
/// answers with an error.
pub struct Replier(SharedBlock);

impl Replier {
    pub fn block(ctx: &Context) -> Replier {
        unsafe {
            let blocked = raw::RedisModule_BlockClient.unwrap()(
                ctx.ctx,
                Some(run_completion),
                None,
                Some(free_completion),
                0,
            );
            let ctx = raw::RedisModule_GetThreadSafeContext.unwrap()(blocked);
            Replier(Arc::new(Mutex::new(BlockState::Blocked(Handles {
                blocked,
                ctx,
            }))))
        }
    }

    /// The handle that lets a worker unblock this client with a fill's
    /// completion (see `Carrier`).
    pub fn carrier(&self) -> Carrier {
        Carrier(self.0.clone())
    }

    pub fn reply(self, result: RedisResult) {
        answer(&self.0, result);
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        answer(
            &self.0,
            Err(err("pgcache: the request was abandoned (internal error)")),
        );
    }
}

/// Answers a blocked client once; later answers are ignored.
fn answer(block: &SharedBlock, result: RedisResult) {
    let state = std::mem::replace(&mut *lock_block(block), BlockState::Answered);
    let (h, unblock) = match state {
        BlockState::Blocked(h) => (h, true),
        BlockState::Carrying(h) => (h, false),
        BlockState::Answered => return,
    };
    cache::reply(&Context::new(h.ctx), result);
    unsafe {
        raw::RedisModule_FreeThreadSafeContext.unwrap()(h.ctx);
        if unblock {
            raw::RedisModule_UnblockClient.unwrap()(h.blocked, std::ptr::null_mut());
        }
    }
}

/// A second handle on a blocked client, held by the fill it started: the
/// worker that reads the fill's rows unblocks the client with them, and
/// Redis's main thread ends the fill in the client's reply callback. So
/// workers never take Redis's lock to end fills (waiting for it, and being
/// descheduled while holding it, delayed every other client).
///
/// The client that starts a fill is answered only when that fill ends (a
/// READ by its own fill; a MULTIREAD once all its keys are in), so it is
/// still blocked when its carrier is used.
pub struct Carrier(SharedBlock);

impl Carrier {
    /// After its completion ran: a carrier its fill did not answer (a bug)
    /// is answered with an error, so it never refers to a freed client.
    fn settle(&self) {
        answer(
            &self.0,
            Err(err("pgcache: the request was abandoned (internal error)")),
        );
    }
}

/// A query's rows for one group (aligned with its keys), or its error.
type Rows = Result<Vec<Option<String>>, String>;

/// Fill groups and their rows on their way to Redis's main thread, carried
/// by `carrier`, the client that started the first group.
struct Completion {
    carrier: Carrier,
    work: Vec<(FetchGroup, Rows)>,
    /// Dropped (so its receiver wakes) once Redis has run this completion.
    _paced: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Completion {
    /// Unblocks the carrier with this completion, or hands it back when the
    /// client was answered already.
    fn hand_off(self: Box<Self>) -> Result<(), Box<Self>> {
        let blocked = {
            let mut st = lock_block(&self.carrier.0);
            match std::mem::replace(&mut *st, BlockState::Answered) {
                BlockState::Blocked(h) => {
                    let blocked = h.blocked;
                    *st = BlockState::Carrying(h);
                    blocked
                }
                other => {
                    *st = other;
                    drop(st);
                    return Err(self);
                }
            }
        };
        // SAFETY: the client is blocked and unblocked only here (state
        // `Carrying` keeps answers from unblocking it); Redis hands the
        // pointer back to `run_completion` and `free_completion`.
        unsafe {
            raw::RedisModule_UnblockClient.unwrap()(blocked, Box::into_raw(self).cast());
        }
        Ok(())
    }
}

/// Reply callback of every blocked client. Clients answered by a worker
/// come with no completion; a carrier comes with its groups': end their
/// fills here, on the main thread, with a context whose writes replicate.
unsafe extern "C" fn run_completion(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: std::os::raw::c_int,
) -> std::os::raw::c_int {
    let completion =
        raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx).cast::<Completion>();
    if let Some(completion) = completion.as_mut() {
        let work = std::mem::take(&mut completion.work);
        let ctx = Context::new(ctx);
        let _ = catch_unwind(AssertUnwindSafe(|| end_on_main_thread(&ctx, work)));
        completion.carrier.settle();
    }
    raw::REDISMODULE_OK as std::os::raw::c_int
}

/// Frees a carrier's completion. One still holding its work belongs to a
/// client that disconnected, or ran inside MULTI or a script (Redis skips
/// the reply callback then): its fills are ended from a worker, under
/// Redis's lock.
unsafe extern "C" fn free_completion(
    _ctx: *mut raw::RedisModuleCtx,
    privdata: *mut std::ffi::c_void,
) {
    if privdata.is_null() {
        return;
    }
    let completion = Box::from_raw(privdata.cast::<Completion>());
    let _ = catch_unwind(AssertUnwindSafe(move || {
        let Completion { carrier, work, .. } = *completion;
        // The client's answer has nowhere to go now.
        carrier.settle();
        if !work.is_empty() {
            state::runtime().spawn(async move { complete_each(work) });
        }
    }));
}

/// Ends groups in a carrier's reply callback, where writes are replicated
/// when the callback returns. `ctx` is the carrier client's: `complete`
/// selects each group's database on it, so the client's is restored after.
fn end_on_main_thread(ctx: &Context, work: Vec<(FetchGroup, Rows)>) {
    let client_db = cache::selected_db(ctx);
    for (group, rows) in work {
        let mut rows = rows.map(Vec::into_iter);
        for (key, id) in &group.keys {
            let one: Outcome = match &mut rows {
                Ok(rows) => Ok(rows.next().flatten()),
                Err(e) => Err(e.clone()),
            };
            let _ = catch_unwind(AssertUnwindSafe(|| {
                complete(ctx, &group.plan, key, *id, &one)
            }));
        }
    }
    cache::select_db(ctx, client_db);
}

/// `complete_groups` for groups with rows of their own.
fn complete_each(work: Vec<(FetchGroup, Rows)>) {
    for (group, rows) in work {
        complete_groups(vec![group], rows);
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

/// A MULTIREAD waiting for some of its keys. It is answered once every key
/// is in, even after an error (the first error is the answer): the fills it
/// started carry their completion on its blocked client (see `Carrier`).
pub struct Batch(Mutex<BatchState>);

struct BatchState {
    /// Each input position's answer as JSON text (`null` for no row).
    slots: Vec<Option<String>>,
    /// Distinct keys still pending.
    pending: usize,
    error: Option<String>,
    replier: Option<Replier>,
}

impl Batch {
    pub fn new(slots: Vec<Option<String>>, pending: usize, replier: Replier) -> Arc<Batch> {
        Arc::new(Batch(Mutex::new(BatchState {
            slots,
            pending,
            error: None,
            replier: Some(replier),
        })))
    }

    fn deliver(&self, positions: &[usize], outcome: &Outcome) {
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
        let Some(r) = st.replier.take() else { return };
        match st.error.take() {
            Some(e) => r.reply(Err(err(e))),
            None => {
                let json = json_array(st.slots.iter().map(|s| s.as_deref().unwrap_or("null")));
                r.reply(Ok(RedisValue::StringBuffer(json.into_bytes())));
            }
        }
    }
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
    /// The blocked client that started the group, when it is answered by
    /// the group's own fills (a READ; a MULTIREAD that joined no other
    /// fill): it can carry the group's completion to Redis's main thread.
    carrier: Option<Carrier>,
    /// Cache keys and their fills, aligned with `pks`.
    keys: Vec<(String, FillId)>,
    /// Canonical primary keys (JSON objects).
    pks: Vec<String>,
}

impl FetchGroup {
    pub fn new(plan: FillPlan, carrier: Option<Carrier>) -> FetchGroup {
        FetchGroup {
            plan,
            carrier,
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

    pub fn set_carrier(&mut self, carrier: Carrier) {
        self.carrier = Some(carrier);
    }
}

/// Groups taken for one query. Dropped before `complete` (a panic), it
/// answers their waiters with an error and ends their fills.
struct Taken(VecDeque<FetchGroup>);

impl Taken {
    /// Hands the groups' rows to Redis's main thread, each group carried by
    /// the client that started it (groups without one ride along with the
    /// next carrier), `HANDOFF_CHUNK` carriers at a time: the next chunk is
    /// handed over once Redis has run the previous one, so a query of
    /// hundreds of keys never makes Redis write hundreds of replies before
    /// it answers other clients.
    async fn complete(mut self, outcome: Rows, schema_changed: bool) {
        if schema_changed {
            if let Some(g) = self.0.front() {
                let oid = g.plan.table.oid;
                with_gil(|_| shared().forget_table(oid));
            }
        }
        let mut rows = outcome.map(Vec::into_iter);
        let mut riders: Vec<(FetchGroup, Rows)> = Vec::new();
        let mut in_chunk = 0;
        // Groups not handed over yet stay in `self`, for Drop to answer
        // should this task die.
        while let Some(group) = self.0.pop_front() {
            let group_rows = match &mut rows {
                Ok(rows) => Ok(rows.by_ref().take(group.keys.len()).collect()),
                Err(e) => Err(e.clone()),
            };
            let Some(carrier) = group.carrier.as_ref().map(|c| Carrier(c.0.clone())) else {
                riders.push((group, group_rows));
                continue;
            };
            in_chunk += 1;
            let (paced, ran) = if in_chunk == HANDOFF_CHUNK && !self.0.is_empty() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let mut work = std::mem::take(&mut riders);
            work.push((group, group_rows));
            let completion = Box::new(Completion {
                carrier,
                work,
                _paced: paced,
            });
            if let Err(mut back) = completion.hand_off() {
                complete_each(std::mem::take(&mut back.work));
            }
            if let Some(ran) = ran {
                // Whatever becomes of the completion drops the sender.
                let _ = ran.await;
                in_chunk = 0;
            }
        }
        // No carrier came after these: end them from here.
        complete_each(riders);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            complete_groups(
                std::mem::take(&mut self.0).into(),
                Err(INTERNAL.to_string()),
            );
        }
    }
}

/// Groups handed to Redis's main thread at a time (see `Taken::complete`).
const HANDOFF_CHUNK: usize = 8;

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
            Some((table, pks, Taken(groups.into())))
        })
        .await;
    let Some((taken, result)) = fetched else {
        return;
    };
    record_latency(started);
    let schema_changed = matches!(&result, Err(e) if e.schema_changed());
    taken
        .complete(result.map_err(|e| e.to_string()), schema_changed)
        .await;
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
