-- The W3C traceparent of the job's trace, from the first event stored for it: the results
-- service's SSE pushes are spans of that trace.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS traceparent text;
