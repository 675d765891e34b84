//! The waits of every loop that dials or retries (a datacenter's peer links, a worker's links
//! to its controller and load balancer, the bundle fetch): doubling from a minimum to a maximum, each
//! with up to as much again added at random, so that many machines that lost the same peer do
//! not come back in step. One type for all of them, over backon's exponential backoff.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// `d` plus up to a quarter of it at random: a fixed retry period (a controller that refuses
/// this machine is asked again every 30 s) that many machines do not keep in step.
pub fn jittered(d: Duration) -> Duration {
    let spread = (d.as_millis() as u64 / 4).max(1);
    d + Duration::from_millis(rand::random::<u64>() % spread)
}

/// Waits before successive attempts; [`Backoff::reset`] after an attempt that worked.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    max: Duration,
    waits: ExponentialBackoff,
}

impl Backoff {
    /// Waits of `min`, `2 min`, ... up to `max`, each plus up to as much again at random.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        debug_assert!(min <= max, "backoff bounds {min:?} > {max:?}");
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            max,
            waits: builder.build(),
        }
    }

    /// The same waits with the randomness drawn from `seed` (a simulation replays them).
    pub fn seeded(min: Duration, max: Duration, seed: u64) -> Backoff {
        let mut b = Backoff::new(min, max);
        b.builder = b.builder.with_jitter_seed(seed);
        b.waits = b.builder.build();
        b
    }

    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        // Without a bound on attempts the iterator never ends; the maximum is the fallback.
        self.waits.next().unwrap_or(self.max)
    }

    /// The next wait is the minimum again.
    pub fn reset(&mut self) {
        self.waits = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant: the waits double from the minimum, never exceed twice the maximum (the step
    /// plus its jitter), and start over after a reset.
    #[test]
    fn waits_double_to_the_bound_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::seeded(min, max, 7);
        let steps = [100u64, 200, 400, 800, 1000, 1000];
        for step in steps {
            let w = b.next_wait();
            let step = Duration::from_millis(step);
            assert!(
                w >= step && w <= step * 2,
                "{w:?} outside [{step:?}, 2 x {step:?}]"
            );
        }
        b.reset();
        let w = b.next_wait();
        assert!(w >= min && w <= min * 2, "after a reset: {w:?}");
    }

    /// Invariant: a seed replays the same waits (the simulations depend on it).
    #[test]
    fn a_seed_replays_its_waits() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let a: Vec<_> = {
            let mut b = Backoff::seeded(min, max, 42);
            (0..8).map(|_| b.next_wait()).collect()
        };
        let mut b = Backoff::seeded(min, max, 42);
        assert_eq!(a, (0..8).map(|_| b.next_wait()).collect::<Vec<_>>());
    }
}
