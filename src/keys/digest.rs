//! A key's digest and fingerprint: how keys are stored, compared and shown.
//! The key itself is never kept.

use sha2::{Digest, Sha256};

pub use crate::store::KeyDigest;

/// SHA-256 of a key.
pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The first 8 hex characters of a key's SHA-256: what logs and admin output show.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    /// The fingerprint of a digest.
    pub fn of(digest: &KeyDigest) -> Self {
        let mut out = [0u8; 8];
        // Encoding 4 bytes into 8 hex characters cannot fail.
        let _ = hex::encode_to_slice(&digest[..4], &mut out);
        Self(out)
    }

    /// The 8 lower-case hex characters.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("????????")
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
