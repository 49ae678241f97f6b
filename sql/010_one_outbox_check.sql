-- 010: the outbox's row rules in one check, a function call, instead of six separate CHECK
-- expressions. PostgreSQL prepares every CHECK expression of a table again for each INSERT
-- statement, so for the backend's one-row inserts the six cost more than the row write
-- itself: 13 us of 25 us per insert in a loop of single-row INSERTs (PostgreSQL 15), against
-- 3.5 us for one plpgsql call that tests the same rules. The rules are unchanged; a violation
-- still raises check_violation naming the rule's old constraint, now with a message that says
-- what is allowed. Like the payload limit (006), the check applies while a row awaits fan-out,
-- so the fan-out's UPDATE of the row does not run it again.

CREATE FUNCTION outbox_row_valid(
    tenant text, event_type text, event_id text, payload jsonb, ordering_key text,
    occurred_at timestamptz
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    -- The rules in the order PostgreSQL ran the separate constraints (by name).
    IF NOT (length(event_id) BETWEEN 1 AND 200 AND event_id !~ '[^!-~]') THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_event_id_printable_ascii_max_200": '
                        'event_id must be 1 to 200 printable ASCII characters, no spaces'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_event_id_printable_ascii_max_200';
    END IF;
    IF NOT (event_type ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(event_type) <= 200) THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_event_type_dotted_name_max_200": '
                        'event_type must be a dotted name of ASCII letters, digits, _ and - (points.earned), at most 200 characters'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_event_type_dotted_name_max_200';
    END IF;
    IF NOT (occurred_at > '0001-01-02 00:00:00+00' AND occurred_at < '9999-12-31 00:00:00+00') THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_occurred_at_between_years_1_and_9999": '
                        'occurred_at must be a finite time within the years 1 to 9999'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_occurred_at_between_years_1_and_9999';
    END IF;
    IF NOT (ordering_key IS NULL OR length(ordering_key) <= 200) THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_ordering_key_max_200": '
                        'ordering_key must be at most 200 characters'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_ordering_key_max_200';
    END IF;
    IF jsonb_typeof(payload) = 'null' THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_payload_not_json_null": '
                        'payload must be a JSON value other than null'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_payload_not_json_null';
    END IF;
    IF NOT (tenant <> '' AND length(tenant) <= 200 AND tenant !~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'new row for relation "outbox" violates check constraint "outbox_tenant_not_empty_max_200_no_control_chars": '
                        'tenant must be 1 to 200 characters without control characters'
            USING ERRCODE = 'check_violation', TABLE = 'outbox',
                  CONSTRAINT = 'outbox_tenant_not_empty_max_200_no_control_chars';
    END IF;
    RETURN true;
END
$$;

-- NOT VALID: the rows already there passed the same rules under the old constraints.
ALTER TABLE outbox
    DROP CONSTRAINT outbox_event_id_printable_ascii_max_200,
    DROP CONSTRAINT outbox_event_type_dotted_name_max_200,
    DROP CONSTRAINT outbox_occurred_at_between_years_1_and_9999,
    DROP CONSTRAINT outbox_ordering_key_max_200,
    DROP CONSTRAINT outbox_payload_not_json_null,
    DROP CONSTRAINT outbox_tenant_not_empty_max_200_no_control_chars,
    ADD CONSTRAINT outbox_row_valid
        CHECK (fanned_out_at IS NOT NULL
               OR outbox_row_valid(tenant, event_type, event_id, payload, ordering_key,
                                   occurred_at)) NOT VALID;
