-- 006: bad rows the backend may write are refused at insert with a named constraint.
-- Both checks apply only while a row awaits fan-out: they are added NOT VALID (no scan of a
-- large outbox, no failed migration over an old row), and PostgreSQL checks a NOT VALID
-- constraint on every UPDATE of a row, so without that clause one old row over the limit
-- would make the fan-out statement that marks it fail, again and again, for every row with it.

-- The payload limit is configurable ([events] max_payload_bytes): `dispatcher migrate` replaces
-- this constraint when the setting differs, named after the limit so the error says it.
-- pg_column_size is the jsonb datum's size, read from its header: no cast to text per insert.
ALTER TABLE outbox
    DROP CONSTRAINT IF EXISTS outbox_payload_max_1mb,
    ADD CONSTRAINT outbox_payload_max_1048576_bytes
        CHECK (fanned_out_at IS NOT NULL OR pg_column_size(payload) <= 1048576) NOT VALID;

-- A timestamp outside years 1 to 9999 (or 'infinity') is valid in PostgreSQL but not in
-- Python: the dispatcher could not read the row, and every batch holding it would fail.
ALTER TABLE outbox
    DROP CONSTRAINT IF EXISTS outbox_occurred_at_between_years_1_and_9999,
    ADD CONSTRAINT outbox_occurred_at_between_years_1_and_9999
        CHECK (fanned_out_at IS NOT NULL
               OR (occurred_at > '0001-01-02 00:00:00+00'
                   AND occurred_at < '9999-12-31 00:00:00+00')) NOT VALID;
