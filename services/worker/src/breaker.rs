//! A circuit breaker per backend: after `threshold` failures in a row it fails fast for a
//! cool-down, then lets one probe through; the probe's result closes or reopens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner {
                consecutive_failures: 0,
                opened_at: None,
                probe_in_flight: false,
            }),
        }
    }

    /// Sets `sluice_circuit_state` for `backend`: 0 closed, 1 half-open, 2 open.
    pub fn report(&self, backend: &str, now: Instant) {
        let value = match self.state(now) {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        };
        metrics::gauge!("sluice_circuit_state", "backend" => backend.to_owned()).set(value);
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        let inner = self.inner.lock().expect("breaker lock");
        match inner.opened_at {
            None => CircuitState::Closed,
            Some(opened) if now.duration_since(opened) < self.cooldown => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Whether a call may go to the backend now. In half-open state only one probe is let
    /// through at a time; its outcome must be reported with `record`.
    pub fn try_acquire(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock().expect("breaker lock");
        match inner.opened_at {
            None => true,
            Some(opened) if now.duration_since(opened) < self.cooldown => false,
            Some(_) if inner.probe_in_flight => false,
            Some(_) => {
                inner.probe_in_flight = true;
                true
            }
        }
    }

    /// Reports a call's outcome. Only backend failures count (unreachable, timeout, 429, 5xx);
    /// a 4xx about the request itself says nothing about the backend's health.
    pub fn record(&self, healthy: bool, now: Instant) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.probe_in_flight = false;
        if healthy {
            if inner.opened_at.is_some() {
                tracing::info!("circuit closed");
            }
            inner.consecutive_failures = 0;
            inner.opened_at = None;
            return;
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let probe_failed = inner.opened_at.is_some();
        if probe_failed || inner.consecutive_failures >= self.threshold {
            if inner.opened_at.is_none() {
                tracing::warn!(failures = inner.consecutive_failures, "circuit opened");
            }
            inner.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_after_cooldown() {
        let breaker = CircuitBreaker::new(3, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..2 {
            assert!(breaker.try_acquire(start));
            breaker.record(false, start);
        }
        assert_eq!(
            breaker.state(start),
            CircuitState::Closed,
            "two failures are not enough"
        );
        breaker.record(false, start);
        assert_eq!(breaker.state(start), CircuitState::Open);
        assert!(
            !breaker.try_acquire(start + Duration::from_secs(9)),
            "fails fast while cooling down"
        );

        let later = start + Duration::from_secs(10);
        assert_eq!(breaker.state(later), CircuitState::HalfOpen);
        assert!(breaker.try_acquire(later), "one probe goes through");
        assert!(!breaker.try_acquire(later), "and only one");
        breaker.record(false, later);
        assert_eq!(
            breaker.state(later),
            CircuitState::Open,
            "a failed probe reopens"
        );

        let much_later = later + Duration::from_secs(10);
        assert!(breaker.try_acquire(much_later));
        breaker.record(true, much_later);
        assert_eq!(
            breaker.state(much_later),
            CircuitState::Closed,
            "a good probe closes"
        );
        assert!(breaker.try_acquire(much_later));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = CircuitBreaker::new(2, Duration::from_secs(1));
        let now = Instant::now();
        breaker.record(false, now);
        breaker.record(true, now);
        breaker.record(false, now);
        assert_eq!(breaker.state(now), CircuitState::Closed);
    }
}
