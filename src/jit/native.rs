//! Kernels that run as compiled Rust rather than generated code. Matrix
//! products go through the `gemm` crate, whose AVX2 and AVX-512 kernels
//! are two to four times faster than the 128-bit vectors Cranelift can
//! emit. Convolutions are per-image im2col plus a matrix product.
//! Depthwise convolution, pooling and batch normalization's reductions are
//! direct loops, and the rare operators run through the reference
//! executor.
//!
//! Kernels work on the arena in place. Work is split over the batch (or
//! over channels) into one fixed chunk per thread and partial sums are
//! added in chunk order, so results depend on the thread count but not on
//! scheduling.

use crate::interp::ops::{conv_window, pool_window, Window};
use crate::interp::{self, Tensor};
use crate::ir::{ConvAttrs, Graph, Op, PoolAttrs, PoolKind, ValueId};
use gemm::Parallelism;
use multiversion::multiversion;
use ndarray::IxDyn;
use std::ops::Range;

/// A pointer into the arena that worker threads may share; kernels write
/// disjoint ranges.
#[derive(Clone, Copy)]
pub struct Ptr(pub *mut f32);

// SAFETY: every kernel splits its writes into disjoint ranges per thread,
// and reads only values that no kernel running at the same time writes.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer; closures call this rather than reading the field, so
    /// that they capture the `Send` wrapper.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Scratch buffers that outlive a run, so that im2col matrices and partial
/// sums do not cost a fresh allocation (and its page faults) every step.
#[derive(Default)]
pub struct Scratch(std::sync::Mutex<Vec<Vec<f32>>>);

impl Scratch {
    /// A buffer of `len` elements with unspecified contents.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut pool = self.0.lock().expect("scratch lock");
        let found = pool.iter().position(|b| b.capacity() >= len);
        let mut buffer = match found {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        buffer.resize(len, 0.0);
        buffer
    }

    pub fn give(&self, buffer: Vec<f32>) {
        self.0.lock().expect("scratch lock").push(buffer);
    }
}

/// The arena as the kernels of one run see it.
pub struct Ctx<'a> {
    pub graph: &'a Graph,
    pub base: Ptr,
    /// Start of every value in the arena, in elements.
    pub offsets: &'a [usize],
    pub threads: usize,
    pub labels: &'a [usize],
    pub seed: u64,
    pub scratch: &'a Scratch,
}

impl Ctx<'_> {
    fn len(&self, v: ValueId) -> usize {
        self.graph.shape(v).iter().product()
    }

    /// # Safety
    /// No kernel may write `v` while the slice lives.
    unsafe fn read(&self, v: ValueId) -> &[f32] {
        std::slice::from_raw_parts(self.base.0.add(self.offsets[v.index()]), self.len(v))
    }

    /// # Safety
    /// The caller is the only writer of `v`, and nothing reads it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn write(&self, v: ValueId) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.base.0.add(self.offsets[v.index()]), self.len(v))
    }

    /// Threads for a matrix product of `macs` multiply-accumulates.
    /// Products under a million MACs, about 10 µs of one core's work, stay
    /// on one thread, where waking another costs more than it saves. On a
    /// two-core AVX2 machine, splitting mlp's products (8-26 million MACs)
    /// took its training step from 2.1 to 1.2 ms.
    fn parallelism(&self, macs: usize) -> Parallelism {
        if self.threads > 1 && macs >= 1 << 20 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }
}

/// Runs `f` on `threads` fixed, contiguous chunks of `0..n`, in parallel.
pub fn chunks(threads: usize, n: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let ranges: Vec<Range<usize>> = (0..n)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(n))
        .collect();
    if ranges.len() <= 1 {
        if let Some(r) = ranges.into_iter().next() {
            f(0, r);
        }
        return;
    }
    let f = &f;
    rayon::scope(|s| {
        for (t, r) in ranges.into_iter().enumerate() {
            s.spawn(move |_| f(t, r));
        }
    });
}

/// A row-major matrix view for [`matmul`]: element `(i, j)` lives at
/// `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

fn rows(ptr: *const f32, width: usize) -> Mat {
    Mat {
        ptr,
        rs: width as isize,
        cs: 1,
    }
}

fn transposed(ptr: *const f32, width: usize) -> Mat {
    Mat {
        ptr,
        rs: 1,
        cs: width as isize,
    }
}

/// `dst [m, n] (+)= a [m, k] · b [k, n]`, with `dst` row-major.
///
/// # Safety
/// Every pointer must cover its matrix.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: Parallelism,
) {
    matmul_into((m, n, k), rows(dst, n), accumulate, a, b, parallelism);
}

