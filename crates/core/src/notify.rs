//! Trigger payloads received through LISTEN/NOTIFY.
//!
//! Two shapes are understood: the seed's trigger,
//! `{"table": TG_TABLE_NAME, "operation", "old_data": row, "new_data": row}`,
//! and `sql/pgcache.sql`'s, which adds `"schema"` and sends only the
//! primary-key columns of each row. A TRUNCATE carries no rows.

use crate::key::{canonical_pk_value, CanonicalPk};
use crate::schema::TableSchema;
use crate::sql::quote_ident;
use serde_json::Value;
use thiserror::Error;

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; anything larger
/// did not come from a trigger.
pub const MAX_PAYLOAD: usize = 8000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload of {0} bytes is larger than NOTIFY allows")]
    TooLarge(usize),
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
    #[error("payload has no \"table\" string")]
    NoTable,
    #[error("payload has an unknown operation {0:?}")]
    Operation(String),
    #[error("payload row is not a JSON object")]
    Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// The table as `to_regclass` should resolve it: quoted, and qualified
    /// when the payload names its schema.
    pub table: String,
    /// The payload's `schema`, when it names one (`pgcache_watch`'s
    /// triggers do; the seed's trigger does not).
    pub schema: Option<String>,
    /// The payload's `table`, as the trigger sent it.
    pub name: String,
    pub operation: Operation,
    /// `old_data` and `new_data`, where present and not null.
    pub rows: Vec<serde_json::Map<String, Value>>,
    /// The cluster node that sent it (`table_flush_payload`), if one did.
    pub origin: Option<String>,
}

/// The payload a cluster node sends for `PGCACHE.INVALIDATE_TABLE`: a
/// TRUNCATE of the table, which every listener applies as a flush, marked
/// with the sender's node id so that it skips its own.
pub fn table_flush_payload(schema: &str, name: &str, origin: &str) -> String {
    serde_json::json!({
        "schema": schema,
        "table": name,
        "operation": "TRUNCATE",
        "origin": origin,
    })
    .to_string()
}

pub fn parse_payload(text: &str) -> Result<Payload, PayloadError> {
    if text.len() >= MAX_PAYLOAD {
        return Err(PayloadError::TooLarge(text.len()));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(PayloadError::NotJson("not an object".into()));
    };
    let Some(Value::String(name)) = obj.remove("table") else {
        return Err(PayloadError::NoTable);
    };
    if name.is_empty() {
        return Err(PayloadError::NoTable);
    }
    let schema = match obj.remove("schema") {
        Some(Value::String(schema)) => Some(schema),
        None | Some(Value::Null) => None,
        Some(_) => return Err(PayloadError::NoTable),
    };
    let table = match &schema {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&name)),
        None => quote_ident(&name),
    };
    let operation = match obj.remove("operation") {
        Some(Value::String(op)) => match op.as_str() {
            "INSERT" => Operation::Insert,
            "UPDATE" => Operation::Update,
            "DELETE" => Operation::Delete,
            "TRUNCATE" => Operation::Truncate,
            _ => return Err(PayloadError::Operation(op)),
        },
        other => return Err(PayloadError::Operation(format!("{other:?}"))),
    };
    let mut rows = Vec::new();
    for field in ["old_data", "new_data"] {
        match obj.remove(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(row)) => rows.push(row),
            Some(_) => return Err(PayloadError::Row),
        }
    }
    let origin = match obj.remove("origin") {
        Some(Value::String(origin)) => Some(origin),
        _ => None,
    };
    Ok(Payload {
        table,
        schema,
        name,
        operation,
        rows,
        origin,
    })
}

