//! Misses waiting for a PostgreSQL connection, per table.
//!
//! Each miss (a READ's key, or a MULTIREAD's missing keys as one group) is
//! queued here. A table with queued misses has exactly one *fetcher* waiting
//! for a pooled connection; once it holds one, it takes what is queued for
//! its table, as one query. An idle pool takes a lone miss at once (no added
//! latency); a busy pool lets misses pile up while they wait, and the next
//! free connection takes them all: concurrent cold misses on one table cost
//! one query per connection turn instead of one per key, and one fetcher
//! (one task, one wait for a connection) instead of one per miss.
//!
//! The invariant: while a table's queue is not empty, one fetcher is due to
//! take from it. `push` asks for a fetcher when none is waiting; `take`
//! marks the waiting fetcher gone and asks for another when it leaves
//! groups behind (the key limit, or groups another query must serve).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

struct Queued<G> {
    keys: usize,
    group: G,
}

struct Queue<G> {
    groups: VecDeque<Queued<G>>,
    /// A fetcher is due to take from this queue.
    fetcher_waiting: bool,
}

/// What a take got, and whether the caller must start another fetcher for
/// the groups it left.
pub struct Taken<G> {
    pub groups: Vec<G>,
    pub start_fetcher: bool,
}

pub struct PendingFetches<T, G> {
    queues: HashMap<T, Queue<G>>,
}

impl<T: Eq + Hash, G> Default for PendingFetches<T, G> {
    fn default() -> Self {
        PendingFetches {
            queues: HashMap::new(),
        }
    }
}

impl<T: Eq + Hash, G> PendingFetches<T, G> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a group of `keys` keys of `table`; true when the caller must
    /// start a fetcher for the table (none is waiting).
    #[must_use]
    pub fn push(&mut self, table: T, keys: usize, group: G) -> bool {
        let queue = self.queues.entry(table).or_insert_with(|| Queue {
            groups: VecDeque::new(),
            fetcher_waiting: false,
        });
        queue.groups.push_back(Queued { keys, group });
        !std::mem::replace(&mut queue.fetcher_waiting, true)
    }

    /// The waiting fetcher's take: the oldest groups of `table`, in order,
    /// while they fit in `max_keys` and are `compatible` with the first (the
    /// same query serves them); the first group is taken whatever its size,
    /// so a group is never split.
    pub fn take(
        &mut self,
        table: &T,
        max_keys: usize,
        compatible: impl Fn(&G, &G) -> bool,
    ) -> Taken<G> {
        let Some(queue) = self.queues.get_mut(table) else {
            return Taken {
                groups: Vec::new(),
                start_fetcher: false,
            };
        };
        let mut taken: Vec<G> = Vec::new();
        let mut keys = 0;
        while let Some(next) = queue.groups.front() {
            if let Some(first) = taken.first() {
                if keys + next.keys > max_keys || !compatible(first, &next.group) {
                    break;
                }
            }
            let next = queue.groups.pop_front().expect("front exists");
            keys += next.keys;
            taken.push(next.group);
        }
        let start_fetcher = !queue.groups.is_empty();
        queue.fetcher_waiting = start_fetcher;
        if !start_fetcher {
            self.queues.remove(table);
        }
        Taken {
            groups: taken,
            start_fetcher,
        }
    }

    /// Groups queued, all tables.
    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.groups.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &u32, _: &u32) -> bool {
        true
    }

    fn groups<G>(t: Taken<G>) -> Vec<G> {
        t.groups
    }

    #[test]
    fn one_fetcher_per_table_takes_everything_queued_in_order() {
        let mut p = PendingFetches::new();
        assert!(p.push("a", 1, 1), "first miss of a table starts a fetcher");
        assert!(p.push("b", 1, 10), "tables have their own fetchers");
        assert!(!p.push("a", 1, 2), "a fetcher is already waiting");
        assert!(!p.push("a", 3, 3));
        let t = p.take(&"a", 100, any);
        assert!(!t.start_fetcher);
        assert_eq!(t.groups, vec![1, 2, 3]);
        assert_eq!(p.len(), 1);
        // After a take, the next miss needs a fetcher of its own.
        assert!(p.push("a", 1, 4));
        assert_eq!(groups(p.take(&"a", 100, any)), vec![4]);
        assert_eq!(groups(p.take(&"b", 100, any)), vec![10]);
        assert!(p.is_empty());
        // A take with nothing queued (a stray fetcher) gets nothing.
        let t = p.take(&"a", 100, any);
        assert!(t.groups.is_empty() && !t.start_fetcher);
    }

    #[test]
    fn stops_at_the_key_limit_but_never_splits_or_skips_a_group() {
        let mut p = PendingFetches::new();
        assert!(p.push(0, 400, 1));
        for (keys, g) in [(200, 2), (50, 3), (1000, 4)] {
            assert!(!p.push(0, keys, g));
        }
        // 400 + 200 > 500: the second group waits (no skipping ahead to 3),
        // and a fetcher must be started for it.
        let t = p.take(&0, 500, any);
        assert_eq!(t.groups, vec![1]);
        assert!(t.start_fetcher);
        assert!(!p.push(0, 1, 5), "the new fetcher is due: no third one");
        let t = p.take(&0, 500, any);
        assert_eq!(t.groups, vec![2, 3]);
        assert!(t.start_fetcher);
        // A group larger than the limit is still taken, whole.
        let t = p.take(&0, 500, any);
        assert_eq!(t.groups, vec![4]);
        assert!(t.start_fetcher);
        let t = p.take(&0, 500, any);
        assert_eq!(t.groups, vec![5]);
        assert!(!t.start_fetcher);
        assert!(p.is_empty());
    }

    #[test]
    fn incompatible_groups_wait_for_a_query_of_their_own() {
        let mut p = PendingFetches::new();
        for g in [1u32, 3, 2, 5] {
            let _ = p.push(0, 1, g);
        }
        let same_parity = |a: &u32, b: &u32| a % 2 == b % 2;
        assert_eq!(groups(p.take(&0, 100, same_parity)), vec![1, 3]);
        assert_eq!(groups(p.take(&0, 100, same_parity)), vec![2]);
        assert_eq!(groups(p.take(&0, 100, same_parity)), vec![5]);
    }

    /// Fetchers started as `push` and `take` ask, each taking once at some
    /// later point, in any interleaving with the pushes: every group is
    /// taken, once, and no more fetchers are started than groups pushed.
    #[test]
    fn fetchers_started_on_request_drain_every_interleaving() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..500 {
            let mut p = PendingFetches::new();
            let mut due = 0; // fetchers started that have not taken yet
            let (mut pushed, mut taken, mut started) = (0u64, 0u64, 0u64);
            let total = 1 + next() % 40;
            while pushed < total || due > 0 {
                if pushed < total && (due == 0 || next() % 2 == 0) {
                    if p.push(0, 1 + (next() % 5) as usize, pushed) {
                        due += 1;
                        started += 1;
                    }
                    pushed += 1;
                    assert!(due >= 1, "a queued group has a fetcher due");
                } else {
                    let max = 1 + (next() % 8) as usize;
                    let t = p.take(&0, max, |a: &u64, b: &u64| !(a + b).is_multiple_of(3));
                    taken += t.groups.len() as u64;
                    due -= 1;
                    if t.start_fetcher {
                        due += 1;
                        started += 1;
                    }
                }
                assert!(due <= 1, "at most one fetcher waits per table");
            }
            assert_eq!(taken, total);
            assert!(started <= total);
            assert!(p.is_empty());
        }
    }
}
