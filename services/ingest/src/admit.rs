//! Admitting a validated job and publishing it: the rate limits (requests and tokens, one
//! atomic decision), the shared cache, the pipeline's capacity, then the broker's
//! acknowledgement. A token reservation made here is given back if the job is not published,
//! at once for a cache hit, and otherwise settled when the job ends (`admission/tokens.rs`).

use crate::AppState;
use crate::admission::limiter::{FailureMode, TokenCharge};
use crate::admission::tokens::Hold;
use crate::admission::{rate_limit_headers, token_quota, user_quota};
use crate::error::{ApiError, RateGate};
use crate::submit::Accepted;
use axum::http::HeaderMap;
use chrono::Utc;
use sluice_common::auth::KeyBudget;
use sluice_common::cache::cache_key;
use sluice_schemas::{JobStatus, Output, RequestEvent, StatusEvent, Task, Timings, TokenEstimate};

/// A store failure under the configured failure mode: `open` goes on (logged and counted),
/// `closed` refuses with 503.
pub(crate) fn on_store_failure(
    state: &AppState,
    what: &str,
    error: &redis::RedisError,
) -> Result<(), ApiError> {
    let failures = state
        .limiter
        .store_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    tracing::warn!(error = %error, failures, what, "admission store unreachable");
    match state.limiter.failure_mode {
        FailureMode::Open => Ok(()),
        FailureMode::Closed => Err(ApiError::LimiterUnavailable),
    }
}

/// Rate limits, then the event, then the broker's acknowledgement.
pub(crate) async fn admit_and_publish(
    state: &AppState,
    event: &RequestEvent,
    tier: &str,
    key_budget: KeyBudget,
) -> Result<(Accepted, HeaderMap), ApiError> {
    let user_id = event.user_id.as_str();
    let (tier_name, tier) = state.tiers.get(Some(tier));
    let quota = user_quota(tier);
    let estimate = estimate_tokens(state, event).await;
    let charge = token_quota(tier).map(|quota| TokenCharge {
        quota,
        tokens: estimate.total(),
    });
    if let Some(charge) = &charge
        && charge.tokens > u64::from(charge.quota.burst)
    {
        return Err(ApiError::TokensExceedLimit {
            prompt: estimate.prompt,
            completion: estimate.completion,
            tier: tier_name.to_owned(),
            burst: charge.quota.burst,
        });
    }
    // Before the limits: a refusal for the budget spends none of them.
    let cost =
        state
            .budgets
            .prices
            .cost(event.model.as_str(), estimate.prompt, estimate.completion);
    let has_budget = tier.has_budget() || key_budget.is_some();
    let held = match has_budget {
        true => state.reservations.held_cost(user_id),
        false => 0.0,
    };
    let key = event
        .key_id
        .as_deref()
        .filter(|_| key_budget.is_some())
        .map(|key_id| (key_id, key_budget));
    let priced = state
        .budgets
        .check(user_id, tier_name, tier, key, cost, held)
        .await?;
    let mut limit_headers = HeaderMap::new();
    // Whether tokens were reserved: not when the store failed and the failure mode let it in.
    let mut reserved = None;
    match state.limiter.check(user_id, &quota, charge).await {
        Ok(verdict) => {
            let token_quota = charge.as_ref().map(|charge| &charge.quota);
            limit_headers = rate_limit_headers(
                tier_name,
                &quota,
                &state.limiter.global,
                token_quota,
                &verdict,
            );
            if !verdict.allowed() {
                let gate = if !verdict.user.allowed {
                    RateGate::User
                } else if !verdict.global.allowed {
                    RateGate::Global
                } else {
                    RateGate::Tokens
                };
                let retry_after_secs = verdict.retry_after().as_secs_f64().ceil().max(1.0) as u64;
                return Err(ApiError::RateLimited {
                    gate,
                    retry_after_secs,
                    headers: limit_headers,
                });
            }
            reserved = charge;
        }
        Err(error) => on_store_failure(state, "rate limit", &error)?,
    }
    let published = publish_unless_cached(state, event).await;
    match &published {
        Ok(None) if reserved.is_some() || has_budget => {
            let hold = Hold {
                quota: reserved.map(|charge| charge.quota),
                estimate,
                cost: priced.cost,
            };
            state
                .reservations
                .hold(user_id, event.job_id, hold, event.deadline);
        }
        Ok(None) => {}
        // Nothing was queued, or the answer cost no model tokens: all of it back.
        Ok(Some(_)) | Err(_) => {
            if let Some(charge) = reserved {
                refund(state, user_id, &charge).await;
            }
        }
    }
    let output = published?;

    let status_url = format!(
        "{}/v1/jobs/{}",
        state.config.results_url.trim_end_matches('/'),
        event.job_id
    );
    // With API keys on, the events URL carries the job's stream token: a backend can hand it to
    // a browser, which reads this job and nothing else with it.
    let events_url = match &state.tokens {
        Some(tokens) => format!(
            "{status_url}/events?token={}",
            tokens.issue(event.job_id, Utc::now())
        ),
        None => format!("{status_url}/events"),
    };
    let accepted = Accepted {
        job_id: event.job_id,
        status: if output.is_some() {
            JobStatus::Succeeded
        } else {
            JobStatus::Queued
        },
        deadline: event.deadline,
        priority: event.priority,
        events_url,
        status_url,
        output,
    };
    Ok((accepted, limit_headers))
}

