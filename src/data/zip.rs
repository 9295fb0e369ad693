//! Reading members of a zip archive, the container of NumPy's `.npz` files:
//! stored or deflate-compressed members, with ZIP64 sizes and offsets
//! (`numpy.savez` in NumPy 2.4 writes a ZIP64 local header for every
//! member).
//!
//! kiln reads `.npz` members here instead of through ndarray-npy's
//! `NpzReader`. That reader allocates an array of the size its header
//! states before reading any data, and it exposes no member as a byte
//! stream that a size check could read first.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

const LOCAL_HEADER_SIGNATURE: u32 = 0x0403_4b50;
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
const END_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_END_SIGNATURE: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
/// ID of the extra field that contains ZIP64 sizes and offsets.
const ZIP64_EXTRA_ID: u16 = 0x0001;

const LOCAL_HEADER_BYTES: usize = 30;
const CENTRAL_HEADER_BYTES: usize = 46;
const END_RECORD_BYTES: usize = 22;
const ZIP64_END_RECORD_BYTES: usize = 56;
const ZIP64_LOCATOR_BYTES: usize = 20;
/// The end record ends the file, after a comment of at most this many bytes.
const MAX_COMMENT_BYTES: usize = u16::MAX as usize;

const STORED: u16 = 0;
const DEFLATED: u16 = 8;

/// An open archive and its central directory.
pub struct Archive {
    file: File,
    file_bytes: u64,
    entries: Vec<Entry>,
}

/// A member as the central directory describes it.
struct Entry {
    name: String,
    flags: u16,
    method: u16,
    crc32: u32,
    compressed_bytes: u64,
    uncompressed_bytes: u64,
    local_header_offset: u64,
}

/// Reads the little-endian integer of `N` bytes at `offset`, or `None`
/// when `bytes` ends before it.
fn little_endian<const N: usize>(bytes: &[u8], offset: usize) -> Option<u64> {
    let field: [u8; N] = bytes.get(offset..offset.checked_add(N)?)?.try_into().ok()?;
    Some(field.iter().rev().fold(0, |n, &b| (n << 8) | u64::from(b)))
}

fn read_at(file: &mut File, offset: u64, length: usize) -> io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = vec![0; length];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

impl Archive {
    /// Reads the central directory of the archive in `file`.
    ///
    /// # Errors
    /// Returns the reason when the file cannot be read or is not a zip
    /// archive that kiln can read.
    pub fn new(mut file: File) -> Result<Archive, String> {
        let io_error = |e: io::Error| format!("cannot read the zip directory: {e}");
        let file_bytes = file.metadata().map_err(io_error)?.len();
        let (offset, length) = central_directory(&mut file, file_bytes)?;
        let length = usize::try_from(length).map_err(|_| "the zip directory is too large")?;
        let directory = read_at(&mut file, offset, length).map_err(io_error)?;
        let entries = parse_entries(&directory)?;
        Ok(Archive {
            file,
            file_bytes,
            entries,
        })
    }

