//! Cranelift code generation for fused elementwise kernels and the
//! optimizer update.
//!
//! Both kinds of kernel are loops over rows of contiguous `f32`s: the body
//! runs on `f32x4` vectors (the widest type Cranelift's x64 backend accepts)
//! and then on single lanes for the tail. Every operator is emitted with the
//! same operations in the same order as the reference executor, without
//! contracting multiply-adds, so the JIT's elementwise results equal the
//! reference's bit for bit. Activations that need `exp`, `tanh` or `erf`
//! call the reference's scalar functions lane by lane.

use crate::check::train::Optimizer;
use crate::fuse::{elementwise_arity, Fused};
use crate::interp::ops::{act_derivative, act_value};
use crate::ir::{Act, Graph, Op, ValueId};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, BlockArg, FuncRef, InstBuilder, MemFlagsData, Signature, Type, Value,
};
use cranelift_frontend::FunctionBuilder;
use cranelift_module::{Linkage, Module, ModuleError};

/// Errors of code generation, boxed because Cranelift's are large.
pub type CodegenResult<T> = Result<T, Box<ModuleError>>;
use std::collections::HashMap;

const LANES: i64 = 4;

/// Where a fused kernel's operands live: slot `k` of the pointer table that
/// the kernel receives contains the base address of `slots[k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementwiseLayout {
    pub slots: Vec<ValueId>,
    /// Rows of the iteration space; a call covers a range of rows.
    pub rows: usize,
    /// Contiguous elements per row.
    pub inner: usize,
    /// When batch normalization is fused, rows are channel planes and row
    /// `r` belongs to channel `r % channels`.
    pub channels: Option<usize>,
}

/// Chooses the iteration space of a fused kernel: channel planes when a
/// per-channel operand is involved, else one row per sample.
pub fn layout(graph: &Graph, kernel: &Fused) -> ElementwiseLayout {
    let shape = graph.shape(kernel.members[0]);
    let per_channel = kernel
        .members
        .iter()
        .any(|m| matches!(graph.node(*m).op, Op::BatchNorm { .. }));
    let len: usize = shape.iter().product();
    let rows = if per_channel {
        shape[0] * shape[1]
    } else {
        shape[0]
    };
    let mut slots: Vec<ValueId> = Vec::new();
    for m in &kernel.members {
        for input in &graph.node(*m).inputs {
            if !kernel.members.contains(input) && !slots.contains(input) {
                slots.push(*input);
            }
        }
    }
    slots.extend(kernel.outputs.iter().copied());
    ElementwiseLayout {
        slots,
        rows,
        inner: len / rows.max(1),
        channels: per_channel.then(|| shape[1]),
    }
}

/// Returns the signature of every fused kernel: `(slots, row_start,
/// row_end)`.
pub fn elementwise_signature(module: &dyn Module) -> Signature {
    let mut sig = module.make_signature();
    let ptr = module.target_config().pointer_type();
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));
    sig
}

/// Returns the signature of the update kernel: `(param, grad, buf0, buf1,
/// len, scalars)`.
pub fn update_signature(module: &dyn Module) -> Signature {
    let mut sig = module.make_signature();
    let ptr = module.target_config().pointer_type();
    for _ in 0..4 {
        sig.params.push(AbiParam::new(ptr));
    }
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(ptr));
    sig
}

/// Host functions that kernels call, by symbol name.
pub fn host_symbols() -> Vec<(&'static str, *const u8)> {
    extern "C" fn sigmoid(x: f32) -> f32 {
        act_value(Act::Sigmoid, x)
    }
    extern "C" fn tanh(x: f32) -> f32 {
        act_value(Act::Tanh, x)
    }
    extern "C" fn gelu(x: f32) -> f32 {
        act_value(Act::Gelu { tanh: false }, x)
    }
    extern "C" fn gelu_tanh(x: f32) -> f32 {
        act_value(Act::Gelu { tanh: true }, x)
    }
    extern "C" fn d_sigmoid(x: f32) -> f32 {
        act_derivative(Act::Sigmoid, x)
    }
    extern "C" fn d_tanh(x: f32) -> f32 {
        act_derivative(Act::Tanh, x)
    }
    extern "C" fn d_gelu(x: f32) -> f32 {
        act_derivative(Act::Gelu { tanh: false }, x)
    }
    extern "C" fn d_gelu_tanh(x: f32) -> f32 {
        act_derivative(Act::Gelu { tanh: true }, x)
    }
    vec![
        ("kiln_sigmoid", sigmoid as *const u8),
        ("kiln_tanh", tanh as *const u8),
        ("kiln_gelu", gelu as *const u8),
        ("kiln_gelu_tanh", gelu_tanh as *const u8),
        ("kiln_d_sigmoid", d_sigmoid as *const u8),
        ("kiln_d_tanh", d_tanh as *const u8),
        ("kiln_d_gelu", d_gelu as *const u8),
        ("kiln_d_gelu_tanh", d_gelu_tanh as *const u8),
    ]
}

