//! Reconnect delays: full-jitter exponential backoff, and a small random
//! source that needs no extra crate.

use std::time::Duration;

/// Full-jitter exponential backoff: attempt `n` (0-based) waits a uniform
/// random time in `[floor, min(cap, base * 2^n)]`.
///
/// The floor keeps a client from reconnecting in a tight loop even when the
/// random draw is near zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub floor: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            floor: Duration::from_millis(10),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay of attempt `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
            .max(self.floor)
    }

    /// The delay before attempt `attempt`, drawn from `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut Rng) -> Duration {
        let hi = self.ceiling(attempt);
        let lo = self.floor.min(hi);
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(rng.below(span + 1))
    }
}

/// xorshift64*: fast, seeded from the OS; for jitter, not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn from_os() -> Rng {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Rng::seeded(u64::from_le_bytes(b))
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            ((self.next_u64() as u128 * n as u128) >> 64) as u64
        }
    }
}

/// A random 128-bit id as 32 lowercase hex digits (from the OS source).
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: fall back to time and a counter, still unique
        // within this process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b[..8].copy_from_slice(&t.to_le_bytes());
        b[8..].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    }
    let mut s = String::with_capacity(32);
    for x in b {
        s.push(char::from(b"0123456789abcdef"[(x >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(x & 15) as usize]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_full_jitter_bounds() {
        let b = Backoff::default();
        let mut rng = Rng::seeded(42);
        for attempt in 0..40 {
            let hi = b.ceiling(attempt);
            assert!(hi <= b.cap && hi >= b.floor);
            for _ in 0..200 {
                let d = b.delay(attempt, &mut rng);
                assert!(d >= b.floor, "attempt {attempt}: {d:?} below the floor");
                assert!(d <= hi, "attempt {attempt}: {d:?} above {hi:?}");
            }
        }
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(6), Duration::from_secs(5));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let b = Backoff::default();
        let mut rng = Rng::seeded(7);
        let draws: Vec<Duration> = (0..2000).map(|_| b.delay(10, &mut rng)).collect();
        let low = draws
            .iter()
            .filter(|d| **d < Duration::from_secs(1))
            .count();
        let high = draws
            .iter()
            .filter(|d| **d > Duration::from_secs(4))
            .count();
        // Uniform over [10 ms, 5 s]: about 20% in each of those bands.
        assert!(low > 250 && high > 250, "low {low}, high {high}");
    }

    #[test]
    fn ids_are_128_bit_hex_and_distinct() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
