//! Learning-rate schedules, evaluated per step.

use crate::check::train::Schedule;

/// The learning rate for `step` (counted from 0 within `epoch`) of an epoch
/// of `steps` steps, out of `epochs` epochs, starting from `base`.
pub fn learning_rate(
    schedule: &Schedule,
    base: f64,
    epoch: usize,
    step: usize,
    steps: usize,
    epochs: usize,
) -> f64 {
    let steps = steps.max(1);
    match *schedule {
        Schedule::Constant => base,
        Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
        Schedule::Cosine { warmup, min_lr } => {
            let warmup_steps = warmup * steps;
            let done = epoch * steps + step;
            if done < warmup_steps {
                // Linear warm-up from base / warmup_steps to base.
                return base * (done + 1) as f64 / warmup_steps as f64;
            }
            let total = (epochs.saturating_sub(warmup) * steps).max(1);
            let progress = ((done - warmup_steps) as f64 / total as f64).min(1.0);
            min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_schedule_decays_every_n_epochs() {
        let s = Schedule::Step {
            every: 2,
            gamma: 0.1,
        };
        assert_eq!(learning_rate(&s, 1.0, 1, 0, 10, 10), 1.0);
        assert!((learning_rate(&s, 1.0, 2, 0, 10, 10) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = Schedule::Cosine {
            warmup: 1,
            min_lr: 0.0,
        };
        assert!((learning_rate(&s, 1.0, 0, 0, 4, 5) - 0.25).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 0, 3, 4, 5) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 1, 0, 4, 5) - 1.0).abs() < 1e-12);
        assert!(learning_rate(&s, 1.0, 4, 3, 4, 5) < 0.01);
    }
}
