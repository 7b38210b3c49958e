//! Misses: blocking the client, running the fill on the background runtime,
//! caching the row and answering every client that waits for it.
//!
//! The path of a miss: the command handler blocks its client and queues the
//! fill (`enqueue`); the table's fetcher takes what is queued once it holds
//! a connection and runs one query; the rows go back to Redis's main thread
//! as the private data of one of the blocked clients (`Carrier`), whose
//! reply callback caches them and answers every waiting client. Workers
//! take Redis's lock only on fallback paths (no client can carry the rows).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

/// A blocked-client handle.
struct Blocked(*mut raw::RedisModuleBlockedClient);

// SAFETY: blocked-client handles are made for use from other threads
// (RM_UnblockClient is thread-safe); the mutex of `SharedBlock` serialises
// the one use made of it.
unsafe impl Send for Blocked {}

/// Where a blocked client stands.
enum BlockState {
    /// Waiting; whoever answers it unblocks it with the answer.
    Blocked(Blocked),
    /// Unblocked by a worker with a fill's completion, which Redis's main
    /// thread runs in the client's reply callback: the answer is left here
    /// for that callback to send (a second unblock would free the handle
    /// twice).
    Carrying(Option<Answer>),
    Answered,
}

/// An answer on its way to the main thread.
struct Answer(RedisResult);

// SAFETY: answers hold owned data only (strings, byte buffers, integers),
// never Redis-owned strings or contexts.
unsafe impl Send for Answer {}

type SharedBlock = Arc<Mutex<BlockState>>;

fn lock_block(b: &SharedBlock) -> MutexGuard<'_, BlockState> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a blocked client is unblocked with (its private data), handed to
/// `on_unblocked` on Redis's main thread.
enum Unblocked {
    /// The answer, made by whichever thread answered.
    Answer(RedisResult),
    /// Fills to end before the answer (see `Carrier`).
    Completion(Completion),
}

/// A blocked client and the means to answer it from any thread: the answer
/// travels as the unblock's private data and is sent by the reply callback
/// on the main thread, so no thread-safe context is made per client. Dropped
/// unanswered, it answers with an error.
pub struct Replier(SharedBlock);

impl Replier {
    pub fn block(ctx: &Context) -> Replier {
        // SAFETY: called from a command handler (or under Redis's lock) with
        // its context; the callbacks are this module's.
        let blocked = unsafe {
            raw::RedisModule_BlockClient.unwrap()(
                ctx.ctx,
                Some(on_unblocked),
                None,
                Some(free_unblocked),
                0,
            )
        };
        Replier(Arc::new(Mutex::new(BlockState::Blocked(Blocked(blocked)))))
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
        answer(&self.0, Err(err(ABANDONED)));
    }
}

const ABANDONED: &str = "pgcache: the request was abandoned (internal error)";

/// Answers a blocked client once; later answers are ignored.
fn answer(block: &SharedBlock, result: RedisResult) {
    let mut st = lock_block(block);
    match std::mem::replace(&mut *st, BlockState::Answered) {
        BlockState::Blocked(Blocked(bc)) => {
            drop(st);
            let answer = Box::into_raw(Box::new(Unblocked::Answer(result)));
            // SAFETY: the client is still blocked and unblocked only here;
            // Redis hands the answer to `on_unblocked` / `free_unblocked`.
            unsafe { raw::RedisModule_UnblockClient.unwrap()(bc, answer.cast()) };
        }
        BlockState::Carrying(None) => *st = BlockState::Carrying(Some(Answer(result))),
        other => *st = other,
    }
}

/// A second handle on a blocked client, held by the fill it started: the
/// worker that reads the fill's rows unblocks the client with them, and
/// Redis's main thread ends the fill in the client's reply callback. So
/// workers never take Redis's lock to end fills (waiting for it, and being
/// descheduled while holding it, delayed every other client).
///
/// Only a client answered by the fills it started may carry them (a READ; a
/// MULTIREAD that joined no other fill): it is still blocked when its
/// carrier is used, and answered while its completion runs.
pub struct Carrier(SharedBlock);

impl Carrier {
    /// After its completion ran: the answer it left, or an error if its
    /// fills did not answer it (not expected).
    fn take_answer(&self) -> RedisResult {
        let mut st = lock_block(&self.0);
        match std::mem::replace(&mut *st, BlockState::Answered) {
            BlockState::Carrying(Some(Answer(result))) => result,
            _ => Err(err(ABANDONED)),
        }
    }
}