/// The canonical pks a payload's rows name (an UPDATE that changed the key
/// names two; one that did not, one). A row without the primary-key columns
/// is an error.
pub fn row_keys(
    table: &TableSchema,
    payload: &Payload,
) -> Result<Vec<CanonicalPk>, crate::KeyError> {
    let mut keys: Vec<CanonicalPk> = Vec::with_capacity(payload.rows.len());
    for row in &payload.rows {
        let pk: serde_json::Map<String, Value> = table
            .pk
            .iter()
            .filter_map(|c| row.get(&c.name).map(|v| (c.name.clone(), v.clone())))
            .collect();
        let key = canonical_pk_value(table, Value::Object(pk))?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{PkColumn, PkKind};

    fn users() -> TableSchema {
        TableSchema::new(
            1,
            "public",
            "users",
            vec![PkColumn {
                name: "id".into(),
                type_sql: "x".into(),
                kind: PkKind::Int32,
            }],
        )
    }

    #[test]
    fn table_flush_payloads_round_trip() {
        let text = table_flush_payload("app", "My\"T", "abc123");
        let p = parse_payload(&text).unwrap();
        assert_eq!(p.operation, Operation::Truncate);
        assert_eq!(p.schema.as_deref(), Some("app"));
        assert_eq!(p.name, "My\"T");
        assert_eq!(p.origin.as_deref(), Some("abc123"));
        assert!(p.rows.is_empty());
        let plain = parse_payload(r#"{"table":"users","operation":"TRUNCATE"}"#).unwrap();
        assert_eq!(plain.origin, None);
    }

    #[test]
    fn seed_payload() {
        let p = parse_payload(
            r#"{"table":"users","operation":"UPDATE","old_data":{"id":1,"name":"a"},"new_data":{"id":2,"name":"a"}}"#,
        )
        .unwrap();
        assert_eq!(p.table, "\"users\"");
        assert_eq!(p.operation, Operation::Update);
        let keys: Vec<String> = row_keys(&users(), &p)
            .unwrap()
            .into_iter()
            .map(|k| k.json)
            .collect();
        assert_eq!(keys, [r#"{"id":1}"#, r#"{"id":2}"#]);
    }

    #[test]
    fn watch_payload_with_schema_and_one_key() {
        let p = parse_payload(r#"{"schema":"app","table":"My\"T","operation":"DELETE","old_data":{"id":"7"},"new_data":null}"#).unwrap();
        assert_eq!(p.table, r#""app"."My""T""#);
        let keys = row_keys(&users(), &p).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].json, r#"{"id":7}"#);
        let same = parse_payload(
            r#"{"table":"users","operation":"UPDATE","old_data":{"id":3},"new_data":{"id":3}}"#,
        )
        .unwrap();
        assert_eq!(row_keys(&users(), &same).unwrap().len(), 1);
    }

    #[test]
    fn truncate_has_no_rows() {
        let p =
            parse_payload(r#"{"schema":"public","table":"users","operation":"TRUNCATE"}"#).unwrap();
        assert_eq!(p.operation, Operation::Truncate);
        assert!(p.rows.is_empty());
    }

    #[test]
    fn hostile_payloads_are_errors() {
        assert!(matches!(
            parse_payload(&"x".repeat(9000)),
            Err(PayloadError::TooLarge(_))
        ));
        assert!(matches!(
            parse_payload("not json"),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            parse_payload("[1]"),
            Err(PayloadError::NotJson(_))
        ));
        assert_eq!(
            parse_payload(r#"{"operation":"INSERT"}"#),
            Err(PayloadError::NoTable)
        );
        assert_eq!(
            parse_payload(r#"{"table":5,"operation":"INSERT"}"#),
            Err(PayloadError::NoTable)
        );
        assert!(matches!(
            parse_payload(r#"{"table":"t","operation":"DROP"}"#),
            Err(PayloadError::Operation(_))
        ));
        assert_eq!(
            parse_payload(r#"{"table":"t","operation":"INSERT","new_data":[1]}"#),
            Err(PayloadError::Row)
        );
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(parse_payload(&deep).is_err());
        // A row without the key columns names no key.
        let p = parse_payload(r#"{"table":"users","operation":"INSERT","new_data":{"name":"x"}}"#)
            .unwrap();
        assert!(row_keys(&users(), &p).is_err());
    }
}
