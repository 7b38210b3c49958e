//! The module's counters (relaxed atomics: no lock on the hit path). INFO
//! and PGCACHE.STATS render them (`info.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

#[derive(Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub not_found: AtomicU64,
    pub coalesced_waits: AtomicU64,
    pub busy_rejections: AtomicU64,
    pub stale_fills_discarded: AtomicU64,
    pub writes: AtomicU64,
    pub invalidations: AtomicU64,
    pub fill_errors: AtomicU64,
    /// Fills answered without caching because entries were not trusted
    /// (no listener connection, or the gap's fresh set was full).
    pub fills_uncached_gap: AtomicU64,
    /// Fills answered without caching because Redis was over maxmemory.
    pub fills_uncached_oom: AtomicU64,
    /// Blocked clients answered by their safety-net timeout.
    pub blocked_timeouts: AtomicU64,
    /// Fills found overdue and ended with an error (their answer was lost).
    pub fills_reaped: AtomicU64,
    /// Chunks of completed fills (on Redis's main thread or under its lock).
    pub completion_chunks: AtomicU64,
    /// Table lookups sent to PostgreSQL's catalog.
    pub catalog_lookups: AtomicU64,
    pub notifications_received: AtomicU64,
    pub notifications_ignored: AtomicU64,
    pub notification_queue_overflows: AtomicU64,
    pub entries_invalidated: AtomicU64,
    pub listener_reconnects: AtomicU64,
    pub flushes: AtomicU64,
    /// Fills answered without caching because Redis asked modules not to
    /// replicate (a manual failover or CLIENT PAUSE WRITE in progress).
    pub fills_uncached_paused: AtomicU64,
    /// Cluster: fills answered without caching because this node does not
    /// serve the entry's slot stably (another node's, migrating, importing).
    pub cluster_uncached_fills: AtomicU64,
    /// Cluster: WRITEs answered OK without storing, for the same reason.
    pub cluster_writes_uncached: AtomicU64,
    /// Cluster: entries that arrived by slot migration, deleted.
    pub cluster_restored_dropped: AtomicU64,
    /// Fill latency in microseconds, one sample per fill query: from its
    /// task's start (waiting for a connection included) to the answer.
    pub fill_latency: pgcache_core::latency::Histogram,
}

pub static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
