//! pgcache's pure core: no Redis, no sockets.
//!
//! Everything here is deterministic and unit-tested: module settings and their
//! strict parsing, command-argument parsing, cache-key canonicalisation, SQL
//! text built from catalog metadata, event payloads and the bookkeeping that
//! coalesces fills and keeps invalidated fills from being cached.

/// The project's one version (the Cargo workspace's), as text.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `VERSION` encoded the way Redis modules report theirs in `MODULE LIST`:
/// major * 10000 + minor * 100 + patch.
pub const ENCODED_VERSION: i32 = encode_version(VERSION);

const fn encode_version(v: &str) -> i32 {
    let b = v.as_bytes();
    let mut parts = [0i32; 3];
    let mut part = 0;
    let mut i = 0;
    while i < b.len() && part < 3 {
        match b[i] {
            b'0'..=b'9' => parts[part] = parts[part] * 10 + (b[i] - b'0') as i32,
            b'.' => part += 1,
            // a pre-release or build suffix
            _ => break,
        }
        i += 1;
    }
    parts[0] * 10000 + parts[1] * 100 + parts[2]
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn encoding() {
        assert_eq!(super::encode_version("0.2.0"), 200);
        assert_eq!(super::encode_version("1.12.3"), 11203);
        assert_eq!(super::encode_version("2.0.1-rc.1"), 20001);
    }
}

pub mod args;
pub mod cluster;
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
pub mod pgoutput;
pub mod replication;
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
pub use settings::{EventMask, InvalidationSource, SettingError, Settings, SslMode};
