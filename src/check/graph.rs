//! The checked graph: every layer instance of a model at one point of its
//! search space, with concrete settings and inferred shapes.
//!
//! Shapes leave out the batch axis: `[C, H, W]` for images (channels first)
//! and `[F]` for feature vectors.

use crate::diag::Span;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A tensor shape without the batch axis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    /// Elements per sample, saturating at `usize::MAX` for absurd shapes.
    pub fn numel(&self) -> usize {
        self.0.iter().fold(1usize, |n, d| n.saturating_mul(*d))
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// Padding in pixels on each side of the two spatial axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// A 2-D convolution. Depthwise convolution is `groups == in_channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub in_channels: usize,
    pub filters: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
    pub padding: Padding,
    pub bias: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Max,
    /// Averages over the window cells inside the input, so padding does not
    /// pull the average towards zero (Keras' behaviour).
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool2d {
    pub kind: PoolKind,
    pub size: usize,
    pub stride: usize,
    pub padding: Padding,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu {
        slope: f64,
    },
    Sigmoid,
    Tanh,
    /// GELU, exact (erf) or with the tanh approximation.
    Gelu {
        tanh: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Input,
    Dense {
        in_features: usize,
        units: usize,
        bias: bool,
    },
    Conv(Conv2d),
    BatchNorm {
        channels: usize,
        /// Weight of the batch statistic in the running average
        /// (PyTorch's convention: `running = (1 - m) * running + m * batch`).
        momentum: f64,
        eps: f64,
    },
    Activation(Activation),
    /// Softmax over the features of a `[F]` value.
    Softmax,
    Pool(Pool2d),
    GlobalAvgPool,
    Flatten,
    Dropout {
        rate: f64,
    },
    Add,
    /// Concatenation along the channel (or feature) axis.
    Concat,
}

impl Op {
    /// Returns the operator's name as the summary shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Dense { .. } => "dense",
            Op::Conv(c) if c.groups > 1 && c.groups == c.in_channels => "depthwise_conv",
            Op::Conv(_) => "conv",
            Op::BatchNorm { .. } => "batchnorm",
            Op::Activation(Activation::Relu) => "relu",
            Op::Activation(Activation::LeakyRelu { .. }) => "leaky_relu",
            Op::Activation(Activation::Sigmoid) => "sigmoid",
            Op::Activation(Activation::Tanh) => "tanh",
            Op::Activation(Activation::Gelu { .. }) => "gelu",
            Op::Softmax => "softmax",
            Op::Pool(Pool2d {
                kind: PoolKind::Max,
                ..
            }) => "maxpool",
            Op::Pool(_) => "avgpool",
            Op::GlobalAvgPool => "global_avgpool",
            Op::Flatten => "flatten",
            Op::Dropout { .. } => "dropout",
            Op::Add => "add",
            Op::Concat => "concat",
        }
    }

    /// Trainable parameters of one instance.
    pub fn params(&self) -> usize {
        match *self {
            Op::Dense {
                in_features,
                units,
                bias,
            } => in_features
                .saturating_mul(units)
                .saturating_add(if bias { units } else { 0 }),
            Op::Conv(c) => c
                .kernel
                .saturating_mul(c.kernel)
                .saturating_mul(c.in_channels / c.groups)
                .saturating_mul(c.filters)
                .saturating_add(if c.bias { c.filters } else { 0 }),
            Op::BatchNorm { channels, .. } => channels.saturating_mul(2),
            _ => 0,
        }
    }

    /// Non-trainable state: batch normalization's running mean and variance.
    pub fn state(&self) -> usize {
        match *self {
            Op::BatchNorm { channels, .. } => channels.saturating_mul(2),
            _ => 0,
        }
    }

    /// Multiply-accumulates per sample for an output of `shape`; zero for
    /// layers without multiplications by weights.
    pub fn macs(&self, shape: &Shape) -> u64 {
        match *self {
            Op::Dense {
                in_features, units, ..
            } => in_features.saturating_mul(units) as u64,
            Op::Conv(c) => {
                let per_output = c
                    .kernel
                    .saturating_mul(c.kernel)
                    .saturating_mul(c.in_channels / c.groups);
                shape.numel().saturating_mul(per_output) as u64
            }
            _ => 0,
        }
    }
}