/// The host function computing `act` (or its derivative) on one lane, for
/// activations without a vector form.
fn host_function(act: Act, derivative: bool) -> Option<&'static str> {
    let (value, grad) = match act {
        Act::Relu | Act::LeakyRelu(_) => return None,
        Act::Sigmoid => ("kiln_sigmoid", "kiln_d_sigmoid"),
        Act::Tanh => ("kiln_tanh", "kiln_d_tanh"),
        Act::Gelu { tanh: false } => ("kiln_gelu", "kiln_d_gelu"),
        Act::Gelu { tanh: true } => ("kiln_gelu_tanh", "kiln_d_gelu_tanh"),
    };
    Some(if derivative { grad } else { value })
}

fn flags() -> MemFlagsData {
    // Kernels read and write arena memory that the schedule sized, so no
    // access traps. Vectors are only 4-byte aligned, so the flags do not
    // claim alignment.
    MemFlagsData::new().with_notrap()
}

/// Emits code into a function, with helpers for types that are either one
/// lane or four.
struct Emitter<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    calls: HashMap<&'static str, FuncRef>,
}

impl Emitter<'_, '_> {
    fn constant(&mut self, ty: Type, v: f32) -> Value {
        let c = self.b.ins().f32const(v);
        if ty == types::F32 {
            c
        } else {
            self.b.ins().splat(ty, c)
        }
    }

    /// `x > 0 ? then : otherwise`, lane by lane.
    fn positive_select(&mut self, ty: Type, x: Value, then: Value, otherwise: Value) -> Value {
        let zero = self.constant(ty, 0.0);
        let mask = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
        if ty == types::F32 {
            self.b.ins().select(mask, then, otherwise)
        } else {
            let mask = self
                .b
                .ins()
                .bitcast(types::F32X4, MemFlagsData::new(), mask);
            self.b.ins().bitselect(mask, then, otherwise)
        }
    }

    /// Calls a host function on each lane of `x`.
    fn per_lane(&mut self, ty: Type, name: &'static str, x: Value) -> Value {
        let f = self.calls[name];
        if ty == types::F32 {
            let call = self.b.ins().call(f, &[x]);
            return self.b.inst_results(call)[0];
        }
        let mut out = x;
        for lane in 0..LANES as u8 {
            let v = self.b.ins().extractlane(x, lane);
            let call = self.b.ins().call(f, &[v]);
            let r = self.b.inst_results(call)[0];
            out = self.b.ins().insertlane(out, r, lane);
        }
        out
    }

    fn act(&mut self, ty: Type, act: Act, x: Value) -> Value {
        match act {
            Act::Relu => {
                let zero = self.constant(ty, 0.0);
                self.positive_select(ty, x, x, zero)
            }
            Act::LeakyRelu(slope) => {
                let s = self.constant(ty, slope);
                let scaled = self.b.ins().fmul(s, x);
                self.positive_select(ty, x, x, scaled)
            }
            _ => self.per_lane(ty, host_function(act, false).expect("no vector form"), x),
        }
    }

    fn act_grad(&mut self, ty: Type, act: Act, dy: Value, x: Value) -> Value {
        match act {
            Act::Relu => {
                let zero = self.constant(ty, 0.0);
                self.positive_select(ty, x, dy, zero)
            }
            Act::LeakyRelu(slope) => {
                let s = self.constant(ty, slope);
                let scaled = self.b.ins().fmul(dy, s);
                self.positive_select(ty, x, dy, scaled)
            }
            _ => {
                let d = self.per_lane(ty, host_function(act, true).expect("no vector form"), x);
                self.b.ins().fmul(dy, d)
            }
        }
    }

    fn splat_if(&mut self, ty: Type, x: Value) -> Value {
        if ty == types::F32 {
            x
        } else {
            self.b.ins().splat(ty, x)
        }
    }

