//! A table's shape as PostgreSQL's catalog describes it.

use crate::sql;

/// How a primary-key column's values are normalised into the canonical key
/// (SPEC §3; the README's table of key types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkKind {
    Int16,
    Int32,
    Int64,
    /// numeric/decimal at any precision: exact, never through a float.
    Numeric,
    /// text, varchar, enum labels: compared as given.
    Text,
    /// name: as text, at most 63 bytes (PostgreSQL truncates longer input).
    Name,
    /// char(n): PostgreSQL ignores trailing spaces when comparing.
    Bpchar,
    /// citext: compared lower-cased (ASCII only).
    Citext,
    /// uuid: compared case-blind, rendered lower-case with hyphens.
    Uuid,
    Bool,
    Date,
    Timestamp,
    /// timestamptz: an instant, rendered in UTC.
    Timestamptz,
}

impl PkKind {
    /// The kind for a base type (`pg_type.typname`, `typtype`), `None` for a
    /// type pgcache cannot key on.
    pub fn from_type(typname: &str, typtype: &str) -> Option<PkKind> {
        if typtype == "e" {
            return Some(PkKind::Text);
        }
        if typtype != "b" {
            return None;
        }
        Some(match typname {
            "int2" => PkKind::Int16,
            "int4" => PkKind::Int32,
            "int8" => PkKind::Int64,
            "numeric" => PkKind::Numeric,
            "text" | "varchar" => PkKind::Text,
            "name" => PkKind::Name,
            "bpchar" => PkKind::Bpchar,
            "citext" => PkKind::Citext,
            "uuid" => PkKind::Uuid,
            "bool" => PkKind::Bool,
            "date" => PkKind::Date,
            "timestamp" => PkKind::Timestamp,
            "timestamptz" => PkKind::Timestamptz,
            _ => return None,
        })
    }

    /// Whether equality of the type follows its collation (and so a
    /// nondeterministic collation makes keys uncomparable here).
    pub fn collatable(self) -> bool {
        matches!(
            self,
            PkKind::Text | PkKind::Name | PkKind::Bpchar | PkKind::Citext
        )
    }
}

/// The types a primary key may use, for error messages.
pub const SUPPORTED_KEY_TYPES: &str = "smallint, integer, bigint, numeric, text, varchar, char(n), name, citext, uuid, boolean, date, timestamp, timestamptz, enum types and domains over these";

/// One primary-key column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkColumn {
    /// Column name as stored in the catalog (unquoted).
    pub name: String,
    /// The column's type as a qualified, quoted name (`"pg_catalog"."int4"`),
    /// without a type modifier so that casts never truncate a key.
    pub type_sql: String,
    pub kind: PkKind,
}

/// A cacheable table: its identity and primary key, with the SQL that fills
/// entries from it, built once from catalog names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// The table's name in cache keys and events: bare in `public`, else `schema.table`.
    pub key_name: String,
    /// `key_name` as a JSON string, for event payloads.
    pub table_json: String,
    /// Primary-key columns sorted by name (byte order): the canonical key's order.
    pub pk: Vec<PkColumn>,
    /// One row by key; parameters are the key values as text, in `pk` order.
    pub select_one: String,
    /// Many rows by key; one parameter, a JSON array of canonical keys.
    pub select_many: String,
    /// What `sql::fingerprint` gave when the schema was read: the schema
    /// check compares it with the table's now, and a different value means
    /// the table changed (this schema is forgotten, its entries flushed).
    pub fingerprint: String,
}

impl TableSchema {
    pub fn new(oid: u32, schema: &str, name: &str, mut pk: Vec<PkColumn>) -> TableSchema {
        pk.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        let key_name = key_name(schema, name);
        let table_json = crate::event::table_json(&key_name);
        let select_one = sql::select_one(schema, name, &pk);
        let select_many = sql::select_many(schema, name, &pk);
        TableSchema {
            oid,
            schema: schema.to_owned(),
            name: name.to_owned(),
            key_name,
            table_json,
            pk,
            select_one,
            select_many,
            fingerprint: String::new(),
        }
    }

