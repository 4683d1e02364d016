//! Exponential backoff with jitter, used by every retry loop.

use std::time::Duration;

/// Exponential backoff: `initial * factor^attempt`, capped at `max`, with a
/// proportional jitter so that many agents retrying at once spread out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
    /// Fraction of the delay that is randomised (0.0 = none, 0.5 = +-25%).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (0 = first retry). `random` is a
    /// value in `[0, 1)` supplied by the caller so this stays deterministic.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.factor.powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        let random = random.clamp(0.0, 1.0);
        let jittered = capped * (1.0 - self.jitter / 2.0 + self.jitter * random);
        Duration::from_secs_f64(jittered.min(self.max.as_secs_f64()).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(0, 0.3), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.3), Duration::from_secs(2));
        assert_eq!(b.delay(3, 0.3), Duration::from_secs(8));
        assert_eq!(b.delay(6, 0.3), Duration::from_secs(60));
        assert_eq!(b.delay(1000, 0.3), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff::default();
        assert_eq!(b.delay(2, 0.0), Duration::from_secs(3));
        assert_eq!(b.delay(2, 1.0), Duration::from_secs(5));
        // Never above the cap, even with jitter.
        assert!(b.delay(20, 1.0) <= Duration::from_secs(60));
    }
}