/// A query's rows for one group (aligned with its keys), or its error.
type Rows = Result<Vec<Option<String>>, String>;

/// Fill groups and their rows on their way to Redis's main thread, carried
/// by `carrier`, the client that started the first group.
struct Completion {
    carrier: Carrier,
    work: Vec<(FetchGroup, Rows)>,
    /// The chunk's turn with the main thread, released (so the next chunk
    /// goes) when Redis has run this completion.
    _turn: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Completion {
    /// Unblocks the carrier with this completion, or hands it back when the
    /// client was answered already.
    fn hand_off(self) -> Result<(), Completion> {
        let mut st = lock_block(&self.carrier.0);
        let BlockState::Blocked(Blocked(bc)) =
            std::mem::replace(&mut *st, BlockState::Carrying(None))
        else {
            // Not expected: put the state back and end the fills elsewhere.
            *st = BlockState::Answered;
            drop(st);
            return Err(self);
        };
        drop(st);
        let unblocked = Box::into_raw(Box::new(Unblocked::Completion(self)));
        // SAFETY: the client was blocked and is unblocked only here (state
        // `Carrying` keeps answers from unblocking it); Redis hands the
        // completion to `on_unblocked` and `free_unblocked`.
        unsafe { raw::RedisModule_UnblockClient.unwrap()(bc, unblocked.cast()) };
        Ok(())
    }
}

/// Reply callback of every blocked client, on Redis's main thread: sends
/// the answer it was unblocked with, or first ends the fills of the
/// completion it carries, with a context whose writes replicate.
unsafe extern "C" fn on_unblocked(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: std::os::raw::c_int,
) -> std::os::raw::c_int {
    let unblocked = raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx).cast::<Unblocked>();
    let context = Context::new(ctx);
    let result = catch_unwind(AssertUnwindSafe(|| match unblocked.as_mut() {
        Some(Unblocked::Answer(result)) => std::mem::replace(result, Ok(RedisValue::NoReply)),
        Some(Unblocked::Completion(completion)) => {
            let work = std::mem::take(&mut completion.work);
            let _ = catch_unwind(AssertUnwindSafe(|| end_on_main_thread(&context, work)));
            completion.carrier.take_answer()
        }
        None => Err(err(ABANDONED)),
    }))
    .unwrap_or_else(|_| Err(err(ABANDONED)));
    cache::reply(&context, result);
    raw::REDISMODULE_OK as std::os::raw::c_int
}

/// Frees what a client was unblocked with. A completion still holding its
/// work belongs to a client that disconnected, or ran inside MULTI or a
/// script (Redis skips the reply callback then): its fills are ended from
/// a worker, under Redis's lock.
unsafe extern "C" fn free_unblocked(
    _ctx: *mut raw::RedisModuleCtx,
    privdata: *mut std::ffi::c_void,
) {
    if privdata.is_null() {
        return;
    }
    let unblocked = Box::from_raw(privdata.cast::<Unblocked>());
    let _ = catch_unwind(AssertUnwindSafe(move || {
        if let Unblocked::Completion(Completion { carrier, work, .. }) = *unblocked {
            // The client's answer has nowhere to go now.
            let _ = carrier.take_answer();
            if !work.is_empty() {
                state::runtime().spawn(async move { complete_groups(work) });
            }
        }
    }));
}

/// Ends groups in a carrier's reply callback, where writes are replicated
/// when the callback returns. `ctx` is the carrier client's: `complete`
/// selects each group's database on it, so the client's is restored after.
fn end_on_main_thread(ctx: &Context, work: Vec<(FetchGroup, Rows)>) {
    let client_db = cache::selected_db(ctx);
    for (group, rows) in work {
        for (key, id, one) in key_outcomes(&group, rows) {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                complete(ctx, &group.plan, key, id, &one)
            }));
        }
    }
    cache::select_db(ctx, client_db);
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

