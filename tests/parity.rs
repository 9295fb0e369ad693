//! Parity of the reference executor with PyTorch: each fixture under
//! `tests/fixtures/` (written by `make_fixtures.py`) holds a batch, initial
//! weights, and PyTorch's logits, loss, gradients, and weights after three
//! optimizer steps. kiln must reproduce every tensor to a relative
//! tolerance of 1e-4 (the largest difference over the tensor's largest
//! magnitude).

mod common;

use common::checked;
use kiln::interp::optim::OptimizerState;
use kiln::interp::{run, train_step, Batch, Tensor, Weights};
use kiln::ir::{self, Mode};
use ndarray::IxDyn;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

const BATCH: usize = 4;
const TOLERANCE: f32 = 1e-4;

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = root()
            .join("tests/fixtures")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { bytes }
    }

    fn tensor(&self, key: &str) -> Tensor {
        let tensors = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let view = tensors.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Tensor::from_shape_vec(IxDyn(view.shape()), values).expect("shape")
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Largest absolute difference relative to the reference's largest
/// magnitude.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.shape(), expected.shape());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = actual
        .iter()
        .zip(expected.iter())
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    diff / scale
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let error = relative_error(actual, expected);
    assert!(error <= TOLERANCE, "{what}: relative error {error:e}");
}

fn parity(case: &str, source: &str) {
    let fixture = Fixture::load(case);
    let instance = checked(source);
    let loss = instance.train.loss.clone();
    let mut graph = ir::lower(&instance.graph, BATCH, Mode::Train { loss }).unwrap();
    kiln::autodiff::differentiate(&mut graph).unwrap();

    let mut weights = Weights {
        params: graph
            .params
            .iter()
            .map(|p| fixture.tensor(&format!("param.{}", p.name)))
            .collect(),
        states: graph
            .states
            .iter()
            .map(|s| fixture.tensor(&format!("state.{}", s.name)))
            .collect(),
    };
    weights.validate(&graph).unwrap();
    let input = fixture.tensor("input");
    let labels: Vec<usize> = fixture
        .tensor("labels")
        .iter()
        .map(|&l| l as usize)
        .collect();
    let batch = Batch {
        input: &input,
        labels: Some(&labels),
    };

    let values = run(&graph, &weights, &batch, 0).unwrap();
    assert_close(
        "logits",
        values.get(graph.logits.unwrap()),
        &fixture.tensor("logits"),
    );
    let loss = values.get(graph.loss.unwrap())[[]];
    let expected_loss = fixture.tensor("loss")[[0]];
    assert!(
        ((loss - expected_loss) / expected_loss).abs() <= TOLERANCE,
        "loss {loss} vs {expected_loss}"
    );
    assert_eq!(
        graph.grads.len(),
        graph.params.len(),
        "every parameter has a gradient"
    );
    for &(param, grad) in &graph.grads {
        let name = &graph.params[param].name;
        assert_close(
            &format!("grad {name}"),
            values.get(grad),
            &fixture.tensor(&format!("grad.{name}")),
        );
    }

    let mut optimizer = OptimizerState::new(instance.train.optimizer.clone());
    let expected_losses = fixture.tensor("losses");
    for step in 0..3 {
        let out = train_step(&graph, &mut weights, &mut optimizer, &batch, step).unwrap();
        let expected = expected_losses[[step as usize]];
        assert!(
            ((out.loss - expected) / expected).abs() <= TOLERANCE,
            "step {step} loss {} vs {expected}",
            out.loss
        );
    }
    for (p, info) in graph.params.iter().enumerate() {
        let expected = fixture.tensor(&format!("final.param.{}", info.name));
        assert_close(
            &format!("{} after 3 steps", info.name),
            &weights.params[p],
            &expected,
        );
    }
    for (s, info) in graph.states.iter().enumerate() {
        let expected = fixture.tensor(&format!("final.state.{}", info.name));
        assert_close(
            &format!("{} after 3 steps", info.name),
            &weights.states[s],
            &expected,
        );
    }

    let eval = ir::lower(&instance.graph, BATCH, Mode::Infer).unwrap();
    let eval_batch = Batch {
        input: &input,
        labels: None,
    };
    let logits = run(&eval, &weights, &eval_batch, 0).unwrap();
    assert_close(
        "eval logits",
        logits.get(eval.logits.unwrap()),
        &fixture.tensor("eval_logits"),
    );
}

fn zoo(name: &str) {
    let source = std::fs::read_to_string(root().join(format!("models/{name}.model"))).unwrap();
    parity(name, &source);
}

fn op(name: &str) {
    let path = root().join(format!("tests/fixtures/ops/{name}.model"));
    let source = std::fs::read_to_string(path).unwrap();
    parity(name, &source);
}

#[test]
fn mlp_matches_pytorch() {
    zoo("mlp");
}

#[test]
fn convnet_matches_pytorch() {
    zoo("convnet");
}

#[test]
fn bn_convnet_matches_pytorch() {
    zoo("bn_convnet");
}

#[test]
fn sepconv_matches_pytorch() {
    zoo("sepconv");
}

#[test]
fn resnet_matches_pytorch() {
    zoo("resnet");
}

#[test]
fn ops_match_pytorch() {
    let dir = root().join("tests/fixtures/ops");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "model"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 12, "{names:?}");
    for name in names {
        op(&name);
    }
}
