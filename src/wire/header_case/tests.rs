use std::io::IoSlice;

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

use super::*;

fn spellings() -> Arc<Spellings> {
    Arc::new(Spellings::for_prefixes(["X-RateLimit", "X-MCP-Calls"]))
}

/// A socket that takes at most `caps[i]` bytes on its `i`th write.
struct Trickle {
    out: Vec<u8>,
    caps: Vec<usize>,
    calls: usize,
    vectored: bool,
}

impl Trickle {
    fn cap(&mut self) -> usize {
        let cap = self.caps.get(self.calls % self.caps.len().max(1)).copied();
        self.calls += 1;
        cap.unwrap_or(usize::MAX).max(1)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.cap().min(buf.len());
        self.out.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut left = self.cap();
        let mut n = 0;
        for b in bufs {
            let take = left.min(b.len());
            self.out.extend_from_slice(&b[..take]);
            n += take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Writes `parts` (each as hyper would queue them) through a [`CaseWriter`]
/// over a socket taking `caps` bytes per call; `heads[n]`: the `n`th
/// request was a HEAD.
fn through(parts: &[Vec<u8>], heads: &[bool], caps: Vec<usize>, vectored: bool) -> Vec<u8> {
    let marks: Vec<Marks> = heads
        .iter()
        .map(|&head| Marks {
            head,
            generated: false,
        })
        .collect();
    through_marked(parts, &marks, caps, vectored)
}

fn through_marked(parts: &[Vec<u8>], marks: &[Marks], caps: Vec<usize>, vectored: bool) -> Vec<u8> {
    let activity = Activity::new();
    for m in marks {
        let busy = activity.begin_request(m.head);
        activity.set_generated(busy.index(), m.generated);
    }
    let socket = Trickle {
        out: Vec::new(),
        caps,
        calls: 0,
        vectored,
    };
    let mut writer = CaseWriter::new(socket, spellings(), activity);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        if vectored {
            // Up to three parts per call, resumed after short writes.
            let (mut part, mut offset) = (0, 0);
            while part < parts.len() {
                let slices: Vec<IoSlice<'_>> = parts[part..]
                    .iter()
                    .take(3)
                    .enumerate()
                    .map(|(i, p)| IoSlice::new(if i == 0 { &p[offset..] } else { p }))
                    .collect();
                let mut n = writer.write_vectored(&slices).await.unwrap();
                while n > 0 || (part < parts.len() && parts[part].len() == offset) {
                    let left = parts[part].len() - offset;
                    if n < left {
                        offset += n;
                        break;
                    }
                    n -= left;
                    part += 1;
                    offset = 0;
                    if part == parts.len() {
                        break;
                    }
                }
            }
        } else {
            for p in parts {
                writer.write_all(p).await.unwrap();
            }
        }
    });
    writer.io.out
}

#[test]
fn respells_our_names_and_keeps_the_rest() {
    let head = b"HTTP/1.1 429 Too Many Requests\r\nX-Ratelimit-Limit: 3\r\nx-ratelimit-remaining: 0\r\nRetry-After: 7\r\nRatelimit-Policy: 3;w=60\r\nX-Upstream-MiXed: a\r\nWww-Authenticate: Bearer\r\nContent-Length: 5\r\n\r\n".to_vec();
    let out = through(&[head, b"hello".to_vec()], &[false], vec![], true);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 429 Too Many Requests\r\nX-RateLimit-Limit: 3\r\nX-RateLimit-Remaining: 0\r\nRetry-After: 7\r\nRateLimit-Policy: 3;w=60\r\nX-Upstream-MiXed: a\r\nWWW-Authenticate: Bearer\r\nContent-Length: 5\r\n\r\nhello"
    );
}