/// Fetchers of one table that may run at once while queries are quick
/// (below `QUICK_QUERY_US` on average): a miss then waits for the running
/// one to end its query (and is taken with everything queued meanwhile)
/// instead of starting a fetcher of its own, which wakes a worker thread
/// from Redis's main thread (about a tenth of the main thread's time under
/// 50 clients of cold misses against a local PostgreSQL). Measured on 2
/// cores: 1 gave about 10% more cold-miss throughput than 2. Slower queries
/// may use the whole pool.
const FETCHERS_RUNNING_WHEN_QUICK: usize = 1;
const QUICK_QUERY_US: u64 = 1_000;

/// Moving average of fill query times, in microseconds.
static QUERY_AVERAGE_US: AtomicU64 = AtomicU64::new(0);

fn record_query_time(us: u64) {
    let old = QUERY_AVERAGE_US.load(Ordering::Relaxed);
    QUERY_AVERAGE_US.store((old * 7 + us) / 8, Ordering::Relaxed);
}

fn max_running_fetchers() -> usize {
    if QUERY_AVERAGE_US.load(Ordering::Relaxed) < QUICK_QUERY_US {
        FETCHERS_RUNNING_WHEN_QUICK
    } else {
        usize::MAX
    }
}

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
    /// Hands the groups' rows to Redis's main thread, up to `HANDOFF_CHUNK`
    /// groups at a time, carried by the first client among them that can
    /// carry (see `Carrier`): one wake-up of the main thread per chunk, which
    /// then ends every fill of the chunk and answers every waiting client in
    /// one pass. Each chunk waits for its turn (`HANDOFF_TURN`): one chunk is
    /// with the main thread at a time, whichever query it comes from, so
    /// queries ending together, or one of hundreds of keys, never make Redis
    /// store and answer more than a chunk before it serves other clients.
    async fn complete(mut self, outcome: Rows, schema_changed: bool) {
        if schema_changed {
            if let Some(g) = self.0.front() {
                let oid = g.plan.table.oid;
                with_gil(|_| shared().forget_table(oid));
            }
        }
        let mut rows = outcome.map(Vec::into_iter);
        // Groups wait in `self` for their turn, for Drop to answer should
        // this task die.
        while !self.0.is_empty() {
            let turn = HANDOFF_TURN.acquire().await.ok();
            let mut work: Vec<(FetchGroup, Rows)> = Vec::new();
            let mut carrier: Option<Carrier> = None;
            while let Some(mut group) = self.0.pop_front() {
                let group_rows = match &mut rows {
                    Ok(rows) => Ok(rows.by_ref().take(group.keys.len()).collect()),
                    Err(e) => Err(e.clone()),
                };
                if carrier.is_none() {
                    carrier = group.carrier.take();
                }
                work.push((group, group_rows));
                if work.len() >= HANDOFF_CHUNK && carrier.is_some() {
                    break;
                }
            }
            hand_off_or_end(carrier, work, turn);
        }
    }
}

/// The turn of one chunk of completed groups (see `Taken::complete`): held
/// until Redis's main thread has run the chunk or freed it (a carrier that
/// disconnected: its fills are then ended by a worker, outside the turn),
/// or until the worker that could not hand it over has ended it.
static HANDOFF_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Hands `work` to Redis's main thread through `carrier`; without one (or
/// if it cannot carry), ends it from here under Redis's lock. `turn` is
/// released once the work is done.
fn hand_off_or_end(
    carrier: Option<Carrier>,
    work: Vec<(FetchGroup, Rows)>,
    turn: Option<tokio::sync::SemaphorePermit<'static>>,
) {
    if work.is_empty() {
        return;
    }
    let Some(carrier) = carrier else {
        return complete_groups(work);
    };
    let completion = Completion {
        carrier,
        work,
        _turn: turn,
    };
    if let Err(back) = completion.hand_off() {
        complete_groups(back.work);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            complete_groups(failed(self.0.drain(..)));
        }
    }
}

/// Groups handed to Redis's main thread at once (see `Taken::complete`).
const HANDOFF_CHUNK: usize = 16;

const INTERNAL: &str = "pgcache: internal error in a background task";

/// Queues a fill of `group`'s keys, starting a fetcher for its table when
/// none will take it (see `pgcache_core::pending`).
pub fn enqueue(group: FetchGroup) {
    let oid = group.plan.table.oid;
    let start = pending().push(
        oid,
        group.keys.len(),
        group,
        || state::pg().has_free_connection(),
        max_running_fetchers(),
    );
    if start {
        start_fetcher(oid);
    }
}