    /// The primary-key column names, comma-separated, for error messages.
    pub fn pk_names(&self) -> String {
        self.pk
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The name a table goes by in keys, events and the `tables` allowlist:
/// the table alone in `public`, else `schema.table`; each part bare when it
/// is a plain lower-case identifier (`[a-z_][a-z0-9_]*`), else
/// double-quoted with `"` doubled, so no two tables share a name:
/// `app.users` (schema `app`), `"app.users"` (a table of `public` with a dot
/// in its name), `"MixedCase"`.
pub fn key_name(schema: &str, name: &str) -> String {
    let mut out = String::with_capacity(schema.len() + name.len() + 5);
    if schema != "public" {
        push_key_part(&mut out, schema);
        out.push('.');
    }
    push_key_part(&mut out, name);
    out
}

fn is_bare(part: &str) -> bool {
    let mut bytes = part.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn push_key_part(out: &mut String, part: &str) {
    if is_bare(part) {
        out.push_str(part);
    } else {
        out.push_str(&crate::sql::quote_ident(part));
    }
}

/// Reads one part of a qualified name at the start of `s`: a bare word
/// (up to `.`, `:` or the end; folded to lower case when `fold`, as
/// PostgreSQL folds unquoted identifiers) or a double-quoted one. Returns
/// the part and the rest.
fn take_part(s: &str, fold: bool) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut part = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if rest[i + 1..].starts_with('"') {
                    part.push('"');
                    chars.next();
                } else {
                    return (!part.is_empty()).then(|| (part, &rest[i + 1..]));
                }
            } else {
                part.push(c);
            }
        }
        return None;
    }
    let end = s.find(['.', ':', '"']).unwrap_or(s.len());
    let word = &s[..end];
    if word.is_empty() {
        return None;
    }
    let word = if fold {
        word.to_ascii_lowercase()
    } else {
        if !is_bare(word) {
            return None;
        }
        word.to_owned()
    };
    Some((word, &s[end..]))
}

/// Splits a qualified name (`name`, `schema.name`, parts bare or quoted) at
/// the start of `s` into (schema, name) and the rest; the schema is
/// `public` when not given.
fn take_qualified(s: &str, fold: bool) -> Option<((String, String), &str)> {
    let (first, rest) = take_part(s, fold)?;
    match rest.strip_prefix('.') {
        Some(after) => {
            let (second, rest) = take_part(after, fold)?;
            Some(((first, second), rest))
        }
        None => Some((("public".to_owned(), first), rest)),
    }
}

/// The (schema, table) a key name stands for: the inverse of `key_name`.
pub fn parse_key_name(key_name: &str) -> Option<(String, String)> {
    match take_qualified(key_name, false)? {
        (parts, "") => Some(parts),
        _ => None,
    }
}

/// Splits the start of a key after the prefix, `<key name>:<rest>`, at the
/// colon that ends the key name (a quoted part may hold colons).
pub fn split_key_name(s: &str) -> Option<(&str, &str)> {
    let (_, rest) = take_qualified(s, false)?;
    let rest = rest.strip_prefix(':')?;
    let name_len = s.len() - rest.len() - 1;
    Some((&s[..name_len], rest))
}

/// A table name as a user writes it in the allowlist (`users`,
/// `public.users`, `app.Users`, `"MixedCase"`), read as PostgreSQL reads a
/// qualified name (unquoted parts fold to lower case), in key-name form;
/// `None` when it is not a name.
pub fn key_name_of_spelling(spelling: &str) -> Option<String> {
    match take_qualified(spelling.trim(), true)? {
        ((schema, name), "") => Some(key_name(&schema, &name)),
        _ => None,
    }
}

