//! Command-argument parsing that does not depend on a table's schema.

use thiserror::Error;

/// A bad command argument; the message names the argument.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("invalid TTL '{0}': expected a non-negative integer number of seconds")]
    Ttl(String),
    #[error("invalid table name: {0}")]
    TableName(&'static str),
}

/// Longest table argument accepted: PostgreSQL identifiers are at most 63
/// bytes, so a schema-qualified, quoted name stays far below this.
pub const MAX_TABLE_ARG: usize = 512;

/// Parses an optional TTL argument: a non-negative integer of seconds.
pub fn parse_ttl(raw: &[u8]) -> Result<u64, ArgError> {
    let bad = || ArgError::Ttl(String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned());
    if raw.is_empty() || raw.len() > 19 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(bad)
}

/// Checks a table argument before it is sent to PostgreSQL's `to_regclass`
/// (as a bind parameter): non-empty UTF-8 without NUL bytes, of bounded length.
pub fn check_table_arg(raw: &[u8]) -> Result<&str, ArgError> {
    if raw.is_empty() {
        return Err(ArgError::TableName("empty"));
    }
    if raw.len() > MAX_TABLE_ARG {
        return Err(ArgError::TableName("longer than 512 bytes"));
    }
    if raw.contains(&0) {
        return Err(ArgError::TableName("contains a NUL byte"));
    }
    std::str::from_utf8(raw).map_err(|_| ArgError::TableName("not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_accepts_non_negative_integers() {
        assert_eq!(parse_ttl(b"0"), Ok(0));
        assert_eq!(parse_ttl(b"3600"), Ok(3600));
    }

    #[test]
    fn ttl_rejects_everything_else() {
        for bad in [
            &b"-1"[..],
            b"",
            b"1.5",
            b"abc",
            b" 1",
            b"99999999999999999999",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ttl(b"x").unwrap_err().to_string().contains("TTL"));
    }

    #[test]
    fn table_arg_checks() {
        assert_eq!(check_table_arg(b"app.users"), Ok("app.users"));
        assert!(check_table_arg(b"").is_err());
        assert!(check_table_arg(b"us\0ers").is_err());
        assert!(check_table_arg(&[0xff, 0xfe]).is_err());
        assert!(check_table_arg(&vec![b'a'; 513]).is_err());
    }
}
