//! The PGCACHE.* command handlers.
//!
//! A hit is answered on the main thread from Redis alone. A miss blocks only
//! its own client while the fill runs on the background runtime. A table seen
//! for the first time is looked up in PostgreSQL's catalog the same way
//! (blocked client, background task), then the command continues.

use crate::cache::{self, err, with_entry, wrongtype, Lookup};
use crate::fill::{self, Batch, FillPlan, Replier, Responder, Waiter};
use crate::info;
use crate::state::{self, shared, SETTINGS, STATS};
use pgcache_core::args::check_table_arg;
use pgcache_core::event::{EventType, Source};
use pgcache_core::key::canonical_pk_value;
use pgcache_core::{cache_key, canonical_pk, parse_ttl, Join, Settings, TableSchema, NEGATIVE_MARKER};
use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Runs a handler, turning a panic into an error reply: a panic must never
/// take Redis down.
fn guarded(ctx: &Context, args: Vec<RedisString>, handler: fn(&Context, Vec<RedisString>) -> RedisResult) -> RedisResult {
    catch_unwind(AssertUnwindSafe(|| handler(ctx, args)))
        .unwrap_or_else(|_| Err(err("pgcache: internal error (the request was not completed)")))
}

pub fn read(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(ctx, args, read_cmd)
}
pub fn multiread(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(ctx, args, multiread_cmd)
}
pub fn write(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(ctx, args, write_cmd)
}
pub fn invalidate(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(ctx, args, invalidate_cmd)
}
pub fn stats(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded(ctx, args, |_, args| {
        if args.len() != 1 {
            return Err(RedisError::WrongArity);
        }
        Ok(RedisValue::StringBuffer(info::stats_json().into_bytes()))
    })
}

fn optional_ttl(arg: Option<&RedisString>) -> Result<Option<u64>, RedisError> {
    arg.map(|a| parse_ttl(a.as_slice()).map_err(err)).transpose()
}

/// What a command does once its table's schema is known.
type Continuation = Box<dyn FnOnce(&Context, Arc<TableSchema>, Responder) -> RedisResult + Send>;

