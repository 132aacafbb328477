//! Pooled HTTP/1.1 connections to the upstream. A config has one upstream,
//! so the pool is a stack of idle connections, not a map keyed by scheme and
//! authority: checking one out is a pop under an uncontended lock.
//!
//! Guarantees: a request that a pooled connection could not even start to
//! send (the upstream had closed it while idle) is sent again on another
//! connection, never one that reached the upstream; a connection goes back
//! to the pool only once its response has been read to the end (a response
//! dropped halfway closes it); idle connections are dropped after
//! [`IDLE_TIMEOUT`].

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::wire::body::Body;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept at most; more are closed.
const MAX_IDLE: usize = 1024;

/// Why an exchange with the upstream failed, as said in a 502 body.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing listens at the upstream address.
    #[error("upstream connection refused")]
    Refused,
    /// No connection within `[upstream] connect_timeout`.
    #[error("upstream connect timed out")]
    ConnectTimeout,
    /// Connecting failed otherwise (name resolution, network unreachable).
    #[error("upstream connection failed: {0}")]
    Connect(io::Error),
    /// The upstream reset the connection.
    #[error("upstream reset the connection")]
    Reset,
    /// The connection ended before a complete response head arrived (or the
    /// request body failed while being sent).
    #[error("upstream closed the connection before answering")]
    Closed,
    /// The task running the exchange failed (a panic while reading the answer).
    #[error("upstream exchange failed: {0}")]
    Task(String),
}

impl UpstreamError {
    fn from_hyper(e: &hyper::Error) -> Self {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::ConnectionReset {
                    return Self::Reset;
                }
            }
            source = s.source();
        }
        Self::Closed
    }
}

/// The upstream's connection pool (one per loaded config).
pub struct Upstream {
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<(SendRequest<Body>, Instant)>>,
}

impl Upstream {
    /// A pool for `authority` (port 80 if it names none); opens nothing yet.
    pub fn new(authority: &Authority, connect_timeout: Duration) -> Arc<Self> {
        let host = authority.host();
        // `[::1]` → `::1`: the socket API takes the bare address.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Arc::new(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// Sends `req` (origin-form target, `Host` set) and returns the response
    /// head with its streaming body.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Closed);
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.recycle(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was already gone.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::from_hyper(&e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(UpstreamError::Refused)
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(UpstreamError::ConnectTimeout)
            }
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        // The upstream's header case reaches the client (crate::wire::header_case).
        let (sender, connection) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::from_hyper(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Returns `sender` to the pool once its response has been read to the
    /// end; a pool dropped meanwhile (config reloaded) is not kept alive.
    fn recycle(self: &Arc<Self>, mut sender: SendRequest<Body>) {
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            // The oldest connections are the first to be stale.
            while idle
                .front()
                .is_some_and(|(s, since)| s.is_closed() || since.elapsed() >= IDLE_TIMEOUT)
            {
                idle.pop_front();
            }
            if idle.len() < MAX_IDLE {
                idle.push_back((sender, Instant::now()));
            }
        });
    }

    /// Idle connections in the pool now.
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn get(addr: std::net::SocketAddr) -> Request<Body> {
        Request::builder()
            .uri("/x")
            .header("host", addr.to_string())
            .body(crate::wire::body::full(""))
            .unwrap()
    }

    /// A server answering each request with "ok"; counts accepted connections.
    async fn server(close_after_each: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after_each {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn body(r: Response<Incoming>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn one_connection_serves_sequential_requests() {
        let (addr, accepted) = server(false).await;
        let up = Upstream::new(&addr.to_string().parse().unwrap(), Duration::from_secs(1));
        for _ in 0..5 {
            let r = up.send(get(addr)).await.unwrap();
            assert_eq!(body(r).await, "ok");
            // The connection returns to the pool once the body is read.
            for _ in 0..100 {
                if up.idle_connections() == 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used() {
        let (addr, accepted) = server(true).await;
        let up = Upstream::new(&addr.to_string().parse().unwrap(), Duration::from_secs(1));
        for _ in 0..3 {
            let r = up.send(get(addr)).await.unwrap();
            assert_eq!(body(r).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refused_and_ipv6_authorities() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let up = Upstream::new(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(1),
        );
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(matches!(
            up.send(get(addr)).await,
            Err(UpstreamError::Refused)
        ));
        let v6 = Upstream::new(&"[::1]:8080".parse().unwrap(), Duration::from_secs(1));
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8080));
        let default_port =
            Upstream::new(&"example.invalid".parse().unwrap(), Duration::from_secs(1));
        assert_eq!(default_port.port, 80);
    }
}
