-- Webhooks: each user's signing secret (sealed with SLUICE_WEBHOOK_SECRET_KEY; the one before a
-- rotation signs too for 24 hours), and every delivery, enqueued before the status record that
-- caused it is acknowledged and worked off by the webhooks service's replicas.

CREATE TABLE webhook_secrets (
    user_id    text PRIMARY KEY,
    secret     bytea       NOT NULL,
    previous   bytea,
    rotated_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    delivery_id     bigserial PRIMARY KEY,
    -- The Standard Webhooks message id: the same on every attempt of one event.
    webhook_id      text        NOT NULL UNIQUE,
    job_id          uuid        NOT NULL,
    user_id         text        NOT NULL,
    event_type      text        NOT NULL,
    url             text        NOT NULL,
    host            text        NOT NULL,
    -- The body, fixed when enqueued: every attempt signs and sends the same bytes.
    payload         text        NOT NULL,
    -- pending, delivered, failed (attempts exhausted or refused), stopped (the receiver said 410)
    state           text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_until    timestamptz,
    last_status     integer,
    last_error      text,
    status_at       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);

CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id);