    /// Emits a loop over `len` elements: `body(emitter, type, byte offset)`
    /// runs on vectors while four elements remain, then on single lanes.
    /// Returns with the builder in the block after the loop.
    fn strip(&mut self, len: Value, mut body: impl FnMut(&mut Self, Type, Value)) {
        let vector = self.b.create_block();
        let tail = self.b.create_block();
        let done = self.b.create_block();
        let i_vec = self.b.append_block_param(vector, types::I64);
        let i_tail = self.b.append_block_param(tail, types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.ins().jump(vector, &[BlockArg::Value(zero)]);

        self.b.switch_to_block(vector);
        let next = self.b.ins().iadd_imm_s(i_vec, LANES);
        let fits = self.b.ins().icmp(IntCC::UnsignedLessThanOrEqual, next, len);
        let body_block = self.b.create_block();
        self.b
            .ins()
            .brif(fits, body_block, &[], tail, &[BlockArg::Value(i_vec)]);
        self.b.switch_to_block(body_block);
        let offset = self.b.ins().imul_imm_s(i_vec, 4);
        body(self, types::F32X4, offset);
        self.b.ins().jump(vector, &[BlockArg::Value(next)]);

        self.b.switch_to_block(tail);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i_tail, len);
        let tail_body = self.b.create_block();
        self.b.ins().brif(more, tail_body, &[], done, &[]);
        self.b.switch_to_block(tail_body);
        let offset = self.b.ins().imul_imm_s(i_tail, 4);
        body(self, types::F32, offset);
        let next = self.b.ins().iadd_imm_s(i_tail, 1);
        self.b.ins().jump(tail, &[BlockArg::Value(next)]);

        self.b.switch_to_block(done);
    }

    fn load(&mut self, ty: Type, base: Value, offset: Value) -> Value {
        let p = self.b.ins().iadd(base, offset);
        self.b.ins().load(ty, flags(), p, 0)
    }

    fn store(&mut self, v: Value, base: Value, offset: Value) {
        let p = self.b.ins().iadd(base, offset);
        self.b.ins().store(flags(), v, p, 0);
    }
}

/// Imports the host functions a kernel calls.
fn import_calls(
    module: &mut dyn Module,
    b: &mut FunctionBuilder,
    names: &[&'static str],
) -> CodegenResult<HashMap<&'static str, FuncRef>> {
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(types::F32));
    sig.returns.push(AbiParam::new(types::F32));
    let mut calls = HashMap::new();
    for &name in names {
        let id = module
            .declare_function(name, Linkage::Import, &sig)
            .map_err(Box::new)?;
        calls.insert(name, module.declare_func_in_func(id, b.func));
    }
    Ok(calls)
}

/// Host functions that the members of a fused kernel call.
fn needed_calls(graph: &Graph, kernel: &Fused) -> Vec<&'static str> {
    let mut names = Vec::new();
    for m in &kernel.members {
        let name = match graph.node(*m).op {
            Op::Act(a) => host_function(a, false),
            Op::ActGrad(a) => host_function(a, true),
            _ => None,
        };
        if let Some(name) = name.filter(|n| !names.contains(n)) {
            names.push(name);
        }
    }
    names
}

/// Per-channel values of a fused batch normalization, loaded once per row.
struct ChannelAffine {
    mean: Value,
    inv_std: Value,
    gamma: Value,
    beta: Value,
}

