//! The retry policy: attempts per model, the delay between them, and what comes after a
//! failed attempt.

use crate::model::{CallError, Failure};
use std::time::Duration;

/// Attempts per model and the delays between them.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub attempt_timeout: Duration,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Try the same model again after this delay.
    RetryAfter(Duration),
    /// This model is spent (or waiting would spend the deadline): the next in the chain.
    OtherModel,
    /// Nothing more can help: the job fails with this attempt's error.
    Stop,
}

impl RetryPolicy {
    /// Exponential backoff with jitter (half fixed, half random), or the backend's
    /// `Retry-After` when it asked for longer; never more than `max_delay`.
    pub fn delay(&self, try_number: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .base_delay
            .saturating_mul(1 << try_number.saturating_sub(1).min(16))
            .min(self.max_delay);
        let half = exponential / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        retry_after
            .map_or(jittered, |asked| asked.max(jittered))
            .min(self.max_delay)
    }

    /// After the `try_number`th attempt at a model failed, with `time_left` to the deadline.
    pub(crate) fn next(&self, try_number: u32, failed: &CallError, time_left: Duration) -> Next {
        match failed.failure {
            Failure::Fatal | Failure::DeadlineCut => Next::Stop,
            Failure::Retryable if try_number >= self.max_attempts => Next::OtherModel,
            Failure::Retryable => {
                let delay = self.delay(try_number, failed.retry_after);
                if delay >= time_left {
                    // Waiting would spend the deadline: let the next model try now.
                    Next::OtherModel
                } else {
                    Next::RetryAfter(delay)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{ErrorCode, JobError};

    fn failed(failure: Failure, retry_after: Option<Duration>) -> CallError {
        CallError {
            error: JobError {
                code: ErrorCode::BackendError,
                message: "x".into(),
            },
            failure,
            retry_after,
        }
    }

    #[test]
    fn retryable_failures_retry_until_the_attempts_or_the_deadline_run_out() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(10),
        };
        let minute = Duration::from_secs(60);
        let retryable = failed(Failure::Retryable, None);
        assert!(
            matches!(policy.next(1, &retryable, minute), Next::RetryAfter(delay) if delay >= Duration::from_millis(50) && delay <= Duration::from_millis(100))
        );
        assert_eq!(policy.next(3, &retryable, minute), Next::OtherModel);
        assert_eq!(
            policy.next(1, &retryable, Duration::from_millis(10)),
            Next::OtherModel,
            "a delay past the deadline moves on"
        );
        let asked = failed(Failure::Retryable, Some(Duration::from_secs(1)));
        assert_eq!(
            policy.next(1, &asked, minute),
            Next::RetryAfter(Duration::from_secs(1)),
            "Retry-After is honoured"
        );
        assert_eq!(
            policy.next(1, &failed(Failure::Fatal, None), minute),
            Next::Stop
        );
        assert_eq!(
            policy.next(1, &failed(Failure::DeadlineCut, None), minute),
            Next::Stop
        );
    }
}
