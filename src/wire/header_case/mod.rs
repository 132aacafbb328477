//! Header-name case on HTTP/1.1 responses.
//!
//! hyper writes header names in lower case, or title case with
//! `title_case_headers` (`X-Ratelimit-Limit`), and keeps no spelling of its
//! own choosing: its case map is private (hyper#2695). The seeds, the SPEC
//! and case-sensitive clients expect `X-RateLimit-Limit`, `RateLimit-Policy`,
//! `WWW-Authenticate`. [`CaseWriter`] sits between hyper and the socket (the
//! TLS stream's plaintext side) and gives the names in [`Spellings`] their
//! spelling as hyper writes each response head.
//!
//! It follows the response framing hyper writes (status line, headers,
//! `Content-Length` or chunked body, HEAD, 1xx, 204 and 304 answers without
//! one) so that only header names in heads are ever touched, and only by a
//! change of ASCII case, never of length. Anything it does not follow with
//! certainty (an HTTP/2 connection, an upgrade, a body delimited by close, a
//! line it cannot read) turns it into a plain pass-through for the rest of
//! the connection: the worst it can do is leave a name in hyper's case.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::conn::{Activity, Marks};

/// The spellings of the header names turnstile writes into answers it
/// forwards and makes (`X-RateLimit-Limit`, `RateLimit-Policy`,
/// `WWW-Authenticate`); other names in answers it makes get title case.
#[derive(Debug, Default)]
pub struct Spellings {
    names: Vec<Box<[u8]>>,
    /// Bit `n` set: some name is `n` bytes long (names up to 63 bytes).
    lengths: u64,
}

