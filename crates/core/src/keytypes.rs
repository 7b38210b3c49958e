//! Canonical spellings of primary-key values whose types have more than one
//! spelling per value (SPEC §3): numeric, date, timestamp, timestamptz and
//! citext. Each parser accepts what PostgreSQL's input function reads as
//! that value, or refuses with the accepted form; it never rounds.
//!
//! The canonical spellings are what `to_jsonb`/`row_to_json` print (in UTC
//! for timestamptz), so trigger payloads and clients meet.

/// A numeric key's canonical text is at most this long: PostgreSQL takes
/// far longer numbers, but no key needs them, and a bound keeps `1e999999`
/// from expanding into a megabyte.
pub const MAX_NUMERIC_LEN: usize = 1000;

/// A numeric value in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numeric {
    /// A finite value: plain decimal, no exponent, no leading zeros (but
    /// `0.5`), no trailing fractional zeros, no `-0`; a JSON number.
    Finite(String),
    /// `NaN`, `Infinity` or `-Infinity`: JSON strings, as PostgreSQL
    /// renders them in JSON.
    Special(&'static str),
}

/// Reads a numeric value: a JSON number's text, or a string as PostgreSQL's
/// `numeric_in` reads it (surrounding spaces, sign, `.5`, `5.`, exponent,
/// `NaN`, `Infinity`, `inf`, any case).
pub fn parse_numeric(text: &str, from_string: bool) -> Result<Numeric, String> {
    let t = if from_string {
        text.trim_matches(|c: char| c.is_ascii_whitespace())
    } else {
        text
    };
    let bad = || {
        format!(
            "'{}' is not a numeric value (expected a number such as 19.9, 1.99e1 or \"19.90\", or \"NaN\"/\"Infinity\"/\"-Infinity\")",
            clip(text)
        )
    };
    if from_string {
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "nan" => return Ok(Numeric::Special("NaN")),
            "infinity" | "+infinity" | "inf" | "+inf" => return Ok(Numeric::Special("Infinity")),
            "-infinity" | "-inf" => return Ok(Numeric::Special("-Infinity")),
            _ => {}
        }
    }
    let b = t.as_bytes();
    let mut i = 0;
    let negative = match b.first() {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') if from_string => {
            i += 1;
            false
        }
        _ => false,
    };
    // Digits of the mantissa, without the point; `before`: how many came
    // before the point.
    let mut digits: Vec<u8> = Vec::with_capacity(b.len());
    let mut before: i64 = 0;
    let mut seen_point = false;
    let mut any_digit = false;
    while let Some(&c) = b.get(i) {
        match c {
            b'0'..=b'9' => {
                any_digit = true;
                // Leading zeros carry nothing.
                if !(digits.is_empty() && c == b'0') {
                    digits.push(c);
                    if !seen_point {
                        before += 1;
                    }
                } else if seen_point {
                    before -= 1;
                }
            }
            b'.' if !seen_point => seen_point = true,
            _ => break,
        }
        i += 1;
    }
    if !any_digit {
        return Err(bad());
    }
    let mut exponent: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        while let Some(c @ b'0'..=b'9') = b.get(i) {
            exponent = exponent
                .checked_mul(10)
                .and_then(|e| e.checked_add(i64::from(c - b'0')))
                .filter(|e| *e <= 1_000_000)
                .ok_or_else(|| format!("'{}' has an exponent out of range", clip(text)))?;
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        if exp_negative {
            exponent = -exponent;
        }
    }
    if i != b.len() {
        return Err(bad());
    }
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if digits.is_empty() {
        return Ok(Numeric::Finite("0".into()));
    }
    // Digits before the point in the plain rendering.
    let point = before + exponent;
    let len = digits.len() as i64;
    let plain_len = if point <= 0 {
        2 - point + len
    } else {
        point.max(len) + i64::from(point < len)
    };
    if plain_len > MAX_NUMERIC_LEN as i64 {
        return Err(format!(
            "'{}' is longer than the {MAX_NUMERIC_LEN} digits pgcache takes in a numeric key",
            clip(text)
        ));
    }
    let mut out = String::with_capacity(plain_len as usize + 1);
    if negative {
        out.push('-');
    }
    let digits = std::str::from_utf8(&digits).unwrap_or("0");
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-point) as usize));
        out.push_str(digits);
    } else if point >= len {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', (point - len) as usize));
    } else {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    }
    Ok(Numeric::Finite(out))
}

