//! Cache entries and events in Redis: reading a key without copying it,
//! writing and deleting with replication, publishing events, error replies.

use pgcache_core::event::{push_event_json, EventType, Source};
use pgcache_core::{Settings, TableSchema};
use redis_module::{
    raw, AclPermissions, CallOptionsBuilder, CallResult, Context, ContextFlags, KeyType,
    RedisError, RedisResult, RedisString,
};
use std::cell::Cell;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// An error reply: `ERR <message>`.
pub fn err(msg: impl std::fmt::Display) -> RedisError {
    RedisError::String(format!("ERR {msg}"))
}

/// Replies with `result`. Error text goes out byte for byte (UTF-8 table
/// names included), with only CR, LF and NUL, which RESP cannot carry,
/// replaced.
pub fn reply(ctx: &Context, result: RedisResult) -> raw::Status {
    match result {
        Err(RedisError::String(msg)) => {
            let bytes: Vec<u8> = msg
                .bytes()
                .map(|b| {
                    if matches!(b, b'\r' | b'\n' | 0) {
                        b' '
                    } else {
                        b
                    }
                })
                .collect();
            let msg = std::ffi::CString::new(bytes).unwrap_or_default();
            unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx.ctx, msg.as_ptr()).into() }
        }
        other => ctx.reply(other),
    }
}

/// A Redis string of `bytes`, binary-safe. (The crate's `create_string`
/// copies through a CString first: an extra allocation on the hit path, and
/// a panic on a NUL byte.)
pub fn redis_string(ctx: Option<&Context>, bytes: &[u8]) -> RedisString {
    let ctx = ctx.map_or(std::ptr::null_mut(), |c| c.ctx);
    // SAFETY: RM_CreateString copies `len` bytes from `ptr`; the result is
    // owned by the returned RedisString, which frees it on drop.
    let inner = unsafe {
        raw::RedisModule_CreateString.unwrap()(ctx, bytes.as_ptr().cast::<c_char>(), bytes.len())
    };
    RedisString::from_redis_module_string(ctx, inner)
}

/// Redis ACLs bind the keys the module derives: the client's user must be
/// allowed `permissions` on `key`, as if it had named the key itself.
pub fn check_acl(
    ctx: &Context,
    user: Option<&[u8]>,
    key: &str,
    permissions: AclPermissions,
) -> Result<(), RedisError> {
    check_acl_named(
        ctx,
        user,
        &redis_string(Some(ctx), key.as_bytes()),
        key.as_bytes(),
        permissions,
    )
}

pub fn check_acl_named(
    ctx: &Context,
    user: Option<&[u8]>,
    name: &RedisString,
    key: &[u8],
    permissions: AclPermissions,
) -> Result<(), RedisError> {
    match AclUser::resolve(ctx, user) {
        Some(acl_user) if acl_user.allows(name, &permissions) => Ok(()),
        _ => Err(no_permission(key)),
    }
}

/// `check_acl` for many keys, resolving the user once; the first refused
/// key is the error.
pub fn check_acl_all<'a>(
    ctx: &Context,
    user: Option<&[u8]>,
    keys: impl IntoIterator<Item = &'a str>,
    permissions: AclPermissions,
) -> Result<(), RedisError> {
    let acl_user = AclUser::resolve(ctx, user);
    for key in keys {
        let name = redis_string(Some(ctx), key.as_bytes());
        if !acl_user
            .as_ref()
            .is_some_and(|u| u.allows(&name, &permissions))
        {
            return Err(no_permission(key.as_bytes()));
        }
    }
    Ok(())
}

fn no_permission(key: &[u8]) -> RedisError {
    RedisError::String(format!(
        "NOPERM this user has no permissions to access the '{}' key derived by pgcache",
        String::from_utf8_lossy(key)
    ))
}

