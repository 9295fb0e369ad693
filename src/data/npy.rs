//! NumPy files: `.npz` archives with `x`/`y` (or Keras' `x_train`,
//! `y_train`, `x_test`, `y_test`) arrays, and `.npy` matrices whose last
//! column is the label.

use super::{read_maybe_gzip, DataError, Dataset, Loaded};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use ndarray_npy::npy::header::Header;
use std::cell::RefCell;
use std::io::{self, Cursor, Read};
use std::path::Path;
use zip::ZipArchive;

/// Element types kiln reads from NumPy arrays, each converted to `f32`.
#[derive(Clone, Copy)]
enum Element {
    F32,
    F64,
    U8,
    I16,
    I32,
    I64,
}

/// An element type and its byte order, from a NumPy type descriptor.
#[derive(Clone, Copy)]
struct Dtype {
    element: Element,
    big_endian: bool,
}

const SUPPORTED_TYPES: &str = "float32, float64, uint8, int16, int32 or int64";

impl Dtype {
    /// Parses a descriptor such as `<f4` or `|u1`.
    fn parse(descriptor: &str) -> Option<Dtype> {
        let (big_endian, code) = match descriptor.split_at_checked(1) {
            Some(("<" | "|", code)) => (false, code),
            Some((">", code)) => (true, code),
            _ => (false, descriptor),
        };
        let element = match code {
            "f4" => Element::F32,
            "f8" => Element::F64,
            "u1" => Element::U8,
            "i2" => Element::I16,
            "i4" => Element::I32,
            "i8" => Element::I64,
            _ => return None,
        };
        Some(Dtype {
            element,
            big_endian,
        })
    }

    fn size(self) -> usize {
        match self.element {
            Element::U8 => 1,
            Element::I16 => 2,
            Element::F32 | Element::I32 => 4,
            Element::F64 | Element::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self.element {
            Element::F32 => "float32",
            Element::F64 => "float64",
            Element::U8 => "uint8",
            Element::I16 => "int16",
            Element::I32 => "int32",
            Element::I64 => "int64",
        }
    }

    /// Converts whole elements of `bytes` to `f32` and appends them to `out`.
    fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        macro_rules! widen {
            ($t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                out.extend(bytes.chunks_exact(SIZE).map(|chunk| {
                    let raw: [u8; SIZE] = chunk.try_into().expect("chunks_exact gives SIZE bytes");
                    let value = if self.big_endian {
                        <$t>::from_be_bytes(raw)
                    } else {
                        <$t>::from_le_bytes(raw)
                    };
                    value as f32
                }))
            }};
        }
        match self.element {
            Element::F32 => widen!(f32),
            Element::F64 => widen!(f64),
            Element::U8 => widen!(u8),
            Element::I16 => widen!(i16),
            Element::I32 => widen!(i32),
            Element::I64 => widen!(i64),
        }
    }
}

/// The `.npy` magic string, which starts every array file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Reads the header of an array file: the magic string, the version, the
/// header length and the header dictionary.
///
/// # Errors
/// Returns the reason when the stream ends inside the header or the header
/// is invalid.
fn read_header(reader: &mut impl Read) -> Result<Header, String> {
    let truncated = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => "the file is truncated inside its header".to_string(),
        _ => format!("cannot read the header: {e}"),
    };
    let mut prefix = vec![0; MAGIC.len() + 2];
    reader.read_exact(&mut prefix).map_err(truncated)?;
    if prefix[..MAGIC.len()] != MAGIC[..] {
        return Err("missing the NumPy magic string".into());
    }

    let (major, minor) = (prefix[MAGIC.len()], prefix[MAGIC.len() + 1]);
    // Version 1 stores the header length in 2 bytes, versions 2 and 3 in 4.
    let length_bytes = match major {
        1 => 2,
        2 | 3 => 4,
        _ => return Err(format!("format version {major}.{minor} is not supported")),
    };
    let mut length = [0; 4];
    reader
        .read_exact(&mut length[..length_bytes])
        .map_err(truncated)?;
    prefix.extend_from_slice(&length[..length_bytes]);

    let header_bytes = u64::from(u32::from_le_bytes(length));
    // Read through `take`, so that a header length larger than the file
    // allocates no more than the file contains.
    let before = prefix.len();
    reader
        .take(header_bytes)
        .read_to_end(&mut prefix)
        .map_err(truncated)?;
    if ((prefix.len() - before) as u64) < header_bytes {
        return Err("the file is truncated inside its header".into());
    }
    Header::from_reader(&mut prefix.as_slice()).map_err(|e| format!("invalid header: {e}"))
}

/// Bytes read and converted at a time; a multiple of every element size.
const CHUNK_BYTES: usize = 1 << 16;