/// One layer instance in the graph.
#[derive(Debug, Clone)]
pub struct Node {
    /// A path that names where the layer came from, such as `stage1/h.conv`.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
    /// The call (or `+`) in the source that created this node.
    pub span: Span,
    /// For the second and later uses of a shared layer, the node whose
    /// weights this one uses.
    pub shares_weights_of: Option<NodeId>,
    /// Whether the bias was left to `auto` (decided after the graph is built).
    pub(crate) auto_bias: bool,
}

impl Node {
    /// Trainable parameters this node owns; shared uses own none.
    pub fn params(&self) -> usize {
        if self.shares_weights_of.is_some() {
            0
        } else {
            self.op.params()
        }
    }

    pub fn macs(&self) -> u64 {
        self.op.macs(&self.shape)
    }
}

/// A model's dataflow graph, in topological order (inputs before users).
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// The input nodes, with the names the model declares.
    pub inputs: Vec<(String, NodeId)>,
    pub output: Option<NodeId>,
}

impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn push(&mut self, node: Node) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(node);
        id
    }

    pub fn params(&self) -> usize {
        self.nodes
            .iter()
            .fold(0usize, |n, node| n.saturating_add(node.params()))
    }

    /// Non-trainable parameters (running statistics).
    pub fn state(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.shares_weights_of.is_none())
            .fold(0usize, |n, node| n.saturating_add(node.op.state()))
    }

    pub fn macs(&self) -> u64 {
        self.nodes
            .iter()
            .fold(0u64, |n, node| n.saturating_add(node.macs()))
    }

    /// Floats of activations per sample: the outputs of every node.
    pub fn activation_floats(&self) -> usize {
        self.nodes
            .iter()
            .fold(0usize, |n, node| n.saturating_add(node.shape.numel()))
    }

    /// Nodes from which the output can be reached.
    pub fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = self.output.into_iter().collect();
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut live[id.index()], true) {
                continue;
            }
            stack.extend(self.node(id).inputs.iter().copied());
        }
        live
    }

    /// Removes nodes that do not reach the output (inputs stay), renumbering
    /// the rest. A shared layer whose first use is removed passes its
    /// weights to its first remaining use.
    pub fn prune(&mut self) {
        let mut keep = self.live();
        for (_, input) in &self.inputs {
            keep[input.index()] = true;
        }
        let mut new_id = vec![None; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            if keep[i] {
                new_id[i] = Some(NodeId(nodes.len() as u32));
                nodes.push(node);
            }
        }
        let mut new_owner: std::collections::HashMap<NodeId, NodeId> = Default::default();
        for (i, node) in nodes.iter_mut().enumerate() {
            node.inputs = node
                .inputs
                .iter()
                .filter_map(|n| new_id[n.index()])
                .collect();
            if let Some(owner) = node.shares_weights_of {
                node.shares_weights_of = match new_id[owner.index()] {
                    Some(owner) => Some(owner),
                    None => match new_owner.get(&owner) {
                        Some(heir) => Some(*heir),
                        None => {
                            new_owner.insert(owner, NodeId(i as u32));
                            None
                        }
                    },
                };
            }
        }
        self.nodes = nodes;
        self.output = self.output.and_then(|o| new_id[o.index()]);
        for (_, input) in &mut self.inputs {
            *input = new_id[input.index()].expect("inputs are kept");
        }
    }

    /// Counts how many nodes read each node's output.
    pub fn consumer_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.nodes.len()];
        for node in &self.nodes {
            for input in &node.inputs {
                counts[input.index()] += 1;
            }
        }
        counts
    }
}
