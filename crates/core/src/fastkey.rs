//! The hit path's canonicaliser: writes the canonical pk of a flat JSON
//! object straight into the cache-key buffer, without building a JSON tree.
//!
//! It handles what clients send in practice (a flat object of numbers,
//! strings without escapes, booleans) and defers everything else to
//! `key::canonical_pk`, which produces the same text or the error. The two
//! agree on every input (see the tests and the fuzz target).

use crate::key::{self, KeyError};
use crate::schema::{PkKind, TableSchema};

/// Most primary keys have one to three columns.
const MAX_MEMBERS: usize = 8;

#[derive(Clone, Copy)]
enum Token<'a> {
    /// The text between the quotes; contains no backslash or control character.
    Str(&'a str),
    /// A JSON integer: `-?(0|[1-9][0-9]*)`.
    Int(&'a str),
    Bool(bool),
}

struct Scanner<'a> {
    s: &'a [u8],
    text: &'a str,
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
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(&self.text[start..self.i - 1]);
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
                Some(Token::Int(&self.text[start..self.i]))
            }
            _ => None,
        }
    }
}

/// Scans `{"name": value, ...}`; `None` when the input needs the full parser.
fn scan(raw: &[u8]) -> Option<([(&str, Token<'_>); MAX_MEMBERS], usize)> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut sc = Scanner { s: raw, text, i: 0 };
    let mut members = [("", Token::Bool(false)); MAX_MEMBERS];
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

fn emit_int(out: &mut String, n: i64, kind: PkKind) -> Option<()> {
    let ok = match kind {
        PkKind::Int16 => i16::try_from(n).is_ok(),
        PkKind::Int32 => i32::try_from(n).is_ok(),
        _ => true,
    };
    if !ok {
        return None;
    }
    use std::fmt::Write;
    write!(out, "{n}").ok()
}

/// The fast path proper; `None` means "ask the full parser".
fn fast(out: &mut String, table: &TableSchema, raw: &[u8]) -> Option<()> {
    let (members, n) = scan(raw)?;
    let members = &members[..n];
    if n != table.pk.len() {
        return None;
    }
    out.push('{');
    for (ci, col) in table.pk.iter().enumerate() {
        let mut found = members.iter().filter(|(name, _)| *name == col.name);
        let (_, tok) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        if ci > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(&col.name);
        out.push_str("\":");
        match (col.kind, *tok) {
            (PkKind::Int16 | PkKind::Int32 | PkKind::Int64, Token::Int(t)) => {
                emit_int(out, t.parse().ok()?, col.kind)?
            }
            (PkKind::Int16 | PkKind::Int32 | PkKind::Int64, Token::Str(s)) => {
                emit_int(out, key::parse_pg_int(s)?, col.kind)?
            }
            (PkKind::Text | PkKind::Other, Token::Str(s)) => {
                out.push('"');
                out.push_str(s);
                out.push('"');
            }
            (PkKind::Bpchar, Token::Str(s)) => {
                out.push('"');
                out.push_str(s.trim_end_matches(' '));
                out.push('"');
            }
            (PkKind::Uuid, Token::Str(s)) => {
                out.push('"');
                out.push_str(&key::parse_uuid(s)?);
                out.push('"');
            }
            (PkKind::Bool, Token::Bool(b)) => out.push_str(if b { "true" } else { "false" }),
            _ => return None,
        }
    }
    out.push('}');
    Some(())
}

/// Appends the canonical pk of `raw` to `out` (which already holds the key's
/// prefix). On error `out` is left as it was.
pub fn push_canonical_pk(
    out: &mut String,
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
    out.push_str(&pk.json);
    Ok(())
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
        let slow = key::canonical_pk(t, raw.as_bytes()).map(|c| c.json);
        let mut out = String::from("p:");
        let fast = push_canonical_pk(&mut out, t, raw.as_bytes()).map(|_| out[2..].to_string());
        assert_eq!(fast, slow, "input {raw:?}");
        if fast.is_err() {
            assert_eq!(out, "p:");
        }
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
            ("o", PkKind::Other),
        ]);
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
        for t in [&int, &small, &comp, &misc] {
            for raw in inputs {
                agree(t, raw);
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
        for a in parts {
            for b in parts {
                for n1 in names {
                    for n2 in names {
                        let one = format!("{{{n1}:{a}}}");
                        let two = format!("{{ {n1} : {a} , {n2}:{b} }}");
                        for t in [&t1, &t2] {
                            agree(t, &one);
                            agree(t, &two);
                        }
                    }
                }
            }
        }
    }
}