/// A table `public.<name>` with these primary-key columns, for unit tests.
#[cfg(test)]
pub(crate) fn test_table(name: &str, cols: &[(&str, PkKind)]) -> TableSchema {
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

/// System catalogs are never served, whatever the allowlist says.
pub fn is_system_schema(schema: &str) -> bool {
    schema.starts_with("pg_") || schema == "information_schema"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pk_sorted_by_name_and_key_name() {
        let col = |n: &str| PkColumn {
            name: n.into(),
            type_sql: "\"pg_catalog\".\"int4\"".into(),
            kind: PkKind::Int32,
        };
        let t = TableSchema::new(1, "app", "t", vec![col("b"), col("B"), col("a")]);
        let names: Vec<_> = t.pk.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["B", "a", "b"]);
        assert_eq!(t.key_name, "app.t");
        assert_eq!(key_name("public", "users"), "users");
        assert_eq!(t.pk_names(), "B, a, b");
    }

    #[test]
    fn key_names_are_unambiguous() {
        let cases = [
            ("public", "users", "users"),
            ("app", "users", "app.users"),
            ("public", "app.users", "\"app.users\""),
            ("public", "MixedCase", "\"MixedCase\""),
            ("My Schema", "t_1", "\"My Schema\".t_1"),
            ("public", "a\"b:{\"c", "\"a\"\"b:{\"\"c\""),
            ("public", "café", "\"café\""),
            ("public", "1st", "\"1st\""),
            ("Public", "x", "\"Public\".x"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (schema, name, want) in cases {
            let k = key_name(schema, name);
            assert_eq!(k, want);
            assert!(seen.insert(k.clone()), "{k} twice");
            assert_eq!(
                parse_key_name(&k),
                Some((schema.to_owned(), name.to_owned())),
                "{k}"
            );
            let key = format!("{k}:{{\"id\":1}}");
            assert_eq!(
                split_key_name(&key),
                Some((k.as_str(), "{\"id\":1}")),
                "{key}"
            );
        }
        assert_eq!(parse_key_name("Users"), None);
        assert_eq!(parse_key_name("a.b.c"), None);
        assert_eq!(parse_key_name("\"\""), None);
        assert_eq!(parse_key_name(""), None);
        assert_eq!(split_key_name("users{\"id\":1}"), None);
    }

    #[test]
    fn allowlist_spellings() {
        assert_eq!(key_name_of_spelling("users").as_deref(), Some("users"));
        assert_eq!(
            key_name_of_spelling(" public.users ").as_deref(),
            Some("users")
        );
        assert_eq!(
            key_name_of_spelling("App.Users").as_deref(),
            Some("app.users")
        );
        assert_eq!(
            key_name_of_spelling("\"MixedCase\"").as_deref(),
            Some("\"MixedCase\"")
        );
        assert_eq!(
            key_name_of_spelling("public.\"app.users\"").as_deref(),
            Some("\"app.users\"")
        );
        assert_eq!(key_name_of_spelling("a.b.c"), None);
        assert_eq!(key_name_of_spelling(""), None);
    }

    #[test]
    fn system_schemas() {
        assert!(is_system_schema("pg_catalog"));
        assert!(is_system_schema("pg_toast"));
        assert!(is_system_schema("information_schema"));
        assert!(!is_system_schema("public"));
        assert!(!is_system_schema("app"));
    }

    #[test]
    fn kinds() {
        assert_eq!(PkKind::from_type("int8", "b"), Some(PkKind::Int64));
        assert_eq!(PkKind::from_type("varchar", "b"), Some(PkKind::Text));
        assert_eq!(PkKind::from_type("numeric", "b"), Some(PkKind::Numeric));
        assert_eq!(PkKind::from_type("mood", "e"), Some(PkKind::Text));
        assert_eq!(PkKind::from_type("float8", "b"), None);
        assert_eq!(PkKind::from_type("int4range", "r"), None);
        assert_eq!(PkKind::from_type("point", "c"), None);
    }
}
