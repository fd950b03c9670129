//! TLS 1.3 with mutual x509 authentication, from a directory of PEM files
//! laid out as QEMU's `tls-creds-x509` object reads them:
//!
//! | file | who needs it |
//! |---|---|
//! | `ca-cert.pem` | both: the CA every peer's certificate must chain to |
//! | `server-cert.pem`, `server-key.pem` | a destination (it accepts) |
//! | `client-cert.pem`, `client-key.pem` | a source (it connects) |
//!
//! A host that both sends and receives migrations (`freehint vm`) has all
//! five. The source checks that the destination's certificate names the
//! host it connects to (its IP address, or the name given with
//! [`TlsConfig::with_peer_name`]); the destination checks that the
//! source's certificate chains to the CA. Only TLS 1.3 is offered, with
//! `rustls`'s `ring` cipher suites; no session tickets, no early data.
//!
//! The pinned mode ([`TlsConfig::pinned`]) needs no CA: each host has a
//! self-signed certificate (`host-cert.pem`, `host-key.pem`, made by
//! [`make_host_certificate`]) and accepts only peers whose certificate has
//! one of the SHA-256 fingerprints it is given, as SSH's `known_hosts`
//! does. Only fingerprints travel between hosts, never keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};

/// The CA's certificate, in a TLS directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// A destination's certificate chain.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// A destination's private key.
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// A source's certificate chain.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
/// A source's private key.
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// This host's self-signed certificate, in the pinned mode.
pub const HOST_CERT_FILE: &str = "host-cert.pem";
/// This host's private key, in the pinned mode.
pub const HOST_KEY_FILE: &str = "host-key.pem";

