//! HTTPS on the balancer's port: the certificate chain and private key are read from PEM files
//! when the balancer starts, and again when told ([`Certificates::reload`], on SIGHUP): a
//! renewed certificate is taken by the next handshakes, without a restart; a pair that does not
//! load is refused and the one in use kept. Clients get HTTP/2 or HTTP/1.1, as they choose in
//! the handshake (ALPN; HTTP/1.1 alone with `http2` off), over TLS 1.2 or 1.3 (rustls); the
//! handshake must end within the time a client has to send its headers, and a client that fails
//! it never reaches a front-end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the balancer cannot serve HTTPS with the files it was given.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read the TLS certificate {path}: {reason}; give a PEM file with the server's certificate first, then its chain"
    )]
    Certificate { path: PathBuf, reason: String },
    #[error(
        "cannot read the TLS private key {path}: {reason}; give a PEM file with the certificate's key (PKCS#8, PKCS#1 or SEC1), unencrypted"
    )]
    Key { path: PathBuf, reason: String },
    #[error(
        "the TLS key {key} does not go with the certificate {cert}: {reason}; give the key the certificate was issued for"
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The certificate and key files of the client port, and the TLS config made of them that new
/// handshakes use.
#[derive(Debug)]
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    http2: bool,
    config: ArcSwap<rustls::ServerConfig>,
}

impl Certificates {
    /// Reads `cert` and `key`: an error names the file that cannot work. `http2`: whether
    /// clients may choose HTTP/2.
    pub fn load(cert: &Path, key: &Path, http2: bool) -> Result<Certificates, TlsError> {
        Ok(Certificates {
            config: ArcSwap::new(server_config(cert, key, http2)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            http2,
        })
    }

    /// The config the next handshake uses.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// Reads the files again: the next handshakes use what they hold now (connections already
    /// open keep theirs). When they do not make a config, nothing changes and the error says
    /// which file is wrong.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.config
            .store(server_config(&self.cert, &self.key, self.http2)?);
        Ok(())
    }

    /// The certificate file and the key file.
    pub fn files(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

/// The server side of TLS for client connections, from a certificate chain and its key.
pub fn server_config(
    cert: &Path,
    key: &Path,
    http2: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certificate = |reason: String| TlsError::Certificate {
        path: cert.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| certificate(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(certificate("it holds no CERTIFICATE block".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
        })
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    // A client offering neither is refused in the handshake, not misunderstood after it.
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/tls")
            .join(name)
    }

    #[test]
    fn a_certificate_and_its_key_make_a_config_and_bad_files_say_what_is_wrong() {
        let config = server_config(&fixture("cert.pem"), &fixture("key.pem"), true).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let config = server_config(&fixture("cert.pem"), &fixture("key.pem"), false).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);

        let e = server_config(&fixture("none.pem"), &fixture("key.pem"), true).unwrap_err();
        assert!(matches!(e, TlsError::Certificate { .. }), "{e}");
        assert!(e.to_string().contains("none.pem"), "{e}");
        // A key where the certificate should be: no certificate in it.
        let e = server_config(&fixture("key.pem"), &fixture("key.pem"), true).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
        let e = server_config(&fixture("cert.pem"), &fixture("cert.pem"), true).unwrap_err();
        assert!(matches!(e, TlsError::Key { .. }), "{e}");
        let e = server_config(&fixture("cert.pem"), &fixture("other-key.pem"), true).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn a_reload_takes_renewed_files_and_keeps_the_config_when_they_do_not_work() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::copy(fixture("cert.pem"), &cert).unwrap();
        std::fs::copy(fixture("key.pem"), &key).unwrap();
        let certificates = Certificates::load(&cert, &key, true).unwrap();
        let first = certificates.config();

        // Half renewed: the new certificate, the old key. Refused; the config stays.
        std::fs::copy(fixture("renewed-cert.pem"), &cert).unwrap();
        let e = certificates.reload().unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(Arc::ptr_eq(&first, &certificates.config()));

        std::fs::copy(fixture("renewed-key.pem"), &key).unwrap();
        certificates.reload().unwrap();
        assert!(!Arc::ptr_eq(&first, &certificates.config()));
        assert_eq!(certificates.files(), (cert.as_path(), key.as_path()));
    }
}
