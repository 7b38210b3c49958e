//! Primary-key types (SPEC §3, issue 12): for every supported key type,
//! every spelling PostgreSQL reads as one value names ONE entry (one query),
//! and the keys that invalidation computes, from `pgcache_watch`'s trigger and
//! from the seed README's whole-row trigger, meet it; spellings the module
//! cannot map exactly, and key types it does not support, are refused with
//! an error naming the column and the accepted form or the type.
//!
//! Each test covers a family of types on one PostgreSQL and one Redis. For
//! each type there are two tables: `w_<stem>`, watched with `pgcache_watch`,
//! and `s_<stem>`, with the seed README's trigger, so that a failure of one
//! trigger is never hidden by the other. The checks of a test are collected
//! and reported together, so one run shows every type and aspect that fails.

mod common;

use common::*;
use serde_json::Value;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One row's key: how SQL names it, how clients may spell it, and the
/// canonical form the entry's key carries.
struct Key {
    /// The key value as SQL (`WHERE k = <target>`).
    target: &'static str,
    /// JSON values a client may send as `k`; all name this one row.
    spellings: &'static [&'static str],
    /// The canonical JSON value: the key is `pg_cache:<table>:{"k":<canonical>}`.
    canonical: &'static str,
}

/// A key type under test: tables `w_<stem>` and `s_<stem>`, each
/// `(k <ty> PRIMARY KEY, v text)` holding `rows`.
struct KeyType {
    stem: &'static str,
    ty: &'static str,
    /// A VALUES list of `(k, v)`; every `v` distinct.
    rows: &'static str,
    keys: &'static [Key],
    /// Spellings of `k` that are refused, with the words the error must hold
    /// (besides the column name `k`).
    refused: &'static [(&'static str, &'static [&'static str])],
}

