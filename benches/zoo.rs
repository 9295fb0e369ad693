//! Criterion benchmarks of a JIT training step and an inference batch of
//! each reference model at batch 128, on every core. `kiln bench` reports
//! the same figures as medians with GFLOP/s; this harness adds Criterion's
//! statistics and its comparison with the previous run.
//!
//!     cargo bench --bench zoo

use criterion::{criterion_group, criterion_main, Criterion};
use kiln::interp::optim::OptimizerState;
use kiln::interp::{Tensor, Weights};
use kiln::runtime::engine::Engine;
use ndarray::IxDyn;
use std::time::Duration;

const MODELS: [&str; 5] = ["mlp", "convnet", "bn_convnet", "sepconv", "resnet"];
const BATCH: usize = 128;

fn zoo(c: &mut Criterion) {
    let mut group = c.benchmark_group("zoo");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    for name in MODELS {
        let path = format!("{}/models/{name}.model", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).expect("reference model");
        let report = kiln::check::check_source(&source);
        let instance = report.models[0].instance.clone().expect("valid model");
        let mut engine = Engine::new(instance.graph.clone(), instance.train.loss.clone());
        let graph = engine.train_graph(BATCH).expect("lowers").clone();
        let mut weights = Weights::init(&graph, 0);
        let mut optimizer = OptimizerState::new(instance.train.optimizer.clone());
        let mut dims = vec![BATCH];
        dims.extend(&graph.nodes[0].shape[1..]);
        let len: usize = dims.iter().product();
        let values = (0..len as u64)
            .map(|i| kiln::rng::uniform(1, 2, i))
            .collect();
        let x = Tensor::from_shape_vec(IxDyn(&dims), values).expect("shape");
        let labels: Vec<usize> = (0..BATCH).map(|i| i % 10).collect();

        group.bench_function(format!("train_step/{name}"), |b| {
            b.iter(|| {
                engine
                    .train_step(&mut weights, &mut optimizer, &x, &labels, 0)
                    .expect("step")
            })
        });
        group.bench_function(format!("inference/{name}"), |b| {
            b.iter(|| engine.predict(&weights, &x).expect("inference"))
        });
    }
    group.finish();
}

criterion_group!(benches, zoo);
criterion_main!(benches);
