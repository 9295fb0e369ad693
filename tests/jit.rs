//! Differential tests of the JIT against the reference executor: outputs,
//! loss, every gradient, and the weights after three update steps, on the
//! reference models and on property-generated graphs.

mod common;

use common::{labels, random, train_graph};
use kiln::check::train::Optimizer;
use kiln::interp::optim::OptimizerState;
use kiln::interp::{self, Batch, Tensor, Weights};
use kiln::ir::{Graph, Op};
use kiln::jit::{Listing, Program};
use proptest::prelude::*;

/// Relative error allowed between the JIT and the reference, for each
/// kernel on the same inputs, for the model's outputs and loss, and for the
/// weights after three steps. Elementwise kernels and the optimizer update
/// repeat the reference's operations exactly; matrix products and
/// reductions sum in another order, which moves results by a few units in
/// the last place.
const TOLERANCE: f32 = 1e-4;

/// Relative error allowed for whole-model gradients, which the reference
/// computes from the JIT's forward values (see [`forced_gradients`]), at
/// the scale [`kernel_scale`] gives. Each backward kernel's rounding
/// differences add up along the chain.
const GRADIENT_TOLERANCE: f32 = 1e-3;

/// The largest difference over the largest expected magnitude. Magnitudes
/// below 1e-3 count as 1e-3: a value that is zero in exact arithmetic (the
/// gradient of a convolution's bias before batch normalization, or the
/// running mean after it) is rounding noise near 1e-7 in both executors,
/// and its relative error means nothing.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.shape(), expected.shape());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let diff = actual
        .iter()
        .zip(expected.iter())
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    diff / scale
}

fn check_close(what: &str, actual: &Tensor, expected: &Tensor) -> Result<(), String> {
    check_within(what, actual, expected, TOLERANCE)
}

fn check_within(
    what: &str,
    actual: &Tensor,
    expected: &Tensor,
    tolerance: f32,
) -> Result<(), String> {
    let error = relative_error(actual, expected);
    if error <= tolerance && error.is_finite() {
        Ok(())
    } else {
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        Err(format!(
            "{what}: relative error {error:e} (largest magnitude {scale:e})"
        ))
    }
}

