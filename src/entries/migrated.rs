//! Entries that arrive by slot migration are dropped.
//!
//! During `redis-cli --cluster reshard`, `MIGRATE` copies each key of a slot
//! to its new node (`RESTORE-ASKING` there). An entry copied that way may
//! be stale: the new node's listener can have applied a change's
//! notification before the copy arrived, while the old node's listener
//! found nothing left to delete. So a restored entry is never trusted: it
//! reads as missing at once and is deleted on the next turn of the event
//! loop (a write inside the keyspace callback would, on 7.0, replicate
//! before the RESTORE it follows). Migrated slots start cold.

use crate::redis::keys;
use crate::redis::reply::redis_string;
use crate::settings;
use crate::stats::{self, STATS};
use redis_module::Context;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Entries by database and key.
type EntrySet = HashSet<(i32, Vec<u8>)>;

/// Restored entries not deleted yet.
static RESTORED: Mutex<Option<EntrySet>> = Mutex::new(None);
/// Whether `RESTORED` may hold anything: the hit path's only cost.
static ANY: AtomicBool = AtomicBool::new(false);

/// The keyspace event `restore` for `key` in the context's database: an
/// entry of pgcache's is noted and its deletion scheduled.
pub fn restored(ctx: &Context, key: &[u8]) {
    let prefix = settings::current().cache_prefix.clone();
    let Some(rest) = key.strip_prefix(prefix.as_bytes()) else {
        return;
    };
    if pgcache_core::entry::parse_entry_key(rest).is_none() {
        return;
    }
    let db = keys::selected_db(ctx);
    let first = {
        let mut set = RESTORED.lock().unwrap_or_else(|e| e.into_inner());
        let set = set.get_or_insert_with(HashSet::new);
        let first = set.is_empty();
        set.insert((db, key.to_vec()));
        first
    };
    ANY.store(true, Ordering::Release);
    if first {
        ctx.create_timer(Duration::ZERO, drop_restored, ());
    }
}

/// Whether `key` (in the context's database) arrived by migration and is
/// not deleted yet.
pub fn is_restored(ctx: &Context, key: &[u8]) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let db = keys::selected_db(ctx);
    RESTORED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|s| s.contains(&(db, key.to_vec())))
}

/// Deletes the restored entries (the timer's callback, on the main thread).
fn drop_restored(ctx: &Context, (): ()) {
    let taken = RESTORED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    ANY.store(false, Ordering::Release);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let selected = keys::selected_db(ctx);
        for (db, key) in taken {
            keys::select_db(ctx, db);
            let name = redis_string(Some(ctx), &key);
            if keys::delete_string(ctx, &name) {
                keys::replicate_del(ctx, &[&name]);
                stats::inc(&STATS.cluster_restored_dropped);
            }
        }
        keys::select_db(ctx, selected);
    }));
}
