//! Each exchange's id: the client's `X-Request-Id` when it is 1–128 visible
//! ASCII characters (one header), else one made here. The upstream gets it
//! in `X-Request-Id`, the client gets it back, and the access log writes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client id taken as it is.
pub const MAX_LEN: usize = 128;

/// The exchange's id for a request with these headers.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(&X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if usable(id.as_bytes()) => id.clone(),
        _ => made(),
    }
}

/// 1 to [`MAX_LEN`] visible ASCII characters (no spaces, no controls).
fn usable(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id: 32 lower-case hex digits, a random 64-bit number drawn once
/// per process followed by a per-process counter, so ids never repeat within
/// a process and differ between processes.
pub fn made() -> HeaderValue {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| {
        let mut b = [0u8; 8];
        // Without randomness the time keeps processes apart well enough
        // for ids that only need to be told apart in logs.
        if getrandom::fill(&mut b).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            b = nanos.to_le_bytes();
        }
        u64::from_le_bytes(b)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 32];
    // 16 bytes into 32 hex digits: the sizes match, so this cannot fail.
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&process.to_be_bytes());
    raw[8..].copy_from_slice(&n.to_be_bytes());
    let _ = hex::encode_to_slice(raw, &mut text);
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn a_usable_client_id_is_kept_as_sent() {
        assert_eq!(of(&with(&[b"req-42"])), "req-42");
        let long = vec![b'a'; MAX_LEN];
        assert_eq!(of(&with(&[&long])).as_bytes(), &long[..]);
    }

    #[test]
    fn anything_else_gets_a_new_id() {
        let long = vec![b'a'; MAX_LEN + 1];
        for h in [
            HeaderMap::new(),
            with(&[b""]),
            with(&[b"has space"]),
            with(&[b"tab\there"]),
            with(&[&long]),
            with(&[b"caf\xc3\xa9"]),
            with(&[b"one", b"two"]),
        ] {
            let id = of(&h);
            assert_eq!(id.len(), 32, "{h:?}");
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
        }
    }

    #[test]
    fn made_ids_never_repeat() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| made()).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