    /// Names of the members, in the order of the central directory.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Opens the member `name` as a stream of its uncompressed bytes. At the
    /// end of the stream, a read fails when the bytes do not match the
    /// member's CRC-32.
    ///
    /// # Errors
    /// When there is no such member, it is encrypted, it is compressed by a
    /// method other than deflate, or its data lies past the end of the file.
    pub fn member(&self, name: &str) -> Result<impl Read + '_, String> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| format!("no member `{name}`"))?;
        if entry.flags & 1 != 0 {
            return Err(format!("member `{name}` is encrypted"));
        }
        if entry.method == STORED && entry.compressed_bytes != entry.uncompressed_bytes {
            return Err(format!(
                "member `{name}` is stored uncompressed, but its sizes differ ({} and {} bytes)",
                entry.compressed_bytes, entry.uncompressed_bytes
            ));
        }
        let data_offset = self.data_offset(entry)?;
        let available = self.file_bytes.saturating_sub(data_offset);
        if entry.compressed_bytes > available {
            return Err(format!(
                "member `{name}` has {} bytes, but only {available} bytes follow its header; the file is truncated",
                entry.compressed_bytes
            ));
        }
        let mut file = &self.file;
        file.seek(SeekFrom::Start(data_offset))
            .map_err(|e| format!("cannot read member `{name}`: {e}"))?;
        let raw = BufReader::new(file.take(entry.compressed_bytes));
        let data: Box<dyn Read + '_> = match entry.method {
            STORED => Box::new(raw),
            DEFLATED => Box::new(flate2::read::DeflateDecoder::new(raw)),
            method => {
                return Err(format!(
                    "member `{name}` uses compression method {method}; only stored (0) and deflate (8) members are supported"
                ))
            }
        };
        Ok(CheckedMember {
            data: flate2::CrcReader::new(data),
            expected_crc32: entry.crc32,
        })
    }

    /// Finds where a member's data starts, after its local header.
    fn data_offset(&self, entry: &Entry) -> Result<u64, String> {
        let mut file = &self.file;
        let mut header = [0; LOCAL_HEADER_BYTES];
        file.seek(SeekFrom::Start(entry.local_header_offset))
            .and_then(|_| file.read_exact(&mut header))
            .map_err(|e| format!("cannot read the header of member `{}`: {e}", entry.name))?;
        if little_endian::<4>(&header, 0) != Some(u64::from(LOCAL_HEADER_SIGNATURE)) {
            return Err(format!("member `{}` has no valid local header", entry.name));
        }
        let name_bytes = little_endian::<2>(&header, 26).unwrap_or(0);
        let extra_bytes = little_endian::<2>(&header, 28).unwrap_or(0);
        Ok(entry.local_header_offset + LOCAL_HEADER_BYTES as u64 + name_bytes + extra_bytes)
    }
}

/// Finds the offset and length of the central directory from the end
/// record, or from the ZIP64 end record when the end record defers to it.
fn central_directory(file: &mut File, file_bytes: u64) -> Result<(u64, u64), String> {
    let io_error = |e: io::Error| format!("cannot read the zip directory: {e}");
    let tail_bytes = file_bytes.min((END_RECORD_BYTES + MAX_COMMENT_BYTES) as u64);
    let tail_offset = file_bytes - tail_bytes;
    let tail = read_at(file, tail_offset, tail_bytes as usize).map_err(io_error)?;

    // Only the record's comment follows it, so the record is where the
    // signature and a comment length that reaches the end of the file meet.
    let is_end_record = |i: usize| {
        let comment_bytes = little_endian::<2>(&tail, i + 20);
        little_endian::<4>(&tail, i) == Some(u64::from(END_SIGNATURE))
            && comment_bytes.is_some_and(|n| i + END_RECORD_BYTES + n as usize == tail.len())
    };
    let end = (0..=tail.len().saturating_sub(END_RECORD_BYTES))
        .rev()
        .find(|&i| is_end_record(i))
        .ok_or("no zip end record; the file is not a zip archive or is truncated")?;

    let record = &tail[end..];
    let entries = little_endian::<2>(record, 10);
    let length = little_endian::<4>(record, 12);
    let offset = little_endian::<4>(record, 16);
    let (Some(entries), Some(length), Some(offset)) = (entries, length, offset) else {
        return Err("the zip end record is truncated".into());
    };
    let deferred = entries == 0xFFFF || length == 0xFFFF_FFFF || offset == 0xFFFF_FFFF;
    let (offset, length) = if deferred {
        zip64_central_directory(file, tail_offset + end as u64)?
    } else {
        (offset, length)
    };

    if offset
        .checked_add(length)
        .is_none_or(|end| end > file_bytes)
    {
        return Err(format!(
            "the zip directory claims bytes {offset} to {} of a file of {file_bytes} bytes; the file is truncated",
            offset.saturating_add(length)
        ));
    }
    Ok((offset, length))
}

