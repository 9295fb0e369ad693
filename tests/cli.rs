//! End-to-end runs of the `kiln` binary: exit codes and output formats.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kiln runs")
}

fn temp_model(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_valid_model_prints_summary() {
    let out = kiln(&["check", "models/resnet.model"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("trainable parameters:     169,834"),
        "{stdout}"
    );
    assert!(stdout.contains("global_avgpool"), "{stdout}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_search_model_prints_space() {
    let out = kiln(&["check", "models/fashion_search.model"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("search space"), "{stdout}");
    assert!(stdout.contains("when cell in [separable]"), "{stdout}");
}

#[test]
fn check_invalid_model_exits_one() {
    let out = kiln(&["check", "tests/diagnostics/add_shape_mismatch.model"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error[E0201]"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn check_missing_file_exits_two() {
    let out = kiln(&["check", "no/such/file.model"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn unknown_flag_exits_two() {
    let out = kiln(&["check", "--frobnicate", "models/mlp.model"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn warnings_alone_exit_zero() {
    let out = kiln(&["check", "tests/diagnostics/unreachable_value.model"]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning[W0001]"), "{stderr}");
}

#[test]
fn json_format_gives_records() {
    let out = kiln(&[
        "check",
        "--format",
        "json",
        "tests/diagnostics/kernel_too_large.model",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(value["ok"], false);
    let first = &value["diagnostics"][0];
    assert_eq!(first["code"], "E0203");
    assert_eq!(first["severity"], "error");
    assert_eq!(first["line"], 4);
    assert_eq!(first["column"], 37);
    assert_eq!(first["labels"][0]["primary"], true);
}

#[test]
fn json_format_describes_valid_model() {
    let out = kiln(&["check", "--format", "json", "models/sepconv.model"]);
    assert_eq!(out.status.code(), Some(0));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(value["ok"], true);
    assert_eq!(value["models"][0]["params"], 35_722);
    assert!(value["models"][0]["layers"].as_array().unwrap().len() > 10);
}

#[test]
fn non_utf8_file_is_rejected_cleanly() {
    let path = temp_model("binary.model", "");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let out = kiln(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(Path::new(&path).exists());
}

#[test]
fn ensemble_name_where_model_expected() {
    let path = temp_model(
        "ensemble-as-model",
        "model a {
  input f: [64]
  logits = dense(f, units = 10)
  output logits: [10]
}
ensemble pool { members = [a(seed = 1), a(seed = 2)] }
",
    );
    let file = path.to_str().unwrap();
    for args in [
        vec!["bench", file, "--model", "pool"],
        vec!["compile", file, "--model", "pool"],
        vec![
            "train",
            file,
            "--model",
            "nosuch",
            "--data",
            "data/digits.csv.gz",
        ],
    ] {
        let out = kiln(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains("its models are `a`"), "{args:?}: {stderr}");
        if args.contains(&"pool") {
            assert!(stderr.contains("`pool`"), "{args:?}: {stderr}");
            assert!(stderr.contains("is an ensemble"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn positional_step_gets_keyword_hint() {
    let path = temp_model(
        "positional-step",
        "model m {
  input f: [64]
  search { u = int(8, 16, 4) }
  logits = dense(f, units = u) |> dense(units = 10)
  output logits: [10]
}
",
    );
    let out = kiln(&["check", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("int(low, high, step = 4)"), "{stderr}");
}

/// Names longer than `format!`'s 65,535-character width limit.
#[test]
fn very_long_names_print_in_the_summary() {
    let name = "h".repeat(70_000);
    let path = temp_model(
        "long-name",
        &format!(
            "model m {{
  input image: [64]
  {name} = dense(image, units = 10)
  output {name}
}}
"
        ),
    );
    let out = kiln(&["check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&name), "the summary lacks the name");
}

/// A model that passes the checker but whose weights alone would fill
/// terabytes fails with an error instead of aborting on allocation.
#[test]
fn impossible_memory_is_an_error() {
    let path = temp_model(
        "terabyte",
        "model m {
  input features: [1048576]
  x = dense(features, units = 1048576)
  logits = dense(x, units = 10)
  output logits: [10]
}
",
    );
    let out = kiln(&["bench", path.to_str().unwrap(), "--steps", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than this machine can allocate"),
        "{stderr}"
    );
}
