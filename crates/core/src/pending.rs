//! Misses waiting for a PostgreSQL connection, per table.
//!
//! Each miss (a READ's key, or a MULTIREAD's missing keys as one group) is
//! queued here and taken by a *fetcher*: a task that waits for a pooled
//! connection and then takes what is queued for its table, as one query. An
//! idle pool takes a lone miss at once (no added latency); a busy pool lets
//! misses pile up while they wait, and the next free connection takes them
//! all: concurrent cold misses on one table cost one query per connection
//! turn instead of one per key.
//!
//! Fetchers are few: at most one per table waits for a connection, and a
//! fetcher whose query ends while misses are queued goes on as the waiting
//! one. A new fetcher is started (which wakes a worker thread, a cost paid on
//! Redis's main thread) only when none waits and either none is running or
//! the pool has a free connection for it.
//!
//! The invariant: while a table's queue is not empty, a fetcher is waiting
//! or running for it, and will take from it.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

struct Queued<G> {
    keys: usize,
    group: G,
}

struct Queue<G> {
    groups: VecDeque<Queued<G>>,
    /// A fetcher is waiting for a connection to take from this queue.
    waiting: bool,
    /// Fetchers running a query for this table.
    running: usize,
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

impl<T: Eq + Hash + Clone, G> PendingFetches<T, G> {
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&mut self, table: T) -> &mut Queue<G> {
        self.queues.entry(table).or_insert_with(|| Queue {
            groups: VecDeque::new(),
            waiting: false,
            running: 0,
        })
    }

    /// Drops a table's entry once nothing is queued and no fetcher is about.
    fn tidy(&mut self, table: &T) {
        if self
            .queues
            .get(table)
            .is_some_and(|q| q.groups.is_empty() && !q.waiting && q.running == 0)
        {
            self.queues.remove(table);
        }
    }

    /// Queues a group of `keys` keys of `table`; true when the caller must
    /// start a fetcher for it. `free_connection`: whether the pool has a
    /// connection a new fetcher could have at once (asked only when a
    /// fetcher is running and none waits). `max_running`: fetchers of the
    /// table that may run at once before a miss waits for one of them to end
    /// its query rather than starting another, free connection or not (when
    /// queries are quick, waiting for one costs less than a new fetcher).
    #[must_use]
    pub fn push(
        &mut self,
        table: T,
        keys: usize,
        group: G,
        free_connection: impl FnOnce() -> bool,
        max_running: usize,
    ) -> bool {
        let queue = self.queue(table);
        queue.groups.push_back(Queued { keys, group });
        let running_will_do = queue.running > 0
            && !queue.waiting
            && (queue.running >= max_running || !free_connection());
        if queue.waiting || running_will_do {
            return false;
        }
        queue.waiting = true;
        true
    }

    /// The waiting fetcher's take, once it holds a connection: the oldest
    /// groups of `table`, in order, while they fit in `max_keys` and are
    /// `compatible` with the first (the same query serves them); the first
    /// group is taken whatever its size, so a group is never split. The
    /// fetcher counts as running until it calls `finished`.
    pub fn take(
        &mut self,
        table: &T,
        max_keys: usize,
        compatible: impl Fn(&G, &G) -> bool,
    ) -> Taken<G> {
        let queue = self.queue(table.clone());
        queue.waiting = false;
        queue.running += 1;
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
        // Groups left behind (the key limit, or another query's) get a
        // fetcher of their own, so they need not wait for this query.
        let start_fetcher = !queue.groups.is_empty();
        queue.waiting = start_fetcher;
        Taken {
            groups: taken,
            start_fetcher,
        }
    }

    /// A running fetcher's query ended: true when it must go on as the
    /// table's waiting fetcher (misses are queued and none waits), false
    /// when it is done.
    #[must_use]
    pub fn finished(&mut self, table: &T) -> bool {
        let Some(queue) = self.queues.get_mut(table) else {
            return false;
        };
        queue.running = queue.running.saturating_sub(1);
        let go_on = !queue.groups.is_empty() && !queue.waiting;
        if go_on {
            queue.waiting = true;
        }
        self.tidy(table);
        go_on
    }

    /// A fetcher died (`was_running`: after its take, else while waiting):
    /// the groups that no other fetcher will take now, for the caller to
    /// answer with an error.
    pub fn fetcher_died(&mut self, table: &T, was_running: bool) -> Vec<G> {
        let Some(queue) = self.queues.get_mut(table) else {
            return Vec::new();
        };
        if was_running {
            queue.running = queue.running.saturating_sub(1);
        } else {
            queue.waiting = false;
        }
        let orphans = if queue.waiting || queue.running > 0 {
            Vec::new()
        } else {
            queue.groups.drain(..).map(|q| q.group).collect()
        };
        self.tidy(table);
        orphans
    }

