//! Wall-clock time as the store records it (unix milliseconds), injectable for tests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start_ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(start_ms)))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// Steps of the wall clock smaller than this are drift, not steps.
const STEP_MS: i64 = 5_000;

/// Notices the wall clock being stepped (NTP correcting a large error, a VM resumed with a stale
/// clock) by comparing it with the monotonic clock. Retry times are wall-clock instants, so a
/// clock stepped back an hour would otherwise hold every scheduled retry an hour longer.
#[derive(Debug)]
pub struct StepWatch {
    mono: Instant,
    wall_ms: i64,
}

impl StepWatch {
    pub fn new(mono: Instant, wall_ms: i64) -> StepWatch {
        StepWatch { mono, wall_ms }
    }

    /// The step (negative: back) since the last look, when the wall clock moved more than 5 s
    /// away from what the monotonic clock says has passed.
    pub fn observe(&mut self, mono: Instant, wall_ms: i64) -> Option<i64> {
        let passed = i64::try_from(mono.saturating_duration_since(self.mono).as_millis())
            .unwrap_or(i64::MAX);
        let step = wall_ms - self.wall_ms.saturating_add(passed);
        self.mono = mono;
        self.wall_ms = wall_ms;
        (step.abs() > STEP_MS).then_some(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn steps_are_told_apart_from_time_passing_and_drift() {
        let t0 = Instant::now();
        let mut w = StepWatch::new(t0, 1_000_000);
        // Five seconds pass on both clocks, then a little drift.
        assert_eq!(w.observe(t0 + Duration::from_secs(5), 1_005_000), None);
        assert_eq!(w.observe(t0 + Duration::from_secs(10), 1_010_900), None);
        // Stepped back an hour, then forward ten minutes.
        assert_eq!(
            w.observe(t0 + Duration::from_secs(15), 1_015_900 - 3_600_000),
            Some(-3_600_000)
        );
        assert_eq!(
            w.observe(t0 + Duration::from_secs(20), 1_020_900 - 3_000_000),
            Some(600_000)
        );
        assert_eq!(
            w.observe(t0 + Duration::from_secs(25), 1_025_900 - 3_000_000),
            None
        );
    }
}
