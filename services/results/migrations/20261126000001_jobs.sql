-- Job state as the results service keeps it: one row per job, one event row per status change.

CREATE TABLE jobs (
    job_id       uuid PRIMARY KEY,
    user_id      text        NOT NULL,
    model        text        NOT NULL,
    status       text        NOT NULL,
    -- 0 queued, 1 running, 2 terminal: an event is applied only if it moves the job forward.
    status_rank  smallint    NOT NULL,
    attempt      integer     NOT NULL,
    -- Number of status changes recorded; the SSE event id of the latest one.
    seq          bigint      NOT NULL,
    output       jsonb,
    error        jsonb,
    worker_id    text,
    submitted_at timestamptz,
    deadline     timestamptz,
    queued_at    timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_user_id_idx ON jobs (user_id, job_id);

CREATE TABLE job_events (
    job_id      uuid        NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    seq         bigint      NOT NULL,
    status      text        NOT NULL,
    -- The job as it was right after this change, exactly as SSE sends it.
    job         jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);
