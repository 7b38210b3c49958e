//! The hit path's canonicaliser: writes the canonical pk of a flat JSON
//! object straight into the cache-key buffer, without building a JSON tree.
//!
//! It handles what clients send in practice (a flat object of numbers,
//! strings without escapes, booleans) and defers everything else to
//! `key::canonical_pk`, which produces the same text or the error. The two
//! agree on every input (see the tests and the fuzz target).

use crate::key::{self, KeyError};
use crate::keytypes;
use crate::schema::{PkColumn, PkKind, TableSchema};

/// Most primary keys have one to three columns.
const MAX_MEMBERS: usize = 8;

#[derive(Clone, Copy)]
enum Token<'a> {
    /// The bytes between the quotes: no backslash or control character, not
    /// yet checked to be UTF-8 (only the values that are used are).
    Str(&'a [u8]),
    /// A JSON integer, `-?(0|[1-9][0-9]*)`: already its canonical text.
    Int(&'a [u8]),
    Bool(bool),
}

/// Scans bytes: the input is not checked to be UTF-8 as a whole. Outside
/// string tokens only ASCII is accepted, so an input whose used string
/// tokens are UTF-8 (names equal to column names, checked values) is UTF-8.
struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn eat(&mut self, b: u8) -> Option<()> {
        self.ws();
        (self.s.get(self.i) == Some(&b)).then(|| self.i += 1)
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(&self.s[start..self.i - 1]);
                }
                b'\\' | 0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
        None
    }
    fn value(&mut self) -> Option<Token<'a>> {
        self.ws();
        match *self.s.get(self.i)? {
            b'"' => self.string().map(Token::Str),
            b't' if self.s[self.i..].starts_with(b"true") => {
                self.i += 4;
                Some(Token::Bool(true))
            }
            b'f' if self.s[self.i..].starts_with(b"false") => {
                self.i += 5;
                Some(Token::Bool(false))
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                if self.s[self.i] == b'-' {
                    self.i += 1;
                }
                let digits = self.i;
                while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                    self.i += 1;
                }
                let n = self.i - digits;
                // serde_json reads `-0` as a float: let the full parser decide.
                let minus_zero = digits > start && n == 1 && self.s[digits] == b'0';
                if n == 0 || (n > 1 && self.s[digits] == b'0') || minus_zero {
                    return None;
                }
                // A fraction or exponent: leave it to the full parser.
                if matches!(self.s.get(self.i), Some(b'.' | b'e' | b'E')) {
                    return None;
                }
                Some(Token::Int(&self.s[start..self.i]))
            }
            _ => None,
        }
    }
}

/// A member's name (not yet checked to be UTF-8) and value.
type Member<'a> = (&'a [u8], Token<'a>);

/// Scans `{"name": value, ...}`; `None` when the input needs the full parser.
fn scan(raw: &[u8]) -> Option<([Member<'_>; MAX_MEMBERS], usize)> {
    let mut sc = Scanner { s: raw, i: 0 };
    let mut members: [Member<'_>; MAX_MEMBERS] = [(b"", Token::Bool(false)); MAX_MEMBERS];
    let mut n = 0;
    sc.eat(b'{')?;
    sc.ws();
    if sc.s.get(sc.i) == Some(&b'}') {
        return None;
    }
    loop {
        if n == MAX_MEMBERS {
            return None;
        }
        let name = sc.string()?;
        sc.eat(b':')?;
        members[n] = (name, sc.value()?);
        n += 1;
        sc.ws();
        match sc.s.get(sc.i)? {
            b',' => sc.i += 1,
            b'}' => {
                sc.i += 1;
                break;
            }
            _ => return None,
        }
    }
    sc.ws();
    (sc.i == sc.s.len()).then_some((members, n))
}

fn in_range(n: i64, kind: PkKind) -> bool {
    match kind {
        PkKind::Int16 => i16::try_from(n).is_ok(),
        PkKind::Int32 => i32::try_from(n).is_ok(),
        _ => true,
    }
}

/// The value of a JSON integer token (`-?[0-9]+`), if it fits an i64.
fn parse_int(t: &[u8]) -> Option<i64> {
    let (neg, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, t),
    };
    // Accumulated negative, so that i64::MIN fits.
    let mut n: i64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)?
            .checked_sub(i64::from(d.wrapping_sub(b'0')))?;
    }
    if neg {
        Some(n)
    } else {
        n.checked_neg()
    }
}

