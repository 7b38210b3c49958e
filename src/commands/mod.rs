//! The PGCACHE.* commands: the registration table, argument borrowing and
//! panic-safe dispatch, and the catalog continuation every command that
//! names a table goes through.
//!
//! A hit is answered on the main thread from Redis alone. A miss blocks only
//! its own client while the fill runs in the background (`fills`). A table
//! seen for the first time is looked up in PostgreSQL's catalog the same way
//! (blocked client, background lookup), then the command continues under
//! Redis's lock.

mod read;
mod write;

use crate::catalog::{self, Known};
use crate::info;
use crate::redis::blocked::{BlockedReply, Responder};
use crate::redis::gil;
use crate::redis::keys;
use crate::redis::reply::{err, reply};
use crate::settings;
use crate::stats::{self, STATS};
use pgcache_core::args::check_table_arg;
use pgcache_core::{parse_ttl, Settings, TableSchema};
use redis_module::{raw, Context, RedisError, RedisResult, RedisValue};
use std::ffi::CString;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// A handler sees its arguments as byte slices borrowed from Redis: no
/// copies and no allocation before it decides what to do.
type Handler = fn(&Context, &[&[u8]]) -> RedisResult;

/// Longest argument list any PGCACHE command takes.
const MAX_ARGS: usize = 5;

/// Calls `handler` with borrowed arguments and replies with its result. A
/// panic becomes an error reply: a panic must never take Redis down.
fn dispatch(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
    handler: Handler,
) -> c_int {
    let context = Context::new(ctx);
    let argc = usize::try_from(argc).unwrap_or(0);
    if argc > MAX_ARGS || argv.is_null() {
        return reply(&context, Err(RedisError::WrongArity)) as c_int;
    }
    let mut args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    // SAFETY: Redis passes `argc` valid strings that outlive the call.
    let argv = unsafe { std::slice::from_raw_parts(argv, argc) };
    for (slot, &arg) in args.iter_mut().zip(argv) {
        let mut len = 0usize;
        // SAFETY: a valid string; the bytes live as long as the argument.
        unsafe {
            let ptr = raw::RedisModule_StringPtrLen.unwrap()(arg, &mut len);
            *slot = std::slice::from_raw_parts(ptr as *const u8, len);
        }
    }
    let result = catch_unwind(AssertUnwindSafe(|| handler(&context, &args[..argc])))
        .unwrap_or_else(|_| {
            Err(err(
                "pgcache: internal error (the request was not completed)",
            ))
        });
    reply(&context, result) as c_int
}

macro_rules! entry_points {
    ($($entry:ident => $handler:path),* $(,)?) => {
        $(extern "C" fn $entry(
            ctx: *mut raw::RedisModuleCtx,
            argv: *mut *mut raw::RedisModuleString,
            argc: c_int,
        ) -> c_int {
            dispatch(ctx, argv, argc, $handler)
        })*
    };
}

entry_points! {
    read_entry => read::read_cmd,
    multiread_entry => read::multiread_cmd,
    write_entry => write::write_cmd,
    invalidate_entry => write::invalidate_cmd,
    invalidate_table_entry => write::invalidate_table_cmd,
    stats_entry => stats_cmd,
}

/// Registers the commands. Keys are derived from the arguments, so none is
/// declared (first/last/step 0); the flags say what each command does.
pub fn register(ctx: &Context) -> Result<(), String> {
    let commands: [(&str, raw::RedisModuleCmdFunc, &str); 6] = [
        ("pgcache.read", Some(read_entry), "readonly"),
        ("pgcache.multiread", Some(multiread_entry), "readonly"),
        ("pgcache.write", Some(write_entry), "write deny-oom"),
        ("pgcache.invalidate", Some(invalidate_entry), "write"),
        ("pgcache.stats", Some(stats_entry), "readonly fast"),
        (
            "pgcache.invalidate_table",
            Some(invalidate_table_entry),
            "write",
        ),
    ];
    for (name, func, flags) in commands {
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        let c_flags = CString::new(flags).map_err(|e| e.to_string())?;
        // SAFETY: called at load with the module's context.
        let status = unsafe {
            raw::RedisModule_CreateCommand.unwrap()(
                ctx.ctx,
                c_name.as_ptr(),
                func,
                c_flags.as_ptr(),
                0,
                0,
                0,
            )
        };
        if status != raw::REDISMODULE_OK as c_int {
            return Err(format!("could not register command {name}"));
        }
    }
    Ok(())
}

fn stats_cmd(_ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    Ok(RedisValue::StringBuffer(info::stats_json().into_bytes()))
}

fn optional_ttl(arg: Option<&&[u8]>) -> Result<Option<u64>, RedisError> {
    arg.map(|a| parse_ttl(a).map_err(err)).transpose()
}

fn check_allowed(settings: &Settings, table: &TableSchema) -> Result<(), RedisError> {
    if settings.table_allowed(&table.key_name) {
        Ok(())
    } else {
        Err(err(format!(
            "table '{}' is not in pgcache.tables (the allowlist of tables that may be read through)",
            table.key_name
        )))
    }
}

/// What a command does once its table's schema is known.
type Continuation = Box<dyn FnOnce(&Context, Arc<TableSchema>, Responder) -> RedisResult + Send>;

/// Runs `then` with the table's schema: at once when it is known, else after
/// a catalog lookup in the background (the client blocks meanwhile; the
/// continuation runs under Redis's lock, in the client's database, and
/// answers through its blocked client).
fn with_table(ctx: &Context, raw: &[u8], then: Continuation) -> RedisResult {
    match catalog::known(raw) {
        Known::Found(schema) => return then(ctx, schema, Responder::Direct),
        Known::Failed(why) => return Err(err(why)),
        Known::Unknown => {}
    }
    let name = check_table_arg(raw).map_err(err)?.to_owned();
    let settings = settings::current();
    if !catalog::may_look_up(raw, settings.max_inflight) {
        stats::inc(&STATS.busy_rejections);
        return Err(err(format!(
            "pgcache: too many table lookups in flight (max_inflight {}); try again",
            settings.max_inflight
        )));
    }
    let reply = BlockedReply::block(ctx, settings.answer_deadline_ms())?;
    let db = keys::selected_db(ctx);
    let user = ctx.get_current_user().as_slice().to_vec();
    catalog::look_up(
        raw,
        &name,
        Box::new(move |result| {
            gil::submit(move |ctx| match result {
                Ok(schema) => {
                    keys::select_db(ctx, db);
                    let _ = then(ctx, schema, Responder::Blocked(reply, user));
                }
                Err(e) => reply.answer(Err(err(e))),
            })
        }),
    );
    Ok(RedisValue::NoReply)
}
