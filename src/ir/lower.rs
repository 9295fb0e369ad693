//! Lowering: from a checked graph (layers with shapes) to the IR (operators
//! on batched tensors with explicit parameters and state).

use super::{Act, ConvAttrs, Graph, Init, Op, ParamInfo, PoolAttrs, PoolKind, StateInfo, ValueId};
use crate::check::graph::{self as checked, Activation, NodeId};
use crate::check::train::Loss;
use std::collections::HashMap;

/// What the lowered graph computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Batch statistics, dropout, the loss, and running-statistic updates.
    Train { loss: Loss },
    /// Running statistics, no dropout, and the loss.
    Eval { loss: Loss },
    /// Running statistics, no dropout, logits only.
    Infer,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LowerError {
    #[error("lowering: the model has no output")]
    NoOutput,
    #[error("lowering: models with {0} inputs are not supported; declare exactly one `input`")]
    Inputs(usize),
    #[error("lowering: the batch size must be positive")]
    EmptyBatch,
    #[error("lowering: the loss needs logits of shape [classes], found {0:?}")]
    LossShape(Vec<usize>),
}

/// Parameters of one layer instance, reused by the later uses of a shared
/// layer.
#[derive(Clone, Copy, Default)]
struct LayerParams {
    weight: Option<ValueId>,
    bias: Option<ValueId>,
}

struct Lowering<'a> {
    source: &'a checked::Graph,
    ir: Graph,
    mode: Mode,
    values: HashMap<NodeId, ValueId>,
    layer_params: HashMap<NodeId, LayerParams>,
    /// Running mean and variance of each batch normalization, by owner: the
    /// state indices and the latest value of each (a shared batch
    /// normalization updates its statistics once per use, in order).
    running: HashMap<NodeId, [(usize, ValueId); 2]>,
}

/// Lowers `graph` for batches of `batch` samples.
///
/// # Errors
/// When the model has no output or not exactly one input, or when the loss
/// does not fit the output.
pub fn lower(graph: &checked::Graph, batch: usize, mode: Mode) -> Result<Graph, LowerError> {
    if batch == 0 {
        return Err(LowerError::EmptyBatch);
    }
    if graph.inputs.len() != 1 {
        return Err(LowerError::Inputs(graph.inputs.len()));
    }
    let output = graph.output.ok_or(LowerError::NoOutput)?;
    let mut lowering = Lowering {
        source: graph,
        ir: Graph {
            batch,
            ..Graph::default()
        },
        mode,
        values: HashMap::new(),
        layer_params: HashMap::new(),
        running: HashMap::new(),
    };
    let live = graph.live();
    for (i, node) in graph.nodes.iter().enumerate() {
        // Layers that do not reach the output are neither computed nor trained.
        if live[i] {
            let id = NodeId(i as u32);
            let value = lowering.node(id, node);
            lowering.values.insert(id, value);
        }
    }
    lowering.finish(output)?;
    Ok(lowering.ir)
}

fn batched(batch: usize, shape: &checked::Shape) -> Vec<usize> {
    let mut out = vec![batch];
    out.extend(&shape.0);
    out
}