/// Runs three training steps with both executors. Each step compares the
/// logits, loss and gradients, and checks every kernel on its own inputs.
/// The reference then applies the JIT's gradients with its own optimizer,
/// so both start the next step from the same weights when the update
/// kernel is right, and the weights, running statistics and optimizer
/// buffers after each step test the update alone; without this, training's
/// sensitivity to tiny gradient differences would blur the comparison.
fn differential(graph: &Graph, optimizer: Optimizer, threads: usize) -> Result<(), String> {
    let program =
        Program::compile(graph, Some(&optimizer), Listing::default()).map_err(|e| e.to_string())?;
    let input_shape = graph.nodes[0].shape.clone();
    let classes = graph.shape(graph.logits.unwrap())[1];
    let mut reference = Weights::init(graph, 7);
    let mut jit = reference.clone();
    let mut ref_opt = OptimizerState::new(optimizer.clone());
    let mut jit_opt = ref_opt.clone();
    let mut arena = program.new_arena();

    for step in 0..3u64 {
        let input = random(&input_shape, 100 + step, 1.0);
        let y = labels(graph.batch, classes);
        let batch = Batch {
            input: &input,
            labels: Some(&y),
        };
        let mut values = interp::run(graph, &reference, &batch, step).map_err(|e| e.to_string())?;
        program
            .run(&mut arena, &jit, &input, Some(&y), step, threads)
            .map_err(|e| e.to_string())?;
        let logits = graph.logits.unwrap();
        check_close("logits", &program.value(&arena, logits), values.get(logits))?;
        let loss = graph.loss.unwrap();
        check_close("loss", &program.value(&arena, loss), values.get(loss))?;
        check_kernels(graph, &program, &arena, &y, step)?;
        let forced = forced_gradients(graph, &program, &arena, &y, step);
        for (p, g) in &graph.grads {
            let name = format!("step {step}: gradient of {}", graph.params[*p].name);
            let actual = program.value(&arena, *g);
            let (expected, node) = (&forced[g.index()], graph.node(*g));
            let inputs: Vec<&Tensor> = node.inputs.iter().map(|x| &forced[x.index()]).collect();
            let scale = kernel_scale(node, &inputs, expected);
            let diff = largest_difference(&actual, expected);
            if diff > GRADIENT_TOLERANCE * scale || diff.is_nan() {
                return Err(format!("{name}: difference {diff:e} at scale {scale:e}"));
            }
            values.0[g.index()] = actual;
        }
        interp::apply_step(graph, &mut reference, &mut ref_opt, &values);
        program.apply_update(&mut arena, &mut jit, &mut jit_opt, threads);
        for (i, (a, e)) in jit.params.iter().zip(&reference.params).enumerate() {
            let name = format!("step {step}: {}", graph.params[i].name);
            check_close(&name, a, e)?;
        }
        for (i, (a, e)) in jit.states.iter().zip(&reference.states).enumerate() {
            check_close(&format!("step {step}: {}", graph.states[i].name), a, e)?;
        }
        if jit_opt.step != ref_opt.step {
            return Err("optimizer step counts differ".into());
        }
        for (p, (a, e)) in jit_opt.buffers.iter().zip(&ref_opt.buffers).enumerate() {
            for k in 0..2 {
                match (&a[k], &e[k]) {
                    (Some(a), Some(e)) => check_close(&format!("buffer {k} of {p}"), a, e)?,
                    (None, None) => {}
                    _ => return Err(format!("buffer {k} of parameter {p}: presence differs")),
                }
            }
        }
    }
    Ok(())
}

/// Runs the reference's whole backward pass on the JIT's forward values.
///
/// Rounding differences of one part in 10^7 can put a ReLU input or a
/// max-pooling tie on the other side in one executor. That element's
/// gradient then differs entirely, and the backward pass spreads the
/// difference. On mlp, one ReLU input of one sample that rounded to the
/// other side of zero moved a row of the second layer's weight gradient by
/// 7% of its largest value, while every kernel matched its reference within
/// 1e-5 on equal inputs. Taking the forward values from the JIT puts every
/// such decision on the same side in both executors, so whole gradients
/// test the backward chain alone. Values the JIT keeps only inside a fused
/// kernel are recomputed from their inputs.
fn forced_gradients(
    graph: &Graph,
    program: &Program,
    arena: &kiln::jit::Arena,
    labels: &[usize],
    seed: u64,
) -> Vec<Tensor> {
    let schedule = program.schedule();
    let forward_len = graph.loss.unwrap().index() + 1;
    let mut values: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    for (i, node) in graph.nodes.iter().enumerate() {
        let v = kiln::ir::ValueId(i as u32);
        let leaf = matches!(
            node.op,
            Op::Input | Op::Labels | Op::Param(_) | Op::State(_)
        );
        let value = if leaf || (i < forward_len && schedule.stored[i]) {
            program.value(arena, v)
        } else {
            let inputs: Vec<&Tensor> = node.inputs.iter().map(|x| &values[x.index()]).collect();
            interp::eval(node, &inputs, labels, seed)
        };
        values.push(value);
    }
    values
}

