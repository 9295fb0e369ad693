//! NumPy files: `.npz` archives with `x`/`y` (or Keras' `x_train`,
//! `y_train`, `x_test`, `y_test`) arrays, and `.npy` matrices whose last
//! column is the label.

use super::{DataError, Dataset, Loaded};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{NpzReader, ReadNpyExt};
use std::path::Path;

/// Converts an array of any numeric type NumPy commonly uses to `f32`.
fn read_any<R: std::io::Read + std::io::Seek>(
    npz: &mut NpzReader<R>,
    name: &str,
) -> Option<ArrayD<f32>> {
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f32>, IxDyn>(name) {
        return Some(a);
    }
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f64>, IxDyn>(name) {
        return Some(a.mapv(|v| v as f32));
    }
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<u8>, IxDyn>(name) {
        return Some(a.mapv(|v| v as f32));
    }
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i64>, IxDyn>(name) {
        return Some(a.mapv(|v| v as f32));
    }
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i32>, IxDyn>(name) {
        return Some(a.mapv(|v| v as f32));
    }
    None
}

fn dataset(path: &Path, x: ArrayD<f32>, y: ArrayD<f32>, what: &str) -> Result<Dataset, DataError> {
    let n = x.shape().first().copied().unwrap_or(0);
    if y.len() != n {
        return Err(DataError::invalid(
            path,
            "NumPy",
            format!("{what}: {n} samples but {} labels", y.len()),
        ));
    }
    let labels = y
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 {
                Ok(v as usize)
            } else {
                Err(DataError::invalid(
                    path,
                    "NumPy",
                    format!("{what}: label {v} is not a class index"),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Dataset {
        features: x.len() / n.max(1),
        x: x.as_standard_layout().iter().copied().collect(),
        labels,
        source: format!("`{}`", path.display()),
    })
}

pub fn load_npz(path: &Path) -> Result<Loaded, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut npz =
        NpzReader::new(file).map_err(|e| DataError::invalid(path, "NumPy .npz", e.to_string()))?;
    let names = npz
        .names()
        .map_err(|e| DataError::invalid(path, "NumPy .npz", e.to_string()))?;
    let has = |n: &str| names.iter().any(|m| m == n || m == &format!("{n}.npy"));
    let mut read = |n: &str| {
        let key = if names.iter().any(|m| m == n) {
            n.to_string()
        } else {
            format!("{n}.npy")
        };
        read_any(&mut npz, &key).ok_or_else(|| DataError::invalid(path, "NumPy .npz", format!("array `{n}` has an unsupported type; use float32, float64, uint8, int32 or int64")))
    };
    if has("x_train") && has("y_train") {
        let train = dataset(path, read("x_train")?, read("y_train")?, "x_train")?;
        let test = if has("x_test") && has("y_test") {
            Some(dataset(path, read("x_test")?, read("y_test")?, "x_test")?)
        } else {
            None
        };
        return Ok(Loaded { train, test });
    }
    if has("x") && has("y") {
        return Ok(Loaded {
            train: dataset(path, read("x")?, read("y")?, "x")?,
            test: None,
        });
    }
    Err(DataError::invalid(
        path,
        "NumPy .npz",
        format!(
            "expected arrays `x` and `y` (or `x_train` and `y_train`), found {}",
            names.join(", ")
        ),
    ))
}

/// Wraps an array of samples along its first axis, with no labels.
fn features_only(path: &Path, x: ArrayD<f32>) -> Result<Dataset, DataError> {
    let n = x.shape().first().copied().unwrap_or(0);
    if n == 0 {
        return Err(DataError::invalid(
            path,
            "NumPy",
            "the array holds no samples",
        ));
    }
    let zeros = ArrayD::zeros(IxDyn(&[n]));
    dataset(path, x, zeros, "x")
}

fn read_npy_as<T: ndarray_npy::ReadableElement + Copy + widen::ToF32>(
    path: &Path,
) -> Result<ArrayD<f32>, ndarray_npy::ReadNpyError> {
    let file = std::fs::File::open(path).map_err(ndarray_npy::ReadNpyError::Io)?;
    ArrayD::<T>::read_npy(file).map(|a| a.mapv(|v| v.to_f32()))
}

/// Conversion of the integer element types to `f32`.
mod widen {
    pub trait ToF32 {
        fn to_f32(self) -> f32;
    }
    macro_rules! to_f32 {
        ($($t:ty),*) => {$(impl ToF32 for $t { fn to_f32(self) -> f32 { self as f32 } })*};
    }
    to_f32!(u8, i16, i32, i64);
}

/// Reads a `.npy` array of unlabeled samples (any number of axes).
pub fn load_npy_features(path: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let x = ArrayD::<f32>::read_npy(file)
        .or_else(|_| {
            let file = std::fs::File::open(path).map_err(ndarray_npy::ReadNpyError::Io)?;
            ArrayD::<f64>::read_npy(file).map(|a| a.mapv(|v| v as f32))
        })
        .or_else(|_| read_npy_as::<u8>(path))
        .or_else(|_| read_npy_as::<i64>(path))
        .or_else(|_| read_npy_as::<i32>(path))
        .or_else(|_| read_npy_as::<i16>(path))
        .map_err(|e| {
            DataError::invalid(
                path,
                "NumPy .npy",
                format!("{e}; the array must be float32, float64, uint8, int16, int32 or int64"),
            )
        })?;
    features_only(path, x)
}

/// Reads the `x` (else `x_test`) array of a `.npz` file as unlabeled
/// samples.
pub fn load_npz_features(path: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut npz =
        NpzReader::new(file).map_err(|e| DataError::invalid(path, "NumPy .npz", e.to_string()))?;
    let names = npz
        .names()
        .map_err(|e| DataError::invalid(path, "NumPy .npz", e.to_string()))?;
    let key = ["x", "x.npy", "x_test", "x_test.npy"]
        .into_iter()
        .find(|k| names.iter().any(|n| n == k))
        .ok_or_else(|| {
            DataError::invalid(
                path,
                "NumPy .npz",
                format!(
                    "expected an array `x` or `x_test`, found {}",
                    names.join(", ")
                ),
            )
        })?;
    let x = read_any(&mut npz, key).ok_or_else(|| {
        DataError::invalid(
            path,
            "NumPy .npz",
            format!("array `{key}` has an unsupported type"),
        )
    })?;
    features_only(path, x)
}

pub fn load_npy(path: &Path) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let matrix = ArrayD::<f32>::read_npy(file)
        .or_else(|_| {
            let file = std::fs::File::open(path).map_err(ndarray_npy::ReadNpyError::Io)?;
            ArrayD::<f64>::read_npy(file).map(|a| a.mapv(|v| v as f32))
        })
        .map_err(|e| DataError::invalid(path, "NumPy .npy", e.to_string()))?;
    if matrix.ndim() != 2 || matrix.shape()[1] < 2 {
        return Err(DataError::invalid(
            path,
            "NumPy .npy",
            format!(
                "expected a 2-D matrix with the label in the last column, found shape {:?}",
                matrix.shape()
            ),
        ));
    }
    let columns = matrix.shape()[1];
    let x = matrix
        .slice(ndarray::s![.., ..columns - 1])
        .to_owned()
        .into_dyn();
    let y = matrix
        .slice(ndarray::s![.., columns - 1])
        .to_owned()
        .into_dyn();
    dataset(path, x, y, "matrix")
}
