//! Table metadata from PostgreSQL's catalog. The user's table text is only
//! ever a bind parameter of `to_regclass`.

use crate::error::describe;
use crate::PgError;
use pgcache_core::schema::is_system_schema;
use pgcache_core::{PkColumn, PkKind, TableSchema};
use tokio_postgres::error::SqlState;

const RELATION: &str = "SELECT c.oid, n.nspname::text, c.relname::text \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = pg_catalog.to_regclass($1::text)";

const PRIMARY_KEY: &str = "SELECT a.attname::text, pg_catalog.format('%I.%I', tn.nspname, bt.typname), bt.typname::text \
     FROM pg_catalog.pg_index i \
     JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
     JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
     JOIN pg_catalog.pg_namespace tn ON tn.oid = bt.typnamespace \
     WHERE i.indrelid = $1 AND i.indisprimary";

pub(crate) async fn resolve(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<TableSchema, PgError> {
    let rel = client.query_opt(RELATION, &[&name]).await.map_err(|e| {
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
                if *c == SqlState::FEATURE_NOT_SUPPORTED || *c == SqlState::UNDEFINED_SCHEMA =>
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
    if is_system_schema(&schema) {
        return Err(PgError::SystemCatalog(format!("{schema}.{relname}")));
    }
    let rows = client
        .query(PRIMARY_KEY, &[&oid])
        .await
        .map_err(|e| PgError::query(name, e))?;
    if rows.is_empty() {
        return Err(PgError::NoPrimaryKey(pgcache_core::schema::key_name(
            &schema, &relname,
        )));
    }
    let pk = rows
        .iter()
        .map(|r| {
            let typname: String = r.get(2);
            PkColumn {
                name: r.get(0),
                type_sql: r.get(1),
                kind: PkKind::from_type_name(&typname),
            }
        })
        .collect();
    Ok(TableSchema::new(oid, &schema, &relname, pk))
}
