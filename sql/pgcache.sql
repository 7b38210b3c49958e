-- pgcache: triggers that tell the pgcache Redis module when rows change.
--
--   SELECT pgcache_watch('users');                          -- channel cache_invalidation
--   SELECT pgcache_watch('app.accounts', 'my_channel');     -- the module's invalidation_channel
--   SELECT pgcache_unwatch('users');
--
-- The row trigger sends only the primary-key columns of the old and new row,
-- so a payload stays far below NOTIFY's 8000-byte limit whatever the row's
-- width, and a write never fails because of the cache. It finds the key
-- columns when it runs, so a changed primary key needs no new pgcache_watch.
-- A statement trigger makes TRUNCATE drop the table's entries.
--
-- Partitioned tables: watch the partitioned table. Payloads name the root
-- of the partition tree (entries live under the name clients read), the row
-- trigger is cloned onto every partition by PostgreSQL, and the TRUNCATE
-- trigger is installed on every partition. When this file is run by a
-- superuser it also installs an event trigger that gives partitions created
-- or attached later their TRUNCATE trigger, and tells the module when a
-- watched table is altered (its entries are dropped); without it, run
-- pgcache_watch again after adding partitions.
--
-- Idempotent: run this file, and pgcache_watch, as often as you like.
--
-- For the module's `invalidation_source replication` no trigger is needed:
-- pgcache_publish and pgcache_unpublish, at the end of this file, manage the
-- publication it streams from instead.

CREATE OR REPLACE FUNCTION pgcache_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := TG_ARGV[0];
    sch text;
    tbl text;
    pk text[];
    old_pk jsonb;
    new_pk jsonb;
BEGIN
    -- The root of the partition tree (the table itself when not a
    -- partition), and the key columns as they are now.
    SELECT n.nspname, c.relname,
           (SELECT pg_catalog.array_agg(a.attname::text)
              FROM pg_catalog.pg_index i
              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = TG_RELID AND i.indisprimary)
      INTO sch, tbl, pk
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = COALESCE(pg_catalog.pg_partition_root(TG_RELID), TG_RELID);
    IF TG_LEVEL = 'STATEMENT' OR pk IS NULL THEN
        -- TRUNCATE, or a table that lost its primary key: all its entries go.
        PERFORM pg_catalog.pg_notify(channel, pg_catalog.json_build_object(
            'schema', sch, 'table', tbl, 'operation', 'TRUNCATE')::text);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT pg_catalog.jsonb_object_agg(key, value) INTO old_pk
          FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb(OLD)) WHERE key = ANY (pk);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT pg_catalog.jsonb_object_agg(key, value) INTO new_pk
          FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb(NEW)) WHERE key = ANY (pk);
    END IF;
    IF TG_OP = 'UPDATE' AND old_pk = new_pk THEN
        new_pk := NULL;
    END IF;
    PERFORM pg_catalog.pg_notify(channel, pg_catalog.json_build_object(
        'schema', sch, 'table', tbl, 'operation', TG_OP,
        'old_data', old_pk, 'new_data', new_pk)::text);
    RETURN NULL;
END
$$;

