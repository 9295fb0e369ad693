//! The JIT: compiles a scheduled IR graph into a [`Program`] and runs it.
//!
//! Compilation lays every stored value out in one arena of `f32`s. The
//! parameters come first and their gradients next in the same order, so
//! the optimizer update is one pass. It then generates a Cranelift function
//! for each fused elementwise kernel and one for the optimizer update, and
//! keeps the other kernels as calls into [`native`].
//!
//! Programs are immutable and shared through a process-wide cache keyed by
//! a hash of the graph, so a sweep compiles each distinct architecture and
//! batch size once. The mutable state of a run lives in an [`Arena`].

pub mod codegen;
pub mod native;

use crate::check::train::Optimizer;
use crate::fuse::{self, Kernel, Schedule};
use crate::interp::optim::OptimizerState;
use crate::interp::{InterpError, Tensor, Weights};
use crate::ir::{Graph, Op, ValueId};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use native::{Ctx, Ptr};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error("this CPU is not supported by the code generator: {0}")]
    Isa(String),
    #[error("code generation failed: {0}")]
    Codegen(String),
    #[error(transparent)]
    Run(#[from] InterpError),
}

impl From<cranelift_module::ModuleError> for JitError {
    fn from(e: cranelift_module::ModuleError) -> Self {
        JitError::Codegen(e.to_string())
    }
}

/// Text to keep from compilation besides the program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Listing {
    /// The Cranelift IR of every generated function.
    pub clif: bool,
    /// The machine code of every generated function, as Cranelift's
    /// disassembly of its final instructions.
    pub asm: bool,
}

type ElementwiseFn = unsafe extern "C" fn(*const *mut f32, u64, u64);
type UpdateFn = unsafe extern "C" fn(*mut f32, *const f32, *mut f32, *mut f32, u64, *const f32);

/// A fused kernel ready to call.
struct Elementwise {
    func: ElementwiseFn,
    layout: codegen::ElementwiseLayout,
}

enum Compiled {
    Elementwise(Elementwise),
    Kernel(Kernel),
}

/// One parameter and its gradient in the arena, updated by one call.
#[derive(Debug, Clone, Copy, PartialEq)]
struct UpdateRun {
    /// Index into the graph's parameters and the optimizer's buffers.
    index: usize,
    param: usize,
    grad: usize,
    len: usize,
}

/// A compiled graph.
pub struct Program {
    graph: Graph,
    schedule: Schedule,
    kernels: Vec<Compiled>,
    offsets: Vec<usize>,
    arena_len: usize,
    /// Elements of all parameters together.
    params_len: usize,
    update: Option<(UpdateFn, Optimizer)>,
    update_runs: Vec<UpdateRun>,
    /// Owns the generated code; never used after compilation.
    _module: JITModule,
    pub compile_time: Duration,
    /// Generated functions' text, when asked for.
    pub listing: Vec<(String, String)>,
}

// SAFETY: a program is immutable after compilation. Its function pointers
// refer to finalized, read-only code that the module owns for the
// program's lifetime; running a program mutates only the caller's arena.
unsafe impl Send for Program {}
unsafe impl Sync for Program {}

/// The memory of one program's runs: every stored value, and the
/// optimizer's buffers.
pub struct Arena {
    data: Vec<f32>,
    buffers: [Vec<f32>; 2],
    scratch: native::Scratch,
}

const NOT_STORED: usize = usize::MAX;

/// Lays out the arena: parameters, then gradients in parameter order, then
/// every other stored value. Returns per-value offsets and the length.
fn layout(graph: &Graph, schedule: &Schedule) -> (Vec<usize>, usize, usize) {
    let mut offsets = vec![NOT_STORED; graph.nodes.len()];
    let mut next = 0;
    let mut place = |v: ValueId, offsets: &mut Vec<usize>| {
        if offsets[v.index()] == NOT_STORED && schedule.stored[v.index()] {
            offsets[v.index()] = next;
            next += graph.shape(v).iter().product::<usize>();
        }
    };
    let param_nodes = graph.param_nodes();
    for v in param_nodes.iter().flatten() {
        place(*v, &mut offsets);
    }
    let params_len = graph
        .params
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut grads = graph.grads.clone();
    grads.sort();
    for (_, g) in &grads {
        place(*g, &mut offsets);
    }
    for v in 0..graph.nodes.len() {
        place(ValueId(v as u32), &mut offsets);
    }
    for v in 0..graph.nodes.len() {
        let s = schedule.storage[v];
        if s.index() != v {
            offsets[v] = offsets[s.index()];
        }
    }
    (offsets, next, params_len)
}

