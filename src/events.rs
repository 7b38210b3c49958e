//! Events on `events_channel`: the one way to publish one.

use crate::redis::reply::redis_string;
use crate::scratch::{with_taken, KEEP};
use pgcache_core::event::{push_event_json, EventType, Source};
use pgcache_core::Settings;
use redis_module::{raw, Context, RedisString};
use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where an invalidation came from, and the trigger's operation.
pub type Origin<'a> = Option<(Source, Option<&'a str>)>;

/// What publishing reuses from one event to the next.
#[derive(Default)]
struct Scratch {
    payload: Vec<u8>,
    /// `events_channel` as a Redis string, made once per channel name.
    channel: Option<(String, RedisString)>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = const {
        Cell::new(Scratch {
            payload: Vec::new(),
            channel: None,
        })
    };
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Whether events of type `ty` are published.
pub fn enabled(settings: &Settings, ty: EventType) -> bool {
    let mask = settings.events;
    match ty {
        EventType::Hit => mask.hit,
        EventType::Miss => mask.miss,
        EventType::Write => mask.write,
        EventType::Invalidate => mask.invalidate,
    }
}

/// Publishes one event, if its type is enabled. `table_json` is the table's
/// key name as a JSON string; `key_json` a canonical pk (UTF-8 JSON).
pub fn publish(
    ctx: &Context,
    settings: &Settings,
    ty: EventType,
    table_json: &str,
    key_json: &[u8],
    origin: Origin,
) {
    if !enabled(settings, ty) {
        return;
    }
    let now = now();
    with_taken(&SCRATCH, |scratch| {
        let payload = &mut scratch.payload;
        payload.clear();
        push_event_json(payload, ty, table_json, key_json, now, origin);
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
        if payload.capacity() > KEEP {
            *payload = Vec::new();
        }
    });
}
