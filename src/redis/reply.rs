//! Replies and Redis strings.

use redis_module::{raw, Context, RedisError, RedisResult, RedisString};
use std::os::raw::c_char;

/// An error reply: `ERR <message>`.
pub fn err(msg: impl std::fmt::Display) -> RedisError {
    RedisError::String(format!("ERR {msg}"))
}

pub fn wrongtype(key: &[u8]) -> RedisError {
    RedisError::String(format!(
        "WRONGTYPE key '{}' holds a value that is not a pgcache entry",
        String::from_utf8_lossy(key)
    ))
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
            // SAFETY: a live context and a NUL-terminated string.
            unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx.ctx, msg.as_ptr()).into() }
        }
        other => ctx.reply(other),
    }
}

/// Replies with a bulk string straight from a buffer (the hit path: no copy).
pub fn reply_bytes(ctx: &Context, bytes: &[u8]) {
    // SAFETY: Redis copies `len` bytes into the reply.
    unsafe {
        raw::RedisModule_ReplyWithStringBuffer.unwrap()(
            ctx.ctx,
            bytes.as_ptr() as *const c_char,
            bytes.len(),
        );
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
