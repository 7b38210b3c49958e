//! Running fills: misses wait per table for a PostgreSQL connection, a
//! fetcher takes everything queued for its table as one query, and the rows
//! go back in chunks of keys, to Redis's main thread through a blocked
//! client that the chunk answers (a carrier), else under Redis's lock.

use super::{Completion, FetchGroup, Piece};
use crate::redis::blocked::Carrier;
use crate::redis::gil;
use crate::runtime;
use crate::stats::STATS;
use pgcache_core::{FillId, PendingFetches};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

/// Misses waiting for a connection, per table oid (see `pgcache_core::pending`).
static PENDING: LazyLock<Mutex<PendingFetches<u32, FetchGroup>>> =
    LazyLock::new(|| Mutex::new(PendingFetches::new()));

fn pending() -> MutexGuard<'static, PendingFetches<u32, FetchGroup>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fetchers of one table that may run at once while queries are quick
/// (below `QUICK_QUERY_US` on average): a miss then waits for the running
/// one to end its query (and is taken with everything queued meanwhile)
/// instead of starting a fetcher of its own, which wakes a worker thread
/// from Redis's main thread. Measured on 2 cores: 1 gave about 10% more
/// cold-miss throughput than 2. Slower queries may use the whole pool.
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

/// Most keys ended in one chunk: one wake-up of the main thread (or one hold
/// of Redis's lock) stores and answers at most this many, so a MULTIREAD of
/// thousands of misses never holds Redis for long. A MULTIREAD of up to this
/// many misses is still answered in one pass.
pub const CHUNK_KEYS: usize = 128;

/// Queues a fill of `group`'s keys, starting a fetcher for its table when
/// none will take it (see `pgcache_core::pending`).
pub fn enqueue(group: FetchGroup) {
    let oid = group.plan.table.oid;
    let start = pending().push(
        oid,
        group.keys.len(),
        group,
        || runtime::pg().has_free_connection(),
        max_running_fetchers(),
    );
    if start {
        start_fetcher(oid);
    }
}

/// Starts a fetcher of table `oid`: a task that waits for a connection,
/// takes what is queued and runs it as one query, and goes on while misses
/// keep coming.
fn start_fetcher(oid: u32) {
    // Where the fetcher stands: running a query (true) or waiting.
    let running = Arc::new(AtomicBool::new(false));
    let state = running.clone();
    runtime::spawn_then(fetcher(oid, running), move |result| {
        if result.is_err() {
            // It died: groups no other fetcher will take are answered with
            // an error (groups it took answer through `Taken`'s Drop).
            let orphans = pending().fetcher_died(&oid, state.load(Ordering::Acquire));
            if !orphans.is_empty() {
                fail(orphans);
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
    let fetched = runtime::pg()
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
    STATS
        .fill_latency
        .record(started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
    if let Some(at) = took_at.get() {
        record_query_time(at.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
    }
    if let Err(e) = &result {
        if e.schema_changed() {
            if let Some(g) = taken.0.front() {
                crate::catalog::forget(g.plan.table.oid);
            }
        }
    }
    taken.complete(result.map_err(|e| e.to_string())).await;
}

/// A query's rows (aligned with its keys), or its error.
type Rows = Result<Vec<Option<String>>, String>;

/// Groups taken for one query. Dropped before they are handed on (a
/// panic), it answers their waiters with an error and ends their fills.
struct Taken(VecDeque<FetchGroup>);

/// The turn of one chunk of completed fills: one chunk is with Redis's main
/// thread (or holding its lock) at a time, whichever query it comes from,
/// so queries ending together never make Redis store and answer more than
/// a chunk before it serves other clients. Released when the chunk has run
/// (or was dropped).
static HANDOFF_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

impl Taken {
    /// Hands the rows on in chunks of at most `CHUNK_KEYS` keys (a big
    /// group is split). A chunk goes to the main thread carried by a client
    /// whose own group ends in it; a chunk no client can carry (the head of
    /// a split MULTIREAD, groups whose clients joined other fills) runs
    /// under Redis's lock from the lock thread.
    async fn complete(mut self, outcome: Rows) {
        let mut rows = outcome.map(Vec::into_iter);
        // Groups wait in `self` for their turn, for Drop to answer should
        // this task die.
        while !self.0.is_empty() {
            let turn = HANDOFF_TURN.acquire().await.ok();
            let mut chunk = Chunk::default();
            while let Some(group) = self.0.front_mut() {
                if chunk.keys >= CHUNK_KEYS {
                    break;
                }
                let take = (CHUNK_KEYS - chunk.keys).min(group.keys.len());
                let keys: Vec<(String, FillId)> = group.keys.drain(..take).collect();
                let piece_rows: Rows = match &mut rows {
                    Ok(rows) => Ok(rows.by_ref().take(keys.len()).collect()),
                    Err(e) => Err(e.clone()),
                };
                chunk.keys += keys.len();
                chunk.pieces.push(Piece {
                    plan: group.plan.clone(),
                    keys,
                    rows: piece_rows,
                });
                if group.keys.is_empty() {
                    // The group ends in this chunk: its client may carry it.
                    let mut group = self.0.pop_front().expect("front exists");
                    if chunk.carrier.is_none() {
                        chunk.carrier = group.carrier.take();
                    }
                }
            }
            chunk.hand_on(turn);
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            fail(self.0.drain(..));
        }
    }
}

/// Keys of one or more groups, ended together.
#[derive(Default)]
struct Chunk {
    pieces: Vec<Piece>,
    keys: usize,
    /// A client answered by this chunk, to carry it to the main thread.
    carrier: Option<Carrier>,
}

impl Chunk {
    fn hand_on(self, turn: Option<tokio::sync::SemaphorePermit<'static>>) {
        let completion = Completion {
            pieces: self.pieces,
            _turn: turn,
        };
        let work = completion.into_work();
        match self.carrier {
            Some(carrier) => {
                if let Err(work) = carrier.carry(work) {
                    gil::submit(work);
                }
            }
            None => gil::submit(work),
        }
    }
}

const INTERNAL: &str = "pgcache: internal error in a background task";

/// Ends `groups` with an error, under Redis's lock.
fn fail(groups: impl IntoIterator<Item = FetchGroup>) {
    let pieces: Vec<Piece> = groups
        .into_iter()
        .map(|g| Piece {
            plan: g.plan,
            keys: g.keys,
            rows: Err(INTERNAL.to_string()),
        })
        .collect();
    let completion = Completion {
        pieces,
        _turn: None,
    };
    gil::submit(completion.into_work());
}