/// Emits the body of a fused elementwise kernel.
///
/// # Errors
/// When a host function cannot be declared.
pub fn emit_elementwise(
    module: &mut dyn Module,
    b: &mut FunctionBuilder,
    graph: &Graph,
    kernel: &Fused,
    layout: &ElementwiseLayout,
) -> CodegenResult<()> {
    let calls = import_calls(module, b, &needed_calls(graph, kernel))?;
    let ptr = module.target_config().pointer_type();
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let [table, start, end] = b.block_params(entry)[..] else {
        unreachable!("three parameters")
    };
    let bases: Vec<Value> = (0..layout.slots.len())
        .map(|k| b.ins().load(ptr, flags(), table, (k * 8) as i32))
        .collect();
    let slot = |v: ValueId| layout.slots.iter().position(|s| *s == v);

    let header = b.create_block();
    let exit = b.create_block();
    let row = b.append_block_param(header, types::I64);
    b.ins().jump(header, &[BlockArg::Value(start)]);
    b.switch_to_block(header);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, row, end);
    let row_body = b.create_block();
    b.ins().brif(more, row_body, &[], exit, &[]);
    b.switch_to_block(row_body);

    let mut e = Emitter { b, calls };
    let row_bytes = e.b.ins().imul_imm_s(row, (layout.inner * 4) as i64);
    let affine = channel_affines(&mut e, graph, kernel, layout, &bases, row);
    let len = e.b.ins().iconst(types::I64, layout.inner as i64);
    e.strip(len, |e, ty, offset| {
        let at = e.b.ins().iadd(row_bytes, offset);
        let mut values: HashMap<ValueId, Value> = HashMap::new();
        for m in &kernel.members {
            let node = graph.node(*m);
            let arity = elementwise_arity(&node.op);
            let args: Vec<Value> = node.inputs[..arity]
                .iter()
                .map(|v| match values.get(v) {
                    Some(x) => *x,
                    None => e.load(ty, bases[slot(*v).expect("operand slot")], at),
                })
                .collect();
            let out = match node.op {
                Op::Act(a) => e.act(ty, a, args[0]),
                Op::ActGrad(a) => e.act_grad(ty, a, args[0], args[1]),
                Op::Add => e.b.ins().fadd(args[0], args[1]),
                Op::Mul => e.b.ins().fmul(args[0], args[1]),
                Op::BatchNorm { .. } => {
                    let c = &affine[m];
                    let (mean, inv, gamma, beta) = (
                        e.splat_if(ty, c.mean),
                        e.splat_if(ty, c.inv_std),
                        e.splat_if(ty, c.gamma),
                        e.splat_if(ty, c.beta),
                    );
                    let centred = e.b.ins().fsub(args[0], mean);
                    let scaled = e.b.ins().fmul(centred, inv);
                    let scaled = e.b.ins().fmul(scaled, gamma);
                    e.b.ins().fadd(scaled, beta)
                }
                ref op => unreachable!("{} is not elementwise", op.name()),
            };
            values.insert(*m, out);
            if kernel.outputs.contains(m) {
                e.store(out, bases[slot(*m).expect("output slot")], at);
            }
        }
    });
    let next = e.b.ins().iadd_imm_s(row, 1);
    e.b.ins().jump(header, &[BlockArg::Value(next)]);

    e.b.switch_to_block(exit);
    e.b.ins().return_(&[]);
    e.b.seal_all_blocks();
    Ok(())
}

/// Loads each fused batch normalization's per-channel values for `row`.
fn channel_affines(
    e: &mut Emitter,
    graph: &Graph,
    kernel: &Fused,
    layout: &ElementwiseLayout,
    bases: &[Value],
    row: Value,
) -> HashMap<ValueId, ChannelAffine> {
    let mut out = HashMap::new();
    let Some(channels) = layout.channels else {
        return out;
    };
    let channel = e.b.ins().urem_imm_u(row, channels as i64);
    let at = e.b.ins().imul_imm_s(channel, 4);
    for m in &kernel.members {
        let node = graph.node(*m);
        let Op::BatchNorm { eps } = node.op else {
            continue;
        };
        let slot_of = |v: ValueId| layout.slots.iter().position(|s| *s == v).expect("slot");
        let mut load = |i: usize| e.load(types::F32, bases[slot_of(node.inputs[i])], at);
        let (mean, var, gamma, beta) = (load(1), load(2), load(3), load(4));
        let eps = e.b.ins().f32const(eps);
        let shifted = e.b.ins().fadd(var, eps);
        let root = e.b.ins().sqrt(shifted);
        let one = e.b.ins().f32const(1.0);
        let inv_std = e.b.ins().fdiv(one, root);
        out.insert(
            *m,
            ChannelAffine {
                mean,
                inv_std,
                gamma,
                beta,
            },
        );
    }
    out
}

/// The optimizer's scalars for one step, in the order the update kernel
/// reads them, computed in `f32` exactly as the reference executor does.
pub fn update_scalars(optimizer: &Optimizer, lr: f32, step: u64) -> Vec<f32> {
    match *optimizer {
        Optimizer::Sgd {
            momentum,
            weight_decay,
            ..
        } => vec![lr, momentum as f32, weight_decay as f32],
        Optimizer::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        }
        | Optimizer::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } => {
            let (b1, b2) = (beta1 as f32, beta2 as f32);
            let correction1 = 1.0 - b1.powi(step as i32);
            let correction2 = (1.0 - b2.powi(step as i32)).sqrt();
            vec![
                lr,
                b1,
                1.0 - b1,
                b2,
                1.0 - b2,
                eps as f32,
                weight_decay as f32,
                correction2,
                lr / correction1,
                1.0 - lr * weight_decay as f32,
            ]
        }
        Optimizer::RmsProp {
            alpha,
            eps,
            momentum,
            weight_decay,
            ..
        } => {
            let alpha = alpha as f32;
            vec![
                lr,
                alpha,
                1.0 - alpha,
                eps as f32,
                momentum as f32,
                weight_decay as f32,
            ]
        }
    }
}

