//! The background tokio runtime and the PostgreSQL layer, both made at load,
//! and the one way to run a panic-safe background task.

use pgcache_pg::Pg;
use std::future::Future;
use std::sync::OnceLock;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
/// A single-threaded runtime on a thread of its own, for the replication
/// stream: one message after another, its wake-ups stay on one thread
/// instead of waking the shared pool's other worker each time.
static STREAM_RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();
static PG: OnceLock<Pg> = OnceLock::new();

/// Starts the runtime's threads (the last step of a load: nothing may fail
/// after threads of this library run).
pub fn start() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pgcache-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the background runtime: {e}"))?;
    let stream = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the stream runtime: {e}"))?;
    let handle = stream.handle().clone();
    std::thread::Builder::new()
        .name("pgcache-stream".into())
        .spawn(move || stream.block_on(std::future::pending::<()>()))
        .map_err(|e| format!("cannot start the stream thread: {e}"))?;
    let _ = STREAM_RUNTIME.set(handle);
    let _ = RUNTIME.set(runtime);
    Ok(())
}

pub fn set_pg(pg: Pg) {
    let _ = PG.set(pg);
}

/// The PostgreSQL layer; made before anything can call this.
pub fn pg() -> &'static Pg {
    PG.get().expect("the PostgreSQL layer is made at load")
}

pub fn pg_if_ready() -> Option<&'static Pg> {
    PG.get()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get().expect("the runtime is started at load")
}

/// Whether a task failed instead of finishing.
#[derive(Debug)]
pub struct TaskFailed;

impl std::fmt::Display for TaskFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pgcache: internal error in a background task")
    }
}

/// Runs `work` on the runtime and hands its result to `then`, or
/// `TaskFailed` if it panicked or was cancelled: the work runs as a task of
/// its own, so a panic in it never loses `then` (which answers clients).
pub fn spawn_then<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
    then: impl FnOnce(Result<T, TaskFailed>) + Send + 'static,
) {
    let rt = runtime();
    rt.spawn(async move {
        let result = rt.spawn(work).await.map_err(|_| TaskFailed);
        then(result);
    });
}

/// Runs `work` on the runtime; a panic in it is logged, never more.
pub fn spawn(what: &'static str, work: impl Future<Output = ()> + Send + 'static) {
    spawn_then(work, move |r| {
        if r.is_err() {
            crate::log::warning(&format!("pgcache: internal error in {what} (task ended)"));
        }
    });
}

/// A task handle that can be aborted (the listener's).
pub fn spawn_abortable(
    work: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    runtime().spawn(work)
}

/// `spawn_abortable` on the stream runtime (the replication source).
pub fn spawn_stream(
    work: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    STREAM_RUNTIME
        .get()
        .expect("the runtime is started at load")
        .spawn(work)
}
