//! The inner loop of kiln's depthwise convolution, built two ways: as Rust
//! compiled for AVX2 and AVX-512 by the `multiversion` crate (what kiln
//! runs), and as Cranelift code, whose x64 backend emits at most 128-bit
//! vectors. Both sum 32 outputs of a 3x3 filter over a zero-padded 30x30
//! plane (a 28x28 `same` convolution) in registers across the nine taps,
//! with the same multiplies and adds in the same order, so they must give
//! the same bits.
//!
//!     cargo bench --bench taps

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, AbiParam, BlockArg, InstBuilder, MemFlagsData, Value};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use multiversion::multiversion;
use std::hint::black_box;

/// Padded plane width, kernel size, outputs per block, and outputs.
const WIDTH: usize = 30;
const KERNEL: usize = 3;
const BLOCK: usize = 32;
const OUTPUTS: usize = 26 * BLOCK;

/// `dst[i] = Σ taps[t] · src[offsets[t] + i]`, a block of sums at a time.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq+avx2+fma",
    "x86_64+avx2+fma"
))]
fn rust_taps(dst: &mut [f32], src: &[f32], taps: &[f32], offsets: &[usize]) {
    for (b, block) in dst.chunks_exact_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        let mut sums = [0f32; BLOCK];
        for (t, offset) in taps.iter().zip(offsets) {
            for (s, v) in sums.iter_mut().zip(&src[offset + start..][..BLOCK]) {
                *s += t * v;
            }
        }
        block.copy_from_slice(&sums);
    }
}

type TapsFn = unsafe extern "C" fn(*mut f32, *const f32, i64, *const f32, *const i64, i64);

/// Compiles the same loop with Cranelift: eight `f32x4` sums per block,
/// carried through the tap loop as block parameters.
fn cranelift_taps(opt_level: &str) -> (JITModule, TapsFn) {
    let mut flags = settings::builder();
    flags.set("opt_level", opt_level).expect("flag");
    let isa = cranelift_native::builder()
        .expect("host ISA")
        .finish(settings::Flags::new(flags))
        .expect("ISA");
    let mut module = JITModule::new(JITBuilder::with_isa(
        isa,
        cranelift_module::default_libcall_names(),
    ));

    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    for ty in [ptr, ptr, types::I64, ptr, ptr, types::I64] {
        sig.params.push(AbiParam::new(ty));
    }
    let id = module
        .declare_function("taps", Linkage::Local, &sig)
        .expect("declare");

    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    let mut fctx = FunctionBuilderContext::new();
    let frontend = module.target_config();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        emit(&mut b);
        b.finalize(frontend);
    }

    module.define_function(id, &mut ctx).expect("define");
    module.finalize_definitions().expect("finalize");

    let code = module.get_finalized_function(id);
    // SAFETY: the function was defined with this signature.
    (module, unsafe {
        std::mem::transmute::<*const u8, TapsFn>(code)
    })
}

