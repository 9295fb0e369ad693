//! Checkpoints: weights, running statistics and optimizer buffers as one
//! `.safetensors` file, with the training state as JSON in its metadata.
//!
//! Tensor names are the IR's: `<layer>.weight`, `<layer>.bias`,
//! `<layer>.running_mean`, and `optimizer.<buffer>/<layer>.<tensor>` for the
//! optimizer's buffers, so the Python `safetensors` package loads them as a
//! state dict. Files are written to a temporary name, synced and renamed, so
//! a failed write (a full disk, say) leaves the previous checkpoint intact.

use crate::data::Normalization;
use crate::interp::optim::OptimizerState;
use crate::interp::{Tensor, Weights};
use crate::ir::Graph;
use ndarray::IxDyn;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metadata key that contains [`Metadata`] as JSON.
const METADATA_KEY: &str = "kiln";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read checkpoint `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a kiln checkpoint: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid ensemble file `{path}`: {reason}")]
    InvalidEnsemble { path: PathBuf, reason: String },
}

/// One epoch's metrics, as the history in a checkpoint and the JSON log
/// record them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub top5_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
}

/// State of the callbacks that carry over between epochs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallbackState {
    /// Best value of the checkpoint callback's monitor and its epoch.
    pub best: Option<(f64, usize)>,
    /// Best value of the early-stopping monitor and its epoch.
    #[serde(default)]
    pub stop_best: Option<(f64, usize)>,
    /// Epochs since the early-stopping monitor last improved.
    pub stale_epochs: usize,
    /// The same for reduce-on-plateau, with its own best and cooldown.
    pub plateau_best: Option<f64>,
    pub plateau_stale: usize,
    pub cooldown: usize,
}

/// Everything besides tensors that resuming and evaluating need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: u32,
    pub model: String,
    /// The `.model` file's text, so a checkpoint is self-contained.
    pub source: String,
    pub source_sha256: String,
    /// The hyperparameters of the trained point, as source text.
    pub point: Vec<(String, String)>,
    /// Epochs completed.
    pub epoch: usize,
    /// Batches done in the current epoch (non-zero after an interruption).
    pub batch_in_epoch: usize,
    /// Optimizer steps taken in all; dropout masks are keyed by it.
    pub global_step: u64,
    pub seed: u64,
    pub lr: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub val_split: f64,
    /// Seed of the validation split; the model's `seed` when absent.
    #[serde(default)]
    pub split_seed: Option<u64>,
    /// `--limit`: training used only the first this many samples.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Whether training used a bootstrap resample of the training part,
    /// drawn with `seed` after the validation split was taken out.
    #[serde(default)]
    pub bootstrap: bool,
    pub normalization: Normalization,
    pub input_shape: Vec<usize>,
    pub classes: usize,
    pub callbacks: CallbackState,
    pub history: Vec<EpochRecord>,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: Metadata,
    tensors: HashMap<String, Tensor>,
}

pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Serialises weights, optimizer buffers and metadata.
fn encode(
    graph: &Graph,
    weights: &Weights,
    optimizer: &OptimizerState,
    meta: &Metadata,
) -> Vec<u8> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (info, t) in graph.params.iter().zip(&weights.params) {
        named.push((info.name.clone(), t.shape().to_vec(), bytes_of(t)));
    }
    for (info, t) in graph.states.iter().zip(&weights.states) {
        named.push((info.name.clone(), t.shape().to_vec(), bytes_of(t)));
    }
    for (info, buffers) in graph.params.iter().zip(&optimizer.buffers) {
        for (slot, buffer) in ["m", "v"].iter().zip(buffers) {
            if let Some(t) = buffer {
                named.push((
                    format!("optimizer.{slot}/{}", info.name),
                    t.shape().to_vec(),
                    bytes_of(t),
                ));
            }
        }
    }
    let views: Vec<(String, TensorView)> = named
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data).expect("sizes agree");
            (name.clone(), view)
        })
        .collect();
    let json = serde_json::to_string(meta).expect("metadata serialises");
    let info = HashMap::from([(METADATA_KEY.to_string(), json)]);
    safetensors::serialize(views, Some(info)).expect("valid tensors")
}

/// Writes a checkpoint atomically.
///
/// # Errors
/// When the file cannot be written; the previous file at `path`, if any, is
/// then unchanged.
pub fn save(
    path: &Path,
    graph: &Graph,
    weights: &Weights,
    optimizer: &OptimizerState,
    meta: &Metadata,
) -> Result<(), CheckpointError> {
    let bytes = encode(graph, weights, optimizer, meta);
    write_atomic(path, &bytes, |file, data| file.write_all(data))
}

/// Writes `bytes` through `write` to a temporary file beside `path`, syncs
/// it and renames it over `path`. On failure the temporary file is removed.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut std::fs::File, &[u8]) -> std::io::Result<()>,
) -> Result<(), CheckpointError> {
    let error = |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = std::fs::File::create(&temp).and_then(|mut file| {
        write(&mut file, bytes)?;
        file.sync_all()
    });
    if let Err(e) = result.and_then(|()| std::fs::rename(&temp, path)) {
        let _ = std::fs::remove_file(&temp);
        return Err(error(e));
    }
    Ok(())
}

/// Decodes a little-endian float32 safetensors view into a tensor.
///
/// # Errors
/// Names the tensor when it is not float32 or its size does not fit its
/// shape.
pub fn decode_f32(name: &str, view: &TensorView) -> Result<Tensor, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("tensor `{name}` is not float32"));
    }
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_shape_vec(IxDyn(view.shape()), values).map_err(|e| format!("tensor `{name}`: {e}"))
}

impl Metadata {
    /// Checks that the stored input normalisation has one finite mean and
    /// one positive, finite standard deviation per input channel, as
    /// [`Normalization::apply`] needs.
    ///
    /// # Errors
    /// Describes the first mismatch.
    pub fn check_normalization(&self) -> Result<(), String> {
        let norm = &self.normalization;
        let channels = if self.input_shape.len() == 3 {
            self.input_shape[0]
        } else {
            1
        };
        if norm.mean.len() != channels || norm.std.len() != channels {
            return Err(format!(
                "the normalisation has {} means and {} standard deviations, but the input {:?} has {channels} channel(s)",
                norm.mean.len(),
                norm.std.len(),
                self.input_shape
            ));
        }
        if !(norm.scale.is_finite() && norm.scale > 0.0) {
            return Err(format!(
                "the normalisation scale {} is not a positive number",
                norm.scale
            ));
        }
        if let Some(m) = norm.mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("the normalisation mean {m} is not finite"));
        }
        if let Some(s) = norm.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!(
                "the normalisation standard deviation {s} is not a positive number"
            ));
        }
        Ok(())
    }
}

impl Checkpoint {
    /// A checkpoint from its metadata and tensors by name, as an ensemble
    /// file stores its members.
    pub fn from_parts(meta: Metadata, tensors: HashMap<String, Tensor>) -> Checkpoint {
        Checkpoint { meta, tensors }
    }

    /// Copies a model's weights and running statistics, named as
    /// [`save`] names them, into a checkpoint held in memory. Optimizer
    /// buffers are left out, so it can be evaluated but not resumed.
    pub fn in_memory(graph: &Graph, weights: &Weights, meta: &Metadata) -> Checkpoint {
        let params = graph.params.iter().map(|p| &p.name).zip(&weights.params);
        let states = graph.states.iter().map(|s| &s.name).zip(&weights.states);
        let tensors = params
            .chain(states)
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect();
        Checkpoint {
            meta: meta.clone(),
            tensors,
        }
    }

    /// Reads a checkpoint file.
    ///
    /// # Errors
    /// When the file cannot be read or is not a kiln checkpoint.
    pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| invalid("no kiln metadata in the safetensors header".into()))?;
        let meta: Metadata = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(invalid(format!(
                "format {} is not supported (expected {FORMAT})",
                meta.format
            )));
        }
        meta.check_normalization().map_err(invalid)?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        let mut map = HashMap::new();
        for (name, view) in tensors.tensors() {
            let tensor = decode_f32(&name, &view).map_err(invalid)?;
            map.insert(name, tensor);
        }
        Ok(Checkpoint { meta, tensors: map })
    }

    /// Looks up the weights for `graph` by name.
    ///
    /// # Errors
    /// When the stored normalisation does not fit the input, or names the
    /// first tensor that is missing or has the wrong shape.
    pub fn weights(&self, graph: &Graph, path: &Path) -> Result<Weights, CheckpointError> {
        // Members of an ensemble file arrive through `from_parts`, not
        // `load`, so their metadata is checked here as well.
        self.meta
            .check_normalization()
            .map_err(|reason| CheckpointError::Invalid {
                path: path.to_path_buf(),
                reason,
            })?;
        let get = |name: &str, shape: &[usize]| {
            let t = self
                .tensors
                .get(name)
                .ok_or_else(|| CheckpointError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{name}` is missing"),
                })?;
            if t.shape() != shape {
                return Err(CheckpointError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{name}` has shape {:?}, the model needs {shape:?}",
                        t.shape()
                    ),
                });
            }
            Ok(t.clone())
        };
        Ok(Weights {
            params: graph
                .params
                .iter()
                .map(|p| get(&p.name, &p.shape))
                .collect::<Result<_, _>>()?,
            states: graph
                .states
                .iter()
                .map(|s| get(&s.name, &s.shape))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Restores optimizer buffers saved with the weights.
    pub fn optimizer_buffers(&self, graph: &Graph) -> Vec<[Option<Tensor>; 2]> {
        graph
            .params
            .iter()
            .map(|p| {
                [
                    self.tensors
                        .get(&format!("optimizer.m/{}", p.name))
                        .cloned(),
                    self.tensors
                        .get(&format!("optimizer.v/{}", p.name))
                        .cloned(),
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails halfway (as on a full disk) leaves the previous
    /// file untouched and no temporary file behind.
    #[test]
    fn failed_write_keeps_previous_file() {
        let dir = std::env::temp_dir().join(format!("kiln-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("last.safetensors");
        write_atomic(&path, b"first", |f, d| f.write_all(d)).unwrap();

        let result = write_atomic(&path, b"second version", |f, d| {
            f.write_all(&d[..3])?;
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device",
            ))
        });
        assert!(matches!(result, Err(CheckpointError::Write { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "last.safetensors")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
