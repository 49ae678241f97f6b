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
-- On an ordered endpoint, an event with an ordering_key is claimed only if nothing is ahead of
-- it in its key's queue: no earlier delivery holding the key, no earlier event of this batch,
-- no earlier event another replica is still fanning out (the lowest unmarked seq outside this
-- batch). One held back for its key is due only after $8 seconds: the delivery ahead of it
-- makes it due when it finishes (record_results), the delay only covers a finish this
-- statement could not see.
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
), unmarked AS MATERIALIZED (
    -- The first outbox row waiting for fan-out outside this batch (another replica's, locked):
    -- read only if a keyed delivery asks, walking the fan-out index from its start.
    SELECT o.seq
    FROM outbox o
    WHERE o.fanned_out_at IS NULL AND o.seq NOT IN (SELECT ev.seq FROM ev)
    ORDER BY o.seq
    LIMIT 1
), targets AS (
    SELECT ev.seq, ev.event_id, e.id AS endpoint_id, e.enabled, e.max_in_flight,
           CASE WHEN e.ordered THEN ev.ordering_key END AS ordering_key,
           row_number() OVER (PARTITION BY e.id, CASE WHEN e.ordered THEN ev.ordering_key END
                              ORDER BY ev.seq) AS key_rank
    FROM ev
    JOIN endpoints e ON e.tenant = ev.tenant AND event_matches(e.event_types, ev.event_type)
), keyed AS MATERIALIZED (
    SELECT t.*,
           CASE WHEN t.ordering_key IS NULL THEN true
                WHEN t.key_rank > 1 THEN false
                ELSE t.seq < coalesce((SELECT u.seq FROM unmarked u), 9223372036854775807)
                     AND NOT EXISTS (
                         SELECT 1 FROM deliveries h
                         WHERE h.endpoint_id = t.endpoint_id
                           AND h.ordering_key = t.ordering_key
                           AND h.event_seq < t.seq
                           AND (h.status IN ('pending', 'delivering', 'paused') OR h.key_blocked))
           END AS key_free
    FROM targets t
), ready AS (
    SELECT k.*,
           k.enabled AND k.key_free AND $7::float8 = 0 AND k.endpoint_id <> ALL ($2::bigint[])
           AND row_number() OVER (PARTITION BY k.endpoint_id, k.key_free ORDER BY k.seq)
               <= coalesce(q.free, k.max_in_flight, $5) AS fits
    FROM keyed k
    LEFT JOIN quota q ON q.endpoint_id = k.endpoint_id
), placed AS (
    SELECT r.seq, r.event_id, r.endpoint_id, r.enabled, r.ordering_key, r.key_free,
           r.fits AND sum(r.fits::int) OVER (ORDER BY r.seq, r.endpoint_id) <= $1 AS claimed
    FROM ready r
), inserted AS (
    INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, attempts, next_attempt_at,
                            last_attempt_at, ordering_key)
    SELECT p.seq, p.event_id, p.endpoint_id,
           CASE WHEN p.claimed THEN 'delivering' WHEN p.enabled THEN 'pending' ELSE 'paused' END,
           CASE WHEN p.claimed THEN 1 ELSE 0 END,
           now() + make_interval(secs => CASE WHEN p.claimed THEN $6
                                              WHEN p.key_free THEN $7
                                              ELSE greatest($7, $8) END),
           CASE WHEN p.claimed THEN now() END,
           p.ordering_key
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
-- A due row with an ordering_key is claimed only as its key's head (see fan_out); one that
-- finds something ahead of it is pushed back ($7 to $8 seconds, longer the longer it has
-- waited) so waiting rows do not crowd the due ones out of the window scanned here.
WITH candidates AS MATERIALIZED (
    SELECT d.id, d.endpoint_id, d.next_attempt_at,
           CASE WHEN d.ordering_key IS NULL THEN true
                ELSE d.event_seq < coalesce((SELECT min(o.seq) FROM outbox o
                                             WHERE o.fanned_out_at IS NULL),
                                            9223372036854775807)
                     AND NOT EXISTS (
                         SELECT 1 FROM deliveries h
                         WHERE h.endpoint_id = d.endpoint_id
                           AND h.ordering_key = d.ordering_key
                           AND h.event_seq < d.event_seq
                           AND (h.status IN ('pending', 'delivering', 'paused') OR h.key_blocked))
           END AS key_free
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
    FROM (SELECT c.id, c.endpoint_id, c.next_attempt_at, c.key_free,
                 row_number() OVER (PARTITION BY c.endpoint_id, c.key_free
                                    ORDER BY c.next_attempt_at, c.id) AS rank
          FROM candidates c) AS r
    JOIN endpoints e ON e.id = r.endpoint_id
    LEFT JOIN quota q ON q.endpoint_id = r.endpoint_id
    WHERE (r.key_free AND r.rank <= coalesce(q.free, least(coalesce(e.max_in_flight, $5), $1)))
       OR NOT e.enabled
    ORDER BY r.next_attempt_at, r.id
    LIMIT $1
), held_back AS (
    UPDATE deliveries d
    SET next_attempt_at = now() + make_interval(secs => least($8::float8, greatest($7::float8,
            extract(epoch FROM now() - coalesce(d.replayed_at, d.created_at))::float8)))
    FROM candidates c
    WHERE d.id = c.id AND NOT c.key_free AND d.status = 'pending'
      AND d.id NOT IN (SELECT id FROM chosen)
    RETURNING d.id
), claimed AS (
    UPDATE deliveries d
    SET status = CASE WHEN e.enabled THEN 'delivering' ELSE 'paused' END,
        attempts = CASE WHEN e.enabled THEN d.attempts + 1 ELSE d.attempts END,
        next_attempt_at = CASE WHEN e.enabled THEN now() + make_interval(secs => $6)
                               ELSE d.next_attempt_at END,
        last_attempt_at = CASE WHEN e.enabled THEN now() ELSE d.last_attempt_at END
    FROM chosen c, endpoints e, outbox o
    WHERE d.id = c.id AND e.id = d.endpoint_id AND o.seq = d.event_seq
    RETURNING d.id, d.attempts, d.status, d.endpoint_id, e.version AS endpoint_version,
              coalesce(e.max_in_flight, $5) AS endpoint_cap, o.event_id, o.tenant, o.event_type,
              o.payload::text AS payload, o.occurred_at, o.ordering_key, d.attempt_base
)
-- Always one row at least: how many were held back (they took room in the scanned window,
-- so the caller looks again at once), beside each claimed row if any.
SELECT c.*, h.held_back
FROM (SELECT count(*) AS held_back FROM held_back) AS h
LEFT JOIN claimed c ON true;

-- name: record_results
-- Write back a batch of finished attempts in one statement (one round trip, one commit):
-- the deliveries' new state, fenced on the claim (a row another process has re-claimed since
-- its lease ran out keeps that process's state), one attempts row per try (decision
-- 'superseded' when fenced off), and the endpoints' failure streaks ($15: endpoint, $16: a
-- success was seen, $17: failures after the last success, $18: the injected clock's now).
-- On ordered endpoints a finished delivery releases its key (the next one is due now), or,
-- failed under $19 (ordered_after_failure = "block"), keeps holding it (key_blocked).
-- Returns the deliveries written and the endpoints whose streak changed, as arrays; for an
-- endpoint whose failing streak this batch ended (a success after failures), also that streak's
-- failure count and start (NULL otherwise).
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
        completed_at = CASE WHEN r.status IN ('succeeded', 'failed') THEN now() END,
        key_blocked = r.status = 'failed' AND d.ordering_key IS NOT NULL AND $19::bool
    FROM r
    WHERE d.id = r.id AND d.attempts = r.attempt AND d.status = 'delivering'
    RETURNING d.id, d.status, d.next_attempt_at, d.endpoint_id, d.ordering_key, d.key_blocked
), released AS (
    -- Ordered keys this batch let go of: the next delivery in each key's queue is due now
    -- (and counted, so the pump claims at once, even if it was due already). Only one not yet
    -- tried since it was queued (attempts = attempt_base): a retry keeps its schedule. The
    -- batch's own rows still look unfinished to this statement, so they are passed over by id.
    UPDATE deliveries s
    SET next_attempt_at = now()
    FROM (SELECT DISTINCT u.endpoint_id, u.ordering_key
          FROM updated u
          WHERE u.ordering_key IS NOT NULL AND u.status IN ('succeeded', 'failed')
            AND NOT u.key_blocked) AS k
    WHERE s.id = key_head(k.endpoint_id, k.ordering_key, $1::bigint[])
      AND s.status = 'pending' AND s.attempts = s.attempt_base
    RETURNING s.id
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
    -- A batch sent again after its commit landed (the reply lost) logs nothing twice.
    ON CONFLICT (delivery_id, attempt) DO NOTHING
), ended AS (
    -- Only endpoints with a success here and failures before it. FOR NO KEY UPDATE reads the
    -- latest committed row, so when two processes record a success at once only the first
    -- sees the streak (and reports the recovery); healthy endpoints are not locked.
    SELECT p.id, p.consecutive_failures, p.failing_since
    FROM endpoints p
    WHERE p.id IN (SELECT s.endpoint_id FROM unnest($15::bigint[], $16::bool[])
                       AS s (endpoint_id, succeeded)
                   WHERE s.succeeded)
      AND p.consecutive_failures > 0
    ORDER BY p.id
    FOR NO KEY UPDATE
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
    LEFT JOIN ended x ON x.id = h.endpoint_id
    WHERE e.id = h.endpoint_id
      AND NOT (h.trailing_failures = 0 AND e.consecutive_failures = 0
               AND e.last_success_at IS NOT NULL)
    RETURNING e.id, e.enabled, e.consecutive_failures, e.failing_since,
              x.consecutive_failures AS ended_failures, x.failing_since AS ended_since
)
SELECT (SELECT array_agg(id) FROM updated) AS ids,
       (SELECT count(*) FROM released) AS released,
       (SELECT array_agg(id) FROM updated
        WHERE status = 'failed' AND ordering_key IS NOT NULL) AS ordered_failed_ids,
       (SELECT array_agg(status) FROM updated) AS statuses,
       (SELECT array_agg(next_attempt_at) FROM updated) AS next_attempts,
       (SELECT array_agg(id) FROM health) AS endpoint_ids,
       (SELECT array_agg(enabled) FROM health) AS endpoint_enabled,
       (SELECT array_agg(consecutive_failures) FROM health) AS endpoint_failures,
       (SELECT array_agg(failing_since) FROM health) AS endpoint_failing_since,
       (SELECT array_agg(ended_failures) FROM health) AS endpoint_ended_failures,
       (SELECT array_agg(ended_since) FROM health) AS endpoint_ended_since;

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
       max_in_flight, timeout_ms, enabled, version, envelope, envelope_fields
