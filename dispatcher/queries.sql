-- Every query the dispatcher runs, one named block each ("-- name: x"), loaded by dispatcher.db.
-- Connections run with search_path set to the configured schema, so names are unqualified.
-- Hot-path statements are set-based: one statement per batch, never one per row.

-- name: fan_out
-- Turn up to $1 new outbox rows into one delivery per subscribed endpoint, and mark the rows.
-- Deliveries that fit a free slot here are claimed on the spot (status delivering, attempt 1,
-- leased for $6 seconds) and returned with their event, so a fresh event costs one write
-- before it is sent; the rest wait as pending (due after $7, the schedule's first delay) or
-- paused. Slots: at most $1 claims in all, $4 for each endpoint in $3, none for those in $2,
-- otherwise the endpoint's max_in_flight or $5.
-- SKIP LOCKED lets replicas fan out side by side; the unique key makes a repeat a no-op.
-- One row per event; events without a subscribed endpoint come back with a null delivery.
WITH ev AS MATERIALIZED (
    SELECT seq, event_id, tenant, event_type, payload, occurred_at, ordering_key
    FROM outbox
    WHERE fanned_out_at IS NULL
    ORDER BY seq
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE outbox o SET fanned_out_at = now()
    FROM ev
    WHERE o.seq = ev.seq
), quota AS (
    SELECT q.endpoint_id, q.free FROM unnest($3::bigint[], $4::int[]) AS q (endpoint_id, free)
), targets AS (
    SELECT ev.seq, ev.event_id, e.id AS endpoint_id, e.enabled,
           e.enabled AND $7::float8 = 0 AND e.id <> ALL ($2::bigint[])
           AND row_number() OVER (PARTITION BY e.id ORDER BY ev.seq)
               <= coalesce(q.free, e.max_in_flight, $5) AS fits
    FROM ev
    JOIN endpoints e ON e.tenant = ev.tenant AND event_matches(e.event_types, ev.event_type)
    LEFT JOIN quota q ON q.endpoint_id = e.id
), placed AS (
    SELECT t.seq, t.event_id, t.endpoint_id, t.enabled,
           t.fits AND sum(t.fits::int) OVER (ORDER BY t.seq, t.endpoint_id) <= $1 AS claimed
    FROM targets t
), inserted AS (
    INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, attempts, next_attempt_at,
                            last_attempt_at)
    SELECT p.seq, p.event_id, p.endpoint_id,
           CASE WHEN p.claimed THEN 'delivering' WHEN p.enabled THEN 'pending' ELSE 'paused' END,
           CASE WHEN p.claimed THEN 1 ELSE 0 END,
           now() + make_interval(secs => CASE WHEN p.claimed THEN $6 ELSE $7 END),
           CASE WHEN p.claimed THEN now() END
    FROM placed p
    ORDER BY p.seq, p.endpoint_id
    ON CONFLICT (event_seq, endpoint_id) DO NOTHING
    RETURNING id, event_seq, endpoint_id, status, attempts
)
SELECT ev.seq, i.id, i.attempts, i.status, i.endpoint_id, e.version AS endpoint_version,
       ev.event_id, ev.tenant, ev.event_type,
       CASE WHEN i.status = 'delivering' THEN ev.payload::text END AS payload,
       ev.occurred_at, ev.ordering_key
FROM ev
LEFT JOIN inserted i ON i.event_seq = ev.seq
LEFT JOIN endpoints e ON e.id = i.endpoint_id
ORDER BY ev.seq, i.id;

-- name: claim
-- Claim up to $1 due deliveries (or ones whose lease ran out), at most $5-per-endpoint free
-- slots, skipping endpoints in $2 that have no free slot here. The claim bumps `attempts` (the
-- fence every write-back names) and pushes next_attempt_at out by the lease ($6 seconds).
-- A pending row whose endpoint was disabled meanwhile is parked as paused instead.
WITH candidates AS MATERIALIZED (
    SELECT d.id, d.endpoint_id, d.next_attempt_at
    FROM deliveries d
    WHERE d.status IN ('pending', 'delivering')
      AND d.next_attempt_at <= now()
      AND d.endpoint_id <> ALL ($2::bigint[])
    ORDER BY d.next_attempt_at
    LIMIT $1 * 2
    FOR UPDATE SKIP LOCKED
), quota AS (
    SELECT q.endpoint_id, q.free FROM unnest($3::bigint[], $4::int[]) AS q (endpoint_id, free)
), chosen AS (
    SELECT r.id
    FROM (SELECT c.id, c.endpoint_id, c.next_attempt_at,
                 row_number() OVER (PARTITION BY c.endpoint_id
                                    ORDER BY c.next_attempt_at, c.id) AS rank
          FROM candidates c) AS r
    JOIN endpoints e ON e.id = r.endpoint_id
    LEFT JOIN quota q ON q.endpoint_id = r.endpoint_id
    WHERE r.rank <= coalesce(q.free, least(coalesce(e.max_in_flight, $5), $1))
       OR NOT e.enabled
    ORDER BY r.next_attempt_at, r.id
    LIMIT $1
)
UPDATE deliveries d
SET status = CASE WHEN e.enabled THEN 'delivering' ELSE 'paused' END,
    attempts = CASE WHEN e.enabled THEN d.attempts + 1 ELSE d.attempts END,
    next_attempt_at = CASE WHEN e.enabled THEN now() + make_interval(secs => $6)
                           ELSE d.next_attempt_at END,
    last_attempt_at = CASE WHEN e.enabled THEN now() ELSE d.last_attempt_at END
