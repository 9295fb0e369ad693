//! The ensemble file: one `.safetensors` file holding every member's
//! weights (as `member<i>/<tensor>`) and, in its metadata under
//! `kiln_ensemble`, the rule, the weights and each member's checkpoint
//! metadata (model source, point, normalisation). `kiln eval` and
//! `kiln predict` accept it wherever they accept a checkpoint.

use super::Rule;
use crate::interp::Tensor;
use crate::runtime::checkpoint::{
    decode_f32, sha256_hex, write_atomic, Checkpoint, CheckpointError, Metadata,
};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const ENSEMBLE_KEY: &str = "kiln_ensemble";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    format: u32,
    rule: Rule,
    members: Vec<MemberHeader>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberHeader {
    weight: f64,
    checkpoint: Metadata,
}

/// A member as stored: its checkpoint (metadata and tensors) and weight.
pub struct StoredMember {
    pub checkpoint: Checkpoint,
    pub weight: f64,
}

/// A member to write: its checkpoint metadata, weight and named tensors.
pub struct MemberTensors<'a> {
    pub meta: Metadata,
    pub weight: f64,
    pub tensors: Vec<(String, &'a Tensor)>,
}

/// Writes an ensemble atomically.
///
/// # Errors
/// When the file cannot be written.
pub fn save(path: &Path, rule: Rule, members: &[MemberTensors]) -> Result<(), CheckpointError> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, member) in members.iter().enumerate() {
        for (name, t) in &member.tensors {
            let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            named.push((format!("member{i}/{name}"), t.shape().to_vec(), bytes));
        }
    }
    let views: Vec<(String, TensorView)> = named
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data).expect("sizes agree");
            (name.clone(), view)
        })
        .collect();
    let header = Header {
        format: FORMAT,
        rule,
        members: members
            .iter()
            .map(|m| MemberHeader {
                weight: m.weight,
                checkpoint: m.meta.clone(),
            })
            .collect(),
    };
    let json = serde_json::to_string(&header).expect("metadata serialises");
    let info = HashMap::from([(ENSEMBLE_KEY.to_string(), json)]);
    let bytes = safetensors::serialize(views, Some(info)).expect("valid tensors");
    write_atomic(path, &bytes, |file, data| file.write_all(data))
}

/// Whether `path` is an ensemble file (rather than a checkpoint).
pub fn is_ensemble(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, header)| {
            header
                .metadata()
                .as_ref()
                .map(|m| m.contains_key(ENSEMBLE_KEY))
        })
        .unwrap_or(false)
}

/// Checks what the header states about the members: at least one, weights
/// that are finite, non-negative, not all zero and with a finite sum
/// (pooling divides by that sum), and model sources that match their
/// recorded SHA-256.
fn check_members(members: &[MemberHeader]) -> Result<(), String> {
    if members.is_empty() {
        return Err("the ensemble has no members".into());
    }
    for (i, m) in members.iter().enumerate() {
        if !(m.weight.is_finite() && m.weight >= 0.0) {
            return Err(format!(
                "member {i} has weight {}; weights must be finite and not negative",
                m.weight
            ));
        }
        let meta = &m.checkpoint;
        if sha256_hex(&meta.source) != meta.source_sha256 {
            return Err(format!(
                "member {i}'s model source does not match its recorded SHA-256"
            ));
        }
    }
    if members.iter().all(|m| m.weight == 0.0) {
        return Err("every member has weight 0".into());
    }
    let total: f64 = members.iter().map(|m| m.weight).sum();
    if !total.is_finite() {
        return Err(format!(
            "the member weights sum to {total}; scale them down to a finite sum, because pooling uses only their ratios"
        ));
    }
    Ok(())
}

/// Reads an ensemble file.
///
/// # Errors
/// When the file cannot be read or is not a kiln ensemble.
pub fn load(path: &Path) -> Result<(Rule, Vec<StoredMember>), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| CheckpointError::InvalidEnsemble {
        path: path.to_path_buf(),
        reason,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(ENSEMBLE_KEY))
        .ok_or_else(|| invalid("no kiln ensemble metadata in the safetensors header".into()))?;
    let header: Header = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
    if header.format != FORMAT {
        return Err(invalid(format!(
            "ensemble format {} is not supported",
            header.format
        )));
    }
    check_members(&header.members).map_err(invalid)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let mut per_member: Vec<HashMap<String, Tensor>> = vec![HashMap::new(); header.members.len()];
    for (name, view) in tensors.tensors() {
        let (member, tensor) = name
            .strip_prefix("member")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(i, t)| Some((i.parse::<usize>().ok()?, t)))
            .ok_or_else(|| invalid(format!("tensor `{name}` names no member")))?;
        if member >= per_member.len() {
            return Err(invalid(format!("tensor `{name}` names no member")));
        }
        let t = decode_f32(&name, &view).map_err(invalid)?;
        per_member[member].insert(tensor.to_string(), t);
    }
    let members = header
        .members
        .into_iter()
        .zip(per_member)
        .map(|(m, tensors)| StoredMember {
            checkpoint: Checkpoint::from_parts(m.checkpoint, tensors),
            weight: m.weight,
        })
        .collect();
    Ok((header.rule, members))
}