FROM endpoints
WHERE id = ANY ($1::bigint[]);

-- name: insert_endpoint
INSERT INTO endpoints (tenant, url, description, event_types, profile, signature_header,
                       algorithm, encoding, signed, prefix, timestamp_header, secret, headers,
                       ordered, max_in_flight, timeout_ms, envelope, envelope_fields)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
RETURNING id;

-- name: list_endpoints
-- For listings: every column but the secrets, which are shown as fingerprints by the caller.
SELECT id, tenant, url, description, event_types, profile, signature_header, algorithm, encoding,
       signed, prefix, timestamp_header, secret, old_secret, old_secret_expires_at, headers,
       ordered, max_in_flight, timeout_ms, enabled, disabled_reason, disabled_at, disabled_by,
       consecutive_failures, failing_since, last_success_at, last_failure_at, created_at,
       updated_at, envelope, envelope_fields,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending')
           AS pending,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'paused')
           AS paused
FROM endpoints e
WHERE ($1::text IS NULL OR tenant = $1)
  AND ($2::bigint IS NULL OR id = $2)
ORDER BY id;

-- name: list_deliveries
-- The delivery log (dispatcher/deliverylog.py), newest first, at most $9.
-- The CLI runs these with plan_cache_mode = force_custom_plan: each filter left NULL then folds
-- away at planning, and each one set can use its index (the endpoint's, deliveries_by_endpoint;
-- the event's, the outbox's unique event_id then the (event_seq, endpoint_id) key; otherwise the
-- primary key). Filters, shared by the three selections: $1 delivery ids, $2 tenant (of the
-- endpoint), $3 endpoint id, $4 event id, $5 event type, $6 statuses, $7 created at or after,
-- $8 created before. The outbox is LEFT JOINed so deliveries outlive a pruned event.
-- next_attempt_at is shown only while pending (waiting for a retry or a free slot): while
-- delivering it is the claim's lease, not a time anyone waits for. On an ordered endpoint,
-- waiting_behind is the delivery at the head of the key's queue that this one waits for.
SELECT d.id, d.event_id, o.event_type, o.tenant, d.endpoint_id, d.status, d.attempts,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       d.last_attempt_at, d.last_status_code, d.last_error, d.created_at, d.completed_at,
       d.replayed_at, d.ordering_key, d.key_blocked,
       CASE WHEN d.ordering_key IS NOT NULL AND d.status IN ('pending', 'paused')
            THEN key_waits_behind(d.endpoint_id, d.ordering_key, d.event_seq)
       END AS waiting_behind
