-- `GET /v1/jobs`: a user's jobs, newest first (job ids are UUIDv7, so in submission order),
-- read page by page from the last id seen (keyset pagination).

CREATE INDEX jobs_user_newest_idx ON jobs (user_id, job_id DESC);
