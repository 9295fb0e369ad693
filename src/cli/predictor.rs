//! What `kiln eval` and `kiln predict` run: one checkpoint, or the members
//! of an ensemble file, each with its own compiled kernels and input
//! normalisation. Members predict in parallel, one thread each.

use super::exit;
use super::train::{restore, restore_checkpoint, ExecArgs, Restored};
use crate::data::Dataset;
use crate::ensemble::{self, file, Predictions, Rule};
use crate::runtime::engine::Engine;
use crate::runtime::evaluate::batch_tensor;
use ndarray::{Array2, Ix2};
use std::io::Read;
use std::path::Path;

pub(crate) struct Member {
    pub restored: Restored,
    pub weight: f64,
    /// Where the member came from, for reports.
    pub name: String,
    engine: Engine,
}

impl Member {
    pub fn new(
        restored: Restored,
        weight: f64,
        name: String,
        exec: &ExecArgs,
        threads: usize,
    ) -> Result<Member, (u8, String)> {
        let engine = Engine::new(
            restored.instance.graph.clone(),
            restored.instance.train.loss.clone(),
        )
        .with_executor(exec.kind())
        .with_threads(threads)
        .map_err(|e| (exit::USAGE, e.to_string()))?;
        Ok(Member {
            restored,
            weight,
            name,
            engine,
        })
    }

    /// Logits and probabilities of every sample of raw (unnormalised) data.
    pub fn predict(&mut self, raw: &Dataset) -> Result<Predictions, (u8, String)> {
        let meta = &self.restored.meta;
        let mut data = raw.clone();
        data.check_fits(&meta.input_shape, meta.classes)
            .map_err(|e| (exit::USAGE, e.to_string()))?;
        meta.normalization.apply(&mut data);
        let mut logits = Array2::<f32>::zeros((data.len(), meta.classes));
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(meta.batch_size.max(1)) {
            let x = batch_tensor(&data, chunk, &meta.input_shape);
            let out = self
                .engine
                .predict(&self.restored.weights, &x)
                .map_err(|e| (exit::USAGE, e.to_string()))?;
            let out = out
                .into_dimensionality::<Ix2>()
                .map_err(|e| (exit::USAGE, e.to_string()))?;
            for (&row, values) in chunk.iter().zip(out.outer_iter()) {
                logits.row_mut(row).assign(&values);
            }
        }
        Ok(Predictions::from_logits(logits))
    }
}

pub(crate) struct Predictor {
    pub members: Vec<Member>,
    pub rule: Rule,
}

impl Predictor {
    /// Opens a checkpoint or an ensemble file.
    ///
    /// # Errors
    /// When the file is neither, or a member's model no longer checks.
    pub fn open(path: &Path, exec: &ExecArgs) -> Result<Predictor, (u8, String)> {
        let threads = exec
            .threads
            .unwrap_or_else(crate::runtime::engine::default_threads);
        if !file::is_ensemble(path) {
            let hint = "train it with `kiln train` and pass the checkpoint that run writes (by default `checkpoints/best.safetensors`)";
            let restored = restore_or_explain(path, hint)?;
            let member = Member::new(restored, 1.0, path.display().to_string(), exec, threads)?;
            return Ok(Predictor {
                members: vec![member],
                rule: Rule::MeanProbability,
            });
        }
        let (rule, stored) = file::load(path).map_err(|e| (exit::USAGE, e.to_string()))?;
        let per_member = (threads / stored.len()).max(1);
        let mut members = Vec::new();
        for (i, m) in stored.into_iter().enumerate() {
            let name = format!("member {i} ({})", m.checkpoint.meta.model);
            let origin = format!("member {i} of {}", path.display());
            let restored = restore_checkpoint(m.checkpoint, &origin)?;
            members.push(Member::new(restored, m.weight, name, exec, per_member)?);
        }
        let predictor = Predictor { members, rule };
        predictor.check_agreement()?;
        Ok(predictor)
    }

