-- API keys: only a SHA-256 of each key is stored; the key itself is shown once, at creation.

CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    key_hash   text        NOT NULL UNIQUE,
    user_id    text        NOT NULL,
    tier       text        NOT NULL DEFAULT 'default',
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
