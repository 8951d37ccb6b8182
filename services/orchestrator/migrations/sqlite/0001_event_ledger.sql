-- The event ledger: every accepted inbound call or polled change, once per dedupe key, and the
-- calls that were authenticated but could not be used (quarantine). Times are RFC 3339 UTC text.

CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    source          TEXT NOT NULL,              -- 'hana' | 'pipedrive' | 'salesman'
    kind            TEXT NOT NULL,              -- e.g. 'lead.created', 'deal.change'
    application_id  TEXT NOT NULL DEFAULT '',
    dedupe_key      TEXT NOT NULL,
    raw_body        BLOB NOT NULL,
    received_at     TEXT NOT NULL,
    duplicate_count INTEGER NOT NULL DEFAULT 0,
    trace_context   TEXT,                       -- W3C traceparent of the ingest call
    UNIQUE (source, dedupe_key)
);

CREATE INDEX events_by_received_at ON events (received_at);

CREATE TABLE quarantine (
    id          TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    raw_body    BLOB NOT NULL,
    received_at TEXT NOT NULL
);

CREATE INDEX quarantine_by_received_at ON quarantine (received_at);
