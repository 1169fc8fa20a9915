-- The secret job-scoped stream tokens are signed with when no SLUICE_STREAM_TOKEN_SECRETS is
-- configured: made once, at random, by the first service that needs it, and shared by every
-- ingest and results replica through this row.

CREATE TABLE stream_token_secret (
    id         smallint    PRIMARY KEY CHECK (id = 1),
    secret     bytea       NOT NULL CHECK (octet_length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
