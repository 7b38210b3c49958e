//! Module configs `pgcache.<name>`: one per setting, all validated by
//! `Settings::set`, the same code that parses load arguments.

use crate::state::{self, SETTINGS};
use pgcache_core::settings::{affects_connection, NAMES};
use pgcache_core::Settings;
use redis_module::configuration::{
    register_string_configuration, ConfigurationContext, ConfigurationFlags, ConfigurationValue,
};
use redis_module::{raw, Context, RedisError, RedisString};
use std::sync::{Arc, Mutex};

/// A config, and the string its getter last gave Redis.
struct Param(&'static str, Mutex<Option<Shown>>);

/// A value as shown to Redis, owned here. Redis 7.0 copies the string a
/// config getter returns and never frees it, and redis-module 2.0.8 hands
/// the getter's string over (`take`): a fresh string per call would leak.
struct Shown(String, RedisString);
// SAFETY: used only by config getters, which run holding Redis's lock.
unsafe impl Send for Shown {}

impl ConfigurationValue<RedisString> for Param {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        // Settings::get redacts the password.
        let value = SETTINGS.load().get(self.0).unwrap_or_default();
        let mut shown = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if shown.as_ref().is_none_or(|s| s.0 != value) {
            let string = crate::cache::redis_string(None, value.as_bytes());
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
        let current = SETTINGS.load();
        if self.0 == "pg_password"
            && value == pgcache_core::settings::REDACTED
            && !current.pg_password.is_empty()
        {
            // CONFIG REWRITE writes what the getter shows; keep the real password.
            return Ok(());
        }
        let mut next: Settings = (**current).clone();
        next.set(self.0, value)
            .map_err(|e| RedisError::String(e.to_string()))?;
        if next == **current {
            return Ok(());
        }
        // Connection settings must make a valid connection before they count.
        if affects_connection(self.0) {
            pgcache_pg::connect_config(&next).map_err(|e| RedisError::String(e.to_string()))?;
        }
        SETTINGS.store(Arc::new(next));
        if affects_connection(self.0) {
            if let Some(pg) = state::pg_if_ready() {
                pg.reconfigure(&SETTINGS.load())
                    .map_err(|e| RedisError::String(e.to_string()))?;
            }
        }
        if (affects_connection(self.0) || self.0 == "invalidation_channel")
            && state::pg_if_ready().is_some()
        {
            crate::invalidation::start_listener();
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