/// Why TLS could not be set up, or a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the TLS directory could not be read.
    #[error("{}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not what it should be (no PEM object of the right kind).
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The directory has neither a source's nor a destination's pair, or
    /// half of one.
    #[error("{0}")]
    Incomplete(String),
    /// The directory's certificates and keys do not make a TLS set-up
    /// (a key that does not match its certificate, say).
    #[error("TLS settings from {}", dir.display())]
    Config {
        /// The directory.
        dir: PathBuf,
        /// What rustls refused.
        source: rustls::Error,
    },
    /// The CA certificate cannot check peers.
    #[error("{}: cannot check peers against it: {message}", path.display())]
    Ca {
        /// The CA file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The name to expect in the destination's certificate is not a DNS
    /// name or an IP address.
    #[error("invalid TLS peer name {0:?}: give a DNS name or an IP address")]
    PeerName(String),
    /// This side has no certificate for its role.
    #[error("{0}")]
    NotForRole(String),
    /// The handshake failed: the peer's certificate, or the peer's verdict
    /// on ours, or a peer that does not speak TLS.
    #[error("TLS handshake failed: {0}{hint}", hint = handshake_hint(.0))]
    Handshake(rustls::Error),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the TLS handshake (it may have refused our certificate, or not speak TLS)")]
    ClosedInHandshake,
    /// The handshake took too long.
    #[error("timed out after {0} s in the TLS handshake")]
    Timeout(u64),
    /// The socket failed.
    #[error("TLS connection")]
    Io(#[source] std::io::Error),
    /// A test set of certificates could not be made.
    #[error("making test certificates")]
    Generate(#[from] rcgen::Error),
    /// A name for a test certificate is neither a DNS name nor an IP
    /// address.
    #[error("{0:?} is neither a DNS name nor an IP address")]
    CertificateName(String),
    /// A file could not be written.
    #[error("{}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What an operator most likely has to fix after handshake error `e`.
fn handshake_hint(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidMessage(_) => {
            " (the peer does not speak TLS: a source started without --tls-dir?)"
        }
        rustls::Error::NoCertificatesPresented => " (the peer showed no certificate)",
        rustls::Error::InvalidCertificate(_) => {
            " (the certificate is not from our CA, or not for the expected name)"
        }
        rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::AccessDenied,
        ) => {
            " (the peer refused our certificate: is it signed by the peer's CA, or pinned there with --tls-pin?)"
        }
        _ => "",
    }
}

/// TLS settings for migration connections (see the module's doc).
#[derive(Clone, Debug)]
pub struct TlsConfig {
    dir: PathBuf,
    client: Option<Arc<ClientConfig>>,
    server: Option<Arc<ServerConfig>>,
    peer_name: Option<ServerName<'static>>,
    pins: Vec<CertificateFingerprint>,
}

impl TlsConfig {
    /// Reads the TLS directory `dir`: the CA certificate, and whichever of
    /// the destination's and the source's pairs it has (at least one). As
    /// a destination, it accepts any source whose certificate chains to
    /// the CA.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::load(dir, Vec::new())
    }

    /// Like [`Self::from_dir`], but as a destination it accepts only a
    /// source whose certificate also names one of `source_names` (DNS
    /// names or IP addresses, in its subject alternative names), as
    /// QEMU's `tls-authz` list does.
    pub fn from_dir_accepting_only(dir: &Path, source_names: &[String]) -> Result<Self, TlsError> {
        let names = source_names
            .iter()
            .map(|n| ServerName::try_from(n.clone()).map_err(|_| TlsError::PeerName(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if names.is_empty() {
            return Err(TlsError::Incomplete(
                "no source name to accept (--tls-source-name)".into(),
            ));
        }
        Self::load(dir, names)
    }

    /// The pinned mode: reads this host's self-signed pair
    /// (`host-cert.pem`, `host-key.pem`) from `dir`, which serves both to
    /// send and to receive, and accepts as a peer (either way) only a
    /// certificate whose SHA-256 fingerprint is among `pins`. No CA, no
    /// names, no validity dates are checked: the fingerprint is the
    /// identity.
    pub fn pinned(dir: &Path, pins: &[CertificateFingerprint]) -> Result<Self, TlsError> {
        if pins.is_empty() {
            return Err(TlsError::Incomplete(
                "the pinned mode needs at least one peer fingerprint (--tls-pin)".into(),
            ));
        }
        let Some((certs, key)) = read_pair(dir, HOST_CERT_FILE, HOST_KEY_FILE)? else {
            return Err(TlsError::Incomplete(format!(
                "{}: no {HOST_CERT_FILE} and {HOST_KEY_FILE} for the pinned mode (`freehint tls init DIR --pinned` makes them)",
                dir.display()
            )));
        };
        let provider = Arc::new(provider());
        let verifier = Arc::new(PinnedPeerVerifier {
            pins: pins.to_vec(),
            algorithms: provider.signature_verification_algorithms,
        });
        let config = |source| TlsError::Config {
            dir: dir.to_path_buf(),
            source,
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config)?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(config)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            dir: dir.to_path_buf(),
            client: Some(Arc::new(client)),
            server: Some(Arc::new(server)),
            peer_name: None,
            pins: pins.to_vec(),
        })
    }

    fn load(dir: &Path, source_names: Vec<ServerName<'static>>) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_CERT_FILE);
        if !ca_path.exists() && dir.join(HOST_CERT_FILE).exists() {
            return Err(TlsError::Incomplete(format!(
                "{} holds a pinned host certificate ({HOST_CERT_FILE}) and no {CA_CERT_FILE}: give the peer's fingerprint with --tls-pin",
                dir.display()
            )));
        }
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&ca_path)? {
            roots.add(cert).map_err(|e| TlsError::Ca {
                path: ca_path.clone(),
                message: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(provider());
        let config = |source| TlsError::Config {
            dir: dir.to_path_buf(),
            source,
        };

        let server = match read_pair(dir, SERVER_CERT_FILE, SERVER_KEY_FILE)? {
            None => None,
            Some((certs, key)) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Ca {
                    path: ca_path.clone(),
                    message: e.to_string(),
                })?;
                let verifier: Arc<dyn ClientCertVerifier> = if source_names.is_empty() {
                    verifier
                } else {
                    Arc::new(NamedSourceVerifier {
                        chain: verifier,
                        names: source_names,
                    })
                };
                let mut c = ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(config)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(certs, key)
                    .map_err(config)?;
                c.send_tls13_tickets = 0;
                Some(Arc::new(c))
            }
        };
        let client = match read_pair(dir, CLIENT_CERT_FILE, CLIENT_KEY_FILE)? {
            None => None,
            Some((certs, key)) => {
                let mut c = ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(config)?
                    .with_root_certificates(roots.clone())
                    .with_client_auth_cert(certs, key)
                    .map_err(config)?;
                c.resumption = rustls::client::Resumption::disabled();
                Some(Arc::new(c))
            }
        };
        if server.is_none() && client.is_none() {
            return Err(TlsError::Incomplete(format!(
                "{}: no certificate to migrate with: a destination needs {SERVER_CERT_FILE} and {SERVER_KEY_FILE}, a source {CLIENT_CERT_FILE} and {CLIENT_KEY_FILE} (`freehint tls init DIR` makes a test set)",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            client,
            server,
            peer_name: None,
            pins: Vec::new(),
        })
    }

    /// Expects `name` (a DNS name or an IP address) in the destination's
    /// certificate, instead of the IP address connected to.
    pub fn with_peer_name(mut self, name: &str) -> Result<Self, TlsError> {
        let n = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::PeerName(name.to_string()))?;
        self.peer_name = Some(n);
        Ok(self)
    }

    /// The directory the settings came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The peers' fingerprints accepted in the pinned mode; empty with a
    /// CA.
    pub fn pins(&self) -> &[CertificateFingerprint] {
        &self.pins
    }

    /// Whether these settings can send a migration (they hold a source's
    /// certificate).
    pub fn can_send(&self) -> bool {
        self.client.is_some()
    }

    /// Whether these settings can receive a migration (they hold a
    /// destination's certificate).
    pub fn can_receive(&self) -> bool {
        self.server.is_some()
    }

    /// A source's TLS state for a connection to `dest`.
    pub(crate) fn connection_to(&self, dest: SocketAddr) -> Result<rustls::Connection, TlsError> {
        let config = self.client.clone().ok_or_else(|| {
            TlsError::NotForRole(format!(
                "{}: a source needs {CLIENT_CERT_FILE} and {CLIENT_KEY_FILE}",
                self.dir.display()
            ))
        })?;
        let name = self
            .peer_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(dest.ip().into()));
        let mut c = rustls::ClientConnection::new(config, name).map_err(TlsError::Handshake)?;
        c.set_buffer_limit(Some(super::TLS_SEND_BUFFER_BYTES));
        Ok(c.into())
    }

    /// A destination's TLS state for an accepted connection.
    pub(crate) fn accepted_connection(&self) -> Result<rustls::Connection, TlsError> {
        let config = self.server.clone().ok_or_else(|| {
            TlsError::NotForRole(format!(
                "{}: a destination needs {SERVER_CERT_FILE} and {SERVER_KEY_FILE}",
                self.dir.display()
            ))
        })?;
        let mut c = rustls::ServerConnection::new(config).map_err(TlsError::Handshake)?;
        c.set_buffer_limit(Some(super::TLS_SEND_BUFFER_BYTES));
        Ok(c.into())
    }

    /// Checks that these settings can serve `role` before anything
    /// connects: an error naming the missing files.
    pub fn check_role(&self, sending: bool) -> Result<(), TlsError> {
        if sending {
            self.connection_to(SocketAddr::from(([127, 0, 0, 1], 0)))
                .map(drop)
        } else {
            self.accepted_connection().map(drop)
        }
    }
}

/// A destination's check of a source's certificate: the CA's chain
/// (`chain`), then one of `names` among the certificate's names.
#[derive(Debug)]
struct NamedSourceVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for NamedSourceVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let mut refusal = None;
        for name in &self.names {
            match cert.verify_is_valid_for_subject_name(name) {
                Ok(()) => return Ok(verified),
                Err(e) => refusal = Some(e),
            }
        }
        Err(rustls::Error::InvalidCertificate(match refusal {
            Some(webpki::Error::CertNotValidForName(c)) => {
                rustls::CertificateError::NotValidForNameContext {
                    expected: c.expected,
                    presented: c.presented,
                }
            }
            _ => rustls::CertificateError::NotValidForName,
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The SHA-256 digest of a certificate's DER encoding: a peer's identity
/// in the pinned mode. Written as 32 colon-separated hex bytes, as
/// `openssl x509 -noout -fingerprint -sha256` prints it; read with or
/// without colons, a `sha256:` prefix or openssl's whole line.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertificateFingerprint([u8; 32]);

impl CertificateFingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    /// The fingerprint of the first certificate in the PEM file `path`.
    pub fn of_file(path: &Path) -> Result<Self, TlsError> {
        Ok(Self::of(&read_certs(path)?[0]))
    }
}

impl std::fmt::Display for CertificateFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CertificateFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256 {self}")
    }
}

/// A fingerprint that is not 32 hex bytes.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a SHA-256 fingerprint: give 64 hex digits, with or without colons, as `freehint tls fingerprint DIR` prints it")]
pub struct BadFingerprint(String);

impl std::str::FromStr for CertificateFingerprint {
    type Err = BadFingerprint;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadFingerprint(text.to_string());
        let mut hex = text.trim();
        // openssl's "sha256 Fingerprint=AB:…" or "SHA256:AB…".
        if let Some((_, rest)) = hex.split_once('=') {
            hex = rest;
        } else if hex.len() > 7 && hex[..7].eq_ignore_ascii_case("sha256:") {
            hex = &hex[7..];
        }
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            bytes[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

/// A certificate whose fingerprint is not pinned.
#[derive(Debug, thiserror::Error)]
#[error("the peer's certificate has SHA-256 fingerprint {0}, which is not among those given with --tls-pin")]
struct NotPinned(CertificateFingerprint);

/// The pinned mode's check of a peer, as source or destination: its
/// certificate's fingerprint is among `pins`, and it signed the handshake
/// with that certificate's key.
#[derive(Debug)]
struct PinnedPeerVerifier {
    pins: Vec<CertificateFingerprint>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PinnedPeerVerifier {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fingerprint = CertificateFingerprint::of(cert);
        if self.pins.contains(&fingerprint) {
            Ok(())
        } else {
            Err(rustls::Error::Other(rustls::OtherError(Arc::new(
                NotPinned(fingerprint),
            ))))
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedPeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// rustls's `ring` provider with AES-128-GCM first: on a CPU with AES
/// instructions it is the fastest TLS 1.3 suite (about 9% faster than
/// AES-256-GCM here, `openssl speed`), and the cipher's CPU time is most
/// of what TLS costs a migration (docs/SECURITY.md).
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// A certificate chain and its key, if `dir` has both files; half a pair
/// is an error.
fn read_pair(
    dir: &Path,
    cert_file: &str,
    key_file: &str,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => return Ok(None),
        (true, false) | (false, true) => {
            return Err(TlsError::Incomplete(format!(
                "{}: {cert_file} and {key_file} go together; only one of them is there",
                dir.display()
            )))
        }
        (true, true) => {}
    }
    let certs = read_certs(&cert_path)?;
    let pem = read_file(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        what: format!("no private key: {e}"),
    })?;
    Ok(Some((certs, key)))
}

/// The name a test set's source certificate holds ([`make_test_set`]).
pub const TEST_SOURCE_NAME: &str = "freehint-source";

/// The CA's private key, in a test set ([`make_test_set`]).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// The files [`make_test_set`] writes.
pub const TEST_SET_FILES: [&str; 6] = [
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
];

/// Writes a test set into `dir` (made if missing; files there are
/// replaced): a new CA (ECDSA P-256), a destination certificate naming
/// localhost, 127.0.0.1, ::1 and each of `names`, and a source
/// certificate, each signed by the CA. Private keys are written 0600.
/// `freehint tls init` runs this; for production, use your own CA.
pub fn make_test_set(dir: &Path, names: &[String]) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "freehint test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut server_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !server_names.contains(n) {
            server_names.push(n.clone());
        }
    }
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server.subject_alt_names = server_names
        .iter()
        .map(|n| subject_alt_name(n))
        .collect::<Result<_, _>>()?;
    server
        .distinguished_name
        .push(DnType::CommonName, "freehint destination");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(vec![TEST_SOURCE_NAME.to_string()])?;
    client
        .distinguished_name
        .push(DnType::CommonName, "freehint source");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key)?;

    write_pem(dir, CA_CERT_FILE, &ca_cert.pem(), false)?;
    write_pem(dir, CA_KEY_FILE, &ca_key.serialize_pem(), true)?;
    write_pem(dir, SERVER_CERT_FILE, &server_cert.pem(), false)?;
    write_pem(dir, SERVER_KEY_FILE, &server_key.serialize_pem(), true)?;
    write_pem(dir, CLIENT_CERT_FILE, &client_cert.pem(), false)?;
    write_pem(dir, CLIENT_KEY_FILE, &client_key.serialize_pem(), true)?;
    Ok(())
}

