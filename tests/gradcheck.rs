//! Finite-difference gradient checks of every operator through the
//! reference executor: the analytic gradient of the loss with respect to
//! each parameter must match central differences.

mod common;

use common::{labels, random, train_graph};
use kiln::interp::{run, Batch, Weights};
use kiln::ir::Graph;

/// Compares analytic and numeric gradients for up to `samples` elements of
/// every parameter.
fn gradcheck(source: &str, batch: usize) {
    let graph = train_graph(source, batch);
    let input_shape = graph.shape(input_node(&graph)).to_vec();
    let input = random(&input_shape, 1, 1.0);
    let classes = graph.shape(graph.logits.unwrap())[1];
    let labels = labels(batch, classes);
    let data = Batch {
        input: &input,
        labels: Some(&labels),
    };
    let weights = Weights::init(&graph, 7);
    let values = run(&graph, &weights, &data, 3).unwrap();
    assert!(!graph.grads.is_empty(), "no gradients");

    let loss_at =
        |w: &Weights| run(&graph, w, &data, 3).unwrap().get(graph.loss.unwrap())[[]] as f64;
    let mut worst = (0.0f64, String::new());
    for &(param, grad) in &graph.grads {
        let analytic = values.get(grad);
        let len = analytic.len();
        let step = (len / 12).max(1);
        for e in (0..len).step_by(step) {
            let eps = 1e-2f32;
            let mut plus = weights.clone();
            plus.params[param].as_slice_mut().unwrap()[e] += eps;
            let mut minus = weights.clone();
            minus.params[param].as_slice_mut().unwrap()[e] -= eps;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps as f64);
            let exact = analytic.as_slice().unwrap()[e] as f64;
            let error = (numeric - exact).abs() / (numeric.abs().max(exact.abs()) + 1e-2);
            if error > worst.0 {
                worst = (
                    error,
                    format!(
                        "{}[{e}]: analytic {exact:.6}, numeric {numeric:.6}",
                        graph.params[param].name
                    ),
                );
            }
        }
    }
    assert!(worst.0 < 2e-2, "gradient mismatch at {}", worst.1);
}

fn input_node(graph: &Graph) -> kiln::ir::ValueId {
    let index = graph
        .nodes
        .iter()
        .position(|n| matches!(n.op, kiln::ir::Op::Input))
        .unwrap();
    kiln::ir::ValueId(index as u32)
}

/// Wraps layers between an input `[C, H, W]` and a 3-class dense head.
fn image_model(input: &str, body: &str) -> String {
    format!(
        "model m {{
  input image: {input}
  {body}
  logits = flatten(x) |> dense(units = 3)
  output logits: [3]
}}"
    )
}

#[test]
fn dense_and_tanh() {
    gradcheck(
        "model m { input f: [5]
  h = dense(f, units = 4) |> tanh
  logits = dense(h, units = 3)
  output logits: [3] }",
        3,
    );
}

#[test]
fn conv_stride_two_same_odd_kernel() {
    let body = "x = conv(image, filters = 3, kernel = 3, stride = 2, padding = same) |> tanh";
    gradcheck(&image_model("[2, 7, 7]", body), 2);
}

#[test]
fn conv_stride_two_same_even_kernel() {
    let body = "x = conv(image, filters = 3, kernel = 4, stride = 2, padding = same) |> tanh";
    gradcheck(&image_model("[2, 6, 6]", body), 2);
}

#[test]
fn conv_valid_with_dilation() {
    let body = "x = conv(image, filters = 2, kernel = 3, dilation = 2) |> tanh";
    gradcheck(&image_model("[2, 7, 7]", body), 2);
}

#[test]
fn conv_input_gradient_through_two_layers() {
    let body = "x = conv(image, filters = 3, kernel = 3, padding = same) |> tanh
  x = conv(x, filters = 2, kernel = 3, stride = 2, padding = same) |> tanh";
    gradcheck(&image_model("[1, 6, 6]", body), 2);
}

#[test]
fn depthwise_with_multiplier_two() {
    let body = "x = conv(image, filters = 3, kernel = 1) |> tanh
  x = depthwise_conv(x, kernel = 3, multiplier = 2, padding = same) |> tanh";
    gradcheck(&image_model("[2, 5, 5]", body), 2);
}

#[test]
fn separable_conv() {
    let body = "x = conv(image, filters = 2, kernel = 1) |> tanh
  x = separable_conv(x, filters = 3, kernel = 3, stride = 2, padding = same) |> tanh";
    gradcheck(&image_model("[2, 6, 6]", body), 2);
}

#[test]
fn maxpool_distinct_values() {
    let body = "x = conv(image, filters = 2, kernel = 3, padding = same) |> maxpool(size = 2)";
    gradcheck(&image_model("[1, 6, 6]", body), 2);
}

#[test]
fn avgpool_with_same_padding() {
    let body =
        "x = conv(image, filters = 2, kernel = 3) |> avgpool(size = 3, stride = 2, padding = same)";
    gradcheck(&image_model("[1, 8, 8]", body), 2);
}

#[test]
fn batchnorm_training_batch_one() {
    let body = "x = conv(image, filters = 3, kernel = 3, padding = same) |> batchnorm |> tanh";
    gradcheck(&image_model("[2, 4, 4]", body), 1);
}

#[test]
fn batchnorm_training_batch_two() {
    let body = "x = conv(image, filters = 3, kernel = 3, padding = same) |> batchnorm |> tanh";
    gradcheck(&image_model("[2, 4, 4]", body), 2);
}

