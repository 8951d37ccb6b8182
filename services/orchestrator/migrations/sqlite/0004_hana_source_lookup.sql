-- A Hana record is found by the source key of the entity it created, not by its link: the link
-- index kept an entry of every Hana lead and ticket too, at a random place (Hana's ids are random
-- UUIDs), which cost each ingested event a page of the write-ahead log of its own. Those entries
-- leave the index; a lookup by Hana id tries the source key under each Hana application instead.
-- Every query on the index states `system <> 'hana'`: SQLite uses a partial index only when the
-- query repeats its condition.
CREATE TABLE hana_applications (
    application_id TEXT PRIMARY KEY
);
INSERT INTO hana_applications (application_id)
    SELECT DISTINCT application_id FROM events WHERE source = 'hana';

DROP INDEX links_by_remote;
CREATE INDEX links_by_remote ON links (system, remote_id) WHERE system <> 'hana';
