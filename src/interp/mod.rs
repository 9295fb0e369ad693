//! The reference executor: runs an IR graph node by node with the
//! operators of [`ops`], and applies optimizer updates with [`optim`].
//!
//! It is the oracle that the JIT is tested against, so it favours plain,
//! checkable code over speed.

pub mod ops;
pub mod optim;

use crate::ir::{Graph, Init, Node, Op, ValueId};
use crate::rng;
use ndarray::IxDyn;
pub use ops::Tensor;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InterpError {
    #[error("input batch has shape {found:?}, but the graph expects {expected:?}")]
    InputShape {
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("the graph computes a loss, but no labels were given")]
    MissingLabels,
    #[error("{found} labels were given for a batch of {expected}")]
    LabelCount { expected: usize, found: usize },
    #[error("label {label} in row {row} is outside the {classes} classes")]
    LabelOutOfRange {
        label: usize,
        row: usize,
        classes: usize,
    },
    #[error("{what} {name:?} has shape {found:?}, but the graph expects {expected:?}")]
    WeightShape {
        what: &'static str,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

/// The trainable parameters and the state of a model, in graph order.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub params: Vec<Tensor>,
    pub states: Vec<Tensor>,
}

fn initial(shape: &[usize], init: Init, seed: u64, stream: u64) -> Tensor {
    let len: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        Init::Zeros => vec![0.0; len],
        Init::Ones => vec![1.0; len],
        Init::Uniform { bound } => (0..len as u64)
            .map(|i| (2.0 * rng::uniform(seed, stream, i) - 1.0) * bound)
            .collect(),
    };
    Tensor::from_shape_vec(IxDyn(shape), values).expect("shape")
}

impl Weights {
    /// Initial weights drawn from `seed`: the same for the same graph and
    /// seed, whatever the thread count.
    pub fn init(graph: &Graph, seed: u64) -> Weights {
        let params = graph
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| initial(&p.shape, p.init, seed, i as u64))
            .collect();
        let states = graph
            .states
            .iter()
            .map(|s| initial(&s.shape, s.init, seed, u64::MAX))
            .collect();
        Weights { params, states }
    }

    /// Checks that every tensor has the shape the graph expects.
    ///
    /// # Errors
    /// Names the first tensor whose shape differs.
    pub fn validate(&self, graph: &Graph) -> Result<(), InterpError> {
        let params = graph
            .params
            .iter()
            .map(|p| ("parameter", &p.name, &p.shape));
        let states = graph.states.iter().map(|s| ("state", &s.name, &s.shape));
        let tensors = self.params.iter().chain(&self.states);
        for ((what, name, shape), tensor) in params.chain(states).zip(tensors) {
            if tensor.shape() != shape.as_slice() {
                return Err(InterpError::WeightShape {
                    what,
                    name: name.clone(),
                    expected: shape.clone(),
                    found: tensor.shape().to_vec(),
                });
            }
        }
        Ok(())
    }
}

/// One batch of data: inputs `[N, ...]` and, for graphs with a loss, one
/// class index per row.
pub struct Batch<'a> {
    pub input: &'a Tensor,
    pub labels: Option<&'a [usize]>,
}

/// The value of every node after a run; the loss is a 0-dimensional tensor.
pub struct Values(pub Vec<Tensor>);

impl Values {
    pub fn get(&self, id: ValueId) -> &Tensor {
        &self.0[id.index()]
    }
}

/// Runs every node of `graph` on one batch. `seed` keys the dropout masks of
/// this step.
///
/// # Errors
/// When the input or labels do not fit the graph.
pub fn run(
    graph: &Graph,
    weights: &Weights,
    batch: &Batch,
    seed: u64,
) -> Result<Values, InterpError> {
    let labels = labels_of(graph, batch)?;
    let mut values: Vec<Tensor> = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let shape = node.shape.as_slice();
        let value = match &node.op {
            Op::Input => {
                if batch.input.shape() != shape {
                    return Err(InterpError::InputShape {
                        expected: shape.to_vec(),
                        found: batch.input.shape().to_vec(),
                    });
                }
                batch.input.clone()
            }
            Op::Labels => ops::vector(labels.iter().map(|&l| l as f32).collect()),
            Op::Param(i) => weights.params[*i].clone(),
            Op::State(i) => weights.states[*i].clone(),
            _ => {
                let inputs: Vec<&Tensor> = node.inputs.iter().map(|i| &values[i.index()]).collect();
                eval(node, &inputs, &labels, seed)
            }
        };
        debug_assert_eq!(value.shape(), shape, "{} produced a wrong shape", node.name);
        // Operators read their inputs as row-major buffers; `concatenate`
        // and broadcasting arithmetic may return other layouts.
        let value = if value.is_standard_layout() {
            value
        } else {
            value.as_standard_layout().into_owned()
        };
        values.push(value);
    }
    Ok(Values(values))
}