/// Pairs each parameter with its gradient.
fn update_runs(graph: &Graph, offsets: &[usize]) -> Vec<UpdateRun> {
    let param_nodes = graph.param_nodes();
    let mut grads = graph.grads.clone();
    grads.sort();
    grads
        .into_iter()
        .filter_map(|(p, g)| {
            let node = param_nodes[p]?;
            Some(UpdateRun {
                index: p,
                param: offsets[node.index()],
                grad: offsets[g.index()],
                len: graph.params[p].shape.iter().product(),
            })
        })
        .collect()
}

fn new_module() -> Result<JITModule, JitError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v).map_err(|e| JitError::Isa(e.to_string()))
    };
    // Emission order is already good for loops like these, and skipping the
    // optimizer makes compilation faster.
    set(&mut flags, "opt_level", "none")?;
    set(&mut flags, "is_pic", "false")?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    let isa = cranelift_native::builder()
        .map_err(|e| JitError::Isa(e.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Isa(e.to_string()))?;
    let mut builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
    for (name, ptr) in codegen::host_symbols() {
        builder.symbol(name, ptr);
    }
    Ok(JITModule::new(builder))
}

/// Defines one function whose body `emit` writes; returns its id.
fn define(
    module: &mut JITModule,
    name: &str,
    signature: cranelift_codegen::ir::Signature,
    listing: Listing,
    out: &mut Vec<(String, String)>,
    emit: impl FnOnce(&mut JITModule, &mut FunctionBuilder) -> Result<(), JitError>,
) -> Result<cranelift_module::FuncId, JitError> {
    let id = module.declare_function(name, Linkage::Local, &signature)?;
    let mut ctx = module.make_context();
    ctx.func.signature = signature;
    let mut fctx = FunctionBuilderContext::new();
    let frontend = module.target_config();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        emit(module, &mut b)?;
        b.finalize(frontend);
    }
    if listing.clif {
        out.push((format!("{name} (clif)"), ctx.func.display().to_string()));
    }
    ctx.set_disasm(listing.asm);
    module
        .define_function(id, &mut ctx)
        .map_err(|e| JitError::Codegen(format!("{name}: {e:?}")))?;
    if listing.asm {
        let text = ctx
            .compiled_code()
            .and_then(|c| c.vcode.clone())
            .unwrap_or_default();
        out.push((format!("{name} (asm)"), text));
    }
    module.clear_context(&mut ctx);
    Ok(id)
}

