//! Table metadata from PostgreSQL's catalog. The user's table text is only
//! ever a bind parameter of `to_regclass`.

use crate::error::describe;
use crate::PgError;
use pgcache_core::schema::{is_system_schema, SUPPORTED_KEY_TYPES};
use pgcache_core::sql::fingerprint;
use pgcache_core::{PkColumn, PkKind, TableSchema};
use tokio_postgres::error::SqlState;

/// The relation a name resolves to, with its fingerprint
/// (`sql::fingerprint`); a partition resolves to the root of its partition
/// tree, whose entries it shares (SPEC §3).
fn relation_sql() -> String {
    format!(
        "SELECT r.oid, n.nspname::text, r.relname::text, {} \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_class r ON r.oid = COALESCE(pg_catalog.pg_partition_root(c.oid), c.oid) \
         JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace \
         WHERE c.oid = pg_catalog.to_regclass($1::text)",
        fingerprint("r.oid")
    )
}

/// The primary-key columns: name, the base type (through any depth of
/// domains) as a quoted qualified name, its `typname` and `typtype`, whether
/// the column's collation is deterministic (NULL: none) and whether it is
/// the database's default; and whether `lower()` maps ASCII as citext keys
/// assume (it does not under, say, a Turkish locale).
const PRIMARY_KEY: &str = "WITH RECURSIVE col AS ( \
       SELECT a.attname::text AS name, a.atttypid AS typ, a.attcollation AS coll, 0 AS depth \
       FROM pg_catalog.pg_index i \
       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
       WHERE i.indrelid = $1 AND i.indisprimary \
     UNION ALL \
       SELECT col.name, t.typbasetype, col.coll, col.depth + 1 \
       FROM col JOIN pg_catalog.pg_type t ON t.oid = col.typ \
       WHERE t.typtype = 'd' AND col.depth < 64) \
     SELECT col.name, pg_catalog.format('%I.%I', tn.nspname, t.typname), t.typname::text, t.typtype::text, \
            co.collisdeterministic, col.coll IN (0, 100), \
            pg_catalog.lower('ABCDEFGHIJKLMNOPQRSTUVWXYZ') = 'abcdefghijklmnopqrstuvwxyz' \
     FROM col \
     JOIN pg_catalog.pg_type t ON t.oid = col.typ AND t.typtype <> 'd' \
     JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace \
     LEFT JOIN pg_catalog.pg_collation co ON co.oid = col.coll";

pub(crate) async fn resolve(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<TableSchema, PgError> {
    let rel = client
        .query_opt(&relation_sql(), &[&name])
        .await
        .map_err(|e| {
            match e.code() {
                Some(c)
                    if *c == SqlState::INVALID_NAME
                        || *c == SqlState::SYNTAX_ERROR
                        || *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                        || *c == SqlState::INVALID_PARAMETER_VALUE =>
                {
                    PgError::BadTableName(name.to_owned(), describe(&e))
                }
                // e.g. a cross-database reference `db.schema.table`
                Some(c)
                    if *c == SqlState::FEATURE_NOT_SUPPORTED
                        || *c == SqlState::UNDEFINED_SCHEMA =>
                {
                    PgError::BadTableName(name.to_owned(), describe(&e))
                }
                _ if e.as_db_error().is_none() => PgError::Unavailable(describe(&e)),
                _ => PgError::Query {
                    table: name.to_owned(),
                    message: describe(&e),
                    schema_changed: false,
                },
            }
        })?;
    let Some(rel) = rel else {
        return Err(PgError::UnknownTable(name.to_owned()));
    };
    let oid: u32 = rel.get(0);
    let schema: String = rel.get(1);
    let relname: String = rel.get(2);
    let table_fingerprint: Option<String> = rel.get(3);
    let key_name = pgcache_core::schema::key_name(&schema, &relname);
    if is_system_schema(&schema) {
        return Err(PgError::SystemCatalog(format!("{schema}.{relname}")));
    }
    let rows = client
        .query(PRIMARY_KEY, &[&oid])
        .await
        .map_err(|e| PgError::query(name, e))?;
    if rows.is_empty() {
        return Err(PgError::NoPrimaryKey(key_name));
    }
    let mut pk = Vec::with_capacity(rows.len());
    for r in &rows {
        let column: String = r.get(0);
        let typname: String = r.get(2);
        let typtype: String = r.get(3);
        let deterministic: Option<bool> = r.get(4);
        let default_collation: bool = r.get(5);
        let ascii_lower: bool = r.get(6);
        let refuse = |reason: String| PgError::UnsupportedKey {
            table: key_name.clone(),
            column: column.clone(),
            reason,
        };
        let Some(kind) = PkKind::from_type(&typname, &typtype) else {
            return Err(refuse(format!(
                "has type {typname}, which pgcache cannot key on (supported: {SUPPORTED_KEY_TYPES})"
            )));
        };
        if kind.collatable() && deterministic == Some(false) {
            return Err(refuse(
                "uses a nondeterministic collation: pgcache cannot reproduce its comparison of keys"
                    .into(),
            ));
        }
        if kind == PkKind::Citext && !(default_collation && ascii_lower) {
            return Err(refuse(
                "is citext under a collation whose lower() pgcache cannot reproduce (it needs the default collation, lower-casing ASCII as usual)"
                    .into(),
            ));
        }
        pk.push(PkColumn {
            name: column,
            type_sql: r.get(1),
            kind,
        });
    }
    let mut table = TableSchema::new(oid, &schema, &relname, pk);
    table.fingerprint = table_fingerprint.unwrap_or_default();
    Ok(table)
}

/// The tables' fingerprints now (`sql::fingerprint`), NULL for a table that
/// is gone.
pub(crate) async fn fingerprints(
    client: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<Vec<(u32, Option<String>)>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT o.oid, {} FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS o(oid)",
        fingerprint("o.oid")
    );
    let rows = client.query(&sql, &[&oids]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
