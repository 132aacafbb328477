//! Text written by hand, without a serializer: JSON strings escaped, numbers
//! as header values and in bodies.

use std::fmt::Write as _;

use http::HeaderValue;

/// Appends `s` JSON-escaped, without surrounding quotes.
pub fn json_escape_into(s: &str, out: &mut String) {
    // Runs of bytes needing no escape are copied whole; every byte escaped
    // is ASCII, so the slices below fall on character boundaries.
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// A [`std::fmt::Write`] that JSON-escapes what is written into a string,
/// so a `Display` value lands in a JSON string without a copy in between.
pub(super) struct JsonEscaped<'a>(pub(super) &'a mut String);

impl std::fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        json_escape_into(s, self.0);
        Ok(())
    }
}

pub(super) fn num_value(n: u64) -> HeaderValue {
    // One allocation (the copy of the digits); `HeaderValue::from(u64)`
    // makes two. Digits are always a valid value.
    let mut digits = itoa::Buffer::new();
    HeaderValue::from_str(digits.format(n)).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

pub(super) fn push_num(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}
