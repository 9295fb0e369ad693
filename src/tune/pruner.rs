//! Pruners: whether a running trial should stop after an epoch, judged by
//! the validation metric that every trial reports each epoch.
//!
//! - Median stopping (as in Google Vizier and Optuna's `MedianPruner`):
//!   after `warmup` epochs, and once `startup` trials have finished, a trial
//!   stops when its best value so far is worse than the median of the
//!   other trials' best values at the same epoch.
//! - Asynchronous successive halving (ASHA; Li et al., "A System for
//!   Massively Parallel Hyperparameter Tuning", MLSys 2020): rungs sit at
//!   epochs `min_epochs · ηᵏ`. A trial reaching a rung continues only if its
//!   best value so far is among the top `1/η` of all values recorded at that
//!   rung, its own included; the first trial at a rung always continues.

use super::sampler::Direction;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pruner {
    None,
    Median { startup: usize, warmup: usize },
    Asha { min_epochs: usize, reduction: usize },
}

impl Pruner {
    pub fn median() -> Pruner {
        Pruner::Median {
            startup: 5,
            warmup: 1,
        }
    }

    pub fn asha() -> Pruner {
        Pruner::Asha {
            min_epochs: 1,
            reduction: 3,
        }
    }

    /// Decides after `epochs.len()` epochs whether to stop a trial whose
    /// values so far are `epochs`, given the per-epoch values of the other
    /// trials (finished or running) and how many have finished.
    pub fn should_prune(
        &self,
        epochs: &[f64],
        others: &[Vec<f64>],
        finished: usize,
        direction: Direction,
    ) -> bool {
        let epoch = epochs.len();
        if epoch == 0 {
            return false;
        }
        let best = |values: &[f64]| best_of(values, direction);
        let mine = best(epochs);
        match *self {
            Pruner::None => false,
            Pruner::Median { startup, warmup } => {
                if finished < startup || epoch <= warmup {
                    return false;
                }
                let mut theirs: Vec<f64> = others
                    .iter()
                    .filter(|v| v.len() >= epoch)
                    .map(|v| best(&v[..epoch]))
                    .collect();
                if theirs.is_empty() {
                    return false;
                }
                theirs.sort_by(f64::total_cmp);
                let median = if theirs.len() % 2 == 1 {
                    theirs[theirs.len() / 2]
                } else {
                    0.5 * (theirs[theirs.len() / 2 - 1] + theirs[theirs.len() / 2])
                };
                worse(mine, median, direction)
            }
            Pruner::Asha {
                min_epochs,
                reduction,
            } => {
                if !is_rung(epoch, min_epochs, reduction) {
                    return false;
                }
                let mut at_rung: Vec<f64> = others
                    .iter()
                    .filter(|v| v.len() >= epoch)
                    .map(|v| best(&v[..epoch]))
                    .collect();
                at_rung.push(mine);
                at_rung.sort_by(|a, b| match direction {
                    Direction::Maximize => b.total_cmp(a),
                    Direction::Minimize => a.total_cmp(b),
                });
                let keep = (at_rung.len() / reduction.max(2)).max(1);
                worse(mine, at_rung[keep - 1], direction)
            }
        }
    }
}

/// Whether epoch `epoch` (counted from 1) is a rung: `min · ηᵏ`.
fn is_rung(epoch: usize, min_epochs: usize, reduction: usize) -> bool {
    let mut rung = min_epochs.max(1);
    while rung < epoch {
        rung = rung.saturating_mul(reduction.max(2));
    }
    rung == epoch
}

fn best_of(values: &[f64], direction: Direction) -> f64 {
    let pick = |a: f64, b: f64| match direction {
        Direction::Maximize => a.max(b),
        Direction::Minimize => a.min(b),
    };
    values.iter().copied().reduce(pick).unwrap_or(f64::NAN)
}

fn worse(a: f64, b: f64, direction: Direction) -> bool {
    match direction {
        Direction::Maximize => a < b,
        Direction::Minimize => a > b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_grow_geometrically() {
        let rungs: Vec<usize> = (1..=30).filter(|&e| is_rung(e, 1, 3)).collect();
        assert_eq!(rungs, vec![1, 3, 9, 27]);
    }

    #[test]
    fn asha_keeps_the_top_third() {
        let asha = Pruner::asha();
        let others = vec![vec![0.9], vec![0.8], vec![0.7], vec![0.6], vec![0.5]];
        assert!(!asha.should_prune(&[0.95], &others, 5, Direction::Maximize));
        assert!(!asha.should_prune(&[0.85], &others, 5, Direction::Maximize));
        assert!(asha.should_prune(&[0.75], &others, 5, Direction::Maximize));
    }

    #[test]
    fn asha_promotes_the_first_trial_at_a_rung() {
        assert!(!Pruner::asha().should_prune(&[0.1], &[], 0, Direction::Maximize));
    }

    #[test]
    fn median_prunes_below_the_median() {
        let median = Pruner::median();
        // The others' best values at epoch 2 are 0.5 to 0.9 (median 0.7)
        // when larger is better, and all 0.2 when smaller is better.
        let others: Vec<Vec<f64>> = (0..5).map(|i| vec![0.2, 0.5 + 0.1 * i as f64]).collect();
        assert!(median.should_prune(&[0.2, 0.6], &others, 5, Direction::Maximize));
        assert!(!median.should_prune(&[0.2, 0.8], &others, 5, Direction::Maximize));
        assert!(!median.should_prune(&[0.2, 0.6], &others, 5, Direction::Minimize));
        assert!(
            !median.should_prune(&[0.0], &others, 5, Direction::Maximize),
            "warm-up"
        );
        assert!(
            !median.should_prune(&[0.2, 0.1], &others, 4, Direction::Maximize),
            "startup"
        );
    }
}