impl Lowering<'_> {
    fn training(&self) -> bool {
        matches!(self.mode, Mode::Train { .. })
    }

    fn input(&self, node: &checked::Node, i: usize) -> ValueId {
        self.values[&node.inputs[i]]
    }

    fn param(&mut self, name: String, shape: Vec<usize>, init: Init) -> ValueId {
        let index = self.ir.params.len();
        self.ir.params.push(ParamInfo {
            name: name.clone(),
            shape: shape.clone(),
            init,
        });
        self.ir.add_with_shape(Op::Param(index), &[], shape, name)
    }

    fn state(&mut self, name: String, shape: Vec<usize>, init: Init) -> (usize, ValueId) {
        let index = self.ir.states.len();
        self.ir.states.push(StateInfo {
            name: name.clone(),
            shape: shape.clone(),
            init,
        });
        (
            index,
            self.ir.add_with_shape(Op::State(index), &[], shape, name),
        )
    }

    /// The weight and bias of a dense or convolution node, created on first
    /// use and shared by later uses of a shared layer.
    fn layer_params(
        &mut self,
        id: NodeId,
        node: &checked::Node,
        weight: (Vec<usize>, Init),
        bias: Option<usize>,
    ) -> LayerParams {
        let owner = node.shares_weights_of.unwrap_or(id);
        if let Some(existing) = self.layer_params.get(&owner) {
            return *existing;
        }
        let name = &self.source.node(owner).name;
        let params = LayerParams {
            weight: Some(self.param(format!("{name}.weight"), weight.0, weight.1)),
            bias: bias.map(|n| self.param(format!("{name}.bias"), vec![n], Init::Zeros)),
        };
        self.layer_params.insert(owner, params);
        params
    }

    fn node(&mut self, id: NodeId, node: &checked::Node) -> ValueId {
        let batch = self.ir.batch;
        let name = node.name.clone();
        match &node.op {
            checked::Op::Input => {
                let shape = batched(batch, &node.shape);
                self.ir.add_with_shape(Op::Input, &[], shape, name)
            }
            checked::Op::Dense {
                in_features,
                units,
                bias,
            } => {
                // Glorot-uniform, as Keras initialises dense kernels.
                let bound = (6.0 / (in_features + units) as f32).sqrt();
                let weight = (vec![*units, *in_features], Init::Uniform { bound });
                let p = self.layer_params(id, node, weight, bias.then_some(*units));
                let x = self.input(node, 0);
                let mut inputs = vec![x, p.weight.expect("dense has a weight")];
                inputs.extend(p.bias);
                self.ir.add(Op::Dense, &inputs, name)
            }
            checked::Op::Conv(c) => {
                // Kaiming-uniform for ReLU networks: bound = sqrt(6 / fan_in).
                let fan_in = c.in_channels / c.groups * c.kernel * c.kernel;
                let bound = (6.0 / fan_in as f32).sqrt();
                let shape = vec![c.filters, c.in_channels / c.groups, c.kernel, c.kernel];
                let p = self.layer_params(
                    id,
                    node,
                    (shape, Init::Uniform { bound }),
                    c.bias.then_some(c.filters),
                );
                let attrs = ConvAttrs {
                    kernel: c.kernel,
                    stride: c.stride,
                    dilation: c.dilation,
                    groups: c.groups,
                    pad: [
                        c.padding.top,
                        c.padding.bottom,
                        c.padding.left,
                        c.padding.right,
                    ],
                };
                let mut inputs = vec![self.input(node, 0), p.weight.expect("conv has a weight")];
                inputs.extend(p.bias);
                self.ir.add(Op::Conv2d(attrs), &inputs, name)
            }
            checked::Op::BatchNorm {
                channels,
                momentum,
                eps,
            } => self.batchnorm(id, node, *channels, *momentum as f32, *eps as f32),
            checked::Op::Activation(a) => {
                let act = match *a {
                    Activation::Relu => Act::Relu,
                    Activation::LeakyRelu { slope } => Act::LeakyRelu(slope as f32),
                    Activation::Sigmoid => Act::Sigmoid,
                    Activation::Tanh => Act::Tanh,
                    Activation::Gelu { tanh } => Act::Gelu { tanh },
                };
                let x = self.input(node, 0);
                self.ir.add(Op::Act(act), &[x], name)
            }
            checked::Op::Softmax => {
                let x = self.input(node, 0);
                self.ir.add(Op::Softmax, &[x], name)
            }
            checked::Op::Pool(p) => {
                let attrs = PoolAttrs {
                    kind: match p.kind {
                        checked::PoolKind::Max => PoolKind::Max,
                        checked::PoolKind::Avg => PoolKind::Avg,
                    },
                    size: p.size,
                    stride: p.stride,
                    pad: [
                        p.padding.top,
                        p.padding.bottom,
                        p.padding.left,
                        p.padding.right,
                    ],
                };
                let x = self.input(node, 0);
                self.ir.add(Op::Pool(attrs), &[x], name)
            }
            checked::Op::GlobalAvgPool => {
                let x = self.input(node, 0);
                self.ir.add(Op::GlobalAvgPool, &[x], name)
            }
            checked::Op::Flatten => {
                let x = self.input(node, 0);
                let shape = batched(batch, &node.shape);
                self.ir.add_with_shape(Op::Reshape, &[x], shape, name)
            }
            checked::Op::Dropout { rate } => {
                let x = self.input(node, 0);
                if !self.training() || *rate == 0.0 {
                    return x;
                }
                let mask_op = Op::DropoutMask {
                    rate: *rate as f32,
                    stream: id.0,
                };
                let shape = self.ir.shape(x).to_vec();
                let mask = self
                    .ir
                    .add_with_shape(mask_op, &[], shape, format!("{name}.mask"));
                self.ir.add(Op::Mul, &[x, mask], name)
            }
            checked::Op::Add => {
                let (a, b) = (self.input(node, 0), self.input(node, 1));
                self.ir.add(Op::Add, &[a, b], name)
            }
            checked::Op::Concat => {
                let inputs: Vec<ValueId> = (0..node.inputs.len())
                    .map(|i| self.input(node, i))
                    .collect();
                self.ir.add(Op::Concat, &inputs, name)
            }
        }
    }

    fn batchnorm(
        &mut self,
        id: NodeId,
        node: &checked::Node,
        channels: usize,
        momentum: f32,
        eps: f32,
    ) -> ValueId {
        let name = node.name.clone();
        let x = self.input(node, 0);
        let owner = node.shares_weights_of.unwrap_or(id);
        let p = match self.layer_params.get(&owner) {
            Some(p) => *p,
            None => {
                let owner_name = self.source.node(owner).name.clone();
                let p = LayerParams {
                    weight: Some(self.param(
                        format!("{owner_name}.weight"),
                        vec![channels],
                        Init::Ones,
                    )),
                    bias: Some(self.param(
                        format!("{owner_name}.bias"),
                        vec![channels],
                        Init::Zeros,
                    )),
                };
                self.layer_params.insert(owner, p);
                p
            }
        };
        let (gamma, beta) = (p.weight.expect("gamma"), p.bias.expect("beta"));
        let (mean_index, running_mean) =
            self.state(format!("{name}.running_mean"), vec![channels], Init::Zeros);
        let (var_index, running_var) =
            self.state(format!("{name}.running_var"), vec![channels], Init::Ones);
        if !self.training() {
            return self.ir.add(
                Op::BatchNorm { eps },
                &[x, running_mean, running_var, gamma, beta],
                name,
            );
        }
        let mean = self.ir.add(Op::BatchMean, &[x], format!("{name}.mean"));
        let var = self.ir.add(Op::BatchVar, &[x, mean], format!("{name}.var"));
        let y = self.ir.add(
            Op::BatchNorm { eps },
            &[x, mean, var, gamma, beta],
            name.clone(),
        );

        // PyTorch keeps the unbiased variance in the running average.
        let count = self.ir.shape(x).iter().product::<usize>() / channels;
        let correction = if count > 1 {
            count as f32 / (count - 1) as f32
        } else {
            1.0
        };
        let new_mean = self.ir.add(
            Op::RunningUpdate {
                momentum,
                correction: 1.0,
            },
            &[running_mean, mean],
            format!("{name}.running_mean/update"),
        );
        let new_var = self.ir.add(
            Op::RunningUpdate {
                momentum,
                correction,
            },
            &[running_var, var],
            format!("{name}.running_var/update"),
        );
        self.running
            .insert(owner, [(mean_index, new_mean), (var_index, new_var)]);
        self.ir
            .state_updates
            .retain(|(s, _)| *s != mean_index && *s != var_index);
        self.ir.state_updates.push((mean_index, new_mean));
        self.ir.state_updates.push((var_index, new_var));
        y
    }

    fn finish(&mut self, output: NodeId) -> Result<(), LowerError> {
        let logits = self.values[&output];
        self.ir.logits = Some(logits);
        let loss = match &self.mode {
            Mode::Train { loss } | Mode::Eval { loss } => loss.clone(),
            Mode::Infer => return Ok(()),
        };
        let shape = self.ir.shape(logits).to_vec();
        if shape.len() != 2 {
            return Err(LowerError::LossShape(shape[1..].to_vec()));
        }
        let batch = self.ir.batch;
        let labels = self
            .ir
            .add_with_shape(Op::Labels, &[], vec![batch], "labels");
        let value = match loss {
            Loss::CrossEntropy { label_smoothing } => {
                // A final softmax is folded into the loss, which takes logits.
                let node = self.ir.node(logits);
                let pre_softmax = match node.op {
                    Op::Softmax => node.inputs[0],
                    _ => logits,
                };
                self.ir.add(
                    Op::SoftmaxCrossEntropy {
                        smoothing: label_smoothing as f32,
                    },
                    &[pre_softmax, labels],
                    "loss",
                )
            }
            Loss::Mse => self.ir.add(Op::MeanSquaredError, &[logits, labels], "loss"),
        };
        self.ir.loss = Some(value);
        Ok(())
    }
}