/// Emits the update kernel of `optimizer`: one pass over a run of
/// parameters, their gradients and the optimizer's buffers.
pub fn emit_update(b: &mut FunctionBuilder, optimizer: &Optimizer) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let [param, grad, buf0, buf1, len, scalars] = b.block_params(entry)[..] else {
        unreachable!("six parameters")
    };
    let count = update_scalars(optimizer, 0.0, 1).len();
    let s: Vec<Value> = (0..count)
        .map(|i| b.ins().load(types::F32, flags(), scalars, (i * 4) as i32))
        .collect();
    let mut e = Emitter {
        b,
        calls: HashMap::new(),
    };
    e.strip(len, |e, ty, at| {
        let s: Vec<Value> = s.iter().map(|v| e.splat_if(ty, *v)).collect();
        let p = e.load(ty, param, at);
        let g = e.load(ty, grad, at);
        let new_p = match *optimizer {
            Optimizer::Sgd {
                momentum, nesterov, ..
            } => {
                let decayed = e.b.ins().fmul(p, s[2]);
                let mut g = e.b.ins().fadd(g, decayed);
                if momentum != 0.0 {
                    let m = e.load(ty, buf0, at);
                    let m = e.b.ins().fmul(m, s[1]);
                    let m = e.b.ins().fadd(m, g);
                    e.store(m, buf0, at);
                    g = if nesterov {
                        let ahead = e.b.ins().fmul(m, s[1]);
                        e.b.ins().fadd(g, ahead)
                    } else {
                        m
                    };
                }
                let step = e.b.ins().fmul(g, s[0]);
                e.b.ins().fsub(p, step)
            }
            Optimizer::Adam { .. } => {
                let decayed = e.b.ins().fmul(p, s[6]);
                let g = e.b.ins().fadd(g, decayed);
                adam_step(e, ty, p, g, &s, [buf0, buf1], at)
            }
            Optimizer::AdamW { .. } => {
                let p = e.b.ins().fmul(p, s[9]);
                adam_step(e, ty, p, g, &s, [buf0, buf1], at)
            }
            Optimizer::RmsProp { momentum, .. } => {
                let decayed = e.b.ins().fmul(p, s[5]);
                let g = e.b.ins().fadd(g, decayed);
                let sq = e.load(ty, buf1, at);
                let sq = e.b.ins().fmul(sq, s[1]);
                let g2 = e.b.ins().fmul(g, g);
                let g2 = e.b.ins().fmul(g2, s[2]);
                let sq = e.b.ins().fadd(sq, g2);
                e.store(sq, buf1, at);
                let root = e.b.ins().sqrt(sq);
                let denom = e.b.ins().fadd(root, s[3]);
                let scaled = e.b.ins().fdiv(g, denom);
                let direction = if momentum > 0.0 {
                    let m = e.load(ty, buf0, at);
                    let m = e.b.ins().fmul(m, s[4]);
                    let m = e.b.ins().fadd(m, scaled);
                    e.store(m, buf0, at);
                    m
                } else {
                    scaled
                };
                let step = e.b.ins().fmul(direction, s[0]);
                e.b.ins().fsub(p, step)
            }
        };
        e.store(new_p, param, at);
    });
    e.b.ins().return_(&[]);
    e.b.seal_all_blocks();
}

/// `m = β1 m + (1 - β1) g; v = β2 v + (1 - β2) g²;
/// p -= (m / (sqrt(v) / c2 + eps)) · (lr / c1)`.
fn adam_step(
    e: &mut Emitter,
    ty: Type,
    p: Value,
    g: Value,
    s: &[Value],
    [buf0, buf1]: [Value; 2],
    at: Value,
) -> Value {
    let m = e.load(ty, buf0, at);
    let m = e.b.ins().fmul(m, s[1]);
    let gm = e.b.ins().fmul(g, s[2]);
    let m = e.b.ins().fadd(m, gm);
    e.store(m, buf0, at);
    let v = e.load(ty, buf1, at);
    let v = e.b.ins().fmul(v, s[3]);
    let g2 = e.b.ins().fmul(g, g);
    let g2 = e.b.ins().fmul(g2, s[4]);
    let v = e.b.ins().fadd(v, g2);
    e.store(v, buf1, at);
    let root = e.b.ins().sqrt(v);
    let denom = e.b.ins().fdiv(root, s[7]);
    let denom = e.b.ins().fadd(denom, s[5]);
    let ratio = e.b.ins().fdiv(m, denom);
    let step = e.b.ins().fmul(ratio, s[8]);
    e.b.ins().fsub(p, step)
}
