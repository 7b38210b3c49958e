//! Loading the module, and Redis's server events.
//!
//! The load runs every step that can fail first (arguments, configs,
//! commands, the PostgreSQL layer's settings and TLS) and only then starts
//! threads and subscribes to server events, last: Redis 7.0 leaves a failed
//! load's server-event subscriptions behind (redis/redis#12808, fixed in
//! 7.4), and the next event would call into an unloaded library.

use crate::commands;
use crate::config;
use crate::entries;
use crate::fills;
use crate::invalidation;
use crate::log;
use crate::redis::cluster;
use crate::redis::gil;
use crate::runtime;
use crate::schema_check;
use crate::settings;
use crate::test_faults;
use pgcache_core::Settings;
use pgcache_pg::Pg;
use redis_module::{raw, Context, ContextFlags, RedisString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// What a cluster publishes unless `events` is given.
const CLUSTER_DEFAULT_EVENTS: &str = "cache_write,cache_invalidate";

/// Loads the module; on `Err` nothing of it runs (no thread, no event
/// subscription).
pub fn load(ctx: &Context, args: &[RedisString]) -> Result<(), String> {
    let args: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.try_as_str()
                .map(str::to_owned)
                .map_err(|_| format!("module argument {} is not valid UTF-8", i + 1))
        })
        .collect::<Result<_, _>>()?;
    let in_cluster = ctx.get_flags().contains(ContextFlags::CLUSTER);
    let mut args = args;
    // In a cluster every PUBLISH crosses the cluster bus to every node: one
    // bus message per node per hit would cost more than the hit. Unless
    // `events` is given, a cluster publishes only writes and invalidations.
    let events_given = args.chunks(2).any(|pair| pair[0] == "events");
    if in_cluster && !events_given {
        args.extend(["events".to_owned(), CLUSTER_DEFAULT_EVENTS.to_owned()]);
    }
    let parsed = Settings::from_module_args(&args).map_err(|e| e.to_string())?;
    settings::replace(parsed);
    cluster::init(ctx, in_cluster);
    config::register(ctx, &args)?;
    config::cluster_check(&settings::current())?;
    commands::register(ctx)?;
    // The pool is built (TLS settings and CA file checked) but connects
    // only when first used.
    let pg = Pg::new(&settings::current()).map_err(|e| e.to_string())?;
    // Nothing can fail from here on but starting threads.
    runtime::set_pg(pg);
    test_faults::read_environment();
    runtime::start()?;
    gil::start(ctx)?;
    // A cluster node has database 0 only (SELECT of another is refused).
    entries::set_databases(if in_cluster { 1 } else { read_databases(ctx) });
    read_loglevel(ctx);
    entries::set_replica(ctx.get_flags().contains(ContextFlags::SLAVE));
    invalidation::start();
    schema_check::start();
    start_housekeeping();
    subscribe_to_server_events(ctx)?;
    config::loaded();
    let s = settings::current();
    log::notice(&format!(
        "pgcache: loaded; PostgreSQL {} (pool {}), key prefix '{}'",
        describe_target(&s),
        s.pg_pool_size,
        s.cache_prefix
    ));
    if in_cluster {
        let events = s.get("events").unwrap_or_default();
        if s.events.hit || s.events.miss {
            log::warning(&format!(
                "pgcache: cluster mode with events '{events}': every cache_hit and cache_miss \
                 event crosses the cluster bus to every node; consider events {CLUSTER_DEFAULT_EVENTS}"
            ));
        } else {
            log::notice(&format!("pgcache: cluster mode; events '{events}'"));
        }
        if cluster::lookups_follow_command_slot() {
            log::notice(
                "pgcache: this server looks keys up in the running command's hash slot: \
                 MULTIREAD looks up keys of other slots outside the command",
            );
        }
    }
    if test_faults::any() {
        log::warning("pgcache: test faults are on (PGCACHE_TEST_FAULTS): not for production");
    }
    Ok(())
}

/// Where the pool connects, without the password.
fn describe_target(s: &Settings) -> String {
    if s.pg_url.is_empty() {
        format!(
            "{}@{}:{}/{}",
            s.pg_user, s.pg_host, s.pg_port, s.pg_database
        )
    } else {
        pgcache_core::settings::redact_url(&s.pg_url)
    }
}

/// `CONFIG GET databases`, at load (on the main thread).
fn read_databases(ctx: &Context) -> i32 {
    if let Ok(redis_module::RedisValue::Array(v)) = ctx.call("CONFIG", &["GET", "databases"][..]) {
        if let Some(
            redis_module::RedisValue::SimpleString(s) | redis_module::RedisValue::BulkString(s),
        ) = v.get(1)
        {
            if let Ok(n) = s.parse() {
                return n;
            }
        }
    }
    16
}

/// Follows Redis's `loglevel` (at load and on CONFIG SET).
fn read_loglevel(ctx: &Context) {
    if let Ok(redis_module::RedisValue::Array(v)) = ctx.call("CONFIG", &["GET", "loglevel"][..]) {
        if let Some(
            redis_module::RedisValue::SimpleString(s) | redis_module::RedisValue::BulkString(s),
        ) = v.get(1)
        {
            log::set_debug(s == "debug");
        }
    }
}

/// Once a second, while fills are in flight, under Redis's lock: the safety
/// net that ends fills whose answer is overdue.
fn start_housekeeping() {
    runtime::spawn("housekeeping", async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if entries::fills_in_flight() > 0 {
                let _ = gil::run(|_| fills::reap_overdue(&settings::current())).await;
            }
        }
    });
}

// ---------------------------------------------------------------------------
// server events

