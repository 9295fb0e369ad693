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

/// Inputs that once panicked, overflowed the stack or hung; each must now
/// give an error diagnostic quickly.
#[test]
fn hostile_inputs_get_diagnostics() {
    let deep_blocks = {
        let mut text = String::new();
        for k in 0..63 {
            text += &format!(
                "block b{k}(x) {{ return b{}(x){} }}\n",
                k + 1,
                " |> relu".repeat(250)
            );
        }
        text += "block b63(x) { return x }\nmodel m { input i: [4]\n y = b0(i)\n output y }";
        text
    };
    let many_hparams = {
        let entries: String = (0..300).map(|k| format!("p{k} = choice(1)\n")).collect();
        format!("model m {{ input i: [4] search {{ {entries} }} output i }}")
    };
    let cases = [
        ("division overflow", "block b(x; n) { return dense(x, units = n / -1) }
          model m { input i: [4] y = b(i, n = -8000000000000000 * 1000 - 1223372036854775 * 1000 - 808) output y }".to_string()),
        ("huge float grid", "model m { input i: [4] search { r = float(0, 1e300, step = 1e-300) }
          y = dropout(i, rate = r) output y }".to_string()),
        ("empty nested repeats", "model m { input i: [4] repeat 10000 { repeat 10000 { repeat 10000 { } } } output i }".to_string()),
        ("repeated assignment", "model m { input i: [4] x = i repeat 10000 { repeat 10000 { x = i } } output x }".to_string()),
        ("deep blocks and pipelines", deep_blocks),
        ("too many hyperparameters", many_hparams),
    ];
    for (name, source) in cases {
        let start = std::time::Instant::now();
        let report = check_source(&source);
        assert!(report.has_errors(), "{name}: no error");
        // Generous: these took minutes or crashed before the limits.
        assert!(
            start.elapsed().as_secs() < 30,
            "{name}: {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn conditional_counting_is_bounded() {
    let pairs: String = (0..40)
        .map(|k| format!("p{k} = choice(0, 1)\nq{k} = choice(0) when p{k} == 0\n"))
        .collect();
    let source = format!("model m {{ input i: [4] search {{ {pairs} }} output i }}");
    let report = check_source(&source);
    let space = &report.models[0].space;
    assert_eq!(space.params.len(), 80);
    // The exact count is 3^40; past the counting budget it is unknown.
    assert_eq!(space.size(), Some(u64::MAX));
}