/// Appends the decimal text of `n` (what `n.to_string()` gives, without
/// the formatting machinery).
pub fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// Appends the decimal text of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `"name":value` for one column; `None` means "ask the full parser".
fn push_member(out: &mut Vec<u8>, col: &PkColumn, tok: Token<'_>) -> Option<()> {
    out.push(b'"');
    out.extend_from_slice(col.name.as_bytes());
    out.extend_from_slice(b"\":");
    match (col.kind, tok) {
        (PkKind::Int16 | PkKind::Int32 | PkKind::Int64, Token::Int(t)) => {
            // `t` has no sign but `-`, no leading zero and is not `-0`: it is
            // the canonical text when it is in range.
            if !in_range(parse_int(t)?, col.kind) {
                return None;
            }
            out.extend_from_slice(t);
        }
        (PkKind::Int16 | PkKind::Int32 | PkKind::Int64, Token::Str(s)) => {
            let n = key::parse_pg_int(std::str::from_utf8(s).ok()?)?;
            if !in_range(n, col.kind) {
                return None;
            }
            push_i64(out, n);
        }
        (PkKind::Numeric, Token::Int(t)) => {
            // An integer token is already a canonical numeric.
            if t.strip_prefix(b"-").unwrap_or(t).len() > keytypes::MAX_NUMERIC_LEN {
                return None;
            }
            out.extend_from_slice(t);
        }
        (PkKind::Text, Token::Str(s)) => {
            std::str::from_utf8(s).ok()?;
            out.push(b'"');
            out.extend_from_slice(s);
            out.push(b'"');
        }
        (PkKind::Name, Token::Str(s)) => {
            std::str::from_utf8(s).ok()?;
            if s.len() > keytypes::MAX_NAME_BYTES {
                return None;
            }
            out.push(b'"');
            out.extend_from_slice(s);
            out.push(b'"');
        }
        (PkKind::Citext, Token::Str(s)) => {
            if !s.is_ascii() {
                return None;
            }
            out.push(b'"');
            out.extend(s.iter().map(u8::to_ascii_lowercase));
            out.push(b'"');
        }
        (PkKind::Bpchar, Token::Str(s)) => {
            out.push(b'"');
            out.extend_from_slice(
                std::str::from_utf8(s)
                    .ok()?
                    .trim_end_matches(' ')
                    .as_bytes(),
            );
            out.push(b'"');
        }
        (PkKind::Uuid, Token::Str(s)) => {
            out.push(b'"');
            out.extend_from_slice(key::parse_uuid(std::str::from_utf8(s).ok()?)?.as_bytes());
            out.push(b'"');
        }
        (PkKind::Bool, Token::Bool(b)) => {
            out.extend_from_slice(if b { b"true" } else { b"false" });
        }
        _ => return None,
    }
    Some(())
}

/// Whether `raw` is exactly `{"<col>":<value>}`, already canonical: no
/// whitespace, and a value that renders as itself (an in-range integer
/// without leading zeros or `-0`, a string without escapes or control
/// characters that is UTF-8, or a boolean). Checked by comparing bytes in
/// place, without scanning tokens; what `fast` accepts verbatim, and no more.
/// The column name has no character JSON must escape (the caller checks).
fn is_canonical_single(col: &PkColumn, raw: &[u8]) -> bool {
    let name = col.name.as_bytes();
    let Some(value) = raw
        .strip_prefix(b"{\"")
        .and_then(|r| r.strip_prefix(name))
        .and_then(|r| r.strip_prefix(b"\":"))
        .and_then(|r| r.strip_suffix(b"}"))
    else {
        return false;
    };
    match col.kind {
        PkKind::Int16 | PkKind::Int32 | PkKind::Int64 => {
            let digits = value.strip_prefix(b"-").unwrap_or(value);
            match digits {
                [] => false,
                [b'0'] => digits.len() == value.len(),
                [b'0', ..] => false,
                _ => {
                    digits.iter().all(u8::is_ascii_digit)
                        && parse_int(value).is_some_and(|n| in_range(n, col.kind))
                }
            }
        }
        PkKind::Text => value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .is_some_and(|s| {
                !s.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20)
                    && std::str::from_utf8(s).is_ok()
            }),
        PkKind::Bool => value == b"true" || value == b"false",
        _ => false,
    }
}

