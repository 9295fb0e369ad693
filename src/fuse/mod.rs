//! Fusion: schedules an IR graph into kernels.
//!
//! Elementwise operators (activations and their gradients, batch
//! normalization's affine map, residual adds, dropout's multiply) join their
//! producer's kernel, so a chain such as `batchnorm → relu` reads its input
//! once and writes only the values that something outside the chain needs.
//! Batch normalization's two statistics become one reduction kernel, and its
//! three gradients (input, scale, shift) another, because they share the
//! same per-channel sums. Reshapes become aliases of their input. Every other
//! operator is a kernel of its own; [`crate::jit`] decides how each runs.
//!
//! The schedule is a list in execution order. A fused kernel runs where its
//! last member stood in the graph, and joining is refused when that would
//! make a value late for a reader outside the kernel.

use crate::ir::{Graph, Op, ValueId};

/// An elementwise kernel: members computed in order over one iteration
/// space, with the values named in `outputs` written to memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    pub members: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

/// One kernel of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// Elementwise operators fused into one loop.
    Fused(Fused),
    /// Batch mean and variance of the same input in one reduction.
    BatchStats { mean: ValueId, var: ValueId },
    /// The gradients of training-mode batch normalization with respect to
    /// its input, scale and shift, from one pass of per-channel sums. Two
    /// batch normalizations that receive the same gradient (the two paths
    /// of a residual block) have equal shift gradients, so `beta` may list
    /// several.
    BatchNormGrad {
        input: Option<ValueId>,
        gamma: Option<ValueId>,
        beta: Vec<ValueId>,
    },
    /// Any other operator on its own.
    Single(ValueId),
}

/// The kernels of a graph in execution order, and the values that live in
/// memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kernels: Vec<Kernel>,
    /// Per value: `true` when some kernel writes it to memory (or it is a
    /// source), `false` when it lives only inside a fused kernel or is an
    /// alias.
    pub stored: Vec<bool>,
    /// Per value: the value whose memory it shares (itself unless it is a
    /// reshape).
    pub storage: Vec<ValueId>,
}

impl Schedule {
    pub fn fused_count(&self) -> usize {
        self.kernels
            .iter()
            .filter(|k| matches!(k, Kernel::Fused(_)))
            .count()
    }
}

fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Act(_) | Op::ActGrad(_) | Op::Add | Op::Mul | Op::BatchNorm { .. }
    )
}

/// Positions (node indices) of every value's readers.
fn readers(graph: &Graph) -> Vec<Vec<usize>> {
    let mut readers = vec![Vec::new(); graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        for input in &node.inputs {
            if !readers[input.index()].contains(&i) {
                readers[input.index()].push(i);
            }
        }
    }
    readers
}

/// Values the caller reads after a run: logits, loss, gradients and new
/// states.
fn results(graph: &Graph) -> Vec<bool> {
    let mut out = vec![false; graph.nodes.len()];
    let grads = graph.grads.iter().map(|(_, g)| *g);
    let states = graph.state_updates.iter().map(|(_, v)| *v);
    for v in graph
        .logits
        .into_iter()
        .chain(graph.loss)
        .chain(grads)
        .chain(states)
    {
        out[v.index()] = true;
    }
    out
}

struct Group {
    members: Vec<usize>,
    /// The node index the kernel runs at: its last member.
    at: usize,
}

/// Schedules `graph` into kernels.
pub fn schedule(graph: &Graph) -> Schedule {
    let readers = readers(graph);
    let results = results(graph);
    let n = graph.nodes.len();

    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: Vec<Option<usize>> = vec![None; n];
    let mut placed: Vec<(usize, Kernel)> = Vec::new();
    let mut absorbed = vec![false; n];

    for (i, node) in graph.nodes.iter().enumerate() {
        if absorbed[i] {
            continue;
        }
        if is_elementwise(&node.op) {
            let joinable = node.inputs[..elementwise_arity(&node.op)]
                .iter()
                .filter_map(|v| group_of[v.index()])
                .find(|&g| can_join(graph, &readers, &groups[g], &group_of, g, i));
            let g = joinable.unwrap_or_else(|| {
                groups.push(Group {
                    members: Vec::new(),
                    at: i,
                });
                groups.len() - 1
            });
            groups[g].members.push(i);
            groups[g].at = i;
            group_of[i] = Some(g);
            continue;
        }
        let kernel = match node.op {
            Op::BatchMean => batch_stats(graph, &readers, i, &mut absorbed),
            Op::BatchNormGradInput { .. } | Op::BatchNormGradGamma { .. } | Op::BiasGrad
                if batchnorm_grad_of(graph, i).is_some() =>
            {
                batchnorm_grad(graph, &readers, i, &mut absorbed)
            }
            _ => Kernel::Single(ValueId(i as u32)),
        };
        placed.push((i, kernel));
    }

    let mut stored = vec![true; n];
    for group in &groups {
        let outputs = group_outputs(group, &readers, &results, &group_of);
        for &m in &group.members {
            stored[m] = outputs.contains(&ValueId(m as u32));
        }
        let members = group.members.iter().map(|&m| ValueId(m as u32)).collect();
        placed.push((group.at, Kernel::Fused(Fused { members, outputs })));
    }
    placed.sort_by_key(|(at, _)| *at);

    let mut storage: Vec<ValueId> = (0..n as u32).map(ValueId).collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        if node.op == Op::Reshape {
            storage[i] = storage[node.inputs[0].index()];
            stored[i] = false;
        }
    }
    let kernels = placed
        .into_iter()
        .map(|(_, k)| k)
        .filter(|k| !matches!(k, Kernel::Single(v) if graph.node(*v).op == Op::Reshape))
        .collect();
    Schedule {
        kernels,
        stored,
        storage,
    }
}

