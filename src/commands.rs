//! The PGCACHE.* command handlers.
//!
//! A hit is answered on the main thread from Redis alone. A miss blocks only
//! its own client while the fill runs on the background runtime. A table seen
//! for the first time is looked up in PostgreSQL's catalog the same way
//! (blocked client, background task), then the command continues.

use crate::cache::{self, err, with_entry, wrongtype, Lookup};
use crate::fill::{self, Batch, FetchGroup, FillPlan, Replier, Responder, Waiter};
use crate::info;
use crate::state::{self, shared, SETTINGS, STATS};
use pgcache_core::args::check_table_arg;
use pgcache_core::event::{EventType, Source};
use pgcache_core::key::canonical_pk_value;
use pgcache_core::{
    cache_key, canonical_pk, parse_ttl, push_canonical_pk_bytes, CanonicalPk, Join, Settings,
    TableSchema, NEGATIVE_MARKER,
};
use redis_module::{raw, AclPermissions, Context, RedisError, RedisResult, RedisValue};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
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
        return cache::reply(&context, Err(RedisError::WrongArity)) as c_int;
    }
    let mut args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    // SAFETY: Redis passes `argc` valid strings that outlive the call.
    let argv = unsafe { std::slice::from_raw_parts(argv, argc) };
    for (slot, &arg) in args.iter_mut().zip(argv) {
        let mut len = 0usize;
        let ptr = unsafe { raw::RedisModule_StringPtrLen.unwrap()(arg, &mut len) };
        *slot = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    }
    let result = catch_unwind(AssertUnwindSafe(|| handler(&context, &args[..argc])))
        .unwrap_or_else(|_| {
            Err(err(
                "pgcache: internal error (the request was not completed)",
            ))
        });
    cache::reply(&context, result) as c_int
}

macro_rules! entry_points {
    ($($entry:ident => $handler:ident),* $(,)?) => {
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
    read_entry => read_cmd,
    multiread_entry => multiread_cmd,
    write_entry => write_cmd,
    invalidate_entry => invalidate_cmd,
    stats_entry => stats_cmd,
    invalidate_table_entry => invalidate_table_cmd,
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

fn optional_ttl(arg: Option<&&[u8]>) -> Result<Option<u64>, RedisError> {
    arg.map(|a| parse_ttl(a).map_err(err)).transpose()
}

/// The schema of a table argument, when it was looked up before.
fn cached_table(arg: &[u8]) -> Option<Arc<TableSchema>> {
    shared().table_recent(arg)
}

/// What a command does once its table's schema is known.
type Continuation = Box<dyn FnOnce(&Context, Arc<TableSchema>, Responder) -> RedisResult + Send>;

/// Runs `then` with the table's schema: at once when it is cached, else after
/// a catalog lookup on the background runtime (the client blocks meanwhile).
fn with_table(ctx: &Context, raw: &[u8], then: Continuation) -> RedisResult {
    if let Some(schema) = cached_table(raw) {
        return then(ctx, schema, Responder::Direct);
    }
    let name = check_table_arg(raw).map_err(err)?.to_owned();
    let arg = raw.to_vec();
    let db = cache::selected_db(ctx);
    let user = ctx.get_current_user().as_slice().to_vec();
    let replier = Replier::block(ctx);
    fill::spawn_guarded(
        async move { state::pg().resolve_table(&name).await },
        move |result| {
            fill::with_gil(|ctx| match result {
                Ok(schema) => {
                    let schema = Arc::new(schema);
                    shared().remember_table(&arg, schema.clone());
                    cache::select_db(ctx, db);
                    let _ = then(ctx, schema, Responder::Blocked(replier, user));
                }
                Err(e) => replier.reply(Err(err(e))),
            });
        },
    );
    Ok(RedisValue::NoReply)
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

fn busy(limit: usize) -> RedisError {
    err(format!(
        "pgcache: too many fills in flight (max_inflight {limit}); try again"
    ))
}

fn stats_cmd(_ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    Ok(RedisValue::StringBuffer(info::stats_json().into_bytes()))
}

/// PGCACHE.READ <table> <pk> [TTL]
fn read_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if !(3..=4).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(3))?;
    // The hit path: no copies of the arguments, no boxed continuation.
    if let Some(result) = state::with_cached_table(args[1], |table| {
        read_row(ctx, table, args[2], ttl, Responder::Direct)
    }) {
        return result;
    }
    let pk = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| read_row(ctx, &table, &pk, ttl, responder)),
    )
}

