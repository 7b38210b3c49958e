//! Which cached entries may be served, and which fills may be cached.
//!
//! Entries are trusted only while invalidation is known to be complete: the
//! listener is connected and everything cached before its (re)connection has
//! been flushed. The phases:
//!
//! - `Trusted`: serve everything, cache every fill.
//! - `NoListener`: no invalidation source is configured (TTL only): the same.
//! - `Starting`: no listener connection since the module loaded, since the
//!   listener was restarted, since loading began, or since it was lost
//!   during a gap flush. Nothing cached is served (it may predate any
//!   change) and no fill is cached (a change it misses would never be
//!   notified).
//! - `Interrupted`: the connection was lost while trusted. Entries cached
//!   before are still served (so hits survive a PostgreSQL outage), but no
//!   fill is cached: a notification it needs may be among the lost ones.
//! - `Flushing(g)`: connected again; gap flush `g` drops what was cached
//!   before. Only entries stored since it began ("fresh", bounded) are
//!   served; fills that started after it began are cached and fresh.
//! - `CatchingUp`: the replication source resumed from its progress
//!   marker (nothing was lost, so nothing is flushed) and replays what
//!   changed since; until it has reached the position PostgreSQL had when it
//!   connected, nothing is served and no fill is cached.
//! - `Replica`: serve what the primary replicates, cache nothing.
//!
//! Every transition into `Starting`, `Interrupted` or `Flushing` also
//! detaches the fills in flight (`Transition::detach_fills`): whatever they
//! read may predate a lost notification. Doing it in the same hold of
//! Redis's lock as the transition leaves no window where such a fill is
//! cached as trusted.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    NoListener,
    Starting,
    Interrupted,
    Flushing(u64),
    CatchingUp,
    Trusted,
    Replica,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::NoListener => "no_listener",
            Phase::Starting => "starting",
            Phase::Interrupted => "interrupted",
            Phase::Flushing(_) => "flushing",
            Phase::CatchingUp => "catching_up",
            Phase::Trusted => "trusted",
            Phase::Replica => "replica",
        }
    }
}

/// What reads may be served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    All,
    /// Only entries stored since the running gap flush began.
    Fresh,
    None,
}

/// Whether a completed fill may be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Yes,
    /// Store it; it is fresh (kept by the running gap flush, served).
    Fresh,
    /// Answer it without caching: entries are not trusted now, or the
    /// fresh set is full.
    Untrusted,
    /// A replica writes nothing of its own.
    Replica,
}

/// What a transition asks of the caller, in the same hold of Redis's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transition {
    /// Detach every fill in flight.
    pub detach_fills: bool,
    /// Start gap flush number `g` (the caller then calls `flush_done(g)`).
    pub flush: Option<u64>,
}

const DETACH: Transition = Transition {
    detach_fills: true,
    flush: None,
};

pub struct TrustState {
    phase: Phase,
    generation: u64,
    listener_enabled: bool,
    /// The listener's connection is up (LISTEN in effect).
    connected: bool,
    loading: bool,
    /// Entries stored since the running gap flush began, per database.
    fresh: HashMap<i32, HashSet<Vec<u8>>>,
    fresh_len: usize,
    fresh_max: usize,
}

impl TrustState {
    /// A module just loaded: with a listener, nothing is trusted until it
    /// connected and flushed.
    pub fn new(listener_enabled: bool, replica: bool, fresh_max: usize) -> TrustState {
        let mut t = TrustState {
            phase: Phase::Starting,
            generation: 0,
            listener_enabled,
            connected: false,
            loading: false,
            fresh: HashMap::new(),
            fresh_len: 0,
            fresh_max,
        };
        t.phase = t.resting_phase(replica);
        t
    }

