//! Blocked clients: one type for a client that waits while the background
//! works for it, answered once from any thread.
//!
//! An answer travels to Redis's main thread as the unblock's private data
//! and goes out in the client's reply callback, so no thread-safe context is
//! made per client. A blocked client can also *carry* work to the main
//! thread (`Carrier::carry`): Redis runs it in the reply callback, with a
//! context whose writes replicate, before the client's own answer goes out.
//! That is how workers get things done on the main thread without taking
//! its lock. This layer knows nothing of what the work is.
//!
//! Every blocked client is answered: dropped unanswered, a `BlockedReply`
//! answers with an error; a safety-net timeout answers one whose answer is
//! lost; work whose carrier went away (disconnected, timed out) still runs,
//! under the lock (`gil`).

use super::gil;
use super::reply::{err, reply};
use redis_module::{raw, Context, ContextFlags, RedisError, RedisResult, RedisValue};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

/// Work for Redis's main thread, carried by a blocked client.
pub type MainThreadWork = Box<dyn FnOnce(&Context) + Send>;

const ABANDONED: &str = "pgcache: the request was abandoned (internal error)";
const TIMED_OUT: &str =
    "pgcache: timed out waiting for the answer (the request was lost: internal error)";
/// What a command answers where its client cannot wait.
pub const CANNOT_BLOCK: &str = "pgcache: cannot wait for PostgreSQL here (inside MULTI/EXEC, a script or another module's command call, a client cannot be blocked); cached entries are answered, misses are not";

/// A blocked-client handle.
struct Handle(*mut raw::RedisModuleBlockedClient);
// SAFETY: blocked-client handles are made for use from other threads
// (RM_UnblockClient is thread-safe); the state's mutex serialises the one
// use made of it.
unsafe impl Send for Handle {}

/// An answer on its way to the main thread.
struct Answer(RedisResult);
// SAFETY: answers hold owned data only (strings, byte buffers, integers),
// never Redis-owned strings or contexts.
unsafe impl Send for Answer {}

enum State {
    /// Waiting; whoever answers it unblocks it with the answer.
    Blocked(Handle),
    /// Unblocked with work that the reply callback runs; an answer given
    /// meanwhile is left here for that callback to send (a second unblock
    /// would free the handle twice).
    Carrying(Option<Answer>),
    Answered,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a client is unblocked with (its private data).
enum Unblocked {
    Answer(Option<Answer>),
    Work(Option<MainThreadWork>, Shared),
}

/// A blocked client and the means to answer it from any thread.
pub struct BlockedReply(Shared);

/// A second handle on a blocked client, for carrying work (see the module
/// comment). Only a client that the carried work itself answers should
/// carry it: it is still blocked then, and answered while the work runs.
pub struct Carrier(Shared);

impl BlockedReply {
    /// Blocks the client of `ctx` (a command handler's, or a continuation's
    /// under Redis's lock) with a safety-net timeout. Refused, with the
    /// error the command should answer, where a client cannot be blocked:
    /// inside MULTI/EXEC, a Lua script, or another module's `RM_Call`
    /// (Redis would block a temporary client it recycles at once).
    pub fn block(ctx: &Context, timeout_ms: u64) -> Result<BlockedReply, RedisError> {
        if ctx
            .get_flags()
            .intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING)
        {
            return Err(err(CANNOT_BLOCK));
        }
        // SAFETY: a live context of a client; the callbacks are ours.
        let bc = unsafe {
            raw::RedisModule_BlockClient.unwrap()(
                ctx.ctx,
                Some(on_reply),
                Some(on_timeout),
                Some(on_free),
                i64::try_from(timeout_ms.max(1)).unwrap_or(i64::MAX),
            )
        };
        Ok(BlockedReply(Arc::new(Mutex::new(State::Blocked(Handle(
            bc,
        ))))))
    }

    pub fn answer(self, result: RedisResult) {
        deliver(&self.0, result);
    }

    pub fn carrier(&self) -> Carrier {
        Carrier(self.0.clone())
    }
}

impl Drop for BlockedReply {
    fn drop(&mut self) {
        deliver(&self.0, Err(err(ABANDONED)));
    }
}

/// Answers a blocked client once; later answers are ignored.
fn deliver(shared: &Shared, result: RedisResult) {
    let mut st = lock(shared);
    match std::mem::replace(&mut *st, State::Answered) {
        State::Blocked(h) => {
            drop(st);
            unblock(h, Unblocked::Answer(Some(Answer(result))));
        }
        State::Carrying(None) => *st = State::Carrying(Some(Answer(result))),
        other => *st = other,
    }
}

fn unblock(h: Handle, unblocked: Unblocked) {
    let privdata = Box::into_raw(Box::new(unblocked));
    // SAFETY: the client is unblocked exactly once (the state machine);
    // Redis hands the private data to `on_reply` and `on_free`.
    unsafe { raw::RedisModule_UnblockClient.unwrap()(h.0, privdata.cast()) };
}

