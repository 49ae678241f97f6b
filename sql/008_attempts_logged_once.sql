-- 008: an attempt is logged once. A write-back whose commit landed but whose reply was lost
-- with the connection (PostgreSQL restarting mid-statement) is sent again; the deliveries'
-- fence already made that harmless, and this makes the attempt log agree: each claim has its
-- own attempt number per delivery, so (delivery_id, attempt) is unique and a repeat is skipped.
-- Repeats logged before this migration are removed first (keeping the first of each).
DELETE FROM attempts a
USING (SELECT delivery_id, attempt, min(ctid) AS first
       FROM attempts
       GROUP BY delivery_id, attempt
       HAVING count(*) > 1) AS d
WHERE a.delivery_id = d.delivery_id AND a.attempt = d.attempt AND a.ctid <> d.first;
CREATE UNIQUE INDEX IF NOT EXISTS attempts_one_per_claim ON attempts (delivery_id, attempt);
DROP INDEX IF EXISTS attempts_by_delivery;
