//! Data sets: loading IDX, CSV and NumPy files, normalisation computed on
//! the training split, seeded validation splits, shuffling and batching.

mod csv;
mod idx;
mod npy;

use crate::rng;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid {format} file: {reason}")]
    Invalid {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("`{path}`: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{0}")]
    Mismatch(String),
}

impl DataError {
    fn invalid(path: &Path, format: &'static str, reason: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.to_path_buf(),
            format,
            reason: reason.into(),
        }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Samples and their integer class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major features, `len() == labels.len() * features`.
    pub x: Vec<f32>,
    pub labels: Vec<usize>,
    /// Elements per sample.
    pub features: usize,
    /// Origin of the samples, for messages.
    pub source: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    /// Keeps only the first `limit` samples, when a limit is given.
    pub fn truncate(&mut self, limit: Option<usize>) {
        if let Some(limit) = limit.filter(|&l| l < self.len()) {
            let first: Vec<usize> = (0..limit).collect();
            *self = self.subset(&first);
        }
    }

    /// Copies the samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            x.extend_from_slice(self.sample(i));
        }
        Dataset {
            x,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            features: self.features,
            source: self.source.clone(),
        }
    }

    /// Checks the sample size and labels against a model's input shape
    /// (without the batch axis) and class count.
    ///
    /// # Errors
    /// Names both sizes when they differ.
    pub fn check_fits(&self, input_shape: &[usize], classes: usize) -> Result<(), DataError> {
        let expected: usize = input_shape.iter().product();
        if self.features != expected {
            return Err(DataError::Mismatch(format!(
                "{} has {} values per sample, but the model's input {:?} needs {expected}",
                self.source, self.features, input_shape
            )));
        }
        if let Some(max) = self.labels.iter().max() {
            if *max >= classes {
                let position = self.labels.iter().position(|l| l == max).unwrap_or(0);
                return Err(DataError::Mismatch(format!(
                    "{} has label {max} in sample {position} (0-based), but the model has {classes} classes; for CSV files, check which column contains the label (--label-column, default: the last)",
                    self.source
                )));
            }
        }
        if self.is_empty() {
            return Err(DataError::Mismatch(format!(
                "{} has no samples",
                self.source
            )));
        }
        if let Some(i) = self.x.iter().position(|v| !v.is_finite()) {
            return Err(DataError::Mismatch(format!(
                "{} has a non-finite value ({}) in sample {} (0-based), feature {}",
                self.source,
                self.x[i],
                i / self.features,
                i % self.features
            )));
        }
        Ok(())
    }
}

/// Location of the label column in a CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelColumn {
    /// The default: the header column named `label`, `labels`, `class`,
    /// `target` or `y` (in any case) when there is one, else the last
    /// column. Two columns with such names are an error.
    Auto,
    /// No label column: every column is a feature (for prediction).
    None,
    Index(usize),
    Name(String),
}

/// The training data and, when the source has one, its test split.
#[derive(Debug)]
pub struct Loaded {
    pub train: Dataset,
    pub test: Option<Dataset>,
}

/// Loads `--data`: a file (IDX, CSV, `.npy`, `.npz`, optionally gzip) or a
/// folder holding IDX files (`train-*` for training and `t10k-*` or
/// `test-*` as the test split).
///
/// # Errors
/// Names the file and what is wrong with it.
pub fn load(path: &Path, label: &LabelColumn) -> Result<Loaded, DataError> {
    let metadata = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if metadata.is_dir() {
        return idx::load_dir(path);
    }
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().to_lowercase());
    let stem = name.trim_end_matches(".gz");
    if stem.ends_with(".npz") {
        return npy::load_npz(path);
    }
    if stem.ends_with(".npy") {
        return Ok(Loaded {
            train: npy::load_npy(path)?,
            test: None,
        });
    }
    if stem.contains("idx") || stem.ends_with("-ubyte") {
        return Ok(Loaded {
            train: idx::load_pair(path)?,
            test: None,
        });
    }
    if stem.ends_with(".csv") || stem.ends_with(".txt") {
        return Ok(Loaded {
            train: csv::load(path, label)?,
            test: None,
        });
    }
    Err(DataError::Unsupported {
        path: path.to_path_buf(),
        reason: "unknown format; expected IDX, CSV, .npy or .npz (optionally .gz), or a folder of IDX files".into(),
    })
}

/// Loads features without labels, for prediction: a CSV file whose every
/// column is a feature, a `.npy` array of samples along its first axis, or
/// the `x` (else `x_test`) array of a `.npz` file. Labels are all 0.
///
/// # Errors
/// Names the file and what is wrong with it.
pub fn load_unlabeled(path: &Path) -> Result<Dataset, DataError> {
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().to_lowercase());
    let stem = name.trim_end_matches(".gz");
    if stem.ends_with(".npz") {
        return npy::load_npz_features(path);
    }
    if stem.ends_with(".npy") {
        return npy::load_npy_features(path);
    }
    if stem.ends_with(".csv") || stem.ends_with(".txt") {
        return csv::load(path, &LabelColumn::None);
    }
    Err(DataError::Unsupported {
        path: path.to_path_buf(),
        reason: "unlabeled data must be CSV, .npy or .npz".into(),
    })
}

/// Reads a whole file, decompressing it when it starts with the gzip magic.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::invalid(path, "gzip", e.to_string()))?;
        return Ok(out);
    }
    Ok(bytes)
}

