//! Request paths as routes see them (RFC 3986 §6): one spelling per resource,
//! so a limited route cannot be reached by writing its path differently.
//!
//! [`normalise`] decodes percent-encoded unreserved characters, resolves dot
//! segments and merges repeated slashes; it refuses what has no single
//! meaning (an encoded slash or backslash, a control character, a climb above
//! the root, a malformed escape, bytes that are not UTF-8). The upstream
//! receives its output. [`match_form`] then drops path parameters
//! (`;name=value`) and one trailing slash: what route patterns are compared
//! with. Both borrow their input when there is nothing to change, so an
//! already-normal path costs no allocation.

use std::borrow::Cow;

/// Why a path is refused with 400 before any route is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `*` or anything else that does not start with `/`.
    #[error("the request target must be a path starting with '/'")]
    NotOriginForm,
    /// `%2F` or `%5C`: a slash that is not a separator means different
    /// things to different servers.
    #[error("the path contains an encoded slash or backslash")]
    EncodedSlash,
    /// A raw backslash, which some servers read as a slash.
    #[error("the path contains a backslash")]
    Backslash,
    /// A control character, raw or encoded (`%00`–`%1F`, `%7F`).
    #[error("the path contains a control character")]
    Control,
    /// `%` not followed by two hex digits.
    #[error("the path contains a malformed percent escape")]
    BadEscape,
    /// Decoded bytes that are not UTF-8 (overlong forms included).
    #[error("the path does not decode to UTF-8")]
    NotUtf8,
    /// A segment starting or ending with an encoded space, which servers
    /// that trim names would read as another path.
    #[error("a path segment starts or ends with an encoded space")]
    EdgeSpace,
    /// `..` segments climbing above the root.
    #[error("the path climbs above the root with '..'")]
    Climbs,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A segment's name, without its path parameters (`a;v=1` → `a`).
fn without_params(segment: &str) -> &str {
    segment.split_once(';').map_or(segment, |(name, _)| name)
}

/// Whether a segment is `.` or `..` (parameters ignored, as servlet
/// containers resolve `..;x` like `..`).
fn dot_segment(segment: &str) -> Option<bool> {
    match without_params(segment) {
        "." => Some(false),
        ".." => Some(true),
        _ => None,
    }
}

/// What a path byte asks of [`already_normal`].
const PLAIN: u8 = 0;
const SLASH: u8 = 1;
const PERCENT: u8 = 2;
const SEMICOLON: u8 = 3;
const BACKSLASH: u8 = 4;
const CONTROL: u8 = 5;

/// Byte classes, so the common byte costs one table load and one compare.
static CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = CONTROL;
        b += 1;
    }
    t[0x7f] = CONTROL;
    t[b'/' as usize] = SLASH;
    t[b'%' as usize] = PERCENT;
    t[b';' as usize] = SEMICOLON;
    t[b'\\' as usize] = BACKSLASH;
    t
};

/// Bytes that send a path to the full check in [`already_normal`].
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = CLASS[b] != PLAIN && CLASS[b] != SLASH || b == b'.' as usize;
        b += 1;
    }
    t
};

/// True when `path` needs no change: no escapes, no backslash or control
/// character, no empty or dot segment (except one trailing slash). One pass
/// over the bytes: this runs for every request.
fn already_normal(path: &str) -> Result<bool, PathError> {
    let bytes = path.as_bytes();
    // Most paths have none of `% \\ ; .`, no control character and no `//`:
    // one table load and two compares a byte settle them.
    let mut prev = b'/';
    let plain = bytes[1..].iter().all(|&b| {
        let ok = !(SPECIAL[usize::from(b)] || b == b'/' && prev == b'/');
        prev = b;
        ok
    });
    if plain {
        return Ok(true);
    }
    let mut normal = true;
    let mut params = false;
    // Start of the current segment (just after its '/').
    let mut start = 1;
    let segment_ends = |start: usize, end: usize, params: bool| {
        let seg = &bytes[start..end];
        // Only a segment starting with '.' can be a dot segment.
        !(seg.first() == Some(&b'.') && (seg.len() <= 2 || params) && is_dot_segment(seg))
    };
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match CLASS[usize::from(b)] {
            PLAIN => {}
            SLASH => {
                normal &= i > start && segment_ends(start, i, params);
                start = i + 1;
                params = false;
            }
            SEMICOLON => params = true,
            PERCENT => normal = false,
            BACKSLASH => return Err(PathError::Backslash),
            _ => return Err(PathError::Control),
        }
    }
    Ok(normal && segment_ends(start, bytes.len(), params))
}

