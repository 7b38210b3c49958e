//! Trigger payloads: `parse_payload` on any text, and `row_keys` of what it
//! accepts for a few fixed tables, never panic; the keys they name are
//! canonical (they meet the keys reads write) and distinct.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcache_core::notify::{parse_payload, row_keys, MAX_PAYLOAD};
use pgcache_core::{canonical_pk, push_canonical_pk, PkColumn, PkKind, TableSchema};
use std::sync::OnceLock;

fn table(name: &str, cols: &[(&str, PkKind)]) -> TableSchema {
    let pk = cols
        .iter()
        .map(|(n, k)| PkColumn {
            name: (*n).into(),
            type_sql: "\"pg_catalog\".\"x\"".into(),
            kind: *k,
        })
        .collect();
    TableSchema::new(1, "public", name, pk)
}

fn tables() -> &'static [TableSchema] {
    static T: OnceLock<Vec<TableSchema>> = OnceLock::new();
    T.get_or_init(|| {
        vec![
            table("users", &[("id", PkKind::Int32)]),
            table("small", &[("id", PkKind::Int16)]),
            table(
                "products",
                &[("product_id", PkKind::Int64), ("category", PkKind::Text)],
            ),
            table(
                "misc",
                &[
                    ("u", PkKind::Uuid),
                    ("b", PkKind::Bool),
                    ("c", PkKind::Bpchar),
                    ("o", PkKind::Text),
                ],
            ),
            table(
                "typed",
                &[
                    ("n", PkKind::Numeric),
                    ("c", PkKind::Citext),
                    ("d", PkKind::Date),
                    ("ts", PkKind::Timestamp),
                    ("tz", PkKind::Timestamptz),
                ],
            ),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = parse_payload(text) else {
        return;
    };
    assert!(text.len() < MAX_PAYLOAD);
    assert!(p.table.len() >= 3 && p.table.starts_with('"') && p.table.ends_with('"'));
    assert!(p.rows.len() <= 2);
    for t in tables() {
        let Ok(keys) = row_keys(t, &p) else {
            continue;
        };
        assert!(keys.len() <= p.rows.len());
        for (i, k) in keys.iter().enumerate() {
            assert!(!keys[..i].contains(k), "duplicate key {k:?}");
            let read = canonical_pk(t, k.json.as_bytes())
                .unwrap_or_else(|e| panic!("key {:?} from a payload refused: {e}", k.json));
            assert_eq!(&read, k);
            let mut out = String::new();
            push_canonical_pk(&mut out, t, k.json.as_bytes()).unwrap();
            assert_eq!(out, k.json);
        }
    }
});