/// [`matmul`] into a strided `dst`, such as a band of columns of a wider
/// matrix.
///
/// # Safety
/// Every pointer must cover its matrix.
unsafe fn matmul_into(
    (m, n, k): (usize, usize, usize),
    dst: Mat,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr as *mut f32,
        dst.cs,
        dst.rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Runs a node that is a kernel of its own.
///
/// # Safety
/// The arena must hold every input of the node, sized by the graph.
pub unsafe fn run_single(ctx: &Ctx, v: ValueId) {
    let node = ctx.graph.node(v);
    let input = |i: usize| node.inputs[i];
    match &node.op {
        Op::Input | Op::Labels | Op::Param(_) | Op::State(_) | Op::Reshape => {}
        Op::Dense => dense(ctx, v, input(0), input(1), node.inputs.get(2).copied()),
        Op::DenseGradInput => {
            let (n, u) = (ctx.graph.shape(input(0))[0], ctx.graph.shape(input(0))[1]);
            let f = ctx.graph.shape(v)[1];
            matmul(
                (n, f, u),
                ctx.write(v).as_mut_ptr(),
                false,
                rows(ctx.read(input(0)).as_ptr(), u),
                rows(ctx.read(input(1)).as_ptr(), f),
                ctx.parallelism(n * f * u),
            );
        }
        Op::DenseGradWeight => {
            let (n, u) = (ctx.graph.shape(input(0))[0], ctx.graph.shape(input(0))[1]);
            let f = ctx.graph.shape(v)[1];
            matmul(
                (u, f, n),
                ctx.write(v).as_mut_ptr(),
                false,
                transposed(ctx.read(input(0)).as_ptr(), u),
                rows(ctx.read(input(1)).as_ptr(), f),
                ctx.parallelism(n * f * u),
            );
        }
        Op::Conv2d(a) => {
            let x_shape = ctx.graph.shape(input(0));
            if is_depthwise(x_shape, ctx.graph.shape(v), a) {
                depthwise(ctx, v, node.inputs.as_slice(), a);
            } else {
                conv(ctx, v, node.inputs.as_slice(), a);
            }
        }
        Op::Conv2dGradInput(a) => {
            if is_depthwise(ctx.graph.shape(v), ctx.graph.shape(input(0)), a) {
                depthwise_grad_input(ctx, v, input(0), input(1), a);
            } else {
                conv_grad_input(ctx, v, input(0), input(1), a);
            }
        }
        Op::Conv2dGradWeight(a) => {
            let x_shape = ctx.graph.shape(input(1));
            if is_depthwise(x_shape, ctx.graph.shape(input(0)), a) {
                depthwise_grad_weight(ctx, v, input(0), input(1), a);
            } else {
                conv_grad_weight(ctx, v, input(0), input(1), a);
            }
        }
        Op::DropoutMask { rate, stream } => {
            // The reference's mask, written in place.
            let keep = 1.0 / (1.0 - rate);
            for (i, m) in ctx.write(v).iter_mut().enumerate() {
                let u = crate::rng::uniform(ctx.seed, *stream as u64, i as u64);
                *m = if u < *rate { 0.0 } else { keep };
            }
        }
        Op::BiasGrad => bias_grad(ctx, v, input(0)),
        Op::Pool(a) => pool(ctx, v, input(0), a),
        Op::PoolGrad(a) => pool_grad(ctx, v, input(0), input(1), a),
        Op::GlobalAvgPool => {
            let x = ctx.read(input(0));
            let cells = x.len() / ctx.len(v);
            for (out, plane) in ctx.write(v).iter_mut().zip(x.chunks_exact(cells)) {
                *out = plane.iter().sum::<f32>() / cells as f32;
            }
        }
        Op::GlobalAvgPoolGrad => {
            let dy = ctx.read(input(0));
            let dx = ctx.write(v);
            let cells = dx.len() / dy.len();
            for (plane, g) in dx.chunks_exact_mut(cells).zip(dy) {
                plane.fill(g / cells as f32);
            }
        }
        _ => fallback(ctx, v),
    }
}

/// Runs a node through the reference executor, copying its inputs out of
/// the arena and its result back.
unsafe fn fallback(ctx: &Ctx, v: ValueId) {
    let node = ctx.graph.node(v);
    let inputs: Vec<Tensor> = node
        .inputs
        .iter()
        .map(|i| {
            Tensor::from_shape_vec(IxDyn(ctx.graph.shape(*i)), ctx.read(*i).to_vec())
                .expect("arena slices match shapes")
        })
        .collect();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let value = interp::eval(node, &refs, ctx.labels, ctx.seed);
    let out = ctx.write(v);
    for (o, x) in out.iter_mut().zip(value.iter()) {
        *o = *x;
    }
}

unsafe fn dense(ctx: &Ctx, v: ValueId, x: ValueId, w: ValueId, b: Option<ValueId>) {
    let (n, f) = (ctx.graph.shape(x)[0], ctx.graph.shape(x)[1]);
    let u = ctx.graph.shape(v)[1];
    let y = ctx.write(v);
    if let Some(b) = b {
        let bias = ctx.read(b);
        for row in y.chunks_exact_mut(u) {
            row.copy_from_slice(bias);
        }
    }
    matmul(
        (n, u, f),
        y.as_mut_ptr(),
        b.is_some(),
        rows(ctx.read(x).as_ptr(), f),
        transposed(ctx.read(w).as_ptr(), f),
        ctx.parallelism(n * u * f),
    );
}

/// The sizes of a convolution: images, input channels, output channels,
/// groups, and the rows and columns of one image's im2col matrix.
struct ConvDims {
    images: usize,
    cin: usize,
    cout: usize,
    groups: usize,
    /// `Cin / groups · K · K`.
    rows: usize,
    /// `OH · OW`.
    cells: usize,
    win: Window,
    /// A 1x1 convolution with stride 1 and no padding reads the input as
    /// its own im2col matrix.
    pointwise: bool,
    /// Output rows per band: im2col expands one band of an image at a time,
    /// so the expanded matrix stays in the core's cache while the product
    /// reads it.
    band: usize,
}

/// The max `f32`s one band's im2col matrix may hold: 256 KiB. Current x86
/// server cores have 1-2 MiB of L2 cache, so the band and the product's
/// packed copies of both operands fit together.
const BAND_FLOATS: usize = 1 << 16;

fn conv_dims(x: &[usize], y: &[usize], a: &ConvAttrs) -> ConvDims {
    let win = conv_window(x, y, a);
    let pointwise = a.kernel == 1 && a.stride == 1 && a.pad == [0; 4];
    let rows = x[1] / a.groups * a.kernel * a.kernel;
    let band = if pointwise {
        win.oh
    } else {
        (BAND_FLOATS / (rows * win.ow).max(1)).clamp(1, win.oh.max(1))
    };
    ConvDims {
        images: x[0],
        cin: x[1],
        cout: y[1],
        groups: a.groups,
        rows,
        cells: y[2] * y[3],
        win,
        pointwise,
        band,
    }
}

impl ConvDims {
    /// Splits one image's output rows into bands.
    fn bands(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.win.oh)
            .step_by(self.band.max(1))
            .map(|start| start..(start + self.band).min(self.win.oh))
    }

    /// Returns the length of the im2col buffer one thread needs.
    fn cols_len(&self) -> usize {
        if self.pointwise {
            0
        } else {
            self.rows * self.band * self.win.ow
        }
    }
}

fn is_depthwise(x: &[usize], y: &[usize], a: &ConvAttrs) -> bool {
    a.groups > 1 && a.groups == x[1] && a.groups == y[1]
}

/// The range of output columns `ox` whose input column
/// `ox · stride + offset - left` falls inside `0..w`.
fn valid_columns(win: &Window, offset: usize) -> Range<usize> {
    let s = win.stride;
    let lo = win.left.saturating_sub(offset).div_ceil(s);
    let hi = (win.w + win.left).saturating_sub(offset).div_ceil(s);
    lo.min(win.ow)..hi.min(win.ow).max(lo.min(win.ow))
}

