-- 005: ordered delivery. An ordered endpoint receives the deliveries that share an ordering_key
-- one at a time, in outbox order (event_seq).
--   ordering_key  copied from the event when the delivery is made for an ordered endpoint, NULL
--                 otherwise: every rule below looks at this column only, so unordered
--                 deliveries pay nothing for the feature.
--   key_blocked   a failed delivery (retries exhausted) that still holds its key, under
--                 [delivery] ordered_after_failure = "block", until replayed or skipped.
-- A delivery "holds" its key while pending, delivering or paused, or failed with key_blocked;
-- only a key's earliest holder may be claimed. Both columns have constant defaults: adding them
-- rewrites nothing.
ALTER TABLE deliveries
    ADD COLUMN IF NOT EXISTS ordering_key text,
    ADD COLUMN IF NOT EXISTS key_blocked boolean NOT NULL DEFAULT false;

-- A key's queue on one endpoint, in outbox order: "is anything ahead of me?" is one probe.
-- Partial, so unordered deliveries never enter it and finished ones leave it.
CREATE INDEX IF NOT EXISTS deliveries_key_queue ON deliveries (endpoint_id, ordering_key, event_seq)
    WHERE ordering_key IS NOT NULL
      AND (status IN ('pending', 'delivering', 'paused') OR key_blocked);

-- The delivery a keyed one waits behind: the first of its key's queue ahead of it (NULL when
-- it is the head), for the delivery log. The claim paths spell the same rule out inline, so
-- the planner sees their index probe.
CREATE OR REPLACE FUNCTION key_waits_behind(endpoint bigint, key text, seq bigint) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
    SELECT h.id
    FROM deliveries h
    WHERE h.endpoint_id = endpoint AND h.ordering_key = key AND h.event_seq < seq
      AND (h.status IN ('pending', 'delivering', 'paused') OR h.key_blocked)
    ORDER BY h.event_seq
    LIMIT 1
$$;

-- The head of a key's queue on an endpoint, passing over the deliveries in `passing` (those a
-- statement is finishing right now, which still look unfinished to it): the delivery a
-- finished or skipped one hands its key to.
CREATE OR REPLACE FUNCTION key_head(endpoint bigint, key text, passing bigint[]) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $$
    SELECT h.id
    FROM deliveries h
    WHERE h.endpoint_id = endpoint AND h.ordering_key = key
      AND (h.status IN ('pending', 'delivering', 'paused') OR h.key_blocked)
      AND h.id <> ALL (passing)
    ORDER BY h.event_seq
    LIMIT 1
$$;
