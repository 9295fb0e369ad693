//! Evaluation: loss, accuracy, top-5 accuracy and the confusion matrix of a
//! model on a data set, in batches.

use super::engine::{Engine, EngineError};
use crate::check::train::Loss;
use crate::data::Dataset;
use crate::interp::ops;
use crate::interp::{Tensor, Weights};
use ndarray::IxDyn;

/// Metrics accumulated over batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub samples: usize,
    loss_sum: f64,
    correct: usize,
    top5_correct: usize,
    pub classes: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

impl Metrics {
    pub fn new(classes: usize) -> Self {
        Metrics {
            classes,
            confusion: vec![vec![0; classes]; classes],
            ..Metrics::default()
        }
    }

    /// Adds a batch whose mean loss is `loss`.
    pub fn add(&mut self, logits: &Tensor, labels: &[usize], loss: f64) {
        self.loss_sum += loss * labels.len() as f64;
        self.samples += labels.len();
        for (row, &label) in logits.outer_iter().zip(labels) {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            if order[0] == label {
                self.correct += 1;
            }
            if order.iter().take(5).any(|&c| c == label) {
                self.top5_correct += 1;
            }
            if label < self.classes {
                self.confusion[label][order[0]] += 1;
            }
        }
    }

    pub fn loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }

    /// Top-5 accuracy, reported when there are more than five classes.
    pub fn top5(&self) -> Option<f64> {
        (self.classes > 5).then(|| self.top5_correct as f64 / self.samples.max(1) as f64)
    }
}

/// The mean loss of a batch of logits.
pub fn batch_loss(loss: &Loss, logits: &Tensor, labels: &[usize]) -> f64 {
    match loss {
        Loss::CrossEntropy { label_smoothing } => {
            ops::softmax_cross_entropy(logits, labels, *label_smoothing as f32) as f64
        }
        Loss::Mse => ops::mean_squared_error(logits, labels) as f64,
    }
}

/// Gathers samples `indices` of `data` into a batch tensor `[N, ...shape]`.
pub fn batch_tensor(data: &Dataset, indices: &[usize], shape: &[usize]) -> Tensor {
    let mut x = Vec::with_capacity(indices.len() * data.features);
    for &i in indices {
        x.extend_from_slice(data.sample(i));
    }
    let mut dims = vec![indices.len()];
    dims.extend_from_slice(shape);
    Tensor::from_shape_vec(IxDyn(&dims), x).expect("sample sizes agree")
}

/// Evaluates `weights` on `data` in batches of `batch` samples.
///
/// # Errors
/// When the engine fails.
pub fn evaluate(
    engine: &mut Engine,
    weights: &Weights,
    data: &Dataset,
    shape: &[usize],
    classes: usize,
    loss: &Loss,
    batch: usize,
) -> Result<Metrics, EngineError> {
    let mut metrics = Metrics::new(classes);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        let x = batch_tensor(data, chunk, shape);
        let labels: Vec<usize> = chunk.iter().map(|&i| data.labels[i]).collect();
        let logits = engine.predict(weights, &x)?;
        let value = batch_loss(loss, &logits, &labels);
        metrics.add(&logits, &labels, value);
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_accuracy_and_confusion() {
        let logits =
            Tensor::from_shape_vec(IxDyn(&[3, 2]), vec![2.0, 1.0, 0.0, 3.0, 5.0, 1.0]).unwrap();
        let mut m = Metrics::new(2);
        m.add(&logits, &[0, 1, 1], 0.5);
        assert!((m.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![1, 0], vec![1, 1]]);
        assert!((m.loss() - 0.5).abs() < 1e-12);
        assert_eq!(m.top5(), None);
    }
}
