//! `pgcache_publish` and `pgcache_unpublish` of `sql/pgcache.sql` (SPEC §11):
//! the publication the `replication` invalidation source streams from, on a
//! real PostgreSQL. No Redis: this is the SQL side only.

mod common;

use common::*;
use pgcache_core::pgoutput::{parse_message, Message};

/// Run SQL statements; the server's error message when one fails.
fn try_execute(pg: &PgServer, sql: &str) -> Result<(), String> {
    let cs = pg.conn_string();
    let sql = format!("{HARNESS_MARK} {sql}");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, conn) = tokio_postgres::connect(&cs, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                })
        })
}

/// The error message of `sql`, which must fail.
fn refused(pg: &PgServer, sql: &str) -> String {
    match try_execute(pg, sql) {
        Ok(()) => panic!("expected an error from: {sql}"),
        Err(message) => message,
    }
}

/// A PostgreSQL with the standard schema and `sql/pgcache.sql` loaded.
fn pg_with_functions() -> PgServer {
    let pg = PgServer::start_new();
    pg.execute(&pgcache_sql());
    pg
}

/// `schema.table` of every table `pub` publishes, sorted (as
/// `pg_publication_tables` lists them: through the root when the
/// publication publishes via the partition root).
fn published(pg: &PgServer, publication: &str) -> Vec<String> {
    pg.query_texts(&format!(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
         WHERE pubname = '{}' ORDER BY 1",
        publication.replace('\'', "''")
    ))
    .into_iter()
    .flatten()
    .collect()
}

/// The publication's options as `all_tables,insert,update,delete,truncate,via_root`.
fn options(pg: &PgServer, publication: &str) -> Option<String> {
    pg.query_text(&format!(
        "SELECT concat_ws(',', puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot) \
         FROM pg_publication WHERE pubname = '{}'",
        publication.replace('\'', "''")
    ))
}

fn publications(pg: &PgServer) -> Vec<String> {
    pg.query_texts("SELECT pubname::text FROM pg_publication ORDER BY 1")
        .into_iter()
        .flatten()
        .collect()
}

#[test]
fn publish_creates_the_publication_and_adds_tables() {
    let pg = pg_with_functions();
    assert!(publications(&pg).is_empty());

    pg.execute("SELECT pgcache_publish('users')");
    // Every operation, through the partition root, and only the tables named.
    assert_eq!(options(&pg, "pgcache").as_deref(), Some("f,t,t,t,t,t"));
    assert_eq!(published(&pg, "pgcache"), ["public.users"]);

    // Twice is fine, and so is loading the file again.
    pg.execute("SELECT pgcache_publish('users')");
    pg.execute(&pgcache_sql());
    pg.execute("SELECT pgcache_publish('users'::regclass, 'pgcache')");
    assert_eq!(published(&pg, "pgcache"), ["public.users"]);

    // A composite key, a schema-qualified table, a FULL replica identity.
    pg.execute(
        "ALTER TABLE text_items REPLICA IDENTITY FULL;
         SELECT pgcache_publish('products');
         SELECT pgcache_publish('app.accounts');
         SELECT pgcache_publish('text_items');",
    );
    assert_eq!(
        published(&pg, "pgcache"),
        [
            "app.accounts",
            "public.products",
            "public.text_items",
            "public.users"
        ]
    );

    // Another publication, named by the second argument.
    pg.execute("SELECT pgcache_publish('app.users', 'cache_pub')");
    assert_eq!(options(&pg, "cache_pub").as_deref(), Some("f,t,t,t,t,t"));
    assert_eq!(published(&pg, "cache_pub"), ["app.users"]);
    assert!(!published(&pg, "pgcache").contains(&"app.users".to_string()));
    assert_eq!(publications(&pg), ["cache_pub", "pgcache"]);

    // Unpublish removes the table and nothing else; the publication stays.
    pg.execute("SELECT pgcache_unpublish('users')");
    assert_eq!(
        published(&pg, "pgcache"),
        ["app.accounts", "public.products", "public.text_items"]
    );
    // Not a member, another publication, or no such publication: nothing.
    pg.execute(
        "SELECT pgcache_unpublish('users');
         SELECT pgcache_unpublish('products', 'cache_pub');
         SELECT pgcache_unpublish('products', 'no_such_publication');",
    );
    assert_eq!(
        published(&pg, "pgcache"),
        ["app.accounts", "public.products", "public.text_items"]
    );
    pg.execute("SELECT pgcache_unpublish('app.users', 'cache_pub')");
    assert!(published(&pg, "cache_pub").is_empty());
    assert_eq!(publications(&pg), ["cache_pub", "pgcache"]);

    // Published again after an unpublish.
    pg.execute("SELECT pgcache_publish('users')");
    assert!(published(&pg, "pgcache").contains(&"public.users".to_string()));
}