/// What the hit half of a READ found.
enum Probe {
    /// A hit, or an error: answered.
    Answered(RedisResult),
    /// Not cached: the key, and where its canonical pk starts.
    Missing(Responder, String, usize),
}

/// The hit half of a READ: the key is built in a reused buffer, so a hit
/// allocates nothing but the key's Redis string.
fn probe(
    ctx: &Context,
    settings: &Settings,
    table: &TableSchema,
    pk: &[u8],
    responder: Responder,
) -> Probe {
    if let Err(e) = check_allowed(settings, table) {
        return Probe::Answered(responder.answer(Err(e)));
    }
    cache::with_key_buffer(|key| {
        key.extend_from_slice(settings.cache_prefix.as_bytes());
        key.extend_from_slice(table.key_name.as_bytes());
        key.push(b':');
        let pk_at = key.len();
        if let Err(e) = push_canonical_pk_bytes(key, table, pk) {
            return Probe::Answered(responder.answer(Err(err(e))));
        }
        // The key is UTF-8: settings, a table name and a canonical pk.
        let key: &[u8] = key;
        // One key handle for the ACL check and the lookup.
        let name = cache::redis_string(Some(ctx), key);
        if let Err(e) =
            cache::check_acl_named(ctx, responder.user(), &name, key, AclPermissions::ACCESS)
        {
            return Probe::Answered(responder.answer(Err(e)));
        }
        cache::lookup_key(ctx, &name, key, |entry| match entry {
            Lookup::Hit(bytes) => {
                STATS.hits.fetch_add(1, Ordering::Relaxed);
                cache::publish_key(ctx, settings, EventType::Hit, table, &key[pk_at..]);
                Probe::Answered(if bytes == NEGATIVE_MARKER {
                    responder.answer(Ok(RedisValue::Null))
                } else {
                    responder.answer_bytes(ctx, bytes)
                })
            }
            Lookup::WrongType => {
                Probe::Answered(responder.answer(Err(wrongtype(&String::from_utf8_lossy(key)))))
            }
            Lookup::Missing => {
                Probe::Missing(responder, String::from_utf8_lossy(key).into_owned(), pk_at)
            }
        })
    })
}

fn read_row(
    ctx: &Context,
    table: &Arc<TableSchema>,
    pk: &[u8],
    ttl: Option<u64>,
    responder: Responder,
) -> RedisResult {
    let settings = SETTINGS.load();
    let (responder, key, pk_at) = match probe(ctx, &settings, table, pk, responder) {
        Probe::Answered(result) => return result,
        Probe::Missing(responder, key, pk_at) => (responder, key, pk_at),
    };
    let pk_json = &key[pk_at..];
    STATS.misses.fetch_add(1, Ordering::Relaxed);
    cache::publish(ctx, &settings, EventType::Miss, table, pk_json, None);
    let db = cache::selected_db(ctx);
    let fill_key = (db, key);
    let mut sh = shared();
    if !sh.fills.is_active(&fill_key) && sh.fills.in_flight() >= settings.max_inflight {
        drop(sh);
        STATS.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let replier = responder.into_replier(ctx);
    let carrier = replier.carrier();
    match sh
        .fills
        .join(&fill_key, &table.key_name, Waiter::Read(replier))
    {
        Join::Joined => {
            STATS.coalesced_waits.fetch_add(1, Ordering::Relaxed);
        }
        Join::Started(id) => {
            drop(sh);
            let mut group = FetchGroup::new(fill_plan(&settings, table, db, ttl), Some(carrier));
            let (_, key) = fill_key;
            let pk_json = key[pk_at..].to_owned();
            group.add(key, id, pk_json);
            fill::enqueue(group);
        }
    }
    Ok(RedisValue::NoReply)
}

/// A fill's settings: the table, the client's database, the TTL asked for
/// (else `default_ttl`) and `negative_ttl`.
fn fill_plan(settings: &Settings, table: &Arc<TableSchema>, db: i32, ttl: Option<u64>) -> FillPlan {
    FillPlan {
        table: table.clone(),
        db,
        ttl: ttl.unwrap_or(settings.default_ttl),
        negative_ttl: settings.negative_ttl,
    }
}

/// PGCACHE.MULTIREAD <table> <pk-array> [TTL]
fn multiread_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if !(3..=4).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(3))?;
    let pks = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| read_rows(ctx, &table, &pks, ttl, responder)),
    )
}

