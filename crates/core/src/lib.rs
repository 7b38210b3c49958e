//! pgcache's pure core: no Redis, no sockets.
//!
//! Everything here is deterministic and unit-tested: module settings and their
//! strict parsing, command-argument parsing, cache-key canonicalisation, SQL
//! text built from catalog metadata, event payloads and the bookkeeping that
//! coalesces fills and keeps invalidated fills from being cached.

pub mod args;
pub mod entry;
pub mod event;
pub mod fastkey;
pub mod fills;
pub mod json;
pub mod key;
pub mod keytypes;
pub mod latency;
pub mod notify;
pub mod pending;
pub mod schema;
pub mod settings;
pub mod sql;
pub mod trust;

pub use args::{check_table_arg, parse_ttl, ArgError};
pub use fastkey::{push_canonical_pk, push_canonical_pk_bytes};
pub use fills::{Db, FillId, FillRegistry, Finished, Join};
pub use json::json_array;
pub use key::{
    cache_key, canonical_pk, canonical_pk_value, push_key_start, CanonicalPk, KeyError,
    NEGATIVE_MARKER,
};
pub use pending::PendingFetches;
pub use schema::{PkColumn, PkKind, TableSchema};
pub use settings::{EventMask, SettingError, Settings, SslMode};