/// What the job will cost in tokens: counted with the model's own tokenizer for the in-process
/// embedding model (what it will report), else the estimate every model gets.
async fn estimate_tokens(state: &AppState, event: &RequestEvent) -> TokenEstimate {
    let mut estimate = event.estimate_tokens(state.config.tiers.default_max_tokens);
    if let (Task::Embedding(texts), Some(tokenizer)) = (&event.task, &state.local_tokenizer)
        && event.model.as_str() == sluice_common::minilm::LOCAL_MODEL
    {
        let (tokenizer, texts) = (tokenizer.clone(), texts.clone());
        // Why a blocking task: a large input takes milliseconds to tokenize.
        let counted =
            tokio::task::spawn_blocking(move || sluice_common::minilm::count(&tokenizer, &texts))
                .await;
        match counted {
            Ok(Ok(tokens)) => estimate.prompt = tokens,
            Ok(Err(error)) => tracing::warn!(error = %error, "counting tokens failed; estimating"),
            Err(error) => tracing::warn!(error = %error, "counting tokens failed; estimating"),
        }
    }
    estimate
}

/// The cached answer if there is one (recorded as the job's status), else the job published
/// after the capacity check.
async fn publish_unless_cached(
    state: &AppState,
    event: &RequestEvent,
) -> Result<Option<Output>, ApiError> {
    let output = answer_from_cache(state, event).await?;
    if output.is_none() {
        // After the cache: an answer already known needs no capacity. Only the interactive
        // lane is refused for capacity: a backlog is what the batch lane is for, its share of the
        // workers changes with interactive traffic, and a burst's first readings underrate it
        // (an estimate of its own refused 2,267 of 10,000 batch jobs with 600 s deadlines in
        // the benchmark). A batch job its lane does not reach in time ends `expired`.
        let interactive = event.priority.is_interactive();
        if interactive {
            let time_left = (event.deadline - Utc::now()).to_std().unwrap_or_default();
            state.capacity.check(time_left)?;
        }
        state.publisher.publish(event).await?;
        if interactive {
            state.capacity.published();
        }
        metrics::counter!("sluice_jobs_accepted_total").increment(1);
        tracing::debug!("job accepted");
    }
    Ok(output)
}

async fn refund(state: &AppState, user_id: &str, charge: &TokenCharge) {
    let delta = -i64::try_from(charge.tokens).unwrap_or(i64::MAX);
    if let Err(error) = state.limiter.settle(user_id, &charge.quota, delta).await {
        tracing::warn!(error = %error, "could not give back a token reservation");
    }
}

/// With a shared (Redis) cache, a hit is answered now, without a worker or a model: the job is
/// recorded by publishing its `succeeded` status (results makes the row from it).
async fn answer_from_cache(
    state: &AppState,
    event: &RequestEvent,
) -> Result<Option<Output>, ApiError> {
    if !event.cache || !state.cache.is_shared() {
        return Ok(None);
    }
    let Some(mut output) = state.cache.get(&cache_key(event)).await else {
        return Ok(None);
    };
    // A streamed job's readers take the whole answer as one delta from this output.
    output.streamed = event.stream;
    let now = Utc::now();
    let mut status = StatusEvent::queued(event);
    status.status = JobStatus::Succeeded;
    status.output = Some(output.clone());
    status.timings = Timings {
        queued_at: event.submitted_at,
        started_at: Some(now),
        finished_at: Some(now),
    };
    status.worker_id = Some("ingest-cache".to_owned());
    status.emitted_at = now;
    state
        .publisher
        .publish_status(&state.config.topics.status, &status)
        .await?;
    Ok(Some(output))
}
