//! The built-in layers: their parameter tables, defaults and shape rules.
//!
//! Defaults follow what Keras and PyTorch users expect: `valid` padding,
//! stride 1, pooling stride equal to the window, batch normalization with
//! PyTorch's `momentum = 0.1` and `eps = 1e-5`, leaky ReLU slope 0.01.

use super::args::{param, Args, Default as D, Kind, Param};
use super::graph::{Activation, Conv2d, Op, Padding, Pool2d, PoolKind, Shape};

const PADDING: Kind = Kind::Word(&["same", "valid"]);

/// How many tensor inputs a layer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    One,
    Two,
    AtLeastTwo,
}

pub struct LayerSpec {
    pub name: &'static str,
    pub arity: Arity,
    pub params: &'static [Param],
}

const CONV_PARAMS: &[Param] = &[
    param("filters", Kind::Int, D::Required),
    param("kernel", Kind::Int, D::Required),
    param("stride", Kind::Int, D::Int(1)),
    param("padding", PADDING, D::Word("valid")),
    param("dilation", Kind::Int, D::Int(1)),
    param("bias", Kind::BoolOrAuto, D::Word("auto")),
];

const DEPTHWISE_PARAMS: &[Param] = &[
    param("kernel", Kind::Int, D::Required),
    param("stride", Kind::Int, D::Int(1)),
    param("padding", PADDING, D::Word("valid")),
    param("dilation", Kind::Int, D::Int(1)),
    param("multiplier", Kind::Int, D::Int(1)),
    param("bias", Kind::BoolOrAuto, D::Word("auto")),
];

const SEPARABLE_PARAMS: &[Param] = &[
    param("filters", Kind::Int, D::Required),
    param("kernel", Kind::Int, D::Required),
    param("stride", Kind::Int, D::Int(1)),
    param("padding", PADDING, D::Word("valid")),
    param("dilation", Kind::Int, D::Int(1)),
    param("multiplier", Kind::Int, D::Int(1)),
    param("bias", Kind::BoolOrAuto, D::Word("auto")),
];

const POOL_PARAMS: &[Param] = &[
    param("size", Kind::Int, D::Int(2)),
    param("stride", Kind::Int, D::SameAs("size")),
    param("padding", PADDING, D::Word("valid")),
];

/// Every built-in layer, in the order the language reference lists them.
pub const LAYERS: &[LayerSpec] = &[
    LayerSpec {
        name: "dense",
        arity: Arity::One,
        params: &[
            param("units", Kind::Int, D::Required),
            param("bias", Kind::BoolOrAuto, D::Word("auto")),
        ],
    },
    LayerSpec {
        name: "conv",
        arity: Arity::One,
        params: CONV_PARAMS,
    },
    LayerSpec {
        name: "depthwise_conv",
        arity: Arity::One,
        params: DEPTHWISE_PARAMS,
    },
    LayerSpec {
        name: "separable_conv",
        arity: Arity::One,
        params: SEPARABLE_PARAMS,
    },
    LayerSpec {
        name: "batchnorm",
        arity: Arity::One,
        params: &[
            param("momentum", Kind::Float, D::Float(0.1)),
            param("eps", Kind::Float, D::Float(1e-5)),
        ],
    },
    LayerSpec {
        name: "relu",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "leaky_relu",
        arity: Arity::One,
        params: &[param("slope", Kind::Float, D::Float(0.01))],
    },
    LayerSpec {
        name: "sigmoid",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "tanh",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "gelu",
        arity: Arity::One,
        params: &[param(
            "approximate",
            Kind::Word(&["none", "tanh"]),
            D::Word("none"),
        )],
    },
    LayerSpec {
        name: "softmax",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "maxpool",
        arity: Arity::One,
        params: POOL_PARAMS,
    },
    LayerSpec {
        name: "avgpool",
        arity: Arity::One,
        params: POOL_PARAMS,
    },
    LayerSpec {
        name: "global_avgpool",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "flatten",
        arity: Arity::One,
        params: &[],
    },
    LayerSpec {
        name: "dropout",
        arity: Arity::One,
        params: &[param("rate", Kind::Float, D::Required)],
    },
    LayerSpec {
        name: "add",
        arity: Arity::Two,
        params: &[],
    },
    LayerSpec {
        name: "concat",
        arity: Arity::AtLeastTwo,
        params: &[],
    },
];

pub fn find(name: &str) -> Option<&'static LayerSpec> {
    LAYERS.iter().find(|l| l.name == name)
}

/// A shape rule that failed.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerError {
    /// A parameter that must be positive is not.
    NotPositive {
        param: &'static str,
        value: i64,
    },
    /// A parameter outside its valid range, with the reason.
    Invalid {
        param: &'static str,
        message: String,
    },
    WrongRank {
        expected: &'static str,
        found: Shape,
    },
    /// A convolution kernel larger than its (padded) input.
    KernelTooLarge {
        kernel: usize,
        dilation: usize,
        input: Shape,
    },
    /// A pooling window that leaves no output cell.
    PoolToZero {
        size: usize,
        input: Shape,
        output: (usize, usize),
    },
    AddMismatch {
        left: Shape,
        right: Shape,
    },
    /// `index` is the first input whose shape disagrees with input 0.
    ConcatMismatch {
        index: usize,
        shapes: Vec<Shape>,
    },
}