/// Computes one non-source node from the values of its inputs. `labels`
/// feed the loss operators and `seed` keys dropout masks.
///
/// # Panics
/// On source operators (input, labels, parameters and states), which
/// [`run`] supplies itself.
pub fn eval(node: &Node, inputs: &[&Tensor], labels: &[usize], seed: u64) -> Tensor {
    let input = |i: usize| inputs[i];
    let shape = node.shape.as_slice();
    match &node.op {
        Op::Input | Op::Labels | Op::Param(_) | Op::State(_) => {
            unreachable!("{} is a source", node.op.name())
        }
        Op::Dense => ops::dense(input(0), input(1), node.inputs.get(2).map(|_| input(2))),
        Op::Conv2d(a) => ops::conv2d(
            input(0),
            input(1),
            node.inputs.get(2).map(|_| input(2)),
            a,
            shape,
        ),
        Op::BatchMean => ops::batch_mean(input(0)),
        Op::BatchVar => ops::batch_var(input(0), input(1)),
        Op::BatchNorm { eps } => {
            ops::batchnorm(input(0), input(1), input(2), input(3), input(4), *eps)
        }
        Op::RunningUpdate {
            momentum,
            correction,
        } => ops::running_update(input(0), input(1), *momentum, *correction),
        Op::Act(a) => ops::act(input(0), *a),
        Op::Pool(a) => ops::pool(input(0), a, shape),
        Op::GlobalAvgPool => ops::global_avgpool(input(0)),
        Op::Reshape => ops::reshape(input(0), shape),
        Op::DropoutMask { rate, stream } => ops::dropout_mask(shape, *rate, seed, *stream),
        Op::Mul => input(0) * input(1),
        Op::Add => input(0) + input(1),
        Op::Concat => ops::concat(inputs),
        Op::Slice { start, len } => ops::slice(input(0), *start, *len),
        Op::Softmax => ops::softmax(input(0)),
        Op::SoftmaxCrossEntropy { smoothing } => {
            scalar(ops::softmax_cross_entropy(input(0), labels, *smoothing))
        }
        Op::MeanSquaredError => scalar(ops::mean_squared_error(input(0), labels)),
        Op::DenseGradInput => ops::dense_grad_input(input(0), input(1)),
        Op::DenseGradWeight => ops::dense_grad_weight(input(0), input(1)),
        Op::BiasGrad => ops::bias_grad(input(0)),
        Op::Conv2dGradInput(a) => ops::conv2d_grad_input(input(0), input(1), a, shape),
        Op::Conv2dGradWeight(a) => ops::conv2d_grad_weight(input(0), input(1), a, shape),
        Op::BatchNormGradInput { eps } => {
            ops::batchnorm_grad_input(input(0), input(1), input(2), input(3), input(4), *eps)
        }
        Op::BatchNormGradGamma { eps } => {
            ops::batchnorm_grad_gamma(input(0), input(1), input(2), input(3), *eps)
        }
        Op::ActGrad(a) => ops::act_grad(input(0), input(1), *a),
        Op::PoolGrad(a) => ops::pool_grad(input(0), input(1), a),
        Op::GlobalAvgPoolGrad => ops::global_avgpool_grad(input(0), shape),
        Op::SoftmaxGrad => ops::softmax_grad(input(0), input(1)),
        Op::SoftmaxCrossEntropyGrad { smoothing } => {
            ops::softmax_cross_entropy_grad(input(0), labels, *smoothing)
        }
        Op::MeanSquaredErrorGrad => ops::mean_squared_error_grad(input(0), labels),
    }
}

fn scalar(v: f32) -> Tensor {
    Tensor::from_elem(IxDyn(&[]), v)
}

/// Validates the labels against the graph's batch and class count.
pub(crate) fn labels_of(graph: &Graph, batch: &Batch) -> Result<Vec<usize>, InterpError> {
    if graph.loss.is_none() {
        return Ok(Vec::new());
    }
    let labels = batch.labels.ok_or(InterpError::MissingLabels)?;
    if labels.len() != graph.batch {
        return Err(InterpError::LabelCount {
            expected: graph.batch,
            found: labels.len(),
        });
    }
    let classes = graph.logits.map_or(0, |l| graph.shape(l)[1]);
    if let Some((row, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
        return Err(InterpError::LabelOutOfRange {
            label,
            row,
            classes,
        });
    }
    Ok(labels.to_vec())
}

/// Result of one training step.
pub struct StepOutput {
    pub loss: f32,
    pub values: Values,
}

/// Runs one training step: forward, backward, the running-statistic
/// updates, and the optimizer update of every parameter.
///
/// # Errors
/// When the batch does not fit the graph.
pub fn train_step(
    graph: &Graph,
    weights: &mut Weights,
    optimizer: &mut optim::OptimizerState,
    batch: &Batch,
    seed: u64,
) -> Result<StepOutput, InterpError> {
    let values = run(graph, weights, batch, seed)?;
    let loss = graph.loss.map_or(f32::NAN, |l| values.get(l)[[]]);
    apply_step(graph, weights, optimizer, &values);
    Ok(StepOutput { loss, values })
}

/// Applies the results of a training run: the new running statistics, and
/// the optimizer update of every parameter that has a gradient.
pub fn apply_step(
    graph: &Graph,
    weights: &mut Weights,
    optimizer: &mut optim::OptimizerState,
    values: &Values,
) {
    for (state, value) in &graph.state_updates {
        weights.states[*state] = values.get(*value).clone();
    }
    let grads: Vec<Option<&Tensor>> = (0..graph.params.len())
        .map(|p| {
            graph
                .grads
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, g)| values.get(*g))
        })
        .collect();
    optimizer.update(&mut weights.params, &grads);
}