fn emit(b: &mut FunctionBuilder) {
    let flags = MemFlagsData::new().with_notrap();
    let lanes = BLOCK / 4;
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    let outer = b.create_block();
    let start = b.create_block();
    let inner = b.create_block();
    let body = b.create_block();
    let store = b.create_block();
    let exit = b.create_block();
    let block_index = b.append_block_param(outer, types::I64);
    let tap = b.append_block_param(inner, types::I64);
    let sums: Vec<Value> = (0..lanes)
        .map(|_| b.append_block_param(inner, types::F32X4))
        .collect();

    b.switch_to_block(entry);
    let params = b.block_params(entry).to_vec();
    let (dst, src, blocks, taps, offsets, count) = (
        params[0], params[1], params[2], params[3], params[4], params[5],
    );
    let zero = b.ins().iconst(types::I64, 0);
    b.ins().jump(outer, &[BlockArg::Value(zero)]);

    b.switch_to_block(outer);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, block_index, blocks);
    b.ins().brif(more, start, &[], exit, &[]);

    b.switch_to_block(start);
    let zero_sum = b.ins().f32const(0.0);
    let zero_sum = b.ins().splat(types::F32X4, zero_sum);
    let first_tap = b.ins().iconst(types::I64, 0);
    let mut args = vec![BlockArg::Value(first_tap)];
    args.extend((0..lanes).map(|_| BlockArg::Value(zero_sum)));
    b.ins().jump(inner, &args);

    b.switch_to_block(inner);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, tap, count);
    b.ins().brif(more, body, &[], store, &[]);

    b.switch_to_block(body);
    let tap_bytes = b.ins().imul_imm_s(tap, 4);
    let at = b.ins().iadd(taps, tap_bytes);
    let weight = b.ins().load(types::F32, flags, at, 0);
    let weight = b.ins().splat(types::F32X4, weight);
    let offset_bytes = b.ins().imul_imm_s(tap, 8);
    let at = b.ins().iadd(offsets, offset_bytes);
    let offset = b.ins().load(types::I64, flags, at, 0);
    let element = b.ins().imul_imm_s(block_index, BLOCK as i64);
    let element = b.ins().iadd(element, offset);
    let bytes = b.ins().imul_imm_s(element, 4);
    let row = b.ins().iadd(src, bytes);
    let next_tap = b.ins().iadd_imm_s(tap, 1);
    let mut args = vec![BlockArg::Value(next_tap)];
    for (j, sum) in sums.iter().enumerate() {
        let v = b.ins().load(types::F32X4, flags, row, (16 * j) as i32);
        let product = b.ins().fmul(weight, v);
        args.push(BlockArg::Value(b.ins().fadd(*sum, product)));
    }
    b.ins().jump(inner, &args);

    b.switch_to_block(store);
    let bytes = b.ins().imul_imm_s(block_index, 4 * BLOCK as i64);
    let out = b.ins().iadd(dst, bytes);
    for (j, sum) in sums.iter().enumerate() {
        b.ins().store(flags, *sum, out, (16 * j) as i32);
    }
    let next = b.ins().iadd_imm_s(block_index, 1);
    b.ins().jump(outer, &[BlockArg::Value(next)]);

    b.switch_to_block(exit);
    b.ins().return_(&[]);
    b.seal_all_blocks();
}

fn taps(c: &mut Criterion) {
    let src: Vec<f32> = (0..WIDTH * WIDTH + BLOCK)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let taps: Vec<f32> = (0..KERNEL * KERNEL).map(|t| 0.1 * t as f32 - 0.3).collect();
    let offsets: Vec<usize> = (0..KERNEL * KERNEL)
        .map(|t| (t / KERNEL) * WIDTH + t % KERNEL)
        .collect();
    let offsets_i64: Vec<i64> = offsets.iter().map(|&o| o as i64).collect();

    let mut expected = vec![0f32; OUTPUTS];
    rust_taps(&mut expected, &src, &taps, &offsets);
    let compiled: Vec<(&str, JITModule, TapsFn)> = ["none", "speed"]
        .into_iter()
        .map(|level| {
            let (module, f) = cranelift_taps(level);
            (level, module, f)
        })
        .collect();
    let run = |f: TapsFn, dst: &mut [f32]| {
        // SAFETY: `dst` has room for OUTPUTS values, and `src` covers every
        // tap's reads for them.
        unsafe {
            f(
                dst.as_mut_ptr(),
                src.as_ptr(),
                (OUTPUTS / BLOCK) as i64,
                taps.as_ptr(),
                offsets_i64.as_ptr(),
                taps.len() as i64,
            )
        }
    };
    for (level, _, f) in &compiled {
        let mut actual = vec![0f32; OUTPUTS];
        run(*f, &mut actual);
        assert_eq!(actual, expected, "Cranelift ({level}) differs from Rust");
    }

    let mut group = c.benchmark_group("depthwise_taps");
    group.throughput(Throughput::Elements((OUTPUTS * taps.len()) as u64));
    let mut dst = vec![0f32; OUTPUTS];
    group.bench_function("rust_multiversion", |b| {
        b.iter(|| rust_taps(black_box(&mut dst), &src, &taps, &offsets))
    });
    for (level, _, f) in &compiled {
        group.bench_function(format!("cranelift_f32x4_opt_{level}"), |b| {
            b.iter(|| run(*f, black_box(&mut dst)))
        });
    }
    group.finish();
}

criterion_group!(benches, taps);
criterion_main!(benches);
