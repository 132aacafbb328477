//! Media duration limits (docs/configuration.md, "Media duration"):
//! `max_duration_by_type = { "audio/*" = "600m" }` on a route. A body (or
//! each `multipart/form-data` part) of a listed type is held until its
//! duration is known, and refused if it lasts too long or cannot be read.
//!
//! Durations come from symphonia's demuxers (pure Rust, maintained, one
//! crate for WAV, MP3, FLAC, Ogg Vorbis/Opus, MP4/M4A/MOV and
//! WebM/Matroska): no decoding, only container metadata and frame headers.
//! A file's duration is the longer of what its container declares and the
//! sum of its packets' durations, so an MP3 without a Xing/VBRI header (whose
//! declared length is an estimate from the first frame's bitrate) and a file
//! declaring less than it carries are both measured by what is in them.

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::wire::body::most_specific;

/// Longest a duration probe may take before the file counts as unreadable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A route's `max_duration_by_type`: `(lower-case pattern, seconds)`,
/// matched like `max_body_by_type` (the most specific pattern wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaLimits {
    /// The patterns and their limits in seconds.
    pub by_type: Vec<(String, u64)>,
}

impl MediaLimits {
    /// Whether the route checks durations at all.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The limit (pattern, seconds) for a media type, if one applies.
    pub fn for_type(&self, media_type: &str) -> Option<(&str, u64)> {
        most_specific(&self.by_type, media_type)
    }
}

/// The duration of a media file in seconds, or why it cannot be read.
/// Pure and bounded by the file's size; call it off the async runtime. A
/// panic inside the parsers (malformed input they did not foresee; the
/// release build checks their arithmetic) is an unreadable file.
pub fn duration_of(file: Bytes) -> Result<f64, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(file)))
        .unwrap_or_else(|_| Err("the file could not be parsed".into()))
}

fn measure(file: Bytes) -> Result<f64, String> {
    let source = MediaSourceStream::new(
        Box::new(Cursor::new(file)),
        MediaSourceStreamOptions::default(),
    );
    let probed = symphonia::default::get_probe()
        .format(
            &Hint::new(),
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| format!("not a readable audio or video file ({e})"))?;
    let mut format = probed.format;
    let mut declared = 0f64;
    let mut counted: Vec<(u32, u64)> = Vec::new();
    for track in format.tracks() {
        let p = &track.codec_params;
        if let (Some(n), Some(tb)) = (p.n_frames, p.time_base) {
            declared = declared.max(seconds(tb.calc_time(n)));
        }
        counted.push((track.id, 0));
    }
    // Packet headers only: a truncated or damaged tail ends the count.
    while let Ok(packet) = format.next_packet() {
        if let Some(c) = counted.iter_mut().find(|(id, _)| *id == packet.track_id()) {
            c.1 = c.1.saturating_add(packet.dur);
        }
    }
    let mut measured = 0f64;
    for track in format.tracks() {
        let total = counted
            .iter()
            .find(|(id, _)| *id == track.id)
            .map_or(0, |c| c.1);
        if let Some(tb) = track.codec_params.time_base {
            measured = measured.max(seconds(tb.calc_time(total)));
        }
    }
    let duration = declared.max(measured);
    if duration.is_finite() && duration > 0.0 {
        Ok(duration)
    } else {
        Err("its duration is not in the file".into())
    }
}

fn seconds(t: symphonia::core::units::Time) -> f64 {
    t.seconds as f64 + t.frac
}

