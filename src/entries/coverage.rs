//! Which tables' changes the invalidation source hears. With `notify` (or
//! `none`) that is every table, as ever; with `replication`, the tables its
//! publications stream every change of (`Control::published_tables`). A
//! fill of a table outside them is answered but not cached: nothing would
//! ever drop it.
//!
//! A fill is cached only if its table was covered when it started and the
//! coverage did not change until it ended (`epoch`): a fill that read a row
//! before its table was published may have missed a change that no stream
//! carried.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// `None`: every table is covered.
static COVERED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
/// Bumped by every change of the coverage.
static EPOCH: AtomicU64 = AtomicU64::new(0);
/// Tables a fill was not cached for, warned about once each.
static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The coverage epoch if `table` (a key name) is covered now.
pub fn covered_at_start(table: &str) -> Option<u64> {
    let covered = COVERED.lock().unwrap_or_else(PoisonError::into_inner);
    let epoch = EPOCH.load(Ordering::Acquire);
    match &*covered {
        None => Some(epoch),
        Some(set) => set.contains(table).then_some(epoch),
    }
}

/// Whether a fill that started covered in `epoch` is still covered.
pub fn unchanged_since(epoch: u64) -> bool {
    EPOCH.load(Ordering::Acquire) == epoch
}

/// Every table is covered (the `notify` and `none` sources).
pub fn cover_all() {
    let mut covered = COVERED.lock().unwrap_or_else(PoisonError::into_inner);
    if covered.is_some() {
        *covered = None;
        EPOCH.fetch_add(1, Ordering::AcqRel);
    }
}

/// Only `tables` are covered; the tables covered before and not now.
pub fn cover_only(tables: HashSet<String>) -> Vec<String> {
    let mut covered = COVERED.lock().unwrap_or_else(PoisonError::into_inner);
    let lost: Vec<String> = match &*covered {
        Some(before) => before.difference(&tables).cloned().collect(),
        None => Vec::new(),
    };
    if let Some(warned) = WARNED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        warned.retain(|t| !tables.contains(t));
    }
    if covered.as_ref() != Some(&tables) {
        *covered = Some(tables);
        EPOCH.fetch_add(1, Ordering::AcqRel);
    }
    lost
}

/// How many tables are covered (`None`: every table).
pub fn covered_count() -> Option<usize> {
    COVERED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(HashSet::len)
}

/// True the first time `table` is reported uncovered.
pub fn first_warning(table: &str) -> bool {
    let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
    warned
        .get_or_insert_with(HashSet::new)
        .insert(table.to_owned())
}
