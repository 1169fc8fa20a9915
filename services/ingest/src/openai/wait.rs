//! How an OpenAI request waits for its job: on the results service's own stream,
//! `GET /v1/jobs/{id}/events`, with the caller's API key. It costs no polling loop and no
//! thread, it works with any number of ingest and results replicas (results hears every
//! replica's writes through Postgres `LISTEN/NOTIFY`), it answers a replayed
//! `Idempotency-Key` whose job finished long ago, and a broken stream resumes with
//! `Last-Event-ID`. A request whose client goes away cancels its job, as `DELETE
//! /v1/jobs/{id}` does, unless it asked `X-Sluice-On-Disconnect: continue`.

use super::wire::JobView;
use axum::http::HeaderValue;
use chrono::{DateTime, Utc};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use sluice_schemas::JobId;
use std::time::Duration;

/// How long past its deadline a job is waited for: the worker that picks up an expired job
/// says so, which takes a moment after the deadline.
const PAST_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(crate) struct JobFollower {
    http: reqwest::Client,
    results_url: String,
}

impl JobFollower {
    pub(crate) fn new(results_url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            results_url: results_url.trim_end_matches('/').to_owned(),
        }
    }

    /// The job once it is terminal. Gives up at the deadline (plus a margin) with the reason.
    pub(crate) async fn terminal(
        &self,
        job_id: JobId,
        auth: Option<&HeaderValue>,
        deadline: DateTime<Utc>,
    ) -> Result<JobView, String> {
        let wait = (deadline - Utc::now()).to_std().unwrap_or_default() + PAST_DEADLINE;
        tokio::time::timeout(wait, self.follow(job_id, auth))
            .await
            .map_err(|_| "the job did not finish by its deadline".to_owned())?
    }

    async fn follow(&self, job_id: JobId, auth: Option<&HeaderValue>) -> Result<JobView, String> {
        // Only the status changes: the pieces come from the deltas topic, here, directly.
        let url = format!(
            "{}/v1/jobs/{job_id}/events?status_only=true",
            self.results_url
        );
        let mut last_event_id: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut request = self.http.get(&url);
            if let Some(auth) = auth {
                request = request.header(reqwest::header::AUTHORIZATION, auth.clone());
            }
            if let Some(id) = &last_event_id {
                request = request.header("last-event-id", id);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let mut events = response.bytes_stream().eventsource();
                    while let Some(event) = events.next().await {
                        let Ok(event) = event else { break };
                        if !event.id.is_empty() {
                            last_event_id = Some(event.id.clone());
                        }
                        let Ok(job) = serde_json::from_str::<JobView>(&event.data) else {
                            continue;
                        };
                        if job.status.is_terminal() {
                            return Ok(job);
                        }
                    }
                }
                // The results service refused the wait itself (a key it does not know, a
                // job it says is not there): nothing will change by asking again.
                Ok(response) if response.status().is_client_error() => {
                    return Err(format!(
                        "the results service answered {} to the wait",
                        response.status()
                    ));
                }
                Ok(response) => {
                    tracing::warn!(status = %response.status(), "waiting on the results service failed; retrying");
                }
                Err(error) => {
                    tracing::warn!(error = %error, "the results service is unreachable; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Asks the results service to cancel the job (it publishes the cancel event).
    pub(crate) async fn cancel(&self, job_id: JobId, auth: Option<&HeaderValue>) {
        let mut request = self
            .http
            .delete(format!("{}/v1/jobs/{job_id}", self.results_url));
        if let Some(auth) = auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        match request.send().await {
            Ok(response) => {
                tracing::info!(job_id = %job_id, status = %response.status(), "client went away; job cancelled")
            }
            Err(error) => {
                tracing::warn!(job_id = %job_id, error = %error, "client went away; cancelling the job failed")
            }
        }
    }
}

/// Cancels the job when dropped before `finish`: the handler's future is dropped when its
/// client disconnects.
pub(crate) struct CancelOnDrop {
    follower: JobFollower,
    job_id: JobId,
    auth: Option<HeaderValue>,
    armed: bool,
}

impl CancelOnDrop {
    pub(crate) fn new(
        follower: JobFollower,
        job_id: JobId,
        auth: Option<HeaderValue>,
        armed: bool,
    ) -> Self {
        Self {
            follower,
            job_id,
            auth,
            armed,
        }
    }

    /// The answer went out (or the job ended): nothing to cancel.
    pub(crate) fn finish(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (follower, job_id, auth) = (self.follower.clone(), self.job_id, self.auth.take());
        // Not during the runtime's own shutdown: the service is stopping, not the client.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { follower.cancel(job_id, auth.as_ref()).await });
        }
    }
}
