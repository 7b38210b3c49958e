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
    pub fills_uncached_unpublished: AtomicU64,
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
    /// The replication source (`replication.rs`): transactions and row
    /// changes applied, the batches they were applied in, tables flushed
    /// whole, applies held back until a commit was visible, resumes from
    /// the marker and gap flushes.
    pub replication_transactions: AtomicU64,
    pub replication_batches: AtomicU64,
    pub replication_changes: AtomicU64,
    pub replication_tables_flushed: AtomicU64,
    pub replication_barrier_waits: AtomicU64,
    pub replication_resumes: AtomicU64,
    pub replication_gap_flushes: AtomicU64,
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

/// The replication source's positions and state, for INFO.
#[derive(Default)]
pub struct Replication {
    /// `replication_state_name`'s index.
    pub state: std::sync::atomic::AtomicU8,
    /// End of the last applied commit (or idle position).
    pub applied_lsn: AtomicU64,
    /// What was last acknowledged to PostgreSQL.
    pub acked_lsn: AtomicU64,
    /// Where the server's WAL was at its latest message.
    pub server_lsn: AtomicU64,
    /// Milliseconds (Unix) since when applied has been behind the server;
    /// 0 when caught up.
    pub behind_since_ms: AtomicU64,
    pub last_gap_reason: std::sync::Mutex<String>,
    /// The slot's `wal_status` as last read ('' before).
    pub slot_wal_status: std::sync::Mutex<String>,
    /// The slot's `safe_wal_size` in bytes; -1 when unlimited or unknown.
    pub slot_safe_wal_size: std::sync::atomic::AtomicI64,
}

pub static REPLICATION: LazyLock<Replication> = LazyLock::new(Replication::default);

pub const REPLICATION_OFF: u8 = 0;
pub const REPLICATION_CONNECTING: u8 = 1;
pub const REPLICATION_CREATING_SLOT: u8 = 2;
pub const REPLICATION_CATCHING_UP: u8 = 3;
pub const REPLICATION_STREAMING: u8 = 4;
pub const REPLICATION_DISCONNECTED: u8 = 5;

pub fn replication_state_name() -> &'static str {
    match REPLICATION.state.load(Ordering::Relaxed) {
        REPLICATION_CONNECTING => "connecting",
        REPLICATION_CREATING_SLOT => "creating_slot",
        REPLICATION_CATCHING_UP => "catching_up",
        REPLICATION_STREAMING => "streaming",
        REPLICATION_DISCONNECTED => "disconnected",
        _ => "off",
    }
}
