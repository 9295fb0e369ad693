//! The executor behind training and prediction: lowers the model for each
//! batch size it meets (the last batch of an epoch is usually smaller) and
//! runs the graphs.

use crate::check::graph::Graph as CheckedGraph;
use crate::check::train::Loss;
use crate::interp::optim::OptimizerState;
use crate::interp::{self, Batch, InterpError, Tensor, Values, Weights};
use crate::ir::{self, Graph, LowerError, Mode};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Autodiff(#[from] crate::autodiff::AutodiffError),
    #[error(transparent)]
    Run(#[from] InterpError),
}

/// The executor that runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    /// The reference executor on ndarray.
    Reference,
}

/// Lowered graphs of one model, by mode and batch size.
pub struct Engine {
    model: CheckedGraph,
    loss: Loss,
    train: HashMap<usize, Graph>,
    infer: HashMap<usize, Graph>,
}

/// The result of one training step.
pub struct Step {
    pub loss: f32,
    pub logits: Tensor,
    /// The name of the first node whose value is not finite, when the loss
    /// is not.
    pub first_non_finite: Option<String>,
}

impl Engine {
    pub fn new(model: CheckedGraph, loss: Loss) -> Self {
        Engine {
            model,
            loss,
            train: HashMap::new(),
            infer: HashMap::new(),
        }
    }

    /// Returns the training graph for `batch` samples, lowering and
    /// differentiating it on first use.
    ///
    /// # Errors
    /// When lowering or differentiation fails.
    pub fn train_graph(&mut self, batch: usize) -> Result<&Graph, EngineError> {
        if !self.train.contains_key(&batch) {
            let mode = Mode::Train {
                loss: self.loss.clone(),
            };
            let mut graph = ir::lower(&self.model, batch, mode)?;
            crate::autodiff::differentiate(&mut graph)?;
            self.train.insert(batch, graph);
        }
        Ok(&self.train[&batch])
    }

    fn infer_graph(&mut self, batch: usize) -> Result<&Graph, EngineError> {
        if !self.infer.contains_key(&batch) {
            let graph = ir::lower(&self.model, batch, Mode::Infer)?;
            self.infer.insert(batch, graph);
        }
        Ok(&self.infer[&batch])
    }

    /// Runs one training step and updates the weights and optimizer state.
    /// Weights are left unchanged when the loss is not finite.
    ///
    /// # Errors
    /// When the batch does not fit the graph.
    pub fn train_step(
        &mut self,
        weights: &mut Weights,
        optimizer: &mut OptimizerState,
        input: &Tensor,
        labels: &[usize],
        seed: u64,
    ) -> Result<Step, EngineError> {
        let batch = labels.len();
        let graph = self.train_graph(batch)?;
        let data = Batch {
            input,
            labels: Some(labels),
        };
        let values = interp::run(graph, weights, &data, seed)?;
        let loss = values
            .get(graph.loss.expect("training graph"))
            .iter()
            .copied()
            .next()
            .unwrap_or(f32::NAN);
        let logits = values.get(graph.logits.expect("model output")).clone();
        if !loss.is_finite() {
            return Ok(Step {
                loss,
                logits,
                first_non_finite: first_non_finite(graph, weights, &values),
            });
        }
        interp::apply_step(graph, weights, optimizer, &values);
        Ok(Step {
            loss,
            logits,
            first_non_finite: None,
        })
    }

    /// Runs the inference graph (running statistics, no dropout) on a batch.
    fn run_inference(
        &mut self,
        weights: &Weights,
        input: &Tensor,
    ) -> Result<(&Graph, Values), EngineError> {
        let graph = self.infer_graph(input.shape()[0])?;
        let data = Batch {
            input,
            labels: None,
        };
        let values = interp::run(graph, weights, &data, 0)?;
        Ok((graph, values))
    }

    /// Computes logits for a batch with running statistics and no dropout.
    ///
    /// # Errors
    /// When the batch does not fit the graph.
    pub fn predict(&mut self, weights: &Weights, input: &Tensor) -> Result<Tensor, EngineError> {
        let (graph, values) = self.run_inference(weights, input)?;
        Ok(values.get(graph.logits.expect("model output")).clone())
    }

    /// Computes the value every layer produces for a batch, by node name, for
    /// activation histograms.
    ///
    /// # Errors
    /// When the batch does not fit the graph.
    pub fn activations(
        &mut self,
        weights: &Weights,
        input: &Tensor,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let (graph, values) = self.run_inference(weights, input)?;
        Ok(graph
            .nodes
            .iter()
            .zip(values.0)
            .filter(|(n, _)| !matches!(n.op, ir::Op::Param(_) | ir::Op::State(_) | ir::Op::Input))
            .map(|(n, v)| (n.name.clone(), v))
            .collect())
    }
}

/// Names the first parameter, or else the first computed value, that
/// contains a NaN or an infinity.
fn first_non_finite(graph: &Graph, weights: &Weights, values: &Values) -> Option<String> {
    let bad = |t: &Tensor| t.iter().any(|v| !v.is_finite());
    if let Some((info, _)) = graph
        .params
        .iter()
        .zip(&weights.params)
        .find(|(_, t)| bad(t))
    {
        return Some(format!("parameter `{}`", info.name));
    }
    graph
        .nodes
        .iter()
        .zip(&values.0)
        .find(|(_, v)| bad(v))
        .map(|(n, _)| format!("`{}` ({})", n.name, n.op.name()))
}
