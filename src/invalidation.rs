//! The invalidation source the settings name (`invalidation_source`):
//! triggers and NOTIFY (`listener`) or logical replication
//! (`replication`). Starts, stops and restarts whichever it is, and tells
//! it about loading, where the two differ: what a load brings is flushed
//! after NOTIFY (notifications were lost meanwhile), while the replication
//! source reads the loaded progress marker and replays from it.

use crate::entries;
use crate::flush;
use crate::listener;
use crate::replication;
use crate::settings;
use pgcache_core::InvalidationSource;

fn replication_source() -> bool {
    settings::current().invalidation_source == InvalidationSource::Replication
}

/// Starts (or restarts) the configured source, stopping the other. Under
/// Redis's lock (the main thread).
pub fn start() {
    if replication_source() {
        listener::stop();
        replication::start();
    } else {
        replication::stop();
        replication::forget_marker();
        entries::coverage::cover_all();
        listener::start();
    }
}

pub fn stop() {
    listener::stop();
    replication::stop();
}

/// Loading began (RDB, AOF, a full sync): the replication source stops
/// (its marker is being replaced) and starts again when loading ends.
pub fn loading_started() {
    if replication_source() {
        replication::stop();
        entries::listener_started(true);
    }
    entries::loading_started();
}

pub fn loading_ended(ctx: &redis_module::Context) {
    entries::mark_dbs_holding_keys(ctx);
    let flush = entries::loading_ended();
    if replication_source() {
        replication::start();
    } else {
        // A marker the load brought no longer covers what is cached.
        replication::forget_marker();
        if let Some(generation) = flush {
            flush::gap(generation, None);
        }
    }
}
