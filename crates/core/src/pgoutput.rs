//! Decoding PostgreSQL's logical replication stream: the CopyData frames of
//! a `START_REPLICATION ... LOGICAL` session and the `pgoutput` messages they
//! carry (protocol version 1, streaming off), as the PostgreSQL 15 docs
//! "Streaming Replication Protocol" and "Logical Replication Message
//! Formats" define them.
//!
//! Pure and borrowing: every message is decoded from the frame's bytes
//! without copying column values; every length is checked, and anything
//! short, long or unknown is an error, never a panic (the stream comes from
//! the network). Streamed and two-phase transactions (`S`, `E`, `c`, `A`,
//! `b`, `P`, `K`, `r`, `p`) are refused: they are sent before commit, and applying them early would reopen the race the
//! visibility barrier closes.

use thiserror::Error;

/// A WAL position.
pub type Lsn = u64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("replication message truncated: {0}")]
    Truncated(&'static str),
    #[error("replication message has {0} trailing bytes")]
    Trailing(usize),
    #[error("unknown replication frame tag {0:?}")]
    UnknownFrame(char),
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownMessage(char),
    #[error("streamed or two-phase transaction message {0:?}: neither was requested")]
    Streaming(char),
    #[error("pgoutput {what}: unexpected tag {tag:?}")]
    BadTag { what: &'static str, tag: char },
    #[error("pgoutput {0}: a negative count or length")]
    Negative(&'static str),
    #[error("pgoutput {0}: a name is not NUL-terminated UTF-8")]
    BadString(&'static str),
}

/// A CopyData frame of a replication session.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `w`: WAL data: where it starts, the server's WAL end, its clock, and
    /// the pgoutput message.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        sent_at: i64,
        data: &'a [u8],
    },
    /// `k`: a keepalive; `reply` asks for a status update at once.
    Keepalive {
        wal_end: Lsn,
        sent_at: i64,
        reply: bool,
    },
}

/// Replica identity of a relation (`R`'s byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: none.
    Nothing,
    /// `f`: every column.
    Full,
    /// `i`: an index that is not necessarily the primary key.
    Index,
}

/// A column of a relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Part of the replica identity (flag 1).
    pub key: bool,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A column value in a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    /// `n`
    Null,
    /// `u`: an unchanged TOASTed value, not sent.
    Unchanged,
    /// `t`: the value in its text output form.
    Text(&'a [u8]),
    /// `b`: binary (not requested by pgcache; decoded so that it is refused
    /// by the caller, not by the parser).
    Binary(&'a [u8]),
}

/// Which old tuple an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity's columns (others null).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A pgoutput message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        commit_lsn: Lsn,
        name: &'a str,
    },
    Relation {
        oid: u32,
        namespace: &'a str,
        name: &'a str,
        identity: ReplicaIdentity,
        columns: Vec<RelationColumn<'a>>,
    },
    Type {
        oid: u32,
        namespace: &'a str,
        name: &'a str,
    },
    Insert {
        oid: u32,
        new: Vec<Datum<'a>>,
    },
    Update {
        oid: u32,
        old: Option<(OldKind, Vec<Datum<'a>>)>,
        new: Vec<Datum<'a>>,
    },
    Delete {
        oid: u32,
        old: (OldKind, Vec<Datum<'a>>),
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        oids: Vec<u32>,
    },
    /// `M`: a `pg_logical_emit_message`.
    Logical {
        transactional: bool,
        lsn: Lsn,
        prefix: &'a str,
        content: &'a [u8],
    },
}

/// A cursor over a message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A NUL-terminated UTF-8 string.
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::BadString(self.what))?;
        let s =
            std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::BadString(self.what))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn count(&mut self, n: i64) -> Result<usize, DecodeError> {
        usize::try_from(n).map_err(|_| DecodeError::Negative(self.what))
    }

    fn rest(self) -> &'a [u8] {
        self.buf
    }

    fn done(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    fn tuple(&mut self) -> Result<Vec<Datum<'a>>, DecodeError> {
        let n = self.i16()?;
        let n = self.count(n.into())?;
        // At least one byte per column: no allocation beyond the input.
        if n > self.buf.len() {
            return Err(DecodeError::Truncated(self.what));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                tag @ (b't' | b'b') => {
                    let len = self.i32()?;
                    let len = self.count(len.into())?;
                    let bytes = self.take(len)?;
                    if tag == b't' {
                        Datum::Text(bytes)
                    } else {
                        Datum::Binary(bytes)
                    }
                }
                tag => {
                    return Err(DecodeError::BadTag {
                        what: "tuple column",
                        tag: tag as char,
                    })
                }
            });
        }
        Ok(out)
    }
}

