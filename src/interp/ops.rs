//! The reference definition of every IR operator, on ndarray tensors.
//!
//! Each function is written for clarity, not speed: plain loops, with
//! convolution as im2col followed by a matrix product. The JIT is tested
//! against these functions.

use crate::ir::{Act, ConvAttrs, PoolAttrs, PoolKind};
use crate::rng;
use ndarray::{s, Array2, ArrayD, Axis, IxDyn};

pub type Tensor = ArrayD<f32>;

/// A 1-D tensor from a vector.
pub fn vector(values: Vec<f32>) -> Tensor {
    ndarray::Array1::from(values).into_dyn()
}

fn as2(t: &Tensor) -> ndarray::ArrayView2<'_, f32> {
    let n = t.shape()[0];
    t.view()
        .into_shape_with_order((n, t.len() / n.max(1)))
        .expect("contiguous tensor")
}

/// `x [N, F] · wᵀ + b`.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let w = w
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2-D weight");
    let mut y = as2(x).dot(&w.t());
    if let Some(b) = b {
        y += &b
            .view()
            .into_dimensionality::<ndarray::Ix1>()
            .expect("1-D bias");
    }
    y.into_dyn()
}

pub fn dense_grad_input(dy: &Tensor, w: &Tensor) -> Tensor {
    let w = w
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2-D weight");
    as2(dy).dot(&w).into_dyn()
}

pub fn dense_grad_weight(dy: &Tensor, x: &Tensor) -> Tensor {
    as2(dy).t().dot(&as2(x)).into_dyn()
}

/// Sum over every axis but 1.
pub fn bias_grad(dy: &Tensor) -> Tensor {
    let channels = dy.shape()[1];
    let mut out = vec![0f32; channels];
    for (i, v) in dy.iter().enumerate() {
        out[channel_of(dy.shape(), i)] += v;
    }
    ArrayD::from_shape_vec(IxDyn(&[channels]), out).expect("shape")
}

/// The channel (axis 1) of the `i`-th element of a row-major tensor.
fn channel_of(shape: &[usize], i: usize) -> usize {
    let inner: usize = shape[2..].iter().product();
    (i / inner) % shape[1]
}

/// Geometry of a convolution or pooling window over one image.
struct Window {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    top: usize,
    left: usize,
}

impl Window {
    /// The input cell that window offset `(ki, kj)` reads for output
    /// `(oy, ox)`, or `None` in the padding.
    fn source(&self, oy: usize, ox: usize, ki: usize, kj: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ki * self.dilation).checked_sub(self.top)?;
        let ix = (ox * self.stride + kj * self.dilation).checked_sub(self.left)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

fn conv_window(x: &[usize], out: &[usize], a: &ConvAttrs) -> Window {
    Window {
        h: x[2],
        w: x[3],
        oh: out[2],
        ow: out[3],
        kernel: a.kernel,
        stride: a.stride,
        dilation: a.dilation,
        top: a.pad[0],
        left: a.pad[2],
    }
}

/// Unfolds channels `c0..c0 + cg` of image `n` into columns
/// `[cg · K · K, OH · OW]`.
fn im2col(x: &Tensor, n: usize, c0: usize, cg: usize, win: &Window) -> Array2<f32> {
    let k = win.kernel;
    let mut cols = Array2::<f32>::zeros((cg * k * k, win.oh * win.ow));
    for c in 0..cg {
        for ki in 0..k {
            for kj in 0..k {
                let row = (c * k + ki) * k + kj;
                for oy in 0..win.oh {
                    for ox in 0..win.ow {
                        if let Some((iy, ix)) = win.source(oy, ox, ki, kj) {
                            cols[[row, oy * win.ow + ox]] = x[[n, c0 + c, iy, ix]];
                        }
                    }
                }
            }
        }
    }
    cols
}

/// Folds columns back into image `n` of `dx`, adding overlapping cells.
fn col2im(cols: &Array2<f32>, dx: &mut Tensor, n: usize, c0: usize, cg: usize, win: &Window) {
    let k = win.kernel;
    for c in 0..cg {
        for ki in 0..k {
            for kj in 0..k {
                let row = (c * k + ki) * k + kj;
                for oy in 0..win.oh {
                    for ox in 0..win.ow {
                        if let Some((iy, ix)) = win.source(oy, ox, ki, kj) {
                            dx[[n, c0 + c, iy, ix]] += cols[[row, oy * win.ow + ox]];
                        }
                    }
                }
            }
        }
    }
}

/// Weights of group `g` as a matrix `[Cout / groups, Cin / groups · K · K]`.
fn group_weights(w: &Tensor, g: usize, groups: usize) -> Array2<f32> {
    let per_group = w.shape()[0] / groups;
    let cols = w.len() / w.shape()[0];
    let rows = w.slice(s![g * per_group..(g + 1) * per_group, .., .., ..]);
    rows.to_owned()
        .into_shape_with_order((per_group, cols))
        .expect("contiguous weights")
}

pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &ConvAttrs,
    out_shape: &[usize],
) -> Tensor {
    let mut y = Tensor::zeros(IxDyn(out_shape));
    let win = conv_window(x.shape(), out_shape, a);
    let (cin, cout) = (x.shape()[1], w.shape()[0]);
    let (cg, og) = (cin / a.groups, cout / a.groups);
    for n in 0..x.shape()[0] {
        for g in 0..a.groups {
            let cols = im2col(x, n, g * cg, cg, &win);
            let out = group_weights(w, g, a.groups).dot(&cols);
            for o in 0..og {
                let bias = b.map_or(0.0, |b| b[[g * og + o]]);
                for (p, v) in out.row(o).iter().enumerate() {
                    y[[n, g * og + o, p / win.ow, p % win.ow]] = v + bias;
                }
            }
        }
    }
    y
}

