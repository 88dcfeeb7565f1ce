-- Presence. A lease per (user, worker process) holding at least one of the
-- user's connections: live workers renew theirs, a dead one's expire. Each
-- user's state (online or not, last seen) is durable and changes only in
-- transitions (see worker/src/store/presence.rs).

CREATE TABLE IF NOT EXISTS presence_leases (
    user_id    text        NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, holder)
);

CREATE TABLE IF NOT EXISTS presence (
    user_id   text        PRIMARY KEY,
    online    boolean     NOT NULL DEFAULT false,
    last_seen timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS presence_online ON presence (last_seen) WHERE online;
