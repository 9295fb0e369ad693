//! Data augmentation of image batches: random horizontal flips and random
//! translations, drawn from the counter-based generator so a run is
//! reproducible.

use crate::check::train::Augment;
use crate::rng;

/// Augments one `[C, H, W]` sample in place. `key` identifies the sample
/// draw (global step and position in the batch).
pub fn apply(sample: &mut [f32], shape: &[usize], augments: &[Augment], seed: u64, key: u64) {
    let [channels, height, width] = shape[..] else {
        return;
    };
    for (i, augment) in augments.iter().enumerate() {
        let stream = 1_000 + i as u64;
        match *augment {
            Augment::Flip { p } => {
                if (rng::uniform(seed, stream, key) as f64) < p {
                    for row in sample.chunks_exact_mut(width) {
                        row.reverse();
                    }
                }
            }
            Augment::Translate { pixels } => {
                if pixels == 0 {
                    continue;
                }
                let span = 2 * pixels as u64 + 1;
                let dy = (rng::word(seed, stream, 2 * key) % span) as isize - pixels as isize;
                let dx = (rng::word(seed, stream, 2 * key + 1) % span) as isize - pixels as isize;
                shift(sample, channels, height, width, dy, dx);
            }
        }
    }
}

/// Moves every plane by `(dy, dx)`, filling uncovered cells with 0.
fn shift(sample: &mut [f32], channels: usize, height: usize, width: usize, dy: isize, dx: isize) {
    let source = sample.to_vec();
    for c in 0..channels {
        for y in 0..height {
            for x in 0..width {
                let sy = y as isize - dy;
                let sx = x as isize - dx;
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < height && (sx as usize) < width;
                sample[(c * height + y) * width + x] = if inside {
                    source[(c * height + sy as usize) * width + sx as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_moves_and_fills_with_zero() {
        let mut plane = vec![1.0, 2.0, 3.0, 4.0];
        shift(&mut plane, 1, 2, 2, 0, 1);
        assert_eq!(plane, vec![0.0, 1.0, 0.0, 3.0]);
    }

    #[test]
    fn flip_with_certainty_mirrors_rows() {
        let mut plane = vec![1.0, 2.0, 3.0, 4.0];
        apply(&mut plane, &[1, 2, 2], &[Augment::Flip { p: 1.0 }], 0, 0);
        assert_eq!(plane, vec![2.0, 1.0, 4.0, 3.0]);
    }
}
