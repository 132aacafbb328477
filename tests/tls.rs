//! HTTPS on the proxy listener (SPEC §16): a self-signed certificate made
//! in the test, HTTP/1.1 and HTTP/2 chosen by ALPN, and a certificate
//! replaced by a reload without dropping the connections already open.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const CONFIG: &str = r#"
[server]
tls = { cert = "cert.pem", key = "key.pem" }

[upstream]
url = "{upstream}"

[[routes]]
name = "gen"
path = "/gen"

[plans.free]
[[plans.free.limits]]
name = "minute"
requests = 100
window = "1m"
"#;

/// A fresh self-signed certificate for localhost: (cert PEM, key PEM, DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a certificate");
    (
        made.cert.pem(),
        made.key_pair.serialize_pem(),
        made.cert.der().clone(),
    )
}

/// A TLS connection to the proxy trusting `trusted`, offering `alpn`.
async fn connect(
    p: &Proxy,
    trusted: &CertificateDer<'static>,
    alpn: &[u8],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

fn get() -> http::Request<Full<Bytes>> {
    req("GET", "/gen")
        .header("host", "localhost")
        .header("authorization", "Bearer k")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn https_with_http1_and_http2_by_alpn_and_a_certificate_reloaded_without_dropping_connections(
) {
    let up = Upstream::start().await;
    let (cert, key, der) = certificate();
    let p = Proxy::start_with(CONFIG, &up, &[("cert.pem", &cert), ("key.pem", &key)]).await;

    // HTTP/2, negotiated by ALPN.
    let tls = connect(&p, &der, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = h2.send_request(get()).await.unwrap();
    assert_eq!(
        (r.version(), r.status().as_u16()),
        (http::Version::HTTP_2, 200)
    );
    assert_eq!(r.headers()["x-ratelimit-remaining"], "99");
    assert_eq!(up.last().headers["x-forwarded-proto"], "https");

    // HTTP/1.1, negotiated by ALPN; this connection stays open across the reload.
    let tls = connect(&p, &der, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = h1.send_request(get()).await.unwrap();
    assert_eq!(
        (r.version(), r.status().as_u16()),
        (http::Version::HTTP_11, 200)
    );
    r.into_body().collect().await.unwrap();

    // Plain HTTP to the TLS port is not served.
    let plain = raw(
        p.addr,
        b"GET /gen HTTP/1.1\r\nHost: x\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");

    // A new certificate in the same files, then a reload.
    let (cert2, key2, der2) = certificate();
    std::fs::write(p.dir.path().join("cert.pem"), cert2).unwrap();
    std::fs::write(p.dir.path().join("key.pem"), key2).unwrap();
    p.app
        .reload()
        .expect("the reload reads the new certificate");
    let fresh = connect(&p, &der2, b"http/1.1").await;
    let presented = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, der2, "new connections get the new certificate");
    // The connection opened before the reload goes on.
    let r = h1.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.hits(), 3);
}

#[test]
fn a_missing_or_broken_certificate_is_a_config_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace("{upstream}", "http://127.0.0.1:9");
    std::fs::write(dir.path().join("turnstile.toml"), &config).unwrap();
    let e = turnstile::load(&dir.path().join("turnstile.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("turnstile.toml:3:7") && e.contains("cert.pem"),
        "{e}"
    );
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let e = turnstile::load(&dir.path().join("turnstile.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cert.pem") || e.contains("key.pem"), "{e}");
}
