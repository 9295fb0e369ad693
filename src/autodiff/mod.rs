//! Reverse-mode differentiation of an IR training graph.
//!
//! [`differentiate`] walks the forward nodes from the loss back to the
//! parameters and appends, for each, the backward operators its grad rule
//! gives. Gradients that reach a value along several paths (a residual
//! edge, a shared layer) are summed. Batch normalization in training mode is
//! differentiated through its batch statistics as one rule, so the mean and
//! variance nodes need no rules of their own.

use crate::ir::{Graph, Op, ValueId};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AutodiffError {
    #[error("autodiff: the graph has no loss; lower it in training mode")]
    NoLoss,
    #[error("autodiff: `{op}` at `{node}` has no gradient rule")]
    NotDifferentiable { op: &'static str, node: String },
}

/// Appends the backward graph of `graph`'s loss and fills [`Graph::grads`]
/// with the gradient of every parameter the loss depends on.
///
/// # Errors
/// When the graph has no loss, or the loss depends on an operator without a
/// grad rule (a backward operator, or batch normalization in inference mode).
pub fn differentiate(graph: &mut Graph) -> Result<(), AutodiffError> {
    let loss = graph.loss.ok_or(AutodiffError::NoLoss)?;
    let needs_grad = needs_grad(graph);
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    let forward_len = loss.index() + 1;

    for index in (0..forward_len).rev() {
        let id = ValueId(index as u32);
        let node = graph.nodes[index].clone();
        let dy = if id == loss {
            None
        } else {
            match grads.get(&id) {
                Some(dy) => Some(*dy),
                None => continue,
            }
        };
        let contributions = rule(graph, id, dy, &needs_grad)?;
        for (input, grad) in contributions {
            if !needs_grad[input.index()] {
                continue;
            }
            let sum = match grads.get(&input) {
                Some(previous) => graph.add(
                    Op::Add,
                    &[*previous, grad],
                    format!("{}/grad_sum", node.name),
                ),
                None => grad,
            };
            grads.insert(input, sum);
        }
    }

    graph.grads = graph
        .param_nodes()
        .into_iter()
        .enumerate()
        .filter_map(|(param, node)| grads.get(&node?).map(|g| (param, *g)))
        .collect();
    Ok(())
}

/// Marks the values that depend on a parameter: only they need gradients.
fn needs_grad(graph: &Graph) -> Vec<bool> {
    let mut needs = vec![false; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        needs[i] = match node.op {
            Op::Param(_) => true,
            // Statistics and masks carry no gradient of their own; batch
            // normalization's rule accounts for its statistics.
            Op::BatchMean | Op::BatchVar | Op::RunningUpdate { .. } | Op::DropoutMask { .. } => {
                false
            }
            _ => node.inputs.iter().any(|input| needs[input.index()]),
        };
    }
    needs
}

/// The grad rule of node `id`: the gradient contributions to its inputs,
/// given the gradient `dy` of its output (`None` for the loss, whose
/// gradient is 1).
fn rule(
    graph: &mut Graph,
    id: ValueId,
    dy: Option<ValueId>,
    needs_grad: &[bool],
) -> Result<Vec<(ValueId, ValueId)>, AutodiffError> {
    let node = graph.node(id).clone();
    let name = node.name.clone();
    let inputs = node.inputs.clone();
    let needs = |v: ValueId| needs_grad[v.index()];
    let missing = || AutodiffError::NotDifferentiable {
        op: node.op.name(),
        node: name.clone(),
    };
    let dy = match (dy, &node.op) {
        (Some(dy), _) => dy,
        (None, Op::SoftmaxCrossEntropy { .. } | Op::MeanSquaredError) => ValueId(u32::MAX),
        (None, _) => return Err(missing()),
    };
    let mut out = Vec::new();
    match node.op {
        // d(mean CE)/dlogits = (softmax(logits) - target) / N.
        Op::SoftmaxCrossEntropy { smoothing } => {
            let g = graph.add(
                Op::SoftmaxCrossEntropyGrad { smoothing },
                &inputs,
                format!("{name}/grad"),
            );
            out.push((inputs[0], g));
        }
        // d(mean (p - t)²)/dp = 2 (p - t) / (N F).
        Op::MeanSquaredError => {
            let g = graph.add(Op::MeanSquaredErrorGrad, &inputs, format!("{name}/grad"));
            out.push((inputs[0], g));
        }
        // y = x wᵀ + b: dx = dy w, dw = dyᵀ x, db = Σ_n dy.
        Op::Dense => {
            let (x, w) = (inputs[0], inputs[1]);
            if needs(x) {
                out.push((
                    x,
                    graph.add(Op::DenseGradInput, &[dy, w], format!("{name}/grad_input")),
                ));
            }
            out.push((
                w,
                graph.add(Op::DenseGradWeight, &[dy, x], format!("{name}/grad_weight")),
            ));
            if let Some(&b) = inputs.get(2) {
                out.push((
                    b,
                    graph.add(Op::BiasGrad, &[dy], format!("{name}/grad_bias")),
                ));
            }
        }
        // dx is the transposed convolution of dy with w; dw correlates dy
        // with x; db sums dy over batch and space.
        Op::Conv2d(attrs) => {
            let (x, w) = (inputs[0], inputs[1]);
            if needs(x) {
                let shape = graph.shape(x).to_vec();
                let g = graph.add_with_shape(
                    Op::Conv2dGradInput(attrs),
                    &[dy, w],
                    shape,
                    format!("{name}/grad_input"),
                );
                out.push((x, g));
            }
            let shape = graph.shape(w).to_vec();
            let g = graph.add_with_shape(
                Op::Conv2dGradWeight(attrs),
                &[dy, x],
                shape,
                format!("{name}/grad_weight"),
            );
            out.push((w, g));
            if let Some(&b) = inputs.get(2) {
                out.push((
                    b,
                    graph.add(Op::BiasGrad, &[dy], format!("{name}/grad_bias")),
                ));
            }
        }
        // Training-mode batch normalization, differentiated through the
        // batch mean and variance; see `interp::ops::batchnorm_grad_input`.
        Op::BatchNorm { eps } => {
            let [x, mean, var, gamma, beta] = inputs[..] else {
                return Err(missing());
            };
            if !matches!(graph.node(mean).op, Op::BatchMean) {
                return Err(missing());
            }
            if needs(x) {
                let g = graph.add(
                    Op::BatchNormGradInput { eps },
                    &[dy, x, mean, var, gamma],
                    format!("{name}/grad_input"),
                );
                out.push((x, g));
            }
            let dgamma = graph.add(
                Op::BatchNormGradGamma { eps },
                &[dy, x, mean, var],
                format!("{name}/grad_weight"),
            );
            out.push((gamma, dgamma));
            out.push((
                beta,
                graph.add(Op::BiasGrad, &[dy], format!("{name}/grad_bias")),
            ));
        }
        Op::Act(act) => {
            let g = graph.add(Op::ActGrad(act), &[dy, inputs[0]], format!("{name}/grad"));
            out.push((inputs[0], g));
        }
        Op::Pool(attrs) => {
            let shape = graph.shape(inputs[0]).to_vec();
            let g = graph.add_with_shape(
                Op::PoolGrad(attrs),
                &[dy, inputs[0]],
                shape,
                format!("{name}/grad"),
            );
            out.push((inputs[0], g));
        }
        // The mean over H·W cells spreads dy / (H·W) to each cell.
        Op::GlobalAvgPool => {
            let shape = graph.shape(inputs[0]).to_vec();
            let g =
                graph.add_with_shape(Op::GlobalAvgPoolGrad, &[dy], shape, format!("{name}/grad"));
            out.push((inputs[0], g));
        }
        Op::Reshape => {
            let shape = graph.shape(inputs[0]).to_vec();
            let g = graph.add_with_shape(Op::Reshape, &[dy], shape, format!("{name}/grad"));
            out.push((inputs[0], g));
        }
        // y = a · b elementwise: da = dy · b, db = dy · a.
        Op::Mul => {
            let (a, b) = (inputs[0], inputs[1]);
            if needs(a) {
                out.push((a, graph.add(Op::Mul, &[dy, b], format!("{name}/grad_lhs"))));
            }
            if needs(b) {
                out.push((b, graph.add(Op::Mul, &[dy, a], format!("{name}/grad_rhs"))));
            }
        }
        Op::Add => {
            out.push((inputs[0], dy));
            out.push((inputs[1], dy));
        }
        Op::Concat => {
            let mut start = 0;
            for &input in &inputs {
                let len = graph.shape(input)[1];
                if needs(input) {
                    let g = graph.add(
                        Op::Slice { start, len },
                        &[dy],
                        format!("{name}/grad_{start}"),
                    );
                    out.push((input, g));
                }
                start += len;
            }
        }
        // dx = y · (dy - Σ_j dy_j y_j).
        Op::Softmax => {
            let g = graph.add(Op::SoftmaxGrad, &[dy, id], format!("{name}/grad"));
            out.push((inputs[0], g));
        }
        Op::Input | Op::Labels | Op::Param(_) | Op::State(_) => {}
        Op::BatchMean
        | Op::BatchVar
        | Op::RunningUpdate { .. }
        | Op::DropoutMask { .. }
        | Op::Slice { .. }
        | Op::DenseGradInput
        | Op::DenseGradWeight
        | Op::BiasGrad
        | Op::Conv2dGradInput(_)
        | Op::Conv2dGradWeight(_)
        | Op::BatchNormGradInput { .. }
        | Op::BatchNormGradGamma { .. }
        | Op::ActGrad(_)
        | Op::PoolGrad(_)
        | Op::GlobalAvgPoolGrad
        | Op::SoftmaxGrad
        | Op::SoftmaxCrossEntropyGrad { .. }
        | Op::MeanSquaredErrorGrad => return Err(missing()),
    }
    Ok(out)
}
