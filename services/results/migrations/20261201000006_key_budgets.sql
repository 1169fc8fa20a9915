-- Spend budgets of a key of its own, per UTC day and month, in the currency of the model
-- prices; besides its tier's. NULL: none.

ALTER TABLE api_keys
    ADD COLUMN budget_per_day   double precision CHECK (budget_per_day >= 0),
    ADD COLUMN budget_per_month double precision CHECK (budget_per_month >= 0);