FROM deliveries d
LEFT JOIN outbox o ON o.seq = d.event_seq
WHERE ($1::bigint[] IS NULL OR d.id = ANY ($1))
  AND ($2::text IS NULL OR d.endpoint_id IN (SELECT t.id FROM endpoints t WHERE t.tenant = $2))
  AND ($3::bigint IS NULL OR d.endpoint_id = $3)
  AND ($4::text IS NULL OR d.event_seq = (SELECT x.seq FROM outbox x WHERE x.event_id = $4))
  AND ($5::text IS NULL OR o.event_type = $5)
  AND ($6::text[] IS NULL OR d.status = ANY ($6))
  AND ($7::timestamptz IS NULL OR d.created_at >= $7)
  AND ($8::timestamptz IS NULL OR d.created_at < $8)
ORDER BY d.id DESC
LIMIT $9;

-- name: count_replayable
-- What a replay with these filters would do: re-queue (as pending, or paused while the endpoint
-- is disabled), or pass over because a claim holds the row (delivering).
SELECT count(*) FILTER (WHERE d.status <> 'delivering') AS replayable,
       count(*) FILTER (WHERE d.status <> 'delivering' AND NOT e.enabled) AS paused,
       count(*) FILTER (WHERE d.status = 'delivering') AS in_flight
