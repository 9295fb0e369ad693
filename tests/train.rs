//! End-to-end runs of `kiln train`, `eval` and `predict` on real data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kiln runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses the JSON records `--json` prints, one per line.
fn records(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Reads every tensor of a checkpoint, by name, leaving out metadata such
/// as timings.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    all.sort();
    all
}

const SMALL_MODEL: &str = "model small {
  input image: [1, 8, 8]
  logits = flatten(image) |> dense(units = 32) |> relu |> dropout(rate = 0.1) |> dense(units = 10)
  output logits: [10]
  train {
    optimizer = sgd(lr = 0.05, momentum = 0.9)
    batch_size = 64
    epochs = 3
    seed = 5
  }
}
";

fn write_model(dir: &Path, source: &str) -> String {
    let path = dir.join("model.model");
    std::fs::write(&path, source).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn digits_quick_start_reaches_95_percent() {
    let dir = temp_dir("digits");
    let out = kiln(&[
        "train",
        "models/digits.model",
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records = records(&out);
    let summary = records.last().unwrap();
    let accuracy = summary["final"]["val_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.95, "val_accuracy {accuracy}");
    assert!(dir.join("best.safetensors").exists());

    let ckpt = dir.join("best.safetensors");
    let eval = kiln(&[
        "eval",
        ckpt.to_str().unwrap(),
        "--data",
        "data/digits.csv.gz",
    ]);
    assert_eq!(eval.status.code(), Some(0), "{}", text(&eval.stderr));
    assert!(text(&eval.stdout).contains("confusion matrix"));

    let preds = dir.join("preds.csv");
    let predict = kiln(&[
        "predict",
        ckpt.to_str().unwrap(),
        "--data",
        "data/digits.csv.gz",
        "--out",
        preds.to_str().unwrap(),
    ]);
    assert_eq!(predict.status.code(), Some(0), "{}", text(&predict.stderr));
    let rows = std::fs::read_to_string(&preds).unwrap();
    assert_eq!(rows.lines().count(), 1798);
    assert!(rows.starts_with("row,class,p0,"));
}

/// One epoch of the batch-normalized reference network on 10,000
/// Fashion-MNIST images (installed by `apt-get install
/// dataset-fashion-mnist`) reaches over 80% test accuracy.
#[test]
fn fashion_bn_convnet_one_epoch() {
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(
        data.join("train-images-idx3-ubyte.gz").exists(),
        "Fashion-MNIST is missing: run `apt-get install dataset-fashion-mnist`"
    );
    let dir = temp_dir("fashion");
    let out = kiln(&[
        "train",
        "models/bn_convnet.model",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "10000",
        "--epochs",
        "1",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = records(&out).pop().unwrap();
    let accuracy = summary["final"]["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.80, "test_accuracy {accuracy}");
}

fn train_small(dir: &Path, extra: &[&str]) -> Output {
    let model = write_model(dir, SMALL_MODEL);
    let mut args = vec!["--quiet"];
    args.extend_from_slice(extra);
    train_on_digits(dir, &model, &args)
}

/// Trains `model` on the shipped digits, checkpointing into `dir`.
fn train_on_digits(dir: &Path, model: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        model,
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

#[test]
fn same_seed_gives_identical_weights() {
    let (a, b) = (temp_dir("det-a"), temp_dir("det-b"));
    assert_eq!(train_small(&a, &[]).status.code(), Some(0));
    assert_eq!(train_small(&b, &[]).status.code(), Some(0));
    assert_eq!(
        tensors(&a.join("last.safetensors")),
        tensors(&b.join("last.safetensors"))
    );
    let c = temp_dir("det-c");
    assert_eq!(train_small(&c, &["--seed", "6"]).status.code(), Some(0));
    assert_ne!(
        tensors(&a.join("last.safetensors")),
        tensors(&c.join("last.safetensors"))
    );
}

#[test]
fn resume_matches_uninterrupted_run() {
    let straight = temp_dir("resume-straight");
    assert_eq!(
        train_small(&straight, &["--epochs", "4"]).status.code(),
        Some(0)
    );
    let split = temp_dir("resume-split");
    assert_eq!(
        train_small(&split, &["--epochs", "2"]).status.code(),
        Some(0)
    );
    let last = split.join("last.safetensors");
    let resumed = train_small(
        &split,
        &["--epochs", "4", "--resume", last.to_str().unwrap()],
    );
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    assert_eq!(tensors(&straight.join("last.safetensors")), tensors(&last));
}

#[test]
fn sigint_checkpoints_and_resume_finishes_identically() {
    let data = "data/digits.csv.gz";
    let model_dir = temp_dir("sigint-model");
    // Many small steps, so the signal lands mid-epoch.
    let source = SMALL_MODEL
        .replace("batch_size = 64", "batch_size = 4")
        .replace("epochs = 3", "epochs = 30");
    let model = write_model(&model_dir, &source);
    let straight = temp_dir("sigint-straight");
    let out = kiln(&[
        "train",
        &model,
        "--data",
        data,
        "--checkpoint-dir",
        straight.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(0));

    let stopped = temp_dir("sigint-stopped");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            &model,
            "--data",
            data,
            "--checkpoint-dir",
            stopped.to_str().unwrap(),
            "--quiet",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .spawn()
        .unwrap();
    // Signal once the first epoch's checkpoint exists, so the run is
    // inside a later epoch.
    let first = stopped.join("last.safetensors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let signal = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signal.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "exit status after SIGINT");
    let last = stopped.join("last.safetensors");
    assert!(last.exists(), "no checkpoint after SIGINT");

    let resumed = kiln(&[
        "train",
        &model,
        "--data",
        data,
        "--checkpoint-dir",
        stopped.to_str().unwrap(),
        "--quiet",
        "--resume",
        last.to_str().unwrap(),
    ]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    assert_eq!(tensors(&straight.join("last.safetensors")), tensors(&last));
}

#[test]
fn nan_loss_stops_with_location() {
    let dir = temp_dir("nan");
    let source = SMALL_MODEL.replace("sgd(lr = 0.05, momentum = 0.9)", "sgd(lr = 1e30)");
    let model = write_model(&dir, &source);
    let out = kiln(&[
        "train",
        &model,
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("diverged at epoch 1, step"), "{stderr}");
    assert!(stderr.contains("first non-finite value is"), "{stderr}");
}

#[test]
fn callbacks_stop_reduce_log_and_save() {
    let dir = temp_dir("callbacks");
    let source = SMALL_MODEL
        .replace(
            "seed = 5",
            "seed = 5
    epochs = 10
    callbacks = [
      early_stopping(monitor = val_loss, patience = 2, min_delta = 10),
      reduce_lr_on_plateau(monitor = val_loss, patience = 0, factor = 0.5, min_delta = 10),
      checkpoint(save = best),
      csv_log()
    ]",
        )
        .replace("epochs = 3\n", "");
    let model = write_model(&dir, &source);
    let out = kiln(&[
        "train",
        &model,
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records = records(&out);
    let summary = records.last().unwrap();
    // No epoch improves val_loss by 10, so training stops after the first
    // epoch plus `patience` stale ones, as Keras does.
    assert_eq!(summary["stopped_early"], true);
    assert_eq!(summary["epochs"], 3);
    let lrs: Vec<f64> = records[..3]
        .iter()
        .map(|r| r["lr"].as_f64().unwrap())
        .collect();
    // The rate drops after the first stale epoch and applies from the next.
    assert_eq!(lrs[1], lrs[0], "{lrs:?}");
    assert!(lrs[2] < lrs[1], "{lrs:?}");
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    assert!(log.starts_with("epoch,loss,accuracy"));
    assert!(dir.join("best.safetensors").exists());
    assert!(!dir.join("last.safetensors").exists());
}

/// Writes the digits as IDX images and labels (optionally gzip).
fn write_idx(dir: &Path, gzip: bool) -> PathBuf {
    use std::io::{Read, Write};
    let mut csv = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open("data/digits.csv.gz").unwrap())
        .read_to_string(&mut csv)
        .unwrap();
    let rows: Vec<Vec<u8>> = csv
        .lines()
        .map(|l| l.split(',').map(|v| v.parse::<u8>().unwrap()).collect())
        .collect();
    let n = rows.len() as u32;
    let mut images = vec![0, 0, 8, 3];
    for d in [n, 8, 8] {
        images.extend_from_slice(&d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend_from_slice(&n.to_be_bytes());
    for row in &rows {
        images.extend(row[..64].iter().map(|v| v * 15));
        labels.push(row[64]);
    }
    let suffix = if gzip { ".gz" } else { "" };
    let write = |name: &str, data: &[u8]| {
        let path = dir.join(format!("{name}{suffix}"));
        let mut file = std::fs::File::create(&path).unwrap();
        if gzip {
            let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            encoder.write_all(data).unwrap();
            encoder.finish().unwrap();
        } else {
            file.write_all(data).unwrap();
        }
        path
    };
    write("train-labels-idx1-ubyte", &labels);
    write("train-images-idx3-ubyte", &images)
}

#[test]
fn each_data_format_trains() {
    let dir = temp_dir("formats");
    let idx = write_idx(&dir, false);
    let idx_dir = temp_dir("formats-gz");
    write_idx(&idx_dir, true);

    let csv: String = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open("data/digits.csv.gz").unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    let header: Vec<String> = (0..64)
        .map(|i| format!("p{i}"))
        .chain(["digit".into()])
        .collect();
    let with_header = format!("{}\n{csv}", header.join(","));
    let header_path = dir.join("digits_header.csv");
    std::fs::write(&header_path, with_header).unwrap();
    let label_first: String = csv
        .lines()
        .map(|l| {
            let (features, label) = l.rsplit_once(',').unwrap();
            format!("{label},{features}\n")
        })
        .collect();
    let first_path = dir.join("digits_first.csv");
    std::fs::write(&first_path, label_first).unwrap();

    let matrix: Vec<f32> = csv
        .lines()
        .flat_map(|l| {
            l.split(',')
                .map(|v| v.parse::<f32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let rows = matrix.len() / 65;
    let array = ndarray::Array2::from_shape_vec((rows, 65), matrix).unwrap();
    let npy = dir.join("digits.npy");
    ndarray_npy::write_npy(&npy, &array).unwrap();
    let npz = dir.join("digits.npz");
    let mut writer = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
    writer
        .add_array("x", &array.slice(ndarray::s![.., ..64]).to_owned())
        .unwrap();
    writer.add_array("y", &array.column(64).to_owned()).unwrap();
    writer.finish().unwrap();
    let gzipped = |path: &Path| {
        let target = path.with_extension(format!(
            "{}.gz",
            path.extension().unwrap().to_string_lossy()
        ));
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(&target).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut encoder, &std::fs::read(path).unwrap()).unwrap();
        encoder.finish().unwrap();
        target
    };
    let (npy_gz, npz_gz) = (gzipped(&npy), gzipped(&npz));

    let cases: Vec<(String, Vec<String>)> = vec![
        ("IDX".into(), vec![idx.to_string_lossy().into()]),
        (
            "IDX folder, gzip".into(),
            vec![idx_dir.to_string_lossy().into()],
        ),
        ("CSV gzip".into(), vec!["data/digits.csv.gz".into()]),
        (
            "CSV header, label by name".into(),
            vec![
                header_path.to_string_lossy().into(),
                "--label-column".into(),
                "digit".into(),
            ],
        ),
        (
            "CSV label by index".into(),
            vec![
                first_path.to_string_lossy().into(),
                "--label-column".into(),
                "0".into(),
            ],
        ),
        ("NPY".into(), vec![npy.to_string_lossy().into()]),
        ("NPZ".into(), vec![npz.to_string_lossy().into()]),
        ("NPY gzip".into(), vec![npy_gz.to_string_lossy().into()]),
        ("NPZ gzip".into(), vec![npz_gz.to_string_lossy().into()]),
    ];
    for (name, data) in cases {
        let ck = temp_dir("formats-ck");
        let mut args: Vec<&str> = vec!["--epochs", "1"];
        args.push("--data");
        args.extend(data.iter().map(String::as_str));
        let model = write_model(&ck, SMALL_MODEL);
        let mut full = vec![
            "train",
            model.as_str(),
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--json",
        ];
        full.extend(args);
        let out = kiln(&full);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let summary = records(&out).pop().unwrap();
        let accuracy = summary["final"]["val_accuracy"].as_f64().unwrap();
        assert!(accuracy > 0.5, "{name}: val_accuracy {accuracy}");
    }
}

#[test]
fn bad_data_files_are_named() {
    let dir = temp_dir("bad-data");
    let idx = write_idx(&dir, false);
    let bytes = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &bytes[..bytes.len() - 100]).unwrap();
    let model = write_model(&dir, SMALL_MODEL);
    let out = kiln(&[
        "train",
        &model,
        "--data",
        idx.to_str().unwrap(),
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("train-images-idx3-ubyte"), "{stderr}");
    assert!(stderr.contains("but the file holds"), "{stderr}");

    let out = kiln(&[
        "train",
        "models/mlp.model",
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("64 values per sample"), "{stderr}");
    assert!(stderr.contains("needs 784"), "{stderr}");

    let missing = kiln(&[
        "train",
        &model,
        "--data",
        "no/such.csv",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("no/such.csv"));
}

/// Builds a version 1.0 `.npy` file: the magic string, the header length,
/// the header dictionary padded with spaces to a multiple of 64 bytes, and
/// `data`.
fn npy_file(descriptor: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '{descriptor}', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Builds a zip archive of uncompressed members, as `numpy.savez` writes
/// one, with correct CRC-32 checksums.
fn stored_zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut archive = Vec::new();
    let mut directory = Vec::new();
    for (name, data) in members {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let offset = archive.len() as u32;
        // Version, flags, method, time, date, CRC-32, sizes, name and extra
        // lengths: the fields that local and central headers share.
        let mut common = vec![20, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        common.extend_from_slice(&crc.sum().to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&[0, 0]);

        archive.extend_from_slice(b"PK\x03\x04");
        archive.extend_from_slice(&common);
        archive.extend_from_slice(name.as_bytes());
        archive.extend_from_slice(data);

        directory.extend_from_slice(b"PK\x01\x02\x14\x00");
        directory.extend_from_slice(&common);
        // Comment length, disk, internal and external attributes.
        directory.extend_from_slice(&[0; 10]);
        directory.extend_from_slice(&offset.to_le_bytes());
        directory.extend_from_slice(name.as_bytes());
    }
    let directory_offset = archive.len() as u32;
    archive.extend_from_slice(&directory);
    archive.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
    let count = (members.len() as u16).to_le_bytes();
    archive.extend_from_slice(&[count, count].concat());
    archive.extend_from_slice(&(directory.len() as u32).to_le_bytes());
    archive.extend_from_slice(&directory_offset.to_le_bytes());
    archive.extend_from_slice(&[0, 0]);
    archive
}

#[test]
fn npy_shape_larger_than_file_is_rejected() {
    let dir = temp_dir("npy-shape");
    assert_eq!(train_small(&dir, &["--epochs", "1"]).status.code(), Some(0));
    let checkpoint = dir.join("best.safetensors");
    // About 1 KB, whose header promises 25.6 TB of float32 values.
    let huge = npy_file("<f4", "(100000000000, 64)", &[0; 896]);
    let labels = npy_file("<i8", "(100000000000,)", &[0; 64]);
    std::fs::write(dir.join("huge.npy"), &huge).unwrap();
    let npz = stored_zip(&[("x.npy", &huge), ("y.npy", &labels)]);
    std::fs::write(dir.join("huge.npz"), npz).unwrap();

    for name in ["huge.npy", "huge.npz"] {
        let data = dir.join(name);
        let data = data.to_str().unwrap();
        let out_csv = dir.join("p.csv");
        let runs: [(&str, Vec<&str>); 3] = [
            (
                "train",
                vec![
                    "train",
                    "models/digits.model",
                    "--data",
                    data,
                    "--checkpoint-dir",
                    dir.to_str().unwrap(),
                ],
            ),
            (
                "eval",
                vec!["eval", checkpoint.to_str().unwrap(), "--data", data],
            ),
            (
                "predict",
                vec![
                    "predict",
                    checkpoint.to_str().unwrap(),
                    "--data",
                    data,
                    "--out",
                    out_csv.to_str().unwrap(),
                ],
            ),
        ];
        for (command, args) in runs {
            let out = kiln(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}, {command}: {stderr}");
            assert!(
                stderr.contains("the data is truncated: the header promises 6400000000000 float32 values of shape [100000000000, 64] (25600000000000 bytes), but only 896 bytes follow the header"),
                "{name}, {command}: {stderr}"
            );
        }
    }
}

#[test]
fn truncated_npy_is_reported_as_truncated() {
    let dir = temp_dir("npy-truncated");
    assert_eq!(train_small(&dir, &["--epochs", "1"]).status.code(), Some(0));
    let checkpoint = dir.join("best.safetensors");
    let values: Vec<u8> = (0..10 * 64)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let whole = npy_file("<f4", "(10, 64)", &values);
    let path = dir.join("cut.npy");
    std::fs::write(&path, &whole[..whole.len() - 100]).unwrap();
    let out_csv = dir.join("p.csv");
    let out = kiln(&[
        "predict",
        checkpoint.to_str().unwrap(),
        "--data",
        path.to_str().unwrap(),
        "--out",
        out_csv.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the data is truncated: the header promises 640 float32 values of shape [10, 64] (2560 bytes), but only 2460 bytes follow the header"),
        "{stderr}"
    );
    assert!(!stderr.contains("incorrect descriptor"), "{stderr}");
    assert!(!stderr.contains("must be float32"), "{stderr}");

    // The whole file predicts, so the message above is about the cut.
    std::fs::write(&path, &whole).unwrap();
    let out = kiln(&[
        "predict",
        checkpoint.to_str().unwrap(),
        "--data",
        path.to_str().unwrap(),
        "--out",
        out_csv.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// TensorBoard's own reader (the `tensorboard` Python package) loads the
/// event files and finds every promised tag.
#[test]
fn tensorboard_reader_accepts_event_files() {
    let dir = temp_dir("tensorboard");
    let logdir = dir.join("logs");
    let out = train_small(
        &dir,
        &["--logdir", logdir.to_str().unwrap(), "--log-every", "5"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let check = Command::new("python3")
        .args(["tests/tensorboard_check.py", logdir.to_str().unwrap(), "3"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "{}{}\n(install the reader with `python3 -m pip install tensorboard`)",
        text(&check.stdout),
        text(&check.stderr)
    );
}

#[test]
fn unwritable_checkpoint_dir_fails_before_training() {
    let dir = temp_dir("unwritable");
    let file = dir.join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let model = write_model(&dir, SMALL_MODEL);
    let out = kiln(&[
        "train",
        &model,
        "--data",
        "data/digits.csv.gz",
        "--checkpoint-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot write checkpoints"), "{stderr}");
    assert!(text(&out.stdout).is_empty(), "trained before failing");
}

#[test]
fn non_finite_data_is_rejected() {
    let dir = temp_dir("nan-data");
    let path = dir.join("nan.csv");
    std::fs::write(&path, "1,2,0\nnan,3,1\n").unwrap();
    let model = write_model(
        &dir,
        "model m { input f: [2] logits = dense(f, units = 2) output logits: [2] }",
    );
    let out = kiln(&[
        "train",
        &model,
        "--data",
        path.to_str().unwrap(),
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("non-finite value"), "{stderr}");
    assert!(stderr.contains("sample 1"), "{stderr}");
}

#[test]
fn ambiguous_csv_label_is_rejected() {
    let dir = temp_dir("ambiguous-label");
    let path = dir.join("two.csv");
    std::fs::write(&path, "y,f,class\n1,2,0\n0,3,1\n").unwrap();
    let model = write_model(
        &dir,
        "model m { input f: [2] logits = dense(f, units = 2) output logits: [2] }",
    );
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            &model,
            "--data",
            path.to_str().unwrap(),
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--epochs",
            "1",
            // Two samples leave none for a 10% validation split.
            "--val-split",
            "0",
        ];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let out = train(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("columns 0 (`y`) and 2 (`class`) could each be the label"),
        "{stderr}"
    );
    assert!(stderr.contains("pass --label-column"), "{stderr}");

    let out = train(&["--label-column", "class"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn invalid_numbers_are_rejected() {
    let dir = temp_dir("numbers");
    let model = write_model(&dir, SMALL_MODEL);
    for flags in [
        ["--lr", "0"],
        ["--lr", "-1"],
        ["--val-split", "-0.1"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--val-split", "1.5"],
    ] {
        let mut args = vec![
            "train",
            model.as_str(),
            "--data",
            "data/digits.csv.gz",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
        ];
        args.extend(flags);
        let out = kiln(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(
            text(&out.stderr).contains(flags[0]),
            "{flags:?}: {}",
            text(&out.stderr)
        );
    }
}

/// Rewrites the kiln metadata in a checkpoint's safetensors header with
/// `edit`, keeping the tensors.
fn edit_metadata(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let kiln = header["__metadata__"]["kiln"].as_str().unwrap().to_string();
    let mut meta: serde_json::Value = serde_json::from_str(&kiln).unwrap();
    edit(&mut meta);
    header["__metadata__"]["kiln"] = serde_json::Value::String(meta.to_string());
    let mut text = header.to_string().into_bytes();
    // safetensors pads the header to a multiple of 8 bytes with spaces.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn mismatched_normalisation_is_an_invalid_checkpoint() {
    let dir = temp_dir("normalisation");
    let model = write_model(&dir, SMALL_MODEL);
    let checkpoints = dir.join("ckpt");
    let out = kiln(&[
        "train",
        &model,
        "--data",
        "data/digits.csv.gz",
        "--epochs",
        "1",
        "--checkpoint-dir",
        checkpoints.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let best = checkpoints.join("best.safetensors");
    let original = std::fs::read(&best).unwrap();

    let edits: [(&str, serde_json::Value, serde_json::Value); 4] = [
        (
            "three means",
            serde_json::json!([0.1, 0.2, 0.3]),
            serde_json::json!([1.0, 1.0, 1.0]),
        ),
        ("no means", serde_json::json!([]), serde_json::json!([])),
        (
            "two means",
            serde_json::json!([0.1, 0.2]),
            serde_json::json!([1.0, 1.0]),
        ),
        (
            "zero std",
            serde_json::json!([0.1]),
            serde_json::json!([0.0]),
        ),
    ];
    for (case, mean, std) in edits {
        std::fs::write(&best, &original).unwrap();
        edit_metadata(&best, |meta| {
            meta["normalization"]["mean"] = mean.clone();
            meta["normalization"]["std"] = std.clone();
        });
        let predictions = dir.join("predictions.csv");
        let predict = ["--out", predictions.to_str().unwrap()];
        for (command, extra) in [("eval", &[][..]), ("predict", &predict[..])] {
            let mut args = vec![
                command,
                best.to_str().unwrap(),
                "--data",
                "data/digits.csv.gz",
            ];
            args.extend_from_slice(extra);
            let out = kiln(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{case}, {command}: {stderr}");
            assert!(!stderr.contains("panicked"), "{case}, {command}: {stderr}");
            assert!(
                stderr.contains("normalisation"),
                "{case}, {command}: {stderr}"
            );
        }
    }
}

/// A split that rounds to no sample on one side is an error, not a run
/// without validation.
#[test]
fn empty_split_side_is_rejected() {
    let dir = temp_dir("split");
    for (split, side) in [
        ("0.0001", "no validation sample"),
        ("0.9999", "no training sample"),
    ] {
        let out = train_small(&dir, &["--val-split", split]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{split}: {stderr}");
        assert!(stderr.contains(side), "{split}: {stderr}");
    }
}

/// Without validation, callbacks that name a validation metric get a note
/// naming the training metric they follow instead.
#[test]
fn missing_validation_is_noted() {
    let dir = temp_dir("no-validation");
    let model = write_model(
        &dir,
        &SMALL_MODEL.replace(
            "seed = 5",
            "seed = 5\n    callbacks = [early_stopping(patience = 2)]",
        ),
    );
    let out = train_on_digits(&dir, &model, &["--val-split", "0", "--epochs", "1"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("`early_stopping` follows the training loss, not `val_loss`"),
        "{stderr}"
    );
}

/// When the best checkpoint cannot be written, the closing line does not
/// name it as written.
#[test]
fn failed_best_checkpoint_is_not_reported_as_written() {
    let dir = temp_dir("best-is-a-folder");
    std::fs::create_dir_all(dir.join("best.safetensors")).unwrap();
    let model = write_model(&dir, SMALL_MODEL);
    let out = train_on_digits(&dir, &model, &["--epochs", "1"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("the best checkpoint could not be written"),
        "{stdout}"
    );
    assert_eq!(
        stderr.matches("cannot write checkpoint").count(),
        1,
        "{stderr}"
    );
}

/// Resuming with another model file than the checkpoint's is an error, as
/// the run would train the checkpoint's model and ignore the file.
#[test]
fn resume_with_another_model_file_is_rejected() {
    let dir = temp_dir("resume-other-model");
    let first = train_small(&dir, &["--epochs", "1"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let checkpoint = dir.join("last.safetensors");
    let out = train_on_digits(
        &dir.join("resumed"),
        "models/digits.model",
        &["--resume", checkpoint.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("was trained from a different model file"),
        "{stderr}"
    );
}