/// Runs `then` with the table's schema: at once when it is cached, else after
/// a catalog lookup on the background runtime (the client blocks meanwhile).
fn with_table(ctx: &Context, table_arg: &RedisString, then: Continuation) -> RedisResult {
    let raw = table_arg.as_slice();
    let cached = shared().table(raw);
    if let Some(schema) = cached {
        return then(ctx, schema, Responder::Direct);
    }
    let name = check_table_arg(raw).map_err(err)?.to_owned();
    let arg = raw.to_vec();
    let db = cache::selected_db(ctx);
    let replier = Replier::block(ctx);
    fill::spawn_guarded(
        async move { state::pg().resolve_table(&name).await },
        move |result| {
            fill::with_gil(|ctx| match result {
                Ok(schema) => {
                    let schema = Arc::new(schema);
                    shared().remember_table(&arg, schema.clone());
                    cache::select_db(ctx, db);
                    let _ = then(ctx, schema, Responder::Blocked(replier));
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

// PGCACHE.READ <table> <pk> [TTL]
fn read_cmd(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if !(3..=4).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(3))?;
    let pk = args[2].as_slice().to_vec();
    with_table(ctx, &args[1], Box::new(move |ctx, table, responder| read_row(ctx, &table, &pk, ttl, responder)))
}

fn read_row(ctx: &Context, table: &Arc<TableSchema>, pk: &[u8], ttl: Option<u64>, responder: Responder) -> RedisResult {
    let settings = SETTINGS.load();
    let prepared = check_allowed(&settings, table).and_then(|_| canonical_pk(table, pk).map_err(err));
    let pk = match prepared {
        Ok(pk) => pk,
        Err(e) => return responder.answer(Err(e)),
    };
    let key = cache_key(&settings.cache_prefix, table, &pk);
    let responder = match with_entry(ctx, &key, |entry| match entry {
        Lookup::Hit(bytes) => {
            STATS.hits.fetch_add(1, Ordering::Relaxed);
            cache::publish(ctx, EventType::Hit, table, &pk.json, None);
            Err(if bytes == NEGATIVE_MARKER {
                responder.answer(Ok(RedisValue::Null))
            } else {
                responder.answer_bytes(ctx, bytes)
            })
        }
        Lookup::WrongType => Err(responder.answer(Err(wrongtype(&key)))),
        Lookup::Missing => Ok(responder),
    }) {
        Ok(responder) => responder,
        Err(answered) => return answered,
    };
    STATS.misses.fetch_add(1, Ordering::Relaxed);
    cache::publish(ctx, EventType::Miss, table, &pk.json, None);
    let db = cache::selected_db(ctx);
    let fill_key = (db, key);
    let mut sh = shared();
    if !sh.fills.is_active(&fill_key) && sh.fills.in_flight() >= settings.max_inflight {
        drop(sh);
        STATS.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let waiter = Waiter::Read(responder.into_replier(ctx));
    match sh.fills.join(&fill_key, &table.key_name, waiter) {
        Join::Joined => {
            STATS.coalesced_waits.fetch_add(1, Ordering::Relaxed);
        }
        Join::Started(id) => {
            drop(sh);
            let plan = FillPlan {
                table: table.clone(),
                db,
                ttl: ttl.unwrap_or(settings.default_ttl),
                negative_ttl: settings.negative_ttl,
            };
            fill::start_one(plan, fill_key.1, id, pk.params);
        }
    }
    Ok(RedisValue::NoReply)
}

fn busy(limit: usize) -> RedisError {
    err(format!("pgcache: too many fills in flight (max_inflight {limit}); try again"))
}

// PGCACHE.MULTIREAD <table> <pk-array> [TTL]
fn multiread_cmd(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if !(3..=4).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(3))?;
    let pks = args[2].as_slice().to_vec();
    with_table(ctx, &args[1], Box::new(move |ctx, table, responder| read_rows(ctx, &table, &pks, ttl, responder)))
}

fn read_rows(ctx: &Context, table: &Arc<TableSchema>, raw: &[u8], ttl: Option<u64>, responder: Responder) -> RedisResult {
    let settings = SETTINGS.load();
    let pks = match parse_batch(&settings, table, raw) {
        Ok(p) => p,
        Err(e) => return responder.answer(Err(e)),
    };
    let db = cache::selected_db(ctx);
    let keys: Vec<String> = pks.iter().map(|pk| cache_key(&settings.cache_prefix, table, pk)).collect();
    let mut slots: Vec<Option<String>> = vec![None; keys.len()];
    // Distinct missing keys, each with the input positions it answers.
    let mut missing: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut first_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let hit = with_entry(ctx, key, |entry| match entry {
            Lookup::Hit(b) if b == NEGATIVE_MARKER => Ok(Some("null".to_owned())),
            Lookup::Hit(b) => Ok(Some(String::from_utf8_lossy(b).into_owned())),
            Lookup::Missing => Ok(None),
            Lookup::WrongType => Err(wrongtype(key)),
        });
        match hit {
            Err(e) => return responder.answer(Err(e)),
            Ok(Some(v)) => {
                STATS.hits.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, EventType::Hit, table, &pks[i].json, None);
                slots[i] = Some(v);
            }
            Ok(None) => {
                STATS.misses.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, EventType::Miss, table, &pks[i].json, None);
                match first_of.get(key.as_str()) {
                    Some(&m) => missing[m].1.push(i),
                    None => {
                        first_of.insert(key, missing.len());
                        missing.push((i, vec![i]));
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        let json = fill::json_array(slots.iter().map(|s| s.as_deref().unwrap_or("null")));
        return responder.answer(Ok(RedisValue::StringBuffer(json.into_bytes())));
    }
    let mut sh = shared();
    let new_fills = missing
        .iter()
        .filter(|(i, _)| !sh.fills.is_active(&(db, keys[*i].clone())))
        .count();
    if new_fills > 0 && sh.fills.in_flight() + new_fills > settings.max_inflight {
        drop(sh);
        STATS.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return responder.answer(Err(busy(settings.max_inflight)));
    }
    let batch = Batch::new(slots, missing.len(), responder.into_replier(ctx));
    let mut started: Vec<(String, pgcache_core::FillId)> = Vec::new();
    let mut started_pks: Vec<&str> = Vec::new();
    for (first, positions) in missing {
        let key = keys[first].clone();
        match sh.fills.join(&(db, key.clone()), &table.key_name, Waiter::Batch(batch.clone(), positions)) {
            Join::Joined => {
                STATS.coalesced_waits.fetch_add(1, Ordering::Relaxed);
            }
            Join::Started(id) => {
                started.push((key, id));
                started_pks.push(&pks[first].json);
            }
        }
    }
    drop(sh);
    if !started.is_empty() {
        let plan = FillPlan {
            table: table.clone(),
            db,
            ttl: ttl.unwrap_or(settings.default_ttl),
            negative_ttl: settings.negative_ttl,
        };
        let pks_json = fill::json_array(started_pks.into_iter());
        fill::start_many(plan, started, pks_json);
    }
    Ok(RedisValue::NoReply)
}

fn parse_batch(settings: &Settings, table: &TableSchema, raw: &[u8]) -> Result<Vec<pgcache_core::CanonicalPk>, RedisError> {
    check_allowed(settings, table)?;
    let value: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| err(format!("invalid JSON in primary-key array for table '{}': {e}", table.key_name)))?;
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

// PGCACHE.WRITE <table> <pk> <data> [TTL]
fn write_cmd(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if !(4..=5).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(4))?;
    let data = args[3].as_slice();
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => return Err(err("data must be a JSON object")),
        Err(e) => return Err(err(format!("invalid JSON in data: {e}"))),
    }
    let data = String::from_utf8(data.to_vec()).map_err(|_| err("data is not valid UTF-8"))?;
    let pk = args[2].as_slice().to_vec();
    with_table(
        ctx,
        &args[1],
        Box::new(move |ctx, table, responder| {
            let result = (|| {
                let settings = SETTINGS.load();
                check_allowed(&settings, &table)?;
                let pk = canonical_pk(&table, &pk).map_err(err)?;
                let key = cache_key(&settings.cache_prefix, &table, &pk);
                // A fill in flight must not overwrite what was written.
                shared().fills.invalidate(&(cache::selected_db(ctx), key.clone()));
                cache::store(ctx, &key, &data, ttl.unwrap_or(settings.default_ttl)).map_err(err)?;
                STATS.writes.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, EventType::Write, &table, &pk.json, None);
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}

// PGCACHE.INVALIDATE <table> <pk>
fn invalidate_cmd(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let pk = args[2].as_slice().to_vec();
    with_table(
        ctx,
        &args[1],
        Box::new(move |ctx, table, responder| {
            let result = (|| {
                let settings = SETTINGS.load();
                check_allowed(&settings, &table)?;
                let pk = canonical_pk(&table, &pk).map_err(err)?;
                let key = cache_key(&settings.cache_prefix, &table, &pk);
                // A fill in flight must not bring the old row back.
                shared().fills.invalidate(&(cache::selected_db(ctx), key.clone()));
                cache::delete(ctx, &key).map_err(err)?;
                STATS.invalidations.fetch_add(1, Ordering::Relaxed);
                cache::publish(ctx, EventType::Invalidate, &table, &pk.json, Some(Source::Command));
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}
