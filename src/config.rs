//! Module configs `pgcache.<name>`: one per setting, all validated by
//! `Settings::set`, the same code that parses load arguments. A change that
//! needs it rebuilds the pool or restarts the listener; nothing else does
//! (a listener restart is a gap, which drops the cache).
//!
//! Secrets never get lost: `CONFIG REWRITE` writes what the getter shows, a
//! redacted password, so a password can be set only where it is read back
//! from: the load line, the config file, or `pg_password_file`. `CONFIG SET`
//! of `pg_password`, or of a `pg_url` holding one, is refused at run time.

use crate::invalidation;
use crate::redis::cluster;
use crate::redis::reply::redis_string;
use crate::runtime;
use crate::settings;
use pgcache_core::settings::{rebuilds_pool, restarts_listener, url_has_password, NAMES, REDACTED};
use pgcache_core::Settings;
use redis_module::configuration::{
    register_string_configuration, ConfigurationContext, ConfigurationFlags, ConfigurationValue,
};
use redis_module::{raw, Context, RedisError, RedisString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set while the module loads: configs are then applied from the load line
/// and the config file, where secrets may be given.
static LOADING: AtomicBool = AtomicBool::new(true);

/// The module has loaded: from now on `CONFIG SET` of a secret is refused.
pub fn loaded() {
    LOADING.store(false, Ordering::Release);
}

/// A config, and the string its getter last gave Redis.
struct Param(&'static str, Mutex<Option<Shown>>);

/// A value as shown to Redis, owned here. Redis 7.0 copies the string a
/// config getter returns and never frees it, and redis-module 2.0.8 hands
/// the getter's string over (`take`): a fresh string per call would leak.
struct Shown(String, RedisString);
// SAFETY: used only by config getters, which run holding Redis's lock.
unsafe impl Send for Shown {}

fn refused_secret(name: &str) -> RedisError {
    RedisError::String(format!(
        "ERR pgcache: {name} cannot hold a password set at run time: CONFIG REWRITE would write it as {REDACTED} and a restart would lose it; write the password to a file and CONFIG SET pgcache.pg_password_file <path> (or give it on the load line)"
    ))
}

impl ConfigurationValue<RedisString> for Param {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        // Settings::get redacts the password.
        let value = settings::current().get(self.0).unwrap_or_default();
        let mut shown = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if shown.as_ref().is_none_or(|s| s.0 != value) {
            let string = redis_string(None, value.as_bytes());
            *shown = Some(Shown(value, string));
        }
        let inner = shown.as_ref().map_or(std::ptr::null_mut(), |s| s.1.inner);
        // Borrowed by Redis: no reference is taken for it.
        RedisString::from_redis_module_string(std::ptr::null_mut(), inner)
    }

    fn set(&self, _ctx: &ConfigurationContext, value: RedisString) -> Result<(), RedisError> {
        let value = value.try_as_str().map_err(|_| {
            RedisError::String(format!("invalid value for '{}': not valid UTF-8", self.0))
        })?;
        let current = settings::current();
        let shown = current.get(self.0).unwrap_or_default();
        let loading = LOADING.load(Ordering::Acquire);
        match self.0 {
            // What the getter shows, set back (CONFIG REWRITE's round
            // trip): the real value stays.
            "pg_password" | "pg_url" if value == shown => return Ok(()),
            "pg_password" if !loading => return Err(refused_secret("pg_password")),
            "pg_url" if value.contains(REDACTED) => {
                return Err(RedisError::String(format!(
                    "ERR pgcache: pg_url holds a redacted password ({REDACTED}); give the real password in pg_password_file"
                )))
            }
            "pg_url" if !loading && url_has_password(value) => {
                return Err(refused_secret("pg_url"))
            }
            _ => {}
        }
        let mut next: Settings = (**current).clone();
        next.set(self.0, value)
            .map_err(|e| RedisError::String(e.to_string()))?;
        if next == **current {
            return Ok(());
        }
        cluster_check(&next).map_err(|e| RedisError::String(format!("ERR pgcache: {e}")))?;
        // Connection settings must make a valid connection before they count.
        if rebuilds_pool(self.0) {
            pgcache_pg::connect_config(&next).map_err(|e| RedisError::String(e.to_string()))?;
        }
        settings::replace(next);
        if let Some(pg) = runtime::pg_if_ready() {
            if rebuilds_pool(self.0) {
                pg.reconfigure(&settings::current())
                    .map_err(|e| RedisError::String(e.to_string()))?;
            }
            if restarts_listener(self.0) {
                invalidation::start();
            }
        }
        Ok(())
    }
}

/// Registers every config, with the load arguments as their values, then
/// lets Redis apply `pgcache.*` lines from its config file.
pub fn register(ctx: &Context, args: &[String]) -> Result<(), String> {
    let defaults = Settings::default();
    for &name in NAMES {
        let given = args
            .chunks(2)
            .rfind(|pair| pair[0] == name)
            .map(|pair| pair[1].clone());
        let initial = given.unwrap_or_else(|| defaults.get(name).unwrap_or_default());
        let flags = if name == "pg_password" || name == "pg_url" {
            ConfigurationFlags::SENSITIVE
        } else {
            ConfigurationFlags::DEFAULT
        };
        let param: &'static Param = Box::leak(Box::new(Param(name, Mutex::new(None))));
        register_string_configuration(ctx, name, param, &initial, flags, None);
    }
    // SAFETY: called at load with the module's context.
    let status = unsafe {
        raw::RedisModule_LoadConfigs.ok_or("RedisModule_LoadConfigs is missing")?(ctx.ctx)
    };
    if status != raw::REDISMODULE_OK as i32 {
        return Err(
            "a pgcache.* setting in the Redis config file is invalid (see the line above)".into(),
        );
    }
    Ok(())
}

/// What a cluster forbids in the settings: a `{` in `cache_prefix` would
/// make every entry hash that tag instead of its pk's.
pub fn cluster_check(s: &Settings) -> Result<(), String> {
    if !cluster::enabled() {
        return Ok(());
    }
    if s.invalidation_source == pgcache_core::InvalidationSource::Replication {
        // One slot per primary and a marker key in one hash slot: a
        // cluster would need a slot per node and a marker per hash slot.
        return Err(
            "invalidation_source replication is not supported in Redis Cluster; use notify".into(),
        );
    }
    match pgcache_core::cluster::brace_problem("cache_prefix", &s.cache_prefix) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}
