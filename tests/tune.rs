//! Sweeps: samplers on analytic objectives, the study database, and
//! end-to-end `kiln tune` and `kiln study` runs on the digits data,
//! including a sweep killed mid-trial and resumed, and one whose TensorBoard
//! summaries TensorBoard's HParams plugin reads.

use kiln::check::check_source;
use kiln::check::space::{Point, Space};
use kiln::check::value::Value;
use kiln::tune::sampler::{self, Direction, Draws, Observation};
use kiln::tune::storage::{
    NewTrial, RunSettings, SqliteStorage, Storage, StorageError, TrialEnd, TrialState,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn space_of(source: &str) -> Space {
    let report = check_source(source);
    assert!(!report.has_errors(), "{:?}", report.diagnostics);
    report.models[0].space.clone()
}

/// A four-dimensional search space: a log-scaled rate, an integer, a
/// categorical choice and a linear float.
const MIXED: &str = "model m {
  input x: [4]
  search {
    lr = float(1e-5, 1.0, log)
    width = int(1, 100)
    act = choice(relu, tanh, sigmoid, gelu)
    drop = float(0.0, 0.5)
  }
  logits = dense(x, units = width) |> act |> dropout(rate = drop) |> dense(units = 2)
  output logits: [2]
  train {
    optimizer = sgd(lr = lr)
  }
}
";

/// A bowl with its minimum 0 at lr = 1e-3, width = 70, act = tanh,
/// drop = 0.2.
fn objective(point: &Point) -> f64 {
    let num = |name: &str| point.get(name).and_then(Value::as_f64).unwrap();
    let lr = (num("lr").log10() + 3.0).powi(2) / 4.0;
    let width = ((num("width") - 70.0) / 30.0).powi(2);
    let act = match point.get("act") {
        Some(Value::Word(w)) if w == "tanh" => 0.0,
        _ => 1.0,
    };
    let drop = 4.0 * (num("drop") - 0.2).powi(2);
    lr + width + act + drop
}

fn best_after(space: &Space, seed: u64, trials: u64, tpe: bool) -> f64 {
    let mut history: Vec<Observation> = Vec::new();
    for trial in 0..trials {
        let mut draws = Draws::new(seed, trial);
        let point = if tpe {
            sampler::tpe_point(space, &history, Direction::Minimize, &mut draws)
        } else {
            sampler::random_point(space, &mut draws)
        };
        let value = objective(&point);
        history.push(Observation { point, value });
    }
    history
        .iter()
        .map(|o| o.value)
        .fold(f64::INFINITY, f64::min)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    0.5 * (values[values.len() / 2 - 1] + values[values.len() / 2])
}

#[test]
fn tpe_beats_random_search() {
    let space = space_of(MIXED);
    let tpe: Vec<f64> = (0..20).map(|s| best_after(&space, s, 50, true)).collect();
    let random: Vec<f64> = (0..20).map(|s| best_after(&space, s, 50, false)).collect();
    let (tpe, random) = (median(tpe), median(random));
    assert!(tpe < random, "median best: TPE {tpe}, random {random}");
}

#[test]
fn samples_stay_in_their_domains() {
    let space = space_of(MIXED);
    let mut history = Vec::new();
    for trial in 0..40 {
        let point = sampler::tpe_point(
            &space,
            &history,
            Direction::Minimize,
            &mut Draws::new(3, trial),
        );
        for (name, value) in &point.0 {
            let param = space.get(name).unwrap();
            assert!(
                param.domain.contains(value),
                "{name} = {value} outside {}",
                param.domain
            );
        }
        let value = objective(&point);
        history.push(Observation { point, value });
    }
}

#[test]
fn conditional_parameters_follow_their_condition() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/fashion_search.model"
    ))
    .unwrap();
    let space = space_of(&source);
    let mut history = Vec::new();
    for trial in 0..30 {
        let point = sampler::tpe_point(
            &space,
            &history,
            Direction::Maximize,
            &mut Draws::new(1, trial),
        );
        let separable = point.get("cell") == Some(&Value::Block("separable".into()))
            || point.get("cell").map(|v| v.to_string()) == Some("separable".into());
        assert_eq!(point.get("expand").is_some(), separable, "{point}");
        history.push(Observation {
            value: trial as f64,
            point,
        });
    }
}

