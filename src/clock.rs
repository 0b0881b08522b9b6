//! Time as the store records it (unix milliseconds): the daemon's steady clock, and a manual one for tests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;

    /// The clock as a [`SteadyClock`], which must be kept up with the wall clock.
    fn steady(&self) -> Option<&SteadyClock> {
        None
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

/// A gap to the wall clock larger than this is a step of the system clock, not drift.
pub const STEP_MS: i64 = 5_000;

/// The daemon's clock: the wall clock as it was at start, carried forward by the monotonic
/// clock, so it does not jump when the system clock is stepped (NTP correcting a large error, a
/// VM resumed with a stale clock). Retry times in the store are instants on this clock. Every few
/// seconds the daemon compares it with the wall clock and catches up (`Shared::follow_wall_clock`):
/// a step moves pending retry schedules in the same store job that moves this clock, so every
/// time the store holds stays on one timeline.
pub struct SteadyClock {
    wall: Box<dyn Fn() -> i64 + Send + Sync>,
    start: Instant,
    /// Wall time at `start`, plus every gap caught up with since.
    base_ms: AtomicI64,
}

impl SteadyClock {
    pub fn new() -> Arc<SteadyClock> {
        Self::with_wall(Box::new(|| chrono::Utc::now().timestamp_millis()))
    }

    /// A steady clock over another wall clock (tests step it).
    pub fn with_wall(wall: Box<dyn Fn() -> i64 + Send + Sync>) -> Arc<SteadyClock> {
        let base = wall();
        Arc::new(SteadyClock {
            wall,
            start: Instant::now(),
            base_ms: AtomicI64::new(base),
        })
    }

    /// How far the wall clock is ahead of this one (negative: behind), in ms.
    pub fn gap_to_wall(&self) -> i64 {
        (self.wall)() - self.now_ms()
    }

    pub fn base(&self) -> i64 {
        self.base_ms.load(Ordering::SeqCst)
    }

    /// Sets the base (idempotent, so a store job that runs twice does no harm).
    pub fn set_base(&self, base_ms: i64) {
        self.base_ms.store(base_ms, Ordering::SeqCst);
    }
}

impl Clock for SteadyClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base().saturating_add(elapsed)
    }

    fn steady(&self) -> Option<&SteadyClock> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_clock_ignores_wall_clock_steps_until_it_catches_up() {
        let step = Arc::new(AtomicI64::new(0));
        let wall = {
            let step = step.clone();
            move || chrono::Utc::now().timestamp_millis() + step.load(Ordering::SeqCst)
        };
        let clock = SteadyClock::with_wall(Box::new(wall));
        assert!(clock.gap_to_wall().abs() < 50);
        step.store(-3_600_000, Ordering::SeqCst);
        let before = clock.now_ms();
        assert!(
            chrono::Utc::now().timestamp_millis() - before < 50,
            "it did not jump"
        );
        let gap = clock.gap_to_wall();
        assert!((gap + 3_600_000).abs() < 50, "{gap}");
        clock.set_base(clock.base() + gap);
        assert!(clock.gap_to_wall().abs() < 50);
        assert!(clock.now_ms() <= before - 3_600_000 + 50);
    }
}