/// The fast path proper; `None` means "ask the full parser". What it
/// appends is UTF-8: the structure is ASCII, names are column names and
/// string values are checked.
fn fast(out: &mut Vec<u8>, table: &TableSchema, raw: &[u8]) -> Option<()> {
    if let [col] = table.pk.as_slice() {
        if is_canonical_single(col, raw) {
            out.extend_from_slice(raw);
            return Some(());
        }
        // One column, the common case: `{"name": value}` without a member
        // table. Whatever else is accepted below is refused here too.
        let mut sc = Scanner { s: raw, i: 0 };
        sc.eat(b'{')?;
        if sc.string()? != col.name.as_bytes() {
            return None;
        }
        sc.eat(b':')?;
        let tok = sc.value()?;
        sc.eat(b'}')?;
        sc.ws();
        if sc.i != raw.len() {
            return None;
        }
        // Already canonical (`{"name":value}`, no whitespace, a value that
        // renders as itself): copied as it is.
        let verbatim = match (col.kind, tok) {
            (PkKind::Int16 | PkKind::Int32 | PkKind::Int64, Token::Int(t)) => {
                in_range(parse_int(t)?, col.kind).then_some(t.len())
            }
            (PkKind::Text, Token::Str(s)) => {
                std::str::from_utf8(s).ok()?;
                Some(s.len() + 2)
            }
            (PkKind::Bool, Token::Bool(b)) => Some(if b { 4 } else { 5 }),
            _ => None,
        };
        if verbatim.is_some_and(|n| n + col.name.len() + 5 == raw.len()) {
            out.extend_from_slice(raw);
            return Some(());
        }
        out.push(b'{');
        push_member(out, col, tok)?;
        out.push(b'}');
        return Some(());
    }
    let (members, n) = scan(raw)?;
    let members = &members[..n];
    if n != table.pk.len() {
        return None;
    }
    out.push(b'{');
    for (ci, col) in table.pk.iter().enumerate() {
        let name = col.name.as_bytes();
        let mut found = members.iter().filter(|(m, _)| *m == name);
        let (_, tok) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        if ci > 0 {
            out.push(b',');
        }
        push_member(out, col, *tok)?;
    }
    out.push(b'}');
    Some(())
}