/// Checks every kernel on its own: each value the JIT stored against the
/// reference operator applied to the JIT's own inputs, so that no rounding
/// difference upstream can hide or excuse an error. Values that live only
/// inside a fused kernel are recomputed by the reference from their inputs.
fn check_kernels(
    graph: &Graph,
    program: &Program,
    arena: &kiln::jit::Arena,
    labels: &[usize],
    seed: u64,
) -> Result<(), String> {
    let schedule = program.schedule();
    let mut inner: Vec<Option<Tensor>> = vec![None; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let v = kiln::ir::ValueId(i as u32);
        if matches!(
            node.op,
            Op::Input | Op::Labels | Op::Param(_) | Op::State(_) | Op::Reshape
        ) {
            continue;
        }
        let inputs: Vec<Tensor> = node
            .inputs
            .iter()
            .map(|x| {
                inner[x.index()]
                    .clone()
                    .unwrap_or_else(|| program.value(arena, *x))
            })
            .collect();
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let expected = interp::eval(node, &refs, labels, seed);
        if schedule.stored[i] {
            let what = format!("kernel {} ({})", node.name, node.op.name());
            let actual = program.value(arena, v);
            let scale = kernel_scale(node, &refs, &expected);
            let diff = largest_difference(&actual, &expected);
            if diff > TOLERANCE * scale || diff.is_nan() {
                return Err(format!("{what}: difference {diff:e} at scale {scale:e}"));
            }
        } else {
            inner[i] = Some(expected);
        }
    }
    Ok(())
}

fn sgd() -> Optimizer {
    Optimizer::Sgd {
        lr: 0.01,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    }
}

fn zoo(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/models/{name}.model",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn zoo_case(name: &str, batch: usize) {
    let graph = train_graph(&zoo(name), batch);
    for threads in [1, 2] {
        differential(&graph, sgd(), threads)
            .unwrap_or_else(|e| panic!("{name}, {threads} threads: {e}"));
    }
}

#[test]
fn mlp_matches_the_reference() {
    zoo_case("mlp", 16);
}

#[test]
fn convnet_matches_the_reference() {
    zoo_case("convnet", 4);
}

#[test]
fn bn_convnet_matches_the_reference() {
    zoo_case("bn_convnet", 4);
}

#[test]
fn sepconv_matches_the_reference() {
    zoo_case("sepconv", 4);
}

#[test]
fn resnet_matches_the_reference() {
    zoo_case("resnet", 4);
}

/// Dilated taps that land wholly in the padding of a tiny image leave an
/// im2col row with no valid column.
#[test]
fn taps_wholly_in_padding_match_the_reference() {
    let source = "model dilated {
      input image: [1, 2, 2]
      x = conv(image, filters = 2, kernel = 3, dilation = 3, padding = same) |> relu
      y = depthwise_conv(x, kernel = 3, dilation = 3, padding = same)
      logits = flatten(y) |> dense(units = 3)
      output logits: [3]
    }";
    let graph = train_graph(source, 4);
    for threads in [1, 2] {
        differential(&graph, sgd(), threads).unwrap_or_else(|e| panic!("{threads} threads: {e}"));
    }
}

/// Strided, dilated depthwise and separable convolutions with `same`
/// padding, where some taps read only padding columns.
#[test]
fn strided_dilated_depthwise_matches_the_reference() {
    let cases = [
        ([3, 7, 4], 5, 3, 3),
        ([3, 7, 4], 4, 2, 3),
        ([3, 7, 4], 5, 2, 2),
        ([3, 7, 4], 5, 2, 3),
        ([2, 3, 5], 5, 3, 3),
    ];
    for (shape, kernel, stride, dilation) in cases {
        for layer in ["depthwise_conv", "separable_conv"] {
            let filters = if layer == "separable_conv" {
                ", filters = 2"
            } else {
                ""
            };
            let source = format!(
                "model m {{
                  input image: {shape:?}
                  x = {layer}(image{filters}, kernel = {kernel}, stride = {stride}, dilation = {dilation}, padding = same)
                  logits = flatten(x) |> dense(units = 3)
                  output logits: [3]
                }}"
            );
            let graph = train_graph(&source, 4);
            for threads in [1, 2] {
                differential(&graph, sgd(), threads).unwrap_or_else(|e| {
                    panic!(
                        "{layer} {shape:?} k{kernel} s{stride} d{dilation}, {threads} threads: {e}"
                    )
                });
            }
        }
    }
}