impl Carrier {
    /// Unblocks the client with `work` for the main thread; hands the work
    /// back when the client was answered already.
    pub fn carry(self, work: MainThreadWork) -> Result<(), MainThreadWork> {
        let mut st = lock(&self.0);
        match std::mem::replace(&mut *st, State::Carrying(None)) {
            State::Blocked(h) => {
                drop(st);
                unblock(h, Unblocked::Work(Some(work), self.0.clone()));
                Ok(())
            }
            other => {
                *st = other;
                Err(work)
            }
        }
    }
}

/// The answer left for a carrier whose work ran, or an error if the work
/// did not answer it.
fn take_parked(shared: &Shared) -> RedisResult {
    match std::mem::replace(&mut *lock(shared), State::Answered) {
        State::Carrying(Some(Answer(result))) => result,
        _ => Err(err(ABANDONED)),
    }
}

/// Reply callback of every blocked client, on Redis's main thread.
unsafe extern "C" fn on_reply(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: std::os::raw::c_int,
) -> std::os::raw::c_int {
    let unblocked = raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx).cast::<Unblocked>();
    let context = Context::new(ctx);
    let result = catch_unwind(AssertUnwindSafe(|| match unblocked.as_mut() {
        Some(Unblocked::Answer(answer)) => answer
            .take()
            .map_or_else(|| Err(err(ABANDONED)), |Answer(r)| r),
        Some(Unblocked::Work(work, shared)) => {
            if let Some(work) = work.take() {
                let _ = catch_unwind(AssertUnwindSafe(|| work(&context)));
            }
            take_parked(shared)
        }
        None => Err(err(ABANDONED)),
    }))
    .unwrap_or_else(|_| Err(err(ABANDONED)));
    if !matches!(result, Ok(RedisValue::NoReply)) {
        reply(&context, result);
    }
    raw::REDISMODULE_OK as std::os::raw::c_int
}

/// Timeout callback: the safety net. The client gets an error; whatever
/// answers it later is dropped by Redis (its reply callback no longer runs).
unsafe extern "C" fn on_timeout(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: std::os::raw::c_int,
) -> std::os::raw::c_int {
    crate::stats::inc(&crate::stats::STATS.blocked_timeouts);
    let context = Context::new(ctx);
    let _ = catch_unwind(AssertUnwindSafe(|| reply(&context, Err(err(TIMED_OUT)))));
    raw::REDISMODULE_OK as std::os::raw::c_int
}

/// Frees what a client was unblocked with. Work still here belongs to a
/// client that disconnected or timed out (Redis skips the reply callback
/// then): it runs under the lock instead.
unsafe extern "C" fn on_free(_ctx: *mut raw::RedisModuleCtx, privdata: *mut std::ffi::c_void) {
    if privdata.is_null() {
        return;
    }
    let unblocked = Box::from_raw(privdata.cast::<Unblocked>());
    let _ = catch_unwind(AssertUnwindSafe(move || {
        if let Unblocked::Work(work, shared) = *unblocked {
            // The client's own answer has nowhere to go now.
            *lock(&shared) = State::Answered;
            if let Some(work) = work {
                gil::submit(work);
            }
        }
    }));
}

/// How a command answers: now, from its handler, or through its blocked
/// client (a continuation after a catalog lookup).
pub enum Responder {
    Direct,
    /// The user name is the client's, taken in the handler (a background
    /// context is always user `default`).
    Blocked(BlockedReply, Vec<u8>),
}

impl Responder {
    /// Answers `result`; for a direct reply the handler returns it.
    pub fn answer(self, result: RedisResult) -> RedisResult {
        match self {
            Responder::Direct => result,
            Responder::Blocked(r, _) => {
                r.answer(result);
                Ok(RedisValue::NoReply)
            }
        }
    }

    /// Answers with bytes borrowed from Redis (no copy for a direct reply).
    pub fn answer_bytes(self, ctx: &Context, bytes: &[u8]) -> RedisResult {
        match self {
            Responder::Direct => {
                super::reply::reply_bytes(ctx, bytes);
                Ok(RedisValue::NoReply)
            }
            Responder::Blocked(r, _) => {
                r.answer(Ok(RedisValue::StringBuffer(bytes.to_vec())));
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

    /// The blocked client, blocking it now if the command had not yet
    /// (an error where it cannot be blocked: see `BlockedReply::block`).
    pub fn into_blocked(self, ctx: &Context, timeout_ms: u64) -> Result<BlockedReply, RedisError> {
        match self {
            Responder::Direct => BlockedReply::block(ctx, timeout_ms),
            Responder::Blocked(r, _) => Ok(r),
        }
    }
}