/// Starts a fetcher of table `oid`: a task that waits for a connection,
/// takes what is queued and runs it as one query, and goes on while misses
/// keep coming (see `pgcache_core::pending`).
fn start_fetcher(oid: u32) {
    state::runtime().spawn(async move {
        // Where the fetcher stands: running a query (true) or waiting.
        let running = Arc::new(AtomicBool::new(false));
        let fetch = state::runtime().spawn(fetcher(oid, running.clone()));
        if fetch.await.is_err() {
            // It died: groups no other fetcher will take are answered with
            // an error (groups it took answer through `Taken`'s Drop).
            let orphans = pending().fetcher_died(&oid, running.load(Ordering::Acquire));
            if !orphans.is_empty() {
                complete_groups(failed(orphans));
            }
        }
    });
}

async fn fetcher(oid: u32, running: Arc<AtomicBool>) {
    loop {
        fetch_queued(oid, &running).await;
        let go_on = pending().finished(&oid);
        running.store(false, Ordering::Release);
        if !go_on {
            return;
        }
    }
}

/// The waiting fetcher's take; starts another fetcher for groups it leaves.
fn take_queued(oid: u32) -> Vec<FetchGroup> {
    let taken = pending().take(&oid, MAX_KEYS_PER_QUERY, |a, b| {
        Arc::ptr_eq(&a.plan.table, &b.plan.table)
    });
    if taken.start_fetcher {
        start_fetcher(oid);
    }
    taken.groups
}

/// One query for whatever is queued for table `oid` once a connection is free.
async fn fetch_queued(oid: u32, running: &AtomicBool) {
    let started = Instant::now();
    let took_at = std::sync::OnceLock::new();
    let fetched = state::pg()
        .fetch_taken(|| {
            let _ = took_at.set(Instant::now());
            let mut groups = take_queued(oid);
            running.store(true, Ordering::Release);
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
    if let Some(at) = took_at.get() {
        record_query_time(at.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
    }
    let schema_changed = matches!(&result, Err(e) if e.schema_changed());
    taken
        .complete(result.map_err(|e| e.to_string()), schema_changed)
        .await;
}

/// Most fills ended in one hold of Redis's lock: a batch of hundreds would
/// hold it for a millisecond or more and delay every other client.
const COMPLETIONS_PER_LOCK: usize = 16;

/// Ends the fills of `groups` with the rows of their query (aligned with
/// the groups' keys, in order) or its error, from a worker under Redis's
/// lock: the fallback when no blocked client can carry them to the main
/// thread (see `Taken::complete`), and the error path of a dead task. Each
/// key is ended on its own: a panic in one leaves the others' fills correct.
fn complete_groups(work: Vec<(FetchGroup, Rows)>) {
    let (groups, rows): (Vec<FetchGroup>, Vec<Rows>) = work.into_iter().unzip();
    let mut ends: Vec<(&FillPlan, &str, FillId, Outcome)> = Vec::new();
    for (group, rows) in groups.iter().zip(rows) {
        for (key, id, one) in key_outcomes(group, rows) {
            ends.push((&group.plan, key, id, one));
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

/// Each key of `group` with its fill's outcome: its row from `rows`
/// (aligned with the keys; `None` where no row has the key), or the error.
/// The rows are moved out, not copied.
fn key_outcomes(
    group: &FetchGroup,
    rows: Rows,
) -> impl Iterator<Item = (&str, FillId, Outcome)> + '_ {
    let mut rows = rows.map(Vec::into_iter);
    group.keys.iter().map(move |(key, id)| {
        let one = match &mut rows {
            Ok(rows) => Ok(rows.next().flatten()),
            Err(e) => Err(e.clone()),
        };
        (key.as_str(), *id, one)
    })
}

/// `groups`, each with the same error.
fn failed(groups: impl IntoIterator<Item = FetchGroup>) -> Vec<(FetchGroup, Rows)> {
    groups
        .into_iter()
        .map(|g| (g, Err(INTERNAL.to_string())))
        .collect()
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
            // No log line per stored fill: formatting it cost the main
            // thread on every miss, whatever the log level.
            if let Err(e) = stored {
                ctx.log_warning(&format!("pgcache: could not cache {key}: {e}"));
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
