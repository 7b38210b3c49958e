//! Taking Redis's lock from the background.
//!
//! One thread of the module (`pgcache-lock`) takes the lock for everyone:
//! tasks hand it work and await the result, so no runtime worker ever
//! blocks on the lock (they keep serving PostgreSQL I/O, timers and the
//! listener while Redis is busy), and the lock is taken through one detached
//! thread-safe context made at load (`RM_GetThreadSafeContext(NULL)` makes
//! and frees a whole fake client per use on Redis 7.0).
//!
//! Work runs in submission order. One hold runs what is queued for up to
//! `HOLD_BUDGET`, then the thread releases the lock and yields, so Redis's
//! main thread (which the lock is not fair to) gets its turn. Writes made in
//! a hold are replicated when it ends (`RM_ThreadSafeContextUnlock`
//! propagates them). Never wait for this thread from Redis's main thread:
//! it needs the lock the main thread holds (`submit` is fine).

use redis_module::{raw, Context};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce(&Context) + Send>;

static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Longest run of queued work in one hold of the lock.
const HOLD_BUDGET: Duration = Duration::from_micros(500);

/// The detached context the thread locks with.
struct LockContext(*mut raw::RedisModuleCtx);
// SAFETY: used only by the lock thread, only while it holds Redis's lock.
unsafe impl Send for LockContext {}

/// Starts the lock thread (at load, from the main thread).
pub fn start(ctx: &Context) -> Result<(), String> {
    if JOBS.get().is_some() {
        return Ok(());
    }
    // SAFETY: called at load with the module's context.
    let tsc = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.ctx) };
    let tsc = LockContext(tsc);
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("pgcache-lock".into())
        .spawn(move || lock_thread(tsc, rx))
        .map_err(|e| format!("cannot start the lock thread: {e}"))?;
    let _ = JOBS.set(tx);
    Ok(())
}

fn lock_thread(tsc: LockContext, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        // SAFETY: the context was made for this purpose and lives for the
        // process; lock and unlock pair up below.
        unsafe { raw::RedisModule_ThreadSafeContextLock.unwrap()(tsc.0) };
        let ctx = Context::new(tsc.0);
        let started = Instant::now();
        run_job(first, &ctx);
        while started.elapsed() < HOLD_BUDGET {
            match jobs.try_recv() {
                Ok(job) => run_job(job, &ctx),
                Err(_) => break,
            }
        }
        // SAFETY: locked above by this thread.
        unsafe { raw::RedisModule_ThreadSafeContextUnlock.unwrap()(tsc.0) };
        std::thread::yield_now();
    }
}

fn run_job(job: Job, ctx: &Context) {
    // A panic ends the job, not the thread; what the job owned (blocked
    // clients included) answers as it unwinds.
    let _ = catch_unwind(AssertUnwindSafe(|| job(ctx)));
}

/// Runs `f` under Redis's lock on the lock thread, some time later; `f`
/// must select the database it works in.
pub fn submit(f: impl FnOnce(&Context) + Send + 'static) {
    if let Some(jobs) = JOBS.get() {
        let _ = jobs.send(Box::new(f));
    }
}

/// The lock thread is gone or `f` panicked.
#[derive(Debug)]
pub struct Failed;

/// Runs `f` under Redis's lock and returns its result.
pub async fn run<R: Send + 'static>(
    f: impl FnOnce(&Context) -> R + Send + 'static,
) -> Result<R, Failed> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    submit(move |ctx| {
        let _ = tx.send(f(ctx));
    });
    rx.await.map_err(|_| Failed)
}

/// Whether Redis asks modules not to replicate now (`RM_AvoidReplicaTraffic`:
/// a manual failover or `CLIENT PAUSE WRITE` is waiting for replicas to
/// catch up). Call holding Redis's lock.
pub fn replica_traffic_unwelcome() -> bool {
    // SAFETY: a plain read of server state, under Redis's lock.
    unsafe { raw::RedisModule_AvoidReplicaTraffic.is_some_and(|f| f() != 0) }
}

/// Runs `f` under Redis's lock like `run`, once Redis no longer asks
/// modules to hold their writes: deletes made while a manual failover
/// pauses writes would move the primary's offset past the one its replica
/// must reach, and the failover would time out. Checked in the same hold of
/// the lock as `f` runs in, so no pause begins in between, and with no
/// round trip of its own. Nothing is served meanwhile (READ is
/// `may-replicate`, so paused too).
pub async fn run_writing<R, F>(f: F) -> Result<R, Failed>
where
    R: Send + 'static,
    F: FnOnce(&Context) -> R + Send + 'static,
{
    let mut f = f;
    loop {
        let attempt = run(move |ctx| {
            if replica_traffic_unwelcome() {
                Err(f)
            } else {
                Ok(f(ctx))
            }
        });
        match attempt.await? {
            Ok(r) => return Ok(r),
            Err(back) => {
                f = back;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
