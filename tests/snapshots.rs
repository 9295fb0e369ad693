//! Snapshot of the IR and its backward graph for the residual reference
//! model: lowering and differentiation changes show up as a diff of
//! `tests/snapshots/snapshots__resnet_train_ir.snap`. Accept an intended
//! change with `INSTA_UPDATE=always cargo test --release --test snapshots`.

mod common;

#[test]
fn resnet_train_ir() {
    let source = include_str!("../models/resnet.model");
    let graph = common::train_graph(source, 4);
    insta::assert_snapshot!(graph.to_string());
}

#[test]
fn resnet_eval_ir() {
    let source = include_str!("../models/resnet.model");
    let graph = common::eval_graph(source, 4);
    insta::assert_snapshot!(graph.to_string());
}