    /// Groups queued, all tables.
    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.groups.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &u32, _: &u32) -> bool {
        true
    }

    #[test]
    fn one_waiting_fetcher_per_table_takes_everything_queued_in_order() {
        let mut p = PendingFetches::new();
        assert!(
            p.push("a", 1, 1, || true, 8),
            "first miss of a table starts a fetcher"
        );
        assert!(
            p.push("b", 1, 10, || true, 8),
            "tables have their own fetchers"
        );
        assert!(
            !p.push("a", 1, 2, || true, 8),
            "a fetcher is already waiting"
        );
        assert!(!p.push("a", 3, 3, || true, 8));
        let t = p.take(&"a", 100, any);
        assert!(!t.start_fetcher);
        assert_eq!(t.groups, vec![1, 2, 3]);
        assert_eq!(p.len(), 1);
        // While that query runs: a free connection gets a new fetcher...
        assert!(p.push("a", 1, 4, || true, 8));
        assert_eq!(p.take(&"a", 100, any).groups, vec![4]);
        // ...a busy pool leaves the miss to a running fetcher, which goes on
        // as the waiting one when its query ends.
        assert!(!p.push("a", 1, 5, || false, 8));
        assert!(p.finished(&"a"), "misses queued: go on");
        assert!(!p.finished(&"a"), "the other one is done");
        assert_eq!(p.take(&"a", 100, any).groups, vec![5]);
        assert!(!p.finished(&"a"));
        assert_eq!(p.take(&"b", 100, any).groups, vec![10]);
        assert!(!p.finished(&"b"));
        assert!(p.is_empty());
        assert!(p.queues.is_empty(), "entries are dropped when idle");
    }

    #[test]
    fn quick_queries_make_misses_wait_for_a_running_fetcher() {
        let mut p = PendingFetches::new();
        for g in 0..2 {
            assert!(p.push(0, 1, g, || true, 2));
            let _ = p.take(&0, 100, any);
        }
        // Two running, a free connection, but at most 2 may run: wait.
        assert!(!p.push(0, 1, 2, || true, 2));
        assert!(p.finished(&0), "the first to end takes it");
        assert_eq!(p.take(&0, 100, any).groups, vec![2]);
        // With a higher limit the free connection is used at once.
        assert!(p.push(0, 1, 3, || true, 8));
    }

    #[test]
    fn stops_at_the_key_limit_but_never_splits_or_skips_a_group() {
        let mut p = PendingFetches::new();
        assert!(p.push(0, 400, 1, || true, 8));
        for (keys, g) in [(200, 2), (50, 3), (1000, 4)] {
            assert!(!p.push(0, keys, g, || true, 8));
        }
        // 400 + 200 > 500: the second group waits (no skipping ahead to 3),
        // and a fetcher must be started for it.
        let t = p.take(&0, 500, any);
        assert_eq!(t.groups, vec![1]);
        assert!(t.start_fetcher);
        assert!(
            !p.push(0, 1, 5, || true, 8),
            "the new fetcher is due: no third one"
        );
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
        for _ in 0..4 {
            assert!(!p.finished(&0));
        }
        assert!(p.is_empty());
    }

    #[test]
    fn incompatible_groups_wait_for_a_query_of_their_own() {
        let mut p = PendingFetches::new();
        for g in [1u32, 3, 2, 5] {
            let _ = p.push(0, 1, g, || true, 8);
        }
        let same_parity = |a: &u32, b: &u32| a % 2 == b % 2;
        assert_eq!(p.take(&0, 100, same_parity).groups, vec![1, 3]);
        assert_eq!(p.take(&0, 100, same_parity).groups, vec![2]);
        assert_eq!(p.take(&0, 100, same_parity).groups, vec![5]);
    }

    #[test]
    fn a_dead_fetcher_leaves_no_group_without_one() {
        let mut p = PendingFetches::new();
        assert!(p.push(0, 1, 1, || true, 8));
        let _ = p.take(&0, 100, any);
        assert!(!p.push(0, 1, 2, || false, 8), "left to the running fetcher");
        // It dies: nobody else will take group 2, so it is handed back.
        assert_eq!(p.fetcher_died(&0, true), vec![2]);
        assert!(p.is_empty());
        // A fetcher dying while another one waits hands nothing back.
        assert!(p.push(0, 1, 3, || true, 8));
        let _ = p.take(&0, 100, any);
        assert!(p.push(0, 1, 4, || true, 8));
        assert_eq!(p.fetcher_died(&0, true), Vec::<u32>::new());
        assert_eq!(p.take(&0, 100, any).groups, vec![4]);
        // One dying while waiting.
        assert!(p.push(1, 1, 5, || true, 8));
        assert_eq!(p.fetcher_died(&1, false), vec![5]);
    }

    /// Random interleavings of misses, takes, query ends and pool states,
    /// with fetchers started exactly when asked: every group is taken once,
    /// at most one fetcher waits per table, and while groups are queued some
    /// fetcher is waiting or running.
    #[test]
    fn fetchers_started_on_request_drain_every_interleaving() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..1000 {
            let mut p = PendingFetches::new();
            // Fetchers: waiting for a connection, or running a query.
            let (mut waiting, mut running) = (0u64, 0u64);
            let (mut pushed, mut taken) = (0u64, 0u64);
            let total = 1 + next() % 40;
            while pushed < total || waiting > 0 || running > 0 {
                match next() % 3 {
                    0 if pushed < total => {
                        if p.push(
                            0,
                            1 + (next() % 5) as usize,
                            pushed,
                            {
                                let free = next() % 2 == 0;
                                move || free
                            },
                            1 + (next() % 3) as usize,
                        ) {
                            waiting += 1;
                        }
                        pushed += 1;
                    }
                    1 if waiting > 0 => {
                        let max = 1 + (next() % 8) as usize;
                        let t = p.take(&0, max, |a: &u64, b: &u64| !(a + b).is_multiple_of(3));
                        taken += t.groups.len() as u64;
                        waiting -= 1;
                        running += 1;
                        if t.start_fetcher {
                            waiting += 1;
                        }
                    }
                    _ if running > 0 => {
                        running -= 1;
                        if p.finished(&0) {
                            waiting += 1;
                        }
                    }
                    _ => {}
                }
                assert!(waiting <= 1, "at most one fetcher waits per table");
                assert!(
                    p.is_empty() || waiting + running > 0,
                    "queued groups have a fetcher"
                );
            }
            assert_eq!(taken, total);
            assert!(p.is_empty());
            assert!(p.queues.is_empty());
        }
    }
}
