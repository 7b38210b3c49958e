//! Fill bookkeeping: which cache keys are being filled from PostgreSQL, in
//! which database, who waits for each, and which fills were overtaken by an
//! invalidation.
//!
//! Concurrent misses on one key in one database share one fill (one query).
//! An invalidation (INVALIDATE, WRITE, a notification, a table flush, a gap)
//! that arrives while a fill is in flight *detaches* it: its waiters still get
//! its result, but the result is not cached, and a read after the
//! invalidation starts a new fill instead of joining the old one. That is
//! what keeps a fill whose query started before an invalidation from bringing
//! the old row back.
//!
//! An invalidation names a key, not a database: it detaches the key's fills
//! in every database, whether or not anything was ever stored there.
//!
//! Fills carry the time they started (milliseconds of the caller's clock), so
//! a fill whose answer never comes (a bug; the safety net) can be reaped
//! instead of holding its key and its waiters for ever.
//!
//! The registry is plain data, used under Redis's lock only.

use std::collections::HashMap;

pub type FillId = u64;

/// A database number, as Redis's `SELECT` takes it.
pub type Db = i32;

struct Fill<W> {
    id: FillId,
    db: Db,
    table: String,
    started_ms: u64,
    waiters: Vec<W>,
}

/// What `finish` hands back: the waiters to answer, and whether the result
/// may be cached.
pub struct Finished<W> {
    pub waiters: Vec<W>,
    pub cacheable: bool,
}

/// How a read joined the registry.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    /// A new fill; the caller must run it and then call `finish`.
    Started(FillId),
    /// Waits on a fill already in flight.
    Joined,
}

pub struct FillRegistry<W> {
    /// Cache key → its fills that may still be cached, one per database
    /// (almost always a single one).
    active: HashMap<String, Vec<Fill<W>>>,
    /// Fills overtaken by an invalidation: answered, never cached.
    detached: HashMap<FillId, (String, Fill<W>)>,
    /// Fills in `active`.
    active_count: usize,
    next_id: FillId,
}

impl<W> Default for FillRegistry<W> {
    fn default() -> Self {
        FillRegistry {
            active: HashMap::new(),
            detached: HashMap::new(),
            active_count: 0,
            next_id: 1,
        }
    }
}