/// The duration of `file`, probed on the blocking pool within
/// [`PROBE_TIMEOUT`]; a panic in the parser is an unreadable file.
pub async fn probe(file: Bytes) -> Result<f64, String> {
    let task = tokio::task::spawn_blocking(move || duration_of(file));
    match tokio::time::timeout(PROBE_TIMEOUT, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the file could not be parsed".into()),
        Err(_) => Err(format!(
            "reading its duration took longer than {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Why an upload was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaProblem {
    /// `what` lasts `seconds` (rounded up), over `limit` seconds.
    TooLong {
        /// `audio/mpeg part "file"` or `audio/mpeg body`.
        what: String,
        /// Its duration, whole seconds rounded up.
        seconds: u64,
        /// The limit in seconds.
        limit: u64,
    },
    /// `what` is of a listed type but its duration cannot be read.
    Unreadable {
        /// As above.
        what: String,
        /// Why.
        reason: String,
    },
    /// A multipart body that cannot be split into parts.
    Malformed(String),
}

/// Checks the duration of a held body: the body itself when its type has
/// a limit, or each part of a `multipart/form-data` body by the part's
/// `Content-Type`. Parts of unlisted types (and text fields) are not read.
pub async fn check(
    body: &Bytes,
    content_type: &str,
    limits: &MediaLimits,
) -> Result<(), MediaProblem> {
    let media = crate::wire::body::media_type(content_type);
    if media == "multipart/form-data" {
        let Some(boundary) = crate::wire::body::multipart_boundary(content_type) else {
            return Err(MediaProblem::Malformed(
                "multipart/form-data without a boundary".into(),
            ));
        };
        let reader = Cursor::new(body.clone());
        let mut parts = multer::Multipart::with_reader(reader, boundary);
        let mut index = 0;
        loop {
            let field = match parts.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(MediaProblem::Malformed(format!(
                        "malformed multipart body: {e}"
                    )))
                }
            };
            index += 1;
            // One Content-Type that parses, or none: anything else could
            // be read two ways (and a part of a listed type go unmeasured).
            let types = field.headers().get_all(http::header::CONTENT_TYPE);
            let declared = types.iter().count();
            let parsed = field.content_type().is_some()
                && types
                    .iter()
                    .all(|v| v.to_str().is_ok_and(crate::wire::body::is_media_type));
            if declared > 1 || (declared == 1 && !parsed) {
                return Err(MediaProblem::Malformed(format!(
                    "multipart part #{index} has a Content-Type that cannot be read one way"
                )));
            }
            let Some(part_type) = field
                .content_type()
                .map(|m| m.essence_str().to_ascii_lowercase())
            else {
                continue;
            };
            let Some((_, limit)) = limits.for_type(&part_type) else {
                continue;
            };
            let name = field
                .name()
                .map_or_else(|| format!("#{index}"), str::to_owned);
            let what = format!("{part_type} part {name:?}");
            let bytes = field
                .bytes()
                .await
                .map_err(|e| MediaProblem::Malformed(format!("malformed multipart body: {e}")))?;
            judge(what, bytes, limit).await?;
        }
    }
    match limits.for_type(&media) {
        Some((_, limit)) => judge(format!("{media} body"), body.clone(), limit).await,
        None => Ok(()),
    }
}

async fn judge(what: String, file: Bytes, limit: u64) -> Result<(), MediaProblem> {
    match probe(file).await {
        Ok(d) if d > limit as f64 => Err(MediaProblem::TooLong {
            what,
            seconds: d.ceil() as u64,
            limit,
        }),
        Ok(_) => Ok(()),
        Err(reason) => Err(MediaProblem::Unreadable { what, reason }),
    }
}

/// A duration for people: whole minutes when the limit is in minutes,
/// else whole seconds (rounded up).
pub fn shown(seconds: u64, limit: u64) -> String {
    if limit >= 60 && limit % 60 == 0 {
        format!("{} min", seconds.div_ceil(60))
    } else {
        format!("{seconds} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A WAV file of `secs` seconds of 8 kHz 8-bit mono silence.
    fn wav(secs: u32, declared: Option<u32>) -> Bytes {
        let data = 8000 * secs;
        let declared = declared.unwrap_or(data);
        let mut out = Vec::new();
        out.extend_from_slice(b"RIFF");
        out.extend_from_slice(&(36 + declared).to_le_bytes());
        out.extend_from_slice(b"WAVEfmt ");
        out.extend_from_slice(&16u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes()); // PCM
        out.extend_from_slice(&1u16.to_le_bytes()); // mono
        out.extend_from_slice(&8000u32.to_le_bytes());
        out.extend_from_slice(&8000u32.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&8u16.to_le_bytes());
        out.extend_from_slice(b"data");
        out.extend_from_slice(&declared.to_le_bytes());
        out.resize(out.len() + data as usize, 128);
        Bytes::from(out)
    }

    #[test]
    fn a_wav_file_lasts_what_it_holds() {
        let d = duration_of(wav(3, None)).unwrap();
        assert!((d - 3.0).abs() < 0.01, "{d}");
        assert!(duration_of(Bytes::from_static(b"RIFF\0\0\0\0WAVE")).is_err());
        assert!(duration_of(Bytes::new()).is_err());
    }

    #[test]
    fn durations_are_shown_in_the_limit_s_unit() {
        assert_eq!(shown(36_720, 36_000), "612 min");
        assert_eq!(shown(601, 600), "11 min");
        assert_eq!(shown(5, 3), "5 s");
        assert_eq!(
            MediaLimits {
                by_type: vec![("audio/*".into(), 60), ("audio/mpeg".into(), 30)]
            }
            .for_type("audio/mpeg"),
            Some(("audio/mpeg", 30))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random bytes never panic and are read (or refused) quickly.
        #[test]
        fn random_bytes_never_panic_and_are_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..4096), prefix in 0usize..6) {
            // Some inputs start like a real container, to get past the probe.
            let heads: [&[u8]; 6] = [b"", b"RIFF\x24\0\0\0WAVEfmt ", b"ID3\x03\0\0\0\0\0\0", b"fLaC", b"OggS\0\x02", b"\x1a\x45\xdf\xa3"];
            let mut file = heads[prefix].to_vec();
            file.extend_from_slice(&bytes);
            let started = std::time::Instant::now();
            let _ = duration_of(Bytes::from(file));
            prop_assert!(started.elapsed() < Duration::from_secs(1));
        }
    }
}