impl Program {
    /// Compiles `graph`; `optimizer` selects the update kernel of a
    /// training graph.
    ///
    /// # Errors
    /// When Cranelift does not support this CPU or rejects a function.
    pub fn compile(
        graph: &Graph,
        optimizer: Option<&Optimizer>,
        listing: Listing,
    ) -> Result<Program, JitError> {
        let started = Instant::now();
        let schedule = fuse::schedule(graph);
        let (offsets, arena_len, params_len) = layout(graph, &schedule);
        let mut module = new_module()?;
        let mut text = Vec::new();

        let mut pending = Vec::new();
        for (i, kernel) in schedule.kernels.iter().enumerate() {
            let Kernel::Fused(fused) = kernel else {
                pending.push((None, kernel.clone()));
                continue;
            };
            let layout = codegen::layout(graph, fused);
            let name = format!(
                "k{i}_{}",
                graph.node(fused.members[0]).name.replace(['/', '.'], "_")
            );
            let sig = codegen::elementwise_signature(&module);
            let id = define(&mut module, &name, sig, listing, &mut text, |m, b| {
                codegen::emit_elementwise(m, b, graph, fused, &layout)
                    .map_err(|e| JitError::from(*e))
            })?;
            pending.push((Some((id, layout)), kernel.clone()));
        }
        let update_id = match optimizer.filter(|_| !graph.grads.is_empty()) {
            Some(opt) => {
                let sig = codegen::update_signature(&module);
                let id = define(&mut module, "update", sig, listing, &mut text, |_, b| {
                    codegen::emit_update(b, opt);
                    Ok(())
                })?;
                Some((id, opt.clone()))
            }
            None => None,
        };
        module.finalize_definitions()?;

        let kernels = pending
            .into_iter()
            .map(|(compiled, kernel)| match compiled {
                Some((id, layout)) => {
                    let ptr = module.get_finalized_function(id);
                    // SAFETY: the function was defined with the elementwise
                    // signature.
                    let func = unsafe { std::mem::transmute::<*const u8, ElementwiseFn>(ptr) };
                    Compiled::Elementwise(Elementwise { func, layout })
                }
                None => Compiled::Kernel(kernel),
            })
            .collect();
        let update = update_id.map(|(id, opt)| {
            let ptr = module.get_finalized_function(id);
            // SAFETY: the function was defined with the update signature.
            (
                unsafe { std::mem::transmute::<*const u8, UpdateFn>(ptr) },
                opt,
            )
        });
        Ok(Program {
            update_runs: update_runs(graph, &offsets),
            graph: graph.clone(),
            schedule,
            kernels,
            offsets,
            arena_len,
            params_len,
            update,
            _module: module,
            compile_time: started.elapsed(),
            listing: text,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The number of kernels a run executes (aliases and sources excluded).
    pub fn kernel_count(&self) -> usize {
        self.schedule
            .kernels
            .iter()
            .filter(|k| match k {
                Kernel::Single(v) => !matches!(
                    self.graph.node(*v).op,
                    Op::Input | Op::Labels | Op::Param(_) | Op::State(_)
                ),
                _ => true,
            })
            .count()
            + usize::from(self.update.is_some())
    }

    pub fn new_arena(&self) -> Arena {
        Arena {
            data: vec![0.0; self.arena_len],
            buffers: [vec![0.0; self.params_len], vec![0.0; self.params_len]],
            scratch: native::Scratch::default(),
        }
    }

    fn slice<'a>(&self, arena: &'a Arena, v: ValueId) -> &'a [f32] {
        let len = self.graph.shape(v).iter().product::<usize>();
        &arena.data[self.offsets[v.index()]..][..len]
    }

    fn slice_mut<'a>(&self, arena: &'a mut Arena, v: ValueId) -> &'a mut [f32] {
        let len = self.graph.shape(v).iter().product::<usize>();
        &mut arena.data[self.offsets[v.index()]..][..len]
    }

    /// The value of `v` after a run, as a tensor.
    ///
    /// # Panics
    /// When `v` lives only inside a fused kernel.
    pub fn value(&self, arena: &Arena, v: ValueId) -> Tensor {
        assert_ne!(self.offsets[v.index()], NOT_STORED, "{v} is not stored");
        let shape = ndarray::IxDyn(self.graph.shape(v));
        Tensor::from_shape_vec(shape, self.slice(arena, v).to_vec()).expect("sizes agree")
    }

    /// Runs every kernel on one batch. `seed` keys the dropout masks.
    ///
    /// # Errors
    /// When the input or labels do not fit the graph, or the weights do not
    /// fit its parameters.
    pub fn run(
        &self,
        arena: &mut Arena,
        weights: &Weights,
        input: &Tensor,
        labels: Option<&[usize]>,
        seed: u64,
        threads: usize,
    ) -> Result<(), JitError> {
        self.run_timed(arena, weights, input, labels, seed, threads, None)
    }

    /// Runs like [`Program::run`], calling `on_kernel(i, time)` after
    /// kernel `i`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_timed(
        &self,
        arena: &mut Arena,
        weights: &Weights,
        input: &Tensor,
        labels: Option<&[usize]>,
        seed: u64,
        threads: usize,
        mut on_kernel: Option<&mut dyn FnMut(usize, Duration)>,
    ) -> Result<(), JitError> {
        weights.validate(&self.graph)?;
        let labels =
            crate::interp::labels_of(&self.graph, &crate::interp::Batch { input, labels })?;
        self.load_sources(arena, weights, input, &labels)?;
        let ctx = Ctx {
            graph: &self.graph,
            base: Ptr(arena.data.as_mut_ptr()),
            offsets: &self.offsets,
            threads,
            labels: &labels,
            seed,
            scratch: &arena.scratch,
        };
        for (i, kernel) in self.kernels.iter().enumerate() {
            let started = on_kernel.as_ref().map(|_| Instant::now());
            // SAFETY: the arena was sized by `layout` for this graph, the
            // sources are loaded, and kernels run in schedule order, so every
            // input is computed before it is read.
            unsafe { self.run_kernel(&ctx, kernel) };
            if let (Some(record), Some(started)) = (on_kernel.as_mut(), started) {
                record(i, started.elapsed());
            }
        }

        Ok(())
    }

    /// Describes kernel `i` for profiles: its operator kind first, then the
    /// value it computes and that value's shape.
    pub fn kernel_label(&self, i: usize) -> String {
        let describe = |v: ValueId| {
            let node = self.graph.node(v);
            format!("{} {:?}", node.name, node.shape.as_slice())
        };
        match &self.schedule.kernels[i] {
            Kernel::Fused(fused) => format!(
                "fused({}) {}",
                fused.members.len(),
                describe(fused.members[fused.members.len() - 1])
            ),
            Kernel::Single(v) => format!("{} {}", self.graph.node(*v).op.name(), describe(*v)),
            Kernel::BatchStats { mean, .. } => format!("batch_stats {}", describe(*mean)),
            Kernel::BatchNormGrad { input, gamma, .. } => match input.or(*gamma) {
                Some(v) => format!("batchnorm_grad {}", describe(v)),
                None => "batchnorm_grad".to_string(),
            },
        }
    }

    /// Returns whether kernel `i` only marks a source (input, labels,
    /// parameter or state) and computes nothing.
    pub fn is_source(&self, i: usize) -> bool {
        matches!(
            &self.schedule.kernels[i],
            Kernel::Single(v) if matches!(
                self.graph.node(*v).op,
                Op::Input | Op::Labels | Op::Param(_) | Op::State(_)
            )
        )
    }

    fn load_sources(
        &self,
        arena: &mut Arena,
        weights: &Weights,
        input: &Tensor,
        labels: &[usize],
    ) -> Result<(), JitError> {
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let v = ValueId(i as u32);
            let source: Option<&Tensor> = match node.op {
                Op::Input => {
                    if input.shape() != node.shape.as_slice() {
                        return Err(InterpError::InputShape {
                            expected: node.shape.clone(),
                            found: input.shape().to_vec(),
                        }
                        .into());
                    }
                    Some(input)
                }
                Op::Param(p) => Some(&weights.params[p]),
                Op::State(s) => Some(&weights.states[s]),
                Op::Labels => {
                    for (d, l) in self.slice_mut(arena, v).iter_mut().zip(labels) {
                        *d = *l as f32;
                    }
                    None
                }
                _ => None,
            };
            if let Some(t) = source {
                copy_into(self.slice_mut(arena, v), t);
            }
        }
        Ok(())
    }

    unsafe fn run_kernel(&self, ctx: &Ctx, kernel: &Compiled) {
        match kernel {
            Compiled::Elementwise(e) => {
                let table: Vec<usize> = e
                    .layout
                    .slots
                    .iter()
                    .map(|v| ctx.base.0.add(self.offsets[v.index()]) as usize)
                    .collect();
                let work = e.layout.rows * e.layout.inner;
                // Splitting small kernels costs more than it saves.
                let threads = if work < 1 << 16 { 1 } else { ctx.threads };
                native::chunks(threads, e.layout.rows, |_, rows| {
                    (e.func)(
                        table.as_ptr() as *const *mut f32,
                        rows.start as u64,
                        rows.end as u64,
                    );
                });
            }
            Compiled::Kernel(Kernel::Single(v)) => native::run_single(ctx, *v),
            Compiled::Kernel(Kernel::BatchStats { mean, var }) => {
                native::batch_stats(ctx, *mean, *var)
            }
            Compiled::Kernel(Kernel::BatchNormGrad { input, gamma, beta }) => {
                native::batchnorm_grad(ctx, *input, *gamma, beta)
            }
            Compiled::Kernel(Kernel::Fused(_)) => unreachable!("fused kernels are compiled"),
        }
    }

    /// Returns the loss after a run of a training graph.
    pub fn loss(&self, arena: &Arena) -> f32 {
        self.graph
            .loss
            .map_or(f32::NAN, |l| self.slice(arena, l)[0])
    }

    /// Applies a training run's results: the new running statistics, and one
    /// optimizer step over every parameter with a gradient.
    pub fn apply_update(
        &self,
        arena: &mut Arena,
        weights: &mut Weights,
        optimizer: &mut OptimizerState,
        threads: usize,
    ) {
        for (state, v) in &self.graph.state_updates {
            copy_from(&mut weights.states[*state], self.slice(arena, *v));
        }
        let Some((update, kind)) = &self.update else {
            return;
        };
        optimizer.step += 1;
        optimizer.buffers.resize(weights.params.len(), [None, None]);
        let param_nodes = self.graph.param_nodes();
        let params_start = param_nodes
            .iter()
            .flatten()
            .map(|v| self.offsets[v.index()])
            .min()
            .unwrap_or(0);
        let used = buffers_used(kind);
        let scalars = codegen::update_scalars(kind, optimizer.lr as f32, optimizer.step);
        let base = Ptr(arena.data.as_mut_ptr());
        for run in &self.update_runs {
            // The kernel updates the parameter and the optimizer's buffers
            // in place, so none of them travels back through the arena,
            // whose copy of the parameter the next run reloads. A buffer
            // the optimizer does not use points at arena scratch that the
            // kernel ignores.
            let param = &mut weights.params[run.index];
            if !param.is_standard_layout() {
                *param = param.as_standard_layout().into_owned();
            }
            let param = Ptr(param.as_mut_ptr());
            let shape = weights.params[run.index].raw_dim();
            let mut buffers = [Ptr(std::ptr::null_mut()), Ptr(std::ptr::null_mut())];
            for (k, slot) in optimizer.buffers[run.index].iter_mut().enumerate() {
                buffers[k] = if used[k] {
                    let tensor = slot.get_or_insert_with(|| Tensor::zeros(shape.clone()));
                    if !tensor.is_standard_layout() {
                        *tensor = tensor.as_standard_layout().into_owned();
                    }
                    Ptr(tensor.as_mut_ptr())
                } else {
                    Ptr(arena.buffers[k][run.param - params_start..].as_mut_ptr())
                };
            }
            let threads = if run.len < 1 << 16 { 1 } else { threads };
            native::chunks(threads, run.len.div_ceil(16), |_, blocks| {
                let start = blocks.start * 16;
                let len = (blocks.end * 16).min(run.len) - start;
                // SAFETY: the gradient lies inside the arena, the
                // parameter and each buffer have `run.len` values, and
                // chunks cover disjoint element ranges.
                unsafe {
                    update(
                        param.get().add(start),
                        base.get().add(run.grad + start),
                        buffers[0].get().add(start),
                        buffers[1].get().add(start),
                        len as u64,
                        scalars.as_ptr(),
                    );
                }
            });
        }
    }
}

