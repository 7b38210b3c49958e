//! Module-wide state: settings, the runtime, the PostgreSQL layer, the
//! catalog cache, the fill registry and the counters.

use crate::config;
use crate::fill::Waiter;
use arc_swap::ArcSwap;
use pgcache_core::{FillRegistry, Settings, TableSchema};
use pgcache_pg::Pg;
use redis_module::{Context, RedisString};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};

/// The settings in force; `CONFIG SET` swaps in a new value.
pub static SETTINGS: LazyLock<ArcSwap<Settings>> =
    LazyLock::new(|| ArcSwap::from_pointee(Settings::default()));

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static PG: OnceLock<Pg> = OnceLock::new();

/// A fill is identified by the client's database and the cache key.
pub type FillKey = (i32, String);

/// Bounds the catalog cache: every spelling of a table name that resolves
/// is an entry, and clients choose the spellings.
const MAX_CATALOG_ENTRIES: usize = 10_000;

/// State used by command handlers and by background tasks holding Redis's
/// lock (the listener's catalog lookups also take it without), so the mutex
/// is almost never contended; it exists to make the sharing sound.
pub struct Shared {
    /// Table argument as the client spelled it → its schema.
    catalog: HashMap<Vec<u8>, Arc<TableSchema>>,
    /// A direct-mapped cache in front of `catalog` for the hit path: a slot
    /// is found with a cheap hash of the spelling and checked by comparing
    /// it, which saves the map's SipHash. A collision costs only a map
    /// lookup, as without the cache; every change to `catalog` clears it.
    recent: [Option<RecentTable>; RECENT_SLOTS],
    pub fills: FillRegistry<FillKey, Waiter>,
    /// Entries stored since the running gap flush began: they are fresh, so
    /// the flush keeps them and reads may serve them.
    pub fresh: HashSet<FillKey>,
}

/// A spelling of a table argument and its schema.
type RecentTable = (Box<[u8]>, Arc<TableSchema>);

/// Slots of `Shared::recent` (a power of two).
const RECENT_SLOTS: usize = 64;

/// FNV-1a of a table spelling, reduced to a `recent` slot.
fn recent_slot(arg: &[u8]) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for &b in arg {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as usize & (RECENT_SLOTS - 1)
}

impl Shared {
    pub fn table(&self, arg: &[u8]) -> Option<Arc<TableSchema>> {
        self.catalog.get(arg).cloned()
    }

    /// `table` for the hit path, through the `recent` cache.
    pub fn table_recent(&mut self, arg: &[u8]) -> Option<Arc<TableSchema>> {
        let slot = &mut self.recent[recent_slot(arg)];
        if let Some((spelling, schema)) = slot {
            if **spelling == *arg {
                return Some(schema.clone());
            }
        }
        let schema = self.catalog.get(arg)?.clone();
        *slot = Some((arg.into(), schema.clone()));
        Some(schema)
    }

    pub fn remember_table(&mut self, arg: &[u8], schema: Arc<TableSchema>) {
        if self.catalog.len() >= MAX_CATALOG_ENTRIES {
            self.catalog.clear();
        }
        self.catalog.insert(arg.to_vec(), schema);
        self.recent = std::array::from_fn(|_| None);
        CATALOG_GENERATION.fetch_add(1, Ordering::Release);
    }

    /// Drops every cached spelling of a table whose definition changed.
    pub fn forget_table(&mut self, oid: u32) {
        self.catalog.retain(|_, t| t.oid != oid);
        self.recent = std::array::from_fn(|_| None);
        CATALOG_GENERATION.fetch_add(1, Ordering::Release);
    }

    pub fn catalog_len(&self) -> usize {
        self.catalog.len()
    }
}

static SHARED: LazyLock<Mutex<Shared>> = LazyLock::new(|| {
    Mutex::new(Shared {
        catalog: HashMap::new(),
        recent: std::array::from_fn(|_| None),
        fills: FillRegistry::new(),
        fresh: HashSet::new(),
    })
});

/// Bumped, under the `SHARED` lock, by every change to the catalog: a
/// thread's `FRONT` entries are valid while it has not moved.
static CATALOG_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Slots of a thread's `FRONT` cache (a power of two).
const FRONT_SLOTS: usize = 8;

