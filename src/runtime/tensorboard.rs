//! A TensorBoard event-file writer: `Event` protocol buffers (scalars,
//! histograms, text, and the HParams plugin's summaries in [`hparams`]) in
//! TFRecord framing, as `tf.summary` writes them.
//!
//! The few protobuf messages needed are encoded by hand from their public
//! definitions (`tensorflow/core/util/event.proto`,
//! `tensorflow/core/framework/summary.proto`); field numbers are noted at
//! each use.

pub mod hparams;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Appends protobuf fields to a buffer.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }

    fn int64(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }

    fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, data: &[u8]) {
        self.key(field, 2);
        self.varint(data.len() as u64);
        self.0.extend_from_slice(data);
    }

    fn packed_doubles(&mut self, field: u32, values: &[f64]) {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.bytes(field, &data);
    }
}

/// TFRecord's masked CRC-32C.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

pub struct EventWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Numbers the event files this process creates, so that files created in
/// the same second get distinct names.
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// Creates a new event file in `dir`, never replacing an existing one.
///
/// Names are `events.out.tfevents.<time>.<host>.<pid>.<sequence>.kiln`.
/// TensorBoard reads the event files of a folder in name order and moves
/// to a later file as soon as one exists, so the zero-padded sequence
/// number keeps the files of one process in the order it wrote them.
fn create_file(dir: &Path) -> std::io::Result<(File, PathBuf)> {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
    loop {
        let name = format!(
            "events.out.tfevents.{}.{}.{}.{:06}.kiln",
            wall_time() as u64,
            host.trim(),
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            // Another process with the same id wrote to this folder in the
            // same second; the next sequence number gives another name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

impl EventWriter {
    /// Creates a new event file in `dir` (see [`create_file`] for its name).
    ///
    /// # Errors
    /// When the folder or file cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let (file, path) = create_file(dir)?;
        let mut writer = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        // Event.file_version = 3.
        let mut event = Message::default();
        event.double(1, wall_time());
        event.bytes(3, b"brain.Event:2");
        writer.record(&event.0)?;
        Ok(writer)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        self.out.write_all(&length)?;
        self.out.write_all(&masked_crc(&length).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Writes an `Event` at `step` whose summary contains one value.
    fn summary(&mut self, step: u64, value: Message) -> std::io::Result<()> {
        let mut summary = Message::default();
        summary.bytes(1, &value.0); // Summary.value
        let mut event = Message::default();
        event.double(1, wall_time()); // Event.wall_time
        event.int64(2, step as i64); // Event.step
        event.bytes(5, &summary.0); // Event.summary
        self.record(&event.0)
    }

    /// # Errors
    /// When the file cannot be written.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes()); // Value.tag
        v.float(2, value as f32); // Value.simple_value
        self.summary(step, v)
    }

    /// Writes a histogram of `values` with 30 equal-width buckets.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn histogram(&mut self, tag: &str, step: u64, values: &[f32]) -> std::io::Result<()> {
        let finite: Vec<f64> = values
            .iter()
            .filter(|v| v.is_finite())
            .map(|v| *v as f64)
            .collect();
        if finite.is_empty() {
            return Ok(());
        }
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let buckets = 30;
        let width = ((max - min) / buckets as f64).max(1e-12);
        let mut counts = vec![0f64; buckets];
        for v in &finite {
            let b = (((v - min) / width) as usize).min(buckets - 1);
            counts[b] += 1.0;
        }
        let limits: Vec<f64> = (1..=buckets).map(|b| min + width * b as f64).collect();
        let mut histo = Message::default();
        histo.double(1, min); // HistogramProto.min
        histo.double(2, max); // .max
        histo.double(3, finite.len() as f64); // .num
        histo.double(4, finite.iter().sum()); // .sum
        histo.double(5, finite.iter().map(|v| v * v).sum()); // .sum_squares
        histo.packed_doubles(6, &limits); // .bucket_limit
        histo.packed_doubles(7, &counts); // .bucket
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes());
        v.bytes(5, &histo.0); // Value.histo
        self.summary(step, v)
    }

    /// Writes text that TensorBoard's text dashboard shows (as Markdown).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        let mut shape = Message::default();
        shape.bytes(2, &{
            let mut dim = Message::default();
            dim.int64(1, 1); // TensorShapeProto.Dim.size
            dim.0
        }); // TensorShapeProto.dim
        let mut tensor = Message::default();
        tensor.int64(1, 7); // TensorProto.dtype = DT_STRING
        tensor.bytes(2, &shape.0); // .tensor_shape
        tensor.bytes(8, text.as_bytes()); // .string_val
        let mut plugin = Message::default();
        plugin.bytes(1, b"text"); // PluginData.plugin_name
        let mut metadata = Message::default();
        metadata.bytes(1, &plugin.0); // SummaryMetadata.plugin_data
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes());
        v.bytes(8, &tensor.0); // Value.tensor
        v.bytes(9, &metadata.0); // Value.metadata
        self.summary(step, v)
    }

    /// # Errors
    /// When the file cannot be written.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TFRecord framing of an empty payload: crc32c("") = 0, masked.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        // CRC-32C check value for "123456789" is 0xe3069283 (RFC 3720).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn varint_encodes_multi_byte_values() {
        let mut m = Message::default();
        m.varint(300);
        assert_eq!(m.0, vec![0xac, 0x02]);
    }
}