#[test]
fn stepped_floats_print_as_written() {
    let space = space_of(
        "model m {
  input x: [4]
  search {
    drop = float(0.0, 0.5, step = 0.1)
  }
  logits = dense(x, units = 2) |> dropout(rate = drop)
  output logits: [2]
}
",
    );
    for trial in 0..50 {
        let point = sampler::random_point(&space, &mut Draws::new(9, trial));
        let text = point.get("drop").unwrap().to_string();
        assert!(text.len() <= 3, "{text}");
    }
}

#[test]
fn grid_visits_each_point_once() {
    let source = "model m {
  input x: [4]
  search {
    a = choice(1, 2, 3)
    b = int(1, 4, step = 3)
    c = float(0.0, 0.2, step = 0.1) when a == 2
  }
  logits = dense(x, units = a + b) |> dense(units = 2)
  output logits: [2]
}
";
    let space = space_of(source);
    let points = sampler::grid(&space, 1000).unwrap();
    // a = 1 or 3: 2 values of b each; a = 2: 2 values of b and 3 of c.
    assert_eq!(points.len(), 2 * 2 + 2 * 3);
    let mut texts: Vec<String> = points.iter().map(|p| p.to_string()).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), points.len());
}

#[test]
fn export_drops_conditions_of_inactive_parameters() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/fashion_search.model"
    ))
    .unwrap();
    let space = space_of(&source);
    let params: Vec<(String, String)> = [
        ("width", "24"),
        ("depth", "1"),
        ("kernel", "3"),
        ("cell", "residual"),
        ("dropout_rate", "0.3"),
        ("lr", "0.01"),
        ("batch", "64"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    let best = kiln::tune::storage::Trial {
        id: 1,
        number: 0,
        state: TrialState::Complete,
        params,
        value: Some(0.9),
        test_accuracy: None,
        epochs: vec![0.9],
        error: None,
        checkpoint: None,
        retry_of: None,
        started: 0.0,
        finished: Some(1.0),
    };
    let text = kiln::tune::report::export_best(&source, "fashion_search", &best, &space).unwrap();
    let report = check_source(&text);
    assert!(!report.has_errors(), "{:?}\n{text}", report.diagnostics);
    assert!(text.contains("expand = choice(1)\n"), "{text}");
    assert!(text.contains("cell = choice(residual)"), "{text}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn storage_numbers_trials_and_reaps_dead_workers() {
    let dir = temp_dir("storage");
    let path = dir.join("s.study");
    let mut storage =
        SqliteStorage::open(&path, "m", "model m {}", "val_accuracy", &settings()).unwrap();
    let never = |_: &[kiln::tune::storage::Trial]| false;
    let first = storage
        .claim(
            NewTrial {
                params: vec![("a".into(), "1".into())],
                retry_of: None,
            },
            &never,
        )
        .unwrap()
        .unwrap();
    let second = storage
        .claim(
            NewTrial {
                params: vec![("a".into(), "2".into())],
                retry_of: None,
            },
            &never,
        )
        .unwrap()
        .unwrap();
    assert_eq!((first.number, second.number), (0, 1));
    storage.report(first.id, 1, 0.5).unwrap();
    storage
        .finish(
            first.id,
            &TrialEnd {
                state: TrialState::Complete,
                value: Some(0.5),
                test_accuracy: None,
                error: None,
                checkpoint: None,
            },
        )
        .unwrap();
    let always = |_: &[kiln::tune::storage::Trial]| true;
    let refused = storage
        .claim(
            NewTrial {
                params: vec![],
                retry_of: None,
            },
            &always,
        )
        .unwrap();
    assert!(refused.is_none());

    // A trial owned by a process that no longer exists is reaped.
    let conn = rusqlite_owner_update(&path, second.id);
    drop(conn);
    let dead = storage.reap_dead().unwrap();
    assert_eq!(dead.len(), 1);
    let trials = storage.trials().unwrap();
    assert_eq!(trials[0].epochs, vec![0.5]);
    assert_eq!(trials[1].state, TrialState::Failed);
    assert!(trials[1]
        .error
        .as_deref()
        .unwrap()
        .starts_with(kiln::tune::UNFINISHED));

    // A retry names the trial it repeats by number, as users see it, not
    // by the database's row id.
    assert_ne!(second.id, second.number, "row ids would pass for numbers");
    let retry = storage
        .claim(
            NewTrial {
                params: vec![("a".into(), "2".into())],
                retry_of: Some(second.number),
            },
            &never,
        )
        .unwrap()
        .unwrap();
    assert_eq!(retry.retry_of, Some(second.number));
    let trials = storage.trials().unwrap();
    assert_eq!(trials[2].retry_of, Some(second.number));
}

/// Run settings of a study in a storage test.
fn settings() -> RunSettings {
    RunSettings {
        data: "/data/train.csv".into(),
        data_sha256: "0".repeat(64),
        test_data: None,
        limit: None,
        epochs: Some(3),
        val_split: 0.1,
    }
}

/// Reopening a study with other run settings or another metric fails,
/// with one line per change.
#[test]
fn storage_rejects_changed_settings() {
    let dir = temp_dir("storage-settings");
    let path = dir.join("s.study");
    let open = |metric: &str, settings: &RunSettings| {
        SqliteStorage::open(&path, "m", "model m {}", metric, settings)
    };
    let differences = |metric: &str, settings: &RunSettings| match open(metric, settings) {
        Err(StorageError::ChangedSettings { differences, .. }) => differences,
        Err(other) => panic!("expected changed settings, got {other}"),
        Ok(_) => panic!("the changed settings were accepted"),
    };
    open("val_accuracy", &settings()).unwrap();
    open("val_accuracy", &settings()).unwrap();

    let mut epochs = settings();
    epochs.epochs = None;
    assert_eq!(
        differences("val_accuracy", &epochs),
        vec!["--epochs: the study used 3, this run the model's `epochs`"]
    );
    let mut test_data = settings();
    test_data.test_data = Some("/data/test.csv".into());
    assert_eq!(
        differences("val_accuracy", &test_data),
        vec!["--test-data: the study used none, this run `/data/test.csv`"]
    );
    let mut rows = settings();
    rows.data_sha256 = "1".repeat(64);
    let changed = differences("val_accuracy", &rows);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].contains("differ from the study's"),
        "{changed:?}"
    );
    // With another limit, other rows are expected and not listed again.
    rows.limit = Some(100);
    assert_eq!(
        differences("val_accuracy", &rows),
        vec!["--limit: the study used none, this run 100"]
    );
    assert_eq!(
        differences("val_loss", &settings()),
        vec!["--metric: the study used val_accuracy, this run val_loss"]
    );
}