#[test]
fn every_optimizer_matches_the_reference() {
    let graph = train_graph(&zoo("mlp"), 8);
    let optimizers = [
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
        },
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        },
        Optimizer::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        },
        Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        Optimizer::RmsProp {
            lr: 1e-3,
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.9,
            weight_decay: 0.0,
        },
        Optimizer::RmsProp {
            lr: 1e-3,
            alpha: 0.9,
            eps: 1e-6,
            momentum: 0.0,
            weight_decay: 1e-4,
        },
    ];
    for optimizer in optimizers {
        differential(&graph, optimizer.clone(), 2).unwrap_or_else(|e| panic!("{optimizer:?}: {e}"));
    }
}

#[test]
fn fusion_leaves_the_expected_kernels() {
    // Kernels per training step after fusion, with the optimizer update of
    // all parameters as one kernel; the second number in each failure
    // message counts operators and per-parameter updates before fusion. A
    // change here means the fusion rules changed: check that the new count
    // is intended and update it.
    let expected = [
        ("mlp", 18),
        ("convnet", 25),
        ("bn_convnet", 56),
        ("sepconv", 67),
        ("resnet", 97),
    ];
    for (name, kernels) in expected {
        let graph = train_graph(&zoo(name), 8);
        let program = Program::compile(&graph, Some(&sgd()), Listing::default()).unwrap();
        let unfused = graph
            .nodes
            .iter()
            .filter(|n| {
                !matches!(
                    n.op,
                    kiln::ir::Op::Input
                        | kiln::ir::Op::Labels
                        | kiln::ir::Op::Param(_)
                        | kiln::ir::Op::State(_)
                        | kiln::ir::Op::Reshape
                )
            })
            .count()
            + graph.params.len();
        eprintln!("{name} {} {unfused}", program.kernel_count());
        if std::env::var("SHOW").is_ok() {
            for k in &program.schedule().kernels {
                eprintln!(
                    "  {}",
                    match k {
                        kiln::fuse::Kernel::Single(v) => graph.node(*v).op.name().to_string(),
                        other => format!("{other:?}"),
                    }
                );
            }
            continue;
        }
        assert_eq!(
            program.kernel_count(),
            kernels,
            "{name}: {} kernels (from {unfused} operators and updates)",
            program.kernel_count()
        );
        assert!(kernels < unfused, "{name}: fusion removed nothing");
    }
}

#[test]
fn listings_show_cranelift_ir_and_machine_code() {
    let graph = train_graph(&zoo("bn_convnet"), 2);
    let listing = Listing {
        clif: true,
        asm: true,
    };
    let program = Program::compile(&graph, Some(&sgd()), listing).unwrap();
    let clif = program
        .listing
        .iter()
        .find(|(name, _)| name.ends_with("(clif)"))
        .unwrap();
    assert!(clif.1.contains("f32x4"), "{}", clif.1);
    let asm = program
        .listing
        .iter()
        .find(|(name, _)| name.ends_with("(asm)"))
        .unwrap();
    assert!(!asm.1.trim().is_empty());
}

