//! A small HTTP/1.1 client for turnstile's own calls out (the ledger's
//! HTTP sinks): one kept-alive connection to one origin, plain or TLS
//! (rustls, the ring provider; Mozilla's roots, or the operator's CA).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// The TLS settings of an `https` origin: Mozilla's roots (compiled in),
/// or only the certificates in the PEM file `ca`.
pub fn tls_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the CA file {} is not PEM: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{} holds no usable certificate", path.display()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One origin (`http://` or `https://host:port`), one connection kept
/// between calls and made again when it closed.
pub struct OriginClient {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl OriginClient {
    /// A client for the origin of `url`; `tls` for an `https` one.
    pub fn new(url: &Uri, tls: Option<Arc<ClientConfig>>) -> Result<Self, String> {
        let host = url.host().ok_or("the url has no host")?.to_owned();
        let https = url.scheme_str() == Some("https");
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => return Err("an https url needs TLS settings".into()),
            (true, Some(config)) => {
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                    .map_err(|e| format!("{host}: {e}"))?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        let authority = url
            .authority()
            .map_or_else(|| host.clone(), |a| a.as_str().to_owned());
        Ok(Self {
            host,
            port,
            authority,
            tls,
            conn: None,
        })
    }

    /// Sends `req` (its URI: path and query) and reads the answer to its
    /// end; the answer's status.
    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Result<StatusCode, String> {
        let host =
            http::HeaderValue::try_from(self.authority.as_str()).map_err(|e| e.to_string())?;
        req.headers_mut().insert(http::header::HOST, host);
        let mut sender = match self.conn.take().filter(|s| !s.is_closed()) {
            Some(s) => s,
            None => self.connect().await?,
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let answer = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = answer.status();
        answer
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        self.conn = Some(sender);
        Ok(status)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect((self.host.trim_matches(['[', ']']), self.port))
            .await
            .map_err(|e| format!("connect to {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.authority))?;
                handshake(TokioIo::new(tls)).await
            }
        }
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
