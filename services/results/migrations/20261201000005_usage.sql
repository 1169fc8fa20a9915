-- Usage by user, day (UTC), the model that answered and the API key that submitted (empty
-- without keys), added to in the transaction that records a job's terminal status: the store
-- records a terminal status once per job, so a replayed or duplicated event never counts twice.
-- Cost is priced when recorded (SLUICE_MODEL_PRICES then).

ALTER TABLE jobs ADD COLUMN key_id text;

CREATE TABLE usage_daily (
    user_id           text             NOT NULL,
    day               date             NOT NULL,
    model             text             NOT NULL,
    key_id            text             NOT NULL,
    jobs              bigint           NOT NULL,
    -- Answered from the cache or a shared call: no model tokens.
    cached_jobs       bigint           NOT NULL,
    prompt_tokens     bigint           NOT NULL,
    completion_tokens bigint           NOT NULL,
    cost_usd          double precision NOT NULL,
    PRIMARY KEY (user_id, day, model, key_id)
);