/// A random stack of layers, with optional residual edges, written in the
/// model language.
fn random_model() -> impl Strategy<Value = String> {
    // Kernel, stride, dilation and padding of a windowed layer: any mix,
    // including taps that read only padding. The checker rejects the
    // stacks that shrink an image below a window.
    let window = (1usize..6, 1usize..4, 1usize..4, any::<bool>()).prop_map(|(k, s, d, same)| {
        let padding = if same { "same" } else { "valid" };
        format!("kernel = {k}, stride = {s}, dilation = {d}, padding = {padding}")
    });
    let pool_window = (2usize..4, 1usize..3, any::<bool>()).prop_map(|(size, s, same)| {
        let padding = if same { "same" } else { "valid" };
        format!("size = {size}, stride = {s}, padding = {padding}")
    });
    let layer = prop_oneof![
        window
            .clone()
            .prop_map(|w| format!("conv(filters = 4, {w})")),
        window.clone().prop_map(|w| format!("depthwise_conv({w})")),
        window.prop_map(|w| format!("separable_conv(filters = 4, {w})")),
        Just("conv(filters = 4, kernel = 3, padding = same)".to_string()),
        Just("depthwise_conv(kernel = 3, padding = same)".to_string()),
        Just("separable_conv(filters = 4, kernel = 3, padding = same)".to_string()),
        Just("batchnorm".to_string()),
        prop_oneof![
            Just("relu"),
            Just("sigmoid"),
            Just("tanh"),
            Just("gelu"),
            Just("leaky_relu")
        ]
        .prop_map(str::to_string),
        Just("maxpool(size = 2, padding = same)".to_string()),
        Just("avgpool(size = 3, stride = 1, padding = same)".to_string()),
        pool_window.clone().prop_map(|w| format!("maxpool({w})")),
        pool_window.prop_map(|w| format!("avgpool({w})")),
    ];
    (
        prop::collection::vec(layer, 1..5),
        any::<bool>(),
        any::<bool>(),
        (3usize..11, 3usize..11),
    )
        .prop_map(|(layers, residual, dropout, (height, width))| {
            let body = layers.join(" |> ");
            let residual = if residual {
                "  r = conv(h, filters = 4, kernel = 3, padding = same) |> relu\n  h = h + r\n"
            } else {
                ""
            };
            let dropout = if dropout { " |> dropout(rate = 0.25)" } else { "" };
            format!(
                "model random {{\n  input image: [4, {height}, {width}]\n  h = conv(image, filters = 4, kernel = 3, padding = same) |> {body}\n{residual}  logits = global_avgpool(h){dropout} |> dense(units = 3)\n  output logits: [3]\n}}\n"
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_match_the_reference(source in random_model(), threads in 1usize..3) {
        let report = kiln::check::check_source(&source);
        // Random stacks may shrink an image below a window; the checker
        // rejects those, and they have nothing to compare.
        prop_assume!(!report.has_errors());
        let graph = train_graph(&source, 3);
        let result = differential(&graph, sgd(), threads);
        prop_assert!(result.is_ok(), "{}\n{}", source, result.unwrap_err());
    }
}

/// Returns the magnitude a kernel's result is judged against: its largest
/// expected value, or for a sum whose terms cancel, a share of their sizes.
fn kernel_scale(node: &kiln::ir::Node, inputs: &[&Tensor], expected: &Tensor) -> f32 {
    // A per-channel sum whose terms cancel (the batch mean after another
    // batch normalization, the bias gradient before one) is mostly rounding
    // noise. So reductions are judged against the sum of their terms'
    // magnitudes, which bounds the rounding error of a summation.
    let reduction = matches!(
        node.op,
        Op::BatchMean | Op::BatchVar | Op::BiasGrad | Op::BatchNormGradGamma { .. }
    );
    let terms = if reduction {
        let channels = expected.len().max(1) as f32;
        inputs[0].iter().map(|v| v.abs()).sum::<f32>() / channels
    } else if matches!(node.op, Op::Conv2dGradWeight(_)) {
        // A filter gradient sums `dy · x` over the batch and the image, and
        // cancels to rounding noise before a batch normalization in the
        // same way.
        let largest_input = inputs[1].iter().fold(0f32, |m, v| m.max(v.abs()));
        let filters = expected.len().max(1) as f32;
        inputs[0].iter().map(|v| v.abs()).sum::<f32>() * largest_input / filters
    } else {
        0.0
    };
    expected
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-2 * terms)
        .max(1e-4)
}

fn largest_difference(actual: &Tensor, expected: &Tensor) -> f32 {
    actual
        .iter()
        .zip(expected.iter())
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()))
}
