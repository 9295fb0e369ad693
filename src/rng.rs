//! A counter-based random number generator: every draw is a pure function
//! of `(seed, stream, counter)`.
//!
//! Initialisation and dropout draw from it, so their values do not depend on
//! the order in which threads or kernels ask for them, and the reference
//! executor and the JIT produce the same masks bit for bit.

/// SplitMix64's output function (Steele, Lea and Flood, 2014), a bijective
/// mixer of 64-bit words.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit random word for `counter` in `stream` under `seed`.
pub fn word(seed: u64, stream: u64, counter: u64) -> u64 {
    let key = mix(seed ^ mix(stream.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    mix(key.wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// A uniform `f32` in `[0, 1)` with 24 random bits.
pub fn uniform(seed: u64, stream: u64, counter: u64) -> f32 {
    (word(seed, stream, counter) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_unit_interval_and_balanced() {
        let n = 100_000;
        let draws: Vec<f32> = (0..n).map(|i| uniform(7, 3, i)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().map(|&u| u as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn streams_differ() {
        assert_ne!(word(1, 0, 0), word(1, 1, 0));
        assert_ne!(word(1, 0, 0), word(2, 0, 0));
        assert_eq!(word(1, 0, 5), word(1, 0, 5));
    }
}