/// Appends the canonical pk of `raw` to `out` (which already holds the key's
/// prefix) as UTF-8 bytes. On error `out` is left as it was.
pub fn push_canonical_pk_bytes(
    out: &mut Vec<u8>,
    table: &TableSchema,
    raw: &[u8],
) -> Result<(), KeyError> {
    let mark = out.len();
    // Column names with characters JSON must escape take the full path.
    let simple_names = table
        .pk
        .iter()
        .all(|c| !c.name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
    if simple_names && fast(out, table, raw).is_some() {
        return Ok(());
    }
    out.truncate(mark);
    let pk = key::canonical_pk(table, raw)?;
    out.extend_from_slice(pk.json.as_bytes());
    Ok(())
}

/// `push_canonical_pk_bytes` for a `String`.
pub fn push_canonical_pk(
    out: &mut String,
    table: &TableSchema,
    raw: &[u8],
) -> Result<(), KeyError> {
    let mut bytes = std::mem::take(out).into_bytes();
    let result = push_canonical_pk_bytes(&mut bytes, table, raw);
    // Always UTF-8 (see `fast`); were it not, the replacement characters
    // would make the text disagree with the full parser (the tests and the
    // fuzz target compare them).
    *out = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::test_table;

    fn table(cols: &[(&str, PkKind)]) -> TableSchema {
        test_table("t", cols)
    }

    /// The fast path must agree with the full parser, answer for answer.
    fn agree(t: &TableSchema, raw: &str) {
        agree_bytes(t, raw.as_bytes())
    }

    fn agree_bytes(t: &TableSchema, raw: &[u8]) {
        let slow = key::canonical_pk(t, raw).map(|c| c.json);
        let mut out = String::from("p:");
        let fast = push_canonical_pk(&mut out, t, raw).map(|_| out[2..].to_string());
        assert_eq!(fast, slow, "input {raw:?}");
        if fast.is_err() {
            assert_eq!(out, "p:");
        }
        let mut bytes = b"p:".to_vec();
        let fast = push_canonical_pk_bytes(&mut bytes, t, raw)
            .map(|_| String::from_utf8(bytes[2..].to_vec()).expect("UTF-8"));
        assert_eq!(fast, slow, "input {raw:?} (bytes)");
    }

    #[test]
    fn agrees_with_full_parser() {
        let int = table(&[("id", PkKind::Int32)]);
        let small = table(&[("id", PkKind::Int16)]);
        let comp = table(&[("product_id", PkKind::Int64), ("category", PkKind::Text)]);
        let misc = table(&[
            ("u", PkKind::Uuid),
            ("b", PkKind::Bool),
            ("c", PkKind::Bpchar),
            ("o", PkKind::Text),
        ]);
        let typed = table(&[
            ("n", PkKind::Numeric),
            ("c", PkKind::Citext),
            ("m", PkKind::Name),
            ("d", PkKind::Date),
            ("ts", PkKind::Timestamp),
            ("tz", PkKind::Timestamptz),
        ]);
        let numeric = table(&[("id", PkKind::Numeric)]);
        let citext = table(&[("id", PkKind::Citext)]);
        let name = table(&[("id", PkKind::Name)]);
        let date = table(&[("id", PkKind::Date)]);
        let tz = table(&[("id", PkKind::Timestamptz)]);
        let inputs = [
            r#"{"id":123}"#,
            r#"{ "id" : 123 }"#,
            r#"{"id":"123"}"#,
            r#"{"id":"000123"}"#,
            r#"{"id":-0}"#,
            r#"{"id":0123}"#,
            r#"{"id":1.0}"#,
            r#"{"id":1e2}"#,
            r#"{"id":"1.0"}"#,
            r#"{"id":2147483648}"#,
            r#"{"id":-2147483648}"#,
            r#"{"id":40000}"#,
            r#"{"id":true}"#,
            r#"{"id":null}"#,
            r#"{"id":[1]}"#,
            r#"{"id":1,"id":2}"#,
            r#"{"id":1,}"#,
            r#"{}"#,
            r#"[]"#,
            r#"{"id":1} x"#,
            r#"{"id":"\u0031"}"#,
            r#"{"ID":1}"#,
            r#"{"id":99999999999999999999}"#,
            "{\"id\":1}\n",
            r#"{"id":"  7 "}"#,
            "",
            r#"{"category":"a","product_id":7}"#,
            r#"{"product_id":"7","category":"é"}"#,
            r#"{"category":"a\"b","product_id":7}"#,
            r#"{"category":5,"product_id":7}"#,
            r#"{"category":"x"}"#,
            r#"{"u":"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11","b":true,"c":"ab  ","o":"2024-01-01"}"#,
            r#"{"u":"a0eebc999c0b4ef8bb6d6bb9bd380a11","b":"yes","c":"x","o":1.50}"#,
            r#"{"u":"bad","b":false,"c":"x","o":"y"}"#,
            r#"{"u":"a0eebc999c0b4ef8bb6d6bb9bd380a11","b":false,"c":"x","o":7}"#,
        ];
        let typed_inputs = [
            r#"{"id":19.90}"#,
            r#"{"id":"19.9"}"#,
            r#"{"id":1.99e1}"#,
            r#"{"id":12345678901234567890123}"#,
            r#"{"id":-12345678901234567890123}"#,
            r#"{"id":"NaN"}"#,
            r#"{"id":"ABC"}"#,
            r#"{"id":"abc"}"#,
            r#"{"id":"Ünï"}"#,
            r#"{"id":"2026-01-15"}"#,
            r#"{"id":"2026-01-15 09:30:00+02"}"#,
            r#"{"id":"2026-01-15T09:30:00+00:00"}"#,
            r#"{"id":"2026-01-15 09:30"}"#,
            r#"{"n":5,"c":"X","m":"y","d":"2026-01-15","ts":"2026-01-15 09:30","tz":"2026-01-15Z"}"#,
            r#"{"tz":"2026-01-15Z","ts":"2026-01-15T09:30:00","n":"5.0","m":"y","d":"2026-1-15","c":"x"}"#,
        ];
        let long_digits = format!(r#"{{"id":{}}}"#, "9".repeat(keytypes::MAX_NUMERIC_LEN + 1));
        let long_name = format!(r#"{{"id":"{}"}}"#, "n".repeat(64));
        let ok_name = format!(r#"{{"id":"{}"}}"#, "n".repeat(63));
        for t in [
            &int, &small, &comp, &misc, &typed, &numeric, &citext, &name, &date, &tz,
        ] {
            for raw in inputs.iter().chain(&typed_inputs) {
                agree(t, raw);
            }
            for raw in [&long_digits, &long_name, &ok_name] {
                agree(t, raw);
            }
        }
    }

    #[test]
    fn integers_render_like_to_string() {
        for n in [
            0,
            1,
            -1,
            9,
            10,
            -10,
            99,
            100,
            12345,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ] {
            let mut out = b"x".to_vec();
            push_i64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
        let mut out = Vec::new();
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string().into_bytes());
        for t in [
            "0",
            "7",
            "-7",
            "9223372036854775807",
            "-9223372036854775808",
        ] {
            assert_eq!(parse_int(t.as_bytes()), t.parse().ok(), "{t}");
        }
        for t in [
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
        ] {
            assert_eq!(parse_int(t.as_bytes()), None, "{t}");
        }
    }

    #[test]
    fn invalid_utf8_is_left_to_the_full_parser() {
        let int = table(&[("id", PkKind::Int32)]);
        let text = table(&[("code", PkKind::Text)]);
        let comp = table(&[("id", PkKind::Int32), ("code", PkKind::Text)]);
        let inputs: [&[u8]; 8] = [
            b"{\"code\":\"a\xff\"}",
            b"{\"code\":\"\xc3\"}",
            b"{\"id\":\"1\xff\"}",
            b"{\"i\xffd\":1}",
            b"{\"id\":1,\"code\":\"\xe2\x9c\"}",
            b"{\"id\":1,\"code\":\"\xe2\x9c\x93\"}",
            b"{\"id\":1}\xff",
            b"\xef\xbb\xbf{\"id\":1}",
        ];
        for t in [&int, &text, &comp] {
            for raw in inputs {
                agree_bytes(t, raw);
            }
        }
    }

    #[test]
    fn agrees_on_generated_inputs() {
        // A small deterministic generator over the token shapes that matter.
        let parts = [
            "1", "\"1\"", "-5", "\"007\"", "0", "true", "\"a\"", "\"A\"", "null", "1.5", "\"\"",
            "\" 3\"",
        ];
        let names = ["\"id\"", "\"k\"", "\"x\""];
        let t1 = table(&[("id", PkKind::Int64)]);
        let t2 = table(&[("id", PkKind::Int32), ("k", PkKind::Text)]);
        let t3 = table(&[("id", PkKind::Numeric), ("k", PkKind::Citext)]);
        for a in parts {
            for b in parts {
                for n1 in names {
                    for n2 in names {
                        let one = format!("{{{n1}:{a}}}");
                        let two = format!("{{ {n1} : {a} , {n2}:{b} }}");
                        for t in [&t1, &t2, &t3] {
                            agree(t, &one);
                            agree(t, &two);
                        }
                    }
                }
            }
        }
    }
}
