//! Cache keys: `<prefix><table>:<canonical pk>`.
//!
//! The canonical pk is compact JSON with members sorted by column name and
//! each value normalised by its column's type, so every spelling of one key
//! (`{"id":123}`, `{ "id" : "000123" }`) names one entry, and the keys that
//! invalidation derives from trigger payloads meet the keys reads wrote.

use crate::keytypes::{self, Numeric};
use crate::schema::{PkKind, TableSchema};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use thiserror::Error;

/// The value stored for a row that does not exist (`negative_ttl`): rows are
/// JSON objects, so an empty string can never be a row.
pub const NEGATIVE_MARKER: &[u8] = b"";

/// A pk argument that does not name exactly one row of the table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid JSON in primary key for table '{table}': {reason}")]
    Json { table: String, reason: String },
    #[error("primary key for table '{table}' must be a JSON object with exactly the primary-key columns: {columns}")]
    NotObject { table: String, columns: String },
    #[error("primary key for table '{table}' must have exactly the primary-key columns ({columns}); {problem}")]
    Members {
        table: String,
        columns: String,
        problem: String,
    },
    #[error("invalid value for primary-key column '{column}' of table '{table}': {reason}")]
    Value {
        table: String,
        column: String,
        reason: String,
    },
}

/// A pk in canonical form, with its values as text for bind parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPk {
    /// Compact JSON, members sorted by column name.
    pub json: String,
    /// One text value per primary-key column, in `TableSchema::pk` order.
    pub params: Vec<String>,
}

/// The cache key of a canonical pk (JSON text):
/// `<prefix><table>:<canonical pk>`.
pub fn cache_key(prefix: &str, table: &TableSchema, canonical_pk: &str) -> String {
    let mut key = Vec::with_capacity(prefix.len() + table.key_name.len() + 1 + canonical_pk.len());
    push_key_start(&mut key, prefix, table);
    key.extend_from_slice(canonical_pk.as_bytes());
    // Only UTF-8 pieces were joined.
    String::from_utf8(key).unwrap_or_default()
}

/// Appends what precedes the pk in a cache key: `<prefix><table>:`.
pub fn push_key_start(out: &mut Vec<u8>, prefix: &str, table: &TableSchema) {
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(table.key_name.as_bytes());
    out.push(b':');
}

/// Parses a pk argument (JSON text) and canonicalises it for `table`.
pub fn canonical_pk(table: &TableSchema, raw: &[u8]) -> Result<CanonicalPk, KeyError> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| KeyError::Json {
        table: table.key_name.clone(),
        reason: e.to_string(),
    })?;
    canonical_pk_value(table, value)
}

/// Canonicalises a pk already parsed as JSON (a MULTIREAD element, a
/// trigger payload's row).
pub fn canonical_pk_value(table: &TableSchema, value: Value) -> Result<CanonicalPk, KeyError> {
    let Value::Object(map) = value else {
        return Err(KeyError::NotObject {
            table: table.key_name.clone(),
            columns: table.pk_names(),
        });
    };
    // serde_json's map keeps insertion order here; sort by byte order.
    let members: BTreeMap<String, Value> = map.into_iter().collect();
    let members_err = |problem: String| KeyError::Members {
        table: table.key_name.clone(),
        columns: table.pk_names(),
        problem,
    };
    if let Some(extra) = members
        .keys()
        .find(|k| !table.pk.iter().any(|c| &c.name == *k))
    {
        return Err(members_err(format!("'{extra}' is not one of them")));
    }
    let mut json = String::with_capacity(16 * table.pk.len());
    let mut params = Vec::with_capacity(table.pk.len());
    json.push('{');
    for (i, col) in table.pk.iter().enumerate() {
        let Some(v) = members.get(&col.name) else {
            return Err(members_err(format!("'{}' is missing", col.name)));
        };
        let (rendered, param) = normalise(col.kind, v).map_err(|reason| KeyError::Value {
            table: table.key_name.clone(),
            column: col.name.clone(),
            reason,
        })?;
        if i > 0 {
            json.push(',');
        }
        push_json_string(&mut json, &col.name);
        json.push(':');
        json.push_str(&rendered);
        params.push(param);
    }
    json.push('}');
    Ok(CanonicalPk { json, params })
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json escapes minimally and leaves non-ASCII as UTF-8.
    let _ = write!(out, "{}", Value::String(s.to_owned()));
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    out
}

