//! Shape inference for IR operators.

use super::{ConvAttrs, Op, PoolAttrs};

/// Output size of a window along one axis of size `n` with padding
/// `before + after`.
pub fn window_out(n: usize, window: usize, stride: usize, before: usize, after: usize) -> usize {
    (n + before + after - window) / stride + 1
}

fn conv_out(x: &[usize], w: &[usize], a: &ConvAttrs) -> Vec<usize> {
    let reach = a.dilation * (a.kernel - 1) + 1;
    vec![
        x[0],
        w[0],
        window_out(x[2], reach, a.stride, a.pad[0], a.pad[1]),
        window_out(x[3], reach, a.stride, a.pad[2], a.pad[3]),
    ]
}

fn pool_out(x: &[usize], a: &PoolAttrs) -> Vec<usize> {
    vec![
        x[0],
        x[1],
        window_out(x[2], a.size, a.stride, a.pad[0], a.pad[1]),
        window_out(x[3], a.size, a.stride, a.pad[2], a.pad[3]),
    ]
}

/// Infers the output shape of `op` applied to inputs of `shapes`.
///
/// # Panics
/// On operators whose shape is given rather than inferred (sources, reshape
/// and the gradients of convolution), and on inputs that do not fit.
pub fn infer(op: &Op, shapes: &[&[usize]]) -> Vec<usize> {
    let x = shapes.first().copied().unwrap_or(&[]);
    match op {
        Op::Dense => {
            assert_eq!(x[1], shapes[1][1], "dense: input and weight disagree");
            vec![x[0], shapes[1][0]]
        }
        Op::Conv2d(a) => conv_out(x, shapes[1], a),
        Op::BatchMean | Op::BatchVar | Op::BiasGrad => vec![x[1]],
        Op::BatchNorm { .. }
        | Op::Act(_)
        | Op::ActGrad(_)
        | Op::Mul
        | Op::Softmax
        | Op::SoftmaxGrad
        | Op::SoftmaxCrossEntropyGrad { .. }
        | Op::MeanSquaredErrorGrad
        | Op::BatchNormGradInput { .. }
        | Op::RunningUpdate { .. } => x.to_vec(),
        Op::BatchNormGradGamma { .. } => vec![x[1]],
        Op::Add => {
            assert_eq!(x, shapes[1], "add: shapes differ");
            x.to_vec()
        }
        Op::Pool(a) => pool_out(x, a),
        Op::GlobalAvgPool => vec![x[0], x[1]],
        Op::Concat => {
            let mut out = x.to_vec();
            out[1] = shapes.iter().map(|s| s[1]).sum();
            out
        }
        Op::Slice { len, .. } => {
            let mut out = x.to_vec();
            out[1] = *len;
            out
        }
        Op::SoftmaxCrossEntropy { .. } | Op::MeanSquaredError => vec![],
        Op::DenseGradInput => vec![x[0], shapes[1][1]],
        Op::DenseGradWeight => vec![x[1], shapes[1][1]],
        Op::Input
        | Op::Labels
        | Op::Param(_)
        | Op::State(_)
        | Op::Reshape
        | Op::DropoutMask { .. }
        | Op::Conv2dGradInput(_)
        | Op::Conv2dGradWeight(_)
        | Op::PoolGrad(_)
        | Op::GlobalAvgPoolGrad => {
            panic!("{} has a given shape, not an inferred one", op.name())
        }
    }
}