-- The channel a watched table's triggers notify (NULL: not watched).
CREATE OR REPLACE FUNCTION pgcache_channel(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.convert_from(
               pg_catalog.substr(t.tgargs, 1, position('\x00'::bytea IN t.tgargs) - 1),
               'UTF8')
      FROM pg_catalog.pg_trigger t
     WHERE t.tgrelid = tbl AND t.tgname = 'pgcache_truncate'
$$;

-- Gives every partition under tbl that lacks one the TRUNCATE trigger.
CREATE OR REPLACE FUNCTION pgcache_watch_partitions(tbl regclass, channel text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p
                 WHERE p.relid <> tbl
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                    WHERE t.tgrelid = p.relid AND t.tgname = 'pgcache_truncate') LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER pgcache_truncate AFTER TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION pgcache_notify(%L)', part, channel);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    trig record;
BEGIN
    -- The table's own triggers (a partition's clones of the row trigger go
    -- with their parent's) and every partition's TRUNCATE trigger.
    FOR trig IN SELECT t.tgname, t.tgrelid::regclass AS rel
                  FROM pg_catalog.pg_trigger t
                 WHERE t.tgname IN ('pgcache_row', 'pgcache_truncate') AND t.tgparentid = 0
                   AND (t.tgrelid = tbl OR (t.tgname = 'pgcache_truncate' AND t.tgrelid IN
                        (SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p))) LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trig.tgname, trig.rel);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_watch(tbl regclass, channel text DEFAULT 'cache_invalidation')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        RAISE EXCEPTION 'pgcache_watch: table % has no primary key', tbl;
    END IF;
    PERFORM pgcache_unwatch(tbl);
    -- A partition whose parent is watched already has the row trigger's clone.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid = tbl AND t.tgname = 'pgcache_row') THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER pgcache_row AFTER INSERT OR UPDATE OR DELETE ON %s '
            'FOR EACH ROW EXECUTE FUNCTION pgcache_notify(%L)', tbl, channel);
    END IF;
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER pgcache_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION pgcache_notify(%L)', tbl, channel);
    PERFORM pgcache_watch_partitions(tbl, channel);
END
$$;

-- After CREATE TABLE ... PARTITION OF, ALTER TABLE ... ATTACH PARTITION and
-- any other ALTER TABLE: partitions of a watched tree get their TRUNCATE
-- trigger, and an altered watched table's entries are dropped (its rows'
-- shape or key may have changed).
CREATE OR REPLACE FUNCTION pgcache_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    cmd record;
    root regclass;
    channel text;
