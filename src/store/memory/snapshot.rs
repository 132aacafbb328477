//! The snapshot file: counters that survive restarts.
//!
//! Layout: 8 magic bytes, a little-endian `u32` format version, a `u32`
//! CRC-32 of the payload, then the payload (postcard-encoded). Written to a
//! temporary file, fsynced, then renamed over the old one, so a crash leaves
//! either the old or the new snapshot, never a torn one.

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Subject;
use crate::clock::Nanos;
use crate::limits::CounterState;

const MAGIC: &[u8; 8] = b"TSTLSNAP";
/// The current snapshot format.
pub(crate) const VERSION: u32 = 1;

/// One counter as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedCounter {
    /// Stable counter id.
    pub(crate) id: u64,
    /// When it stops mattering.
    pub(crate) expires_at: Nanos,
    /// Its state.
    pub(crate) state: CounterState,
}

/// Every counter of one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedSubject {
    /// Whose counters.
    pub(crate) subject: Subject,
    /// The counters.
    pub(crate) counters: Vec<SavedCounter>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    taken_at: Nanos,
    subjects: Vec<SavedSubject>,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot, another format version, or damaged.
    #[error("{0}")]
    Corrupt(String),
}

/// Encodes subjects into the file format.
pub(crate) fn encode(
    taken_at: Nanos,
    subjects: Vec<SavedSubject>,
) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_allocvec(&Payload { taken_at, subjects })
        .map_err(|e| SnapshotError::Corrupt(format!("cannot encode: {e}")))?;
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a file's bytes, checking magic, version and checksum.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<SavedSubject>, SnapshotError> {
    let corrupt = |m: &str| SnapshotError::Corrupt(m.to_owned());
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(corrupt(
            "not a turnstile snapshot (bad magic or truncated header)",
        ));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(SnapshotError::Corrupt(format!(
            "snapshot format {version}, this build reads {VERSION}"
        )));
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let payload = &bytes[16..];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch (truncated or damaged)"));
    }
    let p: Payload = postcard::from_bytes(payload)
        .map_err(|e| SnapshotError::Corrupt(format!("cannot decode: {e}")))?;
    Ok(p.subjects)
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // A new file with a random name, created exclusively (O_EXCL: a symlink
    // or file planted under any name is never followed or reused), in the
    // snapshot's own directory so the rename stays on one filesystem.
    let mut prefix = path.file_name().unwrap_or_default().to_owned();
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<SavedSubject> {
        vec![SavedSubject {
            subject: Subject::Account("acme".into()),
            counters: vec![SavedCounter {
                id: 7,
                expires_at: 99,
                state: CounterState::Fixed {
                    window_start: 60,
                    count: 2,
                },
            }],
        }]
    }

    #[test]
    #[cfg(unix)]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("counters.bin");
        // The names a predictable writer would use.
        for name in ["counters.bin.tmp", "counters.bin.", "counters.bin"] {
            let _ = std::os::unix::fs::symlink(&victim, dir.path().join(name));
        }
        write_atomically(&path, b"snapshot").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"snapshot");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn round_trip_and_damage_detection() {
        let bytes = encode(1, sample()).unwrap();
        assert_eq!(decode(&bytes).unwrap(), sample());
        assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert!(decode(&flipped).is_err(), "damaged");
        let mut future = bytes.clone();
        future[8] = 2;
        assert!(decode(&future)
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        assert!(decode(b"hello").is_err());
    }

    #[test]
    fn atomic_write_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/deeper/counters.bin");
        write_atomically(&path, b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        write_atomically(&path, b"def").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"def");
    }
}