/// The files [`make_host_certificate`] writes.
pub const HOST_FILES: [&str; 2] = [HOST_CERT_FILE, HOST_KEY_FILE];

/// Writes this host's self-signed certificate and key for the pinned mode
/// into `dir` (made if missing; files there are replaced; the key 0600),
/// and returns the certificate's fingerprint, which the peers pin.
pub fn make_host_certificate(dir: &Path) -> Result<CertificateFingerprint, TlsError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "freehint host (pinned)");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.self_signed(&key)?;
    write_pem(dir, HOST_CERT_FILE, &cert.pem(), false)?;
    write_pem(dir, HOST_KEY_FILE, &key.serialize_pem(), true)?;
    Ok(CertificateFingerprint::of(cert.der()))
}

fn subject_alt_name(name: &str) -> Result<rcgen::SanType, TlsError> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => rcgen::SanType::IpAddress(ip),
        Err(_) => rcgen::SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|_| TlsError::CertificateName(name.to_string()))?,
        ),
    })
}

fn write_pem(dir: &Path, file: &str, text: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    let write = || -> std::io::Result<()> {
        // A key replaced in place keeps its old mode: start afresh.
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)?
            .write_all(text.as_bytes())
    };
    write().map_err(|source| TlsError::Write {
        path: path.clone(),
        source,
    })
}