    fn resting_phase(&self, replica: bool) -> Phase {
        if replica {
            Phase::Replica
        } else if !self.listener_enabled {
            Phase::NoListener
        } else {
            Phase::Starting
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn serve(&self) -> Serve {
        match self.phase {
            Phase::Trusted | Phase::NoListener | Phase::Interrupted | Phase::Replica => Serve::All,
            Phase::Flushing(_) => Serve::Fresh,
            Phase::Starting | Phase::CatchingUp => Serve::None,
        }
    }

    /// Entries are served and fills cached as usual.
    pub fn trusted(&self) -> bool {
        matches!(
            self.phase,
            Phase::Trusted | Phase::NoListener | Phase::Replica
        )
    }

    pub fn is_fresh(&self, db: i32, key: &[u8]) -> bool {
        self.fresh.get(&db).is_some_and(|s| s.contains(key))
    }

    pub fn fresh_len(&self) -> usize {
        self.fresh_len
    }

    /// Whether a fill of `key` in `db` that was not detached may be
    /// stored; a fresh one is recorded as such.
    pub fn may_store(&mut self, db: i32, key: &[u8]) -> Store {
        match self.phase {
            Phase::Trusted | Phase::NoListener => Store::Yes,
            Phase::Flushing(_) => {
                if self.is_fresh(db, key) {
                    return Store::Fresh;
                }
                if self.fresh_len >= self.fresh_max {
                    return Store::Untrusted;
                }
                self.fresh.entry(db).or_default().insert(key.to_vec());
                self.fresh_len += 1;
                Store::Fresh
            }
            Phase::Starting | Phase::Interrupted | Phase::CatchingUp => Store::Untrusted,
            Phase::Replica => Store::Replica,
        }
    }

    /// A key written by a command (WRITE) during a gap flush is fresh too.
    pub fn written(&mut self, db: i32, key: &[u8]) {
        if matches!(self.phase, Phase::Flushing(_))
            && self.fresh_len < self.fresh_max
            && self.fresh.entry(db).or_default().insert(key.to_vec())
        {
            self.fresh_len += 1;
        }
    }

    fn clear_fresh(&mut self) {
        self.fresh.clear();
        self.fresh_len = 0;
    }

    fn begin_flush(&mut self) -> Transition {
        self.generation += 1;
        self.clear_fresh();
        self.phase = Phase::Flushing(self.generation);
        Transition {
            detach_fills: true,
            flush: Some(self.generation),
        }
    }

    /// The listener is (re)started (load, promotion, a changed target):
    /// nothing is trusted until it connects and flushes.
    pub fn listener_started(&mut self) -> Transition {
        self.listener_enabled = true;
        self.connected = false;
        if self.phase == Phase::Replica {
            return Transition::default();
        }
        self.clear_fresh();
        self.phase = Phase::Starting;
        DETACH
    }

    /// The listener is turned off (`invalidation_channel` empty): entries
    /// live by their TTL only.
    pub fn listener_disabled(&mut self) -> Transition {
        self.listener_enabled = false;
        self.connected = false;
        if self.phase != Phase::Replica {
            self.clear_fresh();
            self.phase = Phase::NoListener;
        }
        Transition::default()
    }

    /// LISTEN is in effect: flush what was cached before (once loading is
    /// over).
    pub fn listener_connected(&mut self) -> Transition {
        self.connected = true;
        if self.phase == Phase::Replica || !self.listener_enabled {
            return Transition::default();
        }
        if self.loading {
            self.clear_fresh();
            self.phase = Phase::Starting;
            return DETACH;
        }
        self.begin_flush()
    }

    /// The replication source resumed from its marker: what it replays
    /// drops what changed, so nothing is flushed; entries are trusted once it
    /// caught up (`caught_up`). While loading, as `listener_connected`.
    pub fn resumed(&mut self) -> Transition {
        self.connected = true;
        if self.phase == Phase::Replica || !self.listener_enabled {
            return Transition::default();
        }
        self.clear_fresh();
        self.phase = Phase::Starting;
        if !self.loading {
            self.phase = Phase::CatchingUp;
        }
        DETACH
    }

    /// The resumed source applied everything PostgreSQL had when it
    /// connected: true when that made entries trusted.
    pub fn caught_up(&mut self) -> bool {
        if self.phase != Phase::CatchingUp {
            return false;
        }
        self.phase = Phase::Trusted;
        true
    }

    /// The listener's connection failed or dropped.
    pub fn listener_lost(&mut self) -> Transition {
        self.connected = false;
        match self.phase {
            Phase::Trusted => {
                self.phase = Phase::Interrupted;
                DETACH
            }
            Phase::Flushing(_) | Phase::CatchingUp => {
                self.clear_fresh();
                self.phase = Phase::Starting;
                DETACH
            }
            Phase::Starting | Phase::Interrupted => DETACH,
            Phase::NoListener | Phase::Replica => Transition::default(),
        }
    }

    /// Notifications were lost while connected (the queue overflowed, a
    /// payload could not be applied exactly): flush as after a reconnect.
    pub fn gap(&mut self) -> Transition {
        match self.phase {
            Phase::Replica | Phase::NoListener => Transition::default(),
            _ if self.connected && !self.loading => self.begin_flush(),
            _ => {
                self.clear_fresh();
                self.phase = Phase::Starting;
                DETACH
            }
        }
    }

    /// Gap flush `generation` ended; true when that made entries trusted
    /// (a newer gap or a lost connection leaves them untrusted).
    pub fn flush_done(&mut self, generation: u64) -> bool {
        if self.phase != Phase::Flushing(generation) {
            return false;
        }
        self.clear_fresh();
        self.phase = Phase::Trusted;
        true
    }

    /// Redis began loading an RDB/AOF file or a full sync: what it loads
    /// was cached before a gap.
    pub fn loading_started(&mut self) -> Transition {
        self.loading = true;
        if matches!(self.phase, Phase::Replica | Phase::NoListener) {
            return Transition::default();
        }
        self.clear_fresh();
        self.phase = Phase::Starting;
        DETACH
    }

    /// Loading ended: flush what was loaded if the listener is connected
    /// (else its connection will).
    pub fn loading_ended(&mut self) -> Transition {
        self.loading = false;
        if self.phase == Phase::Starting && self.connected {
            return self.begin_flush();
        }
        Transition::default()
    }

    /// The node became a replica (`true`) or a primary (`false`; the
    /// listener is then started again).
    pub fn set_replica(&mut self, replica: bool) -> Transition {
        if replica {
            self.clear_fresh();
            self.connected = false;
            self.phase = Phase::Replica;
            DETACH
        } else {
            self.phase = self.resting_phase(false);
            self.connected = false;
            DETACH
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flush_of(t: Transition) -> u64 {
        assert!(t.detach_fills);
        t.flush.expect("a gap flush")
    }

    #[test]
    fn start_connect_flush_trust() {
        let mut t = TrustState::new(true, false, 10);
        assert_eq!(t.phase(), Phase::Starting);
        assert_eq!(t.serve(), Serve::None);
        assert_eq!(t.may_store(0, b"k"), Store::Untrusted);
        let g = flush_of(t.listener_connected());
        assert_eq!(t.phase(), Phase::Flushing(g));
        assert_eq!(t.serve(), Serve::Fresh);
        assert_eq!(t.may_store(0, b"k"), Store::Fresh);
        assert!(t.is_fresh(0, b"k") && !t.is_fresh(1, b"k"));
        assert!(t.flush_done(g));
        assert!(t.trusted() && t.serve() == Serve::All);
        assert_eq!(t.may_store(0, b"j"), Store::Yes);
        assert_eq!(t.fresh_len(), 0);
    }

    #[test]
    fn no_listener_and_replica() {
        let mut t = TrustState::new(false, false, 10);
        assert_eq!(t.phase(), Phase::NoListener);
        assert_eq!(t.may_store(0, b"k"), Store::Yes);
        assert_eq!(t.listener_connected(), Transition::default());
        let mut r = TrustState::new(true, true, 10);
        assert_eq!(r.serve(), Serve::All);
        assert_eq!(r.may_store(0, b"k"), Store::Replica);
        assert_eq!(r.listener_connected().flush, None);
        assert_eq!(r.loading_started(), Transition::default());
        assert_eq!(r.loading_ended(), Transition::default());
        assert_eq!(r.phase(), Phase::Replica);
    }

    /// Review H7 and the interruption: from the moment the connection is
    /// lost, fills in flight are detached and no fill is cached; entries
    /// cached before are served until the reconnect's flush.
    #[test]
    fn lost_connection_caches_nothing_until_flushed() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        t.flush_done(g);
        assert_eq!(t.listener_lost(), DETACH);
        assert_eq!(t.phase(), Phase::Interrupted);
        assert_eq!(t.serve(), Serve::All);
        assert_eq!(t.may_store(0, b"k"), Store::Untrusted);
        let g2 = flush_of(t.listener_connected());
        assert!(g2 > g);
        assert_eq!(t.serve(), Serve::Fresh);
    }

    #[test]
    fn losing_the_connection_during_a_flush_trusts_nothing() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        t.may_store(0, b"k");
        t.listener_lost();
        assert_eq!(t.phase(), Phase::Starting);
        assert_eq!(t.serve(), Serve::None);
        assert!(!t.is_fresh(0, b"k"));
        assert!(!t.flush_done(g), "the old flush does not end the gap");
        assert_eq!(t.phase(), Phase::Starting);
    }

    #[test]
    fn a_newer_gap_restarts_the_flush() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        t.may_store(0, b"old");
        let g2 = flush_of(t.gap());
        assert!(!t.is_fresh(0, b"old"), "fresh restarts with the new gap");
        assert!(!t.flush_done(g));
        assert!(t.flush_done(g2));
    }

    #[test]
    fn the_fresh_set_is_bounded() {
        let mut t = TrustState::new(true, false, 2);
        flush_of(t.listener_connected());
        assert_eq!(t.may_store(0, b"a"), Store::Fresh);
        assert_eq!(t.may_store(0, b"b"), Store::Fresh);
        assert_eq!(t.may_store(0, b"c"), Store::Untrusted);
        assert_eq!(t.may_store(0, b"a"), Store::Fresh, "already fresh");
        assert_eq!(t.fresh_len(), 2);
    }

    #[test]
    fn loading_defers_the_flush_to_its_end() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        t.flush_done(g);
        assert_eq!(t.loading_started(), DETACH);
        assert_eq!(t.serve(), Serve::None);
        let g2 = flush_of(t.loading_ended());
        assert!(g2 > g);
        // Connected during loading: the flush waits for its end.
        let mut t = TrustState::new(true, false, 10);
        t.loading_started();
        assert_eq!(t.listener_connected(), DETACH);
        assert_eq!(t.phase(), Phase::Starting);
        flush_of(t.loading_ended());
        // Loading with no listener connection: its connect flushes.
        let mut t = TrustState::new(true, false, 10);
        t.loading_started();
        assert_eq!(t.loading_ended(), Transition::default());
        flush_of(t.listener_connected());
    }

