//! Table schemas from PostgreSQL's catalog: the one place that turns a table
//! name into an `Arc<TableSchema>`, for commands and the listener alike.
//!
//! Three kinds of names reach it, kept apart so that one can never evict
//! what another needs:
//! - table arguments as clients spell them (`users`, `public."users"`):
//!   bounded (clients choose the spellings), coalesced (many clients asking
//!   for one new spelling cost one lookup), counted against `max_inflight`,
//!   and failed lookups are remembered for `FAILED_LOOKUP_TTL`;
//! - tables named by notifications (schema and name as the trigger sent
//!   them): never evicted, looked up on the listener's own connection;
//! - key names (`users`, `app.users`), the form entries carry, for flushes.

use crate::log;
use crate::stats::{self, STATS};
use pgcache_core::TableSchema;
use pgcache_pg::listener::Resolver;
use pgcache_pg::PgError;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bounds the client spellings kept: every spelling that resolves is an
/// entry, and clients choose the spellings.
const MAX_CLIENT_SPELLINGS: usize = 10_000;
/// Bounds the failed spellings remembered.
const MAX_FAILED: usize = 10_000;
/// How long a failed lookup (no such table, no primary key, ...) is
/// remembered: briefly, so a table created meanwhile is found soon.
const FAILED_LOOKUP_TTL: Duration = Duration::from_secs(5);
/// Attempts at resolving a notification's table before giving up on it.
const PAYLOAD_ATTEMPTS: usize = 3;

/// What a client spelling resolved to.
pub enum Known {
    Found(Arc<TableSchema>),
    /// Looked up lately and refused: the error message.
    Failed(String),
    Unknown,
}

/// Who waits for a lookup: called once, on a runtime worker.
pub type LookupWaiter = Box<dyn FnOnce(Result<Arc<TableSchema>, String>) + Send>;

struct Catalog {
    /// Client spelling → schema.
    spellings: HashMap<Vec<u8>, Arc<TableSchema>>,
    /// A direct-mapped cache in front of `spellings` for the hit path: a
    /// slot is found with a cheap hash of the spelling and checked by
    /// comparing it, which saves the map's SipHash; every change clears it.
    recent: [Option<RecentTable>; RECENT_SLOTS],
    /// Client spelling → why it failed, until when.
    failed: HashMap<Vec<u8>, (String, Instant)>,
    /// Client lookups in flight, with their waiters.
    lookups: HashMap<Vec<u8>, Vec<LookupWaiter>>,
    /// Notification tables: (schema, name) as the trigger sent them.
    payload_tables: HashMap<(Option<String>, String), Arc<TableSchema>>,
    /// Key name → the schema last seen with it.
    key_names: HashMap<String, Arc<TableSchema>>,
    /// Schemas forgotten because their table changed, whose entries are
    /// still to be flushed (`take_changed`).
    changed: Vec<Arc<TableSchema>>,
}

type RecentTable = (Box<[u8]>, Arc<TableSchema>);
const RECENT_SLOTS: usize = 64;

/// FNV-1a of a spelling, reduced to a `recent` slot.
fn recent_slot(arg: &[u8]) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for &b in arg {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as usize & (RECENT_SLOTS - 1)
}

static CATALOG: LazyLock<Mutex<Catalog>> = LazyLock::new(|| {
    Mutex::new(Catalog {
        spellings: HashMap::new(),
        recent: std::array::from_fn(|_| None),
        failed: HashMap::new(),
        lookups: HashMap::new(),
        payload_tables: HashMap::new(),
        key_names: HashMap::new(),
        changed: Vec::new(),
    })
});

fn catalog() -> MutexGuard<'static, Catalog> {
    CATALOG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bumped, under the catalog's lock, by every change to `spellings`: a
/// thread's `FRONT` entries are valid while it has not moved.
static GENERATION: AtomicU64 = AtomicU64::new(0);

