-- 011: the backend's insert no longer runs the wake-up function unless a dispatcher is idle.
-- Until now every insert statement called outbox_wake_dispatcher(), a plpgsql function that
-- ran a query on `listeners`: an executor start-up and a table lock per insert, paid even
-- while every dispatcher was busy and nothing was sent. The number of idle dispatchers now
-- also lives in a sequence, kept equal to `listeners` by a trigger there; the outbox trigger's
-- WHEN clause reads it (a plain function call, no query, no plpgsql) and skips the function
-- when it is 0. Single-row pgbench inserts, one producer, PostgreSQL 15: the old trigger kept
-- 0.96 of the no-trigger rate, this one 1.03 (six interleaved 2 s runs each, i.e. no cost
-- measurable).
CREATE SEQUENCE idle_listeners MINVALUE 0 NO CYCLE;
-- The count says only how many dispatchers wait; the backend's roles must be able to read it.
GRANT SELECT ON SEQUENCE idle_listeners TO PUBLIC;

-- Recounted after every change to `listeners`, under a lock per schema, so that of two
-- replicas changing their flags at once the second to commit counts the first's change too.
-- A setval is not undone by a rollback; the next statement on `listeners` counts again, and
-- each replica's cleanup of stale rows runs one every minute (a statement trigger fires even
-- when no row is deleted).
-- The schema is written into the body here, at migration time (as in 002), and the function
-- refuses to run for any other table: it is SECURITY DEFINER (below), and must not be a way to
-- run anything as its owner for whoever attaches it to a table of their own.
DO $do$
BEGIN
    EXECUTE format($fn$
        CREATE FUNCTION count_idle_listeners() RETURNS trigger
        LANGUAGE plpgsql
        AS $body$
        BEGIN
            IF TG_RELID <> %1$L::regclass THEN
                RAISE EXCEPTION 'count_idle_listeners() serves %% only', %1$L;
            END IF;
            PERFORM pg_advisory_xact_lock(hashtext(%2$L));
            PERFORM setval(%3$L::regclass,
                           (SELECT count(*) FROM %4$I.listeners WHERE idle), true);
            RETURN NULL;
        END
        $body$
    $fn$, format('%I.listeners', current_schema()), current_schema() || '.listeners',
       format('%I.idle_listeners', current_schema()), current_schema());
END
$do$;
-- It runs as its owner (who ran the migration), so a daemon whose role was granted only the
-- tables it writes keeps working after this upgrade. Every table in it is named with its
-- schema and nothing else is searched, so no temporary table can stand in for `listeners`;
-- and no one but its owner may attach it to a trigger (the one below keeps firing).
ALTER FUNCTION count_idle_listeners() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION count_idle_listeners() FROM PUBLIC;
CREATE TRIGGER listeners_count_idle AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON listeners
    FOR EACH STATEMENT EXECUTE FUNCTION count_idle_listeners();
SELECT setval('idle_listeners', (SELECT count(*) FROM listeners WHERE idle), true);

-- The function now only notifies: its WHEN clause has already found a dispatcher waiting.
CREATE OR REPLACE FUNCTION outbox_wake_dispatcher() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$;
DROP TRIGGER outbox_wake_dispatcher ON outbox;
-- The sequence's name is resolved here, once: the clause holds its oid, not a search.
CREATE TRIGGER outbox_wake_dispatcher BEFORE INSERT ON outbox
    FOR EACH STATEMENT WHEN (pg_sequence_last_value('idle_listeners'::regclass) > 0)
    EXECUTE FUNCTION outbox_wake_dispatcher();