/// A client's ACL user, for checks through the raw API (what the crate's
/// `acl_check_key_permission` does, without its error strings). Redis 7.0
/// offers no cheaper way to it: the name is copied out (`GetCurrentUserName`)
/// and looked up (`GetModuleUserFromUserName`, which allocates a wrapper) on
/// every command. Keeping a user across commands is not safe in general:
/// ACL DELUSER and ACL LOAD free users, and AUTH changes a client's user,
/// without telling modules. The `default` user is the exception: Redis never
/// frees it (DELUSER refuses it, ACL LOAD copies the new rules into it), so
/// its wrapper is looked up once; its rules are still read on every check,
/// so ACL SETUSER default takes effect at once.
struct AclUser {
    wrapper: *mut raw::RedisModuleUser,
    /// Freed on drop (every user but `default`).
    owned: bool,
}

impl AclUser {
    /// The user named `user`, or the context's client's; `None` when there
    /// is no such user (it is then refused everything).
    fn resolve(ctx: &Context, user: Option<&[u8]>) -> Option<AclUser> {
        let user_name = match user {
            Some(user) => redis_string(Some(ctx), user),
            None => {
                // SAFETY: a command handler's context has a client; the
                // result (NULL when it has none) is owned here, freed on drop.
                let inner = unsafe { raw::RedisModule_GetCurrentUserName.unwrap()(ctx.ctx) };
                if inner.is_null() {
                    return None;
                }
                RedisString::from_redis_module_string(std::ptr::null_mut(), inner)
            }
        };
        if user_name.as_slice() == DEFAULT_USER_NAME {
            return default_user().map(|wrapper| AclUser {
                wrapper,
                owned: false,
            });
        }
        // SAFETY: a valid name; the wrapper is freed on drop, before the
        // user it points to can go away (main thread / GIL).
        let wrapper =
            unsafe { raw::RedisModule_GetModuleUserFromUserName.unwrap()(user_name.inner) };
        (!wrapper.is_null()).then_some(AclUser {
            wrapper,
            owned: true,
        })
    }

    fn allows(&self, name: &RedisString, permissions: &AclPermissions) -> bool {
        // SAFETY: `wrapper` is a live wrapper of a live ACL user.
        let status = unsafe {
            raw::RedisModule_ACLCheckKeyPermissions.unwrap()(
                self.wrapper,
                name.inner,
                permissions.bits(),
            )
        };
        status == raw::REDISMODULE_OK as std::os::raw::c_int
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: made by GetModuleUserFromUserName and not shared.
            unsafe { raw::RedisModule_FreeModuleUser.unwrap()(self.wrapper) };
        }
    }
}

const DEFAULT_USER_NAME: &[u8] = b"default";

/// The wrapper of Redis's `default` ACL user, made once and never freed
/// (see `acl_allows`).
static DEFAULT_USER: AtomicPtr<raw::RedisModuleUser> = AtomicPtr::new(std::ptr::null_mut());

fn default_user() -> Option<*mut raw::RedisModuleUser> {
    let known = DEFAULT_USER.load(Ordering::Acquire);
    if !known.is_null() {
        return Some(known);
    }
    let name = redis_string(None, DEFAULT_USER_NAME);
    // SAFETY: a valid name; the wrapper is kept for the process's life.
    let made = unsafe { raw::RedisModule_GetModuleUserFromUserName.unwrap()(name.inner) };
    if made.is_null() {
        return None;
    }
    match DEFAULT_USER.compare_exchange(
        std::ptr::null_mut(),
        made,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Some(made),
        Err(first) => {
            // SAFETY: ours lost the race and is not shared.
            unsafe { raw::RedisModule_FreeModuleUser.unwrap()(made) };
            Some(first)
        }
    }
}

/// What a cache key holds.
pub enum Lookup<'a> {
    Missing,
    /// A cached row, or `NEGATIVE_MARKER` for a remembered "not found".
    Hit(&'a [u8]),
    /// The key exists but is not a string: not ours.
    WrongType,
}

/// Opens `key` for reading and hands its value to `f` without copying it.
pub fn with_entry<R>(ctx: &Context, key: &str, f: impl FnOnce(Lookup) -> R) -> R {
    lookup(ctx, &redis_string(Some(ctx), key.as_bytes()), key, f)
}