/// Unfolds channels `c0..c0 + cg` of one image `[C, H, W]`, for output rows
/// `band`, into `cols` `[cg · K · K, band · OW]`, with zeros for taps in the
/// padding.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn im2col(x: &[f32], c0: usize, cg: usize, win: &Window, band: Range<usize>, cols: &mut [f32]) {
    let (k, plane) = (win.kernel, win.h * win.w);
    let cells = band.len() * win.ow;
    for c in 0..cg {
        let src = &x[(c0 + c) * plane..][..plane];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut cols[((c * k + ki) * k + kj) * cells..][..cells];
                if win.stride == 1 && win.ow == win.w {
                    shifted_rows(src, win, band.clone(), (ki, kj), row);
                    continue;
                }
                let xs = valid_columns(win, kj * win.dilation);
                for (r, oy) in band.clone().enumerate() {
                    let dst = &mut row[r * win.ow..][..win.ow];
                    let iy = (oy * win.stride + ki * win.dilation).checked_sub(win.top);
                    let Some(iy) = iy.filter(|&iy| iy < win.h && !xs.is_empty()) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..xs.start].fill(0.0);
                    dst[xs.end..].fill(0.0);
                    let line = &src[iy * win.w..][..win.w];
                    let first = xs.start * win.stride + kj * win.dilation - win.left;
                    if win.stride == 1 {
                        dst[xs.clone()].copy_from_slice(&line[first..][..xs.len()]);
                    } else {
                        let picked = line[first..].iter().step_by(win.stride);
                        for (d, v) in dst[xs.clone()].iter_mut().zip(picked) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Fills one im2col row of a stride-1 convolution whose output is as wide
/// as its input. Every valid tap of the band then reads the input plane at
/// one fixed offset, so the row is a single copy. The few cells that
/// wrapped around a line edge and the lines in the padding are zeroed
/// after it. This replaces one short copy per output line.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn shifted_rows(
    src: &[f32],
    win: &Window,
    band: Range<usize>,
    tap: (usize, usize),
    row: &mut [f32],
) {
    let Some(span) = ShiftedSpan::of(win, band, tap) else {
        row.fill(0.0);
        return;
    };
    row[..span.first].fill(0.0);
    row[span.first..span.last].copy_from_slice(&src[span.plane..][..span.last - span.first]);
    row[span.last..].fill(0.0);
    span.zero_wrapped(row, win.ow);
}

/// The overlap of one tap's im2col row of a band with the input plane, for
/// a stride-1 convolution whose output is as wide as its input.
struct ShiftedSpan {
    /// Output lines whose input line `oy + ki·d - top` lies inside the
    /// plane, counted from the band's first line.
    lines: Range<usize>,
    /// Output columns whose input column lies inside the plane.
    columns: Range<usize>,
    /// The row's cells `first..last` match the plane's cells from `plane`
    /// on, one to one.
    first: usize,
    last: usize,
    plane: usize,
}

impl ShiftedSpan {
    fn of(win: &Window, band: Range<usize>, (ki, kj): (usize, usize)) -> Option<ShiftedSpan> {
        let (ow, dy) = (win.ow, ki * win.dilation);
        let columns = valid_columns(win, kj * win.dilation);
        let lo = win.top.saturating_sub(dy).max(band.start);
        let hi = (win.h + win.top).saturating_sub(dy).min(band.end);
        if lo >= hi || columns.is_empty() {
            return None;
        }
        Some(ShiftedSpan {
            first: (lo - band.start) * ow + columns.start,
            last: (hi - 1 - band.start) * ow + columns.end,
            plane: (lo + dy - win.top) * win.w + columns.start + kj * win.dilation - win.left,
            lines: lo - band.start..hi - band.start,
            columns,
        })
    }

    /// Zeroes the cells of the span's lines that fall outside the valid
    /// columns: the one-to-one copy wrapped them around a line edge.
    ///
    /// Column by column, because a line has only one or two such cells,
    /// and a call to `memset` per line cost more than the writes.
    fn zero_wrapped(&self, row: &mut [f32], ow: usize) {
        let wrapped = (0..self.columns.start).chain(self.columns.end..ow);
        for column in wrapped {
            for line in self.lines.clone() {
                row[line * ow + column] = 0.0;
            }
        }
    }
}

/// Adds columns `[cg · K · K, band · OW]` for output rows `band` back into
/// one image's `dx`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn col2im(
    cols: &mut [f32],
    dx: &mut [f32],
    c0: usize,
    cg: usize,
    win: &Window,
    band: Range<usize>,
) {
    let (k, plane) = (win.kernel, win.h * win.w);
    let cells = band.len() * win.ow;
    for c in 0..cg {
        let dst = &mut dx[(c0 + c) * plane..][..plane];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut cols[((c * k + ki) * k + kj) * cells..][..cells];
                if win.stride == 1 && win.ow == win.w {
                    add_shifted_rows(row, win, band.clone(), (ki, kj), dst);
                    continue;
                }
                let xs = valid_columns(win, kj * win.dilation);
                for (r, oy) in band.clone().enumerate() {
                    let iy = (oy * win.stride + ki * win.dilation).checked_sub(win.top);
                    let Some(iy) = iy.filter(|&iy| iy < win.h && !xs.is_empty()) else {
                        continue;
                    };
                    let src = &row[r * win.ow..][xs.clone()];
                    let line = &mut dst[iy * win.w..][..win.w];
                    let first = xs.start * win.stride + kj * win.dilation - win.left;
                    if win.stride == 1 {
                        for (d, v) in line[first..][..xs.len()].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        let picked = line[first..].iter_mut().step_by(win.stride);
                        for (d, v) in picked.zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// The transpose of [`shifted_rows`]: adds one im2col row back into an
/// input plane with a single long add. The cells that would wrap around a
/// line edge are zeroed in `row` first, so they add nothing.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn add_shifted_rows(
    row: &mut [f32],
    win: &Window,
    band: Range<usize>,
    tap: (usize, usize),
    plane: &mut [f32],
) {
    let Some(span) = ShiftedSpan::of(win, band, tap) else {
        return;
    };
    span.zero_wrapped(row, win.ow);
    let target = &mut plane[span.plane..][..span.last - span.first];
    for (d, v) in target.iter_mut().zip(&row[span.first..span.last]) {
        *d += v;
    }
}

unsafe fn conv(ctx: &Ctx, v: ValueId, inputs: &[ValueId], a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(inputs[0]), ctx.graph.shape(v), a);
    let (x, w) = (ctx.read(inputs[0]), ctx.read(inputs[1]));
    let bias = inputs.get(2).map(|b| ctx.read(*b));
    let y = Ptr(ctx.write(v).as_mut_ptr());
    let (cg, og) = (d.cin / d.groups, d.cout / d.groups);
    let x_image = d.cin * d.win.h * d.win.w;
    chunks(ctx.threads, d.images, |_, images| {
        let mut cols = ctx.scratch.take(d.cols_len());
        for n in images {
            let x_n = &x[n * x_image..][..x_image];
            // SAFETY: image `n` of `y` belongs to this chunk alone.
            let y_n =
                std::slice::from_raw_parts_mut(y.get().add(n * d.cout * d.cells), d.cout * d.cells);
            for g in 0..d.groups {
                let dst = &mut y_n[g * og * d.cells..][..og * d.cells];
                if let Some(bias) = bias {
                    for (o, row) in dst.chunks_exact_mut(d.cells).enumerate() {
                        row.fill(bias[g * og + o]);
                    }
                }
                for band in d.bands() {
                    let first = band.start * d.win.ow;
                    let width = band.len() * d.win.ow;
                    let b = if d.pointwise {
                        x_n[g * cg * d.cells + first..].as_ptr()
                    } else {
                        im2col(x_n, g * cg, cg, &d.win, band, &mut cols);
                        cols.as_ptr()
                    };
                    matmul_into(
                        (og, width, d.rows),
                        rows(dst[first..].as_mut_ptr(), d.cells),
                        bias.is_some(),
                        rows(w[g * og * d.rows..].as_ptr(), d.rows),
                        rows(b, if d.pointwise { d.cells } else { width }),
                        Parallelism::None,
                    );
                }
            }
        }
        ctx.scratch.give(cols);
    });
}

unsafe fn conv_grad_input(ctx: &Ctx, v: ValueId, dy: ValueId, w: ValueId, a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(v), ctx.graph.shape(dy), a);
    let (dys, ws) = (ctx.read(dy), ctx.read(w));
    let dx = Ptr(ctx.write(v).as_mut_ptr());
    let (cg, og) = (d.cin / d.groups, d.cout / d.groups);
    let x_image = d.cin * d.win.h * d.win.w;
    chunks(ctx.threads, d.images, |_, images| {
        let mut cols = ctx.scratch.take(d.cols_len());
        for n in images {
            // SAFETY: image `n` of `dx` belongs to this chunk alone.
            let dx_n = std::slice::from_raw_parts_mut(dx.get().add(n * x_image), x_image);
            if !d.pointwise {
                dx_n.fill(0.0);
            }
            for g in 0..d.groups {
                let dy_g = dys[(n * d.cout + g * og) * d.cells..].as_ptr();
                for band in d.bands() {
                    let first = band.start * d.win.ow;
                    let width = band.len() * d.win.ow;
                    let dst = if d.pointwise {
                        rows(dx_n[g * cg * d.cells + first..].as_mut_ptr(), d.cells)
                    } else {
                        rows(cols.as_mut_ptr(), width)
                    };
                    matmul_into(
                        (d.rows, width, og),
                        dst,
                        false,
                        transposed(ws[g * og * d.rows..].as_ptr(), d.rows),
                        rows(dy_g.add(first), d.cells),
                        Parallelism::None,
                    );
                    if !d.pointwise {
                        col2im(&mut cols, dx_n, g * cg, cg, &d.win, band);
                    }
                }
            }
        }
        ctx.scratch.give(cols);
    });
}

unsafe fn conv_grad_weight(ctx: &Ctx, v: ValueId, dy: ValueId, x: ValueId, a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(x), ctx.graph.shape(dy), a);
    let (dys, xs) = (ctx.read(dy), ctx.read(x));
    let dw = ctx.write(v);
    let (cg, og) = (d.cin / d.groups, d.cout / d.groups);
    let x_image = d.cin * d.win.h * d.win.w;
    let threads = ctx.threads.clamp(1, d.images.max(1));
    // Every chunk starts from zeros, and chunks that get no image keep them.
    let partials: Vec<std::sync::Mutex<Vec<f32>>> = (0..threads)
        .map(|_| {
            let mut buffer = ctx.scratch.take(dw.len());
            buffer.fill(0.0);
            std::sync::Mutex::new(buffer)
        })
        .collect();
    chunks(threads, d.images, |t, images| {
        let mut partial = partials[t].lock().expect("one chunk per partial");
        let mut cols = ctx.scratch.take(d.cols_len());
        for n in images {
            let x_n = &xs[n * x_image..][..x_image];
            for g in 0..d.groups {
                for band in d.bands() {
                    let first = band.start * d.win.ow;
                    let width = band.len() * d.win.ow;
                    let b = if d.pointwise {
                        transposed(x_n[g * cg * d.cells + first..].as_ptr(), d.cells)
                    } else {
                        im2col(x_n, g * cg, cg, &d.win, band, &mut cols);
                        transposed(cols.as_ptr(), width)
                    };
                    matmul(
                        (og, d.rows, width),
                        partial[g * og * d.rows..].as_mut_ptr(),
                        true,
                        rows(
                            dys[(n * d.cout + g * og) * d.cells + first..].as_ptr(),
                            d.cells,
                        ),
                        b,
                        Parallelism::None,
                    );
                }
            }
        }
        ctx.scratch.give(cols);
    });
    dw.fill(0.0);
    for partial in partials {
        let partial = partial.into_inner().expect("chunks finished");
        for (o, p) in dw.iter_mut().zip(&partial) {
            *o += p;
        }
        ctx.scratch.give(partial);
    }
}

