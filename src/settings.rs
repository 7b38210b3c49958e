//! The settings in force. `config.rs` swaps in a new value on `CONFIG SET`;
//! everything else only reads them.

use arc_swap::ArcSwap;
use pgcache_core::Settings;
use std::sync::{Arc, LazyLock};

static SETTINGS: LazyLock<ArcSwap<Settings>> =
    LazyLock::new(|| ArcSwap::from_pointee(Settings::default()));

/// The settings now (cheap: no lock, no copy).
pub fn current() -> arc_swap::Guard<Arc<Settings>> {
    SETTINGS.load()
}

pub fn replace(settings: Settings) {
    SETTINGS.store(Arc::new(settings));
}