/// A civil date, year 1..=9999.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Date {
    year: i64,
    month: u32,
    day: u32,
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(d: Date) -> i64 {
    let y = if d.month <= 2 { d.year - 1 } else { d.year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(d.month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> Date {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Date { year, month, day }
}

/// A small cursor over ASCII text.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }
    /// Between `min` and `max` digits, as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<(i64, usize)> {
        let start = self.i;
        let mut n: i64 = 0;
        while self.i - start < max {
            match self.peek() {
                Some(c @ b'0'..=b'9') => {
                    n = n * 10 + i64::from(c - b'0');
                    self.i += 1;
                }
                _ => break,
            }
        }
        let count = self.i - start;
        (count >= min).then_some((n, count))
    }
    fn done(&self) -> bool {
        self.i == self.b.len()
    }
}

fn parse_date_part(c: &mut Cursor<'_>) -> Option<Date> {
    let (year, ylen) = c.digits(4, 4)?;
    if ylen != 4 || !c.eat(b'-') {
        return None;
    }
    let (month, _) = c.digits(1, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, _) = c.digits(1, 2)?;
    // Another digit: a year or field longer than the form allows.
    if c.peek().is_some_and(|d| d.is_ascii_digit()) {
        return None;
    }
    let (month, day) = (u32::try_from(month).ok()?, u32::try_from(day).ok()?);
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some(Date { year, month, day })
}

fn push_date(out: &mut String, d: Date) {
    use std::fmt::Write;
    let _ = write!(out, "{:04}-{:02}-{:02}", d.year, d.month, d.day);
}

const DATE_FORM: &str = "YYYY-MM-DD, e.g. 2026-01-15, or \"infinity\"/\"-infinity\"";

fn special_infinity(t: &str) -> Option<&'static str> {
    match t.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => Some("infinity"),
        "-infinity" => Some("-infinity"),
        _ => None,
    }
}

/// A date in ISO form (`YYYY-MM-DD`, years 0001-9999), or `infinity`.
pub fn parse_date(s: &str) -> Result<String, String> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if let Some(inf) = special_infinity(t) {
        return Ok(inf.into());
    }
    let mut c = Cursor {
        b: t.as_bytes(),
        i: 0,
    };
    match parse_date_part(&mut c) {
        Some(d) if c.done() => {
            let mut out = String::with_capacity(10);
            push_date(&mut out, d);
            Ok(out)
        }
        _ => Err(format!(
            "'{}' is not a date pgcache can key on: expected {DATE_FORM}",
            clip(s)
        )),
    }
}

/// A time of day with microseconds.
#[derive(Debug, Clone, Copy)]
struct Time {
    hour: i64,
    minute: i64,
    second: i64,
    micros: i64,
}

