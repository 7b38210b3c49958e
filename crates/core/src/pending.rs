//! Misses waiting for a PostgreSQL connection, per table.
//!
//! Each miss (a READ's key, or a MULTIREAD's missing keys as one group) is
//! queued here and a task is started for it; the task waits for a pooled
//! connection and only then takes what is queued for its table, as one
//! query. An idle pool takes a lone miss at once (no added latency); a busy
//! pool lets misses pile up while they wait, and the next free connection
//! takes them all: concurrent cold misses on one table cost one query per
//! connection turn instead of one per key.
//!
//! Every take happens after its own group was pushed and removes at least one
//! group when the queue is not empty, so one task per pushed group is enough
//! for every group to be taken.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

struct Queued<G> {
    keys: usize,
    group: G,
}

pub struct PendingFetches<T, G> {
    queues: HashMap<T, VecDeque<Queued<G>>>,
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

    /// Queues a group of `keys` keys of `table`.
    pub fn push(&mut self, table: T, keys: usize, group: G) {
        self.queues
            .entry(table)
            .or_default()
            .push_back(Queued { keys, group });
    }

    /// Takes the oldest groups of `table`, in order, while they fit in
    /// `max_keys` and `compatible` with the first (the same query serves
    /// them); the first group is taken whatever its size, so a group is never
    /// split.
    pub fn take(
        &mut self,
        table: &T,
        max_keys: usize,
        compatible: impl Fn(&G, &G) -> bool,
    ) -> Vec<G> {
        let Some(queue) = self.queues.get_mut(table) else {
            return Vec::new();
        };
        let mut taken: Vec<G> = Vec::new();
        let mut keys = 0;
        while let Some(next) = queue.front() {
            if let Some(first) = taken.first() {
                if keys + next.keys > max_keys || !compatible(first, &next.group) {
                    break;
                }
            }
            let next = queue.pop_front().expect("front exists");
            keys += next.keys;
            taken.push(next.group);
        }
        if queue.is_empty() {
            self.queues.remove(table);
        }
        taken
    }

    /// Groups queued, all tables.
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
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

    #[test]
    fn takes_everything_queued_for_the_table_in_order() {
        let mut p = PendingFetches::new();
        p.push("a", 1, 1);
        p.push("b", 1, 10);
        p.push("a", 1, 2);
        p.push("a", 3, 3);
        assert_eq!(p.take(&"a", 100, any), vec![1, 2, 3]);
        assert_eq!(p.take(&"a", 100, any), Vec::<u32>::new());
        assert_eq!(p.len(), 1);
        assert_eq!(p.take(&"b", 100, any), vec![10]);
        assert!(p.is_empty());
    }

    #[test]
    fn stops_at_the_key_limit_but_never_splits_or_skips_a_group() {
        let mut p = PendingFetches::new();
        p.push(0, 400, 1);
        p.push(0, 200, 2);
        p.push(0, 50, 3);
        p.push(0, 1000, 4);
        // 400 + 200 > 500: the second group waits (no skipping ahead to 3).
        assert_eq!(p.take(&0, 500, any), vec![1]);
        assert_eq!(p.take(&0, 500, any), vec![2, 3]);
        // A group larger than the limit is still taken, whole.
        assert_eq!(p.take(&0, 500, any), vec![4]);
        assert!(p.is_empty());
    }

    #[test]
    fn incompatible_groups_wait_for_a_query_of_their_own() {
        let mut p = PendingFetches::new();
        for g in [1u32, 3, 2, 5] {
            p.push(0, 1, g);
        }
        let same_parity = |a: &u32, b: &u32| a % 2 == b % 2;
        assert_eq!(p.take(&0, 100, same_parity), vec![1, 3]);
        assert_eq!(p.take(&0, 100, same_parity), vec![2]);
        assert_eq!(p.take(&0, 100, same_parity), vec![5]);
    }

    /// One take per pushed group, in any interleaving with the pushes (each
    /// take after its own push), leaves nothing behind.
    #[test]
    fn one_take_per_push_drains_every_interleaving() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..500 {
            let mut p = PendingFetches::new();
            let mut owed = 0; // takes due: pushed groups whose task has not taken yet
            let mut pushed = 0;
            let mut taken = 0;
            let total = 1 + next() % 40;
            while pushed < total || owed > 0 {
                if pushed < total && (owed == 0 || next() % 2 == 0) {
                    p.push(0, 1 + (next() % 5) as usize, pushed);
                    pushed += 1;
                    owed += 1;
                } else {
                    let max = 1 + (next() % 8) as usize;
                    taken += p
                        .take(&0, max, |a: &u64, b: &u64| !(a + b).is_multiple_of(3))
                        .len() as u64;
                    owed -= 1;
                }
            }
            assert_eq!(taken, total);
            assert!(p.is_empty());
        }
    }
}
