-- `jobs_user_newest_idx` (user_id, job_id DESC) repeats `jobs_user_id_idx` (user_id, job_id): a
-- B-tree is read in either direction, and `GET /v1/jobs` (a user's jobs, newest first) reads
-- the latter backwards. A change of a job's status is not a HOT update (the partial indexes of
-- the queue positions name `status` and `started_at`), so it adds an entry to every index of
-- the table, as the row's insert does: at least three a job (the row made, `running`, its
-- end), in this copy for nothing.

DROP INDEX IF EXISTS jobs_user_newest_idx;