/// A spelling of a table argument, its schema, and the catalog generation
/// it was read at.
type FrontTable = (u64, Box<[u8]>, Arc<TableSchema>);

// A per-thread cache in front of `Shared::table_recent` for the hit path
// (in practice Redis's main thread): no lock and no reference count per
// hit. Any change to the catalog bumps `CATALOG_GENERATION`, which voids
// every entry read before it.
thread_local! {
    static FRONT: RefCell<[Option<FrontTable>; FRONT_SLOTS]> =
        const { RefCell::new([const { None }; FRONT_SLOTS]) };
}

fn front_slot(arg: &[u8]) -> usize {
    (arg.len() ^ usize::from(arg.last().copied().unwrap_or(0))) & (FRONT_SLOTS - 1)
}

/// Runs `f` with the schema of a table argument that was looked up before;
/// `None` (without calling `f`) when it was not.
pub fn with_cached_table<R>(arg: &[u8], f: impl FnOnce(&Arc<TableSchema>) -> R) -> Option<R> {
    let generation = CATALOG_GENERATION.load(Ordering::Acquire);
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
        let mut sh = shared();
        // Read under the lock, which every bump holds: the generation the
        // schema belongs to.
        let generation = CATALOG_GENERATION.load(Ordering::Acquire);
        (generation, sh.table_recent(arg)?)
    };
    let _ = FRONT.try_with(|front| {
        if let Ok(mut front) = front.try_borrow_mut() {
            front[slot] = Some((generation, arg.into(), schema.clone()));
        }
    });
    Some(f(&schema))
}

pub fn shared() -> MutexGuard<'static, Shared> {
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get().expect("runtime is created at load")
}

pub fn pg() -> &'static Pg {
    PG.get().expect("PostgreSQL layer is created at load")
}

pub fn pg_if_ready() -> Option<&'static Pg> {
    PG.get()
}

/// Counters of the Redis layer (relaxed atomics: no lock on the hit path).
#[derive(Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub not_found: AtomicU64,
    pub coalesced_waits: AtomicU64,
    pub busy_rejections: AtomicU64,
    pub stale_fills_discarded: AtomicU64,
    pub writes: AtomicU64,
    pub invalidations: AtomicU64,
    pub fill_errors: AtomicU64,
    /// Fill latency in microseconds, one sample per fill query: from its
    /// task's start (waiting for a connection included) to the answer.
    pub fill_latency: pgcache_core::latency::Histogram,
}

pub static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

/// Load: strict argument parsing, configs, the runtime and the pool.
pub fn init(ctx: &Context, args: &[RedisString]) -> Result<(), String> {
    let args: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.try_as_str()
                .map(str::to_owned)
                .map_err(|_| format!("module argument {} is not valid UTF-8", i + 1))
        })
        .collect::<Result<_, _>>()?;
    let settings = Settings::from_module_args(&args).map_err(|e| e.to_string())?;
    SETTINGS.store(Arc::new(settings));
    config::register(ctx, &args)?;
    crate::commands::register(ctx)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pgcache-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the background runtime: {e}"))?;
    let _ = RUNTIME.set(runtime);
    let pg = Pg::new(&SETTINGS.load()).map_err(|e| e.to_string())?;
    let _ = PG.set(pg);
    crate::invalidation::IS_REPLICA.store(
        crate::cache::is_replica(ctx),
        std::sync::atomic::Ordering::Relaxed,
    );
    crate::invalidation::read_databases(ctx);
    crate::invalidation::start_listener();
    let s = SETTINGS.load();
    ctx.log_notice(&format!(
        "pgcache: loaded; PostgreSQL {} (pool {}), key prefix '{}'",
        describe_target(&s),
        s.pg_pool_size,
        s.cache_prefix
    ));
    Ok(())
}

/// Where the pool connects, without the password.
pub fn describe_target(s: &Settings) -> String {
    if s.pg_url.is_empty() {
        format!(
            "{}@{}:{}/{}",
            s.pg_user, s.pg_host, s.pg_port, s.pg_database
        )
    } else {
        pgcache_core::settings::redact_url(&s.pg_url)
    }
}
