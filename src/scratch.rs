//! Buffers reused from one call to the next on the thread that runs them
//! (Redis's main thread, in practice) instead of an allocation per call.

use std::cell::Cell;
use std::thread::LocalKey;

/// A buffer bigger than this is not kept for the next call.
pub const KEEP: usize = 4096;

/// Runs `f` with the value of `slot`, taken out of it for the call: a
/// re-entered call (or one during thread exit) gets a fresh value, and a
/// panic only loses it.
pub fn with_taken<T: Default, R>(
    slot: &'static LocalKey<Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut value = slot.try_with(Cell::take).unwrap_or_default();
    let r = f(&mut value);
    let _ = slot.try_with(|cell| cell.set(value));
    r
}