/// Reads the offset and length of the central directory from the ZIP64
/// end record, which the locator just before the end record points to.
fn zip64_central_directory(file: &mut File, end_offset: u64) -> Result<(u64, u64), String> {
    let io_error = |e: io::Error| format!("cannot read the ZIP64 end record: {e}");
    let locator_offset = end_offset
        .checked_sub(ZIP64_LOCATOR_BYTES as u64)
        .ok_or("the zip end record defers to a ZIP64 record that is missing")?;
    let locator = read_at(file, locator_offset, ZIP64_LOCATOR_BYTES).map_err(io_error)?;
    if little_endian::<4>(&locator, 0) != Some(u64::from(ZIP64_LOCATOR_SIGNATURE)) {
        return Err("the zip end record defers to a ZIP64 record that is missing".into());
    }
    let record_offset = little_endian::<8>(&locator, 8).unwrap_or(u64::MAX);
    let record = read_at(file, record_offset, ZIP64_END_RECORD_BYTES).map_err(io_error)?;
    if little_endian::<4>(&record, 0) != Some(u64::from(ZIP64_END_SIGNATURE)) {
        return Err("the ZIP64 end record is invalid".into());
    }
    let length = little_endian::<8>(&record, 40).unwrap_or(u64::MAX);
    let offset = little_endian::<8>(&record, 48).unwrap_or(u64::MAX);
    Ok((offset, length))
}

/// Parses the central directory's file headers.
fn parse_entries(directory: &[u8]) -> Result<Vec<Entry>, String> {
    let truncated = || "the zip directory is truncated".to_string();
    let mut entries = Vec::new();
    let mut at = 0;
    while at < directory.len() {
        let header = directory.get(at..).ok_or_else(truncated)?;
        if little_endian::<4>(header, 0) != Some(u64::from(CENTRAL_HEADER_SIGNATURE)) {
            return Err(format!(
                "the zip directory has an invalid entry at byte {at}"
            ));
        }
        let field2 = |offset| little_endian::<2>(header, offset).ok_or_else(truncated);
        let field4 = |offset| little_endian::<4>(header, offset).ok_or_else(truncated);
        let name_bytes = field2(28)? as usize;
        let extra_bytes = field2(30)? as usize;
        let comment_bytes = field2(32)? as usize;
        let name_end = CENTRAL_HEADER_BYTES + name_bytes;
        let name = header
            .get(CENTRAL_HEADER_BYTES..name_end)
            .ok_or_else(truncated)?;
        let extra = header
            .get(name_end..name_end + extra_bytes)
            .ok_or_else(truncated)?;
        let mut entry = Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            flags: field2(8)? as u16,
            method: field2(10)? as u16,
            crc32: field4(16)? as u32,
            compressed_bytes: field4(20)?,
            uncompressed_bytes: field4(24)?,
            local_header_offset: field4(42)?,
        };
        apply_zip64_extra(&mut entry, extra)?;
        entries.push(entry);
        at += name_end + extra_bytes + comment_bytes;
    }
    Ok(entries)
}

/// Replaces the 32-bit fields that are 0xFFFFFFFF with the 64-bit values
/// of the ZIP64 extra field, which lists them in this order: uncompressed
/// size, compressed size, local header offset.
fn apply_zip64_extra(entry: &mut Entry, mut extra: &[u8]) -> Result<(), String> {
    while let (Some(id), Some(length)) =
        (little_endian::<2>(extra, 0), little_endian::<2>(extra, 2))
    {
        let length = length as usize;
        let data = extra
            .get(4..4 + length)
            .ok_or_else(|| format!("member `{}` has a truncated extra field", entry.name))?;
        if id == u64::from(ZIP64_EXTRA_ID) {
            let mut values = data
                .chunks_exact(8)
                .map(|c| little_endian::<8>(c, 0).unwrap_or(0));
            for field in [
                &mut entry.uncompressed_bytes,
                &mut entry.compressed_bytes,
                &mut entry.local_header_offset,
            ] {
                if *field == 0xFFFF_FFFF {
                    *field = values.next().ok_or_else(|| {
                        format!("member `{}` has a truncated ZIP64 extra field", entry.name)
                    })?;
                }
            }
        }
        extra = &extra[4 + length..];
    }
    Ok(())
}

