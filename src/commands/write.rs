//! PGCACHE.WRITE, PGCACHE.INVALIDATE and PGCACHE.INVALIDATE_TABLE.

use super::{check_allowed, check_cluster_pk, optional_ttl, with_table};
use crate::entries;
use crate::events;
use crate::flush::{self, Target};
use crate::redis::acl::Acl;
use crate::redis::cluster;
use crate::redis::keys;
use crate::redis::reply::{err, redis_string};
use crate::runtime;
use crate::settings;
use crate::stats::{self, STATS};
use pgcache_core::event::{EventType, Source};
use pgcache_core::notify::table_flush_payload;
use pgcache_core::{canonical_pk, CanonicalPk, Settings, TableSchema};
use redis_module::{AclPermissions, Context, RedisError, RedisResult, RedisValue};

/// A table flush may take a while (millions of keys, a batch at a time):
/// its client's safety net is generous.
const FLUSH_DEADLINE_MS: u64 = 10 * 60 * 1000;

/// The canonical pk of `raw` and its key, once the table is allowed and the
/// user may use the key with `permissions`.
fn derived_key(
    ctx: &Context,
    settings: &Settings,
    table: &TableSchema,
    raw: &[u8],
    user: Option<&[u8]>,
    permissions: AclPermissions,
) -> Result<(CanonicalPk, String), RedisError> {
    check_allowed(settings, table)?;
    let pk = canonical_pk(table, raw).map_err(err)?;
    check_cluster_pk(table, raw, pk.json.as_bytes())?;
    let key = entries::key(&settings.cache_prefix, table, &pk.json);
    let name = redis_string(Some(ctx), key.as_bytes());
    Acl::of(ctx, user).check(&name, key.as_bytes(), &permissions)?;
    Ok((pk, key))
}

/// PGCACHE.WRITE <table> <pk> <data> [TTL]
pub fn write_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
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
            let result = (|| {
                let settings = settings::current();
                let (pk, key) = derived_key(
                    ctx,
                    &settings,
                    &table,
                    &pk,
                    responder.user(),
                    AclPermissions::INSERT | AclPermissions::UPDATE,
                )?;
                entries::write(
                    ctx,
                    key.as_bytes(),
                    data.as_bytes(),
                    ttl.unwrap_or(settings.default_ttl),
                )
                .map_err(err)?;
                stats::inc(&STATS.writes);
                events::publish(
                    ctx,
                    &settings,
                    EventType::Write,
                    &table.table_json,
                    pk.json.as_bytes(),
                    None,
                );
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}

/// PGCACHE.INVALIDATE <table> <pk>
pub fn invalidate_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let pk = args[2].to_vec();
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| {
            let result = (|| {
                let settings = settings::current();
                let (pk, key) = derived_key(
                    ctx,
                    &settings,
                    &table,
                    &pk,
                    responder.user(),
                    AclPermissions::DELETE,
                )?;
                // A fill in flight must not bring the old row back.
                let db = keys::selected_db(ctx);
                entries::invalidate(ctx, &[key.as_str()], &[db]);
                events::publish(
                    ctx,
                    &settings,
                    EventType::Invalidate,
                    &table.table_json,
                    pk.json.as_bytes(),
                    Some((Source::Command, None)),
                );
                stats::inc(&STATS.invalidations);
                Ok(RedisValue::SimpleStringStatic("OK"))
            })();
            responder.answer(result)
        }),
    )
}

/// PGCACHE.INVALIDATE_TABLE <table>: drops every entry of the table a batch
/// at a time in the background (Redis keeps serving), then answers how many.
pub fn invalidate_table_cmd(ctx: &Context, args: &[&[u8]]) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    with_table(
        ctx,
        args[1],
        Box::new(move |ctx, table, responder| {
            let settings = settings::current();
            // The user must be allowed to delete every key of the table:
            // checked against the pattern itself, `<prefix><table>:*`.
            let pattern = format!("{}{}:*", settings.cache_prefix, table.key_name);
            let allowed = check_allowed(&settings, &table).and_then(|_| {
                Acl::of(ctx, responder.user()).check(
                    &redis_string(Some(ctx), pattern.as_bytes()),
                    pattern.as_bytes(),
                    &AclPermissions::DELETE,
                )
            });
            if let Err(e) = allowed {
                return responder.answer(Err(e));
            }
            let reply = responder.into_blocked(ctx, FLUSH_DEADLINE_MS)?;
            let broadcast = cluster::my_id().map(|id| {
                (
                    settings.invalidation_channel.clone(),
                    table_flush_payload(&table.schema, &table.name, id),
                )
            });
            runtime::spawn_then(
                flush_and_tell(table, broadcast),
                move |result| match result {
                    Ok(Ok(n)) => reply.answer(Ok(RedisValue::Integer(n as i64))),
                    Ok(Err(e)) => reply.answer(Err(err(e))),
                    Err(failed) => reply.answer(Err(err(failed))),
                },
            );
            Ok(RedisValue::NoReply)
        }),
    )
}

/// Flushes the table here and, in a cluster, tells every other primary to
/// flush it too: a TRUNCATE payload on the invalidation channel, which
/// each node's listener applies (a node whose listener is away flushes
/// everything when it reconnects). The count is this node's.
async fn flush_and_tell(
    table: std::sync::Arc<TableSchema>,
    broadcast: Option<(String, String)>,
) -> Result<u64, String> {
    let n = flush::table(Target::Table(table), Some((Source::Flush, None))).await?;
    if let Some((channel, payload)) = broadcast {
        if channel.is_empty() {
            return Err(format!(
                "pgcache: flushed {n} entries here, but cannot tell the other nodes: \
                 invalidation_channel is empty"
            ));
        }
        runtime::pg()
            .notify(&channel, &payload)
            .await
            .map_err(|e| {
                format!(
                    "pgcache: flushed {n} entries here, but could not tell the other nodes: {e}"
                )
            })?;
    }
    Ok(n)
}
