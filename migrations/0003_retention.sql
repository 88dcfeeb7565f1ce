-- Retention: the prune job deletes old events and records, per
-- conversation, the highest seq it deleted. Readers start above it; a
-- member whose cursor is below it is told `truncated` first.

ALTER TABLE conversations ADD COLUMN IF NOT EXISTS horizon_seq bigint NOT NULL DEFAULT 0;