impl Spellings {
    /// These spellings; the first of two names equal but for case wins.
    pub fn new<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut out = Self::default();
        for name in names {
            let name = name.as_ref().as_bytes();
            if name.is_empty() || name.len() > 63 || out.find(name).is_some() {
                continue;
            }
            out.lengths |= 1 << name.len();
            out.names.push(name.into());
        }
        out
    }

    /// The spellings of the names turnstile writes under `prefixes` (each
    /// `{prefix}-Limit/-Remaining/-Reset/-Type`), the IETF pair and
    /// `WWW-Authenticate`.
    pub fn for_prefixes<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names = vec![
            "RateLimit-Policy".to_owned(),
            "RateLimit".to_owned(),
            "WWW-Authenticate".to_owned(),
            "X-Request-Id".to_owned(),
        ];
        for prefix in prefixes {
            for suffix in ["Limit", "Remaining", "Reset", "Type"] {
                names.push(format!("{prefix}-{suffix}"));
            }
        }
        Self::new(names)
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        if name.len() > 63 || self.lengths & (1 << name.len()) == 0 {
            return None;
        }
        self.names.iter().position(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Bytes of a head line kept to read it (names, `Content-Length`,
/// `Transfer-Encoding`); longer lines are passed on without being read.
const LINE_KEEP: usize = 64;

/// Where in the response stream the next byte written falls.
#[derive(Debug, Clone)]
enum Framing {
    Head(Head),
    /// This many body bytes to go.
    Length(u64),
    Chunk(Chunk),
    /// Not followed: every byte passes as it is.
    Off,
}

impl Framing {
    /// At the start of a response head.
    fn head() -> Self {
        Framing::Head(Head::new())
    }
}

#[derive(Debug, Clone)]
struct Head {
    line: [u8; LINE_KEEP],
    /// Bytes of the current line so far (only the first `LINE_KEEP` kept).
    len: usize,
    /// The current line's name was looked up (its colon was seen).
    named: bool,
    first: bool,
    status: u16,
    length: Option<u64>,
    chunked: bool,
    /// The answer is one turnstile made: every name is respelled.
    generated: bool,
}

impl Head {
    fn new() -> Self {
        Self {
            line: [0; LINE_KEEP],
            len: 0,
            named: false,
            first: true,
            status: 0,
            length: None,
            chunked: false,
            generated: false,
        }
    }

    fn kept(&self) -> &[u8] {
        &self.line[..self.len.min(LINE_KEEP)]
    }
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// The size line: digits so far, its value, in an extension, after CR.
    Size {
        digits: u8,
        value: u64,
        ext: bool,
        cr: bool,
    },
    Data(u64),
    /// The CRLF after a chunk's data: bytes of it seen.
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty one.
    Trailers {
        at_start: bool,
        cr: bool,
    },
}

const SIZE_LINE: Chunk = Chunk::Size {
    digits: 0,
    value: 0,
    ext: false,
    cr: false,
};

/// How an edit respells a name.
#[derive(Debug, Clone, Copy)]
enum Spell {
    /// As `names[name]`, from its byte `from`.
    Listed { name: usize, from: usize },
    /// In title case; `upper`: the first byte starts the name or follows a `-`.
    Title { upper: bool },
}

/// One respelling of `len` bytes at `at` in the buffer.
#[derive(Debug, Clone, Copy)]
struct Edit {
    at: usize,
    len: usize,
    spell: Spell,
}

type Edits = SmallVec<[Edit; 16]>;

/// What one step through a head did.
enum HeadStep {
    /// The rest of the buffer went into a line not yet ended.
    More(usize),
    /// Not followed any further (not HTTP/1.x, or a line it cannot read).
    Off,
    /// A line ended after `used` bytes; `ended_head`: it was the blank line.
    Line { ended_head: bool, used: usize },
}

/// Reads the head line starting at `rest` (offset `i` of the write),
/// noting the edits its header name needs.
fn head_line(
    head: &mut Head,
    rest: &[u8],
    i: usize,
    next: u64,
    spellings: &Spellings,
    marks: &dyn Fn(u64) -> Marks,
    edits: &mut Edits,
) -> HeadStep {
    let end = memchr(b'\n', rest);
    let read = match end {
        // The usual case: the whole line is in this buffer.
        Some(end) if head.len == 0 => {
            let line = &rest[..end];
            let read = read_line(head, line, next, marks);
            if let Some(Line::Header { colon }) = read {
                if let Some(spell) = spell(spellings, head.generated, &line[..colon], 0) {
                    edits.push(Edit {
                        at: i,
                        len: colon,
                        spell,
                    });
                }
            }
            read.map(|l| matches!(l, Line::End))
        }
        // A line split across writes: what it held so far is
        // kept (its first LINE_KEEP bytes).
        _ => {
            let segment = &rest[..end.unwrap_or(rest.len())];
            let before = head.len;
            keep(head, segment);
            if head.first {
                // An HTTP/2 connection (or anything else) is not followed.
                let kept = head.kept();
                let n = kept.len().min(7);
                if kept[..n] != b"HTTP/1."[..n] {
                    return HeadStep::Off;
                }
            } else if !head.named {
                if let Some(colon) = memchr(b':', segment) {
                    head.named = true;
                    let name_len = before + colon;
                    if name_len < LINE_KEEP && colon > 0 {
                        let name = &head.line[..name_len];
                        if let Some(spell) = spell(spellings, head.generated, name, before) {
                            edits.push(Edit {
                                at: i,
                                len: colon,
                                spell,
                            });
                        }
                    }
                }
            }
            match end {
                None => None,
                Some(_) => kept_line(head, next, marks),
            }
        }
    };
    match (end, read) {
        (None, _) => HeadStep::More(rest.len()),
        (Some(_), None) => {
            edits.clear();
            HeadStep::Off
        }
        (Some(end), Some(ended_head)) => HeadStep::Line {
            ended_head,
            used: end + 1,
        },
    }
}

/// A complete head line, read.
enum Line {
    Status,
    Header { colon: usize },
    End,
}

/// Reads `line` (its CR included, its LF not): the status line, a header
/// (framing headers noted in `head`) or the empty line ending the head;
/// `None` when it is none of these. `next`: the index of the final
/// response this head would be.
fn read_line(
    head: &mut Head,
    line: &[u8],
    next: u64,
    marks: &dyn Fn(u64) -> Marks,
) -> Option<Line> {
    let body = line.strip_suffix(b"\r")?;
    if head.first {
        // "HTTP/1.1 200 OK"
        let code = body.get(9..12)?;
        if !body.starts_with(b"HTTP/1.")
            || body.get(8) != Some(&b' ')
            || !code.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        head.status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if head.status >= 200 {
            head.generated = marks(next).generated;
        }
        return Some(Line::Status);
    }
    if body.is_empty() {
        return Some(Line::End);
    }
    let colon = memchr(b':', body)?;
    let name = &body[..colon];
    // Only two names matter for framing; their lengths tell most lines apart.
    let value = || body[colon + 1..].trim_ascii();
    if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
        let text = std::str::from_utf8(value()).ok()?;
        head.length = Some(text.parse().ok()?);
    } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
        let last = value().rsplit(|&c| c == b',').next()?.trim_ascii();
        head.chunked = last.eq_ignore_ascii_case(b"chunked");
        if !head.chunked {
            return None;
        }
    }
    Some(Line::Header { colon })
}

