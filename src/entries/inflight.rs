//! Fills in flight: the registry of `pgcache_core::fills`, holding who waits
//! for each fill as a closure, so this layer knows nothing of how waiters
//! are answered.

use pgcache_core::FillRegistry;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Instant;

/// A fill's result for one key: the row as JSON, `None` where no row has the
/// key, or the error message.
pub type FillOutcome = Result<Option<String>, String>;

/// Someone waiting for a fill: called once with its outcome (dropped
/// uncalled, it must answer its client with an error on its own).
pub type Waiter = Box<dyn FnOnce(&FillOutcome) + Send>;

static REGISTRY: LazyLock<Mutex<FillRegistry<Waiter>>> =
    LazyLock::new(|| Mutex::new(FillRegistry::new()));

/// The registry. Used under Redis's lock (main thread or the lock thread),
/// so it is never contended; the mutex makes the sharing sound.
pub fn registry() -> MutexGuard<'static, FillRegistry<Waiter>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on the module's monotonic clock (the registry's time).
pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}
