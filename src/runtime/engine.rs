//! The executor behind training and prediction: lowers the model for each
//! batch size it meets (the last batch of an epoch is usually smaller) and
//! runs the graphs, with the JIT's compiled programs or with the reference
//! executor.

use crate::check::graph::Graph as CheckedGraph;
use crate::check::train::Loss;
use crate::interp::optim::OptimizerState;
use crate::interp::{self, Batch, InterpError, Tensor, Values, Weights};
use crate::ir::{self, Graph, LowerError, Mode};
use crate::jit::{self, Arena, JitError, Program};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Autodiff(#[from] crate::autodiff::AutodiffError),
    #[error(transparent)]
    Run(#[from] InterpError),
    #[error(transparent)]
    Jit(#[from] JitError),
    #[error("cannot start {threads} worker threads: {reason}")]
    Threads { threads: usize, reason: String },
    #[error(
        "at batch {batch} the model needs about {} of memory for its weights, \
         gradients, optimizer state and activations, more than this machine can allocate; \
         use fewer or smaller layers, or a smaller batch", human_bytes(*.bytes)
    )]
    Memory { batch: usize, bytes: u128 },
}

/// Formats a byte count in GiB, or TiB beyond 1024 GiB.
fn human_bytes(bytes: u128) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1024.0 {
        format!("{:.1} TiB", gib / 1024.0)
    } else {
        format!("{gib:.1} GiB")
    }
}

/// Checks that the memory a run of `graph` needs can be allocated at all,
/// so that an impossible model fails with an error instead of aborting the
/// process (Rust aborts when an allocation fails). The estimate counts
/// every value of the graph once, and each parameter four times (weights,
/// gradients, two optimizer buffers). Allocating reserves address space
/// only, and the probe is freed at once.
fn probe_memory(graph: &Graph) -> Result<(), EngineError> {
    let elements = |shape: &[usize]| {
        shape
            .iter()
            .fold(1u128, |n, d| n.saturating_mul(*d as u128))
    };
    let values: u128 = graph.nodes.iter().map(|n| elements(&n.shape)).sum();
    let params: u128 = graph.params.iter().map(|p| elements(&p.shape)).sum();
    let bytes = values
        .saturating_add(params.saturating_mul(4))
        .saturating_mul(4);
    let fits = usize::try_from(bytes)
        .ok()
        .is_some_and(|b| Vec::<u8>::new().try_reserve_exact(b).is_ok());
    if fits {
        Ok(())
    } else {
        Err(EngineError::Memory {
            batch: graph.batch,
            bytes,
        })
    }
}

/// The executor that runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Compiled programs from [`crate::jit`].
    Jit,
    /// The reference executor on ndarray.
    Reference,
}

/// A compiled program and the memory of its runs.
struct Compiled {
    program: Arc<Program>,
    arena: Arena,
}

/// Lowered graphs of one model, by mode and batch size, and their compiled
/// programs.
pub struct Engine {
    model: CheckedGraph,
    loss: Loss,
    executor: ExecutorKind,
    threads: usize,
    pool: Option<rayon::ThreadPool>,
    train: HashMap<usize, Graph>,
    infer: HashMap<usize, Graph>,
    compiled_train: HashMap<usize, Compiled>,
    compiled_infer: HashMap<usize, Compiled>,
    /// Training steps still to run on both executors and compare.
    verify: usize,
    verified: Option<VerifyReport>,
}

/// How far the JIT's result for one tensor is from the reference's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorDiff {
    pub name: String,
    /// The largest absolute difference.
    pub max_abs: f32,
    /// `max_abs` over the reference's largest magnitude.
    pub relative: f32,
}

/// The comparison of one training step run on both executors.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    /// The step, counted from 1.
    pub step: u64,
    pub tensors: Vec<TensorDiff>,
}

impl VerifyReport {
    /// The tensor furthest from the reference, relatively.
    pub fn worst(&self) -> Option<&TensorDiff> {
        self.tensors
            .iter()
            .max_by(|a, b| a.relative.total_cmp(&b.relative))
    }
}