    #[test]
    fn role_changes() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        assert!(t.set_replica(true).detach_fills);
        assert_eq!(t.phase(), Phase::Replica);
        assert!(!t.flush_done(g));
        t.set_replica(false);
        assert_eq!(t.phase(), Phase::Starting);
        t.listener_started();
        flush_of(t.listener_connected());
    }

    /// The replication source: a resume flushes nothing, serves nothing
    /// and caches nothing until caught up; losing the stream meanwhile
    /// trusts nothing.
    #[test]
    fn resume_catches_up_without_a_flush() {
        let mut t = TrustState::new(true, false, 10);
        assert_eq!(t.resumed(), DETACH);
        assert_eq!(t.phase(), Phase::CatchingUp);
        assert_eq!(t.serve(), Serve::None);
        assert_eq!(t.may_store(0, b"k"), Store::Untrusted);
        assert!(t.caught_up());
        assert!(t.trusted());
        assert!(!t.caught_up(), "once");
        t.listener_lost();
        assert_eq!(t.phase(), Phase::Interrupted);
        t.resumed();
        t.listener_lost();
        assert_eq!(t.phase(), Phase::Starting);
        assert!(!t.caught_up());
        // While loading, a resume waits (the source starts again after it).
        let mut t = TrustState::new(true, false, 10);
        t.loading_started();
        t.resumed();
        assert_eq!(t.phase(), Phase::Starting);
        // A gap while catching up flushes as usual.
        let mut t = TrustState::new(true, false, 10);
        t.resumed();
        flush_of(t.gap());
    }

    #[test]
    fn restart_and_disable() {
        let mut t = TrustState::new(true, false, 10);
        let g = flush_of(t.listener_connected());
        t.flush_done(g);
        assert_eq!(t.listener_started(), DETACH);
        assert_eq!(t.phase(), Phase::Starting);
        t.listener_disabled();
        assert_eq!(t.phase(), Phase::NoListener);
        assert_eq!(t.may_store(0, b"k"), Store::Yes);
    }
}