/// Geometry of a stride-1 depthwise convolution computed on zero-padded
/// planes, where every window lies inside the plane and each tap is a
/// shifted row, so the inner loops are plain vector multiply-adds.
struct Padded {
    /// The padded plane's height and width.
    ph: usize,
    pw: usize,
    /// Span of the kernel: `(K - 1) · dilation`.
    span: usize,
}

impl Padded {
    /// The padded layout, when the convolution has stride 1 and no more
    /// padding than its span (true for `same` and `valid`).
    fn of(win: &Window) -> Option<Padded> {
        let span = (win.kernel - 1) * win.dilation;
        (win.stride == 1 && win.top <= span && win.left <= span).then(|| Padded {
            ph: win.oh + span,
            pw: win.ow + span,
            span,
        })
    }

    /// Copies a `rows x cols` plane into `buffer` at `(top, left)`, zeros
    /// elsewhere; rows and columns falling outside are cut.
    fn fill(
        &self,
        plane: &[f32],
        (rows, cols): (usize, usize),
        (top, left): (isize, isize),
        buffer: &mut [f32],
    ) {
        buffer.fill(0.0);
        for r in 0..rows {
            let pr = r as isize + top;
            if pr < 0 || pr >= self.ph as isize {
                continue;
            }
            let first = (-left).max(0) as usize;
            let last = cols.min((self.pw as isize - left).max(0) as usize);
            if first >= last {
                continue;
            }
            let dst = &mut buffer[pr as usize * self.pw..][..self.pw];
            let at = (first as isize + left) as usize;
            dst[at..at + last - first].copy_from_slice(&plane[r * cols + first..r * cols + last]);
        }
    }
}

/// `out[oy, ·] = init + Σ taps · padded[oy + ki·d, kj·d + ·]` over a plane.
///
/// Every tap reads the padded plane at one fixed offset, so the output,
/// computed with the padded plane's row stride (`wide`), is a sum of
/// shifted copies of the plane. Rows of 28 would leave 512-bit loops mostly
/// in their scalar tails. The extra columns are computed and dropped.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn correlate(
    padded: &[f32],
    geometry: &Padded,
    win: &Window,
    (taps, init): (&[f32], f32),
    out: &mut [f32],
    wide: &mut [f32],
) {
    let (k, d, pw, ow) = (win.kernel, win.dilation, geometry.pw, win.ow);
    let len = (win.oh - 1) * pw + ow;
    let offsets: Vec<usize> = (0..k * k).map(|t| (t / k) * d * pw + (t % k) * d).collect();
    for (b, block) in wide[..len].chunks_mut(TAP_BLOCK).enumerate() {
        // A block of sums stays in registers while every tap adds to it,
        // instead of a load and a store per tap.
        let start = b * TAP_BLOCK;
        if block.len() == TAP_BLOCK {
            let mut sums = [init; TAP_BLOCK];
            for (t, offset) in taps.iter().zip(&offsets) {
                let source = &padded[offset + start..][..TAP_BLOCK];
                for (s, v) in sums.iter_mut().zip(source) {
                    *s += t * v;
                }
            }
            block.copy_from_slice(&sums);
        } else {
            block.fill(init);
            for (t, offset) in taps.iter().zip(&offsets) {
                let source = &padded[offset + start..][..block.len()];
                for (s, v) in block.iter_mut().zip(source) {
                    *s += t * v;
                }
            }
        }
    }
    for (row, line) in out.chunks_exact_mut(ow).zip(wide.chunks(pw)) {
        row.copy_from_slice(&line[..ow]);
    }
}

/// Output elements per block of [`correlate`]: four AVX2 or two AVX-512
/// registers of sums.
const TAP_BLOCK: usize = 32;