/// Gives trial `id` an owner process that cannot exist.
fn rusqlite_owner_update(path: &Path, id: i64) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    conn.execute(
        "UPDATE trials SET owner = ?1 WHERE id = ?2",
        rusqlite::params![format!("{}:{}", host.trim(), i32::MAX), id],
    )
    .unwrap();
    conn
}

/// A digits network with a small search space that trains in about a
/// second per trial.
const DIGITS_SEARCH: &str = "model digits_search {
  input image: [1, 8, 8]
  search {
    width = choice(8, 16)
    lr = float(0.01, 0.1, log)
  }
  x = conv(image, filters = width, kernel = 3, padding = same) |> relu |> maxpool(size = 2)
  logits = flatten(x) |> dense(units = 10)
  output logits: [10]
  train {
    optimizer = sgd(lr = lr, momentum = 0.9)
    batch_size = 64
    epochs = 3
  }
}
";

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("kiln runs")
}

fn digits() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz").to_string()
}

fn trials_in(path: &Path) -> Vec<kiln::tune::storage::Trial> {
    SqliteStorage::open_existing(path)
        .unwrap()
        .trials()
        .unwrap()
}

#[test]
fn tune_then_study_exports_a_valid_model() {
    let dir = temp_dir("e2e");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    let out = kiln(
        &dir,
        &[
            "tune",
            "m.model",
            "--data",
            &data,
            "--trials",
            "4",
            "--sampler",
            "random",
            "--pruner",
            "median",
            "--jobs",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    assert!(stdout.contains("best: trial"), "{stdout}");
    let trials = trials_in(&dir.join("digits_search.study"));
    let finished = trials
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .count();
    assert_eq!(finished, 4, "{trials:#?}");
    let best = trials.iter().filter_map(|t| t.value).fold(0.0, f64::max);
    assert!(best > 0.8, "best validation accuracy {best}");

    let out = kiln(
        &dir,
        &[
            "study",
            "digits_search.study",
            "--export-best",
            "best.model",
            "--plots",
            "plots",
            "--json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["trials"].as_array().unwrap().len(), trials.len());
    assert!(dir.join("plots/history.svg").is_file());
    let exported = std::fs::read_to_string(dir.join("best.model")).unwrap();
    assert!(!exported.contains("float("), "{exported}");
    let out = kiln(&dir, &["check", "best.model"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An existing file, such as the study's own model, is not replaced.
    let out = kiln(
        &dir,
        &["study", "digits_search.study", "--export-best", "m.model"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(dir.join("m.model")).unwrap(),
        DIGITS_SEARCH
    );
}

/// A digits network with every kind of value TensorBoard's HParams plugin
/// distinguishes: numbers, names, booleans and a conditional parameter. Its
/// budget rejects the points with `width = 64`.
const DIGITS_HPARAMS: &str = "model digits_hparams {
  input image: [1, 8, 8]
  search {
    width = choice(8, 64)
    cell = choice(plain, wide)
    expand = int(1, 2) when cell == wide
    lr = float(0.03, 0.06, step = 0.03)
    nesterov = choice(true, false)
  }
  block plain(x; filters) {
    return conv(x, filters = filters, kernel = 3, padding = same) |> relu
  }
  block wide(x; filters) {
    return conv(x, filters = filters * expand, kernel = 3, padding = same) |> relu
  }
  x = cell(image, filters = width) |> maxpool(size = 2)
  logits = flatten(x) |> dense(units = 10)
  output logits: [10]
  train {
    optimizer = sgd(lr = lr, momentum = 0.9, nesterov = nesterov)
    batch_size = 64
    epochs = 2
  }
  budget {
    params = 6000
  }
}
";

/// TensorBoard's HParams plugin (the `tensorboard` Python package) reads the
/// experiment of `kiln tune --logdir` and a session for every trial.
#[test]
fn tune_logdir_feeds_hparams_dashboard() {
    let dir = temp_dir("hparams");
    std::fs::write(dir.join("m.model"), DIGITS_HPARAMS).unwrap();
    let data = digits();
    // One single-threaded job and the grid sampler make the sweep
    // deterministic: with seed 0 it has complete, pruned and rejected
    // trials.
    let tune = |trials: &str| {
        kiln(
            &dir,
            &[
                "tune",
                "m.model",
                "--data",
                &data,
                "--trials",
                trials,
                "--sampler",
                "grid",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--seed",
                "0",
                "--study",
                "h.study",
                "--logdir",
                "logs",
            ],
        )
    };
    let out = tune("6");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trials = trials_in(&dir.join("h.study"));
    for state in [
        TrialState::Complete,
        TrialState::Pruned,
        TrialState::Rejected,
    ] {
        assert!(
            trials.iter().any(|t| t.state == state),
            "no {} trial, so its session status goes unchecked: {trials:#?}",
            state.as_str()
        );
    }
    check_hparams(&dir);

    // Resuming the study into the same logdir adds sessions for the new
    // trials and keeps the experiment readable.
    let out = tune("8");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_hparams(&dir);
}

/// Runs `tests/tensorboard_hparams_check.py` on the `logs` folder and the
/// `h.study` database in `dir`.
fn check_hparams(dir: &Path) {
    let out = kiln(dir, &["study", "h.study", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    std::fs::write(dir.join("study.json"), &out.stdout).unwrap();
    let check = Command::new("python3")
        .arg("tests/tensorboard_hparams_check.py")
        .arg(dir.join("logs"))
        .arg(dir.join("study.json"))
        .args([
            "epoch/val_accuracy",
            "width",
            "cell",
            "expand",
            "lr",
            "nesterov",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "{}{}\n(install the reader with `python3 -m pip install tensorboard`)",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn killed_sweep_resumes_without_losing_trials() {
    let dir = temp_dir("kill");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    let args = [
        "tune", "m.model", "--data", &data, "--trials", "5", "--pruner", "none", "--jobs", "1",
        "--epochs", "30", "--study", "k.study",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a trial is running after at least one has completed.
    let study = dir.join("k.study");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the sweep never reached a second trial"
        );
        // Each trial trains for 30 short epochs, so a running trial with
        // recorded epochs lasts a few seconds and cannot be missed.
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(50));
        if !study.is_file() {
            continue;
        }
        let Ok(mut storage) = SqliteStorage::open_existing(&study) else {
            continue;
        };
        let Ok(trials) = storage.trials() else {
            continue;
        };
        let complete = trials
            .iter()
            .filter(|t| t.state == TrialState::Complete)
            .count();
        let running = trials
            .iter()
            .any(|t| t.state == TrialState::Running && !t.epochs.is_empty());
        if complete >= 1 && running {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();

    let out = kiln(&dir, &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trials = trials_in(&study);
    let complete: Vec<_> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .collect();
    assert_eq!(complete.len(), 5, "{trials:#?}");
    let killed: Vec<_> = trials
        .iter()
        .filter(|t| t.state == TrialState::Failed)
        .collect();
    assert_eq!(killed.len(), 1, "{trials:#?}");
    let retry = trials
        .iter()
        .find(|t| t.retry_of == Some(killed[0].number))
        .expect("a retry");
    assert_eq!(retry.params, killed[0].params);
    assert_eq!(retry.state, TrialState::Complete);

    // `kiln study --json` names the retried trial by its number.
    let out = kiln(&dir, &["study", "k.study", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let retried: Vec<i64> = json["trials"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["retry_of"].as_i64())
        .collect();
    assert_eq!(retried, vec![killed[0].number], "{json}");
    let mut numbers: Vec<i64> = trials.iter().map(|t| t.number).collect();
    numbers.dedup();
    assert_eq!(numbers.len(), trials.len(), "trial numbers repeat");
}

/// Removes the terminal colour codes that `tracing` puts around fields.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    plain
}

/// A trial whose run folder cannot be written trains without summaries,
/// with one warning, and the sweep goes on to log later trials.
#[test]
fn tune_logdir_write_failure_only_warns() {
    let dir = temp_dir("logfail");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    let tune = |trials: &str| {
        kiln(
            &dir,
            &[
                "tune",
                "m.model",
                "--data",
                &data,
                "--trials",
                trials,
                "--pruner",
                "none",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--epochs",
                "1",
                "--study",
                "w.study",
                "--logdir",
                "logs",
            ],
        )
    };
    let out = tune("1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A regular file where trial 1's run folder belongs makes every write
    // of that trial fail, as a full disk would.
    std::fs::write(dir.join("logs/trial-1"), "not a folder").unwrap();

    let out = tune("3");
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let trials = trials_in(&dir.join("w.study"));
    assert_eq!(trials.len(), 3, "{trials:#?}");
    assert!(
        trials.iter().all(|t| t.state == TrialState::Complete),
        "{trials:#?}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot write TensorBoard summaries"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("trial=1"), "{stderr}");
    assert!(warnings[0].contains("trial-1"), "{stderr}");
    assert!(warnings[0].contains("WARN"), "{stderr}");
    let trial_2 = std::fs::read_dir(dir.join("logs/trial-2")).unwrap().count();
    assert!(trial_2 >= 3, "trial 2 has {trial_2} event files");
}

/// A sweep stopped by failures prints how to go on, and once their cause
/// is gone the same command resumes the study, because earlier failures do
/// not count toward the limit again.
#[test]
fn tune_resumes_after_failure_limit() {
    let dir = temp_dir("failcap");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    // A regular file where the trials' checkpoint folder belongs fails
    // every trial before it trains.
    std::fs::write(dir.join("f.study.trials"), "not a folder").unwrap();
    let tune = || {
        kiln(
            &dir,
            &[
                "tune",
                "m.model",
                "--data",
                &data,
                "--trials",
                "1",
                "--jobs",
                "1",
                "--threads",
                "1",
                "--epochs",
                "1",
                "--study",
                "f.study",
            ],
        )
    };
    let out = tune();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopping: 10 trials failed"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    let failed = trials_in(&dir.join("f.study"));
    assert_eq!(failed.len(), 10, "{failed:#?}");

    std::fs::remove_file(dir.join("f.study.trials")).unwrap();
    let out = tune();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let trials = trials_in(&dir.join("f.study"));
    assert_eq!(trials.len(), 11, "{trials:#?}");
    assert_eq!(trials[10].state, TrialState::Complete, "{trials:#?}");
}

/// Arguments of a one-trial, one-epoch sweep of `m.model` into `study`.
fn quick_tune<'a>(data: &'a str, study: &'a str, logdir: &'a str) -> Vec<&'a str> {
    vec![
        "tune",
        "m.model",
        "--data",
        data,
        "--trials",
        "1",
        "--pruner",
        "none",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--epochs",
        "1",
        "--study",
        study,
        "--logdir",
        logdir,
    ]
}

/// Lists the names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A logdir contains one study's sweep. Another study, or a new study at the
/// path of a deleted one, is rejected before it trains or writes anything.
#[test]
fn tune_logdir_rejects_another_study() {
    let dir = temp_dir("two-studies");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    let out = kiln(&dir, &quick_tune(&data, "a.study", "logs"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = names_in(&dir.join("logs"));

    let out = kiln(&dir, &quick_tune(&data, "b.study", "logs"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a.study"), "{stderr}");
    assert!(stderr.contains("new --logdir"), "{stderr}");
    assert!(!dir.join("b.study").exists());
    assert_eq!(names_in(&dir.join("logs")), logs);

    std::fs::remove_file(dir.join("a.study")).unwrap();
    let out = kiln(&dir, &quick_tune(&data, "a.study", "logs"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no longer exists"), "{stderr}");
    assert!(!dir.join("a.study").exists());
    assert_eq!(names_in(&dir.join("logs")), logs);
}

/// A logdir that cannot be a folder is rejected before the study database
/// is created.
#[test]
fn tune_rejected_logdir_creates_no_study() {
    let dir = temp_dir("bad-logdir");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    std::fs::write(dir.join("file"), "").unwrap();
    let data = digits();
    // No process may create folders in `/proc`, root included.
    let mut cases = vec![
        ("file", "is not a folder"),
        ("file/logs", "not a folder"),
        ("/proc/kiln-logs", "cannot create"),
    ];
    // Root may write into any folder, so the permission case runs only
    // where the mode applies.
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    if std::fs::write(locked.join("probe"), "").is_err() {
        cases.push(("locked/logs", "cannot create"));
    } else {
        eprintln!("skipping the unwritable logdir: this user can write into mode 555 folders");
    }
    for (logdir, message) in cases {
        let out = kiln(&dir, &quick_tune(&data, "s.study", logdir));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{logdir}: {stderr}");
        assert!(stderr.contains(message), "{logdir}: {stderr}");
        assert!(
            !dir.join("s.study").exists(),
            "{logdir}: a study was created"
        );
    }
}

/// Lists the tables in the SQLite database at `path`, by name.
fn tables_in(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap();
    names
}

/// An SQLite database of another program, or a file that is no database,
/// is not a study. `kiln tune` rejects it without writing to it, and
/// `kiln study` rejects it with the same message.
#[test]
fn tune_rejects_foreign_database() {
    let dir = temp_dir("foreign");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let users = rusqlite::Connection::open(dir.join("users.db")).unwrap();
    users
        .execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
             INSERT INTO users (name) VALUES ('ada');",
        )
        .unwrap();
    drop(users);
    // A table named `studies` does not make a kiln study: its columns
    // must be the study table's.
    let studies = rusqlite::Connection::open(dir.join("studies.db")).unwrap();
    studies
        .execute_batch("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT);")
        .unwrap();
    drop(studies);
    std::fs::write(dir.join("notes.txt"), "not a database\n").unwrap();
    let data = digits();
    for file in ["users.db", "studies.db", "notes.txt"] {
        let before = std::fs::read(dir.join(file)).unwrap();
        let out = kiln(&dir, &quick_tune(&data, file, "logs"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(file), "{file}: {stderr}");
        assert!(stderr.contains("is not a kiln study"), "{file}: {stderr}");
        let after = std::fs::read(dir.join(file)).unwrap();
        assert!(before == after, "{file}: kiln tune changed the file");
        assert!(
            !dir.join(format!("{file}-wal")).exists(),
            "{file}: a write-ahead log was left beside the file"
        );
        assert!(!dir.join("logs").exists(), "{file}: the logdir was created");

        let out = kiln(&dir, &["study", file]);
        let study_stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {study_stderr}");
        assert!(study_stderr.contains(file), "{file}: {study_stderr}");
        assert!(
            study_stderr.contains("is not a kiln study"),
            "{file}: {study_stderr}"
        );
    }
    assert_eq!(tables_in(&dir.join("users.db")), vec!["users"]);
    assert_eq!(tables_in(&dir.join("studies.db")), vec!["studies"]);
}

/// A study path that exists but is not a regular file, such as a device
/// or a folder, is rejected before SQLite opens it, so no journal file is
/// created beside it.
#[test]
fn tune_rejects_non_file_study() {
    let dir = temp_dir("not-a-file");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    std::fs::create_dir(dir.join("folder")).unwrap();
    let data = digits();
    let cases = [("/dev/null", "character device"), ("folder", "folder")];
    for (study, kind) in cases {
        let journal = PathBuf::from(format!("{study}-journal"));
        let journal = dir.join(journal);
        let journal_before = journal.exists();
        let out = kiln(&dir, &quick_tune(&data, study, "logs"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{study}: {stderr}");
        assert!(stderr.contains(&format!("`{study}`")), "{study}: {stderr}");
        assert!(
            stderr.contains("is not a regular file"),
            "{study}: {stderr}"
        );
        assert!(stderr.contains(kind), "{study}: {stderr}");
        if !journal_before {
            assert!(!journal.exists(), "{study}: SQLite created {journal:?}");
        }
        assert!(
            !dir.join("logs").exists(),
            "{study}: the logdir was created"
        );
    }
    assert_eq!(names_in(&dir.join("folder")), Vec::<String>::new());

    let out = kiln(&dir, &["study", "/dev/null"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a regular file"), "{stderr}");
}

/// A study path in a folder that does not exist names that folder before
/// SQLite opens the file.
#[test]
fn tune_rejects_missing_study_folder() {
    let dir = temp_dir("no-folder");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    std::fs::write(dir.join("file"), "").unwrap();
    let data = digits();
    let cases = [
        ("nodir/sub/x.study", "the folder `nodir/sub` does not exist"),
        ("file/x.study", "`file` is not a folder"),
        ("file/sub/x.study", "`file` is not a folder"),
    ];
    for (study, message) in cases {
        let out = kiln(&dir, &quick_tune(&data, study, "logs"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{study}: {stderr}");
        assert!(stderr.contains(message), "{study}: {stderr}");
        assert!(
            !dir.join("logs").exists(),
            "{study}: the logdir was created"
        );
    }
    assert!(!dir.join("nodir").exists());
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"");
}

/// Options of a sweep with their values. `None` leaves an option out.
type Settings<'a> = Vec<(&'a str, Option<&'a str>)>;

/// Arguments of a one-trial sweep into `s.study` with these run settings.
fn settings_args<'a>(settings: &[(&'a str, Option<&'a str>)], trials: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "tune",
        "m.model",
        "--trials",
        trials,
        "--pruner",
        "none",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--study",
        "s.study",
    ];
    for (option, value) in settings {
        if let Some(value) = value {
            args.extend([*option, *value]);
        }
    }
    args
}

/// Replaces the value of `option` in `settings`.
fn with_setting<'a>(
    settings: &[(&'a str, Option<&'a str>)],
    option: &str,
    value: Option<&'a str>,
) -> Settings<'a> {
    settings
        .iter()
        .map(|&(o, v)| if o == option { (o, value) } else { (o, v) })
        .collect()
}

/// Writes the first `rows` rows of the digits data after `skip` to a
/// gzipped CSV file at `path`.
fn write_digits(path: &Path, skip: usize, rows: usize) {
    use std::io::{Read, Write};
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(digits()).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let lines: Vec<&str> = text.lines().skip(skip).take(rows).collect();
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    encoder
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    encoder.finish().unwrap();
}

/// A resume with other data, epochs, limit, validation split or metric is
/// rejected before it trains, with one line per changed option. A resume
/// with the study's settings continues.
#[test]
fn tune_resume_rejects_changed_settings() {
    let dir = temp_dir("settings");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    write_digits(&dir.join("d.csv.gz"), 0, 800);
    write_digits(&dir.join("other.csv.gz"), 0, 800);
    let study = dir.join("s.study");
    let settings = [
        ("--data", Some("d.csv.gz")),
        ("--epochs", Some("1")),
        ("--limit", Some("400")),
        ("--val-split", Some("0.1")),
        ("--metric", Some("val-accuracy")),
    ];
    let out = kiln(&dir, &settings_args(&settings, "1"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(trials_in(&study).len(), 1);

    let data = |name: &str| {
        std::fs::canonicalize(dir.join(name))
            .unwrap()
            .display()
            .to_string()
    };
    let other_data = format!(
        "--data: the study used `{}`, this run `{}`",
        data("d.csv.gz"),
        data("other.csv.gz")
    );
    let cases: Vec<(Settings, Vec<String>)> = vec![
        (
            with_setting(&settings, "--data", Some("other.csv.gz")),
            vec![other_data.clone()],
        ),
        (
            with_setting(&settings, "--epochs", Some("2")),
            vec!["--epochs: the study used 1, this run 2".into()],
        ),
        (
            with_setting(&settings, "--epochs", None),
            vec!["--epochs: the study used 1, this run the model's `epochs`".into()],
        ),
        (
            with_setting(&settings, "--limit", Some("300")),
            vec!["--limit: the study used 400, this run 300".into()],
        ),
        (
            with_setting(&settings, "--limit", None),
            vec!["--limit: the study used 400, this run none".into()],
        ),
        (
            with_setting(&settings, "--val-split", Some("0.2")),
            vec!["--val-split: the study used 0.1, this run 0.2".into()],
        ),
        (
            with_setting(&settings, "--metric", Some("val-loss")),
            vec!["--metric: the study used val_accuracy, this run val_loss".into()],
        ),
        (
            with_setting(
                &with_setting(
                    &with_setting(&settings, "--data", Some("other.csv.gz")),
                    "--epochs",
                    Some("2"),
                ),
                "--limit",
                Some("300"),
            ),
            vec![
                other_data,
                "--epochs: the study used 1, this run 2".into(),
                "--limit: the study used 400, this run 300".into(),
            ],
        ),
    ];
    for (changed, lines) in &cases {
        let out = kiln(&dir, &settings_args(changed, "2"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{changed:?}: {stderr}");
        assert!(stderr.contains("s.study"), "{changed:?}: {stderr}");
        assert!(stderr.contains("new --study path"), "{changed:?}: {stderr}");
        for line in lines {
            assert!(stderr.contains(line.as_str()), "{changed:?}: {stderr}");
        }
        let listed = stderr.lines().filter(|l| l.starts_with("  --")).count();
        assert_eq!(listed, lines.len(), "{changed:?}: {stderr}");
        assert_eq!(trials_in(&study).len(), 1, "{changed:?}: a trial ran");
    }

    // The same file name with other rows in it is other data.
    write_digits(&dir.join("d.csv.gz"), 100, 800);
    let out = kiln(&dir, &settings_args(&settings, "2"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("differ from the study's (the file changed"),
        "{stderr}"
    );
    assert_eq!(trials_in(&study).len(), 1);

    write_digits(&dir.join("d.csv.gz"), 0, 800);
    let out = kiln(&dir, &settings_args(&settings, "2"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(trials_in(&study).len(), 2);
}

/// A study made before kiln stored run settings stays readable. Its first
/// resume stores the run's settings, and later resumes must match them.
#[test]
fn tune_resumes_study_without_settings() {
    let dir = temp_dir("old-study");
    std::fs::write(dir.join("m.model"), DIGITS_SEARCH).unwrap();
    let data = digits();
    let study = dir.join("s.study");
    let settings = [
        ("--data", Some(data.as_str())),
        ("--epochs", Some("1")),
        ("--limit", Some("400")),
    ];
    let out = kiln(&dir, &settings_args(&settings, "1"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Older versions created the `studies` table without the column.
    let conn = rusqlite::Connection::open(&study).unwrap();
    conn.execute_batch("ALTER TABLE studies DROP COLUMN run_settings")
        .unwrap();
    drop(conn);

    let out = kiln(&dir, &["study", "s.study", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["trials"].as_array().unwrap().len(), 1, "{json}");

    let out = kiln(&dir, &settings_args(&settings, "2"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("did not store run settings"), "{stderr}");
    assert_eq!(trials_in(&study).len(), 2);

    let out = kiln(
        &dir,
        &settings_args(&with_setting(&settings, "--epochs", Some("2")), "3"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--epochs: the study used 1, this run 2"),
        "{stderr}"
    );
    assert_eq!(trials_in(&study).len(), 2);
}