/// Applies a layer's shape rule: returns the operators it becomes (one, or two
/// for a separable convolution) with their output shapes.
pub fn build(
    spec: &LayerSpec,
    args: &Args,
    inputs: &[Shape],
) -> Result<Vec<(Op, Shape)>, LayerError> {
    let x = &inputs[0];
    let one = |op: Op, shape: Shape| Ok(vec![(op, shape)]);
    match spec.name {
        "dense" => {
            let units = positive(args, "units")?;
            let [features] = x.0[..] else {
                return Err(LayerError::WrongRank {
                    expected: "a feature vector [F]",
                    found: x.clone(),
                });
            };
            let op = Op::Dense {
                in_features: features,
                units,
                bias: args.word("bias") != "false",
            };
            one(op, Shape(vec![units]))
        }
        "conv" => {
            let filters = positive(args, "filters")?;
            let (conv, shape) = conv2d(args, x, filters, 1)?;
            one(Op::Conv(conv), shape)
        }
        "depthwise_conv" => {
            let channels = image(x)?.0;
            let filters = channels * positive(args, "multiplier")?;
            let (conv, shape) = conv2d(args, x, filters, channels)?;
            one(Op::Conv(conv), shape)
        }
        "separable_conv" => {
            let channels = image(x)?.0;
            let filters = positive(args, "filters")?;
            let depth = channels * positive(args, "multiplier")?;
            let (mut depthwise, mid) = conv2d(args, x, depth, channels)?;
            depthwise.bias = false;
            let pointwise = Conv2d {
                in_channels: depth,
                filters,
                kernel: 1,
                stride: 1,
                dilation: 1,
                groups: 1,
                padding: Padding::default(),
                bias: args.word("bias") != "false",
            };
            let out = Shape(vec![filters, mid.0[1], mid.0[2]]);
            Ok(vec![(Op::Conv(depthwise), mid), (Op::Conv(pointwise), out)])
        }
        "batchnorm" => {
            if x.rank() != 1 && x.rank() != 3 {
                return Err(LayerError::WrongRank {
                    expected: "an image [C, H, W] or a feature vector [F]",
                    found: x.clone(),
                });
            }
            let momentum = args.float("momentum");
            if !(0.0..=1.0).contains(&momentum) {
                return Err(LayerError::Invalid {
                    param: "momentum",
                    message: format!("must be between 0 and 1, found {momentum}"),
                });
            }
            let eps = args.float("eps");
            if eps <= 0.0 {
                return Err(LayerError::Invalid {
                    param: "eps",
                    message: format!("must be positive, found {eps}"),
                });
            }
            let op = Op::BatchNorm {
                channels: x.0[0],
                momentum,
                eps,
            };
            one(op, x.clone())
        }
        "relu" => one(Op::Activation(Activation::Relu), x.clone()),
        "leaky_relu" => {
            let slope = args.float("slope");
            one(Op::Activation(Activation::LeakyRelu { slope }), x.clone())
        }
        "sigmoid" => one(Op::Activation(Activation::Sigmoid), x.clone()),
        "tanh" => one(Op::Activation(Activation::Tanh), x.clone()),
        "gelu" => {
            let tanh = args.word("approximate") == "tanh";
            one(Op::Activation(Activation::Gelu { tanh }), x.clone())
        }
        "softmax" => {
            if x.rank() != 1 {
                return Err(LayerError::WrongRank {
                    expected: "a feature vector [F]",
                    found: x.clone(),
                });
            }
            one(Op::Softmax, x.clone())
        }
        "maxpool" | "avgpool" => {
            let kind = if spec.name == "maxpool" {
                PoolKind::Max
            } else {
                PoolKind::Avg
            };
            let (pool, shape) = pool2d(args, x, kind)?;
            one(Op::Pool(pool), shape)
        }
        "global_avgpool" => {
            let (channels, _, _) = image(x)?;
            one(Op::GlobalAvgPool, Shape(vec![channels]))
        }
        "flatten" => one(Op::Flatten, Shape(vec![x.numel()])),
        "dropout" => {
            let rate = args.float("rate");
            if !(0.0..1.0).contains(&rate) {
                return Err(LayerError::Invalid {
                    param: "rate",
                    message: format!("must be at least 0 and below 1, found {rate}"),
                });
            }
            one(Op::Dropout { rate }, x.clone())
        }
        "add" => {
            if inputs[0] != inputs[1] {
                return Err(LayerError::AddMismatch {
                    left: inputs[0].clone(),
                    right: inputs[1].clone(),
                });
            }
            one(Op::Add, x.clone())
        }
        "concat" => concat(inputs),
        other => unreachable!("layer table lists `{other}` without a shape rule"),
    }
}