    /// Members must predict the same classes from the same raw inputs.
    pub fn check_agreement(&self) -> Result<(), (u8, String)> {
        let first = &self.members[0].restored.meta;
        for m in &self.members[1..] {
            let meta = &m.restored.meta;
            let (a, b): (usize, usize) = (
                first.input_shape.iter().product(),
                meta.input_shape.iter().product(),
            );
            if a != b || meta.classes != first.classes {
                return Err((
                    exit::USAGE,
                    format!(
                        "{} takes {:?} and predicts {} classes, but {} takes {:?} and predicts {}",
                        m.name,
                        meta.input_shape,
                        meta.classes,
                        self.members[0].name,
                        first.input_shape,
                        first.classes
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn input_shape(&self) -> &[usize] {
        &self.members[0].restored.meta.input_shape
    }

    pub fn classes(&self) -> usize {
        self.members[0].restored.meta.classes
    }

    pub fn weights(&self) -> Vec<f64> {
        self.members.iter().map(|m| m.weight).collect()
    }

    /// Every member's predictions on raw data, computed in parallel.
    pub fn member_predictions(&mut self, raw: &Dataset) -> Result<Vec<Predictions>, (u8, String)> {
        let results: Vec<Result<Predictions, (u8, String)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .members
                .iter_mut()
                .map(|m| scope.spawn(move || m.predict(raw)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err((exit::USAGE, "a member's prediction panicked".into()))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Pooled probabilities and classes on raw data.
    pub fn predict(&mut self, raw: &Dataset) -> Result<(Array2<f32>, Vec<usize>), (u8, String)> {
        let predictions = self.member_predictions(raw)?;
        let refs: Vec<&Predictions> = predictions.iter().collect();
        Ok(ensemble::combine(self.rule, &refs, &self.weights()))
    }
}

/// Opens a checkpoint. When that fails and `path` is a `.model` file, the
/// error names it a model file and adds `hint`: what the calling command
/// does with model files.
///
/// # Errors
/// When the checkpoint cannot be opened.
pub(crate) fn restore_or_explain(path: &Path, hint: &str) -> Result<Restored, (u8, String)> {
    restore(path).map_err(|error| {
        if is_model_file(path) {
            let message = format!(
                "`{}` is a model file, not a checkpoint; {hint}",
                path.display()
            );
            (exit::USAGE, message)
        } else {
            error
        }
    })
}

/// Bytes read from the start of a file to tell whether it is a model file.
const MODEL_SNIFF_BYTES: u64 = 64 * 1024;

/// Checks whether `path` is a `.model` file. Its text starts, after
/// whitespace and `#` comments, with an item keyword of the model grammar
/// (`model`, `block` or `ensemble`). A file whose name ends in `.model`
/// counts too, unless its content is a safetensors file.
fn is_model_file(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut start = Vec::new();
    if file
        .take(MODEL_SNIFF_BYTES)
        .read_to_end(&mut start)
        .is_err()
    {
        return false;
    }
    if path.extension().is_some_and(|e| e == "model") && !is_safetensors(&start) {
        return true;
    }
    // Only the text before the first keyword matters, so the bytes are cut
    // at the first invalid UTF-8, which may be a character split by `take`.
    let valid = match std::str::from_utf8(&start) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&start[..e.valid_up_to()]).unwrap_or_default(),
    };
    starts_with_model_item(valid)
}

/// Checks whether `start`, the first bytes of a file, begins as safetensors
/// files do: an 8-byte little-endian header length, then the header's JSON
/// object. The safetensors crate (0.8) rejects headers over 100 MB, so the
/// length's top four bytes are zero, which text never contains.
fn is_safetensors(start: &[u8]) -> bool {
    start.len() > 8 && start[4..8] == [0; 4] && start[8] == b'{'
}

/// Checks whether `text` starts, after the grammar's whitespace (including
/// a byte order mark) and `#` comments, with `model`, `block` or `ensemble`
/// followed by whitespace.
fn starts_with_model_item(text: &str) -> bool {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\r' | '\n' | '\u{feff}');
    let mut rest = text.trim_start_matches(is_space);
    while let Some(comment) = rest.strip_prefix('#') {
        let after_comment = comment.split_once('\n').map_or("", |(_, after)| after);
        rest = after_comment.trim_start_matches(is_space);
    }
    ["model", "block", "ensemble"].iter().any(|keyword| {
        rest.strip_prefix(keyword)
            .is_some_and(|after| after.starts_with(is_space))
    })
}

#[cfg(test)]
mod tests {
    use super::{is_safetensors, starts_with_model_item};

    #[test]
    fn model_text_is_recognised() {
        assert!(starts_with_model_item("model mlp {\n}"));
        assert!(starts_with_model_item(
            "\u{feff}# digits\n\n  ensemble pool {"
        ));
        assert!(starts_with_model_item("block res(x) {"));
    }

    #[test]
    fn safetensors_start_is_recognised() {
        assert!(is_safetensors(b"\x10\0\0\0\0\0\0\0{\"a\":{}}"));
        assert!(!is_safetensors(b"model mlp {"));
        assert!(!is_safetensors(b"model m {"));
    }

    #[test]
    fn other_text_is_not_a_model() {
        assert!(!starts_with_model_item("modelling notes"));
        assert!(!starts_with_model_item("# only a comment"));
        assert!(!starts_with_model_item(
            "\u{a0}\0\0\0\0\0\0{\"__metadata__\""
        ));
        assert!(!starts_with_model_item(""));
    }
}
