//! Ensembles: pooling the predictions of several trained models.
//!
//! Members may differ in architecture and input normalisation; each turns
//! raw samples into class probabilities on its own, and a [`Rule`]
//! combines them. [`greedy_selection`] picks members (with replacement)
//! from a pool of candidates as Caruana, Niculescu-Mizil, Crew and Ksikes
//! describe in "Ensemble Selection from Libraries of Models" (ICML 2004),
//! and [`Diversity`] measures how differently members err, which is what
//! makes pooling worth it. [`file`] reads and writes an ensemble as one
//! safetensors file.

pub mod file;

use ndarray::{Array2, Axis};

/// How member predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The (weighted) mean of the members' probabilities.
    MeanProbability,
    /// Softmax of the (weighted) mean of the members' logits.
    MeanLogits,
    /// The class most members predict (weights count as votes); ties go to
    /// the class with the larger mean probability. The output
    /// probabilities are the vote shares.
    Vote,
}

/// One member's outputs on a data set: logits and softmax probabilities,
/// `[samples, classes]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    pub logits: Array2<f32>,
    pub probabilities: Array2<f32>,
}

impl Predictions {
    pub fn from_logits(logits: Array2<f32>) -> Predictions {
        let probabilities = softmax_rows(&logits);
        Predictions {
            logits,
            probabilities,
        }
    }

    pub fn classes(&self) -> Vec<usize> {
        argmax_rows(&self.probabilities)
    }
}

fn softmax_rows(logits: &Array2<f32>) -> Array2<f32> {
    let mut out = logits.clone();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let max = row.fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    out
}

/// Returns the index of each row's largest value (the first of equal ones).
pub fn argmax_rows(values: &Array2<f32>) -> Vec<usize> {
    values
        .axis_iter(Axis(0))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

/// Combined probabilities of `members` with `weights` (one per member; all
/// 1 for a plain mean), and the predicted class of each sample.
///
/// # Panics
/// When `members` is empty or shapes differ.
pub fn combine(rule: Rule, members: &[&Predictions], weights: &[f64]) -> (Array2<f32>, Vec<usize>) {
    assert!(!members.is_empty(), "an ensemble has members");
    let total: f64 = weights.iter().sum();
    let mean = |pick: fn(&Predictions) -> &Array2<f32>| {
        let mut sum = Array2::<f32>::zeros(pick(members[0]).raw_dim());
        for (m, w) in members.iter().zip(weights) {
            sum.scaled_add((*w / total) as f32, pick(m));
        }
        sum
    };
    match rule {
        Rule::MeanProbability => {
            let p = mean(|m| &m.probabilities);
            let classes = argmax_rows(&p);
            (p, classes)
        }
        Rule::MeanLogits => {
            let p = softmax_rows(&mean(|m| &m.logits));
            let classes = argmax_rows(&p);
            (p, classes)
        }
        Rule::Vote => {
            let mean_p = mean(|m| &m.probabilities);
            let mut votes = Array2::<f32>::zeros(mean_p.raw_dim());
            for (m, w) in members.iter().zip(weights) {
                for (row, class) in m.classes().into_iter().enumerate() {
                    votes[[row, class]] += (*w / total) as f32;
                }
            }
            let classes = votes
                .axis_iter(Axis(0))
                .zip(mean_p.axis_iter(Axis(0)))
                .map(|(v, p)| {
                    (0..v.len())
                        .max_by(|&a, &b| {
                            v[a].total_cmp(&v[b])
                                .then(p[a].total_cmp(&p[b]))
                                .then(b.cmp(&a))
                        })
                        .unwrap_or(0)
                })
                .collect();
            (votes, classes)
        }
    }
}

/// Returns the fraction of samples whose predicted class is their label.
pub fn accuracy(classes: &[usize], labels: &[usize]) -> f64 {
    let right = classes.iter().zip(labels).filter(|(c, l)| c == l).count();
    right as f64 / labels.len().max(1) as f64
}

/// Mean cross-entropy of probabilities against labels, with probabilities
/// clamped at 1e-7 so a confident vote of 0 stays finite.
pub fn log_loss(probabilities: &Array2<f32>, labels: &[usize]) -> f64 {
    let total: f64 = labels
        .iter()
        .enumerate()
        .map(|(row, &l)| {
            let p = probabilities[[row, l]];
            // `max` would turn a NaN into 1e-7 and hide it.
            if p.is_nan() {
                f64::NAN
            } else {
                -(p.max(1e-7) as f64).ln()
            }
        })
        .sum();
    total / labels.len().max(1) as f64
}

/// How two members differ on a data set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Diversity {
    pub a: usize,
    pub b: usize,
    /// The fraction of samples on which their predicted classes differ.
    pub disagreement: f64,
    /// Pearson correlation of their error indicators (1 when they err on
    /// the same samples); `None` when either never or always errs.
    pub error_correlation: Option<f64>,
}

