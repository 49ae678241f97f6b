-- 001: the outbox the backend writes, the endpoints ops manage, and the delivery state the
-- dispatcher keeps. Runs with search_path set to the configured schema, so names are unqualified;
-- functions capture that search_path (SET search_path FROM CURRENT) for later callers.

-- Event type filters: exact names, "prefix.*" wildcards, or "*"; an empty list means all.
CREATE FUNCTION valid_event_patterns(patterns text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
    SELECT coalesce(bool_and(p ~ '^(\*|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.\*)?)$'
                             AND length(p) <= 200), true)
    FROM unnest(patterns) AS p
$$;

CREATE FUNCTION event_matches(patterns text[], event_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
    SELECT cardinality(patterns) = 0
        OR event_type = ANY (patterns)
        OR EXISTS (SELECT 1 FROM unnest(patterns) AS p
                   WHERE p = '*' OR (right(p, 2) = '.*' AND starts_with(event_type, left(p, -1))))
$$;

CREATE TABLE outbox (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      text NOT NULL DEFAULT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
    tenant        text NOT NULL,
    event_type    text NOT NULL,
    payload       jsonb NOT NULL,
    ordering_key  text,
    occurred_at   timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Set once the event's deliveries exist; the partial index below is the fan-out queue.
    fanned_out_at timestamptz,
    CONSTRAINT outbox_event_id_unique UNIQUE (event_id),
    -- The id travels in the webhook-id header: printable ASCII, no spaces.
    CONSTRAINT outbox_event_id_printable_ascii_max_200 CHECK (event_id ~ '^[!-~]{1,200}$'),
    CONSTRAINT outbox_tenant_not_empty_max_200_no_control_chars
        CHECK (tenant <> '' AND length(tenant) <= 200 AND tenant !~ '[[:cntrl:]]'),
    CONSTRAINT outbox_event_type_dotted_name_max_200
        CHECK (event_type ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(event_type) <= 200),
    CONSTRAINT outbox_payload_not_json_null CHECK (jsonb_typeof(payload) <> 'null'),
    CONSTRAINT outbox_payload_max_1mb CHECK (pg_column_size(payload) <= 1048576),
    CONSTRAINT outbox_ordering_key_max_200 CHECK (length(ordering_key) <= 200)
);
CREATE INDEX outbox_awaiting_fan_out ON outbox (seq) WHERE fanned_out_at IS NULL;
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE endpoints (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant                text NOT NULL,
    url                   text NOT NULL,
    description           text NOT NULL DEFAULT '',
    event_types           text[] NOT NULL DEFAULT '{}',
    profile               text NOT NULL DEFAULT 'standard',
    signature_header      text,
    algorithm             text NOT NULL DEFAULT 'sha256',
    encoding              text NOT NULL DEFAULT 'hex',
    signed                text NOT NULL DEFAULT 'body',
    prefix                text NOT NULL DEFAULT '',
    timestamp_header      text,
    secret                text NOT NULL,
    -- The secret a rotation replaced, still signed with until it expires.
    old_secret            text,
    old_secret_expires_at timestamptz,
    headers               jsonb NOT NULL DEFAULT '{}',
    ordered               boolean NOT NULL DEFAULT false,
    max_in_flight         integer,
    timeout_ms            integer,
    enabled               boolean NOT NULL DEFAULT true,
    disabled_reason       text,
    disabled_at           timestamptz,
    disabled_by           text,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    failing_since         timestamptz,
    last_success_at       timestamptz,
    last_failure_at       timestamptz,
    -- Bumped by a trigger whenever delivery settings change, so daemons refresh their cache.
    version               bigint NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT endpoints_tenant_not_empty_max_200_no_control_chars
        CHECK (tenant <> '' AND length(tenant) <= 200 AND tenant !~ '[[:cntrl:]]'),
    CONSTRAINT endpoints_url_http_or_https_no_credentials_max_2048
        CHECK (url ~ '^https?://[^\s/?#@]+([/?#][^\s]*)?$' AND length(url) <= 2048),
    CONSTRAINT endpoints_event_types_valid_patterns CHECK (valid_event_patterns(event_types)),
    CONSTRAINT endpoints_profile_known
        CHECK (profile IN ('standard', 'stripe', 'github', 'shopify', 'hmac')),
    CONSTRAINT endpoints_algorithm_known CHECK (algorithm IN ('sha1', 'sha256', 'sha512')),
    CONSTRAINT endpoints_encoding_known CHECK (encoding IN ('hex', 'base64')),
    CONSTRAINT endpoints_signed_known CHECK (signed IN ('body', 'timestamp.body')),
    CONSTRAINT endpoints_secret_not_empty CHECK (length(secret) >= 16),
    CONSTRAINT endpoints_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoints_max_in_flight_1_to_10000 CHECK (max_in_flight BETWEEN 1 AND 10000),
    CONSTRAINT endpoints_timeout_ms_1_to_300000 CHECK (timeout_ms BETWEEN 1 AND 300000),
    CONSTRAINT endpoints_consecutive_failures_not_negative CHECK (consecutive_failures >= 0)
);
CREATE INDEX endpoints_by_tenant ON endpoints (tenant);

CREATE FUNCTION endpoints_bump_version() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    -- Health bookkeeping (failure counts) changes often and does not affect how we send.
    IF (NEW.tenant, NEW.url, NEW.event_types, NEW.profile, NEW.signature_header, NEW.algorithm,
        NEW.encoding, NEW.signed, NEW.prefix, NEW.timestamp_header, NEW.secret, NEW.old_secret,
        NEW.old_secret_expires_at, NEW.headers, NEW.ordered, NEW.max_in_flight, NEW.timeout_ms,
        NEW.enabled)
       IS DISTINCT FROM
       (OLD.tenant, OLD.url, OLD.event_types, OLD.profile, OLD.signature_header, OLD.algorithm,
        OLD.encoding, OLD.signed, OLD.prefix, OLD.timestamp_header, OLD.secret, OLD.old_secret,
        OLD.old_secret_expires_at, OLD.headers, OLD.ordered, OLD.max_in_flight, OLD.timeout_ms,
        OLD.enabled)
    THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER endpoints_bump_version BEFORE UPDATE ON endpoints
    FOR EACH ROW EXECUTE FUNCTION endpoints_bump_version();

CREATE TABLE deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq        bigint NOT NULL,
    event_id         text NOT NULL,
    endpoint_id      bigint NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending',
    -- Incremented by every claim; a write-back must name the count it claimed (the fence).
    attempts         integer NOT NULL DEFAULT 0,
    -- When pending: when the next try is due. When delivering: when the claim's lease ends.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    CONSTRAINT deliveries_one_per_event_and_endpoint UNIQUE (event_seq, endpoint_id),
    CONSTRAINT deliveries_status_known
        CHECK (status IN ('pending', 'delivering', 'succeeded', 'failed', 'paused'))
);
-- The claim queue: due work and expired leases, in due order.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX deliveries_by_endpoint ON deliveries (endpoint_id, status);
CREATE INDEX deliveries_by_event ON deliveries (event_id);
ALTER TABLE deliveries SET (autovacuum_vacuum_scale_factor = 0.02,
                            autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE attempts (
    delivery_id      bigint NOT NULL,
    event_id         text NOT NULL,
    endpoint_id      bigint NOT NULL,
    attempt          integer NOT NULL,
    attempted_at     timestamptz NOT NULL,
    duration_ms      integer NOT NULL,
    status_code      integer,
    error            text,
    error_detail     text,
    response_excerpt text,
    -- What the dispatcher decided after this try: succeeded, retry, failed, paused.
    decision         text NOT NULL,
    next_attempt_at  timestamptz
);
CREATE INDEX attempts_by_delivery ON attempts (delivery_id, attempt);
CREATE INDEX attempts_by_time ON attempts (attempted_at);

-- Dispatchers waiting for work. The outbox trigger notifies only while one is idle, so a busy
-- dispatcher costs the backend's commits nothing (a NOTIFY takes a cluster-wide commit lock).
CREATE TABLE listeners (
    replica text PRIMARY KEY,
    idle    boolean NOT NULL DEFAULT false,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION outbox_wake_dispatcher() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM listeners WHERE idle) THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_wake_dispatcher AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake_dispatcher();
