//! Event payloads published on `events_channel`.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Hit,
    Miss,
    Write,
    Invalidate,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Hit => "cache_hit",
            EventType::Miss => "cache_miss",
            EventType::Write => "cache_write",
            EventType::Invalidate => "cache_invalidate",
        }
    }
}

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Command,
    Notify,
    Flush,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Command => "command",
            Source::Notify => "notify",
            Source::Flush => "flush",
        }
    }
}

/// `{"type":..,"table":..,"key":{..},"timestamp":..}`; `key_json` is a
/// canonical pk (already JSON). Invalidations carry `source` (and the
/// trigger's `operation`).
pub fn event_json(
    ty: EventType,
    table_json: &str,
    key_json: &str,
    timestamp: f64,
    source: Option<(Source, Option<&str>)>,
) -> String {
    let mut out = String::with_capacity(96 + table_json.len() + key_json.len());
    out.push_str("{\"type\":\"");
    out.push_str(ty.as_str());
    out.push_str("\",\"table\":");
    out.push_str(table_json);
    out.push_str(",\"key\":");
    out.push_str(key_json);
    // Seconds with six decimals, formatted as integers (float formatting
    // costs more than the rest of the event on the hit path).
    let micros = (timestamp.max(0.0) * 1e6).round() as u64;
    let _ = write!(
        out,
        ",\"timestamp\":{}.{:06}",
        micros / 1_000_000,
        micros % 1_000_000
    );
    if let Some((source, operation)) = source {
        let _ = write!(out, ",\"source\":\"{}\"", source.as_str());
        if let Some(op) = operation {
            let _ = write!(
                out,
                ",\"operation\":{}",
                serde_json::Value::String(op.to_owned())
            );
        }
    }
    out.push('}');
    out
}

/// A table name as a JSON string, computed once per table.
pub fn table_json(key_name: &str) -> String {
    serde_json::Value::String(key_name.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_with_the_spec_fields() {
        let s = event_json(
            EventType::Hit,
            &table_json("users"),
            r#"{"id":1}"#,
            1700000000.25,
            None,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["type"], "cache_hit");
        assert_eq!(v["table"], "users");
        assert_eq!(v["key"]["id"], 1);
        assert_eq!(v["timestamp"].as_f64().unwrap(), 1700000000.25);
        assert!(s.contains(r#""timestamp":1700000000.250000"#), "{s}");
        assert!(v.get("source").is_none());
        let s = event_json(
            EventType::Invalidate,
            &table_json("a\"b"),
            r#"{"id":1}"#,
            1.0,
            Some((Source::Notify, Some("UPDATE"))),
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["table"], "a\"b");
        assert_eq!(v["source"], "notify");
        assert_eq!(v["operation"], "UPDATE");
    }
}
