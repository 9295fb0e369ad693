//! Regression tests, each named after the behaviour it pins.

mod common;

use common::checked;
use kiln::check::check_source;
use kiln::check::graph::Op;
use kiln::check::train::Optimizer;

#[test]
fn brackets_group_expressions() {
    let instance = checked(
        "model m { input a: [8]
  b = dense(a, units = (2 + 2) * 2)
  c = (b |> relu) + b
  output c }",
    );
    let out = instance.graph.node(instance.graph.output.unwrap());
    assert_eq!(out.shape.0, vec![8]);
}

#[test]
fn unused_batchnorm_keeps_the_bias() {
    let instance = checked(
        "model m { input f: [4]
  h = dense(f, units = 10)
  b = batchnorm(h)
  output h }",
    );
    let dense = &instance.graph.nodes[1];
    assert!(
        matches!(dense.op, Op::Dense { bias: true, .. }),
        "{:?}",
        dense.op
    );
    // The unused batch normalization is not part of the model.
    assert_eq!(instance.graph.nodes.len(), 2);
    assert_eq!(instance.graph.params(), 50);
}

#[test]
fn optimizer_can_be_a_hyperparameter() {
    let instance = checked(
        "model m { input f: [4]
  search { opt = choice(sgd, adam) }
  logits = dense(f, units = 3)
  output logits: [3]
  train { optimizer = opt(lr = 0.5) } }",
    );
    assert_eq!(
        instance.train.optimizer,
        Optimizer::Sgd {
            lr: 0.5,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0
        }
    );
}

#[test]
fn block_in_return_expression_names_cleanly() {
    let instance = checked(
        "block inner(x) { return dense(x, units = 4) }
  block outer(x) { return inner(x) |> relu }
  model m { input f: [4]
  y = outer(f)
  output y }",
    );
    for node in &instance.graph.nodes {
        assert!(!node.name.contains("/."), "{}", node.name);
    }
}

#[test]
fn oversized_input_reports_one_error() {
    let report = check_source(
        "model m { input f: [2000000]
  logits = dense(f, units = 10)
  output logits }",
    );
    let errors: Vec<_> = report.diagnostics.iter().filter(|d| d.is_error()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn shared_layer_weights_are_counted_once() {
    let instance = checked(
        "model m { input f: [4]
  layer shared = dense(units = 4)
  a = shared(f)
  b = shared(a)
  output b }",
    );
    assert_eq!(instance.graph.params(), 20);
}