/// `lanes[tap, ·] += dy[oy, ·] · padded[oy + ki·d, kj·d + ·]` over a plane,
/// with `dy` laid out at the padded row stride and zeros in the extra
/// columns, so each tap is one long vertical multiply-add and the
/// horizontal sum happens once per plane.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn accumulate_taps(
    padded: &[f32],
    geometry: &Padded,
    win: &Window,
    dy_wide: &[f32],
    lanes: &mut [f32],
) {
    let (k, d, pw) = (win.kernel, win.dilation, geometry.pw);
    let len = (win.oh - 1) * pw + win.ow;
    for ki in 0..k {
        for kj in 0..k {
            let lane = &mut lanes[(ki * k + kj) * len..][..len];
            let source = &padded[ki * d * pw + kj * d..][..len];
            for ((l, g), v) in lane.iter_mut().zip(&dy_wide[..len]).zip(source) {
                *l += g * v;
            }
        }
    }
}

/// Depthwise convolution (one filter per channel) as direct loops: a
/// matrix product with `K · K` rows would waste the GEMM kernel.
unsafe fn depthwise(ctx: &Ctx, v: ValueId, inputs: &[ValueId], a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(inputs[0]), ctx.graph.shape(v), a);
    let (x, w) = (ctx.read(inputs[0]), ctx.read(inputs[1]));
    let bias = inputs.get(2).map(|b| ctx.read(*b));
    let y = Ptr(ctx.write(v).as_mut_ptr());
    let (win, kk, plane) = (&d.win, a.kernel * a.kernel, d.win.h * d.win.w);
    if let Some(geometry) = Padded::of(win) {
        chunks(ctx.threads, d.images * d.cin, |_, planes| {
            let mut buffer = ctx.scratch.take(geometry.ph * geometry.pw);
            let mut wide = ctx.scratch.take(geometry.ph * geometry.pw);
            for p in planes {
                let c = p % d.cin;
                let at = (win.top as isize, win.left as isize);
                geometry.fill(&x[p * plane..][..plane], (win.h, win.w), at, &mut buffer);
                // SAFETY: plane `p` of `y` belongs to this chunk alone.
                let dst = std::slice::from_raw_parts_mut(y.get().add(p * d.cells), d.cells);
                let filter = (&w[c * kk..][..kk], bias.map_or(0.0, |b| b[c]));
                correlate(&buffer, &geometry, win, filter, dst, &mut wide);
            }
            ctx.scratch.give(wide);
            ctx.scratch.give(buffer);
        });
        return;
    }
    chunks(ctx.threads, d.images * d.cin, |_, planes| {
        for p in planes {
            let c = p % d.cin;
            let src = &x[p * plane..][..plane];
            let taps = &w[c * kk..][..kk];
            // SAFETY: plane `p` of `y` belongs to this chunk alone.
            let dst = std::slice::from_raw_parts_mut(y.get().add(p * d.cells), d.cells);
            dst.fill(bias.map_or(0.0, |b| b[c]));
            for_each_tap(win, |ki, kj, oy, xs, iy| {
                let t = taps[ki * a.kernel + kj];
                let line = &src[iy * win.w..][..win.w];
                let out = &mut dst[oy * win.ow..][xs.clone()];
                let first = xs.start * win.stride + kj * win.dilation - win.left;
                if win.stride == 1 {
                    for (o, v) in out.iter_mut().zip(&line[first..first + xs.len()]) {
                        *o += t * v;
                    }
                } else {
                    let inputs = line[first..].iter().step_by(win.stride);
                    for (o, v) in out.iter_mut().zip(inputs) {
                        *o += t * v;
                    }
                }
            });
        }
    });
}

/// Calls `f(ki, kj, oy, valid output columns, input row)` for every kernel
/// tap and output row whose input row and some input column lie inside the
/// image.
fn for_each_tap(win: &Window, mut f: impl FnMut(usize, usize, usize, Range<usize>, usize)) {
    for ki in 0..win.kernel {
        for kj in 0..win.kernel {
            let xs = valid_columns(win, kj * win.dilation);
            // A tap whose every column is padding reads nothing, and its
            // first input column may lie past the line's end.
            if xs.is_empty() {
                continue;
            }
            for oy in 0..win.oh {
                let iy = (oy * win.stride + ki * win.dilation).checked_sub(win.top);
                if let Some(iy) = iy.filter(|&iy| iy < win.h) {
                    f(ki, kj, oy, xs.clone(), iy);
                }
            }
        }
    }
}

unsafe fn depthwise_grad_input(ctx: &Ctx, v: ValueId, dy: ValueId, w: ValueId, a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(v), ctx.graph.shape(dy), a);
    let (dys, ws) = (ctx.read(dy), ctx.read(w));
    let dx = Ptr(ctx.write(v).as_mut_ptr());
    let (win, kk, plane) = (&d.win, a.kernel * a.kernel, d.win.h * d.win.w);
    if let Some(forward) = Padded::of(win) {
        // The input gradient correlates the output gradient, padded so that
        // every input cell's windows lie inside, with the flipped filter.
        let geometry = Padded {
            ph: win.h + forward.span,
            pw: win.w + forward.span,
            span: forward.span,
        };
        let flipped = Window {
            h: win.oh,
            w: win.ow,
            oh: win.h,
            ow: win.w,
            kernel: win.kernel,
            stride: 1,
            dilation: win.dilation,
            top: forward.span - win.top,
            left: forward.span - win.left,
        };
        chunks(ctx.threads, d.images * d.cin, |_, planes| {
            let mut buffer = ctx.scratch.take(geometry.ph * geometry.pw);
            let mut wide = ctx.scratch.take(geometry.ph * geometry.pw);
            let mut taps = vec![0f32; kk];
            for p in planes {
                let c = p % d.cin;
                for (t, v) in taps.iter_mut().zip(ws[c * kk..][..kk].iter().rev()) {
                    *t = *v;
                }
                let at = (flipped.top as isize, flipped.left as isize);
                geometry.fill(
                    &dys[p * d.cells..][..d.cells],
                    (win.oh, win.ow),
                    at,
                    &mut buffer,
                );
                // SAFETY: plane `p` of `dx` belongs to this chunk alone.
                let dst = std::slice::from_raw_parts_mut(dx.get().add(p * plane), plane);
                correlate(&buffer, &geometry, &flipped, (&taps, 0.0), dst, &mut wide);
            }
            ctx.scratch.give(wide);
            ctx.scratch.give(buffer);
        });
        return;
    }
    chunks(ctx.threads, d.images * d.cin, |_, planes| {
        for p in planes {
            let c = p % d.cin;
            let g = &dys[p * d.cells..][..d.cells];
            let taps = &ws[c * kk..][..kk];
            // SAFETY: plane `p` of `dx` belongs to this chunk alone.
            let dst = std::slice::from_raw_parts_mut(dx.get().add(p * plane), plane);
            dst.fill(0.0);
            for_each_tap(win, |ki, kj, oy, xs, iy| {
                let t = taps[ki * a.kernel + kj];
                let line = &mut dst[iy * win.w..][..win.w];
                let grads = &g[oy * win.ow..][xs.clone()];
                let first = xs.start * win.stride + kj * win.dilation - win.left;
                if win.stride == 1 {
                    for (d, g) in line[first..first + xs.len()].iter_mut().zip(grads) {
                        *d += t * g;
                    }
                } else {
                    for (d, g) in line[first..].iter_mut().step_by(win.stride).zip(grads) {
                        *d += t * g;
                    }
                }
            });
        }
    });
}