FROM deliveries d
JOIN endpoints e ON e.id = d.endpoint_id
LEFT JOIN outbox o ON o.seq = d.event_seq
WHERE ($1::bigint[] IS NULL OR d.id = ANY ($1))
  AND ($2::text IS NULL OR d.endpoint_id IN (SELECT t.id FROM endpoints t WHERE t.tenant = $2))
  AND ($3::bigint IS NULL OR d.endpoint_id = $3)
  AND ($4::text IS NULL OR d.event_seq = (SELECT x.seq FROM outbox x WHERE x.event_id = $4))
  AND ($5::text IS NULL OR o.event_type = $5)
  AND ($6::text[] IS NULL OR d.status = ANY ($6))
  AND ($7::timestamptz IS NULL OR d.created_at >= $7)
  AND ($8::timestamptz IS NULL OR d.created_at < $8);

-- name: replay_deliveries
-- Replay the next batch: the first $10 selected deliveries with an id above $9, each in one
-- short statement so a large replay never holds many row locks for long. A replayed delivery
-- is due now with a fresh retry schedule (attempt_base = attempts: `attempts` stays the fence)
-- and no completed_at; its past attempts stay in the log. Paused while its endpoint is
-- disabled (enabling resumes it). On an ordered endpoint it rejoins its key's queue, so a
-- replay re-sends each key in outbox order. A row being delivered is passed over, re-checked under its
-- row lock: resetting it would send a second copy beside the one in flight, and that attempt
-- settles the row anyway. Returns the last id looked at (the next batch starts after it).
WITH picked AS (
    SELECT d.id
    FROM deliveries d
    LEFT JOIN outbox o ON o.seq = d.event_seq
    WHERE d.id > $9
      AND ($1::bigint[] IS NULL OR d.id = ANY ($1))
      AND ($2::text IS NULL OR d.endpoint_id IN (SELECT t.id FROM endpoints t WHERE t.tenant = $2))
      AND ($3::bigint IS NULL OR d.endpoint_id = $3)
      AND ($4::text IS NULL OR d.event_seq = (SELECT x.seq FROM outbox x WHERE x.event_id = $4))
      AND ($5::text IS NULL OR o.event_type = $5)
      AND ($6::text[] IS NULL OR d.status = ANY ($6))
      AND ($7::timestamptz IS NULL OR d.created_at >= $7)
      AND ($8::timestamptz IS NULL OR d.created_at < $8)
    ORDER BY d.id
    LIMIT $10
), replayed AS (
    UPDATE deliveries d
    SET status = CASE WHEN e.enabled THEN 'pending' ELSE 'paused' END,
        next_attempt_at = now(),
        completed_at = NULL,
        attempt_base = d.attempts,
        replayed_at = now(),
        -- On an ordered endpoint the replay queues behind its key again, in outbox order.
        ordering_key = CASE WHEN e.ordered
                            THEN (SELECT o.ordering_key FROM outbox o WHERE o.seq = d.event_seq)
                       END,
        key_blocked = false
    FROM picked p, endpoints e
    WHERE d.id = p.id AND e.id = d.endpoint_id AND d.status <> 'delivering'
    RETURNING d.status
)
SELECT (SELECT max(id) FROM picked) AS last_id,
       (SELECT count(*) FROM picked) AS picked,
       (SELECT count(*) FROM replayed) AS replayed,
       (SELECT count(*) FROM replayed WHERE status = 'paused') AS paused;

-- name: missing_deliveries
-- Which of the delivery ids $1 do not exist.
SELECT coalesce(array_agg(i ORDER BY i), '{}') AS ids
FROM unnest($1::bigint[]) AS i
WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = i);

-- name: show_delivery
SELECT d.id, d.event_id, o.event_type, o.tenant, o.occurred_at, o.ordering_key,
       o.payload::text AS payload, d.endpoint_id, e.url AS endpoint_url,
       e.enabled AS endpoint_enabled, d.status, d.attempts, d.attempt_base, d.next_attempt_at,
       d.last_attempt_at, d.last_status_code, d.last_error, d.created_at, d.completed_at,
       d.replayed_at, d.ordering_key IS NOT NULL AS ordered, d.key_blocked,
       CASE WHEN d.ordering_key IS NOT NULL AND d.status IN ('pending', 'paused')
            THEN key_waits_behind(d.endpoint_id, d.ordering_key, d.event_seq)
       END AS waiting_behind
FROM deliveries d
JOIN endpoints e ON e.id = d.endpoint_id
LEFT JOIN outbox o ON o.seq = d.event_seq
WHERE d.id = $1;

-- name: delivery_attempts
-- Every logged attempt of delivery $1, in order (attempts_one_per_claim).
SELECT attempt, attempted_at, duration_ms, status_code, error, error_detail, response_excerpt,
       decision, next_attempt_at
FROM attempts
WHERE delivery_id = $1
ORDER BY attempt, attempted_at;

