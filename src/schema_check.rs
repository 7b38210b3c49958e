//! Following schema changes (SPEC §3): every `CHECK_INTERVAL` the tables
//! known to the catalog are compared with PostgreSQL's (one query for all:
//! name, primary-key columns, their types and collations); a table that
//! changed, or that fills found changed, is forgotten and its entries are
//! flushed, since they may be keyed in a form that invalidation no longer
//! produces. Fills check the same fingerprint in their own query, so none
//! is cached under a schema that is out of date; this check bounds how long
//! entries cached before the change are served.

use crate::catalog;
use crate::events::Origin;
use crate::flush::{self, Target};
use crate::log;
use crate::runtime;
use pgcache_core::event::Source;
use std::time::Duration;

/// How often known tables are compared with the catalog.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

const FLUSH_ORIGIN: Origin<'static> = Some((Source::Flush, None));

pub fn start() {
    runtime::spawn("the schema check", async {
        loop {
            tokio::time::sleep(CHECK_INTERVAL).await;
            check().await;
        }
    });
}

async fn check() {
    let Some(pg) = runtime::pg_if_ready() else {
        return;
    };
    let known = catalog::known_tables();
    if !known.is_empty() {
        let mut oids: Vec<u32> = known.iter().map(|t| t.oid).collect();
        oids.sort_unstable();
        oids.dedup();
        match pg.fingerprints(oids).await {
            Ok(now) => {
                for (oid, fingerprint) in now {
                    // Any name of the table still holding an older schema.
                    let changed = known.iter().any(|t| {
                        t.oid == oid && fingerprint.as_deref() != Some(t.fingerprint.as_str())
                    });
                    if changed {
                        catalog::forget(oid);
                    }
                }
            }
            // PostgreSQL is away: fills fail too, and the next check runs.
            Err(e) => log::debug_with(|| format!("pgcache: schema check skipped: {e}")),
        }
    }
    for table in catalog::take_changed() {
        if let Err(e) = flush::table(Target::Table(table.clone()), FLUSH_ORIGIN).await {
            log::warning(&format!(
                "pgcache: entries of {} (whose definition changed) were not all dropped: {e}",
                table.key_name
            ));
        }
    }
}