impl KeyType {
    fn watched(&self) -> String {
        format!("w_{}", self.stem)
    }
    /// The table published for the replication source.
    fn replicated(&self) -> String {
        format!("r_{}", self.stem)
    }
    fn seeded(&self) -> String {
        format!("s_{}", self.stem)
    }
    /// Both tables, with the trigger each one has.
    fn tables(&self) -> [(String, &'static str); 2] {
        [
            (self.watched(), "pgcache_watch's trigger"),
            (self.seeded(), "the seed README's trigger"),
        ]
    }
}

fn pk(value: &str) -> String {
    format!(r#"{{"k":{value}}}"#)
}

fn entry_key(table: &str, canonical: &str) -> String {
    format!("pg_cache:{table}:{}", pk(canonical))
}

/// Checks that failed, collected so that a test reports all of them.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// Runs `f`; an assertion failing inside it is recorded as `what`.
    fn check(&mut self, what: &str, f: impl FnOnce()) {
        if let Err(e) = catch_unwind(AssertUnwindSafe(f)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(panic without a message)".into());
            self.0.push(format!("{what}: {msg}"));
        }
    }

    #[track_caller]
    fn finish(self) {
        if !self.0.is_empty() {
            panic!(
                "{} check(s) failed:\n- {}",
                self.0.len(),
                self.0.join("\n- ")
            );
        }
    }
}

/// The error text names the column `col` as a word of its own (`k`, `"k"`,
/// `k:`), not merely as a letter of another word.
#[track_caller]
fn assert_names_column(text: &str, col: &str, what: &str) {
    let named = text
        .split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
        .any(|w| w == col);
    assert!(
        named,
        "{what}: error reply should name the column {col:?}; got {text:?}"
    );
}

/// A PostgreSQL with the tables of `types` (after `prelude`: types,
/// domains, extensions), `pgcache.sql` loaded, the `w_` tables watched and
/// the `s_` tables under the seed trigger; a Redis with the module, its
/// listener connected.
fn start(prelude: &str, types: &[&KeyType]) -> (PgServer, RedisServer) {
    let mut sql = String::from(prelude);
    sql.push('\n');
    sql.push_str(&pgcache_sql());
    sql.push_str(SEED_FUNCTION);
    for t in types {
        for (table, _) in t.tables() {
            let _ = writeln!(
                sql,
                "CREATE TABLE {table} (k {} PRIMARY KEY, v text);\n\
                 INSERT INTO {table} VALUES {};",
                t.ty, t.rows
            );
        }
        let _ = writeln!(
            sql,
            "SELECT pgcache_watch('{w}');\n\
             CREATE TRIGGER {s}_cache_trigger AFTER INSERT OR UPDATE OR DELETE ON {s} \
             FOR EACH ROW EXECUTE FUNCTION notify_cache_invalidation();",
            w = t.watched(),
            s = t.seeded()
        );
    }
    let pg = PgServer::start_with_schema(&sql);
    let r = RedisServer::with_pg(&pg, &[]);
    wait_listener_ready(&r);
    (pg, r)
}

/// Drops the table's entries with plain Redis commands (not the module's),
/// so each key's check starts from nothing.
fn clear(c: &mut redis::Connection, table: &str) {
    for k in keys(c, &format!("pg_cache:{table}:*")) {
        let _: i64 = redis::cmd("DEL").arg(&k).query(c).unwrap();
    }
}

/// `v` of the row whose key is `target`, as PostgreSQL has it.
fn v_of(pg: &PgServer, table: &str, target: &str) -> String {
    pg.query_text(&format!("SELECT v FROM {table} WHERE k = {target}"))
        .unwrap_or_else(|| panic!("test setup: {table} has no row k = {target}"))
}

/// (1) Every spelling of a key returns its row, through one query, and the
/// table then holds exactly one entry, under the canonical key.
fn check_spellings(pg: &PgServer, c: &mut redis::Connection, table: &str, t: &KeyType) {
    for key in t.keys {
        clear(c, table);
        let want = v_of(pg, table, key.target);
        pg.reset_stats();
        for sp in key.spellings {
            let got = read_row(c, table, &pk(sp));
            assert_eq!(
                got["v"],
                want,
                "{table} ({}): READ {} returned another row: {got}",
                t.ty,
                pk(sp)
            );
        }
        assert_eq!(
            keys(c, &format!("pg_cache:{table}:*")),
            vec![entry_key(table, key.canonical)],
            "{table} ({}): the spellings {:?} must be ONE entry, under the canonical key",
            t.ty,
            key.spellings
        );
        assert_eq!(
            pg.queries_on(table),
            1,
            "{table} ({}): the spellings {:?} must cost one query:\n{}",
            t.ty,
            key.spellings,
            pg.statements()
        );
    }
}

/// (4) Refused spellings get an error naming the column and the accepted
/// form, and leave no entry.
fn check_refused(c: &mut redis::Connection, table: &str, t: &KeyType) {
    clear(c, table);
    for (sp, words) in t.refused {
        let what = format!("{table} ({}): READ {}", t.ty, pk(sp));
        let e = expect_err(read(c, table, &pk(sp)), &what);
        assert_names_column(&e, "k", &what);
        assert_mentions(&e, words, &what);
    }
    assert_eq!(
        keys(c, &format!("pg_cache:{table}:*")),
        Vec::<String>::new(),
        "{table} ({}): a refused spelling leaves no entry",
        t.ty
    );
}

/// (2)/(3) With every spelling cached, an UPDATE of the row (run after
/// `writer`, e.g. a `SET TimeZone`) drops the entry, and the next READ in
/// every spelling returns the new row.
fn check_invalidation(
    pg: &PgServer,
    c: &mut redis::Connection,
    table: &str,
    via: &str,
    t: &KeyType,
    writer: &str,
) {
    for key in t.keys {
        let canonical = entry_key(table, key.canonical);
        for sp in key.spellings {
            read_row(c, table, &pk(sp));
        }
        pg.execute(&format!(
            "{writer}UPDATE {table} SET v = 'new' WHERE k = {}",
            key.target
        ));
        wait_gone_for(
            c,
            &canonical,
            &format!(
                "{table} ({}): an UPDATE of k = {} through {via} drops {canonical}",
                t.ty, key.target
            ),
        );
        for sp in key.spellings {
            let got = read_row(c, table, &pk(sp));
            assert_eq!(
                got["v"],
                "new",
                "{table} ({}): READ {} after an UPDATE through {via} still serves the old row \
                 (the invalidation did not reach that entry)",
                t.ty,
                pk(sp)
            );
        }
    }
}

/// Every check of every type; `writer` runs before each UPDATE.
fn check_types(
    pg: &PgServer,
    r: &RedisServer,
    types: &[&KeyType],
    writer: &str,
    findings: &mut Findings,
) {
    let mut c = r.con();
    for t in types {
        for (table, _) in t.tables() {
            findings.check(&format!("{table} ({}) spellings", t.ty), || {
                check_spellings(pg, &mut c, &table, t)
            });
        }
        if !t.refused.is_empty() {
            let table = t.watched();
            findings.check(&format!("{table} ({}) refused spellings", t.ty), || {
                check_refused(&mut c, &table, t)
            });
        }
        for (table, via) in t.tables() {
            findings.check(
                &format!("{table} ({}) invalidation through {via}", t.ty),
                || check_invalidation(pg, &mut c, &table, via, t, writer),
            );
        }
    }
}

/// `r_` tables published on a PostgreSQL with `wal_level = logical`, and a
/// Redis whose source is `replication`, streaming.
fn start_replicated(prelude: &str, types: &[&KeyType]) -> (PgServer, RedisServer) {
    let mut sql = String::from(prelude);
    sql.push('\n');
    sql.push_str(&pgcache_sql());
    for t in types {
        let _ = writeln!(
            sql,
            "CREATE TABLE {table} (k {} PRIMARY KEY, v text);\n\
             INSERT INTO {table} VALUES {};\n\
             SELECT pgcache_publish('{table}');",
            t.ty,
            t.rows,
            table = t.replicated()
        );
    }
    let mut pg = PgServer::start_with_schema(&sql);
    pg.enable_logical_replication();
    let mut args = pg.module_args();
    args.extend(["invalidation_source", "replication"].map(String::from));
    let r = RedisServer::start(&args);
    wait_replication_streaming(&r);
    (pg, r)
}

fn run(prelude: &str, types: &[&KeyType], writer: &str) {
    let (pg, r) = start(prelude, types);
    let mut findings = Findings::default();
    check_types(&pg, &r, types, writer, &mut findings);
    drop((pg, r));
    // The keys the replication source computes meet READ's too.
    let (pg, r) = start_replicated(prelude, types);
    let mut c = r.con();
    for t in types {
        let table = t.replicated();
        findings.check(
            &format!(
                "{table} ({}) invalidation through logical replication",
                t.ty
            ),
            || check_invalidation(&pg, &mut c, &table, "logical replication", t, writer),
        );
    }
    findings.check("replication mapped every key exactly", || {
        let s = stats(&mut c);
        assert_eq!(
            stat_of(&s, "replication_tables_flushed"),
            0,
            "a change was applied as a table flush, not key by key: {s}"
        );
    });
    findings.finish();
}

// ---------------------------------------------------------------------------
// the type matrix

const INT_SPELLINGS: &[&str] = &["123", r#""123""#, r#""000123""#, r#"" +123 ""#];

/// Control: integer keys already canonicalise.
#[test]
fn integer_keys_control() {
    const ROWS: &str = "(123, 'one-two-three'), (7, 'seven')";
    const KEYS: &[Key] = &[Key {
        target: "123",
        spellings: INT_SPELLINGS,
        canonical: "123",
    }];
    let t2 = KeyType {
        stem: "i2",
        ty: "smallint",
        rows: ROWS,
        keys: KEYS,
        refused: &[],
    };
    let t4 = KeyType {
        stem: "i4",
        ty: "integer",
        rows: ROWS,
        keys: KEYS,
        refused: &[],
    };
    let t8 = KeyType {
        stem: "i8",
        ty: "bigint",
        rows: ROWS,
        keys: KEYS,
        refused: &[],
    };
    run("", &[&t2, &t4, &t8], "");
}

const NUM_KEYS: &[Key] = &[
    Key {
        target: "19.9",
        spellings: &["19.9", "19.90", r#""19.9""#, "1.99e1", r#""19.900""#],
        canonical: "19.9",
    },
    Key {
        target: "5",
        spellings: &["5", "5.0", r#""5.00""#, "5e0"],
        canonical: "5",
    },
];

/// numeric, unconstrained and numeric(10,2): `19.9`, `19.90`, `"19.9"`,
/// `1.99e1` are one key, `{"k":19.9}`; integer values are `{"k":5}`; both
/// triggers (which render `19.90` and `5.00`) meet them.
#[test]
fn numeric_keys_one_entry_and_invalidated() {
    // stored with scale 2: row_to_json and to_jsonb render 19.90 and 5.00
    let any = KeyType {
        stem: "num_any",
        ty: "numeric",
        rows: "(19.90, 'nineteen-ninety'), (5.00, 'five'), (1, 'one')",
        keys: NUM_KEYS,
        refused: &[],
    };
    let scaled = KeyType {
        stem: "num_10_2",
        ty: "numeric(10,2)",
        rows: "(19.9, 'nineteen-ninety'), (5, 'five'), (1, 'one')",
        keys: NUM_KEYS,
        refused: &[],
    };
    run("", &[&any, &scaled], "");
}

/// numerics beyond a float's precision are exact keys (two 23-digit keys
/// that differ in the last digit are two rows), and `NaN` is a key.
#[test]
fn numeric_keys_beyond_float() {
    let big = KeyType {
        stem: "num_big",
        ty: "numeric(30,0)",
        rows: "(12345678901234567890123, 'low'), (12345678901234567890124, 'high')",
        keys: &[
            Key {
                target: "12345678901234567890123",
                spellings: &["12345678901234567890123", r#""12345678901234567890123""#],
                canonical: "12345678901234567890123",
            },
            Key {
                target: "12345678901234567890124",
                spellings: &["12345678901234567890124", r#""12345678901234567890124""#],
                canonical: "12345678901234567890124",
            },
        ],
        refused: &[],
    };
    let nan = KeyType {
        stem: "num_nan",
        ty: "numeric",
        rows: "('NaN', 'not a number'), (1, 'one')",
        keys: &[Key {
            target: "'NaN'",
            spellings: &[r#""NaN""#, r#""nan""#],
            canonical: r#""NaN""#,
        }],
        refused: &[],
    };
    let (pg, r) = start("", &[&big, &nan]);
    let mut c = r.con();
    let mut findings = Findings::default();
    findings.check("two 23-digit keys are two entries", || {
        let table = big.watched();
        clear(&mut c, &table);
        pg.reset_stats();
        let low = read(&mut c, &table, r#"{"k":12345678901234567890123}"#).unwrap();
        let high = read(&mut c, &table, r#"{"k":12345678901234567890124}"#).unwrap();
        let v = |s: &Option<String>| s.as_deref().map(|s| json(s)["v"].clone());
        assert_eq!(
            (v(&low), v(&high)),
            (Some(Value::from("low")), Some(Value::from("high"))),
            "each 23-digit key reads its own row (not nil, not the other's)"
        );
        assert_eq!(
            keys(&mut c, &format!("pg_cache:{table}:*")),
            vec![
                entry_key(&table, "12345678901234567890123"),
                entry_key(&table, "12345678901234567890124"),
            ]
        );
        assert_eq!(pg.queries_on(&table), 2, "{}", pg.statements());
    });
    check_types(&pg, &r, &[&big, &nan], "", &mut findings);
    findings.finish();
}

/// text and varchar keys are taken as given (case counts); char(n) ignores
/// trailing spaces, as PostgreSQL compares it.
#[test]
fn text_varchar_and_char_keys() {
    let text_keys: &[Key] = &[
        Key {
            target: "'Abc'",
            spellings: &[r#""Abc""#, r#""\u0041bc""#],
            canonical: r#""Abc""#,
        },
        Key {
            target: "'abc'",
            spellings: &[r#""abc""#],
            canonical: r#""abc""#,
        },
    ];
    let text = KeyType {
        stem: "txt",
        ty: "text",
        rows: "('Abc', 'capital'), ('abc', 'lower')",
        keys: text_keys,
        refused: &[],
    };
    let varchar = KeyType {
        stem: "vchar",
        ty: "varchar(20)",
        rows: "('Abc', 'capital'), ('abc', 'lower')",
        keys: text_keys,
        refused: &[],
    };
    let bpchar = KeyType {
        stem: "bpch",
        ty: "char(5)",
        rows: "('ab', 'ab-row'), ('abc', 'abc-row')",
        keys: &[Key {
            target: "'ab'",
            spellings: &[r#""ab""#, r#""ab   ""#, r#""ab ""#],
            canonical: r#""ab""#,
        }],
        refused: &[],
    };
    run("", &[&text, &varchar, &bpchar], "");
}

/// citext compares case-blind: one entry, `{"k":"abc"}`, whatever case was
/// read, and an UPDATE invalidates it; a non-ASCII citext value is refused
/// (its case folding follows the database's locale).
#[test]
fn citext_keys_are_case_blind() {
    let ci = KeyType {
        stem: "citxt",
        ty: "citext",
        rows: "('AbC', 'abc-row'), ('xyz', 'xyz-row')",
        keys: &[Key {
            target: "'abc'",
            spellings: &[r#""ABC""#, r#""abc""#, r#""aBc""#],
            canonical: r#""abc""#,
        }],
        refused: &[(r#""Ünï""#, &["ASCII"])],
    };
    run("CREATE EXTENSION citext;", &[&ci], "");
}

/// Controls: uuid (lower-case, hyphenated) and boolean keys.
#[test]
fn uuid_and_boolean_keys() {
    let uuid = KeyType {
        stem: "uuid",
        ty: "uuid",
        rows: "('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'first'), \
               ('6f1c2a9e-3b7d-4c1e-9a2f-0123456789ab', 'second')",
        keys: &[Key {
            target: "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            spellings: &[
                r#""A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11""#,
                r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
            ],
            canonical: r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
        }],
        refused: &[],
    };
    let boolean = KeyType {
        stem: "bool",
        ty: "boolean",
        rows: "(true, 'yes-row'), (false, 'no-row')",
        keys: &[Key {
            target: "true",
            spellings: &["true", r#""yes""#, r#""t""#],
            canonical: "true",
        }],
        refused: &[],
    };
    run("", &[&uuid, &boolean], "");
}

/// date keys: ISO `YYYY-MM-DD` (surrounding spaces ignored); other date
/// styles are refused rather than read through a DateStyle.
#[test]
fn date_keys() {
    let date = KeyType {
        stem: "dt",
        ty: "date",
        rows: "('2026-01-15', 'fifteenth'), ('2026-01-16', 'sixteenth')",
        keys: &[Key {
            target: "'2026-01-15'",
            spellings: &[r#""2026-01-15""#, r#"" 2026-01-15 ""#],
            canonical: r#""2026-01-15""#,
        }],
        refused: &[(r#""01/15/2026""#, &["YYYY-MM-DD"])],
    };
    run("", &[&date], "");
}

/// timestamp keys: ISO 8601 with `T` or a space, seconds optional,
/// fractional seconds without trailing zeros; an offset (PostgreSQL would
/// silently drop it) and sub-microsecond digits (it would round) are refused.
#[test]
fn timestamp_keys() {
    let ts = KeyType {
        stem: "ts",
        ty: "timestamp",
        rows: "('2026-01-15 09:30:00', 'half past nine'), \
               ('2026-01-15 09:30:00.25', 'and a quarter second')",
        keys: &[
            Key {
                target: "'2026-01-15 09:30:00'",
                spellings: &[
                    r#""2026-01-15 09:30:00""#,
                    r#""2026-01-15T09:30:00""#,
                    r#""2026-01-15T09:30""#,
                    r#""2026-01-15 09:30:00.000""#,
                ],
                canonical: r#""2026-01-15T09:30:00""#,
            },
            Key {
                target: "'2026-01-15 09:30:00.25'",
                spellings: &[
                    r#""2026-01-15 09:30:00.250""#,
                    r#""2026-01-15T09:30:00.25""#,
                ],
                canonical: r#""2026-01-15T09:30:00.25""#,
            },
        ],
        refused: &[
            (r#""2026-01-15 09:30:00+02""#, &["YYYY-MM-DD"]),
            (r#""2026-01-15 09:30:00.1234567""#, &["YYYY-MM-DD"]),
        ],
    };
    run("", &[&ts], "");
}

/// timestamptz keys name an instant: every offset names one key, canonical
/// in UTC with `+00:00`, and a write from a session in another TimeZone
/// invalidates it (through both triggers); a spelling without an offset
/// (which PostgreSQL would read in the session's zone) is refused.
#[test]
fn timestamptz_keys_any_offset_any_writer_zone() {
    let tstz = KeyType {
        stem: "tstz",
        ty: "timestamptz",
        rows: "('2026-01-15 09:30:00+00', 'half past nine UTC'), \
               ('2026-01-15 10:00:00+00', 'ten UTC')",
        keys: &[Key {
            target: "'2026-01-15 09:30:00+00'",
            spellings: &[
                r#""2026-01-15T09:30:00+00:00""#,
                r#""2026-01-15 09:30:00Z""#,
                r#""2026-01-15T11:30:00+02:00""#,
                r#""2026-01-15 04:30:00-05""#,
            ],
            canonical: r#""2026-01-15T09:30:00+00:00""#,
        }],
        refused: &[(r#""2026-01-15 09:30:00""#, &["offset"])],
    };
    run("", &[&tstz], "SET TimeZone = 'Asia/Kolkata'; ");
}

/// enum keys are their label; a domain key behaves as its base type, also
/// through two levels of domains.
#[test]
fn enum_and_domain_keys() {
    const PRELUDE: &str = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');\n\
                           CREATE DOMAIN price AS numeric(10,2);\n\
                           CREATE DOMAIN int_d AS integer;\n\
                           CREATE DOMAIN int_dd AS int_d;";
    let mood = KeyType {
        stem: "mood",
        ty: "mood",
        rows: "('sad', 'sad-row'), ('ok', 'ok-row'), ('happy', 'happy-row')",
        keys: &[Key {
            target: "'ok'",
            spellings: &[r#""ok""#],
            canonical: r#""ok""#,
        }],
        refused: &[],
    };
    let price = KeyType {
        stem: "price",
        ty: "price",
        rows: "(19.9, 'nineteen-ninety'), (5, 'five')",
        keys: &[Key {
            target: "19.9",
            spellings: &["19.9", r#""19.90""#, r#""19.9""#],
            canonical: "19.9",
        }],
        refused: &[],
    };
    let nested = KeyType {
        stem: "intdd",
        ty: "int_dd",
        rows: "(7, 'seven'), (8, 'eight')",
        keys: &[Key {
            target: "7",
            spellings: &[r#""007""#, "7"],
            canonical: "7",
        }],
        refused: &[],
    };
    run(PRELUDE, &[&mood, &price, &nested], "");
}

// ---------------------------------------------------------------------------
// refused key types

/// A table keyed on float8, on bytea, or on text under a nondeterministic
/// collation cannot have one entry per row: READ is refused, naming the
/// column and the type or the collation, and nothing is cached.
#[test]
fn unsupported_key_types_are_refused() {
    let pg = PgServer::start_with_schema(
        "CREATE TABLE kf8 (k float8 PRIMARY KEY, v text);\n\
         INSERT INTO kf8 VALUES (1.5, 'float');\n\
         CREATE TABLE kbytes (k bytea PRIMARY KEY, v text);\n\
         INSERT INTO kbytes VALUES ('\\x01'::bytea, 'bytes');\n\
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);\n\
         CREATE TABLE kcoll (k text COLLATE ci PRIMARY KEY, v text);\n\
         INSERT INTO kcoll VALUES ('abc', 'collated');",
    );
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let mut findings = Findings::default();
    for (table, pk, words) in [
        ("kf8", r#"{"k":1.5}"#, &["float8", "double precision"][..]),
        ("kbytes", r#"{"k":"\\x01"}"#, &["bytea"][..]),
        ("kcoll", r#"{"k":"abc"}"#, &["collation"][..]),
    ] {
        findings.check(&format!("{table} refused"), || {
            let what = format!("READ {table} {pk}");
            let e = expect_err(read(&mut c, table, pk), &what);
            assert_names_column(&e, "k", &what);
            assert!(
                words.iter().any(|w| e.to_lowercase().contains(w)),
                "{what}: error reply should name {words:?}; got {e:?}"
            );
        });
    }
    findings.check("nothing cached", || {
        assert_eq!(keys(&mut c, "pg_cache:*"), Vec::<String>::new());
    });
    findings.finish();
}

// ---------------------------------------------------------------------------
// the fill queries

/// Columns named like the fill queries' own aliases and functions (`t`,
/// `k`, `ord`, `row_to_json`): READ and MULTIREAD still answer the rows.
#[test]
fn fill_queries_with_odd_column_names() {
    let pg = PgServer::start_with_schema(
        r#"CREATE TABLE odd (t int PRIMARY KEY, k int, ord int, "row_to_json" text, v text);
           INSERT INTO odd VALUES (1, 10, 100, 'r1', 'one'), (2, 20, 200, 'r2', 'two'),
                                  (3, 30, 300, 'r3', 'three');"#,
    );
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let row = |t: i64| pg.row_json("odd", &format!("t = {t}")).unwrap();
    // all three miss: one many-row fill
    let got = multiread(&mut c, "odd", r#"[{"t":1},{"t":2},{"t":99}]"#)
        .unwrap_or_else(|e| panic!("MULTIREAD odd: {e}"));
    assert_eq!(
        json(&got),
        Value::Array(vec![row(1), row(2), Value::Null]),
        "MULTIREAD of a table with columns t, k, ord, row_to_json"
    );
    // a one-row fill
    assert_eq!(read_row(&mut c, "odd", r#"{"t":3}"#), row(3));
    // and a hit of the multi-row fill's entry
    assert_eq!(read_row(&mut c, "odd", r#"{"t":1}"#), row(1));
    assert_eq!(
        keys(&mut c, "pg_cache:odd:*"),
        vec![
            r#"pg_cache:odd:{"t":1}"#.to_string(),
            r#"pg_cache:odd:{"t":2}"#.to_string(),
            r#"pg_cache:odd:{"t":3}"#.to_string(),
        ]
    );
}

/// MULTIREAD with mixed spellings of numeric and timestamptz keys: rows
/// aligned with the input, one query per call, one entry per row.
#[test]
fn multiread_of_mixed_spellings() {
    let pg = PgServer::start_with_schema(
        "CREATE TABLE mr_num (k numeric(10,2) PRIMARY KEY, v text);\n\
         INSERT INTO mr_num VALUES (19.9, 'n19'), (5, 'n5'), (1, 'n1');\n\
         CREATE TABLE mr_tz (k timestamptz PRIMARY KEY, v text);\n\
         INSERT INTO mr_tz VALUES ('2026-01-15 09:30:00+00', 'z1'), ('2026-01-16 00:00:00+00', 'z2');",
    );
    let r = RedisServer::with_pg(&pg, &[]);
    let mut c = r.con();
    let mut findings = Findings::default();
    let vs = |s: &str| -> Vec<Value> {
        json(s)
            .as_array()
            .unwrap_or_else(|| panic!("MULTIREAD answers an array: {s}"))
            .iter()
            .map(|row| row.get("v").cloned().unwrap_or(Value::Null))
            .collect()
    };
    let cases: [(&str, &str, Vec<Value>, Vec<String>); 2] = [
        (
            "mr_num",
            r#"[{"k":19.9},{"k":"19.90"},{"k":5},{"k":42},{"k":"5.00"},{"k":1.99e1}]"#,
            ["n19", "n19", "n5", "", "n5", "n19"]
                .iter()
                .map(|v| {
                    if v.is_empty() {
                        Value::Null
                    } else {
                        Value::from(*v)
                    }
                })
                .collect(),
            vec![
                r#"pg_cache:mr_num:{"k":19.9}"#.to_string(),
                r#"pg_cache:mr_num:{"k":5}"#.to_string(),
            ],
        ),
        (
            "mr_tz",
            r#"[{"k":"2026-01-15T11:30:00+02:00"},{"k":"2026-01-16 00:00:00Z"},{"k":"2026-01-15 09:30:00Z"},{"k":"2026-01-15 04:30:00-05"}]"#,
            ["z1", "z2", "z1", "z1"]
                .iter()
                .map(|v| Value::from(*v))
                .collect(),
            vec![
                r#"pg_cache:mr_tz:{"k":"2026-01-15T09:30:00+00:00"}"#.to_string(),
                r#"pg_cache:mr_tz:{"k":"2026-01-16T00:00:00+00:00"}"#.to_string(),
            ],
        ),
    ];
    for (table, pks, want, entries) in cases {
        findings.check(&format!("MULTIREAD {table}"), || {
            pg.reset_stats();
            let got = multiread(&mut c, table, pks)
                .unwrap_or_else(|e| panic!("MULTIREAD {table} {pks}: {e}"));
            assert_eq!(vs(&got), want, "MULTIREAD {table} {pks}: {got}");
            assert_eq!(
                pg.queries_on(table),
                1,
                "MULTIREAD {table}: one query:\n{}",
                pg.statements()
            );
            let mut cached = keys(&mut c, &format!("pg_cache:{table}:*"));
            cached.retain(|k| !k.ends_with(r#"{"k":42}"#));
            assert_eq!(cached, entries, "MULTIREAD {table}: one entry per row");
            // again: every element a hit
            pg.reset_stats();
            let again = multiread(&mut c, table, pks).unwrap();
            assert_eq!(vs(&again), want);
            let misses = want.iter().filter(|v| v.is_null()).count() as i64;
            assert!(
                pg.queries_on(table) <= misses.min(1),
                "MULTIREAD {table} again: only the missing rows may query:\n{}",
                pg.statements()
            );
        });
    }
    findings.finish();
}
