//! Content codings of upstream answers that turnstile reads (job ids,
//! states, settled figures): a compressed answer is decoded on the side
//! while its bytes pass on to the client unchanged. One coding of gzip,
//! deflate (zlib), br or zstd; the decoded text is bounded (a small answer
//! that expands past the read bound is unreadable, never a memory spike).

use std::io::{self, Write};

use http::header::{HeaderMap, CONTENT_ENCODING};

/// Why an encoded answer cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The decoded text would pass the read bound.
    TooLarge,
    /// Not valid data of its coding, or cut short.
    Corrupt,
}

/// The coding of an answer as its headers declare it.
#[derive(Debug)]
pub enum Coding {
    /// None, or `identity`.
    Identity,
    /// One coding turnstile decodes.
    Known(Decoder),
    /// A coding it does not decode, or several stacked: unreadable.
    Unknown,
}

/// A decoded-output writer that refuses to grow past `max` bytes.
#[derive(Debug, Default)]
pub struct Bounded {
    out: Vec<u8>,
    /// Bytes written ever.
    written: usize,
    max: usize,
    over: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() > self.max {
            self.over = true;
            return Err(io::Error::other("decoded answer over the read bound"));
        }
        self.written += buf.len();
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A streaming decoder of one coding.
pub enum Decoder {
    /// `gzip` / `x-gzip`.
    Gzip(Box<flate2::write::GzDecoder<Bounded>>),
    /// `deflate`: zlib-wrapped, as HTTP defines it.
    Deflate(Box<flate2::write::ZlibDecoder<Bounded>>),
    /// `br`.
    Brotli(Box<brotli::DecompressorWriter<Bounded>>),
    /// `zstd`.
    Zstd(Box<Zstd>),
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Gzip(_) => "gzip",
            Decoder::Deflate(_) => "deflate",
            Decoder::Brotli(_) => "br",
            Decoder::Zstd(_) => "zstd",
        })
    }
}

impl Coding {
    /// The coding `headers` declare; decoded output bounded by `max` bytes.
    pub fn of(headers: &HeaderMap, max: usize) -> Self {
        let mut values = headers.get_all(CONTENT_ENCODING).iter();
        let Some(first) = values.next() else {
            return Coding::Identity;
        };
        if values.next().is_some() {
            return Coding::Unknown;
        }
        let Ok(text) = first.to_str() else {
            return Coding::Unknown;
        };
        let mut codings = text
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity");
        let Some(coding) = codings.next() else {
            return Coding::Identity;
        };
        if codings.next().is_some() {
            return Coding::Unknown;
        }
        let sink = Bounded {
            max,
            ..Bounded::default()
        };
        let decoder = match coding.as_str() {
            "gzip" | "x-gzip" => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(sink))),
            "deflate" => Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(sink))),
            "br" => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(sink, 4096))),
            "zstd" => match zstd::stream::raw::Decoder::new() {
                Ok(raw) => Decoder::Zstd(Box::new(Zstd {
                    raw,
                    sink,
                    frame_done: true,
                })),
                Err(_) => return Coding::Unknown,
            },
            _ => return Coding::Unknown,
        };
        Coding::Known(decoder)
    }
}

/// zstd through its raw streaming API, which says where a frame ends.
pub struct Zstd {
    raw: zstd::stream::raw::Decoder<'static>,
    sink: Bounded,
    /// The input so far ends on a frame boundary.
    frame_done: bool,
}

impl Zstd {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut input = InBuffer::around(data);
        let mut chunk = [0u8; 8192];
        loop {
            let mut output = OutBuffer::around(&mut chunk[..]);
            let hint = self.raw.run(&mut input, &mut output)?;
            let produced = output.pos();
            self.sink.write_all(&chunk[..produced])?;
            self.frame_done = hint == 0;
            // Done when the input is used up and the output did not fill
            // (nothing more is waiting inside the decoder).
            if input.pos() == data.len() && produced < chunk.len() {
                return Ok(());
            }
        }
    }
}

impl Decoder {
    fn sink(&mut self) -> &mut Bounded {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(d) => d.get_mut(),
            Decoder::Brotli(d) => d.get_mut(),
            Decoder::Zstd(d) => &mut d.sink,
        }
    }

    fn failed(&mut self) -> DecodeError {
        if self.sink().over {
            DecodeError::TooLarge
        } else {
            DecodeError::Corrupt
        }
    }

    /// Decodes `data`; the text decoded so far is appended to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let written = match self {
            Decoder::Gzip(d) => d.write_all(data),
            Decoder::Deflate(d) => d.write_all(data),
            Decoder::Brotli(d) => d.write_all(data),
            Decoder::Zstd(d) => d.write(data),
        };
        if written.is_err() {
            return Err(self.failed());
        }
        out.append(&mut self.sink().out);
        Ok(())
    }

    /// The end of the encoded body: the rest of the text; a stream cut
    /// short is corrupt.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let done = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Deflate(d) => d.try_finish(),
            Decoder::Brotli(d) => d.flush().and_then(|()| d.close()),
            Decoder::Zstd(d) if d.frame_done => Ok(()),
            Decoder::Zstd(_) => Err(io::Error::other("zstd frame cut short")),
        };
        if done.is_err() {
            return Err(self.failed());
        }
        out.append(&mut self.sink().out);
        Ok(())
    }
}
