-- pgcache: triggers that tell the pgcache Redis module when rows change.
--
--   SELECT pgcache_watch('users');                          -- channel cache_invalidation
--   SELECT pgcache_watch('app.accounts', 'my_channel');     -- the module's invalidation_channel
--   SELECT pgcache_unwatch('users');
--
-- The row trigger sends only the primary-key columns of the old and new row,
-- so a payload stays far below NOTIFY's 8000-byte limit whatever the row's
-- width, and a write never fails because of the cache. A statement trigger
-- makes TRUNCATE drop the table's entries. Idempotent: run this file, and
-- pgcache_watch, as often as you like.

CREATE OR REPLACE FUNCTION pgcache_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := TG_ARGV[0];
    pk text[] := '{}';
    old_pk jsonb;
    new_pk jsonb;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM pg_notify(channel, json_build_object(
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'operation', TG_OP)::text);
        RETURN NULL;
    END IF;
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        pk := pk || TG_ARGV[i];
    END LOOP;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT jsonb_object_agg(key, value) INTO old_pk
          FROM jsonb_each(to_jsonb(OLD)) WHERE key = ANY (pk);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT jsonb_object_agg(key, value) INTO new_pk
          FROM jsonb_each(to_jsonb(NEW)) WHERE key = ANY (pk);
    END IF;
    IF TG_OP = 'UPDATE' AND old_pk = new_pk THEN
        new_pk := NULL;
    END IF;
    PERFORM pg_notify(channel, json_build_object(
        'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'operation', TG_OP,
        'old_data', old_pk, 'new_data', new_pk)::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    FOR name IN SELECT tgname FROM pg_trigger
                 WHERE tgrelid = tbl AND tgname IN ('pgcache_row', 'pgcache_truncate') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', name, tbl);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgcache_watch(tbl regclass, channel text DEFAULT 'cache_invalidation')
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cols text;
BEGIN
    SELECT string_agg(quote_literal(a.attname), ', ' ORDER BY a.attnum) INTO cols
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = tbl AND i.indisprimary;
    IF cols IS NULL THEN
        RAISE EXCEPTION 'pgcache_watch: table % has no primary key', tbl;
    END IF;
    PERFORM pgcache_unwatch(tbl);
    EXECUTE format(
        'CREATE TRIGGER pgcache_row AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION pgcache_notify(%s, %s)', tbl, quote_literal(channel), cols);
    EXECUTE format(
        'CREATE TRIGGER pgcache_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION pgcache_notify(%s)', tbl, quote_literal(channel));
END
$$;