/// Reads a whole `.npy` stream and converts its elements to `f32`.
///
/// # Errors
/// Returns the reason when the header is invalid, the element type is not
/// supported, or the data is shorter or longer than the header states.
fn read_array(mut reader: impl Read) -> Result<ArrayD<f32>, String> {
    let header = read_header(&mut reader)?;
    let descriptor = header.type_descriptor.to_string();
    // The descriptor is a Python string literal, such as '<f4', in quotes.
    let dtype = descriptor
        .strip_prefix('\'')
        .and_then(|d| d.strip_suffix('\''))
        .and_then(Dtype::parse)
        .ok_or_else(|| {
            format!("element type {descriptor} is not supported; use {SUPPORTED_TYPES}")
        })?;
    let shape = header.shape;
    let expected_bytes = shape
        .iter()
        .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("the header's shape {shape:?} overflows"))?;

    let (data, found) = read_values(&mut reader, dtype, expected_bytes)?;
    if found < expected_bytes {
        return Err(format!(
            "the data is truncated: the header promises {} {} values of shape {shape:?} ({expected_bytes} bytes), but only {found} bytes follow the header",
            expected_bytes / dtype.size(),
            dtype.name()
        ));
    }
    let extra =
        io::copy(&mut reader, &mut io::sink()).map_err(|e| format!("cannot read the data: {e}"))?;
    if extra > 0 {
        let total = expected_bytes as u64 + extra;
        return Err(format!(
            "the header describes {expected_bytes} bytes of data, but {total} bytes follow it"
        ));
    }

    let layout = IxDyn(&shape).set_f(header.layout.is_fortran());
    Ok(ArrayD::from_shape_vec(layout, data).expect("the data has the header's size"))
}

/// Reads at most `max_bytes` of elements of type `dtype` and converts them
/// to `f32`. Returns the values and the number of bytes read, which is less
/// than `max_bytes` when the stream ends first.
///
/// The values grow only by the bytes that arrive, so a header that promises
/// more data than the stream contains costs no more memory than the data.
fn read_values(
    reader: &mut impl Read,
    dtype: Dtype,
    max_bytes: usize,
) -> Result<(Vec<f32>, usize), String> {
    let mut values = Vec::with_capacity((max_bytes / dtype.size()).min(CHUNK_BYTES));
    let mut chunk = vec![0; CHUNK_BYTES];
    // Bytes at the start of `chunk` that do not yet form a whole element.
    let mut pending = 0;
    let mut found = 0;
    let mut limited = reader.take(max_bytes as u64);
    loop {
        let count = match limited.read(&mut chunk[pending..]) {
            Ok(0) => break,
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read the data: {e}")),
        };
        found += count;
        let filled = pending + count;
        let whole = filled - filled % dtype.size();
        dtype.decode_into(&chunk[..whole], &mut values);
        chunk.copy_within(whole..filled, 0);
        pending = filled - whole;
    }
    Ok((values, found))
}

/// Reads the array `name` of an `.npz` archive. NumPy stores array `x` as
/// the member `x.npy`, and a member named `x` is accepted as well.
///
/// The `zip` crate stops a member at its recorded size and checks its
/// CRC-32, and [`read_array`] keeps only the bytes that arrive. So a header
/// that promises more than the archive contains cannot allocate it.
fn read_npz_array(
    path: &Path,
    archive: &RefCell<Npz>,
    name: &str,
) -> Result<ArrayD<f32>, DataError> {
    let invalid = |reason: String| DataError::invalid(path, "NumPy .npz", reason);
    let mut archive = archive.borrow_mut();
    let member_name = if archive.file_names().any(|n| n == name) {
        name.to_string()
    } else {
        format!("{name}.npy")
    };
    let member = archive
        .by_name(&member_name)
        .map_err(|e| invalid(format!("member `{member_name}`: {e}")))?;
    read_array(member).map_err(|reason| invalid(format!("array `{name}`: {reason}")))
}

/// Opens an `.npz` archive and lists its arrays, named without `.npy`.
/// An `.npz` archive held in memory, after any gzip layer is removed.
type Npz = ZipArchive<Cursor<Vec<u8>>>;

fn open_npz(path: &Path) -> Result<(RefCell<Npz>, Vec<String>), DataError> {
    let archive = ZipArchive::new(Cursor::new(read_maybe_gzip(path)?))
        .map_err(|e| DataError::invalid(path, "NumPy .npz", e.to_string()))?;
    let names = archive
        .file_names()
        .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
        .collect();
    Ok((RefCell::new(archive), names))
}

