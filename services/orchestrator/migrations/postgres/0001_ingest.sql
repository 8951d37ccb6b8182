-- LeadRelay's store, Postgres flavour (the SQLite flavour has the same tables and columns).
-- Times are unix milliseconds (UTC). `seq` orders rows for keyset pagination; `id` is the public id.

-- Every accepted inbound call or polled change, once per (source, dedupe_key).
CREATE TABLE events (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    source          TEXT NOT NULL,              -- 'hana' | 'pipedrive' | 'salesman'
    kind            TEXT NOT NULL,              -- e.g. 'lead.created'
    application_id  TEXT NOT NULL DEFAULT '',
    dedupe_key      TEXT NOT NULL,
    raw_body        BYTEA NOT NULL,
    received_at     BIGINT NOT NULL,
    duplicate_count BIGINT NOT NULL DEFAULT 0,
    trace_context   TEXT,                       -- W3C traceparent of the ingest call
    UNIQUE (source, dedupe_key)
);

-- Calls that were authenticated but could not be used, with the reason.
CREATE TABLE quarantine (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    raw_body    BYTEA NOT NULL,
    received_at BIGINT NOT NULL
);

-- Canonical entities. `body` is the protobuf-encoded leadrelay.v1.Lead / Deal without its links;
-- `source_key` is '<system>:<app id>:<remote id>' of the record that created the entity.
CREATE TABLE leads (
    id         TEXT PRIMARY KEY,
    source_key TEXT NOT NULL UNIQUE,
    body       BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);

CREATE TABLE deals (
    id              TEXT PRIMARY KEY,
    source_key      TEXT NOT NULL UNIQUE,
    body            BYTEA NOT NULL,
    contact_lead_id TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    deleted_at      BIGINT
);

-- Links between canonical entities and their records in each system (including the source).
CREATE TABLE links (
    entity_type TEXT NOT NULL,                  -- 'lead' | 'deal'
    entity_id   TEXT NOT NULL,
    system      TEXT NOT NULL,
    kind        TEXT NOT NULL,                  -- e.g. 'hana_lead', 'pipedrive_person'
    remote_id   TEXT NOT NULL,
    linked_at   BIGINT NOT NULL,
    closed_at   BIGINT,
    PRIMARY KEY (entity_type, entity_id, system, kind)
);
CREATE INDEX links_by_remote ON links (system, remote_id);

-- Sync jobs: one per (event, target, operation), written in the transaction that stores the event.
CREATE TABLE jobs (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    event_id        TEXT NOT NULL REFERENCES events (id),
    target          TEXT NOT NULL,
    operation       TEXT NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       TEXT NOT NULL,
    state           TEXT NOT NULL,              -- 'pending' | 'running' | 'done' | 'dead' | 'coalesced'
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    trace_context   TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX jobs_by_event ON jobs (event_id);
CREATE INDEX jobs_by_entity ON jobs (target, entity_id, state);