impl<W> FillRegistry<W> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills in flight, detached ones included.
    pub fn in_flight(&self) -> usize {
        self.active_count + self.detached.len()
    }

    /// Whether a fill for `key` in `db` is in flight and may still be joined.
    pub fn is_active(&self, db: Db, key: &str) -> bool {
        self.active
            .get(key)
            .is_some_and(|fills| fills.iter().any(|f| f.db == db))
    }

    /// Joins the fill in flight for `key` in `db`, or starts one at `now_ms`.
    pub fn join(&mut self, db: Db, key: &str, table: &str, now_ms: u64, waiter: W) -> Join {
        let fills = self.active.entry(key.to_owned()).or_default();
        if let Some(fill) = fills.iter_mut().find(|f| f.db == db) {
            fill.waiters.push(waiter);
            return Join::Joined;
        }
        let id = self.next_id;
        self.next_id += 1;
        fills.push(Fill {
            id,
            db,
            table: table.to_owned(),
            started_ms: now_ms,
            waiters: vec![waiter],
        });
        self.active_count += 1;
        Join::Started(id)
    }

    /// An invalidation of `key`: its fills in flight, in every database,
    /// must not be cached. Returns how many it detached.
    pub fn detach_key(&mut self, key: &str) -> usize {
        let Some((key, fills)) = self.active.remove_entry(key) else {
            return 0;
        };
        let n = fills.len();
        self.active_count -= n;
        for fill in fills {
            self.detached.insert(fill.id, (key.clone(), fill));
        }
        n
    }

    /// An invalidation of a whole table (by its key name); returns how many
    /// fills it detached.
    pub fn detach_table(&mut self, table: &str) -> usize {
        let keys: Vec<String> = self
            .active
            .iter()
            .filter(|(_, fills)| fills.iter().any(|f| f.table == table))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().map(|k| self.detach_key(k)).sum()
    }

    /// An invalidation of everything (a gap in the notifications, FLUSHALL).
    pub fn detach_all(&mut self) -> usize {
        let n = self.active_count;
        let active = std::mem::take(&mut self.active);
        self.active_count = 0;
        for (key, fills) in active {
            for fill in fills {
                self.detached.insert(fill.id, (key.clone(), fill));
            }
        }
        n
    }

    /// Ends fill `id` of `key` in `db`. `None` when it was already finished
    /// (or reaped).
    pub fn finish(&mut self, db: Db, key: &str, id: FillId) -> Option<Finished<W>> {
        if let Some(fills) = self.active.get_mut(key) {
            if let Some(i) = fills.iter().position(|f| f.db == db && f.id == id) {
                let fill = fills.swap_remove(i);
                if fills.is_empty() {
                    self.active.remove(key);
                }
                self.active_count -= 1;
                return Some(Finished {
                    waiters: fill.waiters,
                    cacheable: true,
                });
            }
        }
        self.detached.remove(&id).map(|(_, fill)| Finished {
            waiters: fill.waiters,
            cacheable: false,
        })
    }

    /// Removes every fill started before `started_before_ms` (their answer
    /// is overdue: lost) and hands back their waiters, for the caller to
    /// answer with an error. A later `finish` of such a fill finds nothing.
    pub fn reap(&mut self, started_before_ms: u64) -> Vec<W> {
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        for (key, fills) in self.active.iter_mut() {
            let before = fills.len();
            let mut i = 0;
            while i < fills.len() {
                if fills[i].started_ms < started_before_ms {
                    out.extend(fills.swap_remove(i).waiters);
                } else {
                    i += 1;
                }
            }
            self.active_count -= before - fills.len();
            if fills.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.active.remove(&key);
        }
        let overdue: Vec<FillId> = self
            .detached
            .iter()
            .filter(|(_, (_, f))| f.started_ms < started_before_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some((_, fill)) = self.detached.remove(&id) {
                out.extend(fill.waiters);
            }
        }
        out
    }

    /// Takes every waiter (shutdown): nothing is left in flight.
    pub fn drain(&mut self) -> Vec<W> {
        let mut all: Vec<W> = Vec::new();
        for (_, fills) in self.active.drain() {
            for f in fills {
                all.extend(f.waiters);
            }
        }
        self.active_count = 0;
        for (_, (_, f)) in self.detached.drain() {
            all.extend(f.waiters);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reg = FillRegistry<u32>;

    fn started(j: Join) -> FillId {
        match j {
            Join::Started(id) => id,
            Join::Joined => panic!("expected a new fill"),
        }
    }

    #[test]
    fn concurrent_misses_share_one_fill() {
        let mut r = Reg::new();
        let id = started(r.join(0, "k", "t", 0, 1));
        assert_eq!(r.join(0, "k", "t", 0, 2), Join::Joined);
        assert_eq!(r.join(0, "k", "t", 0, 3), Join::Joined);
        assert_eq!(r.in_flight(), 1);
        assert!(r.is_active(0, "k"));
        let done = r.finish(0, "k", id).unwrap();
        assert!(done.cacheable);
        assert_eq!(done.waiters, vec![1, 2, 3]);
        assert_eq!(r.in_flight(), 0);
        assert!(r.finish(0, "k", id).is_none());
    }

    #[test]
    fn databases_have_fills_of_their_own() {
        let mut r = Reg::new();
        let a = started(r.join(0, "k", "t", 0, 1));
        let b = started(r.join(5, "k", "t", 0, 2));
        assert_ne!(a, b);
        assert_eq!(r.in_flight(), 2);
        assert!(r.finish(5, "k", b).unwrap().cacheable);
        assert!(r.is_active(0, "k") && !r.is_active(5, "k"));
        assert!(r.finish(0, "k", a).unwrap().cacheable);
    }

    #[test]
    fn invalidated_fill_is_answered_but_not_cached() {
        let mut r = Reg::new();
        let old = started(r.join(0, "k", "t", 0, 1));
        assert_eq!(r.detach_key("k"), 1);
        // A read after the invalidation must not join the old fill.
        let new = started(r.join(0, "k", "t", 0, 2));
        assert_ne!(old, new);
        assert_eq!(r.in_flight(), 2);
        let first = r.finish(0, "k", old).unwrap();
        assert!(!first.cacheable);
        assert_eq!(first.waiters, vec![1]);
        let second = r.finish(0, "k", new).unwrap();
        assert!(second.cacheable);
        assert_eq!(second.waiters, vec![2]);
    }

    /// Review H4: an invalidation detaches the key's fills in every
    /// database, not only in those that hold entries.
    #[test]
    fn an_invalidation_detaches_the_key_in_every_database() {
        let mut r = Reg::new();
        let a = started(r.join(0, "k", "t", 0, 1));
        let b = started(r.join(7, "k", "t", 0, 2));
        let c = started(r.join(7, "other", "t", 0, 3));
        assert_eq!(r.detach_key("k"), 2);
        assert!(!r.finish(0, "k", a).unwrap().cacheable);
        assert!(!r.finish(7, "k", b).unwrap().cacheable);
        assert!(r.finish(7, "other", c).unwrap().cacheable);
    }

    #[test]
    fn invalidate_without_fill_is_a_no_op() {
        let mut r = Reg::new();
        assert_eq!(r.detach_key("k"), 0);
    }

    #[test]
    fn table_invalidation_detaches_only_that_table() {
        let mut r = Reg::new();
        let a = started(r.join(0, "a", "users", 0, 1));
        let b = started(r.join(0, "b", "products", 0, 2));
        let c = started(r.join(3, "c", "users", 0, 3));
        assert_eq!(r.detach_table("users"), 2);
        assert!(!r.finish(0, "a", a).unwrap().cacheable);
        assert!(r.finish(0, "b", b).unwrap().cacheable);
        assert!(!r.finish(3, "c", c).unwrap().cacheable);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn detach_all_then_new_fills_are_cacheable() {
        let mut r = Reg::new();
        let a = started(r.join(0, "a", "t", 0, 1));
        let b = started(r.join(1, "b", "t", 0, 2));
        assert_eq!(r.detach_all(), 2);
        assert_eq!(r.in_flight(), 2);
        let c = started(r.join(0, "a", "t", 0, 3));
        assert!(!r.finish(0, "a", a).unwrap().cacheable);
        assert!(!r.finish(1, "b", b).unwrap().cacheable);
        assert!(r.finish(0, "a", c).unwrap().cacheable);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn overdue_fills_are_reaped_and_their_keys_freed() {
        let mut r = Reg::new();
        let old = started(r.join(0, "k", "t", 10, 1));
        assert_eq!(r.join(0, "k", "t", 20, 2), Join::Joined);
        let detached = started(r.join(0, "d", "t", 10, 3));
        r.detach_key("d");
        let young = started(r.join(0, "y", "t", 500, 4));
        let mut reaped = r.reap(100);
        reaped.sort();
        assert_eq!(reaped, vec![1, 2, 3]);
        assert_eq!(r.in_flight(), 1);
        // The key is free again: a new read starts a new fill.
        assert!(!r.is_active(0, "k"));
        assert_ne!(started(r.join(0, "k", "t", 600, 5)), old);
        // A late answer of a reaped fill finds nothing.
        assert!(r.finish(0, "k", old).is_none());
        assert!(r.finish(0, "d", detached).is_none());
        assert!(r.finish(0, "y", young).unwrap().cacheable);
    }

    #[test]
    fn drain_returns_every_waiter() {
        let mut r = Reg::new();
        r.join(0, "a", "t", 0, 1);
        r.join(0, "a", "t", 0, 2);
        r.join(0, "b", "t", 0, 3);
        r.detach_key("b");
        let mut w = r.drain();
        w.sort();
        assert_eq!(w, vec![1, 2, 3]);
        assert_eq!(r.in_flight(), 0);
    }
}