-- name: delivery_status
-- The backlog and throughput for `dispatcher status`, from indexes: the queue's partial index
-- (pending, delivering), the outbox's (not fanned out), deliveries_by_endpoint (paused, failed;
-- a skip scan over its endpoints) and attempts_by_time for the last $1 seconds: a delivery's
-- final attempt is logged with decision succeeded or failed, so the attempt log counts
-- completions without a scan of deliveries.completed_at, which has no index (and should not:
-- every index there costs every write of the hot path).
WITH queue AS (
    SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()) AS due,
           count(*) FILTER (WHERE status = 'delivering') AS delivering,
           min(created_at) AS oldest
    FROM deliveries
    WHERE status IN ('pending', 'delivering')
), waiting AS (
    SELECT count(*) AS outbox, min(created_at) AS oldest
    FROM outbox
    WHERE fanned_out_at IS NULL
), recent AS (
    SELECT count(*) FILTER (WHERE decision = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE decision = 'failed') AS failed,
           count(*) AS attempts
    FROM attempts
    WHERE attempted_at > now() - make_interval(secs => $1)
)
SELECT w.outbox, q.pending, q.due, q.delivering,
       (SELECT count(*) FROM deliveries WHERE status = 'paused') AS paused,
       (SELECT count(*) FROM deliveries WHERE status = 'failed') AS failed,
       extract(epoch FROM now() - least(q.oldest, w.oldest))::float8 AS oldest_pending_age_s,
       r.succeeded, r.failed AS failed_recently, r.attempts,
       (SELECT count(*) FROM endpoints) AS endpoints,
       (SELECT count(*) FROM endpoints WHERE NOT enabled) AS endpoints_disabled
FROM queue q, waiting w, recent r;

-- name: troubled_endpoints
-- Endpoints disabled or failing now (a streak of consecutive failures), the worst first.
SELECT e.id, e.tenant, e.url, e.enabled, e.consecutive_failures, e.failing_since,
       e.last_failure_at, e.last_success_at, e.disabled_reason, e.disabled_at, e.disabled_by,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'pending')
           AS pending,
       (SELECT count(*) FROM deliveries d WHERE d.endpoint_id = e.id AND d.status = 'paused')
           AS paused
FROM endpoints e
WHERE NOT e.enabled OR e.consecutive_failures > 0
ORDER BY e.enabled, e.consecutive_failures DESC, e.id;

-- Retention (dispatcher/retention.py) ------------------------------------------------------
-- A pass walks deliveries by primary key and the outbox by seq, $2 rows per statement, each
-- statement its own short transaction. There is no index on deliveries.completed_at on
-- purpose: every write-back would pay for it. Rows are created in id order, so a walk stops
-- once it sees rows created after the cut-off. Only rows about to be deleted are locked, with
-- SKIP LOCKED (a row someone holds, e.g. a replay, waits for the next pass) and re-checked
-- under the lock; pending, delivering and paused rows are only read.

-- name: prune_try_lock
-- One pruner per schema at a time (session-level; released by prune_unlock or disconnect).
SELECT pg_try_advisory_lock(hashtext($1));

-- name: prune_unlock
SELECT pg_advisory_unlock(hashtext($1));

-- name: prune_cutoffs
-- The pass's cut-offs, on the database's clock: completed before these, rows go.
SELECT now() - make_interval(secs => $1) AS succeeded,
       now() - make_interval(secs => $2) AS failed;

-- name: prune_deliveries
-- Of the $2 deliveries after id $1: delete the succeeded ones completed before $3 and the
-- failed ones completed before $4, and their attempts. Returns the last id and the newest
-- created_at looked at (where the walk goes on, and whether it is past the cut-off).
WITH walked AS MATERIALIZED (
    SELECT id, status, completed_at, created_at
    FROM deliveries
    WHERE id > $1
    ORDER BY id
    LIMIT $2
), doomed AS MATERIALIZED (
    SELECT d.id
    FROM deliveries d
    WHERE d.id = ANY (ARRAY(
              SELECT w.id FROM walked w
              WHERE w.completed_at < CASE w.status WHEN 'succeeded' THEN $3::timestamptz
                                                   WHEN 'failed' THEN $4::timestamptz END))
      AND d.completed_at < CASE d.status WHEN 'succeeded' THEN $3::timestamptz
                                         WHEN 'failed' THEN $4::timestamptz END
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM deliveries d
    WHERE d.id = ANY (ARRAY(SELECT id FROM doomed))
    RETURNING d.id, d.status
), attempts_deleted AS (
    DELETE FROM attempts a
    WHERE a.delivery_id = ANY (ARRAY(SELECT id FROM deleted))
    RETURNING 1
)
SELECT (SELECT max(id) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT max(created_at) FROM walked) AS newest,
       (SELECT count(*) FROM deleted WHERE status = 'succeeded') AS succeeded,
       (SELECT count(*) FROM deleted WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM attempts_deleted) AS attempts;