/// Disagreement and error correlation of every pair of members.
pub fn diversity(members: &[&Predictions], labels: &[usize]) -> Vec<Diversity> {
    let classes: Vec<Vec<usize>> = members.iter().map(|m| m.classes()).collect();
    let errors: Vec<Vec<f64>> = classes
        .iter()
        .map(|c| {
            c.iter()
                .zip(labels)
                .map(|(p, l)| f64::from(p != l))
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for a in 0..members.len() {
        for b in a + 1..members.len() {
            let differ = classes[a]
                .iter()
                .zip(&classes[b])
                .filter(|(x, y)| x != y)
                .count();
            out.push(Diversity {
                a,
                b,
                disagreement: differ as f64 / labels.len().max(1) as f64,
                error_correlation: pearson(&errors[a], &errors[b]),
            });
        }
    }
    out
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

/// Ensemble selection with replacement: starting from nothing, add in each
/// of `rounds` rounds the candidate whose addition gives the mean of
/// probabilities the lowest log loss on `labels`, and return how often
/// each candidate was picked at the best round (the weights of
/// [`Rule::MeanProbability`]).
pub fn greedy_selection(
    candidates: &[&Predictions],
    labels: &[usize],
    rounds: usize,
) -> Vec<usize> {
    let mut counts = vec![0usize; candidates.len()];
    let mut best = (f64::INFINITY, counts.clone());
    if candidates.is_empty() {
        return counts;
    }
    let mut sum = Array2::<f32>::zeros(candidates[0].probabilities.raw_dim());
    for round in 1..=rounds.max(1) {
        let scored = candidates.iter().enumerate().map(|(i, c)| {
            let mean = (&sum + &c.probabilities) / round as f32;
            (i, log_loss(&mean, labels))
        });
        let (pick, loss) = scored
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("candidates exist");
        counts[pick] += 1;
        sum += &candidates[pick].probabilities;
        if loss < best.0 {
            best = (loss, counts.clone());
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn probs(rows: Array2<f32>) -> Predictions {
        Predictions {
            logits: rows.mapv(|p| p.max(1e-6).ln()),
            probabilities: rows,
        }
    }

    #[test]
    fn mean_of_probabilities() {
        let a = probs(array![[0.9, 0.1], [0.4, 0.6]]);
        let b = probs(array![[0.5, 0.5], [0.0, 1.0]]);
        let (p, classes) = combine(Rule::MeanProbability, &[&a, &b], &[1.0, 1.0]);
        assert!((p[[0, 0]] - 0.7).abs() < 1e-6);
        assert!((p[[1, 1]] - 0.8).abs() < 1e-6);
        assert_eq!(classes, vec![0, 1]);
    }

    #[test]
    fn weights_scale_members() {
        let a = probs(array![[1.0, 0.0]]);
        let b = probs(array![[0.0, 1.0]]);
        let (p, classes) = combine(Rule::MeanProbability, &[&a, &b], &[1.0, 3.0]);
        assert!((p[[0, 1]] - 0.75).abs() < 1e-6);
        assert_eq!(classes, vec![1]);
    }

    #[test]
    fn mean_of_logits_is_a_geometric_pool() {
        let a = Predictions::from_logits(array![[2.0, 0.0]]);
        let b = Predictions::from_logits(array![[0.0, 1.0]]);
        let (p, _) = combine(Rule::MeanLogits, &[&a, &b], &[1.0, 1.0]);
        let expected = 1.0 / (1.0 + (-0.5f32).exp());
        assert!((p[[0, 0]] - expected).abs() < 1e-6);
    }

    #[test]
    fn majority_vote_and_its_tie_break() {
        let a = probs(array![[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]]);
        let b = probs(array![[0.6, 0.4, 0.0], [0.0, 0.55, 0.45]]);
        let c = probs(array![[0.0, 0.1, 0.9], [0.0, 0.0, 1.0]]);
        let (votes, classes) = combine(Rule::Vote, &[&a, &b, &c], &[1.0, 1.0, 1.0]);
        assert!((votes[[0, 0]] - 2.0 / 3.0).abs() < 1e-6);
        // Row 1: one vote each; class 2 has the largest mean probability.
        assert_eq!(classes, vec![0, 2]);
    }

    #[test]
    fn identical_members_neither_disagree_nor_gain() {
        let a = probs(array![[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]);
        let labels = [0, 0, 0];
        let d = diversity(&[&a, &a.clone()], &labels);
        assert_eq!(d[0].disagreement, 0.0);
        assert_eq!(d[0].error_correlation, Some(1.0));
        let (_, classes) = combine(Rule::MeanProbability, &[&a, &a], &[1.0, 1.0]);
        assert_eq!(accuracy(&classes, &labels), accuracy(&a.classes(), &labels));
    }

    #[test]
    fn greedy_selection_can_leave_out_the_best_single_model() {
        // A is right on three samples of four with little margin; B and C
        // are each right on two, but where one errs the other is sure, so
        // together they get all four right.
        let labels = [0, 0, 1, 1];
        let a = probs(array![
            [0.55, 0.45],
            [0.55, 0.45],
            [0.45, 0.55],
            [0.55, 0.45]
        ]);
        let b = probs(array![[0.99, 0.01], [0.99, 0.01], [0.6, 0.4], [0.6, 0.4]]);
        let c = probs(array![[0.4, 0.6], [0.4, 0.6], [0.01, 0.99], [0.01, 0.99]]);
        for (m, acc) in [(&a, 0.75), (&b, 0.5), (&c, 0.5)] {
            assert_eq!(accuracy(&m.classes(), &labels), acc);
        }
        let counts = greedy_selection(&[&a, &b, &c], &labels, 10);
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
        let weights: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let (_, classes) = combine(Rule::MeanProbability, &[&a, &b, &c], &weights);
        assert_eq!(accuracy(&classes, &labels), 1.0);
    }
}