/// Returns (canonical JSON rendering, text parameter).
fn normalise(kind: PkKind, v: &Value) -> Result<(String, String), String> {
    if v.is_null() {
        return Err("must not be null".into());
    }
    if v.is_object() || v.is_array() {
        return Err("must be a scalar, not an object or array".into());
    }
    match kind {
        PkKind::Int16 => int_value(v, i16::MIN as i64, i16::MAX as i64, "smallint"),
        PkKind::Int32 => int_value(v, i32::MIN as i64, i32::MAX as i64, "integer"),
        PkKind::Int64 => int_value(v, i64::MIN, i64::MAX, "bigint"),
        PkKind::Text => {
            let s = scalar_text(v)?;
            Ok((json_string(&s), s))
        }
        PkKind::Bpchar => {
            let s = scalar_text(v)?;
            let s = s.trim_end_matches(' ').to_owned();
            Ok((json_string(&s), s))
        }
        PkKind::Uuid => {
            let Value::String(s) = v else {
                return Err("expected a uuid string".into());
            };
            let u = parse_uuid(s).ok_or_else(|| format!("'{}' is not a uuid", clip(s)))?;
            Ok((json_string(&u), u))
        }
        PkKind::Bool => {
            let b = match v {
                Value::Bool(b) => *b,
                Value::String(s) => {
                    parse_bool(s).ok_or_else(|| format!("'{}' is not a boolean", clip(s)))?
                }
                _ => return Err("expected a boolean".into()),
            };
            Ok((b.to_string(), b.to_string()))
        }
        PkKind::Numeric => {
            let parsed = match v {
                Value::Number(n) => keytypes::parse_numeric(&n.to_string(), false)?,
                Value::String(s) => keytypes::parse_numeric(s, true)?,
                _ => return Err("expected a number (numeric)".into()),
            };
            Ok(match parsed {
                Numeric::Finite(t) => (t.clone(), t),
                Numeric::Special(t) => (json_string(t), t.to_owned()),
            })
        }
        PkKind::Name => {
            let s = scalar_text(v)?;
            if s.len() > keytypes::MAX_NAME_BYTES {
                return Err(format!(
                    "'{}...' is longer than the {} bytes a name holds",
                    clip(&s),
                    keytypes::MAX_NAME_BYTES
                ));
            }
            Ok((json_string(&s), s))
        }
        PkKind::Citext => {
            let s = keytypes::citext_key(&scalar_text(v)?)?;
            Ok((json_string(&s), s))
        }
        PkKind::Date => text_kind(v, "a date string (YYYY-MM-DD)", keytypes::parse_date),
        PkKind::Timestamp => text_kind(
            v,
            "a timestamp string (YYYY-MM-DD HH:MM:SS)",
            keytypes::parse_timestamp,
        ),
        PkKind::Timestamptz => text_kind(
            v,
            "a timestamptz string with an offset (YYYY-MM-DD HH:MM:SS+00:00)",
            keytypes::parse_timestamptz,
        ),
    }
}

/// A kind whose values are JSON strings only, canonicalised by `parse`.
fn text_kind(
    v: &Value,
    expected: &str,
    parse: fn(&str) -> Result<String, String>,
) -> Result<(String, String), String> {
    let Value::String(s) = v else {
        return Err(format!("expected {expected}"));
    };
    let t = parse(s)?;
    Ok((json_string(&t), t))
}

use keytypes::clip;

fn scalar_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err("expected a string".into()),
    }
}

fn int_value(v: &Value, min: i64, max: i64, ty: &str) -> Result<(String, String), String> {
    let n = match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not a valid {ty} (out of range or not an integer)"))?,
        Value::String(s) => {
            parse_pg_int(s).ok_or_else(|| format!("'{}' is not a valid {ty}", clip(s)))?
        }
        _ => return Err(format!("expected an integer ({ty})")),
    };
    if n < min || n > max {
        return Err(format!("{n} is out of range for type {ty}"));
    }
    Ok((n.to_string(), n.to_string()))
}