-- name: count_prunable_deliveries
-- prune_deliveries without deleting: what it would delete (prune --dry-run).
WITH walked AS MATERIALIZED (
    SELECT id, status, completed_at, created_at
    FROM deliveries
    WHERE id > $1
    ORDER BY id
    LIMIT $2
), doomed AS MATERIALIZED (
    SELECT w.id, w.status
    FROM walked w
    WHERE w.completed_at < CASE w.status WHEN 'succeeded' THEN $3::timestamptz
                                         WHEN 'failed' THEN $4::timestamptz END
)
SELECT (SELECT max(id) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT max(created_at) FROM walked) AS newest,
       (SELECT count(*) FROM doomed WHERE status = 'succeeded') AS succeeded,
       (SELECT count(*) FROM doomed WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM attempts a
        WHERE a.delivery_id = ANY (ARRAY(SELECT id FROM doomed))) AS attempts;

-- name: prune_outbox
-- Of the $2 events after seq $1: delete those fanned out before $3 that have no delivery left
-- (all pruned, or none was ever made). A fanned-out event never gains a delivery, so none can
-- appear between the check and the delete.
WITH walked AS MATERIALIZED (
    SELECT seq, fanned_out_at, created_at
    FROM outbox
    WHERE seq > $1
    ORDER BY seq
    LIMIT $2
), doomed AS MATERIALIZED (
    SELECT o.seq
    FROM outbox o
    WHERE o.seq = ANY (ARRAY(
              SELECT w.seq FROM walked w
              WHERE w.fanned_out_at < $3
                AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = w.seq)))
      AND o.fanned_out_at < $3
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM outbox o
    WHERE o.seq = ANY (ARRAY(SELECT seq FROM doomed))
    RETURNING 1
)
SELECT (SELECT max(seq) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT max(created_at) FROM walked) AS newest,
       (SELECT count(*) FROM deleted) AS outbox;

-- name: count_prunable_outbox
-- prune_outbox without deleting, counting deliveries that prune_deliveries would delete (by
-- the cut-offs $4 succeeded, $5 failed) as gone already.
WITH walked AS MATERIALIZED (
    SELECT seq, fanned_out_at, created_at
    FROM outbox
    WHERE seq > $1
    ORDER BY seq
    LIMIT $2
)
SELECT (SELECT max(seq) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT max(created_at) FROM walked) AS newest,
       (SELECT count(*) FROM walked w
        WHERE w.fanned_out_at < $3
          AND NOT EXISTS (
              SELECT 1 FROM deliveries d
              WHERE d.event_seq = w.seq
                AND (d.completed_at < CASE d.status WHEN 'succeeded' THEN $4::timestamptz
                                                    WHEN 'failed' THEN $5::timestamptz END)
                    IS NOT TRUE)) AS outbox;

-- name: prune_orphan_attempts
-- Of the $2 attempts made after $1 and before $3 (attempts_by_time), delete those whose
-- delivery is gone: deleting an endpoint cascades to its deliveries but not to the log, and a
-- write-back superseded by a prune logs an attempt after its delivery is gone.
WITH walked AS MATERIALIZED (
    SELECT ctid AS tid, delivery_id, attempted_at
    FROM attempts
    WHERE attempted_at > $1 AND attempted_at < $3
    ORDER BY attempted_at
    LIMIT $2
), deleted AS (
    DELETE FROM attempts a
    WHERE a.ctid = ANY (ARRAY(
              SELECT w.tid FROM walked w
              WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = w.delivery_id)))
    RETURNING 1
)
SELECT (SELECT max(attempted_at) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT count(*) FROM deleted) AS attempts;

-- name: count_orphan_attempts
-- prune_orphan_attempts without deleting.
WITH walked AS MATERIALIZED (
    SELECT delivery_id, attempted_at
    FROM attempts
    WHERE attempted_at > $1 AND attempted_at < $3
    ORDER BY attempted_at
    LIMIT $2
)
SELECT (SELECT max(attempted_at) FROM walked) AS last,
       (SELECT count(*) FROM walked) AS walked,
       (SELECT count(*) FROM walked w
        WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = w.delivery_id)) AS attempts;

-- name: insert_ops_events
-- Operational events (dispatcher/ops.py) for the ops tenant $1: one outbox row per ($2 type,
-- $3 endpoint, $4 details as JSON text), in that order. The payload is the endpoint's tenant,
-- id, url and description, then the details; endpoint.disabled also counts the deliveries the
-- endpoint now holds until it is enabled again. Endpoints of the ops tenant are skipped, so its
-- own trouble never feeds itself. The ordering key keeps one endpoint's events in order.
INSERT INTO outbox (tenant, event_type, payload, ordering_key)
SELECT $1, x.event_type,
       jsonb_build_object('tenant', e.tenant, 'endpoint_id', e.id, 'url', e.url,
                          'description', e.description)
       || x.details::jsonb
       || CASE WHEN x.event_type = 'endpoint.disabled'
               THEN jsonb_build_object('held_deliveries',
                        (SELECT count(*) FROM deliveries d
                         WHERE d.endpoint_id = e.id
                           AND d.status IN ('pending', 'delivering', 'paused')))
               ELSE '{}'::jsonb END,
       'endpoint:' || e.id