/// How `name` (all of it) is to be spelled from its byte `from` on, if at
/// all: a listed spelling, or title case in an answer turnstile made.
fn spell(spellings: &Spellings, generated: bool, name: &[u8], from: usize) -> Option<Spell> {
    if let Some(i) = spellings.find(name) {
        return Some(Spell::Listed { name: i, from });
    }
    generated.then(|| Spell::Title {
        upper: from == 0 || name.get(from - 1) == Some(&b'-'),
    })
}

/// The state of one connection's response stream.
#[derive(Debug, Clone)]
struct Stream {
    framing: Framing,
    /// Final responses begun so far (their request's index on the connection).
    responses: u64,
}

impl Stream {
    fn new() -> Self {
        Self {
            framing: Framing::head(),
            responses: 0,
        }
    }

    /// Follows `buf`, the next bytes of the stream, and notes the
    /// respellings it needs in `edits`. `marks(n)`: what the connection's
    /// `n`th exchange was.
    fn scan(
        &mut self,
        buf: &[u8],
        spellings: &Spellings,
        marks: &dyn Fn(u64) -> Marks,
        edits: &mut Edits,
    ) {
        let mut i = 0;
        while i < buf.len() {
            let next = self.responses;
            i += match &mut self.framing {
                Framing::Off => return,
                Framing::Length(left) => {
                    let take = (*left).min((buf.len() - i) as u64);
                    *left -= take;
                    if *left == 0 {
                        self.framing = Framing::head();
                    }
                    take as usize
                }
                Framing::Chunk(chunk) => match step_chunk(chunk, &buf[i..]) {
                    Some((used, done)) => {
                        if done {
                            self.framing = Framing::head();
                        }
                        used
                    }
                    None => {
                        self.framing = Framing::Off;
                        return;
                    }
                },
                Framing::Head(head) => {
                    match head_line(head, &buf[i..], i, next, spellings, marks, edits) {
                        HeadStep::More(used) => used,
                        HeadStep::Off => {
                            self.framing = Framing::Off;
                            return;
                        }
                        HeadStep::Line { ended_head, used } => {
                            self.line_ended(ended_head, marks);
                            used
                        }
                    }
                }
            };
        }
    }

    /// After a head line: the next line, or the body the head announced.
    fn line_ended(&mut self, ended_head: bool, marks: &dyn Fn(u64) -> Marks) {
        let Framing::Head(head) = &mut self.framing else {
            return;
        };
        if !ended_head {
            head.first = false;
            head.len = 0;
            head.named = false;
            return;
        }
        let (status, length, chunked) = (head.status, head.length, head.chunked);
        self.framing = match status {
            101 => Framing::Off,
            100..=199 => Framing::head(),
            _ => {
                let index = self.responses;
                self.responses += 1;
                if marks(index).head || status == 204 || status == 304 {
                    Framing::head()
                } else if chunked {
                    Framing::Chunk(SIZE_LINE)
                } else {
                    match length {
                        Some(0) => Framing::head(),
                        Some(n) => Framing::Length(n),
                        None => Framing::Off,
                    }
                }
            }
        };
    }
}

