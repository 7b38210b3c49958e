//! Redis Cluster's key-to-slot mapping, and what it means for pgcache keys.
//!
//! A derived key `<prefix><table>:<canonical pk>` hashes like its canonical
//! pk: the pk's opening `{` is the key's first `{` (prefix and table names
//! may not contain one in cluster mode), so both hash the same tag. Redis
//! routes a command by the pk argument as the client spelled it; the entry
//! lives in the canonical pk's slot. The two agree only when the spelling
//! hashes like the canonical form, which `same_slot` decides.

use crc::{Crc, CRC_16_XMODEM};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// The part of `key` Redis hashes: the text between the first `{` and the
/// next `}` when it is not empty, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, 14 bits), as
/// `CLUSTER KEYSLOT` computes it.
pub fn key_hash_slot(key: &[u8]) -> u16 {
    CRC16.checksum(hash_tag(key)) & (SLOTS - 1)
}

/// Whether two keys hash to the same slot (equal tags need no CRC).
pub fn same_slot(a: &[u8], b: &[u8]) -> bool {
    let (ta, tb) = (hash_tag(a), hash_tag(b));
    ta == tb || key_hash_slot(ta) == key_hash_slot(tb)
}

/// Why a name cannot be part of a derived key in cluster mode, if it
/// cannot: a `{` would make the key hash a tag other than its pk's.
pub fn brace_problem(what: &str, name: &str) -> Option<String> {
    name.contains('{').then(|| {
        format!(
            "{what} '{name}' contains '{{', which in cluster mode would put its \
             entries in another hash slot than their primary key's"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of design/cluster.md §2.2, observed with `CLUSTER
    /// KEYSLOT` on Redis 7.0.15.
    #[test]
    fn slots_match_cluster_keyslot() {
        let vectors: &[(&str, u16)] = &[
            (r#"pg_cache:users:{"id":123}"#, 10886),
            (r#"{"id":123}"#, 10886),
            (r#""id":123"#, 10886),
            (r#"{ "id" : 123 }"#, 4228),
            (r#"{"id":"123"}"#, 4473),
            (r#"{"id":"000123"}"#, 9273),
            (r#"pg_cache:orders:{"id":7,"tenant_id":5}"#, 10350),
            (r#"{"id":7,"tenant_id":5}"#, 10350),
            (r#"{"tenant_id":5,"id":7}"#, 11599),
            (r#"pg_cache:t:{"code":"a}b"}"#, 15062),
            (r#"{"code":"a}b"}"#, 15062),
            (r#""code":"a"#, 15062),
            (r#"pg_cache:we{ird:{"id":1}"#, 4358),
            (r#"{"id":1}"#, 14401),
            (r#"{pgcache}:users:{"id":123}"#, 14315),
            (r#"[{"id":123},{"id":124}]"#, 10886),
            ("pg_cache:users:{}", 9031),
            ("pg_cache:users:{\"name\":\"Zoë\"}", 14877),
        ];
        for &(key, slot) in vectors {
            assert_eq!(key_hash_slot(key.as_bytes()), slot, "{key}");
        }
    }

    #[test]
    fn tags() {
        assert_eq!(hash_tag(b"a{b}c"), b"b");
        assert_eq!(hash_tag(b"a{}c"), b"a{}c");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        assert_eq!(hash_tag(b"}a{b}"), b"b");
        assert_eq!(hash_tag(b"{{b}}"), b"{b");
        assert_eq!(hash_tag(b""), b"");
    }

    #[test]
    fn same_slot_compares_tags_then_slots() {
        assert!(same_slot(br#"{"id":1} "#, br#"pg_cache:users:{"id":1}"#));
        assert!(!same_slot(br#"{ "id" : 1 }"#, br#"{"id":1}"#));
        assert!(!same_slot(br#"{"id":"1"}"#, br#"{"id":1}"#));
    }

    #[test]
    fn braces_in_names() {
        assert!(brace_problem("table", "we{ird").is_some());
        assert!(brace_problem("table", "we}ird").is_none());
        assert!(brace_problem("cache_prefix", "pg_cache:").is_none());
    }
}
