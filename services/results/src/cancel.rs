//! Publishes cancel events to the control topic, which every worker follows.

use crate::state::Job;
use std::time::Duration;

/// Publishes cancel events to the control topic.
#[derive(Clone)]
pub struct Canceller {
    pub producer: rdkafka::producer::FutureProducer,
    pub topic: String,
}

impl Canceller {
    pub async fn publish(&self, job: &Job) -> Result<(), String> {
        let event = sluice_schemas::CancelEvent {
            schema_version: sluice_schemas::SCHEMA_VERSION,
            job_id: job.job_id,
            user_id: job.user_id.clone(),
            requested_at: chrono::Utc::now(),
            deadline: job.timings.deadline,
        };
        let payload = event.encode();
        let record = rdkafka::producer::FutureRecord::to(&self.topic)
            .key(job.user_id.as_str())
            .payload(&payload)
            .headers(sluice_common::kafka::event_headers());
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.producer.send(record, Duration::ZERO),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(error.to_string()),
            Err(_) => Err("the broker did not acknowledge within 5 s".to_owned()),
        }
    }
}