impl Catalog {
    fn spelling(&mut self, arg: &[u8]) -> Option<Arc<TableSchema>> {
        let slot = &mut self.recent[recent_slot(arg)];
        if let Some((spelling, schema)) = slot {
            if **spelling == *arg {
                return Some(schema.clone());
            }
        }
        let schema = self.spellings.get(arg)?.clone();
        *slot = Some((arg.into(), schema.clone()));
        Some(schema)
    }

    fn changed(&mut self) {
        self.recent = std::array::from_fn(|_| None);
        GENERATION.fetch_add(1, Ordering::Release);
    }

    fn remember_key_name(&mut self, schema: &Arc<TableSchema>) {
        if let Some(previous) = self
            .key_names
            .insert(schema.key_name.clone(), schema.clone())
        {
            // The table changed since the name was last looked up: the
            // entries of the older schema are still to be flushed.
            if previous.fingerprint != schema.fingerprint {
                self.note_changed(previous);
            }
        }
    }

    fn note_changed(&mut self, schema: Arc<TableSchema>) {
        let same =
            |t: &Arc<TableSchema>| t.oid == schema.oid && t.fingerprint == schema.fingerprint;
        if !self.changed.iter().any(same) {
            self.changed.push(schema);
        }
    }
}

const FRONT_SLOTS: usize = 8;
type FrontTable = (u64, Box<[u8]>, Arc<TableSchema>);

// A per-thread cache in front of the catalog for the hit path (in practice
// Redis's main thread): no lock and no reference count per hit. Any change
// to the spellings bumps `GENERATION`, which voids every entry read before.
thread_local! {
    static FRONT: RefCell<[Option<FrontTable>; FRONT_SLOTS]> =
        const { RefCell::new([const { None }; FRONT_SLOTS]) };
}

fn front_slot(arg: &[u8]) -> usize {
    (arg.len() ^ usize::from(arg.last().copied().unwrap_or(0))) & (FRONT_SLOTS - 1)
}

/// Runs `f` with the schema of a client spelling looked up before; `None`
/// (without calling `f`) when it was not.
pub fn with_cached<R>(arg: &[u8], f: impl FnOnce(&Arc<TableSchema>) -> R) -> Option<R> {
    let generation = GENERATION.load(Ordering::Acquire);
    let slot = front_slot(arg);
    let mut f = Some(f);
    let hit = FRONT
        .try_with(|front| {
            let front = front.try_borrow().ok()?;
            match &front[slot] {
                Some((g, spelling, schema)) if *g == generation && **spelling == *arg => {
                    f.take().map(|f| f(schema))
                }
                _ => None,
            }
        })
        .ok()
        .flatten();
    if hit.is_some() {
        return hit;
    }
    let f = f?;
    let (generation, schema) = {
        let mut c = catalog();
        // Read under the lock, which every bump holds: the generation the
        // schema belongs to.
        let generation = GENERATION.load(Ordering::Acquire);
        (generation, c.spelling(arg)?)
    };
    let _ = FRONT.try_with(|front| {
        if let Ok(mut front) = front.try_borrow_mut() {
            front[slot] = Some((generation, arg.into(), schema.clone()));
        }
    });
    Some(f(&schema))
}

/// What is known of a client spelling, without asking PostgreSQL.
pub fn known(arg: &[u8]) -> Known {
    let mut c = catalog();
    if let Some(schema) = c.spelling(arg) {
        return Known::Found(schema);
    }
    match c.failed.get(arg) {
        Some((why, until)) if Instant::now() < *until => Known::Failed(why.clone()),
        Some(_) => {
            c.failed.remove(arg);
            Known::Unknown
        }
        None => Known::Unknown,
    }
}

/// Whether a lookup of a client spelling may start: one is in flight for
/// it (joined), or fewer than `max_inflight` are.
pub fn may_look_up(arg: &[u8], max_inflight: usize) -> bool {
    let c = catalog();
    c.lookups.contains_key(arg) || c.lookups.len() < max_inflight
}

