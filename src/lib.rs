//! pgcache: a Redis module that serves PostgreSQL rows as a read-through cache.
//!
//! This crate is the Redis layer. The logic lives in `pgcache-core` (pure)
//! and the PostgreSQL work in `pgcache-pg`, which runs on a background tokio
//! runtime: no PostgreSQL I/O ever happens on Redis's main thread.
//!
//! Calls go one way, from the top of this list to the bottom; a module calls
//! only modules below it (CONTRIBUTING.md draws the layers):
//!
//! - `module` (load sequence, server events), `config`
//! - `commands`, `listener`
//! - `fills`, `flush`, `info`
//! - `catalog`, `entries`, `events`
//! - `redis` (thin wrappers over the module API)
//! - `runtime`, `settings`, `stats`, `log`, `scratch`, `test_faults`

mod catalog;
mod commands;
mod config;
mod entries;
mod events;
mod fills;
mod flush;
mod info;
mod invalidation;
mod listener;
mod log;
mod module;
mod redis;
mod replication;
mod runtime;
mod schema_check;
mod scratch;
mod settings;
mod stats;
mod test_faults;

use info::add_info;
use redis_module::{redis_module, Context, InfoContext, RedisResult, RedisString, Status};

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    match module::load(ctx, args) {
        Ok(()) => Status::Ok,
        Err(msg) => {
            ctx.log_warning(&format!("pgcache: refusing to load: {msg}"));
            Status::Err
        }
    }
}

fn deinit(ctx: &Context) -> Status {
    // The module's threads run this library's code: unmapping it under them
    // would crash Redis, so unloading is refused.
    ctx.log_warning("pgcache: MODULE UNLOAD is not supported; restart Redis to remove the module");
    Status::Err
}

redis_module! {
    name: "pgcache",
    version: pgcache_core::ENCODED_VERSION,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
    deinit: deinit,
    info: add_info,
}
