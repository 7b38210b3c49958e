//! Redis Cluster: whether this node runs in a cluster, and whether it
//! serves a hash slot right now.
//!
//! Redis routes each PGCACHE command by its pk argument (a NOT_KEY key
//! spec, `commands::register`), so a command runs on the node that owns the
//! pk's slot. Fills complete later, and MULTIREAD's pks span slots: before
//! storing an entry in another slot than the command's, the module asks
//! Redis whether it serves that slot, stably. The question is an `EXISTS`
//! of a key that never exists, in the slot, through `RM_Call` on a
//! detached context: `RM_Call` routes like a client without ASKING, so it
//! passes only on the slot's owner when the slot is neither migrating (ASK)
//! nor importing (MOVED) and the cluster is up. Redis 7.0 has no cheaper
//! exact test (`RM_ClusterCanAccessKeysInSlot` is 8.x).

use redis_module::raw;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::OnceLock;

static CLUSTER: AtomicBool = AtomicBool::new(false);
static SLOT_OF_COMMAND: AtomicBool = AtomicBool::new(false);
static MY_ID: OnceLock<String> = OnceLock::new();
static PROBE_CTX: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(std::ptr::null_mut());

/// At load: whether the server runs with `cluster-enabled yes` (fixed for
/// the life of the process), and the context the probe calls through.
pub fn init(ctx: &redis_module::Context, cluster: bool) {
    CLUSTER.store(cluster, Ordering::Release);
    if cluster && PROBE_CTX.load(Ordering::Acquire).is_null() {
        // SAFETY: called at load with the module's context; the detached
        // context lives for the process.
        let probe = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.ctx) };
        PROBE_CTX.store(probe, Ordering::Release);
    }
    if cluster {
        SLOT_OF_COMMAND.store(server_has_per_slot_lookups(ctx), Ordering::Release);
    }
    if cluster {
        // SAFETY: at load, on the main thread; the id is 40 bytes, not
        // NUL-terminated (REDISMODULE_NODE_ID_LEN).
        let id = unsafe {
            raw::RedisModule_GetMyClusterID
                .map(|f| f())
                .filter(|p| !p.is_null())
                .map(|p| {
                    let bytes = std::slice::from_raw_parts(
                        p.cast::<u8>(),
                        raw::REDISMODULE_NODE_ID_LEN as usize,
                    );
                    String::from_utf8_lossy(bytes).into_owned()
                })
        };
        if let Some(id) = id {
            let _ = MY_ID.set(id);
        }
    }
}

/// Whether a key of another slot than the running command's must not be
/// opened inside it: servers with a dictionary per slot (Valkey 8, Redis
/// 7.4 and later) look every key up in the command's slot while it runs
/// (valkey-io/valkey#4398), so such a key reads as missing there and would
/// be written to the wrong slot. Outside a command (under the lock, from
/// the module's lock thread) every key is found where it is.
pub fn lookups_follow_command_slot() -> bool {
    SLOT_OF_COMMAND.load(Ordering::Relaxed)
}

/// Reads, at load, whether the server keeps a dictionary per slot.
fn server_has_per_slot_lookups(ctx: &redis_module::Context) -> bool {
    let info = match ctx.call("INFO", &["server"]) {
        Ok(redis_module::RedisValue::SimpleString(s)) => s,
        Ok(redis_module::RedisValue::BulkString(s)) => s,
        Ok(redis_module::RedisValue::StringBuffer(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => return true,
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(str::trim)
    };
    if field("server_name").is_some_and(|n| n != "redis") {
        return true;
    }
    // Redis: 7.4 introduced the per-slot dictionaries.
    let version: Vec<u32> = field("redis_version")
        .unwrap_or("0")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    (
        version.first().copied().unwrap_or(0),
        version.get(1).copied().unwrap_or(0),
    ) >= (7, 4)
}

/// This node's cluster id as it was at load (a `CLUSTER RESET HARD` later
/// changes the node's, not this).
pub fn my_id() -> Option<&'static str> {
    MY_ID.get().map(String::as_str)
}

/// True in a Redis Cluster.
pub fn enabled() -> bool {
    CLUSTER.load(Ordering::Relaxed)
}

/// Whether this node serves the slot of hash tag `tag` stably (owns it, not
/// migrating or importing, cluster up). Always true outside a cluster.
/// Call holding Redis's lock.
pub fn serves_tag(tag: &[u8]) -> bool {
    if !enabled() {
        return true;
    }
    let ctx = PROBE_CTX.load(Ordering::Acquire);
    if ctx.is_null() {
        return false;
    }
    // `{<tag>}` hashes exactly like the entry (the tag has no `}`).
    let mut probe = Vec::with_capacity(tag.len() + 16);
    probe.push(b'{');
    probe.extend_from_slice(tag);
    probe.extend_from_slice(b"}:pgcache:probe");
    let cmd = CString::new("EXISTS").expect("no NUL");
    let fmt = CString::new("b").expect("no NUL");
    // SAFETY: a live detached context, Redis's lock held by the caller; the
    // buffer outlives the call and the reply is freed here.
    unsafe {
        let reply = raw::RedisModule_Call.unwrap()(
            ctx,
            cmd.as_ptr(),
            fmt.as_ptr(),
            probe.as_ptr(),
            probe.len(),
        );
        if reply.is_null() {
            return false;
        }
        let ok =
            raw::RedisModule_CallReplyType.unwrap()(reply) == raw::REDISMODULE_REPLY_INTEGER as i32;
        raw::RedisModule_FreeCallReply.unwrap()(reply);
        ok
    }
}
