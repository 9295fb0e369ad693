//! The graph IR: a typed dataflow graph with static shapes, lowered from a
//! checked model at one point of its search space.
//!
//! Unlike the checked graph, the IR is explicit about everything an executor
//! needs: the batch axis is part of every shape, weights are `Param` nodes,
//! batch normalization's running statistics are `State` nodes, and training
//! adds the loss and (after [`crate::autodiff`]) the backward operators. Each
//! node has exactly one output; operators that compute two things are split
//! into two nodes (batch mean and batch variance, for example).
//!
//! The reference executor ([`crate::interp`]) defines what every operator
//! computes.

mod display;
pub mod lower;
mod shape;

pub use lower::{lower, LowerError, Mode};

use std::fmt;

/// A value in the graph; values and nodes are numbered alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Explicit padding of a 2-D window operator: top, bottom, left, right.
pub type Pad = [usize; 4];

/// Attributes of a 2-D convolution over `[N, C, H, W]` tensors with weights
/// `[Cout, Cin / groups, K, K]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvAttrs {
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
    pub pad: Pad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Max,
    /// Average over the window cells inside the input (padding excluded).
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolAttrs {
    pub kind: PoolKind,
    pub size: usize,
    pub stride: usize,
    pub pad: Pad,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    /// GELU: exact with erf, or the tanh approximation.
    Gelu {
        tanh: bool,
    },
}

/// Initialiser of a parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in `[-bound, bound]`.
    Uniform {
        bound: f32,
    },
    Zeros,
    Ones,
}

/// IR operators. Shapes below use `N` for the batch size.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The data batch, `[N, ...]`.
    Input,
    /// Class labels as `f32` class indices, `[N]`.
    Labels,
    /// A trainable parameter (index into [`Graph::params`]).
    Param(usize),
    /// Non-trainable state such as a running mean (index into
    /// [`Graph::states`]).
    State(usize),

    /// `x [N, F] · wᵀ [F, U] (+ b [U])` → `[N, U]`.
    Dense,
    /// `x [N, C, H, W] ⋆ w (+ b [Cout])` → `[N, Cout, H', W']`.
    Conv2d(ConvAttrs),
    /// Per-channel mean over batch and space: `x` → `[C]`.
    BatchMean,
    /// Per-channel biased variance: `x, mean` → `[C]`.
    BatchVar,
    /// `(x - mean) / sqrt(var + eps) * gamma + beta`, per channel.
    BatchNorm {
        eps: f32,
    },
    /// `(1 - momentum) * running + momentum * stat * correction`, the new
    /// value of a running statistic. `correction` is `n / (n - 1)` for the
    /// variance, because PyTorch keeps an unbiased running variance, and 1
    /// for the mean.
    RunningUpdate {
        momentum: f32,
        correction: f32,
    },
    Act(Act),
    Pool(PoolAttrs),
    /// Mean over space: `[N, C, H, W]` → `[N, C]`.
    GlobalAvgPool,
    /// Same data, new shape.
    Reshape,
    /// A dropout mask of 0 and `1 / (1 - rate)`, drawn from a counter-based
    /// generator keyed by the step's seed and `stream`.
    DropoutMask {
        rate: f32,
        stream: u32,
    },
    Mul,
    Add,
    /// Concatenation along axis 1.
    Concat,
    /// `len` channels from `start` along axis 1 (the backward of concat).
    Slice {
        start: usize,
        len: usize,
    },
    /// Softmax over axis 1 of `[N, F]`.
    Softmax,
    /// Mean softmax cross-entropy of logits `[N, F]` and labels `[N]` → `[]`.
    SoftmaxCrossEntropy {
        smoothing: f32,
    },
    /// Mean squared error of `[N, F]` and one-hot labels, averaged over all
    /// elements → `[]`.
    MeanSquaredError,

    // ------------------------------------------------ backward operators
    /// `dy [N, U] · w [U, F]` → `[N, F]`.
    DenseGradInput,
    /// `dyᵀ [U, N] · x [N, F]` → `[U, F]`.
    DenseGradWeight,
    /// Sum of `dy` over every axis but 1 → `[C]`.
    BiasGrad,
    /// `dy, w` → `dx`; the input shape is the node's type.
    Conv2dGradInput(ConvAttrs),
    /// `dy, x` → `dw`; the weight shape is the node's type.
    Conv2dGradWeight(ConvAttrs),
    /// `dy, x, mean, var, gamma` → `dx` through the batch statistics.
    BatchNormGradInput {
        eps: f32,
    },
    /// `dy, x, mean, var` → `dgamma`.
    BatchNormGradGamma {
        eps: f32,
    },
    /// `dy, x` → `dx`.
    ActGrad(Act),
    /// `dy, x` → `dx`; max pooling routes to the first maximum of a window.
    PoolGrad(PoolAttrs),
    /// `dy [N, C]` → `[N, C, H, W]` spread evenly.
    GlobalAvgPoolGrad,
    /// `dy, y` → `dx` for `y = softmax(x)`.
    SoftmaxGrad,
    /// `logits, labels` → gradient of the mean loss.
    SoftmaxCrossEntropyGrad {
        smoothing: f32,
    },
    /// `prediction, labels` → gradient of the mean loss.
    MeanSquaredErrorGrad,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Labels => "labels",
            Op::Param(_) => "param",
            Op::State(_) => "state",
            Op::Dense => "dense",
            Op::Conv2d(_) => "conv2d",
            Op::BatchMean => "batch_mean",
            Op::BatchVar => "batch_var",
            Op::BatchNorm { .. } => "batchnorm",
            Op::RunningUpdate { .. } => "running_update",
            Op::Act(Act::Relu) => "relu",
            Op::Act(Act::LeakyRelu(_)) => "leaky_relu",
            Op::Act(Act::Sigmoid) => "sigmoid",
            Op::Act(Act::Tanh) => "tanh",
            Op::Act(Act::Gelu { .. }) => "gelu",
            Op::Pool(PoolAttrs {
                kind: PoolKind::Max,
                ..
            }) => "maxpool",
            Op::Pool(_) => "avgpool",
            Op::GlobalAvgPool => "global_avgpool",
            Op::Reshape => "reshape",
            Op::DropoutMask { .. } => "dropout_mask",
            Op::Mul => "mul",
            Op::Add => "add",
            Op::Concat => "concat",
            Op::Slice { .. } => "slice",
            Op::Softmax => "softmax",
            Op::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            Op::MeanSquaredError => "mean_squared_error",
            Op::DenseGradInput => "dense_grad_input",
            Op::DenseGradWeight => "dense_grad_weight",
            Op::BiasGrad => "bias_grad",
            Op::Conv2dGradInput(_) => "conv2d_grad_input",
            Op::Conv2dGradWeight(_) => "conv2d_grad_weight",
            Op::BatchNormGradInput { .. } => "batchnorm_grad_input",
            Op::BatchNormGradGamma { .. } => "batchnorm_grad_gamma",
            Op::ActGrad(_) => "act_grad",
            Op::PoolGrad(_) => "pool_grad",
            Op::GlobalAvgPoolGrad => "global_avgpool_grad",
            Op::SoftmaxGrad => "softmax_grad",
            Op::SoftmaxCrossEntropyGrad { .. } => "softmax_cross_entropy_grad",
            Op::MeanSquaredErrorGrad => "mean_squared_error_grad",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub shape: Vec<usize>,
    /// Origin of the node, such as `x.conv` or `x.conv/grad`.
    pub name: String,
}

