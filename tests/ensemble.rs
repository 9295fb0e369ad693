//! End-to-end ensembles on the digits data: seed ensembles with and
//! without bootstrap resamples, ensembles of checkpoints, ensemble items
//! built by `kiln train`, the ensemble file in `kiln eval` and `kiln
//! predict`, and prediction on unlabeled NumPy and CSV files.

use ndarray_npy::WriteNpyExt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("kiln runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-ensemble-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn root(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn ok(out: &Output) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Rows of the digits CSV as (features, label).
fn digits_rows() -> Vec<(Vec<f32>, usize)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(root("data/digits.csv.gz")).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|line| {
            let values: Vec<f32> = line.split(',').map(|v| v.trim().parse().unwrap()).collect();
            let (label, features) = values.split_last().unwrap();
            (features.to_vec(), *label as usize)
        })
        .collect()
}

#[test]
fn seed_ensemble_reports_and_evaluates() {
    let dir = temp_dir("seeds");
    let report = ok(&kiln(
        &dir,
        &[
            "ensemble",
            &root("models/digits.model"),
            "--data",
            &root("data/digits.csv.gz"),
            "--seeds",
            "3",
            "--epochs",
            "4",
            "--json",
        ],
    ));
    assert_eq!(report["members"].as_array().unwrap().len(), 3);
    let val = &report["validation"];
    assert_eq!(val["members"].as_array().unwrap().len(), 3);
    assert_eq!(val["diversity"].as_array().unwrap().len(), 3, "three pairs");
    let best = val["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let gain = val["gain"].as_f64().unwrap();
    let pooled = val["ensemble"]["accuracy"].as_f64().unwrap();
    assert!((pooled - best - gain).abs() < 1e-9);
    assert!(pooled > 0.9, "ensemble validation accuracy {pooled}");

    let eval = ok(&kiln(
        &dir,
        &[
            "eval",
            "ensemble.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
        ],
    ));
    assert_eq!(eval["members"], 3);
    assert!(eval["accuracy"].as_f64().unwrap() > 0.9, "{eval}");
    let out = kiln(
        &dir,
        &[
            "predict",
            "ensemble.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--out",
            "p.csv",
        ],
    );
    ok(&out);
    let predictions = std::fs::read_to_string(dir.join("p.csv")).unwrap();
    assert_eq!(predictions.lines().count(), digits_rows().len() + 1);
}

#[test]
fn identical_members_neither_disagree_nor_gain() {
    let dir = temp_dir("same");
    ok(&kiln(
        &dir,
        &[
            "train",
            &root("models/digits.model"),
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "3",
            "--quiet",
        ],
    ));
    let ckpt = "checkpoints/best.safetensors";
    let report = ok(&kiln(
        &dir,
        &[
            "ensemble",
            ckpt,
            ckpt,
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
            "--rule",
            "vote",
        ],
    ));
    let val = &report["validation"];
    assert_eq!(val["gain"].as_f64().unwrap(), 0.0);
    assert_eq!(val["diversity"][0]["disagreement"].as_f64().unwrap(), 0.0);
    assert_eq!(
        val["members"][0]["accuracy"], val["ensemble"]["accuracy"],
        "{val}"
    );
}

#[test]
fn predict_reads_unlabeled_numpy_and_csv() {
    let dir = temp_dir("unlabeled");
    ok(&kiln(
        &dir,
        &[
            "train",
            &root("models/digits.model"),
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "2",
            "--quiet",
        ],
    ));
    let rows = digits_rows();
    let n = 50;
    let x: Vec<f32> = rows[..n].iter().flat_map(|(f, _)| f.clone()).collect();
    let images = ndarray::Array4::from_shape_vec((n, 1, 8, 8), x.clone()).unwrap();
    images
        .write_npy(std::fs::File::create(dir.join("x.npy")).unwrap())
        .unwrap();
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(dir.join("x.npz")).unwrap());
    npz.add_array("x", &images).unwrap();
    npz.finish().unwrap();
    let csv: String = rows[..n]
        .iter()
        .map(|(f, _)| {
            f.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("x.csv"), csv).unwrap();

    let mut outputs = Vec::new();
    for input in ["x.npy", "x.npz", "x.csv"] {
        ok(&kiln(
            &dir,
            &[
                "predict",
                "checkpoints/best.safetensors",
                "--data",
                input,
                "--out",
                "p.csv",
            ],
        ));
        let text = std::fs::read_to_string(dir.join("p.csv")).unwrap();
        assert_eq!(text.lines().count(), n + 1, "{input}");
        outputs.push(text);
    }
    assert_eq!(outputs[0], outputs[1], "npy and npz");
    assert_eq!(outputs[0], outputs[2], "npy and csv");

    let wrong = ndarray::Array2::<f32>::zeros((3, 10));
    wrong
        .write_npy(std::fs::File::create(dir.join("wrong.npy")).unwrap())
        .unwrap();
    let out = kiln(
        &dir,
        &[
            "predict",
            "checkpoints/best.safetensors",
            "--data",
            "wrong.npy",
            "--out",
            "p.csv",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("10 values per sample") && stderr.contains("needs 64"),
        "{stderr}"
    );
}

#[test]
fn csv_label_column_is_found_by_name() {
    let dir = temp_dir("csv");
    let rows = digits_rows();
    let header: Vec<String> = std::iter::once("Label".to_string())
        .chain((0..64).map(|i| format!("p{i}")))
        .collect();
    let mut text = header.join(",") + "\n";
    for (features, label) in &rows {
        let values: Vec<String> = features.iter().map(|v| v.to_string()).collect();
        text += &format!("{label},{}\n", values.join(","));
    }
    std::fs::write(dir.join("first.csv"), text).unwrap();
    let out = kiln(
        &dir,
        &[
            "train",
            &root("models/digits.model"),
            "--data",
            "first.csv",
            "--epochs",
            "3",
            "--json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rfind(|l| l.contains(r#""event":"epoch""#))
        .unwrap()
        .to_string();
    let record: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert!(record["val_accuracy"].as_f64().unwrap() > 0.8, "{record}");
}

/// Two small models of different architectures for the 8x8 digits, an
/// ensemble item that pools them, and one that pools seeds of one of them.
const POOL_FILE: &str = r#"
model mlp {
  input features: [64]
  logits = dense(features, units = 32) |> relu |> dense(units = 10)
  output logits: [10]
  train {
    optimizer = adam(lr = 3e-3)
    seed = 3
  }
}

model conv {
  input image: [1, 8, 8]
  x = conv(image, filters = 8, kernel = 3, padding = same) |> relu
  logits = flatten(x) |> dense(units = 10)
  output logits: [10]
  train { optimizer = adam(lr = 3e-3) }
}

ensemble pool {
  members = [mlp, conv(seed = 2, bootstrap = true)]
  rule = logits
}

ensemble mlp_seeds {
  members = seeds(mlp, 2)
  bootstrap = true
}
"#;

#[test]
fn ensemble_item_of_two_architectures_trains() {
    let dir = temp_dir("item");
    std::fs::write(dir.join("pool.model"), POOL_FILE).unwrap();
    let report = ok(&kiln(
        &dir,
        &[
            "train",
            "pool.model",
            "--model",
            "pool",
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "2",
            "--json",
        ],
    ));
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{report}");
    assert_eq!(members[0]["bootstrap"], false, "{report}");
    assert_eq!(members[1]["bootstrap"], true, "{report}");
    assert_eq!(report["rule"], "mean_logits");
    let val = &report["validation"];
    for (i, member) in val["members"].as_array().unwrap().iter().enumerate() {
        let accuracy = member["accuracy"].as_f64().unwrap();
        assert!(accuracy > 0.5, "member {i} validation accuracy {accuracy}");
    }
    assert!(val["ensemble"]["accuracy"].as_f64().unwrap() > 0.5, "{val}");

    let out = "checkpoints/pool.ensemble.safetensors";
    let eval = ok(&kiln(
        &dir,
        &["eval", out, "--data", &root("data/digits.csv.gz"), "--json"],
    ));
    assert_eq!(eval["members"], 2);
    assert_eq!(eval["samples"], digits_rows().len());
    assert!(eval["accuracy"].as_f64().unwrap() > 0.5, "{eval}");
    for member in ["m0-mlp-seed3", "m1-conv-seed2"] {
        let checkpoint = dir.join("checkpoints/pool.members").join(member);
        assert!(checkpoint.join("best.safetensors").is_file(), "{member}");
    }
}

#[test]
fn ensemble_item_first_in_file_is_trained() {
    let dir = temp_dir("first-item");
    // The ensemble comes first, so `kiln train` without --model builds it.
    let (models, items) = POOL_FILE.split_at(POOL_FILE.find("ensemble pool").unwrap());
    let seeds_item = &items[items.find("ensemble mlp_seeds").unwrap()..];
    std::fs::write(dir.join("seeds.model"), format!("{seeds_item}{models}")).unwrap();

    let check = kiln(&dir, &["check", "seeds.model"]);
    let summary = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{summary}");
    assert!(
        summary.contains("ensemble mlp_seeds: 2 members, rule mean"),
        "{summary}"
    );

    let report = ok(&kiln(
        &dir,
        &[
            "train",
            "seeds.model",
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "1",
            "--json",
        ],
    ));
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{report}");
    assert!(members.iter().all(|m| m["bootstrap"] == true), "{report}");
    let disagreement = report["validation"]["diversity"][0]["disagreement"]
        .as_f64()
        .unwrap();
    assert!(disagreement > 0.0, "seeds 1 and 2 predict alike: {report}");
    assert!(dir
        .join("checkpoints/mlp_seeds.ensemble.safetensors")
        .is_file());
}

#[test]
fn ensemble_item_rejects_one_model_options() {
    let dir = temp_dir("item-options");
    std::fs::write(dir.join("pool.model"), POOL_FILE).unwrap();
    let out = kiln(
        &dir,
        &[
            "train",
            "pool.model",
            "--model",
            "pool",
            "--data",
            &root("data/digits.csv.gz"),
            "--seed",
            "4",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--seed applies to one model"), "{stderr}");
}

#[test]
fn seed_ensemble_with_bootstrap_flag() {
    let dir = temp_dir("bootstrap");
    let report = ok(&kiln(
        &dir,
        &[
            "ensemble",
            &root("models/digits.model"),
            "--data",
            &root("data/digits.csv.gz"),
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--bootstrap",
            "--json",
        ],
    ));
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{report}");
    assert!(members.iter().all(|m| m["bootstrap"] == true), "{report}");
    let eval = ok(&kiln(
        &dir,
        &[
            "eval",
            "ensemble.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
        ],
    ));
    assert_eq!(eval["members"], 2);

    let without_seeds = kiln(
        &dir,
        &[
            "ensemble",
            "ensemble.safetensors.members/seed-0/best.safetensors",
            "ensemble.safetensors.members/seed-1/best.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--bootstrap",
        ],
    );
    assert_eq!(without_seeds.status.code(), Some(2));
}

#[test]
fn ensemble_item_pools_study_trials() {
    let dir = temp_dir("study-item");
    ok(&kiln(
        &dir,
        &[
            "tune",
            &root("models/digits_search.model"),
            "--data",
            &root("data/digits.csv.gz"),
            "--trials",
            "3",
            "--epochs",
            "1",
        ],
    ));
    let item =
        "ensemble best {\n  members = top(2, study = \"digits_search.study\")\n  rule = vote\n}\n";
    std::fs::write(dir.join("best.model"), item).unwrap();

    let report = ok(&kiln(
        &dir,
        &[
            "train",
            "best.model",
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
        ],
    ));
    assert_eq!(report["members"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["rule"], "vote");
    let eval = ok(&kiln(
        &dir,
        &[
            "eval",
            "checkpoints/best.ensemble.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
        ],
    ));
    assert_eq!(eval["members"], 2);
}

/// A small model that trains in well under a second per member.
const SMALL_MLP: &str = "model mlp {
  input features: [64]
  logits = dense(features, units = 32) |> relu |> dense(units = 10)
  output logits: [10]
  train {
    optimizer = adam(lr = 3e-3)
    seed = 3
  }
}
";

/// Trains a seed ensemble of [`SMALL_MLP`] in `dir`: `ensemble.safetensors`
/// and its members' checkpoints in `ensemble.safetensors.members/seed-*`.
fn small_seed_ensemble(dir: &Path) {
    std::fs::write(dir.join("mlp.model"), SMALL_MLP).unwrap();
    ok(&kiln(
        dir,
        &[
            "ensemble",
            "mlp.model",
            "--data",
            &root("data/digits.csv.gz"),
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--json",
        ],
    ));
}

/// Exit status 2 and the stderr of a run expected to fail on usage.
fn usage_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn unwritable_member_pools_from_memory() {
    let dir = temp_dir("unwritable-member");
    std::fs::write(dir.join("pool.model"), POOL_FILE).unwrap();
    // A regular file where the first member's folder belongs makes every
    // write of its checkpoints fail, as a full disk would.
    let members = dir.join("checkpoints/pool.members");
    std::fs::create_dir_all(&members).unwrap();
    std::fs::write(members.join("m0-mlp-seed3"), "not a folder").unwrap();

    let out = kiln(
        &dir,
        &[
            "train",
            "pool.model",
            "--model",
            "pool",
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "2",
            "--json",
        ],
    );
    let report = ok(&out);
    assert_eq!(report["members"].as_array().unwrap().len(), 2, "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = "checkpoints/pool.members/m0-mlp-seed3/best.safetensors";
    let warning = format!("warning: member m0-mlp-seed3: cannot write checkpoint `{path}`");
    assert!(stderr.contains(&warning), "{stderr}");
    assert!(stderr.contains("weights held in memory"), "{stderr}");
    assert!(!stderr.contains("previous checkpoint"), "{stderr}");
    assert!(!stderr.contains("kept unchanged"), "{stderr}");
    // Two epochs try four writes; the first is logged, the rest counted.
    assert_eq!(
        stderr.matches("no file is at that path").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("4 checkpoint writes to"), "{stderr}");

    let eval = ok(&kiln(
        &dir,
        &[
            "eval",
            "checkpoints/pool.ensemble.safetensors",
            "--data",
            &root("data/digits.csv.gz"),
            "--json",
        ],
    ));
    assert_eq!(eval["members"], 2);
    assert!(eval["accuracy"].as_f64().unwrap() > 0.5, "{eval}");
}

#[test]
fn seed_ensemble_sigint_keeps_finished_members() {
    let dir = temp_dir("sigint");
    // Small batches and many epochs, so the second member is still
    // training when the signal arrives.
    let source = std::fs::read_to_string(root("models/digits.model"))
        .unwrap()
        .replace("batch_size = 32", "batch_size = 4")
        .replace(
            "callbacks = [early_stopping(monitor = val_loss, patience = 5)]",
            "",
        );
    std::fs::write(dir.join("conv.model"), source).unwrap();
    let data = root("data/digits.csv.gz");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "ensemble",
            "conv.model",
            "--data",
            &data,
            "--seeds",
            "2",
            "--epochs",
            "20",
            "--json",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The second member's first checkpoint means the first member has
    // finished and the second is in a later epoch.
    let second = dir.join("ensemble.safetensors.members/seed-1/last.safetensors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !second.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill only sends a signal to the child started above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted while training seed-1; the ensemble was not written"),
        "{stderr}"
    );
    assert!(
        stderr.contains("finished members (seed-0) are kept in `ensemble.safetensors.members`"),
        "{stderr}"
    );
    assert!(!dir.join("ensemble.safetensors").exists());
    let eval = ok(&kiln(
        &dir,
        &[
            "eval",
            "ensemble.safetensors.members/seed-0/best.safetensors",
            "--data",
            &data,
            "--json",
        ],
    ));
    assert!(eval["accuracy"].as_f64().unwrap() > 0.5, "{eval}");
}

#[test]
fn study_item_rejects_training_options() {
    let dir = temp_dir("study-item-options");
    let item = "ensemble best {\n  members = top(2, study = \"search.study\")\n}\n";
    std::fs::write(dir.join("best.model"), item).unwrap();
    let options = [
        ["--epochs", "2"],
        ["--batch-size", "8"],
        ["--lr", "0.1"],
        ["--val-split", "0.2"],
        ["--limit", "100"],
    ];
    for [option, value] in options {
        let out = kiln(
            &dir,
            &[
                "train",
                "best.model",
                "--data",
                &root("data/digits.csv.gz"),
                option,
                value,
            ],
        );
        let stderr = usage_error(&out);
        let expected = format!("{option} does not apply to `top()` members");
        assert!(stderr.contains(&expected), "{option}: {stderr}");
    }

    let out = kiln(
        &dir,
        &[
            "ensemble",
            "--study",
            "search.study",
            "--top",
            "2",
            "--data",
            &root("data/digits.csv.gz"),
            "--epochs",
            "3",
        ],
    );
    let stderr = usage_error(&out);
    assert!(
        stderr.contains("--epochs applies to members trained with --seeds"),
        "{stderr}"
    );
}

#[test]
fn ensemble_rejects_invalid_counts() {
    let dir = temp_dir("counts");
    std::fs::write(dir.join("mlp.model"), SMALL_MLP).unwrap();
    let data = root("data/digits.csv.gz");
    let cases: [(&[&str], &str); 3] = [
        (
            &["mlp.model", "--seeds", "2", "--epochs", "0"],
            "--epochs must be at least 1",
        ),
        (
            &["mlp.model", "--seeds", "1025"],
            "--seeds must be at most 1024, found 1025",
        ),
        (
            &["--study", "s.study", "--select", "greedy", "--rounds", "0"],
            "--rounds must be at least 1",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["ensemble", "--data", &data];
        all.extend_from_slice(args);
        let stderr = usage_error(&kiln(&dir, &all));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn ensemble_checks_repeated_and_ensemble_inputs() {
    let dir = temp_dir("inputs");
    small_seed_ensemble(&dir);
    let data = root("data/digits.csv.gz");
    let member = "ensemble.safetensors.members/seed-0/best.safetensors";
    let same = format!("./{member}");
    let out = kiln(
        &dir,
        &["ensemble", member, &same, "--data", &data, "--out", "e.st"],
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = format!("warning: `{same}` is given twice (also as `{member}`)");
    assert!(stderr.contains(&warning), "{stderr}");

    let out = kiln(
        &dir,
        &[
            "ensemble",
            "ensemble.safetensors",
            member,
            "--data",
            &data,
            "--out",
            "e.st",
        ],
    );
    let stderr = usage_error(&out);
    assert!(
        stderr
            .contains("`ensemble.safetensors` is an ensemble file; give its members' checkpoints"),
        "{stderr}"
    );
}

#[test]
fn ensemble_out_must_not_be_an_input() {
    let dir = temp_dir("out-input");
    small_seed_ensemble(&dir);
    std::fs::copy(root("data/digits.csv.gz"), dir.join("d.csv.gz")).unwrap();
    std::fs::copy(root("data/digits.csv.gz"), dir.join("t.csv.gz")).unwrap();
    // Not a real study: --out is checked before the study is opened.
    std::fs::write(dir.join("s.study"), "study").unwrap();
    let m0 = "ensemble.safetensors.members/seed-0/best.safetensors";
    let m1 = "ensemble.safetensors.members/seed-1/best.safetensors";
    let cases: [(&[&str], &str, &str); 5] = [
        (
            &[
                "mlp.model",
                "--data",
                "d.csv.gz",
                "--seeds",
                "2",
                "--epochs",
                "1",
            ],
            "mlp.model",
            "the `.model` file",
        ),
        (
            &[m0, m1, "--data", "d.csv.gz"],
            "d.csv.gz",
            "the --data file",
        ),
        (
            &[m0, m1, "--data", "d.csv.gz", "--test-data", "t.csv.gz"],
            "t.csv.gz",
            "the --test-data file",
        ),
        (&[m0, m1, "--data", "d.csv.gz"], m1, "a member checkpoint"),
        (
            &["--study", "s.study", "--top", "2", "--data", "d.csv.gz"],
            "s.study",
            "the --study database",
        ),
    ];
    for (args, out, kind) in cases {
        let before = std::fs::read(dir.join(out)).unwrap();
        let mut all = vec!["ensemble"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--out", out]);
        let stderr = usage_error(&kiln(&dir, &all));
        let expected = format!("--out `{out}` is one of the input files ({kind})");
        assert!(stderr.contains(&expected), "{out}: {stderr}");
        let after = std::fs::read(dir.join(out)).unwrap();
        assert!(before == after, "{out} was changed");
    }
}

#[test]
fn model_file_as_checkpoint_is_explained() {
    let dir = temp_dir("model-input");
    small_seed_ensemble(&dir);
    // The same model text under a name that does not end in `.model`.
    std::fs::copy(dir.join("mlp.model"), dir.join("notes.txt")).unwrap();
    let data = root("data/digits.csv.gz");
    let member = "ensemble.safetensors.members/seed-0/best.safetensors";
    for model in ["mlp.model", "notes.txt"] {
        let out = kiln(&dir, &["ensemble", member, model, "--data", &data]);
        let stderr = usage_error(&out);
        let expected = format!("`{model}` is a model file, not a checkpoint");
        assert!(stderr.contains(&expected), "{model}: {stderr}");
        assert!(
            stderr.contains("give it alone with `--seeds N`"),
            "{model}: {stderr}"
        );
        assert!(!stderr.contains("header too large"), "{model}: {stderr}");
    }

    let out = kiln(
        &dir,
        &["predict", "mlp.model", "--data", &data, "--out", "p.csv"],
    );
    let stderr = usage_error(&out);
    assert!(
        stderr.contains("`mlp.model` is a model file, not a checkpoint"),
        "{stderr}"
    );
    assert!(stderr.contains("train it with `kiln train`"), "{stderr}");

    let out = kiln(&dir, &["eval", "mlp.model", "--data", &data]);
    let stderr = usage_error(&out);
    assert!(
        stderr.contains("`mlp.model` is a model file, not a checkpoint"),
        "{stderr}"
    );

    // A data file is not mistaken for a model file.
    let out = kiln(&dir, &["ensemble", member, &data, "--data", &data]);
    let stderr = usage_error(&out);
    assert!(stderr.contains("is not a kiln checkpoint"), "{stderr}");

    // Nor is a damaged checkpoint whose name ends in `.model`.
    let checkpoint = std::fs::read(dir.join(member)).unwrap();
    std::fs::write(dir.join("cut.model"), &checkpoint[..100]).unwrap();
    let out = kiln(&dir, &["ensemble", member, "cut.model", "--data", &data]);
    let stderr = usage_error(&out);
    assert!(stderr.contains("is not a kiln checkpoint"), "{stderr}");
    assert!(!stderr.contains("is a model file"), "{stderr}");
}

/// Copies an ensemble file to `to` with its `kiln_ensemble` metadata
/// changed by `edit`.
fn edit_ensemble_header(from: &Path, to: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(from).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let stored = header["__metadata__"]["kiln_ensemble"].as_str().unwrap();
    let mut ensemble: serde_json::Value = serde_json::from_str(stored).unwrap();
    edit(&mut ensemble);
    header["__metadata__"]["kiln_ensemble"] = ensemble.to_string().into();
    // The safetensors writer pads the header to 8 bytes; do the same.
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + length..]);
    std::fs::write(to, out).unwrap();
}

/// A change to an ensemble file's metadata, as JSON.
type HeaderEdit = fn(&mut serde_json::Value);

#[test]
fn crafted_ensemble_files_are_rejected() {
    let dir = temp_dir("crafted");
    small_seed_ensemble(&dir);
    let original = dir.join("ensemble.safetensors");
    let cases: [(&str, HeaderEdit, &str); 5] = [
        (
            "negative.st",
            |e| e["members"][0]["weight"] = (-1.0).into(),
            "member 0 has weight -1",
        ),
        (
            "overflow.st",
            |e| {
                e["members"][0]["weight"] = 1e308.into();
                e["members"][1]["weight"] = 1e308.into();
            },
            "the member weights sum to inf",
        ),
        (
            "zero.st",
            |e| {
                e["members"][0]["weight"] = 0.0.into();
                e["members"][1]["weight"] = 0.0.into();
            },
            "every member has weight 0",
        ),
        (
            "source.st",
            |e| {
                let source = e["members"][1]["checkpoint"]["source"].as_str().unwrap();
                e["members"][1]["checkpoint"]["source"] = format!("{source}\n# edited").into();
            },
            "member 1's model source does not match its recorded SHA-256",
        ),
        (
            "model.st",
            |e| e["members"][0]["checkpoint"]["model"] = "nosuch".into(),
            "member 0 of model.st names the model `nosuch`, but the model source stored with it defines no model of that name",
        ),
    ];
    for (name, edit, expected) in cases {
        edit_ensemble_header(&original, &dir.join(name), edit);
        let out = kiln(&dir, &["eval", name, "--data", &root("data/digits.csv.gz")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(!stderr.contains("(in member"), "{name}: {stderr}");
        if name != "model.st" {
            let prefix = format!("invalid ensemble file `{name}`");
            assert!(stderr.contains(&prefix), "{name}: {stderr}");
        }
    }
}

#[test]
fn ensemble_item_rejects_resume_first() {
    let dir = temp_dir("item-resume");
    std::fs::write(dir.join("pool.model"), POOL_FILE).unwrap();
    let out = kiln(
        &dir,
        &[
            "train",
            "pool.model",
            "--model",
            "pool",
            "--data",
            &root("data/digits.csv.gz"),
            "--resume",
            "missing.safetensors",
        ],
    );
    let stderr = usage_error(&out);
    assert!(
        stderr.contains("--resume applies to one model, not to an ensemble"),
        "{stderr}"
    );
    assert!(!stderr.contains("missing.safetensors"), "{stderr}");
}

#[test]
fn member_naming_ensemble_is_explained() {
    let dir = temp_dir("member-ensemble");
    let source = format!("{POOL_FILE}\nensemble nested {{\n  members = [pool, mlp]\n}}\n");
    std::fs::write(dir.join("nested.model"), source).unwrap();
    let out = kiln(&dir, &["check", "nested.model"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("unknown model `pool`"), "{stderr}");
    assert!(
        stderr.contains("`pool` is an ensemble; members must be models"),
        "{stderr}"
    );
}
