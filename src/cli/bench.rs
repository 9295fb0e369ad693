//! `kiln bench MODEL`: times training steps and inference of a model on
//! random data and reports medians and achieved GFLOP/s.

use super::exit;
use crate::interp::optim::OptimizerState;
use crate::interp::{Tensor, Weights};
use crate::runtime::engine::ExecutorKind;
use clap::Args;
use ndarray::IxDyn;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// The `.model` file.
    pub file: PathBuf,
    /// Which model of the file; the first when omitted.
    #[arg(long)]
    pub model: Option<String>,
    /// Samples per batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also time every kernel of the training step and list the slowest.
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub exec: super::train::ExecArgs,
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn run(args: BenchArgs) -> u8 {
    let Some(instance) = super::compile::load_instance(&args.file, args.model.as_deref()) else {
        return exit::INVALID_MODEL;
    };
    let batch = args.batch.max(1);
    let graph = &instance.graph;
    let input_shape = graph.node(graph.inputs[0].1).shape.0.clone();
    let classes: usize = graph.node(graph.output.expect("output")).shape.numel();
    let mut dims = vec![batch];
    dims.extend(&input_shape);
    let count: usize = dims.iter().product();
    let x = Tensor::from_shape_vec(
        IxDyn(&dims),
        (0..count)
            .map(|i| crate::rng::uniform(1, 2, i as u64))
            .collect(),
    )
    .expect("shape");
    let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();

    let mut engine = match args.exec.engine(graph.clone(), instance.train.loss.clone()) {
        Ok(engine) => engine,
        Err((code, message)) => {
            eprintln!("kiln: {message}");
            return code;
        }
    };
    // Compile time covers lowering, differentiation, fusion and code
    // generation of the training program.
    let compile_start = Instant::now();
    let prepared = match engine.executor() {
        ExecutorKind::Jit => engine
            .compiled_train(batch, &instance.train.optimizer)
            .map(|p| p.graph().clone()),
        ExecutorKind::Reference => engine.train_graph(batch).cloned(),
    };
    let train_graph = match prepared {
        Ok(g) => g,
        Err(e) => {
            eprintln!("kiln: {e}");
            return exit::INVALID_MODEL;
        }
    };
    let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
    let executor = match engine.executor() {
        ExecutorKind::Jit => "jit",
        ExecutorKind::Reference => "reference",
    };
    let threads = engine.threads();
    let mut weights = Weights::init(&train_graph, 0);
    let mut optimizer = OptimizerState::new(instance.train.optimizer.clone());

    let mut step_times = Vec::new();
    for step in 0..=args.steps.max(1) {
        let start = Instant::now();
        if let Err(e) = engine.train_step(&mut weights, &mut optimizer, &x, &labels, step as u64) {
            eprintln!("kiln: {e}");
            return exit::USAGE;
        }
        if step > 0 {
            step_times.push(start.elapsed().as_secs_f64());
        }
    }
    let mut infer_times = Vec::new();
    for _ in 0..=args.steps.max(1) {
        let start = Instant::now();
        if let Err(e) = engine.predict(&weights, &x) {
            eprintln!("kiln: {e}");
            return exit::USAGE;
        }
        infer_times.push(start.elapsed().as_secs_f64());
    }
    let step = median(step_times);
    let infer = median(infer_times[1..].to_vec());
    // A training step costs about three forward passes: forward, and the
    // gradients with respect to inputs and to weights.
    let flops = 2.0 * graph.macs() as f64 * batch as f64;
    let train_gflops = 3.0 * flops / step / 1e9;
    let report = serde_json::json!({
        "model": args.file.display().to_string(),
        "executor": executor,
        "batch": batch,
        "threads": threads,
        "compile_ms": compile_ms,
        "train_step_ms": step * 1e3,
        "train_gflops": train_gflops,
        "inference_samples_per_s": batch as f64 / infer,
        "inference_gflops": flops / infer / 1e9,
    });
    if args.profile && engine.executor() == ExecutorKind::Jit {
        match engine.profile_train(&weights, &instance.train.optimizer, &x, &labels, args.steps) {
            Ok(kernels) => print_profile(&kernels),
            Err(e) => eprintln!("kiln: profiling failed: {e}"),
        }
    }
    if args.json {
        println!("{report}");
    } else {
        println!("model            {}", args.file.display());
        println!("executor         {executor}, batch {batch}, {threads} threads");
        println!("compile          {compile_ms:.1} ms");
        println!(
            "training step    {:.1} ms (median of {}), {train_gflops:.1} GFLOP/s",
            step * 1e3,
            args.steps.max(1)
        );
        println!(
            "inference        {:.0} samples/s, {:.1} GFLOP/s",
            batch as f64 / infer,
            flops / infer / 1e9
        );
    }
    exit::OK
}

/// Prints the slowest kernels and each operator kind's share of the step.
/// The list goes to standard error, so `--json` output stays clean.
fn print_profile(kernels: &[(String, f64)]) {
    let total: f64 = kernels.iter().map(|(_, t)| t).sum();
    let mut by_time: Vec<(usize, &(String, f64))> = kernels.iter().enumerate().collect();
    by_time.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    eprintln!("kernels (median per run, {:.1} ms in total):", total * 1e3);
    eprintln!(
        "  {:>7}     {:>6}  operator, value and shape",
        "time", "share"
    );
    for (_, (label, time)) in by_time.iter().take(25) {
        eprintln!(
            "  {:>7.2} ms  {:>5.1}%  {label}",
            time * 1e3,
            100.0 * time / total
        );
    }

    let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
    for (label, time) in kernels {
        let kind: String = label
            .split([' ', '(', '{'])
            .next()
            .unwrap_or_default()
            .to_string();
        *by_kind.entry(kind).or_default() += time;
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!("by operator:");
    for (kind, time) in kinds {
        eprintln!(
            "  {:>7.2} ms  {:>5.1}%  {kind}",
            time * 1e3,
            100.0 * time / total
        );
    }
}