FROM unnest($2::text[], $3::bigint[], $4::text[]) WITH ORDINALITY
    AS x (event_type, endpoint_id, details, n)
JOIN endpoints e ON e.id = x.endpoint_id
WHERE e.tenant <> $1
ORDER BY x.n
RETURNING event_id, event_type;

-- name: lock_endpoint_for_rotation
-- The endpoint's signing profile, locked so the new secret is made for the profile it gets.
SELECT profile FROM endpoints WHERE id = $1 FOR NO KEY UPDATE;

-- name: rotate_secret
-- Endpoint $1 gets secret $2; the current one moves to old_secret and is signed with besides
-- the new one for $3 more seconds, or dropped at once when $3 is 0 (dispatcher/rotation.py).
-- The version trigger bumps the endpoint's version, so daemons pick the secrets up at once.
UPDATE endpoints
SET secret = $2,
    old_secret = CASE WHEN $3::float8 > 0 THEN secret END,
    old_secret_expires_at = CASE WHEN $3::float8 > 0
                                 THEN now() + make_interval(secs => $3::float8) END
WHERE id = $1
RETURNING old_secret_expires_at;

-- name: record_test_delivery
-- `endpoint test` (dispatcher/probe.py) after its request: the sample event ($1 id, $2 tenant,
-- $3 type, $4 payload, $5 occurred at), already marked fanned out so no daemon sends it to
-- anyone, its one delivery to endpoint $6 in its final state ($7 succeeded or failed), and the
-- attempt ($8 at, $9 status code, $10 error line, $11 ms, $12 error class, $13 detail,
-- $14 response excerpt). One statement: all three rows or none.
WITH ev AS (
    INSERT INTO outbox (event_id, tenant, event_type, payload, occurred_at, fanned_out_at)
    VALUES ($1, $2, $3, $4::jsonb, $5, now())
    RETURNING seq, event_id
), d AS (
    INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, attempts, next_attempt_at,
                            last_attempt_at, last_status_code, last_error, completed_at)
    SELECT ev.seq, ev.event_id, $6, $7, 1, now(), $8, $9, $10, now()
    FROM ev
    RETURNING id, event_id
)
INSERT INTO attempts (delivery_id, event_id, endpoint_id, attempt, attempted_at, duration_ms,
                      status_code, error, error_detail, response_excerpt, decision)
SELECT d.id, d.event_id, $6, 1, $8, $11, $9, $12, $13, $14, $7
FROM d
RETURNING delivery_id;

-- name: demo_progress
-- `dispatcher demo`'s live view, one statement per tick: its deliveries by state (retrying:
-- pending or in flight again after a failed try since the last replay), attempts begun, and
-- events not fanned out yet. A scan of a few hundred demo rows; `dispatcher status` is the one
-- that reads a production-sized table from its indexes.
SELECT count(*) FILTER (WHERE d.status = 'succeeded') AS delivered,
       count(*) FILTER (WHERE d.status IN ('pending', 'delivering')
                          AND d.attempts - d.attempt_base
                              > CASE d.status WHEN 'delivering' THEN 1 ELSE 0 END) AS retrying,
       count(*) FILTER (WHERE d.status IN ('pending', 'delivering')
                          AND d.attempts - d.attempt_base
                              <= CASE d.status WHEN 'delivering' THEN 1 ELSE 0 END) AS pending,
       count(*) FILTER (WHERE d.status = 'failed') AS failed,
       count(*) FILTER (WHERE d.status = 'paused') AS paused,
       coalesce(sum(d.attempts), 0)::bigint AS attempts,
       (SELECT count(*) FROM outbox WHERE fanned_out_at IS NULL) AS unrouted
FROM deliveries d;

-- name: demo_summary
-- `dispatcher demo`'s closing table, per endpoint of tenant $1: deliveries by outcome, attempts,
-- and the end-to-end latency of the delivered ones in milliseconds, from the outbox insert
-- (outbox.created_at) to the 2xx being recorded (deliveries.completed_at).
WITH d AS (
    SELECT d.endpoint_id, d.status,
           (extract(epoch FROM d.completed_at - o.created_at) * 1000)::float8 AS latency_ms
    FROM deliveries d
    JOIN outbox o ON o.seq = d.event_seq
)
SELECT e.id, e.url,
       count(d.status) AS deliveries,
       count(*) FILTER (WHERE d.status = 'succeeded') AS delivered,
       count(*) FILTER (WHERE d.status IN ('pending', 'delivering', 'paused')) AS retrying,
       count(*) FILTER (WHERE d.status = 'failed') AS failed,
       (SELECT count(*) FROM attempts a WHERE a.endpoint_id = e.id) AS attempts,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY d.latency_ms)
           FILTER (WHERE d.status = 'succeeded') AS p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY d.latency_ms)
           FILTER (WHERE d.status = 'succeeded') AS p99_ms
FROM endpoints e
LEFT JOIN d ON d.endpoint_id = e.id
WHERE e.tenant = $1
GROUP BY e.id
ORDER BY e.id;