/// Looks a client spelling up in PostgreSQL (`name` is its checked text)
/// and calls `waiter` with the outcome, on a runtime worker; a lookup of the
/// same spelling already in flight is joined. Admission is the caller's
/// (`may_look_up`, on the same thread just before).
pub fn look_up(arg: &[u8], name: &str, waiter: LookupWaiter) {
    {
        let mut c = catalog();
        if let Some(waiters) = c.lookups.get_mut(arg) {
            waiters.push(waiter);
            return;
        }
        c.lookups.insert(arg.to_vec(), vec![waiter]);
    }
    let arg = arg.to_vec();
    let name = name.to_owned();
    stats::inc(&STATS.catalog_lookups);
    crate::runtime::spawn_then(
        async move { crate::runtime::pg().resolve_table(&name).await },
        move |result| {
            let outcome = match result {
                Ok(Ok(schema)) => Ok(Arc::new(schema)),
                Ok(Err(e)) => Err(e),
                Err(failed) => Err(PgError::Unavailable(failed.to_string())),
            };
            finish_lookup(&arg, outcome);
        },
    );
}

fn finish_lookup(arg: &[u8], outcome: Result<Arc<TableSchema>, PgError>) {
    let (waiters, result) = {
        let mut c = catalog();
        let waiters = c.lookups.remove(arg).unwrap_or_default();
        let result = match outcome {
            Ok(schema) => {
                if c.spellings.len() >= MAX_CLIENT_SPELLINGS {
                    c.spellings.clear();
                }
                c.spellings.insert(arg.to_vec(), schema.clone());
                c.remember_key_name(&schema);
                c.changed();
                Ok(schema)
            }
            Err(e) => {
                let why = e.to_string();
                if e.is_answer() {
                    if c.failed.len() >= MAX_FAILED {
                        c.failed.clear();
                    }
                    c.failed.insert(
                        arg.to_vec(),
                        (why.clone(), Instant::now() + FAILED_LOOKUP_TTL),
                    );
                }
                Err(why)
            }
        };
        (waiters, result)
    };
    for waiter in waiters {
        waiter(result.clone());
    }
}

/// Client lookups in flight.
pub fn lookups_in_flight() -> usize {
    catalog().lookups.len()
}