pub fn lookup<R>(ctx: &Context, name: &RedisString, key: &str, f: impl FnOnce(Lookup) -> R) -> R {
    lookup_key(ctx, name, key.as_bytes(), f)
}

/// `lookup` of a key given as its (UTF-8) bytes.
pub fn lookup_key<R>(
    ctx: &Context,
    name: &RedisString,
    key: &[u8],
    f: impl FnOnce(Lookup) -> R,
) -> R {
    if !crate::invalidation::entries_trusted()
        && !crate::state::shared()
            .fresh
            .contains(&(selected_db(ctx), String::from_utf8_lossy(key).into_owned()))
    {
        return f(Lookup::Missing);
    }
    let entry = ctx.open_key(name);
    match entry.key_type() {
        KeyType::Empty => f(Lookup::Missing),
        KeyType::String => match entry.read() {
            Ok(Some(bytes)) => f(Lookup::Hit(bytes)),
            Ok(None) => f(Lookup::Missing),
            Err(_) => f(Lookup::WrongType),
        },
        _ => f(Lookup::WrongType),
    }
}

pub fn wrongtype(key: &str) -> RedisError {
    RedisError::String(format!(
        "WRONGTYPE key '{key}' holds a value that is not a pgcache entry"
    ))
}

/// Replies with a bulk string straight from Redis's buffer (the hit path).
pub fn reply_bytes(ctx: &Context, bytes: &[u8]) {
    unsafe {
        raw::RedisModule_ReplyWithStringBuffer.unwrap()(
            ctx.ctx,
            bytes.as_ptr() as *const c_char,
            bytes.len(),
        );
    }
}

pub fn selected_db(ctx: &Context) -> i32 {
    unsafe { raw::RedisModule_GetSelectedDb.unwrap()(ctx.ctx) }
}

pub fn select_db(ctx: &Context, db: i32) {
    unsafe {
        raw::RedisModule_SelectDb.unwrap()(ctx.ctx, db);
    }
}

/// A replica serves what its primary replicates and writes nothing itself.
pub fn is_replica(ctx: &Context) -> bool {
    ctx.get_flags().contains(ContextFlags::SLAVE)
}

/// Stores an entry (TTL 0: no expiry), replicated to replicas and the AOF.
///
/// Written through the key API and replicated as `SET key value PXAT <ms>`
/// with `RM_Replicate`: a replicated `RM_Call("SET")` costs several times
/// more (a fake client, argument objects, command lookup). Absolute expiry
/// keeps replicas and the AOF exact.
pub fn store(ctx: &Context, key: &str, value: &str, ttl: u64) -> Result<(), String> {
    if !crate::invalidation::entries_trusted() {
        crate::state::shared()
            .fresh
            .insert((selected_db(ctx), key.to_owned()));
    }
    let name = redis_string(Some(ctx), key.as_bytes());
    let value = redis_string(Some(ctx), value.as_bytes());
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
    ctx.notify_keyspace_event(redis_module::NotifyEvent::STRING, "set", &name);
    match expire_at {
        Some(at) => {
            let at = redis_string(Some(ctx), at.to_string().as_bytes());
            let pxat = redis_string(Some(ctx), b"PXAT");
            ctx.replicate("SET", &[&name, &value, &pxat, &at]);
        }
        None => ctx.replicate("SET", &[&name, &value]),
    }
    Ok(())
}

/// Deletes an entry, replicated; returns how many keys were deleted.
pub fn delete(ctx: &Context, key: &str) -> Result<u64, String> {
    delete_many(ctx, &[key.as_bytes()])
}