/// Which of the two optimizer buffers an optimizer keeps, as the reference
/// executor does.
fn buffers_used(optimizer: &Optimizer) -> [bool; 2] {
    match *optimizer {
        Optimizer::Sgd { momentum, .. } => [momentum != 0.0, false],
        Optimizer::Adam { .. } | Optimizer::AdamW { .. } => [true, true],
        Optimizer::RmsProp { momentum, .. } => [momentum > 0.0, true],
    }
}

fn copy_into(dst: &mut [f32], src: &Tensor) {
    match src.as_slice() {
        Some(s) => dst.copy_from_slice(s),
        None => dst.iter_mut().zip(src.iter()).for_each(|(d, s)| *d = *s),
    }
}

fn copy_from(dst: &mut Tensor, src: &[f32]) {
    match dst.as_slice_mut() {
        Some(d) => d.copy_from_slice(src),
        None => dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s),
    }
}

/// Compiled programs by graph and optimizer.
static CACHE: Mutex<Option<HashMap<u64, Arc<Program>>>> = Mutex::new(None);

/// Returns the compiled program for `graph`, compiling it on first use in
/// this process.
///
/// # Errors
/// As [`Program::compile`].
pub fn compile_cached(
    graph: &Graph,
    optimizer: Option<&Optimizer>,
) -> Result<Arc<Program>, JitError> {
    let key = cache_key(graph, optimizer);
    if let Some(p) = CACHE
        .lock()
        .expect("cache lock")
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Ok(p.clone());
    }
    let program = Arc::new(Program::compile(graph, optimizer, Listing::default())?);
    tracing::debug!(
        kernels = program.kernel_count(),
        ms = program.compile_time.as_secs_f64() * 1e3,
        "compiled a program"
    );
    CACHE
        .lock()
        .expect("cache lock")
        .get_or_insert_with(HashMap::new)
        .insert(key, program.clone());
    Ok(program)
}

/// Hashes what a program depends on: every node's operator, inputs and
/// shape, the parameter and state shapes, the graph's outputs, and the
/// optimizer's kind.
fn cache_key(graph: &Graph, optimizer: Option<&Optimizer>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for node in &graph.nodes {
        format!("{:?}", node.op).hash(&mut h);
        node.inputs.hash(&mut h);
        node.shape.hash(&mut h);
    }
    for p in &graph.params {
        p.shape.hash(&mut h);
    }
    for s in &graph.states {
        s.shape.hash(&mut h);
    }
    (graph.logits, graph.loss).hash(&mut h);
    graph.grads.hash(&mut h);
    graph.state_updates.hash(&mut h);
    // The update kernel depends on the optimizer's kind and on which
    // branches it takes, not on the rates.
    let kind = optimizer.map(|o| match *o {
        Optimizer::Sgd {
            momentum, nesterov, ..
        } => format!("sgd {} {}", momentum != 0.0, nesterov),
        Optimizer::Adam { .. } => "adam".into(),
        Optimizer::AdamW { .. } => "adamw".into(),
        Optimizer::RmsProp { momentum, .. } => format!("rmsprop {}", momentum > 0.0),
    });
    kind.hash(&mut h);
    h.finish()
}