/// How many leading inputs of an elementwise operator are read element by
/// element (the rest are per-channel vectors).
pub fn elementwise_arity(op: &Op) -> usize {
    match op {
        Op::Act(_) | Op::BatchNorm { .. } => 1,
        _ => 2,
    }
}

/// Whether node `i` can join group `g`: same shape as the group, and no
/// reader outside the group needs a member's value before `i` runs.
fn can_join(
    graph: &Graph,
    readers: &[Vec<usize>],
    group: &Group,
    group_of: &[Option<usize>],
    g: usize,
    i: usize,
) -> bool {
    let shape = &graph.nodes[group.members[0]].shape;
    if &graph.nodes[i].shape != shape {
        return false;
    }
    group
        .members
        .iter()
        .all(|&m| readers[m].iter().all(|&r| r >= i || group_of[r] == Some(g)))
}

/// Members whose value some reader outside the group, or the caller, needs.
fn group_outputs(
    group: &Group,
    readers: &[Vec<usize>],
    results: &[bool],
    group_of: &[Option<usize>],
) -> Vec<ValueId> {
    let g = group_of[group.members[0]];
    group
        .members
        .iter()
        .filter(|&&m| results[m] || readers[m].iter().any(|&r| group_of[r] != g))
        .map(|&m| ValueId(m as u32))
        .collect()
}

/// Pairs a batch mean with the batch variance that reads it.
fn batch_stats(graph: &Graph, readers: &[Vec<usize>], i: usize, absorbed: &mut [bool]) -> Kernel {
    let x = graph.nodes[i].inputs[0];
    let var = readers[i].iter().copied().find(|&r| {
        let node = &graph.nodes[r];
        node.op == Op::BatchVar && node.inputs[0] == x
    });
    match var {
        Some(var) => {
            absorbed[var] = true;
            Kernel::BatchStats {
                mean: ValueId(i as u32),
                var: ValueId(var as u32),
            }
        }
        None => Kernel::Single(ValueId(i as u32)),
    }
}

/// The `(dy, x)` pair that a batch-normalization gradient node reads, or
/// `None` for a bias gradient that belongs to no batch normalization.
fn batchnorm_grad_of(graph: &Graph, i: usize) -> Option<(ValueId, ValueId)> {
    let node = &graph.nodes[i];
    match node.op {
        Op::BatchNormGradInput { .. } | Op::BatchNormGradGamma { .. } => {
            Some((node.inputs[0], node.inputs[1]))
        }
        Op::BiasGrad => {
            let dy = node.inputs[0];
            graph
                .nodes
                .iter()
                .find(|n| matches!(n.op, Op::BatchNormGradGamma { .. }) && n.inputs[0] == dy)
                .map(|n| (dy, n.inputs[1]))
        }
        _ => None,
    }
}

/// Gathers the gradients of one batch normalization into one kernel, placed
/// at the first of them; their inputs all exist by then.
fn batchnorm_grad(
    graph: &Graph,
    readers: &[Vec<usize>],
    i: usize,
    absorbed: &mut [bool],
) -> Kernel {
    let (dy, x) = batchnorm_grad_of(graph, i).expect("checked by the caller");
    let (mut input, mut gamma, mut beta) = (None, None, Vec::new());
    for &r in &readers[dy.index()] {
        let v = ValueId(r as u32);
        match graph.nodes[r].op {
            Op::BiasGrad if !absorbed[r] => beta.push(v),
            Op::BatchNormGradInput { .. } if graph.nodes[r].inputs[1] == x => input = Some(v),
            Op::BatchNormGradGamma { .. } if graph.nodes[r].inputs[1] == x => gamma = Some(v),
            _ => continue,
        }
        absorbed[r] = true;
    }
    Kernel::BatchNormGrad { input, gamma, beta }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{lower, Act, Mode};

    fn graph_of(source: &str) -> Graph {
        let mut report = crate::check::check_source(source);
        let instance = report.models.remove(0).instance.unwrap();
        let mut g = lower(
            &instance.graph,
            4,
            Mode::Train {
                loss: crate::check::train::Loss::CrossEntropy {
                    label_smoothing: 0.0,
                },
            },
        )
        .unwrap();
        crate::autodiff::differentiate(&mut g).unwrap();
        g
    }

    #[test]
    fn batchnorm_and_relu_share_a_kernel() {
        let g = graph_of(
            "model m { input x: [2, 4, 4]\n y = conv(x, filters = 3, kernel = 3) |> batchnorm |> relu\n logits = dense(flatten(y), units = 2)\n output logits: [2] }",
        );
        let s = schedule(&g);
        let fused: Vec<&Fused> = s
            .kernels
            .iter()
            .filter_map(|k| match k {
                Kernel::Fused(f) => Some(f),
                _ => None,
            })
            .collect();
        let forward = fused
            .iter()
            .find(|f| {
                f.members
                    .iter()
                    .any(|m| g.node(*m).op == Op::Act(Act::Relu))
            })
            .unwrap();
        assert_eq!(forward.members.len(), 2, "{:?}", s.kernels);
        assert!(s
            .kernels
            .iter()
            .any(|k| matches!(k, Kernel::BatchNormGrad { input: Some(_), gamma: Some(_), beta } if beta.len() == 1)));
    }
}