FROM chosen c, endpoints e, outbox o
WHERE d.id = c.id AND e.id = d.endpoint_id AND o.seq = d.event_seq
RETURNING d.id, d.attempts, d.status, d.endpoint_id, e.version AS endpoint_version,
          coalesce(e.max_in_flight, $5) AS endpoint_cap, o.event_id, o.tenant, o.event_type, o.payload::text AS payload, o.occurred_at,
          o.ordering_key;

-- name: record_results
-- Write back a batch of finished attempts in one statement (one round trip, one commit):
-- the deliveries' new state, fenced on the claim (a row another process has re-claimed since
-- its lease ran out keeps that process's state), one attempts row per try (decision
-- 'superseded' when fenced off), and the endpoints' failure streaks ($15: endpoint, $16: a
-- success was seen, $17: failures after the last success, $18: the injected clock's now).
-- Returns the deliveries written and the endpoints whose streak changed, as arrays.
-- Rows are found by primary key; the endpoint's enabled flag is a per-row lookup, so the
-- planner is never tempted to reach deliveries through the endpoint index.
WITH r AS (
    SELECT *
    FROM unnest($1::bigint[], $2::int[], $3::text[], $4::int[], $5::text[], $6::float8[],
                $7::text[], $8::bigint[], $9::timestamptz[], $10::int[], $11::text[],
                $12::text[], $13::text[], $14::text[])
        AS r (id, attempt, status, status_code, error, delay, event_id, endpoint_id,
              attempted_at, duration_ms, error_class, error_detail, excerpt, decision)
), updated AS (
    UPDATE deliveries d
    SET status = CASE WHEN r.status = 'pending'
                           AND NOT (SELECT e.enabled FROM endpoints e WHERE e.id = d.endpoint_id)
                      THEN 'paused' ELSE r.status END,
        next_attempt_at = CASE WHEN r.status = 'pending'
                               THEN now() + make_interval(secs => r.delay)
                               ELSE d.next_attempt_at END,
        last_status_code = r.status_code,
        last_error = r.error,
        completed_at = CASE WHEN r.status IN ('succeeded', 'failed') THEN now() END
    FROM r
    WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'delivering'
    RETURNING d.id, d.status, d.next_attempt_at
), logged AS (
    INSERT INTO attempts (delivery_id, event_id, endpoint_id, attempt, attempted_at, duration_ms,
                          status_code, error, error_detail, response_excerpt, decision,
                          next_attempt_at)
    SELECT r.id, r.event_id, r.endpoint_id, r.attempt, r.attempted_at, r.duration_ms,
           r.status_code, r.error_class, r.error_detail, r.excerpt,
           CASE WHEN u.id IS NULL THEN 'superseded'
                WHEN u.status = 'paused' THEN 'paused'
                ELSE r.decision END,
           CASE WHEN u.status = 'pending' THEN u.next_attempt_at END
    FROM r
    LEFT JOIN updated u ON u.id = r.id
), health AS (
    UPDATE endpoints e
    SET consecutive_failures = CASE WHEN h.succeeded THEN h.trailing_failures
                                    ELSE e.consecutive_failures + h.trailing_failures END,
        failing_since = CASE WHEN h.trailing_failures = 0 THEN NULL
                             WHEN h.succeeded OR e.failing_since IS NULL THEN $18::timestamptz
                             ELSE e.failing_since END,
        last_success_at = CASE WHEN h.succeeded THEN $18::timestamptz ELSE e.last_success_at END,
        last_failure_at = CASE WHEN h.trailing_failures > 0 THEN $18::timestamptz
                               ELSE e.last_failure_at END
    FROM unnest($15::bigint[], $16::bool[], $17::int[])
        AS h (endpoint_id, succeeded, trailing_failures)
    WHERE e.id = h.endpoint_id
      AND NOT (h.trailing_failures = 0 AND e.consecutive_failures = 0
               AND e.last_success_at IS NOT NULL)
    RETURNING e.id, e.enabled, e.consecutive_failures, e.failing_since
)
SELECT (SELECT array_agg(id) FROM updated) AS ids,
       (SELECT array_agg(status) FROM updated) AS statuses,
       (SELECT array_agg(next_attempt_at) FROM updated) AS next_attempts,
       (SELECT array_agg(id) FROM health) AS endpoint_ids,
       (SELECT array_agg(enabled) FROM health) AS endpoint_enabled,
       (SELECT array_agg(consecutive_failures) FROM health) AS endpoint_failures,
       (SELECT array_agg(failing_since) FROM health) AS endpoint_failing_since;

