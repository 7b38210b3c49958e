//! A table's shape as PostgreSQL's catalog describes it.

use crate::sql;

/// How a primary-key column's values are normalised into the canonical key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkKind {
    Int16,
    Int32,
    Int64,
    /// text, varchar, name: compared as given.
    Text,
    /// char(n): PostgreSQL ignores trailing spaces when comparing.
    Bpchar,
    /// uuid: compared case-blind, rendered lower-case with hyphens.
    Uuid,
    Bool,
    /// Any other type: strings are taken as given, numbers as JSON renders them.
    Other,
}

impl PkKind {
    /// The kind for a base type name from `pg_type.typname`.
    pub fn from_type_name(typname: &str) -> PkKind {
        match typname {
            "int2" => PkKind::Int16,
            "int4" => PkKind::Int32,
            "int8" => PkKind::Int64,
            "text" | "varchar" | "name" | "citext" => PkKind::Text,
            "bpchar" => PkKind::Bpchar,
            "uuid" => PkKind::Uuid,
            "bool" => PkKind::Bool,
            _ => PkKind::Other,
        }
    }
}

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

/// The name a table goes by in keys, events and the `tables` allowlist.
pub fn key_name(schema: &str, name: &str) -> String {
    if schema == "public" {
        name.to_owned()
    } else {
        format!("{schema}.{name}")
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
    fn system_schemas() {
        assert!(is_system_schema("pg_catalog"));
        assert!(is_system_schema("pg_toast"));
        assert!(is_system_schema("information_schema"));
        assert!(!is_system_schema("public"));
        assert!(!is_system_schema("app"));
    }

    #[test]
    fn kinds() {
        assert_eq!(PkKind::from_type_name("int8"), PkKind::Int64);
        assert_eq!(PkKind::from_type_name("varchar"), PkKind::Text);
        assert_eq!(PkKind::from_type_name("numeric"), PkKind::Other);
    }
}