/// Decodes a CopyData frame's payload.
pub fn parse_frame(buf: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut r = Reader::new(buf, "frame");
    match r.u8()? {
        b'w' => {
            let start = r.u64()?;
            let wal_end = r.u64()?;
            let sent_at = r.i64()?;
            Ok(Frame::XLogData {
                start,
                wal_end,
                sent_at,
                data: r.rest(),
            })
        }
        b'k' => {
            let wal_end = r.u64()?;
            let sent_at = r.i64()?;
            let reply = r.u8()? != 0;
            r.done()?;
            Ok(Frame::Keepalive {
                wal_end,
                sent_at,
                reply,
            })
        }
        tag => Err(DecodeError::UnknownFrame(tag as char)),
    }
}

/// The standby status update (`r`) that acknowledges `flushed` (everything
/// before it is applied) at `now` (microseconds since 2000-01-01).
pub fn status_update(flushed: Lsn, now: i64, reply: bool) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = b'r';
    out[1..9].copy_from_slice(&flushed.to_be_bytes());
    out[9..17].copy_from_slice(&flushed.to_be_bytes());
    out[17..25].copy_from_slice(&flushed.to_be_bytes());
    out[25..33].copy_from_slice(&now.to_be_bytes());
    out[33] = u8::from(reply);
    out
}

/// Decodes one pgoutput message (an XLogData frame's `data`).
pub fn parse_message(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let tag = *buf.first().ok_or(DecodeError::Truncated("message"))?;
    let what = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' | b'E' | b'c' | b'A' | b'p' | b'P' | b'K' | b'r' | b'b' => {
            return Err(DecodeError::Streaming(tag as char))
        }
        other => return Err(DecodeError::UnknownMessage(other as char)),
    };
    let mut r = Reader::new(&buf[1..], what);
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_time: r.i64()?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.str()?,
        },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.str()?;
            let name = r.str()?;
            let identity = match r.u8()? {
                b'd' => ReplicaIdentity::Default,
                b'n' => ReplicaIdentity::Nothing,
                b'f' => ReplicaIdentity::Full,
                b'i' => ReplicaIdentity::Index,
                tag => {
                    return Err(DecodeError::BadTag {
                        what: "replica identity",
                        tag: tag as char,
                    })
                }
            };
            let n = r.i16()?;
            let n = r.count(n.into())?;
            if n > r.buf.len() {
                return Err(DecodeError::Truncated(what));
            }
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 != 0,
                    name: r.str()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.str()?,
            name: r.str()?,
        },
        b'I' => {
            let oid = r.u32()?;
            expect_tag(&mut r, b'N', "Insert")?;
            Message::Insert {
                oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                kind @ (b'K' | b'O') => {
                    let old = r.tuple()?;
                    expect_tag(&mut r, b'N', "Update")?;
                    Some((old_kind(kind), old))
                }
                tag => {
                    return Err(DecodeError::BadTag {
                        what,
                        tag: tag as char,
                    })
                }
            };
            Message::Update {
                oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32()?;
            let kind = match r.u8()? {
                kind @ (b'K' | b'O') => old_kind(kind),
                tag => {
                    return Err(DecodeError::BadTag {
                        what,
                        tag: tag as char,
                    })
                }
            };
            Message::Delete {
                oid,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.i32()?;
            let n = r.count(n.into())?;
            let options = r.u8()?;
            if n > r.buf.len() / 4 {
                return Err(DecodeError::Truncated(what));
            }
            let oids = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { options, oids }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.str()?;
            let len = r.i32()?;
            let len = r.count(len.into())?;
            Message::Logical {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.take(len)?,
            }
        }
        _ => unreachable!("tags are matched above"),
    };
    r.done()?;
    Ok(message)
}