/// The largest size setting accepted (filters, units, kernel, stride, ...).
/// It keeps every parameter and MAC count far from overflow; real layers are
/// orders of magnitude smaller.
pub const MAX_SIZE_SETTING: i64 = 1 << 20;

fn positive(args: &Args, name: &'static str) -> Result<usize, LayerError> {
    let value = args.int(name);
    if value <= 0 {
        return Err(LayerError::NotPositive { param: name, value });
    }
    if value > MAX_SIZE_SETTING {
        return Err(LayerError::Invalid {
            param: name,
            message: format!("{value} is larger than the maximum {MAX_SIZE_SETTING}"),
        });
    }
    Ok(value as usize)
}

fn image(x: &Shape) -> Result<(usize, usize, usize), LayerError> {
    match x.0[..] {
        [c, h, w] => Ok((c, h, w)),
        _ => Err(LayerError::WrongRank {
            expected: "an image [C, H, W]",
            found: x.clone(),
        }),
    }
}

/// Output size and padding of one spatial axis. `same` padding follows
/// TensorFlow: the output is `ceil(n / stride)` and the odd pixel of padding
/// goes after (bottom or right).
fn window_axis(n: usize, window: usize, stride: usize, same: bool) -> (usize, usize, usize) {
    if same {
        let out = n.div_ceil(stride);
        let total = ((out.saturating_sub(1)) * stride + window).saturating_sub(n);
        (out, total / 2, total - total / 2)
    } else if n < window {
        (0, 0, 0)
    } else {
        ((n - window) / stride + 1, 0, 0)
    }
}

fn conv2d(
    args: &Args,
    x: &Shape,
    filters: usize,
    groups: usize,
) -> Result<(Conv2d, Shape), LayerError> {
    let (channels, h, w) = image(x)?;
    let kernel = positive(args, "kernel")?;
    let stride = positive(args, "stride")?;
    let dilation = positive(args, "dilation")?;
    let same = args.word("padding") == "same";
    let effective = dilation.saturating_mul(kernel - 1).saturating_add(1);
    let (oh, top, bottom) = window_axis(h, effective, stride, same);
    let (ow, left, right) = window_axis(w, effective, stride, same);
    if oh == 0 || ow == 0 {
        return Err(LayerError::KernelTooLarge {
            kernel,
            dilation,
            input: x.clone(),
        });
    }
    let conv = Conv2d {
        in_channels: channels,
        filters,
        kernel,
        stride,
        dilation,
        groups,
        padding: Padding {
            top,
            bottom,
            left,
            right,
        },
        bias: args.word("bias") != "false",
    };
    Ok((conv, Shape(vec![filters, oh, ow])))
}

fn pool2d(args: &Args, x: &Shape, kind: PoolKind) -> Result<(Pool2d, Shape), LayerError> {
    let (channels, h, w) = image(x)?;
    let size = positive(args, "size")?;
    let stride = positive(args, "stride")?;
    let same = args.word("padding") == "same";
    let (oh, top, bottom) = window_axis(h, size, stride, same);
    let (ow, left, right) = window_axis(w, size, stride, same);
    if oh == 0 || ow == 0 {
        return Err(LayerError::PoolToZero {
            size,
            input: x.clone(),
            output: (oh, ow),
        });
    }
    let pool = Pool2d {
        kind,
        size,
        stride,
        padding: Padding {
            top,
            bottom,
            left,
            right,
        },
    };
    Ok((pool, Shape(vec![channels, oh, ow])))
}

fn concat(inputs: &[Shape]) -> Result<Vec<(Op, Shape)>, LayerError> {
    let first = &inputs[0];
    let mismatch = inputs
        .iter()
        .position(|s| s.rank() != first.rank() || s.rank() == 0 || s.0[1..] != first.0[1..]);
    if let Some(index) = mismatch {
        return Err(LayerError::ConcatMismatch {
            index,
            shapes: inputs.to_vec(),
        });
    }
    let mut shape = first.clone();
    shape.0[0] = inputs.iter().map(|s| s.0[0]).sum();
    Ok(vec![(Op::Concat, shape)])
}

/// Whether a layer with these settings has a bias left to `auto`.
pub fn has_auto_bias(args: &Args) -> bool {
    args.word("bias") == "auto"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // 28 pixels, 3x3 kernel, stride 2: output 14, padding 0 before and 1 after.
        assert_eq!(window_axis(28, 3, 2, true), (14, 0, 1));
        // Stride 1 keeps the size and pads evenly for odd kernels.
        assert_eq!(window_axis(28, 3, 1, true), (28, 1, 1));
        // Even kernels pad more after than before.
        assert_eq!(window_axis(8, 4, 1, true), (8, 1, 2));
    }

    #[test]
    fn valid_window_larger_than_input_gives_zero() {
        assert_eq!(window_axis(2, 3, 1, false).0, 0);
        assert_eq!(window_axis(5, 3, 2, false).0, 2);
    }
}