-- name: set_endpoint_ordering
-- After `endpoint update --ordered/--no-ordered` on $1 ($2: ordered now): the endpoint's
-- unfinished deliveries (and failed ones still holding a key) take their event's ordering key,
-- or drop it, so the new rule holds for everything not yet sent. Returns how many changed.
WITH changed AS (
    UPDATE deliveries d
    SET ordering_key = CASE WHEN $2::bool THEN o.ordering_key END,
        key_blocked = false
    FROM outbox o
    WHERE d.endpoint_id = $1 AND o.seq = d.event_seq
      AND (d.status IN ('pending', 'delivering', 'paused') OR d.key_blocked)
      AND (d.ordering_key IS DISTINCT FROM CASE WHEN $2::bool THEN o.ordering_key END
           OR d.key_blocked)
    RETURNING d.id
)
SELECT count(*) FROM changed;

-- name: skip_blocked_delivery
-- Let an ordered key move on past a failed delivery that holds it (ordered_after_failure =
-- "block"): the delivery stays failed, and the next one in its key's queue is due now.
-- Returns the delivery and the next one's id (NULL when none is pending), or no row when $1 is
-- not a failed delivery holding its key.
WITH skipped AS (
    UPDATE deliveries d
    SET key_blocked = false
    WHERE d.id = $1 AND d.status = 'failed' AND d.key_blocked
    RETURNING d.id, d.endpoint_id, d.ordering_key, d.event_id
), released AS (
    UPDATE deliveries s
    SET next_attempt_at = now()
    FROM skipped k
    WHERE s.id = key_head(k.endpoint_id, k.ordering_key, ARRAY[k.id])
      AND s.status = 'pending' AND s.attempts = s.attempt_base
    RETURNING s.id
)
SELECT k.id, k.endpoint_id, k.ordering_key, k.event_id, (SELECT id FROM released) AS released
FROM skipped k;

-- name: sample_backlog
-- The daemon's periodic sample (dispatcher/monitoring.py), every [log] summary_interval: the
-- backlog by status and the lag. Cheap on a large table: the counts walk deliveries_by_endpoint
-- one endpoint and status at a time (PostgreSQL before 18 has no skip scan to do it), so the
-- cost follows the endpoints and the rows counted, never the succeeded ones, which are not
-- counted (measured: 35 ms for 1M deliveries, 13k of them not succeeded, 500 endpoints); the
-- outbox count reads its partial index. The lag is how long the oldest due work has waited: the
-- first entry of the claim queue (a pending delivery due, or a lease run out) and the first
-- event not fanned out yet (in seq order, which is insert order), each one index probe; work
-- due in the future (a retry, a live lease) is no lag, and paused deliveries are not due.
SELECT coalesce(sum(c.pending), 0)::bigint AS pending,
       coalesce(sum(c.delivering), 0)::bigint AS delivering,
       coalesce(sum(c.paused), 0)::bigint AS paused,
       coalesce(sum(c.failed), 0)::bigint AS failed,
       (SELECT count(*) FROM outbox WHERE fanned_out_at IS NULL) AS outbox,
       greatest(0, coalesce(extract(epoch FROM now() - least(
           (SELECT next_attempt_at FROM deliveries
            WHERE status IN ('pending', 'delivering')
            ORDER BY next_attempt_at LIMIT 1),
           (SELECT created_at FROM outbox WHERE fanned_out_at IS NULL ORDER BY seq LIMIT 1)
       )), 0))::float8 AS lag_s
FROM endpoints e
CROSS JOIN LATERAL (
    SELECT (SELECT count(*) FROM deliveries d
            WHERE d.endpoint_id = e.id AND d.status = 'pending') AS pending,
           (SELECT count(*) FROM deliveries d
            WHERE d.endpoint_id = e.id AND d.status = 'delivering') AS delivering,
           (SELECT count(*) FROM deliveries d
            WHERE d.endpoint_id = e.id AND d.status = 'paused') AS paused,
           (SELECT count(*) FROM deliveries d
            WHERE d.endpoint_id = e.id AND d.status = 'failed') AS failed
) c;

-- name: lock_endpoint_secrets
-- `endpoint reencrypt-secrets` (dispatcher/reencryption.py): the next $2 endpoints after id $1,
-- locked for the batch's transaction so a rotation cannot slip in between read and write.
SELECT id, secret, old_secret
FROM endpoints
WHERE id > $1
ORDER BY id
LIMIT $2
FOR NO KEY UPDATE;

-- name: reencrypt_secrets
-- The batch's new stored values, one statement; the version trigger bumps each row's version,
-- so daemons reload (and decrypt) the secrets, which are the same once decrypted.
WITH changed AS (
    UPDATE endpoints e
    SET secret = x.secret, old_secret = x.old_secret
    FROM unnest($1::bigint[], $2::text[], $3::text[]) AS x (id, secret, old_secret)
    WHERE e.id = x.id
    RETURNING 1
)
SELECT count(*) FROM changed;
