-- SQLite's migration 0006 indexes the source keys of leads and deals by their last 16 characters
-- instead of keeping a UNIQUE of whole keys. Postgres keeps its UNIQUE: its replicas insert at
-- once, and the constraint is what settles two of them racing for one key. Nothing changes here;
-- the migration exists so that both stores report the same schema version.
SELECT 1;
