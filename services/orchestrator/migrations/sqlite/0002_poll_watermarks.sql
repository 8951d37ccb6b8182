-- Where each trigger poller stopped: per system and stream (e.g. 'pipedrive', 'deals'), the
-- watermark (the last id seen), advanced in the transaction that stores the event it covers.
CREATE TABLE poll_watermarks (
    system     TEXT NOT NULL,
    stream     TEXT NOT NULL,
    watermark  TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (system, stream)
);

-- The last status the SalesMan poller saw of each lead, changed in the transaction that stores
-- the status-change event.
CREATE TABLE salesman_lead_status (
    lead_id    TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    seen_at    BIGINT NOT NULL
);