fn diff(name: &str, actual: &Tensor, expected: &Tensor) -> TensorDiff {
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_abs = actual
        .iter()
        .zip(expected.iter())
        .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    TensorDiff {
        name: name.to_string(),
        max_abs,
        relative: if scale > 0.0 {
            max_abs / scale
        } else {
            max_abs
        },
    }
}

/// Returns the default thread count of a run: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
    /// An engine that runs compiled programs on every core.
    pub fn new(model: CheckedGraph, loss: Loss) -> Self {
        Engine {
            model,
            loss,
            executor: ExecutorKind::Jit,
            threads: 1,
            pool: None,
            train: HashMap::new(),
            infer: HashMap::new(),
            compiled_train: HashMap::new(),
            compiled_infer: HashMap::new(),
            verify: 0,
            verified: None,
        }
        .with_threads(default_threads())
        .expect("a pool of one thread per core")
    }

    /// Selects the executor.
    pub fn with_executor(mut self, executor: ExecutorKind) -> Self {
        self.executor = executor;
        self
    }

    /// Runs kernels on `threads` threads. Results are the same for the same
    /// thread count; a different count can change the rounding of sums.
    ///
    /// # Errors
    /// When the threads cannot be started.
    pub fn with_threads(mut self, threads: usize) -> Result<Self, EngineError> {
        let threads = threads.max(1);
        self.threads = threads;
        self.pool = Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("kiln-worker-{i}"))
                .build()
                .map_err(|e| EngineError::Threads {
                    threads,
                    reason: e.to_string(),
                })?,
        );
        Ok(self)
    }

    /// Runs the first `steps` training steps on the reference executor too,
    /// from the same weights, and keeps a comparison of every result.
    pub fn with_verify(mut self, steps: usize) -> Self {
        self.verify = steps;
        self
    }

    /// The comparison made by the last training step, when it was verified.
    pub fn take_verify_report(&mut self) -> Option<VerifyReport> {
        self.verified.take()
    }

    pub fn executor(&self) -> ExecutorKind {
        self.executor
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Compiles (or takes from the process's cache) the training program for
    /// `batch` samples.
    ///
    /// # Errors
    /// When lowering, differentiation or compilation fails.
    pub fn compiled_train(
        &mut self,
        batch: usize,
        optimizer: &crate::check::train::Optimizer,
    ) -> Result<Arc<Program>, EngineError> {
        if !self.compiled_train.contains_key(&batch) {
            let graph = self.train_graph(batch)?;
            let program = jit::compile_cached(graph, Some(optimizer))?;
            let arena = program.new_arena();
            self.compiled_train
                .insert(batch, Compiled { program, arena });
        }
        Ok(self.compiled_train[&batch].program.clone())
    }

    fn compiled_infer(&mut self, batch: usize) -> Result<&mut Compiled, EngineError> {
        if !self.compiled_infer.contains_key(&batch) {
            let graph = self.infer_graph(batch)?;
            let program = jit::compile_cached(graph, None)?;
            let arena = program.new_arena();
            self.compiled_infer
                .insert(batch, Compiled { program, arena });
        }
        Ok(self.compiled_infer.get_mut(&batch).expect("inserted"))
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
            probe_memory(&graph)?;
            self.train.insert(batch, graph);
        }
        Ok(&self.train[&batch])
    }

    fn infer_graph(&mut self, batch: usize) -> Result<&Graph, EngineError> {
        if !self.infer.contains_key(&batch) {
            let graph = ir::lower(&self.model, batch, Mode::Infer)?;
            probe_memory(&graph)?;
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
        if self.executor == ExecutorKind::Jit {
            if self.verify == 0 {
                return self.jit_train_step(weights, optimizer, input, labels, seed);
            }
            self.verify -= 1;
            let (mut ref_weights, mut ref_optimizer) = (weights.clone(), optimizer.clone());
            self.executor = ExecutorKind::Reference;
            let reference =
                self.train_step(&mut ref_weights, &mut ref_optimizer, input, labels, seed);
            self.executor = ExecutorKind::Jit;
            let reference = reference?;
            let step = self.jit_train_step(weights, optimizer, input, labels, seed)?;
            self.verified =
                Some(self.compare(&step, weights, &reference, &ref_weights, optimizer.step));
            return Ok(step);
        }
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

    /// Compares a JIT step's loss, logits, weights and running statistics
    /// with the reference's.
    fn compare(
        &self,
        step: &Step,
        weights: &Weights,
        reference: &Step,
        ref_weights: &Weights,
        number: u64,
    ) -> VerifyReport {
        let graph = self.compiled_train[&step.logits.shape()[0]].program.graph();
        let scalar = |v: f32| Tensor::from_elem(ndarray::IxDyn(&[]), v);
        let mut tensors = vec![
            diff("loss", &scalar(step.loss), &scalar(reference.loss)),
            diff("logits", &step.logits, &reference.logits),
        ];
        for (info, (a, e)) in graph
            .params
            .iter()
            .zip(weights.params.iter().zip(&ref_weights.params))
        {
            tensors.push(diff(&info.name, a, e));
        }
        for (info, (a, e)) in graph
            .states
            .iter()
            .zip(weights.states.iter().zip(&ref_weights.states))
        {
            tensors.push(diff(&info.name, a, e));
        }
        VerifyReport {
            step: number,
            tensors,
        }
    }

    /// Times every kernel of the compiled training program (forward and
    /// backward, without the update) over `runs` runs, and returns each
    /// kernel's label and median time in seconds, in schedule order.
    ///
    /// # Errors
    /// When compiling fails or the batch does not fit the program.
    pub fn profile_train(
        &mut self,
        weights: &Weights,
        optimizer: &crate::check::train::Optimizer,
        input: &Tensor,
        labels: &[usize],
        runs: usize,
    ) -> Result<Vec<(String, f64)>, EngineError> {
        let program = self.compiled_train(labels.len(), optimizer)?;
        let mut arena = program.new_arena();
        let mut times: Vec<Vec<f64>> = Vec::new();
        let pool = self.pool.as_ref().expect("a thread pool");
        for run in 0..runs.max(1) {
            let mut record = |i: usize, time: std::time::Duration| {
                if times.len() <= i {
                    times.resize(i + 1, Vec::new());
                }
                times[i].push(time.as_secs_f64());
            };
            pool.install(|| {
                program.run_timed(
                    &mut arena,
                    weights,
                    input,
                    Some(labels),
                    run as u64,
                    self.threads,
                    Some(&mut record),
                )
            })?;
        }
        Ok(times
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !program.is_source(*i))
            .map(|(i, mut t)| {
                t.sort_by(f64::total_cmp);
                (program.kernel_label(i), t[t.len() / 2])
            })
            .collect())
    }

    fn jit_train_step(
        &mut self,
        weights: &mut Weights,
        optimizer: &mut OptimizerState,
        input: &Tensor,
        labels: &[usize],
        seed: u64,
    ) -> Result<Step, EngineError> {
        let batch = labels.len();
        self.compiled_train(batch, &optimizer.optimizer)?;
        let threads = self.threads;
        let pool = self.pool.as_ref().expect("a thread pool");
        let compiled = self.compiled_train.get_mut(&batch).expect("compiled");
        let (program, arena) = (&compiled.program, &mut compiled.arena);
        pool.install(|| program.run(arena, weights, input, Some(labels), seed, threads))?;
        let loss = program.loss(arena);
        let graph = program.graph();
        let logits = program.value(arena, graph.logits.expect("model output"));
        if !loss.is_finite() {
            // Naming the first non-finite value needs every intermediate
            // value, which only the reference executor keeps.
            let data = Batch {
                input,
                labels: Some(labels),
            };
            let values = interp::run(graph, weights, &data, seed)?;
            return Ok(Step {
                loss,
                logits,
                first_non_finite: first_non_finite(graph, weights, &values),
            });
        }
        pool.install(|| program.apply_update(arena, weights, optimizer, threads));
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
        if self.executor == ExecutorKind::Jit {
            let threads = self.threads;
            let pool = self.pool.take().expect("a thread pool");
            let compiled = self.compiled_infer(input.shape()[0]);
            let result = compiled.and_then(|c| {
                let (program, arena) = (&c.program, &mut c.arena);
                pool.install(|| program.run(arena, weights, input, None, 0, threads))?;
                let logits = program.graph().logits.expect("model output");
                Ok(program.value(arena, logits))
            });
            self.pool = Some(pool);
            return result;
        }
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
