-- Queue positions: where each job's request event sits (partition, offset), so the jobs ahead of
-- a queued job are the queued ones before it in its partition; and when jobs started there, for
-- the rate its ETA is computed from.

ALTER TABLE jobs
    ADD COLUMN request_partition integer,
    ADD COLUMN request_offset    bigint;

CREATE INDEX jobs_queued_in_partition_idx ON jobs (request_partition, request_offset)
    WHERE status = 'queued';
CREATE INDEX jobs_started_in_partition_idx ON jobs (request_partition, started_at DESC)
    WHERE started_at IS NOT NULL;