/// A trainable parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// `<layer>.<tensor>`, such as `x.conv.weight`; also the checkpoint key.
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Non-trainable state, updated by the training step.
#[derive(Debug, Clone, PartialEq)]
pub struct StateInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub params: Vec<ParamInfo>,
    pub states: Vec<StateInfo>,
    pub batch: usize,
    /// The model's output (logits), `[N, classes]`.
    pub logits: Option<ValueId>,
    /// The scalar loss, in training graphs.
    pub loss: Option<ValueId>,
    /// New values of states after a training step.
    pub state_updates: Vec<(usize, ValueId)>,
    /// Gradient of the loss for each parameter, after differentiation.
    pub grads: Vec<(usize, ValueId)>,
}

impl Graph {
    pub fn node(&self, id: ValueId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn shape(&self, id: ValueId) -> &[usize] {
        &self.nodes[id.index()].shape
    }

    /// Appends a node, inferring its shape from the operator and inputs.
    ///
    /// # Panics
    /// When the shapes of the inputs do not fit the operator: lowering and
    /// differentiation create only well-typed nodes, so this is a bug in kiln.
    pub fn add(&mut self, op: Op, inputs: &[ValueId], name: impl Into<String>) -> ValueId {
        let input_shapes: Vec<&[usize]> = inputs.iter().map(|i| self.shape(*i)).collect();
        let shape = shape::infer(&op, &input_shapes);
        self.add_with_shape(op, inputs, shape, name)
    }

    /// Appends a node whose shape is given, for sources and for gradient
    /// operators whose output shape the inputs do not determine.
    pub fn add_with_shape(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        shape: Vec<usize>,
        name: impl Into<String>,
    ) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            shape,
            name: name.into(),
        });
        id
    }

    /// Returns the `Param` node of each parameter, by parameter index.
    pub fn param_nodes(&self) -> Vec<Option<ValueId>> {
        let mut nodes = vec![None; self.params.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if let Op::Param(p) = node.op {
                nodes[p] = Some(ValueId(i as u32));
            }
        }
        nodes
    }
}