/// `HH:MM[:SS[.ffffff]]`; at most 6 fractional digits (PostgreSQL would
/// round more, and pgcache never looks up a rounded value).
fn parse_time_part(c: &mut Cursor<'_>) -> Option<Time> {
    let (hour, _) = c.digits(1, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (minute, mlen) = c.digits(2, 2)?;
    let mut t = Time {
        hour,
        minute,
        second: 0,
        micros: 0,
    };
    if mlen != 2 {
        return None;
    }
    if c.eat(b':') {
        let (second, _) = c.digits(2, 2)?;
        t.second = second;
        if c.eat(b'.') {
            let (frac, n) = c.digits(1, 6)?;
            if c.peek().is_some_and(|d| d.is_ascii_digit()) {
                return None;
            }
            t.micros = frac * 10i64.pow(6 - n as u32);
        }
    }
    (hour <= 23 && minute <= 59 && t.second <= 59).then_some(t)
}

fn push_time(out: &mut String, t: Time) {
    use std::fmt::Write;
    let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
    if t.micros != 0 {
        let frac = format!("{:06}", t.micros);
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
}

const TIMESTAMP_FORM: &str =
    "YYYY-MM-DD HH:MM:SS[.ffffff] (with a space or T; at most 6 fractional digits), or \"infinity\"/\"-infinity\"";
const TIMESTAMPTZ_FORM: &str =
    "YYYY-MM-DD HH:MM:SS[.ffffff] with an offset (Z, +HH, +HH:MM), e.g. 2026-01-15T09:30:00+00:00, or \"infinity\"/\"-infinity\"";

/// Date, optional time: `None` when the form does not match.
fn parse_date_time(c: &mut Cursor<'_>) -> Option<(Date, Time)> {
    let date = parse_date_part(c)?;
    let midnight = Time {
        hour: 0,
        minute: 0,
        second: 0,
        micros: 0,
    };
    if c.eat(b'T') || c.eat(b't') || c.eat(b' ') {
        return Some((date, parse_time_part(c)?));
    }
    Some((date, midnight))
}

/// A timestamp without time zone: `2026-01-15T09:30:00[.f]` as JSON renders
/// it. An offset is refused: PostgreSQL would silently ignore it.
pub fn parse_timestamp(s: &str) -> Result<String, String> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if let Some(inf) = special_infinity(t) {
        return Ok(inf.into());
    }
    let mut c = Cursor {
        b: t.as_bytes(),
        i: 0,
    };
    match parse_date_time(&mut c) {
        Some((d, time)) if c.done() => {
            let mut out = String::with_capacity(26);
            push_date(&mut out, d);
            out.push('T');
            push_time(&mut out, time);
            Ok(out)
        }
        _ => Err(format!(
            "'{}' is not a timestamp pgcache can key on: expected {TIMESTAMP_FORM}, without an offset",
            clip(s)
        )),
    }
}

/// An offset from UTC in seconds: `Z`, `UTC`, `±HH`, `±HH:MM`, `±HHMM`,
/// `±HH:MM:SS` (what PostgreSQL prints for historical zones), optionally
/// after a space.
fn parse_offset(c: &mut Cursor<'_>) -> Option<i64> {
    c.eat(b' ');
    let rest = &c.b[c.i..];
    if rest.eq_ignore_ascii_case(b"z") || rest.eq_ignore_ascii_case(b"utc") {
        c.i = c.b.len();
        return Some(0);
    }
    let sign = match c.peek()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    c.i += 1;
    let (hours, hlen) = c.digits(1, 2)?;
    let mut minutes = 0;
    let mut seconds = 0;
    if c.eat(b':') {
        minutes = c.digits(2, 2)?.0;
        if c.eat(b':') {
            seconds = c.digits(2, 2)?.0;
        }
    } else if hlen == 2 && c.peek().is_some_and(|d| d.is_ascii_digit()) {
        minutes = c.digits(2, 2)?.0;
    }
    (hours <= 15 && minutes <= 59 && seconds <= 59)
        .then_some(sign * (hours * 3600 + minutes * 60 + seconds))
}

/// A timestamp with time zone, as the instant it names: rendered in UTC as
/// `2026-01-15T09:30:00[.f]+00:00` (what `to_jsonb` prints with TimeZone
/// UTC). A spelling without an offset is refused: PostgreSQL would read it
/// in the session's TimeZone.
pub fn parse_timestamptz(s: &str) -> Result<String, String> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    if let Some(inf) = special_infinity(t) {
        return Ok(inf.into());
    }
    let err = || {
        format!(
            "'{}' is not a timestamptz pgcache can key on: expected {TIMESTAMPTZ_FORM} (an offset is required)",
            clip(s)
        )
    };
    let mut c = Cursor {
        b: t.as_bytes(),
        i: 0,
    };
    let (date, time) = parse_date_time(&mut c).ok_or_else(err)?;
    let offset = parse_offset(&mut c).ok_or_else(err)?;
    if !c.done() {
        return Err(err());
    }
    let local = days_from_civil(date) * 86_400 + time.hour * 3600 + time.minute * 60 + time.second;
    let utc = local - offset;
    let day = utc.div_euclid(86_400);
    let secs = utc.rem_euclid(86_400);
    let d = civil_from_days(day);
    if !(1..=9999).contains(&d.year) {
        return Err(format!(
            "'{}' is outside the years 0001-9999 pgcache takes in a key",
            clip(s)
        ));
    }
    let mut out = String::with_capacity(32);
    push_date(&mut out, d);
    out.push('T');
    push_time(
        &mut out,
        Time {
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            micros: time.micros,
        },
    );
    out.push_str("+00:00");
    Ok(out)
}