#[test]
fn refuses_what_would_break_writes_or_miss_changes() {
    let pg = pg_with_functions();
    pg.execute(
        "CREATE TABLE ident_nothing (id int PRIMARY KEY, v text);
         ALTER TABLE ident_nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE ident_index (id int PRIMARY KEY, code int NOT NULL UNIQUE);
         ALTER TABLE ident_index REPLICA IDENTITY USING INDEX ident_index_code_key;
         CREATE VIEW users_view AS SELECT * FROM users;",
    );

    let e = refused(&pg, "SELECT pgcache_publish('no_pk')");
    assert!(e.contains("no_pk") && e.contains("no primary key"), "{e}");
    let e = refused(&pg, "SELECT pgcache_publish('ident_nothing')");
    assert!(
        e.contains("ident_nothing") && e.contains("REPLICA IDENTITY NOTHING"),
        "{e}"
    );
    let e = refused(&pg, "SELECT pgcache_publish('ident_index')");
    assert!(
        e.contains("ident_index") && e.contains("REPLICA IDENTITY USING INDEX"),
        "{e}"
    );
    let e = refused(&pg, "SELECT pgcache_publish('users_view')");
    assert!(e.contains("users_view") && e.contains("not a table"), "{e}");
    let e = refused(&pg, "SELECT pgcache_publish('no_such_table')");
    assert!(e.contains("no_such_table"), "{e}");
    // A refusal leaves nothing behind: no publication was created.
    assert!(publications(&pg).is_empty(), "{:?}", publications(&pg));

    // An existing publication that would miss changes.
    pg.execute("CREATE PUBLICATION inserts_only WITH (publish = 'insert')");
    let e = refused(&pg, "SELECT pgcache_publish('users', 'inserts_only')");
    assert!(e.contains("inserts_only") && e.contains("delete"), "{e}");
    pg.execute("CREATE PUBLICATION filtered FOR TABLE users WHERE (id > 10)");
    let e = refused(&pg, "SELECT pgcache_publish('users', 'filtered')");
    assert!(
        e.contains("filtered") && e.contains("users") && e.contains("row filter"),
        "{e}"
    );

    // Why: a table published without a replica identity fails the
    // application's UPDATE and DELETE (a publication made by hand).
    pg.execute("CREATE PUBLICATION by_hand FOR TABLE ident_nothing");
    pg.execute("INSERT INTO ident_nothing VALUES (1, 'a')");
    let e = refused(&pg, "UPDATE ident_nothing SET v = 'b' WHERE id = 1");
    assert!(e.contains("replica identity"), "{e}");

    // Fixed as the hint says, the table is accepted.
    pg.execute(
        "ALTER TABLE ident_index REPLICA IDENTITY DEFAULT;
         SELECT pgcache_publish('ident_index');",
    );
    assert_eq!(published(&pg, "pgcache"), ["public.ident_index"]);
}

