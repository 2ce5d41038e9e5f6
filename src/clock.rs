//! Injected wall-clock time, so expiry logic is testable without sleeping. Reading the wall
//! clock anywhere else is refused by clippy (`disallowed-methods` in `clippy.toml`).

use std::time::SystemTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(
        clippy::disallowed_methods,
        reason = "the one place that reads the wall clock; everything else is given a Clock"
    )]
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall time that moves with tokio's clock, so tests with paused time move both together:
/// the real time at creation plus tokio time elapsed since.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: SystemTime,
    anchor: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            start: SystemClock.now(),
            anchor: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start + self.anchor.elapsed()
    }
}