unsafe fn depthwise_grad_weight(ctx: &Ctx, v: ValueId, dy: ValueId, x: ValueId, a: &ConvAttrs) {
    let d = conv_dims(ctx.graph.shape(x), ctx.graph.shape(dy), a);
    let (dys, xs) = (ctx.read(dy), ctx.read(x));
    let dw = Ptr(ctx.write(v).as_mut_ptr());
    let (win, kk, plane) = (&d.win, a.kernel * a.kernel, d.win.h * d.win.w);
    if let Some(geometry) = Padded::of(win) {
        chunks(ctx.threads, d.cin, |_, channels| {
            let len = (win.oh - 1) * geometry.pw + win.ow;
            let mut buffer = ctx.scratch.take(geometry.ph * geometry.pw);
            let mut dy_wide = ctx.scratch.take(geometry.ph * geometry.pw);
            let mut lanes = ctx.scratch.take(kk * len);
            // The extra columns of `dy_wide` stay zero.
            dy_wide.fill(0.0);
            for c in channels {
                let mut sums = vec![0f64; kk];
                lanes.fill(0.0);
                for n in 0..d.images {
                    let p = n * d.cin + c;
                    let at = (win.top as isize, win.left as isize);
                    geometry.fill(&xs[p * plane..][..plane], (win.h, win.w), at, &mut buffer);
                    let dy = &dys[p * d.cells..][..d.cells];
                    for (line, g) in dy_wide.chunks_mut(geometry.pw).zip(dy.chunks_exact(win.ow)) {
                        line[..win.ow].copy_from_slice(g);
                    }
                    accumulate_taps(&buffer, &geometry, win, &dy_wide, &mut lanes);
                    // The lanes go into f64 every 16 images, so each lane
                    // adds at most 16 products in f32 however long the batch.
                    if (n + 1) % 16 == 0 || n + 1 == d.images {
                        for (sum, lane) in sums.iter_mut().zip(lanes.chunks_exact(len)) {
                            *sum += lanes_sum(lane, |v| v) as f64;
                        }
                        lanes.fill(0.0);
                    }
                }
                for (i, s) in sums.iter().enumerate() {
                    // SAFETY: channel `c` of `dw` belongs to this chunk alone.
                    *dw.get().add(c * kk + i) = *s as f32;
                }
            }
            ctx.scratch.give(lanes);
            ctx.scratch.give(dy_wide);
            ctx.scratch.give(buffer);
        });
        return;
    }
    chunks(ctx.threads, d.cin, |_, channels| {
        for c in channels {
            let mut sums = vec![0f64; kk];
            for n in 0..d.images {
                let p = n * d.cin + c;
                let src = &xs[p * plane..][..plane];
                let g = &dys[p * d.cells..][..d.cells];
                for_each_tap(win, |ki, kj, oy, cols, iy| {
                    let line = &src[iy * win.w..][..win.w];
                    let grads = &g[oy * win.ow..][cols.clone()];
                    let first = cols.start * win.stride + kj * win.dilation - win.left;
                    let s = if win.stride == 1 {
                        lanes_dot(grads, &line[first..first + cols.len()], |g, v| g * v)
                    } else {
                        let inputs = line[first..].iter().step_by(win.stride);
                        grads.iter().zip(inputs).map(|(g, v)| g * v).sum()
                    };
                    sums[ki * a.kernel + kj] += s as f64;
                });
            }
            for (k, s) in sums.iter().enumerate() {
                // SAFETY: channel `c` of `dw` belongs to this chunk alone.
                *dw.get().add(c * kk + k) = *s as f32;
            }
        }
    });
}

/// Max or average pooling; padding never wins a max and does not count in
/// an average, as in the reference.
unsafe fn pool(ctx: &Ctx, v: ValueId, x: ValueId, a: &PoolAttrs) {
    let x_shape = ctx.graph.shape(x);
    let win = pool_window(x_shape, ctx.graph.shape(v), a);
    let xs = ctx.read(x);
    let y = Ptr(ctx.write(v).as_mut_ptr());
    let (plane, cells) = (win.h * win.w, win.oh * win.ow);
    if a.kind == PoolKind::Max && tiles(&win) {
        let k = win.kernel;
        chunks(ctx.threads, x_shape[0] * x_shape[1], |_, planes| {
            for p in planes {
                let src = &xs[p * plane..][..plane];
                // SAFETY: plane `p` of `y` belongs to this chunk alone.
                let dst = std::slice::from_raw_parts_mut(y.get().add(p * cells), cells);
                if k == 2 {
                    max_pool_2x2(src, win.w, dst);
                    continue;
                }
                for (oy, out) in dst.chunks_exact_mut(win.ow).enumerate() {
                    out.fill(f32::NEG_INFINITY);
                    for line in src[oy * k * win.w..].chunks_exact(win.w).take(k) {
                        for (o, window) in out.iter_mut().zip(line.chunks_exact(k)) {
                            for v in window {
                                *o = o.max(*v);
                            }
                        }
                    }
                }
            }
        });
        return;
    }
    chunks(ctx.threads, x_shape[0] * x_shape[1], |_, planes| {
        for p in planes {
            let src = &xs[p * plane..][..plane];
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let (mut best, mut sum, mut count) = (f32::NEG_INFINITY, 0f32, 0usize);
                    for_each_cell(&win, oy, ox, |cell| {
                        best = best.max(src[cell]);
                        sum += src[cell];
                        count += 1;
                    });
                    let value = match a.kind {
                        PoolKind::Max => best,
                        PoolKind::Avg => sum / count as f32,
                    };
                    // SAFETY: plane `p` of `y` belongs to this chunk alone.
                    *y.get().add(p * cells + oy * win.ow + ox) = value;
                }
            }
        }
    });
}

/// Whether the windows tile the input exactly: no padding, no overlap,
/// and every cell in some window.
fn tiles(win: &Window) -> bool {
    win.stride == win.kernel
        && win.top == 0
        && win.left == 0
        && win.oh * win.kernel == win.h
        && win.ow * win.kernel == win.w
}

/// Calls `f(cell)` for every input cell of window `(oy, ox)`, in row-major
/// order.
fn for_each_cell(win: &Window, oy: usize, ox: usize, mut f: impl FnMut(usize)) {
    for ki in 0..win.kernel {
        for kj in 0..win.kernel {
            if let Some((iy, ix)) = win.source(oy, ox, ki, kj) {
                f(iy * win.w + ix);
            }
        }
    }
}