BEGIN
    FOR cmd IN SELECT DISTINCT c.objid, c.command_tag
                 FROM pg_catalog.pg_event_trigger_ddl_commands() c
                WHERE c.object_type IN ('table') LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = cmd.objid);
        root := COALESCE(pg_catalog.pg_partition_root(cmd.objid), cmd.objid);
        channel := pgcache_channel(root);
        CONTINUE WHEN channel IS NULL;
        PERFORM pgcache_watch_partitions(root, channel);
        IF cmd.command_tag = 'ALTER TABLE' THEN
            PERFORM pg_catalog.pg_notify(channel, pg_catalog.json_build_object(
                'schema', n.nspname, 'table', c.relname, 'operation', 'TRUNCATE')::text)
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = root;
        END IF;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    -- A user's DDL never fails because of the cache.
    RAISE WARNING 'pgcache: could not follow this DDL (%); run pgcache_watch again on the tables it touched', SQLERRM;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = current_user AND rolsuper) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgcache_ddl') THEN
            CREATE EVENT TRIGGER pgcache_ddl ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
                EXECUTE FUNCTION pgcache_ddl();
        END IF;
    ELSE
        RAISE NOTICE 'pgcache: not a superuser, so no event trigger: run pgcache_watch again after adding partitions to a watched table';
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Logical replication (the module's `invalidation_source replication`):
-- publish the tables instead of watching them. No trigger, nothing runs on
-- a write; the module streams the publication's changes from its slot.
--
--   SELECT pgcache_publish('users');                        -- publication pgcache
--   SELECT pgcache_publish('app.accounts', 'my_pub');       -- the module's replication_publication
--   SELECT pgcache_unpublish('users');
--
-- PostgreSQL 13 or later. The table's owner runs these; creating the
-- publication also needs CREATE on the database, and adding to an existing
-- one needs to own it. Tables are added one by one, never FOR ALL TABLES: a
-- published table without a replica identity would make the application's
-- UPDATE and DELETE fail, and a write must never fail because of the cache.
-- So pgcache_publish refuses a table without a primary key, and one (or a
-- partition of one) with REPLICA IDENTITY NOTHING or USING INDEX; DEFAULT
-- (the primary key) and FULL are fine.
--
-- Partitioned tables: publish the partitioned table (the root of the tree),
-- never a partition. The publication needs publish_via_partition_root, so
-- changes name the root, as clients do; pgcache_publish creates it so, and
-- refuses to add a partitioned table to an existing publication without it
-- rather than change what the publication's other subscribers receive.
-- It also refuses an existing publication that does not publish all of
-- INSERT, UPDATE, DELETE and TRUNCATE, or that holds the table with a row
-- filter or column list (PostgreSQL 15+): the cache would miss changes.
--
-- Idempotent: publishing a published table, or unpublishing one that is not
-- (or from a publication that does not exist), does nothing.

-- TRUNCATE of a partition: with publish_via_partition_root, pgoutput sends
-- nothing for it (it sends only the roots' changes). A statement trigger on
-- each partition notes the truncation in pgcache_truncations, which is
-- published too: the module flushes the root's entries when the note's
-- change arrives, in the truncating transaction's order. SECURITY DEFINER:
-- whoever may TRUNCATE a partition needs no grant on the notes.
CREATE TABLE IF NOT EXISTS pgcache_truncations (
    root_schema text NOT NULL,
    root_name   text NOT NULL,
    truncated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (root_schema, root_name)
);

CREATE OR REPLACE FUNCTION pgcache_note_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    root oid := pg_catalog.pg_partition_root(TG_RELID);
    note regclass := pg_catalog.format('%I.pgcache_truncations', TG_ARGV[0])::regclass;
BEGIN
    EXECUTE pg_catalog.format(
        'INSERT INTO %s AS t (root_schema, root_name) '
        'SELECT n.nspname, c.relname FROM pg_catalog.pg_class c '
        'JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 '
        'ON CONFLICT (root_schema, root_name) DO UPDATE SET truncated_at = pg_catalog.now()', note)
        USING root;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_publish(tbl regclass, pub name DEFAULT 'pgcache') RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel record;
    part record;
    p record;
    filtered boolean;
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int < 130000 THEN
        RAISE EXCEPTION 'pgcache_publish: PostgreSQL 13 or later is needed (this is %); use pgcache_watch',
            pg_catalog.current_setting('server_version');
    END IF;
    SELECT c.relkind, c.relispartition INTO rel FROM pg_catalog.pg_class c WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgcache_publish: % is not a table', tbl;
    END IF;
    IF rel.relispartition THEN
        RAISE EXCEPTION 'pgcache_publish: % is a partition: publish the partitioned table % instead',
            tbl, pg_catalog.pg_partition_root(tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        RAISE EXCEPTION 'pgcache_publish: table % has no primary key', tbl;
    END IF;
    -- The table and every partition under it (pg_partition_tree lists a
    -- plain table's nothing): an UPDATE or DELETE of any of them fails once
    -- published if its replica identity sends no key.
    FOR part IN SELECT c.oid::regclass AS rel, c.relreplident
                  FROM (SELECT tbl::oid AS relid, 0 AS level
                        UNION ALL
                        SELECT pt.relid, pt.level FROM pg_catalog.pg_partition_tree(tbl) pt
                         WHERE pt.relid <> tbl) t
                  JOIN pg_catalog.pg_class c ON c.oid = t.relid
                 WHERE c.relkind IN ('r', 'p') AND c.relreplident IN ('n', 'i')
                 ORDER BY t.level LIMIT 1 LOOP
        RAISE EXCEPTION 'pgcache_publish: table % has REPLICA IDENTITY %; pgcache needs DEFAULT (the primary key) or FULL',
            CASE WHEN part.rel = tbl THEN tbl::text ELSE part.rel::text || ' (a partition of ' || tbl::text || ')' END,
            CASE part.relreplident WHEN 'n' THEN 'NOTHING' ELSE 'USING INDEX' END
            USING HINT = pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY DEFAULT', part.rel);
    END LOOP;

    SELECT x.oid, x.puballtables, x.pubinsert, x.pubupdate, x.pubdelete, x.pubtruncate, x.pubviaroot
      INTO p FROM pg_catalog.pg_publication x WHERE x.pubname = pub;
    IF NOT FOUND THEN
        EXECUTE pg_catalog.format(
            'CREATE PUBLICATION %I WITH (publish = %L, publish_via_partition_root = true)',
            pub, 'insert, update, delete, truncate');
        SELECT x.oid, x.puballtables, x.pubinsert, x.pubupdate, x.pubdelete, x.pubtruncate, x.pubviaroot
          INTO p FROM pg_catalog.pg_publication x WHERE x.pubname = pub;
    END IF;
    IF NOT (p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate) THEN
        RAISE EXCEPTION 'pgcache_publish: publication % does not publish all of insert, update, delete and truncate', pub
            USING HINT = pg_catalog.format(
                'ALTER PUBLICATION %I SET (publish = %L)', pub, 'insert, update, delete, truncate');
    END IF;
    IF rel.relkind = 'p' AND NOT p.pubviaroot THEN
        RAISE EXCEPTION 'pgcache_publish: % is partitioned, and publication % has publish_via_partition_root off', tbl, pub
            USING HINT = pg_catalog.format(
                'ALTER PUBLICATION %I SET (publish_via_partition_root = true), if its other subscribers allow', pub);
    END IF;
    IF p.puballtables THEN
        PERFORM pgcache_publish_truncations(tbl, pub);
        RETURN;  -- FOR ALL TABLES (made by someone else): the table is in it already
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = tbl) THEN
        IF pg_catalog.current_setting('server_version_num')::int >= 150000 THEN
            EXECUTE 'SELECT r.prqual IS NOT NULL OR r.prattrs IS NOT NULL FROM pg_catalog.pg_publication_rel r '
                    'WHERE r.prpubid = $1 AND r.prrelid = $2'
               INTO filtered USING p.oid, tbl;
            IF filtered THEN
                RAISE EXCEPTION 'pgcache_publish: publication % holds % with a row filter or column list', pub, tbl
                    USING HINT = pg_catalog.format(
                        'ALTER PUBLICATION %I DROP TABLE %s, then pgcache_publish again', pub, tbl);
            END IF;
        END IF;
        PERFORM pgcache_publish_truncations(tbl, pub);
        RETURN;
    END IF;
    -- ONLY: a plain table's inheritance children (which may have no key)
    -- stay out. A partitioned table brings its partitions whatever is said.
    EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE %s%s', pub,
        CASE WHEN rel.relkind = 'r' THEN 'ONLY ' ELSE '' END, tbl);
    PERFORM pgcache_publish_truncations(tbl, pub);
END
$$;

-- The truncation notes of a partitioned table (see pgcache_truncations):
-- its partitions' triggers, and the notes' table in the publication. Run
-- pgcache_publish again after adding partitions.
CREATE OR REPLACE FUNCTION pgcache_publish_truncations(tbl regclass, pub name) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part regclass;
    notes regclass := 'pgcache_truncations'::regclass;
    notes_schema name := (SELECT n.nspname FROM pg_catalog.pg_class c
                            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                           WHERE c.oid = 'pgcache_truncations'::regclass);
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl) <> 'p' THEN
        RETURN;
    END IF;
    FOR part IN SELECT pt.relid FROM pg_catalog.pg_partition_tree(tbl) pt WHERE pt.relid <> tbl LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        WHERE t.tgrelid = part AND t.tgname = 'pgcache_truncate_note') THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER pgcache_truncate_note AFTER TRUNCATE ON %s '
                'FOR EACH STATEMENT EXECUTE FUNCTION pgcache_note_truncate(%L)', part, notes_schema);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r
                     JOIN pg_catalog.pg_publication x ON x.oid = r.prpubid
                    WHERE x.pubname = pub AND r.prrelid = notes)
       AND NOT (SELECT x.puballtables FROM pg_catalog.pg_publication x WHERE x.pubname = pub) THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE ONLY %s', pub, notes);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_unpublish(tbl regclass, pub name DEFAULT 'pgcache') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Nothing to do when the table is not in the publication, or there is
    -- no such publication. The publication itself stays, even when empty:
    -- the module streams from it.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel r
                 JOIN pg_catalog.pg_publication x ON x.oid = r.prpubid
                WHERE x.pubname = pub AND r.prrelid = tbl) THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I DROP TABLE %s%s', pub,
            CASE WHEN (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl) = 'r'
                 THEN 'ONLY ' ELSE '' END, tbl);
    END IF;
END
$$;