/// A citext value as citext compares it: lower-cased. Only ASCII: how
/// PostgreSQL lower-cases other characters depends on the database's
/// locale, which pgcache cannot reproduce exactly.
pub fn citext_key(s: &str) -> Result<String, String> {
    if !s.is_ascii() {
        return Err(format!(
            "'{}' is not ASCII: pgcache keys citext columns on ASCII text only (it cannot reproduce PostgreSQL's case folding of other characters)",
            clip(s)
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// The longest `name` value (NAMEDATALEN - 1 bytes): PostgreSQL truncates
/// longer input, so two spellings would name one row.
pub const MAX_NAME_BYTES: usize = 63;

pub(crate) fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> String {
        match parse_numeric(s, true).unwrap() {
            Numeric::Finite(t) => t,
            Numeric::Special(t) => t.to_owned(),
        }
    }

    #[test]
    fn numeric_spellings_meet() {
        for s in [
            "19.9", "19.90", "1.99e1", " 19.900 ", "+19.9", "0019.9", "199e-1", "1.99E+1",
        ] {
            assert_eq!(num(s), "19.9", "{s}");
        }
        for s in ["5", "5.0", "5.", "5e0", "0.5e1", "500e-2"] {
            assert_eq!(num(s), "5", "{s}");
        }
        for s in ["0", "-0", "0.000", "-0.0e5", ".0"] {
            assert_eq!(num(s), "0", "{s}");
        }
        assert_eq!(num(".5"), "0.5");
        assert_eq!(num("-0.05"), "-0.05");
        assert_eq!(num("1e3"), "1000");
        assert_eq!(num("1.5e-3"), "0.0015");
        assert_eq!(num("12345678901234567890123"), "12345678901234567890123");
        assert_eq!(num("123456789012345678901.5"), "123456789012345678901.5");
        assert_eq!(num("nan"), "NaN");
        assert_eq!(num("-Inf"), "-Infinity");
        assert_eq!(num("INFINITY"), "Infinity");
        // A JSON number takes no `+` and no special values.
        assert!(parse_numeric("+1", false).is_err());
        for bad in [
            "", "-", ".", "1e", "1e+", "1.2.3", "abc", "1,5", "0x10", "1_000", "e5",
        ] {
            assert!(parse_numeric(bad, true).is_err(), "{bad:?}");
        }
        assert!(parse_numeric("1e999999999999", true).is_err());
        assert!(parse_numeric("1e2000", true).is_err());
        assert!(parse_numeric("1e-2000", true).is_err());
        assert!(parse_numeric(&"9".repeat(MAX_NUMERIC_LEN), true).is_ok());
        assert!(parse_numeric(&"9".repeat(MAX_NUMERIC_LEN + 1), true).is_err());
    }

    #[test]
    fn numeric_rendering_is_idempotent() {
        for s in [
            "1", "-1", "0.5", "19.9", "100", "1e20", "-3.25e-7", "12.000", "0.0001",
        ] {
            let once = num(s);
            assert_eq!(num(&once), once, "{s}");
            assert_eq!(
                parse_numeric(&once, false).unwrap(),
                Numeric::Finite(once.clone())
            );
        }
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("2026-01-15").unwrap(), "2026-01-15");
        assert_eq!(parse_date(" 2026-1-5 ").unwrap(), "2026-01-05");
        assert_eq!(parse_date("2024-02-29").unwrap(), "2024-02-29");
        assert_eq!(parse_date("Infinity").unwrap(), "infinity");
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-00-10",
            "01/15/2026",
            "20260115",
            "0000-01-01",
            "12026-01-01",
            "2026-01-15 10:00",
            "2026-01-151",
        ] {
            let e = parse_date(bad).unwrap_err();
            assert!(e.contains("YYYY-MM-DD"), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamps() {
        for s in [
            "2026-01-15 09:30:00",
            "2026-01-15T09:30:00",
            "2026-01-15T09:30",
            "2026-01-15 09:30:00.000",
            " 2026-01-15t9:30:00 ",
        ] {
            assert_eq!(parse_timestamp(s).unwrap(), "2026-01-15T09:30:00", "{s}");
        }
        assert_eq!(
            parse_timestamp("2026-01-15 09:30:00.250").unwrap(),
            "2026-01-15T09:30:00.25"
        );
        assert_eq!(
            parse_timestamp("2026-01-15 09:30:00.000001").unwrap(),
            "2026-01-15T09:30:00.000001"
        );
        assert_eq!(
            parse_timestamp("2026-01-15").unwrap(),
            "2026-01-15T00:00:00"
        );
        assert_eq!(parse_timestamp("-infinity").unwrap(), "-infinity");
        for bad in [
            "2026-01-15 09:30:00+02",
            "2026-01-15 09:30:00.1234567",
            "2026-01-15 24:00:00",
            "2026-01-15 09:60",
            "2026-01-15 09:30:61",
            "2026-01-15 9",
            "2026-01-15  09:30",
        ] {
            let e = parse_timestamp(bad).unwrap_err();
            assert!(e.contains("YYYY-MM-DD"), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamptz_is_an_instant() {
        for s in [
            "2026-01-15T09:30:00+00:00",
            "2026-01-15 09:30:00Z",
            "2026-01-15T11:30:00+02:00",
            "2026-01-15 04:30:00-05",
            "2026-01-15 15:00:00+0530",
            "2026-01-15 15:00:00 +05:30",
            "2026-01-15 09:30:00 UTC",
            "2026-01-15T09:49:32+00:19:32",
        ] {
            assert_eq!(
                parse_timestamptz(s).unwrap(),
                "2026-01-15T09:30:00+00:00",
                "{s}"
            );
        }
        assert_eq!(
            parse_timestamptz("2026-01-01T01:00:00.5+02").unwrap(),
            "2025-12-31T23:00:00.5+00:00"
        );
        assert_eq!(
            parse_timestamptz("2024-02-28T23:00:00-02").unwrap(),
            "2024-02-29T01:00:00+00:00"
        );
        assert_eq!(parse_timestamptz("infinity").unwrap(), "infinity");
        for bad in [
            "2026-01-15 09:30:00",
            "2026-01-15 09:30:00 Europe/Paris",
            "2026-01-15 09:30:00+16",
            "0001-01-01 00:00:00+01",
        ] {
            assert!(parse_timestamptz(bad).is_err(), "{bad}");
        }
        assert!(parse_timestamptz("2026-01-15 09:30:00")
            .unwrap_err()
            .contains("offset"));
    }

    #[test]
    fn civil_round_trip() {
        for day in [-719_162, -1, 0, 1, 10_957, 19_000, 2_932_896] {
            assert_eq!(days_from_civil(civil_from_days(day)), day);
        }
        assert_eq!(
            days_from_civil(Date {
                year: 1970,
                month: 1,
                day: 1
            }),
            0
        );
        assert_eq!(
            days_from_civil(Date {
                year: 2000,
                month: 3,
                day: 1
            }),
            11_017
        );
    }

    #[test]
    fn citext_folds_ascii_only() {
        assert_eq!(citext_key("AbC-1").unwrap(), "abc-1");
        assert!(citext_key("Ünï").unwrap_err().contains("ASCII"));
    }
}