#[test]
fn published_tables_keep_accepting_writes() {
    let mut pg = pg_with_functions();
    pg.enable_logical_replication();
    pg.execute(
        "ALTER TABLE text_items REPLICA IDENTITY FULL;
         SELECT pgcache_publish('users');
         SELECT pgcache_publish('products');
         SELECT pgcache_publish('text_items');
         CREATE TABLE inh_parent (id int PRIMARY KEY, v text);
         CREATE TABLE inh_child (extra int) INHERITS (inh_parent);
         INSERT INTO inh_child VALUES (1, 'a', 1);
         SELECT pgcache_publish('inh_parent');",
    );
    // An inheritance child (it has no key) stays out of the publication.
    assert_eq!(
        published(&pg, "pgcache"),
        [
            "public.inh_parent",
            "public.products",
            "public.text_items",
            "public.users"
        ]
    );
    // Every kind of write the application makes, key changes included.
    for statement in [
        "INSERT INTO users (id, name) VALUES (5000, 'new')",
        "UPDATE users SET name = 'changed' WHERE id = 1",
        "UPDATE users SET id = 5001 WHERE id = 5000",
        "DELETE FROM users WHERE id = 2",
        "UPDATE products SET price = price + 1 WHERE category = 'books'",
        "UPDATE products SET product_id = 1000 WHERE category = 'garden' AND product_id = 1",
        "DELETE FROM products WHERE category = 'electronics' AND product_id = 2",
        "UPDATE text_items SET label = 'changed' WHERE code = 'alpha'",
        "DELETE FROM text_items WHERE code = '007'",
        "INSERT INTO users (id, name) VALUES (5002, 'x') ON CONFLICT (id) DO UPDATE SET name = 'y'",
        "TRUNCATE text_items",
        "UPDATE inh_child SET v = 'b'",
        "UPDATE inh_parent SET v = 'c'",
        "DELETE FROM inh_child",
    ] {
        try_execute(&pg, statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    assert_eq!(
        pg.query_text("SELECT name FROM users WHERE id = 1")
            .as_deref(),
        Some("changed")
    );
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM users WHERE id IN (2, 5000)")
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        pg.query_text("SELECT count(*)::text FROM text_items")
            .as_deref(),
        Some("0")
    );
}

#[test]
fn partitioned_tables_are_published_through_their_root() {
    let mut pg = pg_with_functions();
    pg.enable_logical_replication();
    pg.execute(
        "CREATE TABLE events (tenant int, id int, note text, PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES IN (1);
         CREATE TABLE events_2 PARTITION OF events FOR VALUES IN (2) PARTITION BY RANGE (id);
         CREATE TABLE events_2_low PARTITION OF events_2 FOR VALUES FROM (0) TO (1000);",
    );

    for partition in ["events_1", "events_2", "events_2_low"] {
        let e = refused(&pg, &format!("SELECT pgcache_publish('{partition}')"));
        assert!(
            e.contains(partition) && e.contains("partition") && e.contains("events instead"),
            "{e}"
        );
    }
    // A partition deep in the tree whose UPDATEs would fail once published.
    pg.execute("ALTER TABLE events_2_low REPLICA IDENTITY NOTHING");
    let e = refused(&pg, "SELECT pgcache_publish('events')");
    assert!(
        e.contains("events_2_low") && e.contains("REPLICA IDENTITY NOTHING"),
        "{e}"
    );
    assert!(publications(&pg).is_empty());
    pg.execute("ALTER TABLE events_2_low REPLICA IDENTITY DEFAULT");

    // An existing publication without publish_via_partition_root takes
    // plain tables, not partitioned ones.
    pg.execute("CREATE PUBLICATION leafwise");
    let e = refused(&pg, "SELECT pgcache_publish('events', 'leafwise')");
    assert!(
        e.contains("events") && e.contains("leafwise") && e.contains("publish_via_partition_root"),
        "{e}"
    );
    pg.execute("SELECT pgcache_publish('users', 'leafwise')");
    assert_eq!(published(&pg, "leafwise"), ["public.users"]);

    // The root is accepted; the publication lists it, not its partitions.
    pg.execute("SELECT pgcache_publish('events')");
    pg.execute("SELECT pgcache_publish('events')");
    assert_eq!(options(&pg, "pgcache").as_deref(), Some("f,t,t,t,t,t"));
    // With the truncation notes: pgoutput sends no TRUNCATE of a partition.
    let expected = ["public.events", "public.pgcache_truncations"];
    assert_eq!(published(&pg, "pgcache"), expected);
    let note_triggers = pg
        .query_text("SELECT count(*)::text FROM pg_trigger WHERE tgname = 'pgcache_truncate_note'");
    assert!(
        note_triggers.is_some_and(|n| n != "0"),
        "each partition notes its TRUNCATE"
    );
    // A partition made later is covered too.
    pg.execute("CREATE TABLE events_3 PARTITION OF events FOR VALUES IN (3)");
    assert_eq!(published(&pg, "pgcache"), expected);

    // Writes to partitions succeed and are streamed under the root's name.
    pg.execute("SELECT pg_create_logical_replication_slot('t', 'pgoutput')");
    for statement in [
        "INSERT INTO events VALUES (1, 1, 'a'), (2, 5, 'b'), (3, 1, 'c')",
        "UPDATE events_1 SET note = 'changed' WHERE id = 1",
        "UPDATE events SET id = 6 WHERE tenant = 2 AND id = 5",
        "DELETE FROM events_3 WHERE id = 1",
    ] {
        pg.execute(&format!("SET synchronous_commit = on; {statement}"));
    }
    let raw: Vec<Vec<u8>> = pg
        .query_texts(
            "SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('t', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'pgcache')",
        )
        .into_iter()
        .map(|hex| {
            let hex = hex.expect("a message");
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect();
    let messages: Vec<Message> = raw
        .iter()
        .map(|m| parse_message(m).unwrap_or_else(|e| panic!("{e}: {m:?}")))
        .collect();
    let root: u32 = pg
        .query_text("SELECT 'events'::regclass::oid::text")
        .unwrap()
        .parse()
        .unwrap();
    let relations: Vec<(u32, String)> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Relation {
                oid,
                namespace,
                name,
                ..
            } => Some((*oid, format!("{namespace}.{name}"))),
            _ => None,
        })
        .collect();
    // The root's Relation message names it; PostgreSQL also sends each
    // partition's own, but every change refers to the root.
    assert!(
        relations.contains(&(root, "public.events".to_string())),
        "{relations:?}"
    );
    let changes: Vec<(char, u32)> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert { oid, .. } => Some(('I', *oid)),
            Message::Update { oid, .. } => Some(('U', *oid)),
            Message::Delete { oid, .. } => Some(('D', *oid)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            ('I', root),
            ('I', root),
            ('I', root),
            ('U', root),
            ('U', root),
            ('D', root)
        ],
        "{messages:#?}"
    );
    pg.execute("SELECT pg_drop_replication_slot('t')");

    // Unpublishing the root takes the whole tree out.
    pg.execute("SELECT pgcache_unpublish('events')");
    assert_eq!(
        published(&pg, "pgcache"),
        ["public.pgcache_truncations"],
        "the notes stay"
    );
}

