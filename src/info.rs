//! `INFO pgcache` and `PGCACHE.STATS`: the same numbers.

use crate::state::{self, shared, STATS};
use redis_module::InfoContext;
use std::sync::atomic::Ordering;

/// Every figure, as (name, value).
fn figures() -> Vec<(&'static str, i64)> {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
    let (fills_in_flight, catalog_tables) = {
        let sh = shared();
        (sh.fills.in_flight() as i64, sh.catalog_len() as i64)
    };
    let mut out = vec![
        ("hits", load(&STATS.hits)),
        ("misses", load(&STATS.misses)),
        ("not_found", load(&STATS.not_found)),
        ("fills_in_flight", fills_in_flight),
        ("coalesced_waits", load(&STATS.coalesced_waits)),
        ("busy_rejections", load(&STATS.busy_rejections)),
        ("stale_fills_discarded", load(&STATS.stale_fills_discarded)),
        ("fill_errors", load(&STATS.fill_errors)),
        ("writes", load(&STATS.writes)),
        ("invalidations", load(&STATS.invalidations)),
        ("catalog_tables", catalog_tables),
        (
            "fill_latency_p50_us",
            STATS.fill_latency.quantile(0.5) as i64,
        ),
        (
            "fill_latency_p99_us",
            STATS.fill_latency.quantile(0.99) as i64,
        ),
        ("fill_latency_max_us", STATS.fill_latency.max() as i64),
    ];
    let l = &*crate::invalidation::LISTENER_STATS;
    out.extend([
        ("notifications_received", load(&l.notifications_received)),
        ("notifications_ignored", load(&l.notifications_ignored)),
        ("entries_invalidated", load(&l.entries_invalidated)),
        ("listener_reconnects", load(&l.reconnects)),
        ("flushes", load(&l.flushes)),
        (
            "gap_flush_running",
            i64::from(!crate::invalidation::entries_trusted()),
        ),
    ]);
    if let Some(pg) = state::pg_if_ready() {
        let s = &pg.stats;
        let queries = load(&s.queries);
        let (max_size, open, in_use) = pg.pool_status();
        out.extend([
            ("pg_queries", queries),
            ("pg_errors", load(&s.errors)),
            ("timeouts", load(&s.timeouts)),
            ("pool_size", max_size as i64),
            ("pool_connections", open as i64),
            ("pool_in_use", in_use as i64),
        ]);
    }
    out
}

pub fn stats_json() -> String {
    let mut map: serde_json::Map<String, serde_json::Value> = figures()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    map.insert(
        "listener".into(),
        crate::invalidation::listener_state_name().into(),
    );
    serde_json::Value::Object(map).to_string()
}

#[allow(deprecated)] // the builder cannot name the section after the module alone
pub fn add_info(ctx: &InfoContext, _for_crash_report: bool) {
    // Called on the main thread; a panic here would abort Redis.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.add_info_section(None);
        ctx.add_info_field_str("listener", crate::invalidation::listener_state_name());
        for (name, value) in figures() {
            ctx.add_info_field_long_long(name, value);
        }
    }));
}