/// Reads an integer the way PostgreSQL's integer input does: surrounding
/// whitespace, an optional sign, decimal digits (leading zeros allowed).
pub(crate) fn parse_pg_int(s: &str) -> Option<i64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    if digits.len() > 19 {
        return None;
    }
    let magnitude: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let n = if neg { -magnitude } else { magnitude };
    i64::try_from(n).ok()
}

/// Accepts what PostgreSQL's uuid input accepts (braces, hyphens between
/// groups, any case) and renders the standard lower-case form.
pub(crate) fn parse_uuid(s: &str) -> Option<String> {
    let t = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(s);
    let hex: String = t.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32
        || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        || t.starts_with('-')
        || t.ends_with('-')
        || t.contains("--")
    {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::test_table;

    fn table(cols: &[(&str, PkKind)]) -> TableSchema {
        test_table("users", cols)
    }

    fn canon(t: &TableSchema, raw: &str) -> Result<String, KeyError> {
        canonical_pk(t, raw.as_bytes()).map(|c| c.json)
    }

    #[test]
    fn integer_spellings_meet() {
        let t = table(&[("id", PkKind::Int32)]);
        for raw in [
            r#"{"id":123}"#,
            r#"{ "id" : 123 }"#,
            r#"{"id":"123"}"#,
            r#"{"id":"000123"}"#,
            r#"{"id":" +123 "}"#,
        ] {
            assert_eq!(canon(&t, raw).unwrap(), r#"{"id":123}"#, "{raw}");
        }
        let c = canonical_pk(&t, br#"{"id":"-0"}"#).unwrap(); // a string: PostgreSQL reads it as 0
        assert_eq!(c.json, r#"{"id":0}"#);
        assert_eq!(c.params, ["0"]);
    }

    #[test]
    fn integer_range_and_junk() {
        let t = table(&[("id", PkKind::Int16)]);
        assert!(canon(&t, r#"{"id":32767}"#).is_ok());
        let e = canon(&t, r#"{"id":32768}"#).unwrap_err().to_string();
        assert!(e.contains("'id'") && e.contains("out of range"), "{e}");
        for raw in [
            r#"{"id":1.5}"#,
            r#"{"id":"12a"}"#,
            r#"{"id":""}"#,
            r#"{"id":true}"#,
            r#"{"id":null}"#,
            r#"{"id":[1]}"#,
            r#"{"id":"1e3"}"#,
        ] {
            assert!(
                matches!(canon(&t, raw), Err(KeyError::Value { .. })),
                "{raw}"
            );
        }
        let big = table(&[("id", PkKind::Int64)]);
        assert_eq!(
            canon(&big, r#"{"id":"-9223372036854775808"}"#).unwrap(),
            r#"{"id":-9223372036854775808}"#
        );
        assert!(canon(&big, r#"{"id":"9223372036854775808"}"#).is_err());
    }

    #[test]
    fn members_sorted_and_exact() {
        let t = table(&[("product_id", PkKind::Int32), ("category", PkKind::Text)]);
        assert_eq!(
            canon(&t, r#"{"product_id":"7","category":"électronique"}"#).unwrap(),
            r#"{"category":"électronique","product_id":7}"#
        );
        let missing = canon(&t, r#"{"category":"x"}"#).unwrap_err().to_string();
        assert!(
            missing.contains("category, product_id") && missing.contains("product_id' is missing"),
            "{missing}"
        );
        let extra = canon(&t, r#"{"category":"x","product_id":1,"name":"y"}"#)
            .unwrap_err()
            .to_string();
        assert!(extra.contains("'name' is not one of them"), "{extra}");
        assert!(matches!(canon(&t, "[1]"), Err(KeyError::NotObject { .. })));
        assert!(matches!(canon(&t, "{bad"), Err(KeyError::Json { .. })));
    }

    #[test]
    fn strings_escape_minimally() {
        let t = table(&[("k", PkKind::Text)]);
        assert_eq!(
            canon(&t, r#"{"k":"a\"b\\c\u00e9\n"}"#).unwrap(),
            "{\"k\":\"a\\\"b\\\\cé\\n\"}"
        );
        assert_eq!(canon(&t, r#"{"k":5}"#).unwrap(), r#"{"k":"5"}"#);
        let b = table(&[("k", PkKind::Bpchar)]);
        assert_eq!(canon(&b, r#"{"k":"ab   "}"#).unwrap(), r#"{"k":"ab"}"#);
    }

    #[test]
    fn uuids_case_blind() {
        let t = table(&[("u", PkKind::Uuid)]);
        let want = r#"{"u":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}"#;
        for raw in [
            r#"{"u":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}"#,
            r#"{"u":"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"}"#,
            r#"{"u":"a0eebc999c0b4ef8bb6d6bb9bd380a11"}"#,
        ] {
            assert_eq!(canon(&t, raw).unwrap(), want, "{raw}");
        }
        assert!(canon(&t, r#"{"u":"not-a-uuid"}"#).is_err());
        assert!(canon(&t, r#"{"u":12}"#).is_err());
    }

    #[test]
    fn bools_and_numerics() {
        let t = table(&[("b", PkKind::Bool), ("n", PkKind::Numeric)]);
        assert_eq!(
            canon(&t, r#"{"n":1.50,"b":"yes"}"#).unwrap(),
            r#"{"b":true,"n":1.5}"#
        );
        for n in ["19.9", "19.90", "\"19.9\"", "1.99e1", "\" 19.900 \""] {
            let raw = format!(r#"{{"b":false,"n":{n}}}"#);
            let pk = canonical_pk(&t, raw.as_bytes()).unwrap();
            assert_eq!(pk.json, r#"{"b":false,"n":19.9}"#, "{raw}");
            assert_eq!(pk.params, ["false", "19.9"]);
        }
        // Never through a float.
        let big = canon(&t, r#"{"b":true,"n":12345678901234567890123}"#).unwrap();
        assert_eq!(big, r#"{"b":true,"n":12345678901234567890123}"#);
        assert_ne!(
            big,
            canon(&t, r#"{"b":true,"n":12345678901234567890124}"#).unwrap()
        );
        assert_eq!(
            canon(&t, r#"{"b":true,"n":"nan"}"#).unwrap(),
            r#"{"b":true,"n":"NaN"}"#
        );
        let e = canon(&t, r#"{"b":true,"n":"x"}"#).unwrap_err().to_string();
        assert!(e.contains("'n'") && e.contains("numeric"), "{e}");
    }

    #[test]
    fn dates_times_and_text_kinds() {
        let t = table(&[
            ("d", PkKind::Date),
            ("ts", PkKind::Timestamp),
            ("tz", PkKind::Timestamptz),
        ]);
        assert_eq!(
            canon(
                &t,
                r#"{"tz":"2026-01-15 11:30:00+02","ts":"2026-01-15 09:30:00.50","d":"2026-1-5"}"#
            )
            .unwrap(),
            r#"{"d":"2026-01-05","ts":"2026-01-15T09:30:00.5","tz":"2026-01-15T09:30:00+00:00"}"#
        );
        let e = canon(
            &t,
            r#"{"tz":"2026-01-15 11:30:00","ts":"2026-01-15","d":"2026-01-05"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'tz'") && e.contains("offset"), "{e}");
        let e = canon(&t, r#"{"tz":"2026-01-15Z","ts":"2026-01-15","d":20260105}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'d'") && e.contains("YYYY-MM-DD"), "{e}");
        let c = table(&[("c", PkKind::Citext), ("n", PkKind::Name)]);
        assert_eq!(
            canon(&c, r#"{"c":"ABC","n":"X"}"#).unwrap(),
            r#"{"c":"abc","n":"X"}"#
        );
        assert!(canon(&c, r#"{"c":"Ünï","n":"x"}"#)
            .unwrap_err()
            .to_string()
            .contains("ASCII"));
        let long = "x".repeat(64);
        assert!(canon(&c, &format!(r#"{{"c":"a","n":"{long}"}}"#))
            .unwrap_err()
            .to_string()
            .contains("63 bytes"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let t = table(&[("id", PkKind::Int32)]);
        let deep = "[".repeat(100_000);
        assert!(matches!(canon(&t, &deep), Err(KeyError::Json { .. })));
    }

    #[test]
    fn key_format() {
        let t = table(&[("id", PkKind::Int32)]);
        let pk = canonical_pk(&t, br#"{"id":"7"}"#).unwrap();
        assert_eq!(
            cache_key("pg_cache:", &t, &pk.json),
            r#"pg_cache:users:{"id":7}"#
        );
    }
}
