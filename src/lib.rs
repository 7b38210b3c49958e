//! pgcache: a Redis module that serves PostgreSQL rows as a read-through cache.
//!
//! This crate is the thin Redis layer: command registration, blocking and
//! replying, configs, INFO and events. The logic lives in `pgcache-core`
//! (pure) and the PostgreSQL work in `pgcache-pg`, which runs on a background
//! tokio runtime: no PostgreSQL I/O ever happens on Redis's main thread.

mod cache;
mod commands;
mod config;
mod fill;
mod info;
mod invalidation;
mod state;

use info::add_info;

use redis_module::{redis_module, Context, InfoContext, RedisResult, RedisString, Status};

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    match state::init(ctx, args) {
        Ok(()) => Status::Ok,
        Err(msg) => {
            ctx.log_warning(&format!("pgcache: refusing to load: {msg}"));
            Status::Err
        }
    }
}

/// A replica neither LISTENs nor writes; a replica promoted to primary
/// starts its listener (and drops what it holds, as after any gap).
#[redis_module_macros::role_changed_event_handler]
fn role_changed(_ctx: &Context, role: redis_module::server_events::ServerRole) {
    let replica = role == redis_module::server_events::ServerRole::Replica;
    invalidation::IS_REPLICA.store(replica, std::sync::atomic::Ordering::Relaxed);
    invalidation::start_listener();
}

#[redis_module_macros::loading_event_handler]
fn loading_changed(_ctx: &Context, event: redis_module::server_events::LoadingSubevent) {
    use redis_module::server_events::LoadingSubevent as L;
    invalidation::loading(matches!(
        event,
        L::RdbStarted | L::AofStarted | L::ReplStarted
    ));
}

/// FLUSHALL / FLUSHDB: fills in flight must not bring rows back.
#[redis_module_macros::flush_event_handler]
fn flushed(_ctx: &Context, event: redis_module::server_events::FlushSubevent) {
    if event == redis_module::server_events::FlushSubevent::Started {
        state::shared().fills.invalidate_all();
    }
}

fn deinit(ctx: &Context) -> Status {
    // The background runtime's threads run this library's code: unmapping it
    // under them would crash Redis, so unloading is refused.
    ctx.log_warning("pgcache: MODULE UNLOAD is not supported; restart Redis to remove the module");
    Status::Err
}

redis_module! {
    name: "pgcache",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
    deinit: deinit,
    info: add_info,
}
