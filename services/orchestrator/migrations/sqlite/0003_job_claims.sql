-- Each claim of a job gets a token of its own. A runner renews, and records the outcome of, only
-- the claim it holds: a runner that lost its lease (the store was out of its reach for a whole
-- lease) and then comes back cannot overwrite the run of the runner that took the job over.
ALTER TABLE jobs ADD COLUMN claim TEXT;
