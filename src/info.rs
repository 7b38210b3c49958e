//! `INFO pgcache` and `PGCACHE.STATS`: the same figures.

use crate::catalog;
use crate::entries;
use crate::redis::cluster;
use crate::runtime;
use crate::settings;
use crate::stats::{self, get, REPLICATION, STATS};
use pgcache_core::pgoutput::format_lsn;
use redis_module::InfoContext;
use std::sync::atomic::Ordering;

/// Every numeric figure, as (name, value). In a crash report, figures
/// behind a lock are left out (the crashing thread may hold it).
fn figures(for_crash_report: bool) -> Vec<(&'static str, i64)> {
    let n = |a: &std::sync::atomic::AtomicU64| get(a) as i64;
    let mut out = vec![
        ("hits", n(&STATS.hits)),
        ("misses", n(&STATS.misses)),
        ("not_found", n(&STATS.not_found)),
    ];
    if !for_crash_report {
        out.push(("fills_in_flight", entries::fills_in_flight() as i64));
    }
    out.extend([
        ("coalesced_waits", n(&STATS.coalesced_waits)),
        ("busy_rejections", n(&STATS.busy_rejections)),
        ("stale_fills_discarded", n(&STATS.stale_fills_discarded)),
        ("fill_errors", n(&STATS.fill_errors)),
        ("fills_uncached_gap", n(&STATS.fills_uncached_gap)),
        (
            "fills_uncached_unpublished",
            n(&STATS.fills_uncached_unpublished),
        ),
        ("fills_uncached_oom", n(&STATS.fills_uncached_oom)),
        ("fills_uncached_paused", n(&STATS.fills_uncached_paused)),
        ("fills_reaped", n(&STATS.fills_reaped)),
        ("blocked_timeouts", n(&STATS.blocked_timeouts)),
        ("completion_chunks", n(&STATS.completion_chunks)),
        ("writes", n(&STATS.writes)),
        ("invalidations", n(&STATS.invalidations)),
    ]);
    if !for_crash_report {
        out.push(("catalog_tables", catalog::len() as i64));
        out.push((
            "catalog_lookups_in_flight",
            catalog::lookups_in_flight() as i64,
        ));
    }
    out.extend([
        ("catalog_lookups", n(&STATS.catalog_lookups)),
        (
            "fill_latency_p50_us",
            STATS.fill_latency.quantile(0.5) as i64,
        ),
        (
            "fill_latency_p99_us",
            STATS.fill_latency.quantile(0.99) as i64,
        ),
        ("fill_latency_max_us", STATS.fill_latency.max() as i64),
        ("notifications_received", n(&STATS.notifications_received)),
        ("notifications_ignored", n(&STATS.notifications_ignored)),
        (
            "notification_queue_overflows",
            n(&STATS.notification_queue_overflows),
        ),
        ("entries_invalidated", n(&STATS.entries_invalidated)),
        ("listener_reconnects", n(&STATS.listener_reconnects)),
        ("flushes", n(&STATS.flushes)),
        ("replication_lag_bytes", replication_lag_bytes()),
        ("replication_lag_seconds", replication_lag_seconds()),
        (
            "replication_transactions",
            n(&STATS.replication_transactions),
        ),
        ("replication_changes", n(&STATS.replication_changes)),
        ("replication_batches", n(&STATS.replication_batches)),
        (
            "replication_tables_flushed",
            n(&STATS.replication_tables_flushed),
        ),
        (
            "replication_barrier_waits",
            n(&STATS.replication_barrier_waits),
        ),
        ("replication_resumes", n(&STATS.replication_resumes)),
        ("replication_gap_flushes", n(&STATS.replication_gap_flushes)),
        (
            "replication_slot_safe_wal_size",
            REPLICATION.slot_safe_wal_size.load(Ordering::Relaxed),
        ),
        (
            "replication_published_tables",
            entries::coverage::covered_count().map_or(0, |n| n as i64),
        ),
        ("cluster_enabled", i64::from(cluster::enabled())),
        ("cluster_uncached_fills", n(&STATS.cluster_uncached_fills)),
        ("cluster_writes_uncached", n(&STATS.cluster_writes_uncached)),
        (
            "cluster_restored_dropped",
            n(&STATS.cluster_restored_dropped),
        ),
    ]);
    if let Some((phase, trusted, fresh)) = entries::trust_figures(for_crash_report) {
        out.extend([
            (
                "gap_flush_running",
                i64::from(matches!(phase, pgcache_core::trust::Phase::Flushing(_))),
            ),
            ("entries_trusted", i64::from(trusted)),
            ("gap_fresh_entries", fresh as i64),
        ]);
    }
    if !for_crash_report {
        if let Some(pg) = runtime::pg_if_ready() {
            let s = &pg.stats;
            let (max_size, open, in_use) = pg.pool_status();
            out.extend([
                ("pg_queries", n(&s.queries)),
                ("pg_errors", n(&s.errors)),
                ("timeouts", n(&s.timeouts)),
                ("pool_size", max_size as i64),
                ("pool_connections", open as i64),
                ("pool_in_use", in_use as i64),
            ]);
        }
    }
    out
}

