//! Key canonicalisation: the hit path's `push_canonical_pk` must agree with
//! the full parser `canonical_pk` on every input (same text, or the same
//! error with the buffer left as it was), a canonical key must
//! canonicalise to itself, and flushes must recognise every key pgcache
//! writes as one of its entries (`pgcache_core::entry`).
//!
//! Input: byte 0 picks 1..=3 primary-key columns, then two bytes per column
//! (kind, name from a small pool); the rest is the pk argument.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcache_core::entry::{is_canonical_pk_of, parse_entry_key};
use pgcache_core::{canonical_pk, push_canonical_pk, PkColumn, PkKind, TableSchema};

const KINDS: [PkKind; 13] = [
    PkKind::Int16,
    PkKind::Int32,
    PkKind::Int64,
    PkKind::Numeric,
    PkKind::Text,
    PkKind::Name,
    PkKind::Bpchar,
    PkKind::Citext,
    PkKind::Uuid,
    PkKind::Bool,
    PkKind::Date,
    PkKind::Timestamp,
    PkKind::Timestamptz,
];

/// Table names: plain, and ones whose key name is quoted and holds what
/// separates a key's parts.
const TABLES: [(&str, &str); 3] = [("public", "t"), ("app", "T"), ("public", "a:{\"b")];

/// Real names, and names JSON must escape or that are not ASCII.
const NAMES: [&str; 16] = [
    "id",
    "category",
    "product_id",
    "u",
    "b",
    "c",
    "o",
    "k",
    "ID",
    "",
    "é",
    "a\"b",
    "a\\b",
    "tab\t",
    "x y",
    "日本",
];

const PREFIX: &str = "pg_cache:é:";

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = 1 + (n % 3) as usize;
    if rest.len() < 2 * n {
        return;
    }
    let (head, raw) = rest.split_at(2 * n);
    let mut pk: Vec<PkColumn> = Vec::with_capacity(n);
    for c in head.chunks(2) {
        let name = NAMES[(c[1] as usize) % NAMES.len()];
        // PostgreSQL column names are unique within a table.
        if pk.iter().any(|p| p.name == name) {
            return;
        }
        pk.push(PkColumn {
            name: name.into(),
            type_sql: "\"pg_catalog\".\"x\"".into(),
            kind: KINDS[(c[0] as usize) % KINDS.len()],
        });
    }
    let (schema, name) = TABLES[usize::from(head[0] >> 6) % TABLES.len()];
    let table = TableSchema::new(1, schema, name, pk);
    // Any bytes: recognising entries never panics.
    let _ = parse_entry_key(raw);

    let slow = canonical_pk(&table, raw);
    let mut out = String::from(PREFIX);
    let fast = push_canonical_pk(&mut out, &table, raw);
    match (&fast, &slow) {
        (Ok(()), Ok(c)) => assert_eq!(&out[PREFIX.len()..], c.json, "raw {raw:?}"),
        (Err(f), Err(s)) => {
            assert_eq!(f, s, "raw {raw:?}");
            assert_eq!(out, PREFIX, "buffer changed on error, raw {raw:?}");
        }
        _ => panic!("fast {fast:?} != full {slow:?} (output {out:?}) for raw {raw:?}"),
    }

    if let Ok(c) = slow {
        assert_eq!(c.params.len(), table.pk.len());
        // Canonical text is a fixed point: keys derived from trigger
        // payloads' rows meet the keys reads wrote (numerics included: they
        // never go through a float).
        let again = canonical_pk(&table, c.json.as_bytes())
            .unwrap_or_else(|e| panic!("canonical {:?} refused: {e}", c.json));
        assert_eq!(again, c, "raw {raw:?}");
        let mut out = String::new();
        push_canonical_pk(&mut out, &table, c.json.as_bytes()).unwrap();
        assert_eq!(out, c.json);
        // A flush recognises the entry as the table's.
        let key = format!("{}:{}", table.key_name, c.json);
        let entry = parse_entry_key(key.as_bytes())
            .unwrap_or_else(|| panic!("entry {key:?} not recognised"));
        assert_eq!((entry.table, entry.pk), (table.key_name.as_str(), c.json.as_str()));
        assert!(is_canonical_pk_of(&table, entry.pk), "{key:?}");
    }
});