#[test]
fn batchnorm_on_features() {
    gradcheck(
        "model m { input f: [6]
  h = dense(f, units = 4) |> batchnorm |> tanh
  logits = dense(h, units = 3)
  output logits: [3] }",
        4,
    );
}

#[test]
fn concat_of_two_branches() {
    let body = "a = conv(image, filters = 2, kernel = 3, padding = same) |> tanh
  b = conv(image, filters = 3, kernel = 1) |> sigmoid
  x = concat(a, b)";
    gradcheck(&image_model("[1, 4, 4]", body), 2);
}

#[test]
fn residual_add() {
    let body = "h = conv(image, filters = 2, kernel = 3, padding = same) |> tanh
  x = conv(h, filters = 2, kernel = 3, padding = same) + h";
    gradcheck(&image_model("[2, 4, 4]", body), 2);
}

#[test]
fn global_avgpool() {
    gradcheck(
        "model m { input image: [1, 5, 5]
  x = conv(image, filters = 4, kernel = 3) |> tanh |> global_avgpool
  logits = dense(x, units = 3)
  output logits: [3] }",
        2,
    );
}

#[test]
fn smooth_activations() {
    for act in [
        "sigmoid",
        "tanh",
        "gelu",
        "gelu(approximate = tanh)",
        "leaky_relu(slope = 0.2)",
    ] {
        gradcheck(
            &format!(
                "model m {{ input f: [4]
  h = dense(f, units = 5) |> {act}
  logits = dense(h, units = 3)
  output logits: [3] }}"
            ),
            3,
        );
    }
}

#[test]
fn relu_away_from_zero() {
    gradcheck(
        "model m { input f: [4]
  h = dense(f, units = 6) |> relu
  logits = dense(h, units = 3)
  output logits: [3] }",
        3,
    );
}

#[test]
fn softmax_layer_with_mse_loss() {
    gradcheck(
        "model m { input f: [4]
  logits = dense(f, units = 3) |> tanh |> dense(units = 3) |> softmax
  output logits: [3]
  train { loss = mse } }",
        3,
    );
}

#[test]
fn label_smoothing_cross_entropy() {
    gradcheck(
        "model m { input f: [4]
  logits = dense(f, units = 3)
  output logits: [3]
  train { loss = cross_entropy(label_smoothing = 0.1) } }",
        3,
    );
}

#[test]
fn dropout_with_fixed_mask() {
    gradcheck(
        "model m { input f: [6]
  h = dense(f, units = 8) |> tanh |> dropout(rate = 0.5)
  logits = dense(h, units = 3)
  output logits: [3] }",
        4,
    );
}

#[test]
fn shared_layer_accumulates() {
    gradcheck(
        "model m { input f: [4]
  layer shared = dense(units = 4)
  a = shared(f) |> tanh
  b = shared(a) |> tanh
  logits = dense(b, units = 3)
  output logits: [3] }",
        3,
    );
}

/// With ties in a window, max pooling sends the gradient to the first
/// maximum in row-major order, as PyTorch does.
#[test]
fn maxpool_ties_route_to_first_maximum() {
    use kiln::interp::ops::{pool, pool_grad};
    use kiln::ir::{PoolAttrs, PoolKind};
    let x =
        kiln::interp::Tensor::from_shape_vec(vec![1, 1, 2, 2], vec![5.0, 5.0, 5.0, 1.0]).unwrap();
    let attrs = PoolAttrs {
        kind: PoolKind::Max,
        size: 2,
        stride: 2,
        pad: [0; 4],
    };
    let y = pool(&x, &attrs, &[1, 1, 1, 1]);
    assert_eq!(y[[0, 0, 0, 0]], 5.0);
    let dy = kiln::interp::Tensor::from_elem(vec![1, 1, 1, 1], 2.0);
    let dx = pool_grad(&dy, &x, &attrs);
    assert_eq!(dx.as_slice().unwrap(), &[2.0, 0.0, 0.0, 0.0]);
}

/// Logits of ±1e4 would overflow a naive softmax; the loss and its gradient
/// stay finite.
#[test]
fn cross_entropy_extreme_logits_stay_finite() {
    use kiln::interp::ops::{softmax_cross_entropy, softmax_cross_entropy_grad};
    let logits =
        kiln::interp::Tensor::from_shape_vec(vec![2, 3], vec![1e4, -1e4, 0.0, -1e4, 1e4, 1e4])
            .unwrap();
    let labels = [1, 0];
    let loss = softmax_cross_entropy(&logits, &labels, 0.0);
    assert!(loss.is_finite(), "loss {loss}");
    // Row 0 puts all mass on class 0 but the label is 1: loss 2e4 / 2 rows.
    assert!(loss > 1e4, "loss {loss}");
    let grad = softmax_cross_entropy_grad(&logits, &labels, 0.0);
    assert!(grad.iter().all(|g| g.is_finite()));
    assert!((grad[[0, 0]] - 0.5).abs() < 1e-6);
    assert!((grad[[0, 1]] + 0.5).abs() < 1e-6);
}

/// Average pooling with `same` padding averages only the cells inside the
/// input: a corner window of a constant image averages to that constant.
#[test]
fn avgpool_excludes_padding() {
    use kiln::interp::ops::pool;
    use kiln::ir::{PoolAttrs, PoolKind};
    let x = kiln::interp::Tensor::from_elem(vec![1, 1, 3, 3], 4.0);
    let attrs = PoolAttrs {
        kind: PoolKind::Avg,
        size: 3,
        stride: 1,
        pad: [1, 1, 1, 1],
    };
    let y = pool(&x, &attrs, &[1, 1, 3, 3]);
    assert!(y.iter().all(|v| (*v - 4.0).abs() < 1e-6), "{y}");
}
