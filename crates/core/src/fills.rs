//! Fill bookkeeping: which cache keys are being filled from PostgreSQL, who
//! waits for each, and which fills were overtaken by an invalidation.
//!
//! Concurrent misses on one key share one fill (one query). An invalidation
//! (INVALIDATE, WRITE, a notification, a table flush) that arrives while a
//! fill is in flight *detaches* it: its waiters still get its result, but the
//! result is not cached, and a read after the invalidation starts a new fill
//! instead of joining the old one. That is what keeps a fill whose query
//! started before an invalidation from bringing the old row back.
//!
//! The registry is plain data, used under Redis's lock only.

use std::collections::HashMap;
use std::hash::Hash;

pub type FillId = u64;

struct Fill<W> {
    id: FillId,
    table: String,
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

pub struct FillRegistry<K, W> {
    active: HashMap<K, Fill<W>>,
    detached: HashMap<FillId, Fill<W>>,
    next_id: FillId,
}

impl<K: Eq + Hash + Clone, W> Default for FillRegistry<K, W> {
    fn default() -> Self {
        FillRegistry {
            active: HashMap::new(),
            detached: HashMap::new(),
            next_id: 1,
        }
    }
}

impl<K: Eq + Hash + Clone, W> FillRegistry<K, W> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills in flight, detached ones included.
    pub fn in_flight(&self) -> usize {
        self.active.len() + self.detached.len()
    }

    /// Whether a fill for `key` is in flight and may still be joined.
    pub fn is_active(&self, key: &K) -> bool {
        self.active.contains_key(key)
    }

    /// Joins the fill in flight for `key`, or starts one.
    pub fn join(&mut self, key: &K, table: &str, waiter: W) -> Join {
        if let Some(fill) = self.active.get_mut(key) {
            fill.waiters.push(waiter);
            return Join::Joined;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.active.insert(
            key.clone(),
            Fill {
                id,
                table: table.to_owned(),
                waiters: vec![waiter],
            },
        );
        Join::Started(id)
    }

    /// An invalidation of `key`: a fill in flight for it must not be cached.
    pub fn invalidate(&mut self, key: &K) -> bool {
        match self.active.remove(key) {
            Some(fill) => {
                self.detached.insert(fill.id, fill);
                true
            }
            None => false,
        }
    }

    /// An invalidation of a whole table; returns how many fills it detached.
    pub fn invalidate_table(&mut self, table: &str) -> usize {
        let keys: Vec<K> = self
            .active
            .iter()
            .filter(|(_, f)| f.table == table)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            self.invalidate(key);
        }
        keys.len()
    }

    /// An invalidation of everything (a gap in the notifications).
    pub fn invalidate_all(&mut self) -> usize {
        let keys: Vec<K> = self.active.keys().cloned().collect();
        for key in &keys {
            self.invalidate(key);
        }
        keys.len()
    }

    /// Ends fill `id` of `key`. `None` when it was already finished.
    pub fn finish(&mut self, key: &K, id: FillId) -> Option<Finished<W>> {
        if self.active.get(key).is_some_and(|f| f.id == id) {
            let fill = self.active.remove(key)?;
            return Some(Finished {
                waiters: fill.waiters,
                cacheable: true,
            });
        }
        self.detached.remove(&id).map(|fill| Finished {
            waiters: fill.waiters,
            cacheable: false,
        })
    }

    /// Takes every waiter (shutdown): nothing is left in flight.
    pub fn drain(&mut self) -> Vec<W> {
        let mut all: Vec<W> = Vec::new();
        for (_, f) in self.active.drain() {
            all.extend(f.waiters);
        }
        for (_, f) in self.detached.drain() {
            all.extend(f.waiters);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reg = FillRegistry<String, u32>;

    fn started(j: Join) -> FillId {
        match j {
            Join::Started(id) => id,
            Join::Joined => panic!("expected a new fill"),
        }
    }

    #[test]
    fn concurrent_misses_share_one_fill() {
        let mut r = Reg::new();
        let k = "k".to_string();
        let id = started(r.join(&k, "t", 1));
        assert_eq!(r.join(&k, "t", 2), Join::Joined);
        assert_eq!(r.join(&k, "t", 3), Join::Joined);
        assert_eq!(r.in_flight(), 1);
        let done = r.finish(&k, id).unwrap();
        assert!(done.cacheable);
        assert_eq!(done.waiters, vec![1, 2, 3]);
        assert_eq!(r.in_flight(), 0);
        assert!(r.finish(&k, id).is_none());
    }

    #[test]
    fn invalidated_fill_is_answered_but_not_cached() {
        let mut r = Reg::new();
        let k = "k".to_string();
        let old = started(r.join(&k, "t", 1));
        assert!(r.invalidate(&k));
        // A read after the invalidation must not join the old fill.
        let new = started(r.join(&k, "t", 2));
        assert_ne!(old, new);
        assert_eq!(r.in_flight(), 2);
        let first = r.finish(&k, old).unwrap();
        assert!(!first.cacheable);
        assert_eq!(first.waiters, vec![1]);
        let second = r.finish(&k, new).unwrap();
        assert!(second.cacheable);
        assert_eq!(second.waiters, vec![2]);
    }

    #[test]
    fn invalidate_without_fill_is_a_no_op() {
        let mut r = Reg::new();
        assert!(!r.invalidate(&"k".to_string()));
    }

    #[test]
    fn table_invalidation_detaches_only_that_table() {
        let mut r = Reg::new();
        let a = started(r.join(&"a".into(), "users", 1));
        let b = started(r.join(&"b".into(), "products", 2));
        assert_eq!(r.invalidate_table("users"), 1);
        assert!(!r.finish(&"a".into(), a).unwrap().cacheable);
        assert!(r.finish(&"b".into(), b).unwrap().cacheable);
    }

    #[test]
    fn drain_returns_every_waiter() {
        let mut r = Reg::new();
        r.join(&"a".into(), "t", 1);
        r.join(&"a".into(), "t", 2);
        r.join(&"b".into(), "t", 3);
        r.invalidate(&"b".into());
        let mut w = r.drain();
        w.sort();
        assert_eq!(w, vec![1, 2, 3]);
        assert_eq!(r.in_flight(), 0);
    }
}