type EventCallback = unsafe extern "C" fn(
    *mut raw::RedisModuleCtx,
    raw::RedisModuleEvent,
    u64,
    *mut std::ffi::c_void,
);

fn subscribe_to_server_events(ctx: &Context) -> Result<(), String> {
    let events: [(u64, EventCallback); 5] = [
        (
            raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED,
            role_changed,
        ),
        (raw::REDISMODULE_EVENT_LOADING, loading),
        (raw::REDISMODULE_EVENT_FLUSHDB, flushed),
        (raw::REDISMODULE_EVENT_SWAPDB, swapped),
        (raw::REDISMODULE_EVENT_CONFIG, config_changed),
    ];
    for (id, callback) in events {
        // SAFETY: the module's context at load; the callbacks are ours and
        // live as long as the library (which is never unloaded).
        let status = unsafe {
            raw::RedisModule_SubscribeToServerEvent.unwrap()(
                ctx.ctx,
                raw::RedisModuleEvent { id, dataver: 1 },
                Some(callback),
            )
        };
        if status != raw::REDISMODULE_OK as i32 {
            return Err(format!("cannot subscribe to server event {id}"));
        }
    }
    if cluster::enabled() {
        // SAFETY: as above.
        let status = unsafe {
            raw::RedisModule_SubscribeToKeyspaceEvents.unwrap()(
                ctx.ctx,
                raw::NotifyEvent::GENERIC.bits(),
                Some(keyspace_event),
            )
        };
        if status != raw::REDISMODULE_OK as i32 {
            return Err("cannot subscribe to keyspace events".into());
        }
    }
    Ok(())
}

/// Keyspace events (cluster mode only): a `restore` is a key arriving by
/// slot migration (`entries::migrated`).
unsafe extern "C" fn keyspace_event(
    ctx: *mut raw::RedisModuleCtx,
    _type: std::os::raw::c_int,
    event: *const std::os::raw::c_char,
    key: *mut raw::RedisModuleString,
) -> std::os::raw::c_int {
    // SAFETY: Redis passes a NUL-terminated event name.
    if event.is_null() || unsafe { std::ffi::CStr::from_ptr(event) }.to_bytes() != b"restore" {
        return 0;
    }
    guarded("a keyspace event", || {
        let ctx = Context::new(ctx);
        let mut len = 0usize;
        // SAFETY: a live key name for the duration of the callback.
        let key = unsafe {
            let ptr = raw::RedisModule_StringPtrLen.unwrap()(key, &mut len);
            std::slice::from_raw_parts(ptr.cast::<u8>(), len)
        };
        entries::migrated::restored(&ctx, key);
    });
    0
}

/// Runs a server-event handler; a panic in it is caught (it would abort
/// Redis).
fn guarded(what: &str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        log::warning(&format!("pgcache: internal error handling {what}"));
    }
}

/// A replica neither LISTENs nor writes; a replica promoted to primary
/// starts its listener (and drops what it holds, as after any gap). A node
/// demoted stops deleting at once (`entries::may_delete`).
unsafe extern "C" fn role_changed(
    ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut std::ffi::c_void,
) {
    guarded("a role change", || {
        let replica = subevent == raw::REDISMODULE_EVENT_REPLROLECHANGED_NOW_REPLICA;
        if replica {
            invalidation::stop();
        }
        entries::set_replica(replica);
        if !replica {
            // Its entries came by replication: nothing here marked their
            // databases, and a resumed source deletes only in marked ones.
            entries::mark_dbs_holding_keys(&Context::new(ctx));
            invalidation::start();
        }
    });
}

/// Loading an RDB/AOF file or a full sync: nothing loaded is trusted until
/// a gap flush dropped it.
unsafe extern "C" fn loading(
    ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut std::ffi::c_void,
) {
    guarded("loading", || {
        let started = [
            raw::REDISMODULE_SUBEVENT_LOADING_RDB_START,
            raw::REDISMODULE_SUBEVENT_LOADING_AOF_START,
            raw::REDISMODULE_SUBEVENT_LOADING_REPL_START,
        ]
        .contains(&subevent);
        if started {
            invalidation::loading_started();
        } else {
            invalidation::loading_ended(&Context::new(ctx));
        }
    });
}

/// FLUSHALL / FLUSHDB: fills in flight must not bring rows back.
unsafe extern "C" fn flushed(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut std::ffi::c_void,
) {
    guarded("a flush", || {
        if subevent == raw::REDISMODULE_SUBEVENT_FLUSHDB_START {
            entries::detach_all_fills();
        }
    });
}

/// SWAPDB: entries of either database now live in the other.
unsafe extern "C" fn swapped(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    _subevent: u64,
    data: *mut std::ffi::c_void,
) {
    guarded("SWAPDB", || {
        // SAFETY: Redis passes a RedisModuleSwapDbInfo for this event.
        if let Some(info) = unsafe { data.cast::<raw::RedisModuleSwapDbInfo>().as_ref() } {
            entries::databases_swapped(info.dbnum_first, info.dbnum_second);
        }
    });
}

/// CONFIG SET: follow `loglevel`.
unsafe extern "C" fn config_changed(
    ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    _subevent: u64,
    data: *mut std::ffi::c_void,
) {
    guarded("a config change", || {
        // SAFETY: Redis passes a RedisModuleConfigChange for this event,
        // whose names are C strings.
        let Some(change) = (unsafe { data.cast::<raw::RedisModuleConfigChange>().as_ref() }) else {
            return;
        };
        let loglevel = (0..change.num_changes).any(|i| unsafe {
            let name = *change.config_names.add(i as usize);
            !name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == b"loglevel"
        });
        if loglevel {
            read_loglevel(&Context::new(ctx));
        }
    });
}