/// Per-channel normalisation computed on the training split: values are
/// first divided by `scale`, then standardised per channel.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// Fits the normalisation of `data` whose samples are `channels` planes.
    /// Integer-valued data with a maximum above 1 (pixels) is scaled to
    /// `[0, 1]` by its maximum first.
    pub fn fit(data: &Dataset, channels: usize) -> Normalization {
        let max = data.x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let integers = data.x.iter().all(|v| v.fract() == 0.0);
        let scale = if integers && max > 1.0 { max } else { 1.0 };
        let plane = data.features / channels;
        let mut sum = vec![0f64; channels];
        let mut sum_sq = vec![0f64; channels];
        for sample in data.x.chunks_exact(data.features) {
            for (i, v) in sample.iter().enumerate() {
                let v = (*v / scale) as f64;
                sum[i / plane] += v;
                sum_sq[i / plane] += v * v;
            }
        }
        let count = (data.len() * plane).max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / count) as f32).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / count - (*m as f64).powi(2)).max(0.0);
                // A constant channel stays as it is instead of dividing by 0.
                if var > 1e-12 {
                    var.sqrt() as f32
                } else {
                    1.0
                }
            })
            .collect();
        Normalization { scale, mean, std }
    }

    pub fn apply(&self, data: &mut Dataset) {
        let channels = self.mean.len();
        let plane = data.features / channels;
        for sample in data.x.chunks_exact_mut(data.features) {
            for (i, v) in sample.iter_mut().enumerate() {
                let c = i / plane;
                *v = (*v / self.scale - self.mean[c]) / self.std[c];
            }
        }
    }
}

/// Draws a seeded permutation of `0..n`.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    // Fisher-Yates with draws from the counter-based generator.
    for i in (1..n).rev() {
        let j = (rng::word(seed, stream, i as u64) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Draws a bootstrap resample of `data`: as many samples as it has, drawn
/// with replacement and seeded by `seed`, so a sample may appear several
/// times or not at all (about 37% of them are left out).
pub fn bootstrap(data: &Dataset, seed: u64) -> Dataset {
    let n = data.len() as u64;
    let indices: Vec<usize> = (0..n)
        .map(|i| (rng::word(seed, BOOTSTRAP_STREAM, i) % n) as usize)
        .collect();
    let mut resample = data.subset(&indices);
    resample.source = format!("{} (bootstrap resample, seed {seed})", data.source);
    resample
}

/// Stream of the bootstrap draws: epochs shuffle on streams counted from 0
/// and the validation split uses `u64::MAX - 1`, so the draws never repeat
/// theirs.
const BOOTSTRAP_STREAM: u64 = u64::MAX - 2;

/// Splits off a seeded validation fraction.
pub fn split(data: &Dataset, fraction: f64, seed: u64) -> (Dataset, Option<Dataset>) {
    let n_val = ((data.len() as f64) * fraction).round() as usize;
    if n_val == 0 || n_val >= data.len() {
        return (data.clone(), None);
    }
    let order = permutation(data.len(), seed, u64::MAX - 1);
    let (val, train) = order.split_at(n_val);
    let mut val_set = data.subset(val);
    val_set.source = format!("{} (validation split)", data.source);
    (data.subset(train), Some(val_set))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(1000, 3, 1);
        assert_ne!(p[..10], (0..10).collect::<Vec<_>>()[..]);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }

    /// A data set whose only feature is the sample's index, so that a
    /// subset shows which samples it took.
    fn indexed(n: usize) -> Dataset {
        Dataset {
            x: (0..n).map(|i| i as f32).collect(),
            labels: vec![0; n],
            features: 1,
            source: "indexed".into(),
        }
    }

    #[test]
    fn bootstrap_is_deterministic_per_seed() {
        let data = indexed(200);
        assert_eq!(bootstrap(&data, 4).x, bootstrap(&data, 4).x);
        assert_ne!(bootstrap(&data, 4).x, bootstrap(&data, 5).x);
    }

    #[test]
    fn bootstrap_draws_n_with_replacement() {
        let data = indexed(500);
        let resample = bootstrap(&data, 1);
        assert_eq!(resample.len(), 500);
        let mut distinct = resample.x.clone();
        distinct.sort_by(f32::total_cmp);
        distinct.dedup();
        // With replacement, about 63% of the samples are drawn at least once.
        assert!(distinct.len() < 400, "{} distinct samples", distinct.len());
        assert!(distinct.len() > 250, "{} distinct samples", distinct.len());
    }

    #[test]
    fn bootstrap_draws_only_from_the_training_part() {
        let data = indexed(300);
        let (train, val) = split(&data, 0.2, 7);
        let val = val.expect("a validation split");
        let resample = bootstrap(&train, 3);
        assert_eq!(resample.len(), train.len());
        for value in &resample.x {
            assert!(
                train.x.contains(value),
                "sample {value} is not a training sample"
            );
            assert!(
                !val.x.contains(value),
                "sample {value} is a validation sample"
            );
        }
    }

    #[test]
    fn normalization_scales_pixels_and_standardises() {
        let data = Dataset {
            x: vec![0.0, 255.0, 255.0, 0.0],
            labels: vec![0, 1],
            features: 2,
            source: "test".into(),
        };
        let norm = Normalization::fit(&data, 1);
        assert_eq!(norm.scale, 255.0);
        assert!((norm.mean[0] - 0.5).abs() < 1e-6);
        assert!((norm.std[0] - 0.5).abs() < 1e-6);
        let mut copy = data.clone();
        norm.apply(&mut copy);
        assert_eq!(copy.x, vec![-1.0, 1.0, 1.0, -1.0]);
    }
}
