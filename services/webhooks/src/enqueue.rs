//! Status changes in, deliveries out: reads the status topic in batches (the shared Kafka
//! source), writes a delivery row for every change a job's webhook asked for, and marks the
//! records done only after the rows are committed. A crash before the commit redelivers the
//! records; the rows are keyed by their webhook id, so a redelivered change is not enqueued twice.

use serde_json::{Value, json};
use sluice_common::kafka::{KafkaSource, Record};
use sluice_schemas::StatusEvent;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Most status records written in one transaction.
const MAX_BATCH: usize = 500;

/// A delivery to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub webhook_id: String,
    pub job_id: uuid::Uuid,
    pub user_id: String,
    pub event_type: String,
    pub url: String,
    pub host: String,
    pub payload: String,
    pub status_at: chrono::DateTime<chrono::Utc>,
}

/// The job as `GET /v1/jobs/{id}` shows it, as far as the status event tells.
fn job_view(event: &StatusEvent) -> Value {
    let millis = |from: chrono::DateTime<chrono::Utc>,
                  to: Option<chrono::DateTime<chrono::Utc>>| {
        to.map(|to| (to - from).num_milliseconds().max(0))
    };
    let timings = &event.timings;
    json!({
        "job_id": event.job_id,
        "user_id": event.user_id,
        "model": event.model,
        "status": event.status,
        "attempt": event.attempt,
        "output": event.output,
        "error": event.error,
        "worker_id": event.worker_id,
        "timings": {
            "queued_at": timings.queued_at,
            "started_at": timings.started_at,
            "finished_at": timings.finished_at,
            "queue_wait_ms": millis(timings.queued_at, timings.started_at),
            "run_ms": timings.started_at.and_then(|started| millis(started, timings.finished_at)),
        },
    })
}

/// The delivery a status event asks for, if its job has a webhook that wants this status.
pub fn delivery_for(event: &StatusEvent) -> Option<NewDelivery> {
    let webhook = event
        .webhook
        .as_ref()
        .filter(|webhook| webhook.wants(event.status))?;
    let host = url::Url::parse(&webhook.url).ok()?.host_str()?.to_owned();
    let event_type = format!("job.{}", event.status.as_str());
    let body = json!({
        "type": event_type,
        "timestamp": event.emitted_at,
        "data": job_view(event),
    });
    Some(NewDelivery {
        // The same for every attempt of this change, and for a redelivered record of it.
        webhook_id: format!(
            "msg_{}_{}",
            event.job_id.as_uuid().simple(),
            event.status.as_str()
        ),
        job_id: event.job_id.as_uuid(),
        user_id: event.user_id.as_str().to_owned(),
        event_type,
        url: webhook.url.clone(),
        host,
        payload: body.to_string(),
        status_at: event.emitted_at,
    })
}

/// Writes `deliveries` in one statement; those already there are left as they are.
pub async fn enqueue(pool: &PgPool, deliveries: &[NewDelivery]) -> sqlx::Result<u64> {
    if deliveries.is_empty() {
        return Ok(0);
    }
    let column = |get: fn(&NewDelivery) -> String| deliveries.iter().map(get).collect::<Vec<_>>();
    let done = sqlx::query(
        "INSERT INTO webhook_deliveries (webhook_id, job_id, user_id, event_type, url, host, payload, status_at)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
         ON CONFLICT (webhook_id) DO NOTHING",
    )
    .bind(column(|delivery| delivery.webhook_id.clone()))
    .bind(deliveries.iter().map(|delivery| delivery.job_id).collect::<Vec<_>>())
    .bind(column(|delivery| delivery.user_id.clone()))
    .bind(column(|delivery| delivery.event_type.clone()))
    .bind(column(|delivery| delivery.url.clone()))
    .bind(column(|delivery| delivery.host.clone()))
    .bind(column(|delivery| delivery.payload.clone()))
    .bind(deliveries.iter().map(|delivery| delivery.status_at).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Reads status records until `stop`; a batch is marked done once its deliveries are committed.
/// Undecodable records are skipped here (the results service dead-letters them).
pub async fn run(
    mut source: KafkaSource,
    pool: PgPool,
    stop: CancellationToken,
    give_up: CancellationToken,
) -> anyhow::Result<()> {
    while let Some(batch) = source.next_batch(MAX_BATCH, &stop).await {
        let deliveries: Vec<NewDelivery> = batch.iter().filter_map(decode).collect();
        // Why retry until stored: the offsets must not move past changes not yet enqueued.
        let stored = sluice_common::shutdown::retry_until_done(
            "enqueueing webhook deliveries",
            &give_up,
            || enqueue(&pool, &deliveries),
        )
        .await;
        let Some(enqueued) = stored else {
            break;
        };
        metrics::counter!("sluice_webhook_enqueued_total").increment(enqueued);
        source.done_all(&batch);
    }
    source.close().await;
    Ok(())
}

fn decode(record: &Record) -> Option<NewDelivery> {
    match StatusEvent::decode(record.payload()) {
        Ok(event) => delivery_for(&event),
        Err(error) => {
            tracing::debug!(reason = %error, offset = record.offset, "skipping an undecodable status event");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{JobStatus, Webhook};

    #[test]
    fn a_change_is_enqueued_only_when_its_webhook_wants_it() {
        let mut event: StatusEvent = serde_json::from_str(include_str!(
            "../../../schemas/examples/status-succeeded.json"
        ))
        .unwrap();
        assert_eq!(delivery_for(&event), None, "no webhook");
        event.webhook = Some(Webhook {
            url: "https://hooks.example.com/sluice?x=1".into(),
            events: vec![JobStatus::Succeeded],
        });
        let delivery = delivery_for(&event).unwrap();
        assert_eq!(delivery.host, "hooks.example.com");
        assert_eq!(delivery.event_type, "job.succeeded");
        assert_eq!(
            delivery.webhook_id,
            format!("msg_{}_succeeded", event.job_id.as_uuid().simple())
        );
        let body: Value = serde_json::from_str(&delivery.payload).unwrap();
        assert_eq!(body["type"], "job.succeeded");
        assert_eq!(
            body["data"]["output"]["content"],
            event.output.as_ref().unwrap().content
        );
        assert_eq!(body["data"]["timings"]["run_ms"], 772);
        event.status = JobStatus::Running;
        assert_eq!(delivery_for(&event), None, "not asked for");
    }
}