/// `.` or `..`, with or without path parameters.
fn is_dot_segment(segment: &[u8]) -> bool {
    let name = match segment.iter().position(|&b| b == b';') {
        Some(i) => &segment[..i],
        None => segment,
    };
    name == b"." || name == b".."
}

/// The path in normal form, or why it is refused. Idempotent: a normal path
/// is returned as it is (borrowed).
pub fn normalise(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if already_normal(raw)? {
        return Ok(Cow::Borrowed(raw));
    }
    // Decode unreserved escapes, keep the others (hex upper-cased).
    let bytes = raw.as_bytes();
    let mut text: Vec<u8> = Vec::with_capacity(raw.len());
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            text.push(b);
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let value = hi << 4 | lo;
        match value {
            b'/' | b'\\' => return Err(PathError::EncodedSlash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            v if is_unreserved(v) => text.push(v),
            v => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                text.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
            }
        }
        decoded.push(value);
        i += 3;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::NotUtf8);
    }
    // Only ASCII was added to the input's own (UTF-8) bytes.
    let text = String::from_utf8(text).map_err(|_| PathError::NotUtf8)?;
    let edge_space = |seg: &str| {
        let name = without_params(seg);
        name.starts_with("%20") || name.ends_with("%20")
    };
    if text.split('/').any(edge_space) {
        return Err(PathError::EdgeSpace);
    }
    // Resolve dot segments and merge empty ones.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in text[1..].split('/') {
        trailing = false;
        match dot_segment(seg) {
            Some(true) => {
                if out.pop().is_none() {
                    return Err(PathError::Climbs);
                }
                trailing = true;
            }
            Some(false) => trailing = true,
            None if seg.is_empty() => trailing = true,
            None => out.push(seg),
        }
    }
    let mut path = String::with_capacity(text.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

/// What route patterns are compared with: a normal path without path
/// parameters and without one trailing slash (`/` stays `/`).
pub fn match_form(normal: &str) -> Cow<'_, str> {
    let trimmed = match normal.strip_suffix('/') {
        Some(t) if !t.is_empty() => t,
        _ => normal,
    };
    if !trimmed.as_bytes().contains(&b';') {
        return Cow::Borrowed(trimmed);
    }
    // A segment that was only parameters disappears, as servlet containers
    // merge the empty segment it leaves.
    let mut out = String::with_capacity(trimmed.len());
    for seg in trimmed[1..].split('/').map(without_params) {
        if !seg.is_empty() {
            out.push('/');
            out.push_str(seg);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(raw: &str) -> Result<String, PathError> {
        normalise(raw).map(Cow::into_owned)
    }

    #[test]
    fn spellings_of_one_path_normalise_to_it() {
        let want = "/v1/images/generations";
        for raw in [
            "/v1/images/generations",
            "//v1/images/generations",
            "/v1//images///generations",
            "/v1/./images/generations",
            "/v1/x/../images/generations",
            "/v1/images/gen%65rations",
            "/%761/images/generations",
            "/v1/images/%67%65%6E%65rations",
            "/v1/images/generations/.",
            "/v1/images/x/%2e%2e/generations",
            "/v1/images/x/%2E./generations",
        ] {
            let got = n(raw).unwrap();
            assert_eq!(match_form(&got), want, "{raw} -> {got}");
        }
        assert_eq!(
            n("/v1/images/generations/").unwrap(),
            "/v1/images/generations/"
        );
        assert_eq!(match_form("/v1/images/generations/"), want);
        assert_eq!(match_form("/v1/images/generations;x=1"), want);
        assert_eq!(match_form("/v1;a/images;b=2/generations/"), want);
        assert_eq!(match_form("/"), "/");
        assert_eq!(match_form("/;p=1/v1/images/generations"), want);
        assert_eq!(match_form("/;p=1"), "/");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for raw in [
            "/",
            "/v1/images/generations",
            "/v1/x/",
            "/a;b=1/c",
            "/v1/Images",
        ] {
            assert!(matches!(normalise(raw), Ok(Cow::Borrowed(_))), "{raw}");
        }
        assert!(matches!(match_form("/v1/x/"), Cow::Borrowed("/v1/x")));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (raw, why) in [
            ("*", PathError::NotOriginForm),
            ("v1/x", PathError::NotOriginForm),
            ("/v1/images%2Fgenerations", PathError::EncodedSlash),
            ("/v1/images%2fgenerations", PathError::EncodedSlash),
            ("/v1/images%5Cgenerations", PathError::EncodedSlash),
            ("/v1\\images", PathError::Backslash),
            ("/v1/images/generations%00", PathError::Control),
            ("/v1/%0a", PathError::Control),
            ("/v1/%7f", PathError::Control),
            ("/v1/%zz", PathError::BadEscape),
            ("/v1/%4", PathError::BadEscape),
            ("/v1/generation%C0%AEs", PathError::NotUtf8),
            ("/v1/%C0%AF", PathError::NotUtf8),
            ("/..", PathError::Climbs),
            ("/v1/../../x", PathError::Climbs),
            ("/v1/%2e%2e/%2e%2e/x", PathError::Climbs),
            ("/..;x/v1", PathError::Climbs),
            ("/v1/x%20", PathError::EdgeSpace),
            ("/v1/%20x/y", PathError::EdgeSpace),
        ] {
            assert_eq!(n(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn reserved_escapes_are_kept_upper_cased() {
        assert_eq!(n("/a%3fb%20c").unwrap(), "/a%3Fb%20c");
        assert_eq!(n("/my%20file.png").unwrap(), "/my%20file.png");
        assert_eq!(n("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
    }

    fn segment() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("a".to_string()),
                Just("B".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("%2e".to_string()),
                Just("%2F".to_string()),
                Just("%41".to_string()),
                Just("%20".to_string()),
                Just(";p=1".to_string()),
                Just("%C3%A9".to_string()),
                Just("%C0".to_string()),
                Just("".to_string()),
                Just("\\".to_string()),
                "[a-z0-9~_-]{1,3}",
            ],
            0..4,
        )
        .prop_map(|parts| parts.concat())
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 0..6).prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalising_is_idempotent(raw in path()) {
            if let Ok(once) = normalise(&raw) {
                let twice = normalise(&once).expect("a normal path is accepted");
                prop_assert_eq!(&*twice, &*once);
                // Only paths with escapes take the slow (allocating) path.
                prop_assert!(once.contains('%') || matches!(twice, Cow::Borrowed(_)));
            }
        }

        #[test]
        fn output_has_no_encoded_slash_or_dot_segment(raw in path()) {
            if let Ok(out) = normalise(&raw) {
                let lower = out.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"));
                prop_assert!(!out.contains("//"));
                for seg in out.split('/') {
                    prop_assert!(dot_segment(seg).is_none(), "{}", out);
                }
                let form = match_form(&out);
                prop_assert_eq!(normalise(&form).map(|c| c.into_owned()), Ok(form.into_owned()));
            }
        }

        #[test]
        fn arbitrary_text_never_panics(raw in "\\PC{0,40}", bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            let _ = normalise(&raw).map(|p| match_form(&p).len());
            let lossy = format!("/{}", String::from_utf8_lossy(&bytes));
            let _ = normalise(&lossy).map(|p| match_form(&p).len());
        }
    }
}