fn read_rows(
    ctx: &Context,
    table: &Arc<TableSchema>,
    raw: &[u8],
    ttl: Option<u64>,
    responder: Responder,
) -> RedisResult {
    let settings = SETTINGS.load();
    let pks = match parse_batch(&settings, table, raw) {
        Ok(p) => p,
        Err(e) => return responder.answer(Err(e)),
    };
    let db = cache::selected_db(ctx);
    let keys: Vec<String> = pks
        .iter()
        .map(|pk| cache_key(&settings.cache_prefix, table, pk))
        .collect();
    if let Err(e) = cache::check_acl_all(
        ctx,
        responder.user(),
        keys.iter().map(String::as_str),
        AclPermissions::ACCESS,
    ) {
        return responder.answer(Err(e));
    }
    let mut slots: Vec<Option<String>> = vec![None; keys.len()];
    // Distinct missing keys: the first input position of each, and every
    // position it answers.
    let mut missing: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let cached = with_entry(ctx, key, |entry| match entry {
            Lookup::Hit(b) if b == NEGATIVE_MARKER => Ok(Some("null".to_owned())),
            Lookup::Hit(b) => Ok(Some(String::from_utf8_lossy(b).into_owned())),
            Lookup::Missing => Ok(None),
            Lookup::WrongType => Err(wrongtype(key)),
        });
        match cached {
            Err(e) => return responder.answer(Err(e)),
            Ok(Some(v)) => {
                STATS.hits.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, &settings, EventType::Hit, table, &pks[i].json, None);
                slots[i] = Some(v);
            }
            Ok(None) => {
                STATS.misses.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, &settings, EventType::Miss, table, &pks[i].json, None);
                match index_of.get(key.as_str()) {
                    Some(&m) => missing[m].1.push(i),
                    None => {
                        index_of.insert(key, missing.len());
                        missing.push((i, vec![i]));
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        let json = pgcache_core::json_array(slots.iter().map(|s| s.as_deref().unwrap_or("null")));
        return responder.answer(Ok(RedisValue::StringBuffer(json.into_bytes())));
    }
    let mut sh = shared();
    let new_fills = missing
        .iter()
        .filter(|(first, _)| !sh.fills.is_active(&(db, keys[*first].clone())))
        .count();
    if new_fills > 0 && sh.fills.in_flight() + new_fills > settings.max_inflight {
        drop(sh);
        STATS.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let replier = responder.into_replier(ctx);
    let carrier = replier.carrier();
    let batch = Batch::new(slots, missing.len(), replier);
    let mut joined_other_fills = false;
    // All misses of the call, one group: one query.
    let mut group = FetchGroup::new(fill_plan(&settings, table, db, ttl), None);
    for (first, positions) in missing {
        let key = keys[first].clone();
        match sh.fills.join(
            &(db, key.clone()),
            &table.key_name,
            Waiter::Batch(batch.clone(), positions),
        ) {
            Join::Joined => {
                STATS.coalesced_waits.fetch_add(1, Ordering::Relaxed);
                joined_other_fills = true;
            }
            Join::Started(id) => group.add(key, id, pks[first].json.clone()),
        }
    }
    drop(sh);
    if !group.is_empty() {
        if !joined_other_fills {
            // Answered when its own group ends: it can carry the group.
            group.set_carrier(carrier);
        }
        fill::enqueue(group);
    }
    Ok(RedisValue::NoReply)
}

fn parse_batch(
    settings: &Settings,
    table: &TableSchema,
    raw: &[u8],
) -> Result<Vec<CanonicalPk>, RedisError> {
    check_allowed(settings, table)?;
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| {
        err(format!(
            "invalid JSON in primary-key array for table '{}': {e}",
            table.key_name
        ))
    })?;
    let serde_json::Value::Array(items) = value else {
        return Err(err(format!(
            "MULTIREAD expects a JSON array of primary-key objects for table '{}'",
            table.key_name
        )));
    };
    if items.len() > settings.max_batch {
        return Err(err(format!(
            "batch of {} keys exceeds max_batch ({})",
            items.len(),
            settings.max_batch
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| canonical_pk_value(table, v).map_err(|e| err(format!("element {i}: {e}"))))
        .collect()
}

/// PGCACHE.WRITE <table> <pk> <data> [TTL]
fn write_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if !(4..=5).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(4))?;
    match serde_json::from_slice::<serde_json::Value>(args[3]) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => return Err(err("data must be a JSON object")),
        Err(e) => return Err(err(format!("invalid JSON in data: {e}"))),
    }
    let data = String::from_utf8(args[3].to_vec()).map_err(|_| err("data is not valid UTF-8"))?;
    let pk = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| {
            let user = responder.user();
            let result = (|| {
                let settings = SETTINGS.load();
                check_allowed(&settings, &table)?;
                let pk = canonical_pk(&table, &pk).map_err(err)?;
                let key = cache_key(&settings.cache_prefix, &table, &pk);
                cache::check_acl(
                    ctx,
                    user,
                    &key,
                    AclPermissions::INSERT | AclPermissions::UPDATE,
                )?;
                // A fill in flight must not overwrite what was written.
                shared()
                    .fills
                    .invalidate(&(cache::selected_db(ctx), key.clone()));
                cache::store(ctx, &key, &data, ttl.unwrap_or(settings.default_ttl)).map_err(err)?;
                crate::invalidation::mark_db_used(cache::selected_db(ctx));
                STATS.writes.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, &settings, EventType::Write, &table, &pk.json, None);
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}

/// PGCACHE.INVALIDATE <table> <pk>
fn invalidate_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let pk = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| {
            let user = responder.user();
            let result = (|| {
                let settings = SETTINGS.load();
                check_allowed(&settings, &table)?;
                let pk = canonical_pk(&table, &pk).map_err(err)?;
                cache::check_acl(
                    ctx,
                    user,
                    &cache_key(&settings.cache_prefix, &table, &pk),
                    AclPermissions::DELETE,
                )?;
                // A fill in flight must not bring the old row back.
                let db = cache::selected_db(ctx);
                crate::invalidation::drop_entry(
                    ctx,
                    &settings,
                    &table,
                    &pk,
                    &[db],
                    (Source::Command, None),
                );
                STATS.invalidations.fetch_add(1, Ordering::Relaxed);
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}

/// PGCACHE.INVALIDATE_TABLE <table>: drops every entry of the table a batch
/// at a time in the background (Redis keeps serving), then answers how many.
fn invalidate_table_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| {
            let settings = SETTINGS.load();
            // The user must be allowed to delete every key of the table:
            // checked against the pattern itself, `<prefix><table>:*`.
            let pattern = format!("{}{}:*", settings.cache_prefix, table.key_name);
            let allowed = check_allowed(&settings, &table).and_then(|_| {
                cache::check_acl(ctx, responder.user(), &pattern, AclPermissions::DELETE)
            });
            if let Err(e) = allowed {
                return responder.answer(Err(e));
            }
            let replier = responder.into_replier(ctx);
            state::runtime().spawn(async move {
                let inner = state::runtime().spawn(crate::invalidation::flush(
                    crate::invalidation::Scope::Table(table),
                    (Source::Flush, None),
                ));
                match inner.await {
                    Ok(n) => replier.reply(Ok(RedisValue::Integer(n as i64))),
                    Err(_) => {
                        replier.reply(Err(err("pgcache: internal error while flushing the table")))
                    }
                }
            });
            Ok(RedisValue::NoReply)
        }),
    )
}
