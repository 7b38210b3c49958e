//! Recognising pgcache's own entries among the keys under its prefix.
//!
//! Flushes (a gap, a TRUNCATE, INVALIDATE_TABLE) scan the keyspace and must
//! delete only what pgcache wrote: `<prefix><table>:<canonical pk>`. A key
//! qualifies only if the part after the table is a canonical pk: a compact
//! JSON object with members in byte order and scalar values, exactly as
//! `key::canonical_pk_value` renders one. When the table's schema is known,
//! the pk must also be exactly that table's canonical form of itself
//! (`is_canonical_pk_of`): `{"id":"7"}` for an integer key is a key a user
//! wrote, not pgcache.

use crate::fastkey::push_canonical_pk_bytes;
use crate::schema::TableSchema;
use serde_json::Value;

/// A key after the prefix, split into the table's key name and the pk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryKey<'a> {
    pub table: &'a str,
    pub pk: &'a str,
}

/// Splits `rest` (a key without the prefix) into `<table>:<pk>` where `<pk>`
/// starts like a JSON object with a member, without judging the pk.
pub fn split_entry_key(rest: &[u8]) -> Option<EntryKey<'_>> {
    let rest = std::str::from_utf8(rest).ok()?;
    // The table is a key name (its quoted parts may hold `:` and `{`); the
    // pk is an object whose first member name starts with `"`.
    let (table, pk) = crate::schema::split_key_name(rest)?;
    (pk.starts_with("{\"") && pk.ends_with('}')).then_some(EntryKey { table, pk })
}

/// Splits `rest` (a key without the prefix) into `<table>:<pk>` when `<pk>`
/// looks like a canonical pk; `None` for anything pgcache does not write.
pub fn parse_entry_key(rest: &[u8]) -> Option<EntryKey<'_>> {
    split_entry_key(rest).filter(|e| looks_canonical(e.pk))
}

/// A compact JSON object, members sorted by name (byte order), every value
/// a string, a number or a boolean: the shape of every canonical pk (what
/// can be checked without the table's schema).
pub fn looks_canonical(pk: &str) -> bool {
    if !pk.ends_with('}') {
        return false;
    }
    let Ok(Value::Object(members)) = serde_json::from_str::<Value>(pk) else {
        return false;
    };
    if members.is_empty() {
        return false;
    }
    let mut previous: Option<&str> = None;
    for (name, value) in &members {
        if previous.is_some_and(|p| p.as_bytes() >= name.as_bytes()) {
            return false;
        }
        previous = Some(name);
        if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            return false;
        }
    }
    // Insertion order is kept (serde_json's preserve_order): rendering the
    // object again gives the text back only if it was compact and minimally
    // escaped.
    serde_json::to_string(&members).is_ok_and(|again| again == pk)
}

/// Whether `pk` is exactly the canonical pk that `table` gives itself
/// (through the hit path's canonicaliser: an already canonical key is
/// mostly compared in place).
pub fn is_canonical_pk_of(table: &TableSchema, pk: &str) -> bool {
    let mut out = Vec::with_capacity(pk.len());
    push_canonical_pk_bytes(&mut out, table, pk.as_bytes()).is_ok() && out == pk.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{test_table, PkKind};

    #[test]
    fn entries_and_look_alikes() {
        let e = parse_entry_key(br#"users:{"id":123}"#).unwrap();
        assert_eq!((e.table, e.pk), ("users", r#"{"id":123}"#));
        let e = parse_entry_key(br#"app.orders:{"id":7,"tenant":"a:{b"}"#).unwrap();
        assert_eq!(e.table, "app.orders");
        // Quoted key names may hold what separates the pk.
        let e = parse_entry_key(br#""a:{""b"."x:{""y":{"id":1}"#).unwrap();
        assert_eq!((e.table, e.pk), (r#""a:{""b"."x:{""y""#, r#"{"id":1}"#));
        let e = parse_entry_key(br#""app.users":{"k":19.9}"#).unwrap();
        assert_eq!(e.table, r#""app.users""#);
        for bad in [
            &br#"cart:{u42}"#[..],
            br#"session:{"id":1}x"#,
            br#"users:{ "id":1}"#,
            br#"users:{"id": 1}"#,
            br#"users:{"b":1,"a":2}"#,
            br#"users:{"a":1,"a":2}"#,
            br#"users:{"id":null}"#,
            br#"users:{"id":[1]}"#,
            br#"users:{"id":{"x":1}}"#,
            br#"users:{}"#,
            br#":{"id":1}"#,
            br#"users"#,
            br#"Users:{"id":1}"#,
            br#""unterminated:{"id":1}"#,
            br#"a.b.c:{"id":1}"#,
            b"users:{\"id\":\"\\u0041\"}",
            b"\xff:{\"id\":1}",
        ] {
            assert_eq!(
                parse_entry_key(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Every key pgcache writes is recognised as an entry of its table.
    #[test]
    fn written_keys_are_recognised() {
        let t = crate::schema::test_table(
            "orders",
            &[
                ("tenant", PkKind::Text),
                ("id", PkKind::Int64),
                ("u", PkKind::Uuid),
            ],
        );
        let typed = crate::schema::test_table(
            "typed",
            &[
                ("n", PkKind::Numeric),
                ("at", PkKind::Timestamptz),
                ("c", PkKind::Citext),
            ],
        );
        for raw in [
            r#"{"n":"19.90","at":"2026-01-15 11:30:00+02","c":"ABC"}"#,
            r#"{"n":"NaN","at":"infinity","c":"x"}"#,
            r#"{"n":12345678901234567890123.5e3,"at":"2026-01-15Z","c":""}"#,
        ] {
            let pk = crate::key::canonical_pk(&typed, raw.as_bytes()).unwrap();
            let key = format!("typed:{}", pk.json);
            let e = parse_entry_key(key.as_bytes()).unwrap_or_else(|| panic!("{key}"));
            assert!(is_canonical_pk_of(&typed, e.pk), "{key}");
        }
        for raw in [
            r#"{"id":1,"tenant":"a","u":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}"#,
            r#"{"u":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","tenant":"x:{\"y\"}","id":"-5"}"#,
            r#"{"tenant":"日本\n","id":9007199254740993,"u":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}"#,
        ] {
            let pk = crate::key::canonical_pk(&t, raw.as_bytes()).unwrap();
            let key = format!("orders:{}", pk.json);
            let e = parse_entry_key(key.as_bytes()).unwrap_or_else(|| panic!("{key}"));
            assert_eq!((e.table, e.pk), ("orders", pk.json.as_str()));
            assert!(is_canonical_pk_of(&t, e.pk));
        }
    }

    #[test]
    fn canonical_for_the_table() {
        let t = test_table("users", &[("id", PkKind::Int32)]);
        assert!(is_canonical_pk_of(&t, r#"{"id":7}"#));
        assert!(!is_canonical_pk_of(&t, r#"{"id":"7"}"#));
        assert!(!is_canonical_pk_of(&t, r#"{"nope":1}"#));
        assert!(!is_canonical_pk_of(&t, r#"{"id":007}"#));
    }
}