#[test]
fn names_are_quoted() {
    let pg = pg_with_functions();
    pg.execute(
        r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "My Schema"."odd ""name" ("Id" int PRIMARY KEY, v text);
           INSERT INTO "My Schema"."odd ""name" VALUES (1, 'a');"#,
    );
    pg.execute(r#"SELECT pgcache_publish('"My Schema"."odd ""name"')"#);
    assert_eq!(published(&pg, "pgcache"), [r#"My Schema.odd "name"#]);
    // By OID, and again by name: still one membership.
    pg.execute(
        r#"SELECT pgcache_publish(oid) FROM pg_class WHERE relname = 'odd "name';
           SELECT pgcache_publish('"My Schema"."odd ""name"');"#,
    );
    assert_eq!(published(&pg, "pgcache"), [r#"My Schema.odd "name"#]);
    pg.execute(r#"UPDATE "My Schema"."odd ""name" SET v = 'b'"#);
    pg.execute(r#"DELETE FROM "My Schema"."odd ""name""#);

    // A publication name that is not an identifier, nor harmless SQL.
    let odd_pub = r#"Pub "x"; DROP TABLE users; --"#;
    let literal = odd_pub.replace('\'', "''");
    pg.execute(&format!(
        r#"SELECT pgcache_publish('"My Schema"."odd ""name"', '{literal}')"#
    ));
    assert_eq!(publications(&pg), [odd_pub, "pgcache"]);
    assert_eq!(published(&pg, odd_pub), [r#"My Schema.odd "name"#]);
    assert!(pg.query_text("SELECT to_regclass('users')::text").is_some());

    // The search path does not change which table is meant.
    pg.execute(&format!(
        r#"SET search_path = "My Schema", public;
           SELECT pgcache_unpublish('"odd ""name"', '{literal}');"#
    ));
    assert!(published(&pg, odd_pub).is_empty());
    pg.execute(r#"SELECT pgcache_unpublish('"My Schema"."odd ""name"')"#);
    assert!(published(&pg, "pgcache").is_empty());
}
