//! Event payloads published on `events_channel`.

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
    let mut out = Vec::with_capacity(96 + table_json.len() + key_json.len());
    push_event_json(
        &mut out,
        ty,
        table_json,
        key_json.as_bytes(),
        timestamp,
        source,
    );
    // Only UTF-8 text and ASCII were appended.
    String::from_utf8(out).unwrap_or_default()
}

/// `event_json` appended to `out` as bytes (the hit path reuses one buffer);
/// `key_json` is UTF-8 text.
pub fn push_event_json(
    out: &mut Vec<u8>,
    ty: EventType,
    table_json: &str,
    key_json: &[u8],
    timestamp: f64,
    source: Option<(Source, Option<&str>)>,
) {
    out.extend_from_slice(match ty {
        EventType::Hit => b"{\"type\":\"cache_hit\",\"table\":",
        EventType::Miss => b"{\"type\":\"cache_miss\",\"table\":",
        EventType::Write => b"{\"type\":\"cache_write\",\"table\":",
        EventType::Invalidate => b"{\"type\":\"cache_invalidate\",\"table\":",
    });
    out.extend_from_slice(table_json.as_bytes());
    out.extend_from_slice(b",\"key\":");
    out.extend_from_slice(key_json);
    push_timestamp(out, timestamp);
    if let Some((source, operation)) = source {
        out.extend_from_slice(b",\"source\":\"");
        out.extend_from_slice(source.as_str().as_bytes());
        out.push(b'"');
        if let Some(op) = operation {
            out.extend_from_slice(b",\"operation\":");
            out.extend_from_slice(
                serde_json::Value::String(op.to_owned())
                    .to_string()
                    .as_bytes(),
            );
        }
    }
    out.push(b'}');
}

/// `,"timestamp":` and the seconds with six decimals, digits written by
/// hand (the formatting machinery costs more than the rest of the event).
fn push_timestamp(out: &mut Vec<u8>, timestamp: f64) {
    const FIELD: &[u8] = b",\"timestamp\":";
    let micros = (timestamp.max(0.0) * 1e6).round() as u64;
    // u64::MAX microseconds has 14 digits of seconds.
    let mut buf = [b'0'; FIELD.len() + 24];
    let mut i = buf.len();
    let mut n = micros;
    for _ in 0..6 {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    i -= 1;
    buf[i] = b'.';
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    i -= FIELD.len();
    buf[i..i + FIELD.len()].copy_from_slice(FIELD);
    out.extend_from_slice(&buf[i..]);
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
        for (t, text) in [
            (0.0, "0.000000"),
            (1.000001, "1.000001"),
            (12.00012, "12.000120"),
            (1700000000.999999, "1700000000.999999"),
            (-3.0, "0.000000"),
            (f64::MAX, "18446744073709.551615"),
        ] {
            let s = event_json(EventType::Miss, "\"t\"", "{}", t, None);
            assert!(s.contains(&format!("\"timestamp\":{text}}}")), "{t}: {s}");
        }
        for ty in [
            EventType::Hit,
            EventType::Miss,
            EventType::Write,
            EventType::Invalidate,
        ] {
            let v: serde_json::Value =
                serde_json::from_str(&event_json(ty, "\"t\"", "{}", 1.0, None)).unwrap();
            assert_eq!(v["type"], ty.as_str());
        }
        let mut reused = b"left over".to_vec();
        reused.clear();
        push_event_json(
            &mut reused,
            EventType::Write,
            "\"t\"",
            br#"{"id":2}"#,
            5.5,
            Some((Source::Command, None)),
        );
        assert_eq!(
            String::from_utf8(reused).unwrap(),
            r#"{"type":"cache_write","table":"t","key":{"id":2},"timestamp":5.500000,"source":"command"}"#
        );
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
