//! Faults the integration tests inject, to exercise safety nets that no
//! correct run reaches. Read once at load from `PGCACHE_TEST_FAULTS` (a
//! comma list); none is on unless that variable names it.
//!
//! - `lose_fills`: new fills are registered but never run, as if their task
//!   had been lost: only the blocked clients' timeouts and the reaping of
//!   overdue fills answer.

use std::sync::atomic::{AtomicBool, Ordering};

static LOSE_FILLS: AtomicBool = AtomicBool::new(false);

pub fn read_environment() {
    let faults = std::env::var("PGCACHE_TEST_FAULTS").unwrap_or_default();
    for fault in faults.split(',').map(str::trim) {
        if fault == "lose_fills" {
            LOSE_FILLS.store(true, Ordering::Relaxed);
        }
    }
}

pub fn lose_fills() -> bool {
    LOSE_FILLS.load(Ordering::Relaxed)
}

/// Whether any fault is on (logged at load).
pub fn any() -> bool {
    lose_fills()
}
