//! A chat-completions provider as hosted providers are: over TLS (a certificate for
//! `localhost` signed by the test CA of `scripts/tls-services.sh`), HTTP/2 or HTTP/1.1 as
//! the client offers (ALPN), and a cap on the concurrent streams of an HTTP/2 connection.
//! Shared by the API tests and the benchmark.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where `scripts/tls-services.sh` keeps the test CA and the `localhost` certificate.
pub fn tls_dir() -> PathBuf {
    PathBuf::from(std::env::var("INSTRUCTD_TLS_DIR").unwrap_or_else(|_| "/var/lib/instructd-tls".to_owned()))
}

/// The test CA, which signs the provider's certificate (for `llm.ca_file`).
pub fn test_ca() -> PathBuf {
    let ca = tls_dir().join("ca.pem");
    assert!(ca.is_file(), "{} is missing: run scripts/tls-services.sh", ca.display());
    ca
}

/// The provider; it stops (every connection with it) when dropped.
pub struct HttpsProvider {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    http2_connections: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl HttpsProvider {
    /// Serves every request with `answer`, allowing `max_streams` concurrent streams on an
    /// HTTP/2 connection. The request's body is read first, as a provider reads the prompt
    /// (an HTTP/2 body left unread holds the connection's flow-control window).
    pub async fn start<F, Fut>(max_streams: u32, answer: F) -> Self
    where
        F: Fn(Request<Bytes>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let acceptor = TlsAcceptor::from(Arc::new(server_config()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let http2_connections = Arc::new(AtomicUsize::new(0));
        let (counted, counted_http2) = (connections.clone(), http2_connections.clone());
        let server = tokio::spawn(async move {
            // Dropped with the accepting task: every connection ends with the provider.
            let mut served = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let _ = tcp.set_nodelay(true);
                let (acceptor, answer) = (acceptor.clone(), answer.clone());
                let (counted, counted_http2) = (counted.clone(), counted_http2.clone());
                served.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(answer(Request::from_parts(parts, body)).await)
                        }
                    });
                    let io = TokioIo::new(tls);
                    if http2 {
                        counted_http2.fetch_add(1, Ordering::Relaxed);
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .max_concurrent_streams(max_streams)
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    }
                });
                // Reap the connections that ended.
                while served.try_join_next().is_some() {}
            }
        });
        Self { addr, connections, http2_connections, server }
    }

    /// The `llm.base_url` that reaches it (by the name its certificate holds).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Of those, the ones that speak HTTP/2.
    pub fn http2_connections(&self) -> usize {
        self.http2_connections.load(Ordering::Relaxed)
    }
}

impl Drop for HttpsProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A JSON answer.
pub fn json_response(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder().header("content-type", "application/json").body(Full::new(body)).expect("a valid response")
}

fn server_config() -> rustls::ServerConfig {
    let dir = tls_dir();
    let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .expect("the test server certificate (run scripts/tls-services.sh)");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("the test server key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("a valid certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}
