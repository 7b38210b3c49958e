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
    Replication,
    Flush,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Command => "command",
            Source::Notify => "notify",
            Source::Replication => "replication",
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
    let (mut secs, mut frac) = (micros / 1_000_000, (micros % 1_000_000) as u32);
    // u64::MAX microseconds has 14 digits of seconds.
    let mut buf = [b'0'; FIELD.len() + 24];
    let mut i = buf.len();
    // Two digits at a time: half the divisions.
    fn pair(buf: &mut [u8], i: &mut usize, d: usize) {
        *i -= 2;
        buf[*i..*i + 2].copy_from_slice(&DIGIT_PAIRS[2 * d..2 * d + 2]);
    }
    for _ in 0..3 {
        pair(&mut buf, &mut i, (frac % 100) as usize);
        frac /= 100;
    }
    i -= 1;
    buf[i] = b'.';
    let point = i;
    while secs >= 10 {
        pair(&mut buf, &mut i, (secs % 100) as usize);
        secs /= 100;
    }
    // The last digit, or the 0 of fewer than 1 second.
    if secs > 0 || i == point {
        i -= 1;
        buf[i] = b'0' + secs as u8;
    }
    i -= FIELD.len();
    buf[i..i + FIELD.len()].copy_from_slice(FIELD);
    out.extend_from_slice(&buf[i..]);
}

/// "00" to "99".
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

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
            (9.5, "9.500000"),
            (10.0, "10.000000"),
            (99.0, "99.000000"),
            (100.25, "100.250000"),
            (1000.0, "1000.000000"),
            (123456789.000001, "123456789.000001"),
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
        // The digits agree with the formatting machinery.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let micros = x >> (x % 40 + 10);
            let mut out = Vec::new();
            push_timestamp(&mut out, micros as f64 / 1e6);
            let m = ((micros as f64 / 1e6) * 1e6).round() as u64;
            let want = format!(",\"timestamp\":{}.{:06}", m / 1_000_000, m % 1_000_000);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{micros}");
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
