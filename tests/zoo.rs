//! The reference models in `models/` check cleanly, and their trainable
//! parameter counts equal what PyTorch reports for the same architectures
//! (a conv or dense layer followed by batch normalization has no bias).

use kiln::check::{check_source, CheckReport};
use kiln::diag::render::{render_text, SourceFile};
use std::path::Path;

fn check_model_file(name: &str) -> CheckReport {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("model file exists");
    let report = check_source(&text);
    let rendered = render_text(&SourceFile { name, text: &text }, &report.diagnostics);
    assert!(report.diagnostics.is_empty(), "{name}:\n{rendered}");
    report
}

fn trainable_params(name: &str) -> usize {
    let report = check_model_file(name);
    let instance = report.models[0].instance.as_ref().expect("valid model");
    instance.graph.params()
}

#[test]
fn mlp_params_match_pytorch() {
    assert_eq!(trainable_params("mlp.model"), 269_322);
}

#[test]
fn convnet_params_match_pytorch() {
    assert_eq!(trainable_params("convnet.model"), 34_826);
}

#[test]
fn bn_convnet_params_match_pytorch() {
    assert_eq!(trainable_params("bn_convnet.model"), 468_138);
}

#[test]
fn sepconv_params_match_pytorch() {
    assert_eq!(trainable_params("sepconv.model"), 35_722);
}

#[test]
fn resnet_params_match_pytorch() {
    assert_eq!(trainable_params("resnet.model"), 169_834);
}

#[test]
fn digits_model_checks() {
    let report = check_model_file("digits.model");
    let graph = &report.models[0].instance.as_ref().unwrap().graph;
    assert_eq!(graph.node(graph.inputs[0].1).shape.0, vec![1, 8, 8]);
}

#[test]
fn digits_search_space_is_checked() {
    let report = check_model_file("digits_search.model");
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    let model = &report.models[0];
    assert_eq!(model.space.params.len(), 4);
    assert!(model.points_checked >= 30, "{}", model.points_checked);
}

#[test]
fn fashion_search_space_is_checked() {
    let report = check_model_file("fashion_search.model");
    let model = &report.models[0];
    assert!(model.space.params.len() >= 5);
    let conditional = model.space.params.iter().filter(|p| p.condition.is_some());
    assert_eq!(conditional.count(), 1);
    assert!(model.points_checked > 100, "{}", model.points_checked);
    assert!(!model.points_cut);
}

#[test]
fn resnet_shapes_follow_the_zoo() {
    let report = check_model_file("resnet.model");
    let graph = &report.models[0].instance.as_ref().unwrap().graph;
    let out = graph.node(graph.output.unwrap());
    assert_eq!(out.shape.0, vec![10]);
    // The downsampling block halves 28x28 to 14x14 at 64 channels.
    let pooled = graph.node(out.inputs[0]);
    assert_eq!(pooled.shape.0, vec![64]);
    let before_pool = graph.node(pooled.inputs[0]);
    assert_eq!(before_pool.shape.0, vec![64, 14, 14]);
}