-- name: release_claims
-- Hand claimed-but-unsent deliveries back (graceful stop): due now, the claim's attempt undone.
UPDATE deliveries d
SET status = 'pending', attempts = d.attempts - 1, next_attempt_at = now()
FROM unnest($1::bigint[], $2::int[]) AS r (id, attempt)
WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'delivering';

-- name: disable_endpoints
-- Disable endpoints and pause their pending deliveries; nothing is dropped.
WITH disabled AS (
    UPDATE endpoints e
    SET enabled = false, disabled_reason = r.reason, disabled_by = $3,
        disabled_at = $4::timestamptz
    FROM unnest($1::bigint[], $2::text[]) AS r (id, reason)
    WHERE e.id = r.id AND e.enabled
    RETURNING e.id
), paused AS (
    UPDATE deliveries d SET status = 'paused'
    WHERE d.endpoint_id IN (SELECT id FROM disabled) AND d.status = 'pending'
    RETURNING 1
)
SELECT (SELECT array_agg(id) FROM disabled) AS disabled, (SELECT count(*) FROM paused) AS paused;

-- name: enable_endpoint
-- Re-enable an endpoint, clear its failing streak and make its paused deliveries due now.
WITH enabled AS (
    UPDATE endpoints
    SET enabled = true, disabled_reason = NULL, disabled_at = NULL, disabled_by = NULL,
        consecutive_failures = 0, failing_since = NULL
    WHERE id = $1
    RETURNING id
), resumed AS (
    UPDATE deliveries d SET status = 'pending', next_attempt_at = now()
    WHERE d.endpoint_id IN (SELECT id FROM enabled) AND d.status = 'paused'
    RETURNING 1
)
SELECT (SELECT count(*) FROM enabled) AS found, (SELECT count(*) FROM resumed) AS resumed;

-- name: seconds_until_due
-- How long until the earliest pending delivery or lease is due (NULL: nothing queued),
-- leaving out endpoints in $1, which have no free slot here and will say when they do.
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM deliveries
WHERE status IN ('pending', 'delivering')
  AND endpoint_id <> ALL ($1::bigint[]);

-- name: set_listener_idle
INSERT INTO listeners (replica, idle, seen_at) VALUES ($1, $2, now())
ON CONFLICT (replica) DO UPDATE SET idle = excluded.idle, seen_at = excluded.seen_at;

-- name: remove_listener
DELETE FROM listeners WHERE replica = $1;

-- name: remove_stale_listeners
-- A replica that died while idle would make every insert notify; forget it after a while.
DELETE FROM listeners WHERE seen_at < now() - make_interval(secs => $1);

-- name: endpoints_by_id
SELECT id, tenant, url, event_types, profile, signature_header, algorithm, encoding, signed,
       prefix, timestamp_header, secret, old_secret, old_secret_expires_at, headers, ordered,
       max_in_flight, timeout_ms, enabled, version
FROM endpoints
WHERE id = ANY ($1::bigint[]);

-- name: insert_endpoint
INSERT INTO endpoints (tenant, url, description, event_types, profile, signature_header,
                       algorithm, encoding, signed, prefix, timestamp_header, secret, headers,
                       ordered, max_in_flight, timeout_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
RETURNING id;

-- name: list_endpoints
-- For listings: every column but the secrets, which are shown as fingerprints by the caller.
SELECT id, tenant, url, description, event_types, profile, signature_header, algorithm, encoding,
       signed, prefix, timestamp_header, secret, old_secret, old_secret_expires_at, headers,
       ordered, max_in_flight, timeout_ms, enabled, disabled_reason, disabled_at, disabled_by,
       consecutive_failures, failing_since, last_success_at, last_failure_at, created_at,
       updated_at,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending')
           AS pending,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'paused')
           AS paused
FROM endpoints e
WHERE ($1::text IS NULL OR tenant = $1)
  AND ($2::bigint IS NULL OR id = $2)
ORDER BY id;
