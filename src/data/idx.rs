//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (two zero
//! bytes, a type code, the number of dimensions, then each dimension as a
//! 32-bit integer) followed by the values.

use super::{read_maybe_gzip, DataError, Dataset, Loaded};
use std::path::{Path, PathBuf};

/// Parsed IDX data of unsigned bytes.
struct Idx {
    dims: Vec<usize>,
    values: Vec<u8>,
}

fn parse(path: &Path) -> Result<Idx, DataError> {
    let bytes = read_maybe_gzip(path)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::invalid(
            path,
            "IDX",
            "missing the IDX magic number",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::invalid(
            path,
            "IDX",
            format!(
                "type code 0x{:02x} is not supported; only unsigned bytes (0x08) are",
                bytes[2]
            ),
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(DataError::invalid(path, "IDX", "truncated header"));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    let found = bytes.len() - header;
    match expected {
        Some(expected) if expected == found => Ok(Idx {
            dims,
            values: bytes[header..].to_vec(),
        }),
        Some(expected) => Err(DataError::invalid(
            path,
            "IDX",
            format!("the header promises {expected} values of shape {dims:?}, but the file holds {found}"),
        )),
        None => Err(DataError::invalid(path, "IDX", "dimensions overflow")),
    }
}

/// The labels file that goes with an images file: `*-images-idx3-ubyte`
/// becomes `*-labels-idx1-ubyte`.
fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let labels = name
        .replace("images-idx3", "labels-idx1")
        .replace("images.idx3", "labels.idx1");
    (labels != name).then(|| images.with_file_name(labels))
}

/// Loads an images file and its labels file.
pub fn load_pair(images: &Path) -> Result<Dataset, DataError> {
    let labels = labels_path(images).ok_or_else(|| DataError::Unsupported {
        path: images.to_path_buf(),
        reason: "an IDX images file must be named `*-images-idx3-ubyte[.gz]` so that its labels file can be found".into(),
    })?;
    load_files(images, &labels)
}

fn load_files(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let x = parse(images)?;
    let y = parse(labels)?;
    if y.dims.len() != 1 {
        return Err(DataError::invalid(
            labels,
            "IDX labels",
            format!("expected one dimension, found {:?}", y.dims),
        ));
    }
    if x.dims[0] != y.dims[0] {
        return Err(DataError::Mismatch(format!(
            "`{}` has {} images but `{}` has {} labels",
            images.display(),
            x.dims[0],
            labels.display(),
            y.dims[0]
        )));
    }
    let features = x.dims[1..].iter().product();
    Ok(Dataset {
        x: x.values.iter().map(|&v| v as f32).collect(),
        labels: y.values.iter().map(|&v| v as usize).collect(),
        features,
        source: format!("`{}`", images.display()),
    })
}

/// Loads a folder of IDX files: `train-images…` with `train-labels…`, and
/// `t10k-images…` or `test-images…` with their labels as the test split.
pub fn load_dir(dir: &Path) -> Result<Loaded, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let find = |prefixes: &[&str]| {
        files.iter().find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            prefixes.iter().any(|pre| name.starts_with(pre)) && name.contains("images")
        })
    };
    let train = find(&["train"]).ok_or_else(|| DataError::Unsupported {
        path: dir.to_path_buf(),
        reason: "no `train-images-idx3-ubyte[.gz]` file in this folder".into(),
    })?;
    let test = find(&["t10k", "test"]);
    Ok(Loaded {
        train: load_pair(train)?,
        test: test.map(|t| load_pair(t)).transpose()?,
    })
}
