//! SQL text built only from catalog names, always quoted; values are bind
//! parameters. Nothing here ever sees a user's text.

use crate::schema::PkColumn;
use std::fmt::Write;

/// Quotes an identifier as PostgreSQL's `quote_ident` does when forced.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// Quotes a string literal as PostgreSQL's `quote_literal` does: quotes
/// doubled, and backslashes doubled in an `E''` literal, so the text reads
/// the same whatever `standard_conforming_strings` says. For the
/// replication connection, which has no bind parameters.
pub fn quote_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    if text.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for ch in text.chars() {
        if ch == '\'' || ch == '\\' {
            out.push(ch);
        }
        out.push(ch);
    }
    out.push('\'');
    out
}

fn table_ref(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A scalar subquery naming what the cache's keys of the table with oid
/// `oid_sql` (SQL text: a literal or a parameter) depend on: its schema and
/// name, and its primary-key columns with their types and collations. NULL
/// once the table is gone. The schema check compares it with the one read
/// when the table was looked up.
pub fn fingerprint(oid_sql: &str) -> String {
    format!(
        "(SELECT pg_catalog.concat_ws('/', n.nspname, c.relname, \
         (SELECT pg_catalog.string_agg(a.attname::text || ' ' || a.atttypid::text || ' ' || a.attcollation::text, ',' ORDER BY a.attnum) \
          FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
          WHERE i.indrelid = c.oid AND i.indisprimary)) \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {oid_sql})"
    )
}

/// `SELECT row_to_json(t.*)::text FROM s.n AS t WHERE t.c1 = $1::text::type1 AND ...`
///
/// `t.*` is the whole row even when the table has a column named `t`.
/// Parameters travel as text and are converted by the column type's own
/// input function (the base type of a domain, without a type modifier so
/// that a cast never rounds a key).
pub fn select_one(schema: &str, name: &str, pk: &[PkColumn]) -> String {
    let mut sql = format!(
        "SELECT pg_catalog.row_to_json(t.*)::text FROM {} AS t WHERE ",
        table_ref(schema, name)
    );
    for (i, col) in pk.iter().enumerate() {
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(
            sql,
            "t.{} = ${}::text::{}",
            quote_ident(&col.name),
            i + 1,
            col.type_sql
        );
    }
    sql
}

/// Many keys in one query: `$1` is a JSON array of canonical keys; the answer
/// is `(ord, row)` for each key that has a row, `ord` counting from 1.
pub fn select_many(schema: &str, name: &str, pk: &[PkColumn]) -> String {
    let defs: Vec<String> = pk
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), c.type_sql))
        .collect();
    let aliases: Vec<String> = (0..pk.len()).map(|i| format!("k{i}")).collect();
    let join: Vec<String> = pk
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = k.k{i}", quote_ident(&c.name)))
        .collect();
    format!(
        "SELECT k.ord, pg_catalog.row_to_json(t.*)::text \
         FROM ROWS FROM (pg_catalog.json_to_recordset($1::text::json) AS ({})) \
         WITH ORDINALITY AS k({}, ord) JOIN {} AS t ON {}",
        defs.join(", "),
        aliases.join(", "),
        table_ref(schema, name),
        join.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("pgcache"), "'pgcache'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }
    use crate::schema::PkKind;

    fn col(name: &str, ty: &str) -> PkColumn {
        PkColumn {
            name: name.into(),
            type_sql: ty.into(),
            kind: PkKind::Text,
        }
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("a\"b; DROP"), "\"a\"\"b; DROP\"");
    }

    #[test]
    fn one_row_query() {
        let sql = select_one(
            "public",
            "products",
            &[
                col("category", "\"pg_catalog\".\"varchar\""),
                col("product_id", "\"pg_catalog\".\"int4\""),
            ],
        );
        assert_eq!(
            sql,
            "SELECT pg_catalog.row_to_json(t.*)::text FROM \"public\".\"products\" AS t WHERE \
             t.\"category\" = $1::text::\"pg_catalog\".\"varchar\" AND \
             t.\"product_id\" = $2::text::\"pg_catalog\".\"int4\""
        );
        assert!(fingerprint("42").ends_with("WHERE c.oid = 42)"));
    }

    #[test]
    fn many_rows_query() {
        let sql = select_many("app", "we\"ird", &[col("id", "\"pg_catalog\".\"int8\"")]);
        assert_eq!(
            sql,
            "SELECT k.ord, pg_catalog.row_to_json(t.*)::text \
             FROM ROWS FROM (pg_catalog.json_to_recordset($1::text::json) AS (\"id\" \"pg_catalog\".\"int8\")) \
             WITH ORDINALITY AS k(k0, ord) JOIN \"app\".\"we\"\"ird\" AS t ON t.\"id\" = k.k0"
        );
    }
}
