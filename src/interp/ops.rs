//! The reference definition of every IR operator, on ndarray tensors.
//!
//! Each function is written for clarity, not speed: plain loops, with
//! convolution as im2col followed by a matrix product. The JIT is tested
//! against these functions.

use crate::ir::{Act, ConvAttrs, PoolAttrs, PoolKind};
use crate::rng;
use ndarray::{s, Array2, ArrayD, Axis, IxDyn};

pub type Tensor = ArrayD<f32>;

/// Wraps a vector as a 1-D tensor.
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
    let (sums, _) = channel_sums(dy, |_, v| v as f64);
    vector(sums.iter().map(|v| *v as f32).collect())
}

/// `(N, C, inner)` of a `[N, C, ...]` tensor: every channel is `N` runs of
/// `inner` contiguous values.
fn planes(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

/// Calls `f(channel, run)` for every contiguous run of one channel's values.
fn for_each_run<'a>(t: &'a Tensor, mut f: impl FnMut(usize, &'a [f32])) {
    let (n, c, inner) = planes(t.shape());
    let data = t.as_slice().expect("standard layout");
    for i in 0..n * c {
        f(i % c, &data[i * inner..(i + 1) * inner]);
    }
}

/// Geometry of a convolution or pooling window over one image.
pub(crate) struct Window {
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub top: usize,
    pub left: usize,
}

impl Window {
    /// Returns the input cell that window offset `(ki, kj)` reads for output
    /// `(oy, ox)`, or `None` in the padding.
    pub fn source(&self, oy: usize, ox: usize, ki: usize, kj: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ki * self.dilation).checked_sub(self.top)?;
        let ix = (ox * self.stride + kj * self.dilation).checked_sub(self.left)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

pub(crate) fn conv_window(x: &[usize], out: &[usize], a: &ConvAttrs) -> Window {
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

/// Calls `f(column, cell)` for every kernel tap of channels `c0..c0 + cg`
/// of every image that reads inside the input: `column` indexes the im2col
/// matrix `[cg · K · K, N · OH · OW]` and `cell` the `[N, C, H, W]` tensor.
/// Taps that fall into the padding are skipped.
fn for_each_tap(
    n_images: usize,
    channels: usize,
    c0: usize,
    cg: usize,
    win: &Window,
    mut f: impl FnMut(usize, usize),
) {
    let (k, cells) = (win.kernel, win.oh * win.ow);
    for c in 0..cg {
        for ki in 0..k {
            for kj in 0..k {
                let row = ((c * k + ki) * k + kj) * n_images * cells;
                for n in 0..n_images {
                    let plane = (n * channels + c0 + c) * win.h * win.w;
                    for oy in 0..win.oh {
                        for ox in 0..win.ow {
                            if let Some((iy, ix)) = win.source(oy, ox, ki, kj) {
                                f(row + n * cells + oy * win.ow + ox, plane + iy * win.w + ix);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Unfolds channels `c0..c0 + cg` of every image into columns
/// `[cg · K · K, N · OH · OW]`, so that one matrix product per group
/// computes the convolution of the whole batch.
fn im2col(x: &Tensor, c0: usize, cg: usize, win: &Window) -> Array2<f32> {
    let (n_images, channels) = (x.shape()[0], x.shape()[1]);
    let rows = cg * win.kernel * win.kernel;
    let columns = n_images * win.oh * win.ow;
    let xs = x.as_slice().expect("standard layout");
    let mut cols = vec![0f32; rows * columns];
    for_each_tap(n_images, channels, c0, cg, win, |column, cell| {
        cols[column] = xs[cell];
    });
    Array2::from_shape_vec((rows, columns), cols).expect("sizes agree")
}

/// Folds columns back into `dx`, adding overlapping cells.
fn col2im(cols: &Array2<f32>, dx: &mut Tensor, c0: usize, cg: usize, win: &Window) {
    let (n_images, channels) = (dx.shape()[0], dx.shape()[1]);
    let cols = cols.as_slice().expect("standard layout");
    let dxs = dx.as_slice_mut().expect("standard layout");
    for_each_tap(n_images, channels, c0, cg, win, |column, cell| {
        dxs[cell] += cols[column];
    });
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
    let cells = win.oh * win.ow;
    let ys = y.as_slice_mut().expect("standard layout");
    for g in 0..a.groups {
        let out = group_weights(w, g, a.groups).dot(&im2col(x, g * cg, cg, &win));
        for o in 0..og {
            let channel = g * og + o;
            let bias = b.map_or(0.0, |b| b[[channel]]);
            let row = out.row(o);
            for n in 0..x.shape()[0] {
                let dst = &mut ys[(n * cout + channel) * cells..][..cells];
                for (d, v) in dst.iter_mut().zip(row.iter().skip(n * cells)) {
                    *d = v + bias;
                }
            }
        }
    }
    y
}

/// Rows `o0..o0 + og` of `dy` as a matrix `[og, N · OH · OW]`.
fn group_rows(dy: &Tensor, o0: usize, og: usize) -> Array2<f32> {
    let (n_images, channels) = (dy.shape()[0], dy.shape()[1]);
    let cells = dy.shape()[2] * dy.shape()[3];
    let src = dy.as_slice().expect("standard layout");
    let mut rows = vec![0f32; og * n_images * cells];
    for o in 0..og {
        for n in 0..n_images {
            let from = &src[(n * channels + o0 + o) * cells..][..cells];
            rows[(o * n_images + n) * cells..][..cells].copy_from_slice(from);
        }
    }
    Array2::from_shape_vec((og, n_images * cells), rows).expect("sizes agree")
}

pub fn conv2d_grad_input(dy: &Tensor, w: &Tensor, a: &ConvAttrs, x_shape: &[usize]) -> Tensor {
    let mut dx = Tensor::zeros(IxDyn(x_shape));
    let win = conv_window(x_shape, dy.shape(), a);
    let (cg, og) = (x_shape[1] / a.groups, w.shape()[0] / a.groups);
    for g in 0..a.groups {
        let cols = group_weights(w, g, a.groups)
            .t()
            .dot(&group_rows(dy, g * og, og));
        col2im(&cols, &mut dx, g * cg, cg, &win);
    }
    dx
}

pub fn conv2d_grad_weight(dy: &Tensor, x: &Tensor, a: &ConvAttrs, w_shape: &[usize]) -> Tensor {
    let mut dw = Tensor::zeros(IxDyn(w_shape));
    let win = conv_window(x.shape(), dy.shape(), a);
    let (cg, og) = (x.shape()[1] / a.groups, w_shape[0] / a.groups);
    let per_filter = w_shape[1] * w_shape[2] * w_shape[3];
    for g in 0..a.groups {
        let grad = group_rows(dy, g * og, og).dot(&im2col(x, g * cg, cg, &win).t());
        let flat = dw.as_slice_mut().expect("contiguous");
        let block = &mut flat[g * og * per_filter..(g + 1) * og * per_filter];
        for (d, v) in block.iter_mut().zip(grad.iter()) {
            *d += v;
        }
    }
    dw
}

/// Per-channel sums of `f(channel, value)` over every axis but 1, and the
/// element count per channel.
fn channel_sums(t: &Tensor, f: impl Fn(usize, f32) -> f64) -> (Vec<f64>, usize) {
    let channels = t.shape()[1];
    let mut sums = vec![0f64; channels];
    for_each_run(t, |c, run| {
        sums[c] += run.iter().map(|v| f(c, *v)).sum::<f64>();
    });
    (sums, t.len() / channels)
}

pub fn batch_mean(x: &Tensor) -> Tensor {
    let (sums, count) = channel_sums(x, |_, v| v as f64);
    vector(sums.iter().map(|s| (s / count as f64) as f32).collect())
}

/// Biased variance: the mean of squared deviations, as batch normalization
/// uses for normalising.
pub fn batch_var(x: &Tensor, mean: &Tensor) -> Tensor {
    let mean = mean.as_slice().expect("vector");
    let (sums, count) = channel_sums(x, |c, v| ((v - mean[c]) as f64).powi(2));
    vector(sums.iter().map(|s| (s / count as f64) as f32).collect())
}

/// Applies `f(channel, &mut value)` to every element.
fn map_channels(t: &mut Tensor, f: impl Fn(usize, &mut f32)) {
    let (n, c, inner) = planes(t.shape());
    let data = t.as_slice_mut().expect("standard layout");
    for i in 0..n * c {
        for v in &mut data[i * inner..(i + 1) * inner] {
            f(i % c, v);
        }
    }
}

fn inv_std(var: &Tensor, eps: f32) -> Vec<f32> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

pub fn batchnorm(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Tensor {
    let inv = inv_std(var, eps);
    let (mean, gamma, beta) = (
        mean.as_slice().unwrap(),
        gamma.as_slice().unwrap(),
        beta.as_slice().unwrap(),
    );
    let mut y = x.as_standard_layout().into_owned();
    map_channels(&mut y, |c, v| {
        *v = (*v - mean[c]) * inv[c] * gamma[c] + beta[c]
    });
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
    let inv = inv_std(var, eps);
    let (mean, gamma) = (mean.as_slice().unwrap(), gamma.as_slice().unwrap());
    let (sum_dy, count) = channel_sums(dy, |_, g| g as f64);
    let sum_dy_xhat = channel_dot(dy, x, |c, g, v| g * (v - mean[c]) * inv[c]);
    let m = count as f32;
    let mut dx = dy.as_standard_layout().into_owned();
    let xs = x.as_slice().expect("standard layout");
    let (n, channels, inner) = planes(x.shape());
    let data = dx.as_slice_mut().expect("standard layout");
    for i in 0..n * channels {
        let c = i % channels;
        let scale = gamma[c] * inv[c] / m;
        let (sum, sum_xhat) = (sum_dy[c] as f32, sum_dy_xhat[c] as f32);
        for (d, v) in data[i * inner..(i + 1) * inner]
            .iter_mut()
            .zip(&xs[i * inner..(i + 1) * inner])
        {
            let xhat = (v - mean[c]) * inv[c];
            *d = scale * (m * *d - sum - xhat * sum_xhat);
        }
    }
    dx
}

/// Per-channel sums of `f(channel, a, b)` over paired elements.
fn channel_dot(a: &Tensor, b: &Tensor, f: impl Fn(usize, f32, f32) -> f32) -> Vec<f64> {
    let (n, channels, inner) = planes(a.shape());
    let (a, b) = (
        a.as_slice().expect("standard layout"),
        b.as_slice().expect("standard layout"),
    );
    let mut sums = vec![0f64; channels];
    for i in 0..n * channels {
        let c = i % channels;
        let run = a[i * inner..(i + 1) * inner]
            .iter()
            .zip(&b[i * inner..(i + 1) * inner]);
        sums[c] += run.map(|(x, y)| f(c, *x, *y) as f64).sum::<f64>();
    }
    sums
}

/// `Σ dy · x̂` per channel.
pub fn batchnorm_grad_gamma(
    dy: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Tensor {
    let inv = inv_std(var, eps);
    let mean = mean.as_slice().expect("vector");
    let sums = channel_dot(dy, x, |c, g, v| g * (v - mean[c]) * inv[c]);
    vector(sums.iter().map(|v| *v as f32).collect())
}

pub fn running_update(running: &Tensor, stat: &Tensor, momentum: f32, correction: f32) -> Tensor {
    running.mapv(|r| r * (1.0 - momentum)) + &stat.mapv(|s| s * momentum * correction)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

pub fn act_value(act: Act, x: f32) -> f32 {
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

/// Computes the derivative of an activation at `x`. ReLU's derivative at 0 is 0, as
/// in PyTorch.
pub fn act_derivative(act: Act, x: f32) -> f32 {
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

pub(crate) fn pool_window(x: &[usize], out: &[usize], a: &PoolAttrs) -> Window {
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
    let (xs, (h, w)) = (
        x.as_slice().expect("standard layout"),
        (x.shape()[2], x.shape()[3]),
    );
    let ys = y.as_slice_mut().expect("standard layout");
    let (oh, ow) = (out_shape[2], out_shape[3]);
    for_each_window(x.shape(), out_shape, a, |[n, c, oy, ox], cells| {
        let plane = (n * x.shape()[1] + c) * h * w;
        let values = cells.iter().map(|&(iy, ix)| xs[plane + iy * w + ix]);
        ys[((n * out_shape[1] + c) * oh + oy) * ow + ox] = match a.kind {
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
    let (xs, (h, w)) = (
        x.as_slice().expect("standard layout"),
        (x.shape()[2], x.shape()[3]),
    );
    let dys = dy.as_slice().expect("standard layout");
    let dxs = dx.as_slice_mut().expect("standard layout");
    let (oh, ow) = (dy.shape()[2], dy.shape()[3]);
    for_each_window(x.shape(), dy.shape(), a, |[n, c, oy, ox], cells| {
        let plane = (n * x.shape()[1] + c) * h * w;
        let at = |(iy, ix): (usize, usize)| plane + iy * w + ix;
        let g = dys[((n * dy.shape()[1] + c) * oh + oy) * ow + ox];
        match a.kind {
            PoolKind::Max => {
                let mut best = cells[0];
                for &cell in &cells[1..] {
                    if xs[at(cell)] > xs[at(best)] {
                        best = cell;
                    }
                }
                dxs[at(best)] += g;
            }
            PoolKind::Avg => {
                for &cell in cells {
                    dxs[at(cell)] += g / cells.len() as f32;
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

/// Draws a mask of `0` (dropped, with probability `rate`) and
/// `1 / (1 - rate)`.
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

/// Returns the target distribution of one row: one-hot, smoothed towards
/// uniform.
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