/// Reads the line kept in `head` (split across writes); whether it ended
/// the head, `None` when it cannot be read.
fn kept_line(head: &mut Head, next: u64, marks: &dyn Fn(u64) -> Marks) -> Option<bool> {
    if head.len > LINE_KEEP {
        // Too long to read whole: fine for any header but the framing ones,
        // which are short, and the status line.
        let kept = head.kept();
        if head.first
            || starts_with_ignore_case(kept, b"content-length:")
            || starts_with_ignore_case(kept, b"transfer-encoding:")
        {
            return None;
        }
        return Some(false);
    }
    let mut line = [0u8; LINE_KEEP];
    let n = head.len;
    line[..n].copy_from_slice(&head.line[..n]);
    read_line(head, &line[..n], next, marks).map(|l| matches!(l, Line::End))
}

fn keep(head: &mut Head, segment: &[u8]) {
    let room = LINE_KEEP.saturating_sub(head.len);
    let take = room.min(segment.len());
    head.line[head.len..head.len + take].copy_from_slice(&segment[..take]);
    head.len += segment.len();
}

fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    memchr::memchr(needle, haystack)
}

/// Follows chunked framing over `buf`: bytes used and whether the body
/// ended; `None` when it is not chunked framing.
fn step_chunk(chunk: &mut Chunk, buf: &[u8]) -> Option<(usize, bool)> {
    let mut i = 0;
    while i < buf.len() {
        match chunk {
            Chunk::Data(left) => {
                let take = (*left).min((buf.len() - i) as u64);
                *left -= take;
                i += take as usize;
                if *left == 0 {
                    *chunk = Chunk::DataEnd(0);
                }
                continue;
            }
            Chunk::DataEnd(seen) => {
                let want = if *seen == 0 { b'\r' } else { b'\n' };
                if buf[i] != want {
                    return None;
                }
                *seen += 1;
                if *seen == 2 {
                    *chunk = SIZE_LINE;
                }
            }
            Chunk::Size {
                digits,
                value,
                ext,
                cr,
            } => {
                let c = buf[i];
                match c {
                    b'\n' if *cr && *digits > 0 => {
                        *chunk = match *value {
                            0 => Chunk::Trailers {
                                at_start: true,
                                cr: false,
                            },
                            n => Chunk::Data(n),
                        };
                    }
                    _ if *cr => return None,
                    b'\r' => *cr = true,
                    b'\n' => return None,
                    _ if *ext => {}
                    b';' if *digits > 0 => *ext = true,
                    _ => {
                        let d = (c as char).to_digit(16)?;
                        if *digits >= 15 {
                            return None;
                        }
                        *digits += 1;
                        *value = *value * 16 + u64::from(d);
                    }
                }
            }
            Chunk::Trailers { at_start, cr } => match buf[i] {
                b'\r' if !*cr => *cr = true,
                b'\n' if *cr => {
                    if *at_start {
                        return Some((i + 1, true));
                    }
                    *at_start = true;
                    *cr = false;
                }
                _ if *cr => return None,
                b'\n' => return None,
                _ => *at_start = false,
            },
        }
        i += 1;
    }
    Some((i, false))
}

fn apply(edits: &[Edit], spellings: &Spellings, out: &mut [u8]) {
    for e in edits {
        let dst = &mut out[e.at..e.at + e.len];
        match e.spell {
            Spell::Listed { name, from } => {
                dst.copy_from_slice(&spellings.names[name][from..from + e.len]);
            }
            Spell::Title { mut upper } => {
                for c in dst {
                    *c = if upper {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    };
                    upper = *c == b'-';
                }
            }
        }
    }
}

