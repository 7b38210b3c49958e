//! The pgoutput decoder of `pgcache_core::pgoutput` against what a real
//! PostgreSQL sends: the binary changes of a logical slot (the messages a
//! walsender wraps in XLogData), for the statements invalidation cares
//! about, decode to what each statement did.

mod common;

use common::*;
use pgcache_core::pgoutput::{parse_message, Datum, Message, ReplicaIdentity};

/// The slot's pending messages, as bytes, without consuming them.
fn peek(pg: &PgServer) -> Vec<Vec<u8>> {
    pg.query_texts(
        "SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('t', NULL, NULL, \
         'proto_version', '1', 'publication_names', 'p', 'messages', 'true')",
    )
    .into_iter()
    .map(|hex| {
        let hex = hex.expect("a message");
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    })
    .collect()
}

fn text(d: &Datum) -> String {
    match d {
        Datum::Text(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn decodes_what_postgresql_sends() {
    let mut pg = PgServer::start_new();
    pg.enable_logical_replication();
    pg.execute(
        "CREATE TABLE items (tenant int, id int, note text, PRIMARY KEY (tenant, id));
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE items, other;",
    );
    pg.execute("SELECT pg_create_logical_replication_slot('t', 'pgoutput')");
    // One transaction each.
    for statement in [
        "INSERT INTO items VALUES (1, 10, 'a')",
        "UPDATE items SET note = 'b' WHERE id = 10",
        "UPDATE items SET id = 11 WHERE id = 10",
        "DELETE FROM items WHERE id = 11",
        "TRUNCATE items, other",
        "SELECT pg_logical_emit_message(true, 'pgcache', 'hello')",
    ] {
        // The harness runs with synchronous_commit off, and a walsender
        // decodes only flushed WAL: commit these at once.
        pg.execute(&format!("SET synchronous_commit = on; {statement}"));
    }
    let raw = peek(&pg);
    let messages: Vec<Message> = raw
        .iter()
        .map(|m| parse_message(m).unwrap_or_else(|e| panic!("{e}: {m:?}")))
        .collect();
    // Each statement ran in a transaction of its own.
    let begins = messages
        .iter()
        .filter(|m| matches!(m, Message::Begin { .. }))
        .count();
    let commits: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => Some((*commit_lsn, *end_lsn)),
            _ => None,
        })
        .collect();
    assert_eq!(begins, 6, "{messages:#?}");
    assert_eq!(commits.len(), 6);
    assert!(commits.iter().all(|(c, e)| e > c), "{commits:?}");
    assert!(commits.windows(2).all(|w| w[0].1 <= w[1].0), "{commits:?}");

    let items_oid: u32 = pg
        .query_text("SELECT 'items'::regclass::oid::text")
        .unwrap()
        .parse()
        .unwrap();
    let relation = messages
        .iter()
        .find_map(|m| match m {
            Message::Relation {
                oid,
                name,
                identity,
                columns,
                ..
            } if *oid == items_oid => Some((*name, *identity, columns.clone())),
            _ => None,
        })
        .expect("a Relation message for items");
    assert_eq!(relation.0, "items");
    assert_eq!(relation.1, ReplicaIdentity::Default);
    let keys: Vec<_> = relation
        .2
        .iter()
        .map(|c| (c.name, c.key, c.type_oid))
        .collect();
    assert_eq!(
        keys,
        [("tenant", true, 23), ("id", true, 23), ("note", false, 25)]
    );

    let changes: Vec<String> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert { new, .. } => Some(format!(
                "I {}",
                new.iter().map(text).collect::<Vec<_>>().join(",")
            )),
            Message::Update { old, new, .. } => Some(format!(
                "U {} -> {}",
                old.as_ref().map_or("-".into(), |(k, o)| format!(
                    "{k:?}:{}",
                    o.iter().map(text).collect::<Vec<_>>().join(",")
                )),
                new.iter().map(text).collect::<Vec<_>>().join(",")
            )),
            Message::Delete { old: (k, o), .. } => Some(format!(
                "D {k:?}:{}",
                o.iter().map(text).collect::<Vec<_>>().join(",")
            )),
            Message::Truncate { oids, .. } => Some(format!("T {}", oids.len())),
            Message::Logical {
                prefix, content, ..
            } => Some(format!("M {prefix} {}", String::from_utf8_lossy(content))),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            "I 1,10,a".to_string(),
            "U - -> 1,10,b".into(),
            "U Key:1,10,Null -> 1,11,b".into(),
            "D Key:1,11,Null".into(),
            "T 2".into(),
            "M pgcache hello".into(),
        ]
    );
}