/// The text figures, as (name, value).
fn texts(for_crash_report: bool) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("version", pgcache_core::VERSION.to_owned()),
        ("listener", entries::listener_name().to_owned()),
    ];
    if let Some((phase, _, _)) = entries::trust_figures(for_crash_report) {
        out.push(("trust_state", phase.name().to_owned()));
    }
    if !for_crash_report {
        out.push(("listener_last_error", entries::listener_error()));
        let s = settings::current();
        out.push((
            "invalidation_source",
            s.invalidation_source.as_str().to_owned(),
        ));
        out.push(("replication_slot", s.replication_slot.clone()));
        out.push((
            "replication_slot_wal_status",
            REPLICATION
                .slot_wal_status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        ));
        out.push((
            "replication_last_gap_reason",
            REPLICATION
                .last_gap_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        ));
    }
    let lsn = |a: &std::sync::atomic::AtomicU64| format_lsn(a.load(Ordering::Relaxed));
    out.extend([
        ("replication", stats::replication_state_name().to_owned()),
        ("replication_applied_lsn", lsn(&REPLICATION.applied_lsn)),
        ("replication_acked_lsn", lsn(&REPLICATION.acked_lsn)),
        ("replication_server_lsn", lsn(&REPLICATION.server_lsn)),
    ]);
    out
}

/// WAL the source has yet to apply (0 when off or caught up).
fn replication_lag_bytes() -> i64 {
    let applied = REPLICATION.applied_lsn.load(Ordering::Relaxed);
    let server = REPLICATION.server_lsn.load(Ordering::Relaxed);
    if stats::replication_state_name() == "off" {
        return 0;
    }
    server.saturating_sub(applied) as i64
}

/// How long the source has been behind the server, in seconds.
fn replication_lag_seconds() -> i64 {
    let since = REPLICATION.behind_since_ms.load(Ordering::Relaxed);
    if since == 0 || replication_lag_bytes() == 0 {
        return 0;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    (now.saturating_sub(since) / 1000) as i64
}

pub fn stats_json() -> String {
    let mut map: serde_json::Map<String, serde_json::Value> = figures(false)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    for (k, v) in texts(false) {
        map.insert(k.to_owned(), v.into());
    }
    serde_json::Value::Object(map).to_string()
}

#[allow(deprecated)] // the builder cannot name the section after the module alone
pub fn add_info(ctx: &InfoContext, for_crash_report: bool) {
    // Called on the main thread; a panic here would abort Redis.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.add_info_section(None);
        for (name, value) in texts(for_crash_report) {
            // INFO lines cannot hold CR or LF.
            let value = value.replace(['\r', '\n'], " ");
            ctx.add_info_field_str(name, &value);
        }
        for (name, value) in figures(for_crash_report) {
            ctx.add_info_field_long_long(name, value);
        }
    }));
}
