-- 004: envelope shapes per endpoint, so receivers written for another platform's payloads
-- work unchanged. Both columns NULL (every existing row) means the contract's envelope
-- {"id","type","tenant","timestamp","data"}.
--   envelope         'data' sends the payload alone; NULL or 'full' the envelope.
--   envelope_fields  renames envelope fields: {"id": "uuid", "type": "event", ...}.
-- Written to be harmless when run again: columns, constraints and the trigger are replaced.
ALTER TABLE endpoints
    ADD COLUMN IF NOT EXISTS envelope text,
    ADD COLUMN IF NOT EXISTS envelope_fields jsonb;

-- The sent names must be usable JSON keys that cannot collide: strings of 1 to 100 characters
-- without control characters, different from each other and from the fields left unrenamed.
CREATE OR REPLACE FUNCTION valid_envelope_field_names(fields jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT fields IS NULL OR jsonb_typeof(fields) <> 'object' OR (
        NOT EXISTS (SELECT 1 FROM jsonb_each(fields) AS f
                    WHERE jsonb_typeof(f.value) <> 'string'
                       OR f.value #>> '{}' = ''
                       OR length(f.value #>> '{}') > 100
                       OR f.value #>> '{}' ~ '[\x01-\x1f\x7f-\x9f]')
        AND (SELECT count(DISTINCT coalesce(fields ->> k, k)) = 5
             FROM unnest(ARRAY['id', 'type', 'tenant', 'timestamp', 'data']) AS k))
$$;

ALTER TABLE endpoints
    DROP CONSTRAINT IF EXISTS endpoints_envelope_full_or_data,
    DROP CONSTRAINT IF EXISTS endpoints_envelope_fields_object_of_id_type_tenant_timestamp_data,
    DROP CONSTRAINT IF EXISTS endpoints_envelope_fields_distinct_names_1_to_100_chars,
    DROP CONSTRAINT IF EXISTS endpoints_envelope_fields_only_with_full_envelope;
ALTER TABLE endpoints
    ADD CONSTRAINT endpoints_envelope_full_or_data CHECK (envelope IN ('full', 'data')),
    ADD CONSTRAINT endpoints_envelope_fields_object_of_id_type_tenant_timestamp_data
        CHECK (jsonb_typeof(envelope_fields) = 'object'
               AND envelope_fields - ARRAY['id', 'type', 'tenant', 'timestamp', 'data']
                   = '{}'::jsonb),
    ADD CONSTRAINT endpoints_envelope_fields_distinct_names_1_to_100_chars
        CHECK (valid_envelope_field_names(envelope_fields)),
    ADD CONSTRAINT endpoints_envelope_fields_only_with_full_envelope
        CHECK (envelope_fields IS NULL OR envelope IS DISTINCT FROM 'data');

-- Running daemons cache endpoints by version; a new envelope must bump it like any other
-- delivery setting. A trigger of its own rather than a rewrite of endpoints_bump_version(), so
-- columns other migrations add to that function's list stay there. Triggers fire in name
-- order: this one runs after endpoints_bump_version and bumps only if that one did not. The
-- WHEN clause keeps the function out of every other update (the writer's health bookkeeping).
CREATE OR REPLACE FUNCTION endpoints_bump_version_for_envelope() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.version = OLD.version THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS endpoints_bump_version_for_envelope ON endpoints;
CREATE TRIGGER endpoints_bump_version_for_envelope BEFORE UPDATE ON endpoints
    FOR EACH ROW
    WHEN ((NEW.envelope, NEW.envelope_fields) IS DISTINCT FROM (OLD.envelope, OLD.envelope_fields))
    EXECUTE FUNCTION endpoints_bump_version_for_envelope();
