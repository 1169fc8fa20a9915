-- Queue positions for both lanes: a job's request event is in the interactive or the batch
-- lane's topic, and its position counts the queued jobs before it in that topic's partition.
-- Rows from before this migration hold interactive records only (batch ones were not kept), so
-- the default is right for them, and adding a column with a constant default rewrites nothing.

ALTER TABLE jobs ADD COLUMN request_lane text NOT NULL DEFAULT 'interactive'
    CHECK (request_lane IN ('interactive', 'batch'));

DROP INDEX jobs_queued_in_partition_idx;
DROP INDEX jobs_started_in_partition_idx;
CREATE INDEX jobs_queued_in_partition_idx ON jobs (request_lane, request_partition, request_offset)
    WHERE status = 'queued';
CREATE INDEX jobs_started_in_partition_idx ON jobs (request_lane, request_partition, started_at DESC)
    WHERE started_at IS NOT NULL;
