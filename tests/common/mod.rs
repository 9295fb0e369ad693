//! Helpers shared by the integration tests: build a training graph from
//! model text, and draw deterministic test data.

#![allow(dead_code)]

use kiln::check::check_source;
use kiln::check::train::Loss;
use kiln::diag::render::{render_text, SourceFile};
use kiln::interp::Tensor;
use kiln::ir::{self, Mode};
use kiln::rng;
use ndarray::IxDyn;

/// Checks `source` (one model) and returns its checked report, panicking
/// with the rendered diagnostics when it is invalid.
pub fn checked(source: &str) -> kiln::check::Instance {
    let report = check_source(source);
    let rendered = render_text(
        &SourceFile {
            name: "test.model",
            text: source,
        },
        &report.diagnostics,
    );
    assert!(!report.has_errors(), "{rendered}");
    report.models[0].instance.clone().expect("valid model")
}

/// Lowers a model for training with `batch` samples and differentiates it.
pub fn train_graph(source: &str, batch: usize) -> ir::Graph {
    let instance = checked(source);
    let loss = instance.train.loss.clone();
    let mut graph = ir::lower(&instance.graph, batch, Mode::Train { loss }).expect("lowers");
    kiln::autodiff::differentiate(&mut graph).expect("differentiates");
    graph
}

pub fn eval_graph(source: &str, batch: usize) -> ir::Graph {
    let instance = checked(source);
    ir::lower(
        &instance.graph,
        batch,
        Mode::Eval {
            loss: Loss::CrossEntropy {
                label_smoothing: 0.0,
            },
        },
    )
    .expect("lowers")
}

/// A tensor of uniform values in `[-scale, scale)` drawn from `seed`.
pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let len: usize = shape.iter().product();
    let values = (0..len as u64)
        .map(|i| (2.0 * rng::uniform(seed, 99, i) - 1.0) * scale)
        .collect();
    Tensor::from_shape_vec(IxDyn(shape), values).unwrap()
}

/// Labels `0, 1, 2, ...` modulo `classes`.
pub fn labels(batch: usize, classes: usize) -> Vec<usize> {
    (0..batch).map(|i| (i * 7 + 3) % classes).collect()
}