#[test]
fn bodies_are_never_touched() {
    let fake = b"\r\nx-ratelimit-limit: 9\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 1\r\n\r\n";
    let mut stream =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", fake.len()).into_bytes();
    stream.extend_from_slice(fake);
    stream.extend_from_slice(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
    stream.extend_from_slice(format!("{:X}\r\n", fake.len()).as_bytes());
    stream.extend_from_slice(fake);
    stream.extend_from_slice(
        b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 2\r\ncontent-length: 0\r\n\r\n",
    );
    let out = through(&[stream.clone()], &[false; 3], vec![], false);
    let expected = String::from_utf8(stream).unwrap().replacen(
        "\r\nx-ratelimit-limit: 2\r\ncontent-length: 0",
        "\r\nX-RateLimit-Limit: 2\r\ncontent-length: 0",
        1,
    );
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

#[test]
fn a_head_answer_has_no_body() {
    let stream = b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 2\r\ncontent-length: 0\r\n\r\n";
    let out = through(&[stream.to_vec()], &[true, false], vec![], false);
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("X-RateLimit-Limit: 2"));
}

#[test]
fn informational_answers_come_before_the_final_one() {
    let stream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx-ratelimit-limit: 2\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-type: minute\r\ncontent-length: 0\r\n\r\n";
    let out =
        String::from_utf8(through(&[stream.to_vec()], &[false, false], vec![], false)).unwrap();
    assert!(
        out.contains("X-RateLimit-Limit: 2") && out.contains("X-RateLimit-Type: minute"),
        "{out}"
    );
}

#[test]
fn what_it_does_not_follow_passes_as_it_is() {
    for stream in [
        // HTTP/2: a SETTINGS frame.
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x00HTTP/1.1 200 OK\r\nx-ratelimit-limit: 1\r\n\r\n".to_vec(),
        // Delimited by close.
        b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 1\r\n\r\n".to_vec(),
        // An upgrade.
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 1\r\n\r\n".to_vec(),
        // Bad chunk framing.
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nHTTP/1.1 200 OK\r\nx-ratelimit-limit: 1\r\n\r\n".to_vec(),
    ] {
        assert_eq!(through(std::slice::from_ref(&stream), &[false; 2], vec![], false), stream);
    }
}

#[test]
fn answers_turnstile_made_get_every_name_spelled() {
    let head = b"HTTP/1.1 429 Too Many Requests\r\nx-ratelimit-limit: 3\r\ncontent-type: application/json\r\nretry-after: 7\r\nwww-authenticate: Bearer\r\nx-mcp-calls-remaining: 0\r\ncontent-length: 2\r\ndate: now\r\n\r\n{}".to_vec();
    let marks = [Marks {
        head: false,
        generated: true,
    }];
    let out = through_marked(&[head], &marks, vec![], false);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 429 Too Many Requests\r\nX-RateLimit-Limit: 3\r\nContent-Type: application/json\r\nRetry-After: 7\r\nWWW-Authenticate: Bearer\r\nX-MCP-Calls-Remaining: 0\r\nContent-Length: 2\r\nDate: now\r\n\r\n{}"
    );
}

#[test]
fn spellings_are_found_whatever_the_case() {
    let s = Spellings::for_prefixes(["X-Credits", "X-RateLimit"]);
    let found = |n: &[u8]| s.find(n).map(|i| s.names[i].to_vec());
    assert_eq!(found(b"x-credits-limit"), Some(b"X-Credits-Limit".to_vec()));
    assert_eq!(
        found(b"X-RATELIMIT-RESET"),
        Some(b"X-RateLimit-Reset".to_vec())
    );
    assert_eq!(found(b"retry-after"), None);
}

/// One generated response: header names (as hyper would write them), the
/// body, whether chunked (with chunk sizes), whether answering a HEAD.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    names: Vec<&'static str>,
    body: Vec<u8>,
    chunks: Option<Vec<usize>>,
    head: bool,
    generated: bool,
}

