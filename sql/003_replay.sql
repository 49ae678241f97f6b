-- 003: replays start a fresh retry schedule.
-- `attempts` stays the claim counter (the write-back fence and the attempt log's numbering), so
-- a replay cannot reset it: a late write-back from a claim made before the replay would match a
-- new claim with the same number. A replay records the count it started from instead, and the
-- retry policy counts `attempts - attempt_base`.
-- Both columns have constant defaults: adding them rewrites nothing and no index names them, so
-- every write of the hot path stays as it was (HOT-eligible or not).
ALTER TABLE deliveries
    ADD COLUMN IF NOT EXISTS attempt_base integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS replayed_at timestamptz;
