-- One-time SSE tickets: the id of every ticket accepted, until it has
-- expired, so a ticket opens one stream on one worker of one host, and a
-- second use anywhere is refused. Tickets themselves are signed, not
-- stored (worker/src/tickets.rs).

CREATE TABLE IF NOT EXISTS sse_tickets_used (
    id          text        PRIMARY KEY,
    expires_at  timestamptz NOT NULL
);

-- Expired records are deleted now and then by the workers that accept tickets.
CREATE INDEX IF NOT EXISTS sse_tickets_used_expiry ON sse_tickets_used (expires_at);