/// 2x2 max pooling of a plane `w` wide whose windows tile it. The pairs
/// of lines are reduced first, so each step is a plain vector maximum,
/// with the same `max` calls in the same order as the general loop.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn max_pool_2x2(src: &[f32], w: usize, dst: &mut [f32]) {
    let ow = w / 2;
    for (pair, out) in src.chunks_exact(2 * w).zip(dst.chunks_exact_mut(ow)) {
        let (top, bottom) = pair.split_at(w);
        for ((o, t), b) in out
            .iter_mut()
            .zip(top.chunks_exact(2))
            .zip(bottom.chunks_exact(2))
        {
            *o = f32::NEG_INFINITY.max(t[0]).max(t[1]).max(b[0]).max(b[1]);
        }
    }
}

/// Routes each 2x2 window's gradient to its first maximum in row-major
/// order, as [`max_tile_grad`] does, into a zeroed `dx`. The maximum's
/// position is found with selects rather than branches, because which of
/// the four cells wins is close to random and branches would mispredict.
fn max_pool_2x2_grad(src: &[f32], w: usize, dy: &[f32], dx: &mut [f32]) {
    let offsets = [0, 1, w, w + 1];
    let lines = src.chunks_exact(2 * w).zip(dx.chunks_exact_mut(2 * w));
    for ((pair, grads), g) in lines.zip(dy.chunks_exact(w / 2)) {
        for (ox, g) in g.iter().enumerate() {
            let i = 2 * ox;
            let [a, b, c, d] = [pair[i], pair[i + 1], pair[w + i], pair[w + i + 1]];
            // The scan `if v > best` over a, b, c, d, as selects.
            let (best, at) = if b > a { (b, 1) } else { (a, 0) };
            let (best, at) = if c > best { (c, 2) } else { (best, at) };
            let at = if d > best { 3 } else { at };
            grads[i + offsets[at]] = *g;
        }
    }
}

/// Routes each window's gradient to its first maximum, for windows that
/// tile the plane.
fn max_tile_grad(win: &Window, src: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (k, w) = (win.kernel, win.w);
    let band = k * w;
    for ((src, dx), dy) in src
        .chunks_exact(band)
        .zip(dx.chunks_exact_mut(band))
        .zip(dy.chunks_exact(win.ow))
    {
        for (ox, g) in dy.iter().enumerate() {
            let mut best = ox * k;
            let mut top = src[best];
            for ki in 0..k {
                let start = ki * w + ox * k;
                for (cell, v) in src[start..start + k].iter().enumerate() {
                    if *v > top {
                        (best, top) = (start + cell, *v);
                    }
                }
            }
            dx[best] += g;
        }
    }
}

unsafe fn pool_grad(ctx: &Ctx, v: ValueId, dy: ValueId, x: ValueId, a: &PoolAttrs) {
    let x_shape = ctx.graph.shape(x);
    let win = pool_window(x_shape, ctx.graph.shape(dy), a);
    let tiled = tiles(&win);
    let (xs, dys) = (ctx.read(x), ctx.read(dy));
    let dx = Ptr(ctx.write(v).as_mut_ptr());
    let (plane, cells) = (win.h * win.w, win.oh * win.ow);
    chunks(ctx.threads, x_shape[0] * x_shape[1], |_, planes| {
        for p in planes {
            let src = &xs[p * plane..][..plane];
            // SAFETY: plane `p` of `dx` belongs to this chunk alone.
            let dst = std::slice::from_raw_parts_mut(dx.get().add(p * plane), plane);
            dst.fill(0.0);
            if a.kind == PoolKind::Max && tiled && win.kernel == 2 {
                max_pool_2x2_grad(src, win.w, &dys[p * cells..][..cells], dst);
                continue;
            }
            if a.kind == PoolKind::Max && tiled {
                max_tile_grad(&win, src, &dys[p * cells..][..cells], dst);
                continue;
            }
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let g = dys[p * cells + oy * win.ow + ox];
                    match a.kind {
                        PoolKind::Max => {
                            // The first maximum takes the gradient.
                            let mut best: Option<usize> = None;
                            for_each_cell(&win, oy, ox, |cell| {
                                if best.is_none_or(|b| src[cell] > src[b]) {
                                    best = Some(cell);
                                }
                            });
                            if let Some(b) = best {
                                dst[b] += g;
                            }
                        }
                        PoolKind::Avg => {
                            let mut count = 0;
                            for_each_cell(&win, oy, ox, |_| count += 1);
                            for_each_cell(&win, oy, ox, |cell| dst[cell] += g / count as f32);
                        }
                    }
                }
            }
        }
    });
}

const LANES: usize = 16;