/// A member's bytes, checked against its CRC-32 at the end of the stream.
struct CheckedMember<R: Read> {
    data: flate2::CrcReader<R>,
    expected_crc32: u32,
}

impl<R: Read> Read for CheckedMember<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.data.read(buffer)?;
        if count == 0 && !buffer.is_empty() && self.data.crc().sum() != self.expected_crc32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the member's data does not match its CRC-32; the file is corrupt",
            ));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A member to write: its name, its bytes and whether to deflate them.
    type TestMember<'a> = (&'a str, &'a [u8], bool);

    /// Builds an archive. With `zip64`, the central directory defers every
    /// size and offset to ZIP64 extra fields and the ZIP64 end record, as
    /// archives larger than 4 GiB do.
    fn build(members: &[TestMember], zip64: bool) -> Vec<u8> {
        let mut archive = Vec::new();
        let mut directory = Vec::new();
        for &(name, data, deflate) in members {
            let stored = if deflate {
                let mut encoder =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(data).unwrap();
                encoder.finish().unwrap()
            } else {
                data.to_vec()
            };
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let method = if deflate { DEFLATED } else { STORED };
            let offset = archive.len() as u64;

            archive.extend_from_slice(&LOCAL_HEADER_SIGNATURE.to_le_bytes());
            archive.extend_from_slice(&[20, 0, 0, 0]);
            archive.extend_from_slice(&method.to_le_bytes());
            archive.extend_from_slice(&[0; 4]);
            archive.extend_from_slice(&crc.sum().to_le_bytes());
            archive.extend_from_slice(&(stored.len() as u32).to_le_bytes());
            archive.extend_from_slice(&(data.len() as u32).to_le_bytes());
            archive.extend_from_slice(&(name.len() as u16).to_le_bytes());
            archive.extend_from_slice(&[0, 0]);
            archive.extend_from_slice(name.as_bytes());
            archive.extend_from_slice(&stored);

            let small = |value: u64| if zip64 { 0xFFFF_FFFF } else { value as u32 };
            let extra: Vec<u8> = if zip64 {
                let values = [data.len() as u64, stored.len() as u64, offset];
                let mut extra = ZIP64_EXTRA_ID.to_le_bytes().to_vec();
                extra.extend_from_slice(&24u16.to_le_bytes());
                values
                    .iter()
                    .for_each(|v| extra.extend_from_slice(&v.to_le_bytes()));
                extra
            } else {
                Vec::new()
            };
            directory.extend_from_slice(&CENTRAL_HEADER_SIGNATURE.to_le_bytes());
            directory.extend_from_slice(&[45, 0, 45, 0, 0, 0]);
            directory.extend_from_slice(&method.to_le_bytes());
            directory.extend_from_slice(&[0; 4]);
            directory.extend_from_slice(&crc.sum().to_le_bytes());
            directory.extend_from_slice(&small(stored.len() as u64).to_le_bytes());
            directory.extend_from_slice(&small(data.len() as u64).to_le_bytes());
            directory.extend_from_slice(&(name.len() as u16).to_le_bytes());
            directory.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            // Comment length, disk, internal and external attributes.
            directory.extend_from_slice(&[0; 10]);
            directory.extend_from_slice(&small(offset).to_le_bytes());
            directory.extend_from_slice(name.as_bytes());
            directory.extend_from_slice(&extra);
        }
        let directory_offset = archive.len() as u64;
        archive.extend_from_slice(&directory);
        let count = members.len() as u64;
        if zip64 {
            let record_offset = archive.len() as u64;
            archive.extend_from_slice(&ZIP64_END_SIGNATURE.to_le_bytes());
            archive.extend_from_slice(&44u64.to_le_bytes());
            archive.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for value in [count, count, directory.len() as u64, directory_offset] {
                archive.extend_from_slice(&value.to_le_bytes());
            }
            archive.extend_from_slice(&ZIP64_LOCATOR_SIGNATURE.to_le_bytes());
            archive.extend_from_slice(&[0; 4]);
            archive.extend_from_slice(&record_offset.to_le_bytes());
            archive.extend_from_slice(&1u32.to_le_bytes());
        }
        let (count, length, offset) = if zip64 {
            (0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)
        } else {
            (
                count as u16,
                directory.len() as u32,
                directory_offset as u32,
            )
        };
        archive.extend_from_slice(&END_SIGNATURE.to_le_bytes());
        archive.extend_from_slice(&[0; 4]);
        archive.extend_from_slice(&count.to_le_bytes());
        archive.extend_from_slice(&count.to_le_bytes());
        archive.extend_from_slice(&length.to_le_bytes());
        archive.extend_from_slice(&offset.to_le_bytes());
        archive.extend_from_slice(&[0, 0]);
        archive
    }

    /// Writes `bytes` to a file of its own and opens it as an archive.
    fn open(name: &str, bytes: &[u8]) -> Result<Archive, String> {
        let dir = std::env::temp_dir().join(format!("kiln-zip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        Archive::new(File::open(&path).unwrap())
    }

    fn read_member(archive: &Archive, name: &str) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        let mut member = archive.member(name)?;
        member.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    /// Members whose data compresses well and is longer than one buffer.
    fn sample_members() -> (Vec<u8>, Vec<u8>) {
        let first: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let second = b"second member".to_vec();
        (first, second)
    }

    #[test]
    fn stored_and_deflated_members_read_back() {
        let (first, second) = sample_members();
        for zip64 in [false, true] {
            let bytes = build(&[("a.npy", &first, true), ("b.npy", &second, false)], zip64);
            let archive = open(&format!("both-{zip64}.zip"), &bytes).unwrap();
            assert_eq!(archive.names(), ["a.npy", "b.npy"], "zip64 {zip64}");
            assert_eq!(
                read_member(&archive, "a.npy").unwrap(),
                first,
                "zip64 {zip64}"
            );
            assert_eq!(
                read_member(&archive, "b.npy").unwrap(),
                second,
                "zip64 {zip64}"
            );
        }
    }

    #[test]
    fn corrupt_member_fails_its_crc() {
        let (first, _) = sample_members();
        let mut bytes = build(&[("a.npy", &first, false)], false);
        // The data starts after the 30-byte local header and the name.
        bytes[LOCAL_HEADER_BYTES + "a.npy".len() + 10] ^= 1;
        let archive = open("corrupt.zip", &bytes).unwrap();
        let error = read_member(&archive, "a.npy").unwrap_err();
        assert!(error.contains("does not match its CRC-32"), "{error}");
    }

    #[test]
    fn member_past_end_of_file_is_truncated() {
        let data = b"0123456789";
        let mut bytes = build(&[("a.npy", data, false)], false);
        // Both sizes in the central header claim 1000 more bytes.
        let header = LOCAL_HEADER_BYTES + "a.npy".len() + data.len();
        for field in [header + 20, header + 24] {
            bytes[field..field + 4].copy_from_slice(&1010u32.to_le_bytes());
        }
        let archive = open("past-end.zip", &bytes).unwrap();
        let error = read_member(&archive, "a.npy").unwrap_err();
        assert!(error.contains("member `a.npy` has 1010 bytes"), "{error}");
        assert!(error.contains("the file is truncated"), "{error}");
    }

    #[test]
    fn truncated_archive_is_rejected() {
        let (first, _) = sample_members();
        let bytes = build(&[("a.npy", &first, true)], false);
        let error = open("cut.zip", &bytes[..bytes.len() / 2]).err().unwrap();
        assert!(error.contains("no zip end record"), "{error}");
    }

    #[test]
    fn missing_member_is_named() {
        let bytes = build(&[("a.npy", b"data", false)], false);
        let archive = open("missing.zip", &bytes).unwrap();
        let error = read_member(&archive, "x.npy").unwrap_err();
        assert_eq!(error, "no member `x.npy`");
    }
}