const NAMES: &[&str] = &[
    "X-Ratelimit-Limit",
    "x-ratelimit-remaining",
    "X-RATELIMIT-RESET",
    "Ratelimit",
    "X-Mcp-Calls-Remaining",
    "Content-Type",
    "X-Upstream-Spelled-This",
    "x-ratelimit-limit-extra",
    "Retry-After",
];

fn canonical(name: &str, generated: bool) -> String {
    let s = spellings();
    match s.find(name.as_bytes()) {
        Some(i) => String::from_utf8(s.names[i].to_vec()).unwrap(),
        None if generated => {
            let mut upper = true;
            name.chars()
                .map(|c| {
                    let c = if upper {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    };
                    upper = c == '-';
                    c
                })
                .collect()
        }
        None => name.to_owned(),
    }
}

fn answers() -> impl Strategy<Value = Vec<Answer>> {
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..60),
        Just(b"\r\nx-ratelimit-limit: 9\r\n\r\nHTTP/1.1 200 OK\r\nRatelimit: 1\r\n\r\n".to_vec()),
    ];
    let answer = (
        prop_oneof![
            Just(200u16),
            Just(429),
            Just(204),
            Just(304),
            Just(100),
            Just(503)
        ],
        proptest::collection::vec(proptest::sample::select(NAMES), 0..6),
        body,
        proptest::option::of(proptest::collection::vec(1usize..20, 1..4)),
        proptest::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(|(status, names, body, chunks, head, generated)| Answer {
            status,
            names,
            body,
            chunks,
            head,
            generated,
        });
    proptest::collection::vec(answer, 1..8)
}

/// The parts hyper would queue for `answers`, spelled by `spell` (name,
/// whether turnstile made the answer), and what each exchange was.
fn render(answers: &[Answer], spell: &dyn Fn(&str, bool) -> String) -> (Vec<Vec<u8>>, Vec<Marks>) {
    let mut parts = Vec::new();
    let mut heads = Vec::new();
    for a in answers {
        let mut head = format!("HTTP/1.1 {} X\r\n", a.status);
        for (i, n) in a.names.iter().enumerate() {
            head.push_str(&format!(
                "{}: v{i}\r\n",
                spell(n, a.generated && a.status != 100)
            ));
        }
        let bodiless = a.head || matches!(a.status, 100 | 204 | 304);
        match &a.chunks {
            Some(_) if !matches!(a.status, 100 | 204 | 304) => {
                head.push_str("Transfer-Encoding: chunked\r\n\r\n")
            }
            _ if a.status == 100 => head.push_str("\r\n"),
            _ if matches!(a.status, 204 | 304) => head.push_str("\r\n"),
            _ => head.push_str(&format!("Content-Length: {}\r\n\r\n", a.body.len())),
        }
        parts.push(head.into_bytes());
        if a.status != 100 {
            heads.push(Marks {
                head: a.head,
                generated: a.generated,
            });
        }
        if bodiless {
            continue;
        }
        match &a.chunks {
            Some(sizes) => {
                let mut rest = &a.body[..];
                for &size in sizes.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, more) = rest.split_at(size.min(rest.len()));
                    parts.push(format!("{:x}\r\n", chunk.len()).into_bytes());
                    parts.push(chunk.to_vec());
                    parts.push(b"\r\n".to_vec());
                    rest = more;
                }
                parts.push(b"0\r\n\r\n".to_vec());
            }
            None => parts.push(a.body.clone()),
        }
    }
    (parts, heads)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the answers and however the socket splits the writes, the
    /// stream out is the stream in with our names respelled in heads only.
    #[test]
    fn only_names_in_heads_change(
        answers in answers(),
        caps in proptest::collection::vec(1usize..40, 0..6),
        vectored in any::<bool>(),
    ) {
        let (parts, marks) = render(&answers, &|n, _| n.to_owned());
        let (expected, _) = render(&answers, &canonical);
        let out = through_marked(&parts, &marks, caps, vectored);
        let expected = expected.concat();
        prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
    }
}