pin_project! {
    /// A connection's plaintext stream whose response heads get
    /// [`Spellings`] as hyper writes them; reads pass through.
    pub struct CaseWriter<T> {
        #[pin]
        io: T,
        stream: Stream,
        spellings: Arc<Spellings>,
        activity: Arc<Activity>,
        scratch: Vec<u8>,
    }
}

impl<T> CaseWriter<T> {
    /// Respells the heads written to `io`, a connection whose requests begin
    /// on `activity` (which tells HEAD requests apart).
    pub fn new(io: T, spellings: Arc<Spellings>, activity: Arc<Activity>) -> Self {
        Self {
            io,
            stream: Stream::new(),
            spellings,
            activity,
            scratch: Vec::new(),
        }
    }
}

impl<T: AsyncRead> AsyncRead for CaseWriter<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        // HTTP/1.1 only: a pass-through stream (HTTP/2) has no heads to time.
        if buf.filled().len() > before && !matches!(this.stream.framing, Framing::Off) {
            this.activity.bytes_arrived();
        }
        read
    }
}

/// Up to this many buffers of a vectored write go in one call.
const MAX_SLICES: usize = 64;

impl<T: AsyncWrite> AsyncWrite for CaseWriter<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if matches!(this.stream.framing, Framing::Off) {
            return this.io.poll_write(cx, buf);
        }
        let activity = &**this.activity;
        let marks = |n| activity.marks(n);
        let before = this.stream.clone();
        let mut edits = Edits::new();
        this.stream.scan(buf, this.spellings, &marks, &mut edits);
        let written = if edits.is_empty() {
            this.io.poll_write(cx, buf)
        } else {
            this.scratch.clear();
            this.scratch.extend_from_slice(buf);
            apply(&edits, this.spellings, this.scratch);
            this.io.poll_write(cx, this.scratch)
        };
        match written {
            Poll::Ready(Ok(n)) if n == buf.len() => {}
            Poll::Ready(Ok(n)) => {
                *this.stream = before;
                edits.clear();
                this.stream
                    .scan(&buf[..n], this.spellings, &marks, &mut edits);
            }
            _ => *this.stream = before,
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if matches!(this.stream.framing, Framing::Off) {
            return this.io.poll_write_vectored(cx, bufs);
        }
        let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
        let activity = &**this.activity;
        let marks = |n| activity.marks(n);
        let before = this.stream.clone();
        // Which buffers are respelled, and where their copies are.
        let mut copies: SmallVec<[(usize, std::ops::Range<usize>); 2]> = SmallVec::new();
        this.scratch.clear();
        let mut edits = Edits::new();
        for (index, buf) in bufs.iter().enumerate() {
            edits.clear();
            this.stream.scan(buf, this.spellings, &marks, &mut edits);
            if !edits.is_empty() {
                let start = this.scratch.len();
                this.scratch.extend_from_slice(buf);
                apply(&edits, this.spellings, &mut this.scratch[start..]);
                copies.push((index, start..this.scratch.len()));
            }
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let written = if copies.is_empty() {
            this.io.poll_write_vectored(cx, bufs)
        } else {
            let scratch = &this.scratch[..];
            let mut slices: SmallVec<[io::IoSlice<'_>; MAX_SLICES]> =
                bufs.iter().map(|b| io::IoSlice::new(b)).collect();
            for (index, range) in &copies {
                slices[*index] = io::IoSlice::new(&scratch[range.clone()]);
            }
            this.io.poll_write_vectored(cx, &slices)
        };
        match written {
            Poll::Ready(Ok(n)) if n == total => {}
            Poll::Ready(Ok(n)) => {
                *this.stream = before;
                let mut left = n;
                for buf in bufs {
                    let take = left.min(buf.len());
                    edits.clear();
                    this.stream
                        .scan(&buf[..take], this.spellings, &marks, &mut edits);
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
            }
            _ => *this.stream = before,
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