fn old_kind(tag: u8) -> OldKind {
    if tag == b'O' {
        OldKind::Full
    } else {
        OldKind::Key
    }
}

fn expect_tag(r: &mut Reader<'_>, want: u8, what: &'static str) -> Result<(), DecodeError> {
    match r.u8()? {
        t if t == want => Ok(()),
        tag => Err(DecodeError::BadTag {
            what,
            tag: tag as char,
        }),
    }
}

/// `X/Y` as PostgreSQL prints an LSN.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `X/Y` (hexadecimal halves) as PostgreSQL prints an LSN.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages the way the walsender writes them.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let mut w = self.u8(b't').i32(v.len() as i32);
            w.0.extend_from_slice(v.as_bytes());
            w
        }
    }

    #[test]
    fn begin_and_commit() {
        let b = W::default().u8(b'B').u64(0x1_0000_0010).u64(42).i32(7).0;
        assert_eq!(
            parse_message(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 42,
                xid: 7
            }
        );
        let c = W::default().u8(b'C').u8(0).u64(16).u64(24).u64(42).0;
        assert_eq!(
            parse_message(&c).unwrap(),
            Message::Commit {
                flags: 0,
                commit_lsn: 16,
                end_lsn: 24,
                commit_time: 42
            }
        );
        assert_eq!(
            parse_message(&c[..c.len() - 1]),
            Err(DecodeError::Truncated("Commit"))
        );
        let mut long = c.clone();
        long.push(0);
        assert_eq!(parse_message(&long), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn relation_and_type() {
        let r = W::default()
            .u8(b'R')
            .i32(16384)
            .s("public")
            .s("users")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .s("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .s("name")
            .i32(25)
            .i32(-1)
            .0;
        let Message::Relation {
            oid,
            namespace,
            name,
            identity,
            columns,
        } = parse_message(&r).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!((oid, namespace, name), (16384, "public", "users"));
        assert_eq!(identity, ReplicaIdentity::Default);
        assert_eq!(columns.len(), 2);
        assert!(columns[0].key && !columns[1].key);
        assert_eq!((columns[1].name, columns[1].type_oid), ("name", 25));
        let y = W::default().u8(b'Y').i32(16500).s("public").s("citext").0;
        assert_eq!(
            parse_message(&y).unwrap(),
            Message::Type {
                oid: 16500,
                namespace: "public",
                name: "citext"
            }
        );
        // A name without its NUL.
        assert_eq!(
            parse_message(&y[..y.len() - 1]),
            Err(DecodeError::BadString("Type"))
        );
    }

    #[test]
    fn insert_update_delete() {
        let i = W::default()
            .u8(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(2)
            .text("7")
            .text("ann")
            .0;
        assert_eq!(
            parse_message(&i).unwrap(),
            Message::Insert {
                oid: 16384,
                new: vec![Datum::Text(b"7"), Datum::Text(b"ann")]
            }
        );
        // A key change: the old key (others null), then the new row, with an
        // unchanged TOASTed column.
        let u = W::default()
            .u8(b'U')
            .i32(16384)
            .u8(b'K')
            .i16(2)
            .text("7")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("8")
            .u8(b'u')
            .0;
        assert_eq!(
            parse_message(&u).unwrap(),
            Message::Update {
                oid: 16384,
                old: Some((OldKind::Key, vec![Datum::Text(b"7"), Datum::Null])),
                new: vec![Datum::Text(b"8"), Datum::Unchanged]
            }
        );
        let plain = W::default().u8(b'U').i32(1).u8(b'N').i16(1).text("1").0;
        assert!(matches!(
            parse_message(&plain).unwrap(),
            Message::Update { old: None, .. }
        ));
        let d = W::default().u8(b'D').i32(1).u8(b'O').i16(1).text("1").0;
        assert_eq!(
            parse_message(&d).unwrap(),
            Message::Delete {
                oid: 1,
                old: (OldKind::Full, vec![Datum::Text(b"1")])
            }
        );
        let bad = W::default().u8(b'D').i32(1).u8(b'N').i16(1).text("1").0;
        assert!(matches!(
            parse_message(&bad),
            Err(DecodeError::BadTag { .. })
        ));
        let bad_col = W::default().u8(b'I').i32(1).u8(b'N').i16(1).u8(b'x').0;
        assert!(matches!(
            parse_message(&bad_col),
            Err(DecodeError::BadTag { .. })
        ));
    }

    #[test]
    fn lengths_are_checked() {
        // A column claiming more bytes than the message has.
        let huge = W::default()
            .u8(b'I')
            .i32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(1 << 30)
            .0;
        assert_eq!(parse_message(&huge), Err(DecodeError::Truncated("Insert")));
        let negative = W::default()
            .u8(b'I')
            .i32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(-5)
            .0;
        assert_eq!(
            parse_message(&negative),
            Err(DecodeError::Negative("Insert"))
        );
        let many_columns = W::default().u8(b'I').i32(1).u8(b'N').i16(i16::MAX).0;
        assert_eq!(
            parse_message(&many_columns),
            Err(DecodeError::Truncated("Insert"))
        );
        let many_oids = W::default().u8(b'T').i32(i32::MAX).u8(0).0;
        assert_eq!(
            parse_message(&many_oids),
            Err(DecodeError::Truncated("Truncate"))
        );
        assert_eq!(parse_message(&[]), Err(DecodeError::Truncated("message")));
    }

    #[test]
    fn truncate_origin_and_logical_messages() {
        let t = W::default().u8(b'T').i32(2).u8(1).i32(10).i32(11).0;
        assert_eq!(
            parse_message(&t).unwrap(),
            Message::Truncate {
                options: 1,
                oids: vec![10, 11]
            }
        );
        let o = W::default().u8(b'O').u64(5).s("node_a").0;
        assert_eq!(
            parse_message(&o).unwrap(),
            Message::Origin {
                commit_lsn: 5,
                name: "node_a"
            }
        );
        let mut m = W::default().u8(b'M').u8(1).u64(9).s("pgcache").i32(2).0;
        m.extend_from_slice(b"hi");
        assert_eq!(
            parse_message(&m).unwrap(),
            Message::Logical {
                transactional: true,
                lsn: 9,
                prefix: "pgcache",
                content: b"hi"
            }
        );
    }

    #[test]
    fn streaming_and_unknown_messages_are_refused() {
        for tag in [b'S', b'E', b'c', b'A'] {
            assert_eq!(
                parse_message(&[tag, 0, 0, 0, 0]),
                Err(DecodeError::Streaming(tag as char))
            );
        }
        assert_eq!(parse_message(b"Z"), Err(DecodeError::UnknownMessage('Z')));
    }

    #[test]
    fn frames_and_status_updates() {
        let mut w = W::default().u8(b'w').u64(100).u64(200).u64(300).0;
        w.extend_from_slice(b"B...");
        assert_eq!(
            parse_frame(&w).unwrap(),
            Frame::XLogData {
                start: 100,
                wal_end: 200,
                sent_at: 300,
                data: b"B..."
            }
        );
        let k = W::default().u8(b'k').u64(200).u64(300).u8(1).0;
        assert_eq!(
            parse_frame(&k).unwrap(),
            Frame::Keepalive {
                wal_end: 200,
                sent_at: 300,
                reply: true
            }
        );
        assert_eq!(parse_frame(b"q"), Err(DecodeError::UnknownFrame('q')));
        let r = status_update(0x10, 77, false);
        assert_eq!(r[0], b'r');
        assert_eq!(u64::from_be_bytes(r[1..9].try_into().unwrap()), 0x10);
        assert_eq!(i64::from_be_bytes(r[25..33].try_into().unwrap()), 77);
        assert_eq!(r[33], 0);
    }

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/2/3"), None);
    }
}
