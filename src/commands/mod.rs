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
use crate::redis::cluster;
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
    canonical_entry => canonical_cmd,
}

/// How a command declares its pk argument to Redis.
#[derive(Clone, Copy)]
enum PkArg {
    /// No key argument (STATS, INVALIDATE_TABLE, CANONICAL).
    None,
    /// Argument 2 is a NOT_KEY key spec with these access flags.
    At2(u32),
}

/// Registers the commands. READ, MULTIREAD, WRITE and INVALIDATE declare
/// their pk (argument 2) as a NOT_KEY key spec: Redis Cluster routes them by
/// it (the derived key hashes like the canonical pk), stock cluster clients
/// can send them, and Redis runs no ACL check on it (the module checks the
/// derived key). Not `getkeys-api` or first/last/step 2,2,1: either would
/// make Redis ACL-check the raw pk as a key.
pub fn register(ctx: &Context) -> Result<(), String> {
    use raw::{
        REDISMODULE_CMD_KEY_ACCESS as ACCESS, REDISMODULE_CMD_KEY_DELETE as DELETE,
        REDISMODULE_CMD_KEY_OW as OW, REDISMODULE_CMD_KEY_RM as RM, REDISMODULE_CMD_KEY_RO as RO,
        REDISMODULE_CMD_KEY_UPDATE as UPDATE,
    };
    let commands: [(&str, raw::RedisModuleCmdFunc, &str, PkArg); 7] = [
        (
            "pgcache.read",
            Some(read_entry),
            "readonly may-replicate",
            PkArg::At2(RO | ACCESS),
        ),
        (
            "pgcache.multiread",
            Some(multiread_entry),
            "readonly may-replicate",
            PkArg::At2(RO | ACCESS),
        ),
        (
            "pgcache.write",
            Some(write_entry),
            "write deny-oom",
            PkArg::At2(OW | UPDATE),
        ),
        (
            "pgcache.invalidate",
            Some(invalidate_entry),
            "write",
            PkArg::At2(RM | DELETE),
        ),
        (
            "pgcache.stats",
            Some(stats_entry),
            "readonly fast",
            PkArg::None,
        ),
        (
            "pgcache.canonical",
            Some(canonical_entry),
            "readonly",
            PkArg::None,
        ),
        (
            "pgcache.invalidate_table",
            Some(invalidate_table_entry),
            "write",
            PkArg::None,
        ),
    ];
    for (name, func, flags, pk) in commands {
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
        if let PkArg::At2(access) = pk {
            declare_pk_key_spec(ctx, &c_name, access)
                .map_err(|e| format!("could not declare the key of command {name}: {e}"))?;
        }
    }
    Ok(())
}

/// Sets a command's info to one key spec: argument 2, NOT_KEY plus
/// `access`. Arity stays 0 (the handlers answer arity errors themselves);
/// no argument docs (redis-module's argument struct has a field 7.0 does
/// not know).
fn declare_pk_key_spec(ctx: &Context, name: &CString, access: u32) -> Result<(), String> {
    // SAFETY: the command was just created; Redis copies the info.
    unsafe {
        let command = raw::RedisModule_GetCommand.ok_or("RedisModule_GetCommand is missing")?(
            ctx.ctx,
            name.as_ptr(),
        );
        if command.is_null() {
            return Err("the command is not registered".into());
        }
        let version = raw::RedisModuleCommandInfoVersion {
            version: 1,
            sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
            sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
            sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
        };
        // A key spec array ends with a zeroed spec.
        let mut specs: [raw::RedisModuleCommandKeySpec; 2] = std::mem::zeroed();
        specs[0].flags = u64::from(access | raw::REDISMODULE_CMD_KEY_NOT_KEY);
        specs[0].begin_search_type =
            raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_INDEX;
        specs[0].bs.index.pos = 2;
        specs[0].find_keys_type = raw::RedisModuleKeySpecFindKeysType_REDISMODULE_KSPEC_FK_RANGE;
        specs[0].fk.range.lastkey = 0;
        specs[0].fk.range.keystep = 1;
        specs[0].fk.range.limit = 0;
        let mut info: raw::RedisModuleCommandInfo = std::mem::zeroed();
        info.version = &version;
        info.key_specs = specs.as_mut_ptr();
        let status = raw::RedisModule_SetCommandInfo
            .ok_or("RedisModule_SetCommandInfo is missing (Redis 7.0 or later is needed)")?(
            command, &mut info,
        );
        if status != raw::REDISMODULE_OK as c_int {
            return Err("RedisModule_SetCommandInfo refused the key spec".into());
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
    if !settings.table_allowed(&table.key_name) {
        return Err(err(format!(
            "table '{}' is not in pgcache.tables (the allowlist of tables that may be read through)",
            table.key_name
        )));
    }
    if cluster::enabled() {
        if let Some(problem) = pgcache_core::cluster::brace_problem("table", &table.key_name) {
            return Err(err(format!("pgcache: {problem}")));
        }
    }
    Ok(())
}

/// In a cluster, Redis routed the command by the pk as sent, and the entry
/// lives in the canonical pk's slot: the two must hash alike. Another
/// spelling is refused with the canonical form (not MOVED: the client
/// would compute the same slot again).
fn check_cluster_pk(table: &TableSchema, raw: &[u8], canonical: &[u8]) -> Result<(), RedisError> {
    use pgcache_core::cluster::{key_hash_slot, same_slot};
    if !cluster::enabled() || same_slot(raw, canonical) {
        return Ok(());
    }
    Err(err(format!(
        "pgcache: in cluster mode the primary key must be sent in canonical form {} \
         (slot {}; the pk as sent hashes to slot {}); PGCACHE.CANONICAL {} <pk> answers it",
        String::from_utf8_lossy(canonical),
        key_hash_slot(canonical),
        key_hash_slot(raw),
        table.key_name
    )))
}

/// PGCACHE.CANONICAL <table> <pk>: the canonical form of a pk, the
/// spelling whose hash slot is its entry's. Keyless: any node answers.
fn canonical_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let pk = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |_ctx, table, responder| {
            let result = pgcache_core::canonical_pk(&table, &pk)
                .map(|pk| RedisValue::BulkString(pk.json))
                .map_err(err);
            responder.answer(result)
        }),
    )
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