/// Reads a `.npy` file.
fn read_npy(path: &Path) -> Result<ArrayD<f32>, DataError> {
    let bytes = read_maybe_gzip(path)?;
    read_array(&bytes[..]).map_err(|reason| DataError::invalid(path, "NumPy .npy", reason))
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
                // A plain matrix keeps its labels in the last column, so a
                // file of features alone fails here.
                let hint = if what == "matrix" {
                    "; the last column of a .npy matrix holds the labels, so a file of features alone works only with `kiln predict`"
                } else {
                    ""
                };
                Err(DataError::invalid(
                    path,
                    "NumPy",
                    format!("{what}: label {v} is not a class index{hint}"),
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
    let (archive, names) = open_npz(path)?;
    let has = |n: &str| names.iter().any(|m| m == n);
    let read = |n: &str| read_npz_array(path, &archive, n);
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

/// Reads a `.npy` array of unlabeled samples (any number of axes).
pub fn load_npy_features(path: &Path) -> Result<Dataset, DataError> {
    features_only(path, read_npy(path)?)
}

/// Reads the `x` (else `x_test`) array of a `.npz` file as unlabeled
/// samples.
pub fn load_npz_features(path: &Path) -> Result<Dataset, DataError> {
    let (archive, names) = open_npz(path)?;
    let key = ["x", "x_test"]
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
    features_only(path, read_npz_array(path, &archive, key)?)
}

pub fn load_npy(path: &Path) -> Result<Dataset, DataError> {
    let matrix = read_npy(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a version 1.0 `.npy` stream whose header dictionary is
    /// `dictionary`, followed by `data`.
    fn npy(dictionary: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dictionary.to_string();
        while !(MAGIC.len() + 4 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn read(bytes: &[u8]) -> Result<ArrayD<f32>, String> {
        read_array(bytes)
    }

    #[test]
    fn big_endian_fortran_order_is_converted() {
        let values: [i16; 6] = [1, 4, 2, 5, 3, -6];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        let dictionary = "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }";
        let array = read(&npy(dictionary, &data)).unwrap();
        assert_eq!(array.shape(), [2, 3]);
        let rows: Vec<f32> = array.as_standard_layout().iter().copied().collect();
        assert_eq!(rows, [1.0, 2.0, 3.0, 4.0, 5.0, -6.0]);
    }

    #[test]
    fn every_supported_type_reads() {
        let cases: [(&str, Vec<u8>); 6] = [
            ("<f4", 2.5f32.to_le_bytes().to_vec()),
            ("<f8", 2.5f64.to_le_bytes().to_vec()),
            ("|u1", vec![200]),
            ("<i2", (-300i16).to_le_bytes().to_vec()),
            ("<i4", (-70000i32).to_le_bytes().to_vec()),
            (">i8", (1i64 << 40).to_be_bytes().to_vec()),
        ];
        let expected = [2.5, 2.5, 200.0, -300.0, -70000.0, (1i64 << 40) as f32];
        for ((descriptor, data), value) in cases.iter().zip(expected) {
            let dictionary =
                format!("{{'descr': '{descriptor}', 'fortran_order': False, 'shape': (1,), }}");
            let array = read(&npy(&dictionary, data)).unwrap();
            assert_eq!(array.as_slice().unwrap(), [value], "{descriptor}");
        }
    }

    #[test]
    fn data_longer_than_chunk_reads() {
        let values: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let dictionary = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000,), }";
        let array = read(&npy(dictionary, &data)).unwrap();
        assert_eq!(array.as_slice().unwrap(), values.as_slice());
    }

    #[test]
    fn short_data_is_truncated() {
        let dictionary = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 8), }";
        let error = read(&npy(dictionary, &[0; 100])).unwrap_err();
        assert_eq!(
            error,
            "the data is truncated: the header promises 8000000000000 float64 values of shape [1000000000000, 8] (64000000000000 bytes), but only 100 bytes follow the header"
        );
    }

    #[test]
    fn extra_data_is_rejected() {
        let dictionary = "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }";
        let error = read(&npy(dictionary, &[1, 2, 3])).unwrap_err();
        assert_eq!(
            error,
            "the header describes 2 bytes of data, but 3 bytes follow it"
        );
    }

    #[test]
    fn overflowing_shape_is_rejected() {
        let dictionary =
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }";
        let error = read(&npy(dictionary, &[])).unwrap_err();
        assert!(
            error.contains("shape [4294967296, 4294967296] overflows"),
            "{error}"
        );
    }

    #[test]
    fn unsupported_type_is_named() {
        let dictionary = "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }";
        let error = read(&npy(dictionary, &[0; 8])).unwrap_err();
        assert_eq!(
            error,
            "element type '<c8' is not supported; use float32, float64, uint8, int16, int32 or int64"
        );
    }

    #[test]
    fn header_longer_than_file_is_truncated() {
        // Version 2.0 stores a 4-byte header length; this one claims 4 GiB.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[2, 0]);
        bytes.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        bytes.extend_from_slice(b"{'descr': '<f4'");
        let error = read(&bytes).unwrap_err();
        assert_eq!(error, "the file is truncated inside its header");
    }
}