/// Deletes entries with one replicated DEL.
pub fn delete_many(ctx: &Context, keys: &[&[u8]]) -> Result<u64, String> {
    let opts = CallOptionsBuilder::new().replicate().build();
    let result: CallResult = ctx.call_ext("DEL", &opts, keys);
    match result {
        Ok(reply) => Ok(match redis_module::RedisValue::from(&reply) {
            redis_module::RedisValue::Integer(n) => n.max(0) as u64,
            _ => 0,
        }),
        Err(e) => Err(e.to_string()),
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Publishes one event on `events_channel`, if that type is enabled.
pub fn publish(
    ctx: &Context,
    settings: &Settings,
    ty: EventType,
    table: &TableSchema,
    key_json: &str,
    source: Option<(Source, Option<&str>)>,
) {
    publish_json(
        ctx,
        settings,
        ty,
        &table.table_json,
        key_json.as_bytes(),
        source,
    );
}

/// `publish` of a canonical pk given as its (UTF-8) bytes.
pub fn publish_key(
    ctx: &Context,
    settings: &Settings,
    ty: EventType,
    table: &TableSchema,
    key_json: &[u8],
) {
    publish_json(ctx, settings, ty, &table.table_json, key_json, None);
}

/// `publish` for a table known only by its key name (a gap flush).
pub fn publish_named(
    ctx: &Context,
    settings: &Settings,
    ty: EventType,
    table: &str,
    key_json: &str,
    source: Option<(Source, Option<&str>)>,
) {
    publish_json(
        ctx,
        settings,
        ty,
        &pgcache_core::event::table_json(table),
        key_json.as_bytes(),
        source,
    );
}

/// What publishing reuses from one event to the next.
#[derive(Default)]
struct EventScratch {
    /// The payload being built.
    payload: Vec<u8>,
    /// `events_channel` as a Redis string, made once per channel name.
    channel: Option<(String, RedisString)>,
}

// Buffers reused by the hit path on the thread that runs it (the main
// thread, or a background thread holding Redis's lock) instead of an
// allocation per call. Each is taken out of its slot for the call, so a
// re-entered call (or one during thread exit) gets a fresh one, and a panic
// only loses it.
thread_local! {
    static KEY_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    static EVENT_SCRATCH: Cell<EventScratch> = const {
        Cell::new(EventScratch {
            payload: Vec::new(),
            channel: None,
        })
    };
}

/// A buffer bigger than this is not kept for the next call.
const SCRATCH_KEEP: usize = 4096;

fn with_taken<T: Default, R>(
    slot: &'static std::thread::LocalKey<Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut value = slot.try_with(Cell::take).unwrap_or_default();
    let r = f(&mut value);
    let _ = slot.try_with(|cell| cell.set(value));
    r
}

/// Runs `f` with an empty reused buffer for a cache key.
pub fn with_key_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    with_taken(&KEY_BUFFER, |key| {
        key.clear();
        let r = f(key);
        if key.capacity() > SCRATCH_KEEP {
            *key = Vec::new();
        }
        r
    })
}

fn publish_json(
    ctx: &Context,
    settings: &Settings,
    ty: EventType,
    table_json: &str,
    key_json: &[u8],
    source: Option<(Source, Option<&str>)>,
) {
    let mask = settings.events;
    let on = match ty {
        EventType::Hit => mask.hit,
        EventType::Miss => mask.miss,
        EventType::Write => mask.write,
        EventType::Invalidate => mask.invalidate,
    };
    if !on {
        return;
    }
    let now = now();
    with_taken(&EVENT_SCRATCH, |scratch| {
        let payload = &mut scratch.payload;
        payload.clear();
        push_event_json(payload, ty, table_json, key_json, now, source);
        let wanted = settings.events_channel.as_str();
        let channel = match &scratch.channel {
            Some((name, channel)) if name == wanted => channel,
            _ => {
                let channel = redis_string(None, wanted.as_bytes());
                &scratch.channel.insert((wanted.to_owned(), channel)).1
            }
        };
        let message = redis_string(None, payload);
        // SAFETY: both strings are valid; Redis copies what it keeps.
        unsafe {
            raw::RedisModule_PublishMessage.unwrap()(ctx.ctx, channel.inner, message.inner);
        }
        if payload.capacity() > SCRATCH_KEEP {
            *payload = Vec::new();
        }
    });
}
