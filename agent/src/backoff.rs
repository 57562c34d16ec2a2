//! Jittered exponential backoff for reconnects.
//!
//! Attempt `n` waits a random delay in `[min, min(max, min · 2ⁿ)]` ("full jitter" above
//! the floor), so a fleet that lost its aggregator does not reconnect in lockstep.

use std::time::Duration;

/// Backoff bounds were invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    /// `min` was zero.
    #[error("backoff minimum must be greater than zero")]
    ZeroMin,
    /// `min` was greater than `max`.
    #[error("backoff minimum {min:?} is greater than the maximum {max:?}")]
    MinAboveMax {
        /// The minimum given.
        min: Duration,
        /// The maximum given.
        max: Duration,
    },
}

/// Reconnect delays; see the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    ///
    /// # Errors
    /// [`BackoffError`] when `min` is zero or above `max`.
    pub fn new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() {
            return Err(BackoffError::ZeroMin);
        }
        if min > max {
            return Err(BackoffError::MinAboveMax { min, max });
        }
        Ok(Backoff {
            min,
            max,
            attempt: 0,
            rng: fastrand::Rng::new(),
        })
    }

    /// The delay before the next attempt; each call doubles the ceiling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(30))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.min);
        self.min + span.mul_f64(self.rng.f64())
    }

    /// Starts over after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_stays_within_bounds(min_ms in 1u64..10_000, extra_ms in 0u64..100_000, calls in 1usize..80) {
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(min_ms + extra_ms));
            let mut b = Backoff::new(min, max).expect("valid");
            for _ in 0..calls {
                let d = b.next_delay();
                prop_assert!(d >= min && d <= max, "{d:?} not in [{min:?}, {max:?}]");
            }
        }
    }

    #[test]
    fn ceiling_grows_then_caps_and_resets() {
        let mut b =
            Backoff::new(Duration::from_millis(100), Duration::from_millis(800)).expect("valid");
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(
            delays[0],
            Duration::from_millis(100),
            "first ceiling is min"
        );
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn invalid_bounds_rejected() {
        assert!(matches!(
            Backoff::new(Duration::ZERO, Duration::from_secs(1)),
            Err(BackoffError::ZeroMin)
        ));
        assert!(matches!(
            Backoff::new(Duration::from_secs(2), Duration::from_secs(1)),
            Err(BackoffError::MinAboveMax { .. })
        ));
    }
}