fn group_rows(dy: &Tensor, n: usize, o0: usize, og: usize) -> Array2<f32> {
    let (oh, ow) = (dy.shape()[2], dy.shape()[3]);
    dy.slice(s![n, o0..o0 + og, .., ..])
        .to_owned()
        .into_shape_with_order((og, oh * ow))
        .expect("contiguous gradient")
}

pub fn conv2d_grad_input(dy: &Tensor, w: &Tensor, a: &ConvAttrs, x_shape: &[usize]) -> Tensor {
    let mut dx = Tensor::zeros(IxDyn(x_shape));
    let win = conv_window(x_shape, dy.shape(), a);
    let (cg, og) = (x_shape[1] / a.groups, w.shape()[0] / a.groups);
    for n in 0..x_shape[0] {
        for g in 0..a.groups {
            let cols = group_weights(w, g, a.groups)
                .t()
                .dot(&group_rows(dy, n, g * og, og));
            col2im(&cols, &mut dx, n, g * cg, cg, &win);
        }
    }
    dx
}

pub fn conv2d_grad_weight(dy: &Tensor, x: &Tensor, a: &ConvAttrs, w_shape: &[usize]) -> Tensor {
    let mut dw = Tensor::zeros(IxDyn(w_shape));
    let win = conv_window(x.shape(), dy.shape(), a);
    let (cg, og) = (x.shape()[1] / a.groups, w_shape[0] / a.groups);
    let per_filter = w_shape[1] * w_shape[2] * w_shape[3];
    for n in 0..x.shape()[0] {
        for g in 0..a.groups {
            let cols = im2col(x, n, g * cg, cg, &win);
            let grad = group_rows(dy, n, g * og, og).dot(&cols.t());
            let flat = dw.as_slice_mut().expect("contiguous");
            let block = &mut flat[g * og * per_filter..(g + 1) * og * per_filter];
            for (d, v) in block.iter_mut().zip(grad.iter()) {
                *d += v;
            }
        }
    }
    dw
}

/// Per-channel sums over every axis but 1, and the element count per
/// channel.
fn channel_sums(t: &Tensor, f: impl Fn(usize, f32) -> f64) -> (Vec<f64>, usize) {
    let channels = t.shape()[1];
    let mut sums = vec![0f64; channels];
    for (i, v) in t.iter().enumerate() {
        let c = channel_of(t.shape(), i);
        sums[c] += f(c, *v);
    }
    (sums, t.len() / channels)
}