/// Sums `f(v)` over a slice in sixteen interleaved lanes, which the
/// compiler turns into vector additions, and adds the lanes at the end.
/// Each slice is one image's plane of a channel (at most a few thousand
/// values), so `f32` keeps about seven significant digits; callers add the
/// planes in `f64`.
fn lanes_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| f(*v)).sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += f(*v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Sums `f(a, b)` over paired slices, as [`lanes_sum`] does.
fn lanes_dot(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| f(*x, *y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += f(*x, *y);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn plane_sum(values: &[f32]) -> f32 {
    lanes_sum(values, |v| v)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn plane_squares(values: &[f32], mean: f32) -> f32 {
    lanes_sum(values, |v| (v - mean) * (v - mean))
}

/// `Σ dy · x̂` over a plane, with `x̂ = (x - mean) · inv`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn plane_dot_xhat(dy: &[f32], x: &[f32], (mean, inv): (f32, f32)) -> f32 {
    lanes_dot(dy, x, |g, v| g * (v - mean) * inv)
}

/// One plane of batch normalization's input gradient,
/// `k · (m · dy - Σ dy - x̂ · Σ dy·x̂)`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn plane_batchnorm_dx(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    (mean, inv): (f32, f32),
    (k, m, sum, sum_xhat): (f32, f32, f32, f32),
) {
    for ((d, g), v) in dx.iter_mut().zip(dy).zip(x) {
        let xhat = (v - mean) * inv;
        *d = k * (m * g - sum - xhat * sum_xhat);
    }
}

/// Computes the bias gradient, `Σ dy` per channel. Rows of a dense layer's
/// `[N, U]` gradient are added in `f64` one whole row at a time, in the
/// reference's order. Convolution planes are summed like batch statistics.
unsafe fn bias_grad(ctx: &Ctx, v: ValueId, dy: ValueId) {
    let (n, c, inner) = planes(ctx.graph.shape(dy));
    let dys = ctx.read(dy);
    let mut sums = vec![0f64; c];
    if inner == 1 {
        for row in dys.chunks_exact(c) {
            add_row_f64(&mut sums, row);
        }
    } else {
        for i in 0..n {
            for (ch, sum) in sums.iter_mut().enumerate() {
                *sum += plane_sum(&dys[(i * c + ch) * inner..][..inner]) as f64;
            }
        }
    }
    for (out, sum) in ctx.write(v).iter_mut().zip(&sums) {
        *out = *sum as f32;
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn add_row_f64(sums: &mut [f64], row: &[f32]) {
    for (s, v) in sums.iter_mut().zip(row) {
        *s += *v as f64;
    }
}

/// `(N, C, inner)` of a `[N, C, ...]` shape.
fn planes(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

/// Per-channel batch mean and biased variance in one kernel: the second
/// pass over a channel finds it in cache.
///
/// # Safety
/// As for [`run_single`].
pub unsafe fn batch_stats(ctx: &Ctx, mean: ValueId, var: ValueId) {
    let x = ctx.graph.node(mean).inputs[0];
    let (n, c, inner) = planes(ctx.graph.shape(x));
    let xs = ctx.read(x);
    let (means, vars) = (
        Ptr(ctx.write(mean).as_mut_ptr()),
        Ptr(ctx.write(var).as_mut_ptr()),
    );
    let count = (n * inner) as f64;
    chunks(ctx.threads, c, |_, channels| {
        for ch in channels {
            let runs = || (0..n).map(|i| &xs[(i * c + ch) * inner..][..inner]);
            let sum: f64 = runs().map(|r| plane_sum(r) as f64).sum();
            let m = (sum / count) as f32;
            let squares: f64 = runs().map(|r| plane_squares(r, m) as f64).sum();
            // SAFETY: channel `ch` belongs to this chunk alone.
            *means.get().add(ch) = m;
            *vars.get().add(ch) = (squares / count) as f32;
        }
    });
}

/// The input, scale and shift gradients of training-mode batch
/// normalization, from one pass of per-channel sums: `Σ dy` (the shift's
/// gradient) and `Σ dy · x̂` (the scale's).
///
/// # Safety
/// As for [`run_single`].
pub unsafe fn batchnorm_grad(
    ctx: &Ctx,
    input: Option<ValueId>,
    gamma: Option<ValueId>,
    beta: &[ValueId],
) {
    let source = input.or(gamma).expect("a batchnorm gradient");
    let node = ctx.graph.node(source);
    let (Op::BatchNormGradInput { eps } | Op::BatchNormGradGamma { eps }) = node.op else {
        unreachable!("scheduled as a batchnorm gradient")
    };
    let [dy, x, mean, var] = [0, 1, 2, 3].map(|i| node.inputs[i]);
    let (n, c, inner) = planes(ctx.graph.shape(x));
    let (dys, xs) = (ctx.read(dy), ctx.read(x));
    let (means, vars) = (ctx.read(mean), ctx.read(var));
    let scale = input.map(|i| ctx.read(ctx.graph.node(i).inputs[4]));
    let out = |v: Option<ValueId>| v.map(|v| Ptr(ctx.write(v).as_mut_ptr()));
    let (dx, dgamma) = (out(input), out(gamma));
    let dbeta: Vec<Ptr> = beta
        .iter()
        .map(|v| Ptr(ctx.write(*v).as_mut_ptr()))
        .collect();
    let m = (n * inner) as f32;
    chunks(ctx.threads, c, |_, channels| {
        for ch in channels {
            let inv = 1.0 / (vars[ch] + eps).sqrt();
            let mu = means[ch];
            let (mut sum, mut sum_xhat) = (0f64, 0f64);
            for i in 0..n {
                let at = (i * c + ch) * inner;
                let (g, v) = (&dys[at..][..inner], &xs[at..][..inner]);
                sum += plane_sum(g) as f64;
                sum_xhat += plane_dot_xhat(g, v, (mu, inv)) as f64;
            }
            // SAFETY: channel `ch` of every output belongs to this chunk.
            if let Some(p) = dgamma {
                *p.get().add(ch) = sum_xhat as f32;
            }
            for p in &dbeta {
                *p.get().add(ch) = sum as f32;
            }
            let (Some(dx), Some(scale)) = (dx, scale) else {
                continue;
            };
            let k = scale[ch] * inv / m;
            let (sum, sum_xhat) = (sum as f32, sum_xhat as f32);
            for i in 0..n {
                let at = (i * c + ch) * inner;
                let dst = std::slice::from_raw_parts_mut(dx.get().add(at), inner);
                let (g, v) = (&dys[at..][..inner], &xs[at..][..inner]);
                plane_batchnorm_dx(dst, g, v, (mu, inv), (k, m, sum, sum_xhat));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// im2col one output line at a time, straight from the window's
    /// definition.
    fn im2col_by_definition(x: &[f32], cg: usize, win: &Window) -> Vec<f32> {
        let k = win.kernel;
        let cells = win.oh * win.ow;
        let mut cols = vec![0.0; cg * k * k * cells];
        for c in 0..cg {
            for ki in 0..k {
                for kj in 0..k {
                    for oy in 0..win.oh {
                        for ox in 0..win.ow {
                            if let Some((iy, ix)) = win.source(oy, ox, ki, kj) {
                                let row = (c * k + ki) * k + kj;
                                cols[row * cells + oy * win.ow + ox] =
                                    x[(c * win.h + iy) * win.w + ix];
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    proptest! {
        /// Banded im2col, with and without the single-shift fast path,
        /// agrees with the definition, and col2im adds back exactly what
        /// the definition's transpose does.
        #[test]
        fn banded_im2col_matches_definition(
            (h, w) in (1usize..9, 1usize..9),
            kernel in 1usize..4,
            stride in 1usize..3,
            dilation in 1usize..3,
            pads in [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            band in 1usize..5,
        ) {
            let span = (kernel - 1) * dilation + 1;
            let (hp, wp) = (h + pads[0] + pads[1], w + pads[2] + pads[3]);
            prop_assume!(hp >= span && wp >= span);
            let win = Window {
                h,
                w,
                oh: (hp - span) / stride + 1,
                ow: (wp - span) / stride + 1,
                kernel,
                stride,
                dilation,
                top: pads[0],
                left: pads[2],
            };
            let cg = 2;
            let x: Vec<f32> = (0..cg * h * w).map(|i| i as f32 + 1.0).collect();
            let expected = im2col_by_definition(&x, cg, &win);

            let rows = cg * kernel * kernel;
            let cells = win.oh * win.ow;
            let mut dx = vec![0.0; x.len()];
            let mut dx_expected = vec![0.0; x.len()];
            for start in (0..win.oh).step_by(band) {
                let lines = start..(start + band).min(win.oh);
                let width = lines.len() * win.ow;
                let mut cols = vec![f32::NAN; rows * width];
                im2col(&x, 0, cg, &win, lines.clone(), &mut cols);
                for r in 0..rows {
                    let got = &cols[r * width..][..width];
                    let want = &expected[r * cells + start * win.ow..][..width];
                    prop_assert_eq!(got, want, "row {} of band {:?}", r, lines);
                }
                col2im(&mut cols, &mut dx, 0, cg, &win, lines);
            }
            for (row, values) in expected.chunks_exact(cells).enumerate() {
                let (c, tap) = (row / (kernel * kernel), row % (kernel * kernel));
                for (cell, v) in values.iter().enumerate() {
                    let (oy, ox) = (cell / win.ow, cell % win.ow);
                    if let Some((iy, ix)) = win.source(oy, ox, tap / kernel, tap % kernel) {
                        dx_expected[(c * h + iy) * w + ix] += v;
                    }
                }
            }
            prop_assert_eq!(dx, dx_expected);
        }
    }
}