/// The table a notification names (`spelling`: quoted, qualified when the
/// payload gave a schema), looked up on the listener's connection when not
/// known yet, with a few attempts. `Ok(None)`: PostgreSQL has no such
/// cacheable table (not an error: the payload is ignored).
pub async fn payload_table(
    schema: Option<&str>,
    name: &str,
    spelling: &str,
    resolver: &Resolver,
) -> Result<Option<Arc<TableSchema>>, PgError> {
    let id = (schema.map(str::to_owned), name.to_owned());
    if let Some(t) = catalog().payload_tables.get(&id) {
        return Ok(Some(t.clone()));
    }
    let mut last = None;
    for attempt in 0..PAYLOAD_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        stats::inc(&STATS.catalog_lookups);
        match resolver.resolve_table(spelling).await {
            Ok(schema) => {
                let schema = Arc::new(schema);
                let mut c = catalog();
                c.payload_tables.insert(id, schema.clone());
                c.remember_key_name(&schema);
                return Ok(Some(schema));
            }
            Err(e) if e.is_answer() => return Ok(None),
            Err(e) => {
                if resolver.is_closed() {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| PgError::Unavailable("lookup failed".into())))
}

/// The schema entries with this key name belong to, if any lookup found it.
pub fn by_key_name(key_name: &str) -> Option<Arc<TableSchema>> {
    catalog().key_names.get(key_name).cloned()
}

/// The schema of a key name, looked up when not known (`resolver`: the
/// listener's connection; else the pool). `Ok(None)`: no such table.
pub async fn resolve_key_name(
    key_name: &str,
    resolver: Option<&Resolver>,
) -> Result<Option<Arc<TableSchema>>, PgError> {
    if let Some(t) = by_key_name(key_name) {
        return Ok(Some(t));
    }
    let Some(spelling) = key_name_spelling(key_name) else {
        return Ok(None);
    };
    stats::inc(&STATS.catalog_lookups);
    let result = match resolver {
        Some(r) => r.resolve_table(&spelling).await,
        None => crate::runtime::pg().resolve_table(&spelling).await,
    };
    match result {
        // Only a table whose key name is this one: `a.b` may also be
        // resolved as something else by the search path.
        Ok(schema) if schema.key_name == key_name => {
            let schema = Arc::new(schema);
            catalog().remember_key_name(&schema);
            Ok(Some(schema))
        }
        Ok(_) => Ok(None),
        Err(e) if e.is_answer() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `users` → `"public"."users"`, `app.users` → `"app"."users"`,
/// `"app.users"` → `"public"."app.users"`.
fn key_name_spelling(key_name: &str) -> Option<String> {
    use pgcache_core::sql::quote_ident;
    let (schema, name) = pgcache_core::schema::parse_key_name(key_name)?;
    Some(format!("{}.{}", quote_ident(&schema), quote_ident(&name)))
}

/// Drops every cached name of a table whose definition changed; its
/// entries are flushed by the schema check (`take_changed`), since they may
/// be keyed in a form invalidation no longer produces.
pub fn forget(oid: u32) {
    let mut c = catalog();
    let versions: Vec<Arc<TableSchema>> = c
        .key_names
        .values()
        .chain(c.payload_tables.values())
        .chain(c.spellings.values())
        .filter(|t| t.oid == oid)
        .cloned()
        .collect();
    c.spellings.retain(|_, t| t.oid != oid);
    c.payload_tables.retain(|_, t| t.oid != oid);
    c.key_names.retain(|_, t| t.oid != oid);
    for version in versions {
        c.note_changed(version);
    }
    c.changed();
    drop(c);
    log::notice(&format!(
        "pgcache: a table's definition changed (oid {oid}); its entries are dropped and it will be looked up again"
    ));
}

/// The schemas forgotten since the last call, to flush.
pub fn take_changed() -> Vec<Arc<TableSchema>> {
    std::mem::take(&mut catalog().changed)
}

/// Every schema known, once per table and version (one name of a table may
/// have been looked up again since another was).
pub fn known_tables() -> Vec<Arc<TableSchema>> {
    let c = catalog();
    let mut seen = std::collections::HashSet::new();
    c.key_names
        .values()
        .chain(c.payload_tables.values())
        .chain(c.spellings.values())
        .filter(|t| seen.insert((t.oid, t.fingerprint.as_str())))
        .cloned()
        .collect()
}

/// After a notification `known` could not read: the table's schema now, if
/// it changed since `known` was read (the old one is forgotten and the new
/// one remembered for the notification's names); `None` when it did not, or
/// when it cannot be told.
pub async fn recheck_payload_table(
    known: &Arc<TableSchema>,
    schema: Option<&str>,
    name: &str,
    spelling: &str,
    resolver: &Resolver,
) -> Option<Arc<TableSchema>> {
    stats::inc(&STATS.catalog_lookups);
    let fresh = resolver.resolve_table(spelling).await;
    let changed = match &fresh {
        Ok(t) => t.fingerprint != known.fingerprint || t.oid != known.oid,
        Err(e) => e.is_answer(),
    };
    if !changed {
        return None;
    }
    forget(known.oid);
    let fresh = Arc::new(fresh.ok()?);
    let mut c = catalog();
    c.payload_tables
        .insert((schema.map(str::to_owned), name.to_owned()), fresh.clone());
    c.remember_key_name(&fresh);
    Some(fresh)
}

/// Tables known, all names counted.
pub fn len() -> usize {
    let c = catalog();
    c.spellings.len() + c.payload_tables.len()
}