pub fn batch_mean(x: &Tensor) -> Tensor {
    let (sums, count) = channel_sums(x, |_, v| v as f64);
    vector(sums.iter().map(|s| (s / count as f64) as f32).collect())
}

/// Biased variance: the mean of squared deviations, as batch normalization
/// uses for normalising.
pub fn batch_var(x: &Tensor, mean: &Tensor) -> Tensor {
    let (sums, count) = channel_sums(x, |c, v| ((v - mean[[c]]) as f64).powi(2));
    vector(sums.iter().map(|s| (s / count as f64) as f32).collect())
}

pub fn batchnorm(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Tensor {
    let mut y = x.clone();
    let shape = x.shape().to_vec();
    for (i, v) in y.iter_mut().enumerate() {
        let c = channel_of(&shape, i);
        let inv_std = 1.0 / (var[[c]] + eps).sqrt();
        *v = (*v - mean[[c]]) * inv_std * gamma[[c]] + beta[[c]];
    }
    y
}

/// Gradient of training-mode batch normalization with respect to its input,
/// through the batch statistics. With `x̂ = (x - μ) / σ` and `M` elements per
/// channel: `dx = γ / (σ M) · (M dy - Σ dy - x̂ Σ dy x̂)`.
pub fn batchnorm_grad_input(
    dy: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    eps: f32,
) -> Tensor {
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let xhat = |c: usize, v: f32| (v - mean[[c]]) * inv_std[c];
    let (sum_dy, count) = channel_sums(dy, |_, g| g as f64);
    let mut sum_dy_xhat = vec![0f64; sum_dy.len()];
    for (i, (g, v)) in dy.iter().zip(x.iter()).enumerate() {
        let c = channel_of(x.shape(), i);
        sum_dy_xhat[c] += (g * xhat(c, *v)) as f64;
    }
    let m = count as f32;
    let mut dx = dy.clone();
    for (i, (d, v)) in dx.iter_mut().zip(x.iter()).enumerate() {
        let c = channel_of(x.shape(), i);
        let scale = gamma[[c]] * inv_std[c] / m;
        *d = scale * (m * *d - sum_dy[c] as f32 - xhat(c, *v) * sum_dy_xhat[c] as f32);
    }
    dx
}

/// `Σ dy · x̂` per channel.
pub fn batchnorm_grad_gamma(
    dy: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Tensor {
    let channels = x.shape()[1];
    let mut out = vec![0f64; channels];
    for (i, (g, v)) in dy.iter().zip(x.iter()).enumerate() {
        let c = channel_of(x.shape(), i);
        out[c] += (g * (v - mean[[c]]) / (var[[c]] + eps).sqrt()) as f64;
    }
    vector(out.iter().map(|v| *v as f32).collect())
}

pub fn running_update(running: &Tensor, stat: &Tensor, momentum: f32, correction: f32) -> Tensor {
    running.mapv(|r| r * (1.0 - momentum)) + &stat.mapv(|s| s * momentum * correction)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn act_value(act: Act, x: f32) -> f32 {
    match act {
        Act::Relu => x.max(0.0),
        Act::LeakyRelu(slope) => {
            if x > 0.0 {
                x
            } else {
                slope * x
            }
        }
        Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Act::Tanh => x.tanh(),
        Act::Gelu { tanh: false } => 0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2)),
        Act::Gelu { tanh: true } => {
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
        }
    }
}

/// The derivative of an activation at `x`. ReLU's derivative at 0 is 0, as
/// in PyTorch.
fn act_derivative(act: Act, x: f32) -> f32 {
    match act {
        Act::Relu => f32::from(x > 0.0),
        Act::LeakyRelu(slope) => {
            if x > 0.0 {
                1.0
            } else {
                slope
            }
        }
        Act::Sigmoid => {
            let s = act_value(Act::Sigmoid, x);
            s * (1.0 - s)
        }
        Act::Tanh => 1.0 - x.tanh().powi(2),
        Act::Gelu { tanh: false } => {
            let cdf = 0.5 * (1.0 + libm::erff(x / std::f32::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            cdf + x * pdf
        }
        Act::Gelu { tanh: true } => {
            let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
            let t = inner.tanh();
            let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
        }
    }
}

pub fn act(x: &Tensor, a: Act) -> Tensor {
    x.mapv(|v| act_value(a, v))
}

pub fn act_grad(dy: &Tensor, x: &Tensor, a: Act) -> Tensor {
    let mut dx = dy.clone();
    dx.zip_mut_with(x, |d, v| *d *= act_derivative(a, *v));
    dx
}

fn pool_window(x: &[usize], out: &[usize], a: &PoolAttrs) -> Window {
    Window {
        h: x[2],
        w: x[3],
        oh: out[2],
        ow: out[3],
        kernel: a.size,
        stride: a.stride,
        dilation: 1,
        top: a.pad[0],
        left: a.pad[2],
    }
}

/// Applies `visit(output cell, input cells of its window)` to every window.
fn for_each_window(
    x: &[usize],
    out: &[usize],
    a: &PoolAttrs,
    mut visit: impl FnMut([usize; 4], &[(usize, usize)]),
) {
    let win = pool_window(x, out, a);
    let mut cells = Vec::with_capacity(a.size * a.size);
    for n in 0..x[0] {
        for c in 0..x[1] {
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    cells.clear();
                    for ki in 0..a.size {
                        for kj in 0..a.size {
                            cells.extend(win.source(oy, ox, ki, kj));
                        }
                    }
                    visit([n, c, oy, ox], &cells);
                }
            }
        }
    }
}

/// Max or average pooling; padding cells never win a max and do not count
/// in an average.
pub fn pool(x: &Tensor, a: &PoolAttrs, out_shape: &[usize]) -> Tensor {
    let mut y = Tensor::zeros(IxDyn(out_shape));
    for_each_window(x.shape(), out_shape, a, |[n, c, oy, ox], cells| {
        let values = cells.iter().map(|&(iy, ix)| x[[n, c, iy, ix]]);
        y[[n, c, oy, ox]] = match a.kind {
            PoolKind::Max => values.fold(f32::NEG_INFINITY, f32::max),
            PoolKind::Avg => values.sum::<f32>() / cells.len() as f32,
        };
    });
    y
}

/// Routes each window's gradient to its first maximum (max pooling), or
/// spreads it evenly over its cells (average pooling).
pub fn pool_grad(dy: &Tensor, x: &Tensor, a: &PoolAttrs) -> Tensor {
    let mut dx = Tensor::zeros(x.raw_dim());
    for_each_window(x.shape(), dy.shape(), a, |[n, c, oy, ox], cells| {
        let g = dy[[n, c, oy, ox]];
        match a.kind {
            PoolKind::Max => {
                let mut best = cells[0];
                for &(iy, ix) in &cells[1..] {
                    if x[[n, c, iy, ix]] > x[[n, c, best.0, best.1]] {
                        best = (iy, ix);
                    }
                }
                dx[[n, c, best.0, best.1]] += g;
            }
            PoolKind::Avg => {
                for &(iy, ix) in cells {
                    dx[[n, c, iy, ix]] += g / cells.len() as f32;
                }
            }
        }
    });
    dx
}

pub fn global_avgpool(x: &Tensor) -> Tensor {
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let cells = (x.shape()[2] * x.shape()[3]) as f32;
    let flat = x
        .view()
        .into_shape_with_order((n, c, x.len() / (n * c)))
        .expect("contiguous");
    flat.sum_axis(Axis(2)).mapv(|s| s / cells).into_dyn()
}

pub fn global_avgpool_grad(dy: &Tensor, x_shape: &[usize]) -> Tensor {
    let cells = (x_shape[2] * x_shape[3]) as f32;
    let mut dx = Tensor::zeros(IxDyn(x_shape));
    for ((n, c, _, _), v) in dx
        .view_mut()
        .into_dimensionality::<ndarray::Ix4>()
        .expect("4-D")
        .indexed_iter_mut()
    {
        *v = dy[[n, c]] / cells;
    }
    dx
}

pub fn reshape(x: &Tensor, shape: &[usize]) -> Tensor {
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .expect("element counts agree")
}

/// A mask of `0` (dropped, with probability `rate`) and `1 / (1 - rate)`.
pub fn dropout_mask(shape: &[usize], rate: f32, seed: u64, stream: u32) -> Tensor {
    let keep = 1.0 / (1.0 - rate);
    let values = (0..shape.iter().product::<usize>())
        .map(|i| {
            if rng::uniform(seed, stream as u64, i as u64) < rate {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Tensor::from_shape_vec(IxDyn(shape), values).expect("shape")
}

pub fn concat(inputs: &[&Tensor]) -> Tensor {
    let views: Vec<_> = inputs.iter().map(|t| t.view()).collect();
    ndarray::concatenate(Axis(1), &views).expect("matching shapes")
}

pub fn slice(x: &Tensor, start: usize, len: usize) -> Tensor {
    x.slice_axis(Axis(1), (start..start + len).into())
        .to_owned()
}

pub fn softmax(x: &Tensor) -> Tensor {
    let mut y = x.clone();
    for mut row in y.axis_iter_mut(Axis(0)) {
        let max = row.fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    y
}

pub fn softmax_grad(dy: &Tensor, y: &Tensor) -> Tensor {
    let mut dx = dy.clone();
    for (mut d, yr) in dx.axis_iter_mut(Axis(0)).zip(y.axis_iter(Axis(0))) {
        let dot: f32 = d.iter().zip(yr.iter()).map(|(a, b)| a * b).sum();
        d.zip_mut_with(&yr, |g, p| *g = p * (*g - dot));
    }
    dx
}

/// The target distribution of one row: one-hot, smoothed towards uniform.
fn target(label: usize, classes: usize, smoothing: f32) -> impl Iterator<Item = f32> {
    (0..classes).map(move |j| {
        let hot = if j == label { 1.0 } else { 0.0 };
        (1.0 - smoothing) * hot + smoothing / classes as f32
    })
}

/// Mean cross-entropy of softmax(logits) against the labels, computed with
/// log-sum-exp so extreme logits give no overflow or NaN.
pub fn softmax_cross_entropy(logits: &Tensor, labels: &[usize], smoothing: f32) -> f32 {
    let classes = logits.shape()[1];
    let mut total = 0f64;
    for (row, &label) in as2(logits).outer_iter().zip(labels) {
        let max = row.fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let log_sum = row
            .iter()
            .map(|v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64;
        for (v, t) in row.iter().zip(target(label, classes, smoothing)) {
            total += t as f64 * (log_sum - *v as f64);
        }
    }
    (total / labels.len() as f64) as f32
}

pub fn softmax_cross_entropy_grad(logits: &Tensor, labels: &[usize], smoothing: f32) -> Tensor {
    let classes = logits.shape()[1];
    let n = labels.len() as f32;
    let mut grad = softmax(logits);
    for (mut row, &label) in grad.axis_iter_mut(Axis(0)).zip(labels) {
        for (g, t) in row.iter_mut().zip(target(label, classes, smoothing)) {
            *g = (*g - t) / n;
        }
    }
    grad
}

/// Mean over all elements of `(prediction - one_hot(label))²`.
pub fn mean_squared_error(pred: &Tensor, labels: &[usize]) -> f32 {
    let classes = pred.shape()[1];
    let mut total = 0f64;
    for (row, &label) in as2(pred).outer_iter().zip(labels) {
        for (v, t) in row.iter().zip(target(label, classes, 0.0)) {
            total += ((v - t) as f64).powi(2);
        }
    }
    (total / pred.len() as f64) as f32
}

pub fn mean_squared_error_grad(pred: &Tensor, labels: &[usize]) -> Tensor {
    let classes = pred.shape()[1];
    let scale = 2.0 / pred.len() as f32;
    let mut grad = pred.clone();
    for (mut row, &label) in grad.axis_iter_mut(Axis(0)).zip(labels) {
        for (g, t) in row.iter_mut().zip(target(label, classes, 0.0)) {
            *g = scale * (*g - t);
        }
    }
    grad
}
