//! TLS for the gRPC ingest, done here rather than inside tonic so that every refused
//! handshake (no certificate, a certificate of another CA, plain text on the TLS port) is
//! logged with the peer's address and counted — tonic only logs them at debug level,
//! without the address.
//!
//! Owns the rustls server configuration (ring provider, ALPN `h2`, client certificates
//! required when a client CA is configured) and the accept loop that hands finished
//! handshakes to tonic.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::ServerTls;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup of the ingest: {0}")]
pub struct TlsError(String);

/// Builds the acceptor from PEM material.
///
/// # Errors
/// [`TlsError`] naming what was refused (certificate, key, client CA).
pub fn acceptor(tls: &ServerTls) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("tls.cert_file: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| TlsError(format!("tls.key_file: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                let cert = cert.map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError(format!("tls.client_ca_file: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("tls.cert_file / tls.key_file: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections, runs each handshake in its own task (a slow client never
/// holds up the others), logs and counts refusals, and passes the finished TLS streams
/// on. Ends on `shutdown` or when the receiver is dropped.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    out: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the ingest port");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, out, metrics) = (acceptor.clone(), out.clone(), metrics.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = out.send(Ok(stream)).await;
                }
                Ok(Err(e)) => {
                    let n = metrics.refuse("tls");
                    tracing::warn!(%peer, error = %e, refused_total = n, "TLS handshake refused");
                }
                Err(_) => {
                    let n = metrics.refuse("tls");
                    tracing::warn!(%peer, refused_total = n, "TLS handshake timed out");
                }
            }
        });
    }
}
