//! Keys through the key API: reading a value in place, storing and deleting
//! with replication, the selected database, and scanning a database.
//!
//! Deletes use `RM_DeleteKey` plus a replicated `DEL`, never `RM_Call`: the
//! key API works for any key the node holds (in a cluster, too) and costs no
//! fake client or command lookup.

use redis_module::{raw, Context, KeyType, NotifyEvent, RedisString};

/// What a key holds.
pub enum Value<'a> {
    Missing,
    /// A string, borrowed from Redis.
    String(&'a [u8]),
    /// Another type.
    Other,
}

pub fn selected_db(ctx: &Context) -> i32 {
    // SAFETY: a live context.
    unsafe { raw::RedisModule_GetSelectedDb.unwrap()(ctx.ctx) }
}

pub fn select_db(ctx: &Context, db: i32) {
    // SAFETY: a live context; an invalid db leaves the selection as it is.
    unsafe {
        raw::RedisModule_SelectDb.unwrap()(ctx.ctx, db);
    }
}

/// Keys in the selected database.
pub fn db_size(ctx: &Context) -> u64 {
    // SAFETY: a live context.
    unsafe { raw::RedisModule_DbSize.unwrap()(ctx.ctx) }
}

/// Opens `name` for reading and hands its value to `f` without copying it.
pub fn read<R>(ctx: &Context, name: &RedisString, f: impl FnOnce(Value) -> R) -> R {
    let key = ctx.open_key(name);
    match key.key_type() {
        KeyType::Empty => f(Value::Missing),
        KeyType::String => match key.read() {
            Ok(Some(bytes)) => f(Value::String(bytes)),
            Ok(None) => f(Value::Missing),
            Err(_) => f(Value::Other),
        },
        _ => f(Value::Other),
    }
}

/// Stores a string with an absolute expiry `ttl` seconds from now (0: no
/// expiry), replicated to replicas and the AOF as `SET key value PXAT <ms>`.
///
/// Written through the key API and replicated with `RM_Replicate`: a
/// replicated `RM_Call("SET")` costs several times more (a fake client,
/// argument objects, command lookup). Absolute expiry keeps replicas and
/// the AOF exact.
pub fn store(ctx: &Context, name: &RedisString, value: &[u8], ttl: u64) -> Result<(), String> {
    let value = super::reply::redis_string(Some(ctx), value);
    // SAFETY: the key handle is opened, used and closed here, under Redis's
    // lock (the caller's context), on strings that outlive it.
    let expire_at = unsafe {
        let k =
            raw::RedisModule_OpenKey.unwrap()(ctx.ctx, name.inner, raw::REDISMODULE_WRITE as i32)
                .cast::<raw::RedisModuleKey>();
        if k.is_null() {
            return Err("cannot open the key for writing".into());
        }
        let mut status = raw::RedisModule_StringSet.unwrap()(k, value.inner);
        let at = if ttl > 0 && status == raw::REDISMODULE_OK as i32 {
            let at = raw::RedisModule_Milliseconds.unwrap()()
                .saturating_add(i64::try_from(ttl.saturating_mul(1000)).unwrap_or(i64::MAX));
            status = raw::RedisModule_SetAbsExpire.unwrap()(k, at);
            Some(at)
        } else {
            None
        };
        raw::RedisModule_CloseKey.unwrap()(k);
        if status != raw::REDISMODULE_OK as i32 {
            return Err("cannot write the key".into());
        }
        at
    };
    ctx.notify_keyspace_event(NotifyEvent::STRING, "set", name);
    match expire_at {
        Some(at) => {
            let at = super::reply::redis_string(Some(ctx), at.to_string().as_bytes());
            let pxat = super::reply::redis_string(Some(ctx), b"PXAT");
            ctx.replicate("SET", &[name, &value, &pxat, &at]);
        }
        None => ctx.replicate("SET", &[name, &value]),
    }
    Ok(())
}

/// Deletes `name` in the selected database if it holds a string (pgcache
/// writes nothing else, so never deletes anything else); true if it did.
/// Not replicated: the caller replicates one `DEL` for its batch
/// (`replicate_del`), in the same database.
pub fn delete_string(ctx: &Context, name: &RedisString) -> bool {
    // SAFETY: the key handle is opened, used and closed here, under Redis's
    // lock, on a string that outlives it.
    let deleted = unsafe {
        let k = raw::RedisModule_OpenKey.unwrap()(
            ctx.ctx,
            name.inner,
            (raw::REDISMODULE_READ | raw::REDISMODULE_WRITE) as i32,
        )
        .cast::<raw::RedisModuleKey>();
        if k.is_null() {
            return false;
        }
        let is_string =
            raw::RedisModule_KeyType.unwrap()(k) == raw::REDISMODULE_KEYTYPE_STRING as i32;
        let deleted =
            is_string && raw::RedisModule_DeleteKey.unwrap()(k) == raw::REDISMODULE_OK as i32;
        raw::RedisModule_CloseKey.unwrap()(k);
        deleted
    };
    if deleted {
        ctx.notify_keyspace_event(NotifyEvent::GENERIC, "del", name);
    }
    deleted
}

/// Replicates one `DEL` of `names` in the selected database.
pub fn replicate_del(ctx: &Context, names: &[&RedisString]) {
    if !names.is_empty() {
        ctx.replicate("DEL", names);
    }
}

/// An RM_Scan cursor over the selected database. Not redis-module's
/// `KeysCursor`: its `scan` retains every key name it visits and never
/// releases it (redis-module 2.0.8), a leak of ~48 bytes per key scanned.
pub struct ScanCursor(*mut raw::RedisModuleScanCursor);

// SAFETY: the cursor is only used while Redis's lock is held, by one task.
unsafe impl Send for ScanCursor {}

impl ScanCursor {
    pub fn new() -> ScanCursor {
        // SAFETY: plain allocation of a cursor.
        ScanCursor(unsafe { raw::RedisModule_ScanCursorCreate.unwrap()() })
    }

    /// One step of the scan: `f` sees each key name, borrowed from Redis.
    /// False when the scan is over.
    pub fn scan<F: FnMut(&[u8])>(&self, ctx: &Context, f: &mut F) -> bool {
        extern "C" fn visit<F: FnMut(&[u8])>(
            _ctx: *mut raw::RedisModuleCtx,
            name: *mut raw::RedisModuleString,
            _key: *mut raw::RedisModuleKey,
            data: *mut std::ffi::c_void,
        ) {
            let mut len = 0usize;
            // SAFETY: Redis passes a live key name and our `f` as `data`.
            unsafe {
                let ptr = raw::RedisModule_StringPtrLen.unwrap()(name, &mut len);
                let f = &mut *data.cast::<F>();
                f(std::slice::from_raw_parts(ptr.cast::<u8>(), len));
            }
        }
        // SAFETY: the cursor is alive; Redis's lock is held (ctx).
        unsafe {
            raw::RedisModule_Scan.unwrap()(ctx.ctx, self.0, Some(visit::<F>), (f as *mut F).cast())
                != 0
        }
    }
}

impl Default for ScanCursor {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScanCursor {
    fn drop(&mut self) {
        // SAFETY: created by ScanCursorCreate, destroyed once.
        unsafe { raw::RedisModule_ScanCursorDestroy.unwrap()(self.0) }
    }
}
