//! PGCACHE.READ and PGCACHE.MULTIREAD.

use super::{check_allowed, check_cluster_pk, optional_ttl, with_table};
use crate::catalog;
use crate::entries::{self, Lookup};
use crate::events;
use crate::fills::{self, FillPlan};
use crate::redis::acl::Acl;
use crate::redis::blocked::{BlockedReply, Responder};
use crate::redis::cluster;
use crate::redis::gil;
use crate::redis::keys;
use crate::redis::reply::{err, redis_string, wrongtype};
use crate::settings;
use crate::stats::{self, STATS};
use pgcache_core::cluster::{hash_tag, key_hash_slot, same_slot};
use pgcache_core::event::EventType;
use pgcache_core::key::canonical_pk_value;
use pgcache_core::{json_array, CanonicalPk, Settings, TableSchema, NEGATIVE_MARKER};
use redis_module::{AclPermissions, Context, RedisError, RedisResult, RedisValue};
use std::collections::HashMap;
use std::sync::Arc;

/// PGCACHE.READ <table> <pk> [TTL]
pub fn read_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if !(3..=4).contains(&args.len()) {
        return Err(RedisError::WrongArity);
    }
    let ttl = optional_ttl(args.get(3))?;
    // The hit path: no copies of the arguments, no boxed continuation.
    if let Some(result) = catalog::with_cached(args[1], |table| {
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

fn read_row(
    ctx: &Context,
    table: &Arc<TableSchema>,
    pk: &[u8],
    ttl: Option<u64>,
    responder: Responder,
) -> RedisResult {
    let settings = settings::current();
    if let Err(e) = check_allowed(&settings, table) {
        return responder.answer(Err(e));
    }
    // The key is built in a reused buffer: a hit allocates nothing but the
    // key's Redis string.
    let probe = entries::with_key(&settings.cache_prefix, table, pk, |key| {
        let (key, pk_at) = match key {
            Ok(k) => k,
            Err(e) => return Probe::Answered(responder.answer(Err(err(e)))),
        };
        if let Err(e) = check_cluster_pk(table, pk, &key[pk_at..]) {
            return Probe::Answered(responder.answer(Err(e)));
        }
        // One key string for the ACL check and the lookup.
        let name = redis_string(Some(ctx), key);
        if let Err(e) = Acl::of(ctx, responder.user()).check(&name, key, &AclPermissions::ACCESS) {
            return Probe::Answered(responder.answer(Err(e)));
        }
        entries::lookup(ctx, &name, key, |entry| match entry {
            Lookup::Hit(bytes) => {
                stats::inc(&STATS.hits);
                events::publish(
                    ctx,
                    &settings,
                    EventType::Hit,
                    &table.table_json,
                    &key[pk_at..],
                    None,
                );
                Probe::Answered(if bytes == NEGATIVE_MARKER {
                    responder.answer(Ok(RedisValue::Null))
                } else {
                    responder.answer_bytes(ctx, bytes)
                })
            }
            Lookup::WrongType => Probe::Answered(responder.answer(Err(wrongtype(key)))),
            // The key is UTF-8: settings, a table name and a canonical pk.
            Lookup::Missing => {
                Probe::Missing(responder, String::from_utf8_lossy(key).into_owned(), pk_at)
            }
        })
    });
    let (responder, key, pk_at) = match probe {
        Probe::Answered(result) => return result,
        Probe::Missing(responder, key, pk_at) => (responder, key, pk_at),
    };
    stats::inc(&STATS.misses);
    events::publish(
        ctx,
        &settings,
        EventType::Miss,
        &table.table_json,
        &key.as_bytes()[pk_at..],
        None,
    );
    let plan = FillPlan::new(&settings, table, keys::selected_db(ctx), ttl);
    let pk_json = key[pk_at..].to_owned();
    fills::read_miss(ctx, &settings, plan, key, &pk_json, responder)
}

/// PGCACHE.MULTIREAD <table> <pk-array> [TTL]
pub fn multiread_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
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
    let settings = settings::current();
    let pks = match parse_batch(&settings, table, raw) {
        Ok(p) => p,
        Err(e) => return responder.answer(Err(e)),
    };
    let keys: Vec<String> = pks
        .iter()
        .map(|pk| entries::key(&settings.cache_prefix, table, &pk.json))
        .collect();
    let names: Vec<_> = keys
        .iter()
        .map(|k| redis_string(Some(ctx), k.as_bytes()))
        .collect();
    let acl = Acl::of(ctx, responder.user());
    for (name, key) in names.iter().zip(&keys) {
        if let Err(e) = acl.check(name, key.as_bytes(), &AclPermissions::ACCESS) {
            return responder.answer(Err(e));
        }
    }
    drop(acl);
    if matches!(responder, Responder::Direct)
        && cluster::lookups_follow_command_slot()
        && keys.iter().any(|k| !same_slot(raw, k.as_bytes()))
    {
        // Keys of other slots cannot be looked up inside this command here
        // (`cluster::lookups_follow_command_slot`): all of them are, under
        // the lock, outside it. Where the client cannot block, the keys of
        // other slots are fetched instead (`LocalSlots`).
        if let Ok(reply) = BlockedReply::block(ctx, settings.answer_deadline_ms()) {
            let user = ctx.get_current_user().as_slice().to_vec();
            let db = keys::selected_db(ctx);
            let (table, raw) = (table.clone(), raw.to_vec());
            gil::submit(move |ctx| {
                keys::select_db(ctx, db);
                let _ = read_rows(ctx, &table, &raw, ttl, Responder::Blocked(reply, user));
            });
            return Ok(RedisValue::NoReply);
        }
    }
    let mut slots: Vec<Option<String>> = vec![None; keys.len()];
    // Distinct missing keys: the first input position of each, and every
    // position it answers.
    let mut missing: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    let mut local = LocalSlots::new(raw, matches!(responder, Responder::Direct));
    for (i, key) in keys.iter().enumerate() {
        // A pk of a slot this node does not serve is fetched and answered,
        // never looked up here (and not cached: `entries::complete_fill`).
        let cached = if !local.serves(key.as_bytes()) {
            Ok(None)
        } else {
            entries::lookup(ctx, &names[i], key.as_bytes(), |entry| match entry {
                Lookup::Hit(b) if b == NEGATIVE_MARKER => Ok(Some("null".to_owned())),
                Lookup::Hit(b) => Ok(Some(String::from_utf8_lossy(b).into_owned())),
                Lookup::Missing => Ok(None),
                Lookup::WrongType => Err(wrongtype(key.as_bytes())),
            })
        };
        match cached {
            Err(e) => return responder.answer(Err(e)),
            Ok(Some(v)) => {
                stats::inc(&STATS.hits);
                events::publish(
                    ctx,
                    &settings,
                    EventType::Hit,
                    &table.table_json,
                    pks[i].json.as_bytes(),
                    None,
                );
                slots[i] = Some(v);
            }
            Ok(None) => {
                stats::inc(&STATS.misses);
                events::publish(
                    ctx,
                    &settings,
                    EventType::Miss,
                    &table.table_json,
                    pks[i].json.as_bytes(),
                    None,
                );
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
        let json = json_array(slots.iter().map(|s| s.as_deref().unwrap_or("null")));
        return responder.answer(Ok(RedisValue::StringBuffer(json.into_bytes())));
    }
    let missing: Vec<(String, String, Vec<usize>)> = missing
        .into_iter()
        .map(|(first, positions)| (keys[first].clone(), pks[first].json.clone(), positions))
        .collect();
    let plan = FillPlan::new(&settings, table, keys::selected_db(ctx), ttl);
    fills::multiread_misses(ctx, &settings, plan, slots, missing, responder)
}

/// Which of a MULTIREAD's keys this node may look up: in a cluster, those
/// of the slot Redis routed the command by (the array's first pk) while the
/// command runs, and those of other slots the node serves stably (asked
/// once per slot). Outside a cluster, every key.
struct LocalSlots<'a> {
    routed_by: Option<&'a [u8]>,
    asked: HashMap<u16, bool>,
}

impl<'a> LocalSlots<'a> {
    fn new(raw_array: &'a [u8], routed: bool) -> Self {
        LocalSlots {
            routed_by: routed.then_some(raw_array),
            asked: HashMap::new(),
        }
    }

    fn serves(&mut self, key: &[u8]) -> bool {
        if !cluster::enabled() {
            return true;
        }
        if let Some(raw) = self.routed_by {
            if same_slot(raw, key) {
                return true;
            }
            if cluster::lookups_follow_command_slot() {
                return false;
            }
        }
        let tag = hash_tag(key);
        *self
            .asked
            .entry(key_hash_slot(tag))
            .or_insert_with(|| cluster::serves_tag(tag))
    }
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
