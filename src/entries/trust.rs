//! The trust state's one owner (`pgcache_core::trust`): which entries may be
//! served and which fills cached. Flushes and the listener tell it when a
//! gap begins or ends; it never asks them.

use pgcache_core::trust::{Phase, Serve, TrustState};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

/// Entries stored during one gap flush and served meanwhile, at most: past
/// it, fills are answered without caching (the set lives on Redis's heap).
pub const FRESH_MAX: usize = 100_000;

static TRUST: LazyLock<Mutex<TrustState>> =
    LazyLock::new(|| Mutex::new(TrustState::new(true, false, FRESH_MAX)));

/// `TrustState::serve` for the hit path, without the lock.
static SERVE: AtomicU8 = AtomicU8::new(SERVE_NONE);
const SERVE_ALL: u8 = 0;
const SERVE_FRESH: u8 = 1;
const SERVE_NONE: u8 = 2;

/// Bumped whenever this node stops being a primary: work that deletes
/// (flushes, notification batches) checks it under Redis's lock before
/// each step and stops once it moved.
static WRITER_EPOCH: AtomicU64 = AtomicU64::new(0);

pub fn state() -> MutexGuard<'static, TrustState> {
    TRUST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes the serve mode after a transition (with the lock held).
pub fn publish(t: &TrustState) {
    let serve = match t.serve() {
        Serve::All => SERVE_ALL,
        Serve::Fresh => SERVE_FRESH,
        Serve::None => SERVE_NONE,
    };
    SERVE.store(serve, Ordering::Release);
    if t.phase() == Phase::Replica {
        WRITER_EPOCH.fetch_add(1, Ordering::AcqRel);
    }
}

pub fn serve() -> Serve {
    match SERVE.load(Ordering::Acquire) {
        SERVE_ALL => Serve::All,
        SERVE_FRESH => Serve::Fresh,
        _ => Serve::None,
    }
}

pub fn writer_epoch() -> u64 {
    WRITER_EPOCH.load(Ordering::Acquire)
}

/// Listener states, as INFO shows them (the listener sets them).
pub const LISTENER_OFF: u8 = 0;
pub const LISTENER_CONNECTING: u8 = 1;
pub const LISTENER_CONNECTED: u8 = 2;
pub const LISTENER_DISCONNECTED: u8 = 3;

static LISTENER: AtomicU8 = AtomicU8::new(LISTENER_OFF);
static LISTENER_ERROR: Mutex<String> = Mutex::new(String::new());

pub fn set_listener(state: u8) {
    LISTENER.store(state, Ordering::Release);
}

pub fn listener() -> u8 {
    LISTENER.load(Ordering::Acquire)
}

pub fn listener_name() -> &'static str {
    match listener() {
        LISTENER_CONNECTING => "connecting",
        LISTENER_CONNECTED => "connected",
        LISTENER_DISCONNECTED => "disconnected",
        _ => "off",
    }
}

pub fn set_listener_error(reason: &str) {
    *LISTENER_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_owned();
}

pub fn listener_error() -> String {
    LISTENER_ERROR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// INFO in a crash report must not wait for a lock the crashing thread may
/// hold.
pub fn try_state() -> Option<MutexGuard<'static, TrustState>> {
    TRUST.try_lock().ok()
}
