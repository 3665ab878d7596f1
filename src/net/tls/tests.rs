//! Tests for cluster mTLS: real handshakes over loopback with certificates made per run.
//!
//! Refusals are asserted on the side that must refuse, with the rustls error that names the
//! reason, so a test cannot pass because the handshake failed for some unrelated cause.
//! Each negative test has a positive twin built the same way.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::net::tls::{
    ClusterTls, MtlsMode, PeerIdentity, SHARED_SERVER_NAME, TlsSettings, ensure_dev_cert,
    generate_shared_cert, rustls_error, source,
};

/// Generous for a loaded 2-core machine; a handshake takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(20);

// === fixtures ===

struct Pem {
    cert: String,
    key: String,
}

#[derive(Clone, Copy)]
enum Validity {
    Current,
    Expired,
    NotYetValid,
}

fn params(common_name: &str, sans: &[&str], validity: Validity) -> rcgen::CertificateParams {
    let sans: Vec<String> = sans.iter().map(|san| (*san).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    match validity {
        // rcgen's defaults: 1975 to 4096.
        Validity::Current => {}
        Validity::Expired => {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        Validity::NotYetValid => {
            params.not_before = rcgen::date_time_ymd(2090, 1, 1);
            params.not_after = rcgen::date_time_ymd(2091, 1, 1);
        }
    }
    params
}

fn self_signed(common_name: &str, sans: &[&str], validity: Validity) -> Pem {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let cert = params(common_name, sans, validity)
        .self_signed(&key_pair)
        .unwrap();
    Pem {
        cert: cert.pem(),
        key: key_pair.serialize_pem(),
    }
}

/// What `kong hybrid gen_cert` makes: P-384, CN `kong_clustering`, no SAN.
fn kong_style_cert() -> Pem {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = params(SHARED_SERVER_NAME, &[], Validity::Current)
        .self_signed(&key_pair)
        .unwrap();
    Pem {
        cert: cert.pem(),
        key: key_pair.serialize_pem(),
    }
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca(common_name: &str) -> Ca {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = params(common_name, &[], Validity::Current);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key_pair).unwrap();
    Ca {
        issuer: rcgen::Issuer::new(params, key_pair),
        pem: cert.pem(),
    }
}

fn issue(ca: &Ca, common_name: &str, sans: &[&str]) -> Pem {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let cert = params(common_name, sans, Validity::Current)
        .signed_by(&key_pair, &ca.issuer)
        .unwrap();
    Pem {
        cert: cert.pem(),
        key: key_pair.serialize_pem(),
    }
}

fn shared_settings(pem: &Pem) -> TlsSettings {
    TlsSettings::shared(pem.cert.clone(), pem.key.clone())
}

fn pki_settings(
    pem: &Pem,
    ca: &Ca,
    server_name: Option<&str>,
    allowed_common_names: &[&str],
) -> TlsSettings {
    TlsSettings {
        mode: MtlsMode::Pki,
        cert: pem.cert.clone(),
        key: pem.key.clone(),
        ca_cert: Some(ca.pem.clone()),
        server_name: server_name.map(str::to_owned),
        allowed_common_names: allowed_common_names
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
    }
}

fn load(settings: &TlsSettings) -> ClusterTls {
    ClusterTls::load(settings).unwrap()
}

/// A certificate chain paired with any key, bypassing the key/cert consistency check: this is
/// what an attacker who copied the public certificate holds.
fn certified_key(cert_pem: &str, key_pem: &str) -> Arc<CertifiedKey> {
    let chain = source::parse_certs("cert", cert_pem.as_bytes()).unwrap();
    let key = source::parse_key("key", key_pem.as_bytes()).unwrap();
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .unwrap();
    Arc::new(CertifiedKey::new(chain, signing_key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(tls12_only: bool) -> &'static [&'static SupportedProtocolVersion] {
    static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
    if tls12_only {
        TLS12_ONLY
    } else {
        rustls::DEFAULT_VERSIONS
    }
}

/// A client that trusts any server certificate (signatures still checked) and presents
/// `client_cert`, or nothing. Isolates the server's checks from the client's.
fn lenient_client(client_cert: Option<Arc<CertifiedKey>>, tls12_only: bool) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(tls12_only))
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let config = match client_cert {
        Some(certified_key) => {
            builder.with_client_cert_resolver(Arc::new(FixedClientCert(certified_key)))
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A server that asks for no client certificate and presents `server_cert`.
fn lenient_server(server_cert: Arc<CertifiedKey>, tls12_only: bool) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(tls12_only))
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedServerCert(server_cert)));
    Arc::new(config)
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

// === handshake harness ===

/// What each side saw. The server side includes a ping/pong exchange, so `Ok` on both sides
/// means both ends really accepted the other (in TLS 1.3 a client finishes its handshake before
/// the server has checked the client certificate).
struct Outcome {
    server: io::Result<Accepted>,
    client: io::Result<()>,
}

#[derive(Debug)]
struct Accepted {
    /// `None` only for the raw servers that ask for no client certificate.
    identity: Option<PeerIdentity>,
    alpn: Option<Vec<u8>>,
}

impl Accepted {
    #[track_caller]
    fn identity(&self) -> &PeerIdentity {
        self.identity
            .as_ref()
            .expect("the server saw no client certificate")
    }
}

/// CP `server` and DP `client` using `ClusterTls::accept` / `ClusterTls::connect`.
async fn handshake(server: &ClusterTls, client: &ClusterTls, host: &str) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = async {
        let (tcp, _) = listener.accept().await?;
        let (mut tls, identity) = server.accept(tcp).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        answer_ping(&mut tls).await?;
        Ok(Accepted {
            identity: Some(identity),
            alpn,
        })
    };
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = client.connect(tcp, host).await?;
        send_ping(&mut tls).await
    };
    let (server, client) =
        tokio::time::timeout(TIMEOUT, async { tokio::join!(server_side, client_side) })
            .await
            .expect("handshake timed out");
    Outcome { server, client }
}

/// The server of [`raw_handshake`].
enum Server<'a> {
    /// A CP, through `ClusterTls::accept`.
    Cluster(&'a ClusterTls),
    /// A misbehaving server.
    Raw(Arc<ServerConfig>),
}

/// A handshake with a raw client configuration (or a raw server), for misbehaving peers.
/// The client sends the shared-mode server name.
async fn raw_handshake(server: Server<'_>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = async {
        let (tcp, _) = listener.accept().await?;
        match server {
            Server::Cluster(cluster_tls) => {
                let (mut tls, identity) = cluster_tls.accept(tcp).await?;
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                answer_ping(&mut tls).await?;
                Ok(Accepted {
                    identity: Some(identity),
                    alpn,
                })
            }
            Server::Raw(config) => {
                let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
                let identity = PeerIdentity::from_connection(tls.get_ref().1);
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                answer_ping(&mut tls).await?;
                Ok(Accepted { identity, alpn })
            }
        }
    };
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(shared_name(), tcp)
            .await?;
        send_ping(&mut tls).await
    };
    let (server, client) =
        tokio::time::timeout(TIMEOUT, async { tokio::join!(server_side, client_side) })
            .await
            .expect("handshake timed out");
    Outcome { server, client }
}

async fn answer_ping<IO: AsyncRead + AsyncWrite + Unpin>(tls: &mut IO) -> io::Result<()> {
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    tls.write_all(b"pong").await?;
    tls.flush().await
}

async fn send_ping<IO: AsyncRead + AsyncWrite + Unpin>(tls: &mut IO) -> io::Result<()> {
    tls.write_all(b"ping").await?;
    tls.flush().await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

fn shared_name() -> ServerName<'static> {
    ServerName::try_from(SHARED_SERVER_NAME).unwrap()
}

#[track_caller]
fn assert_ok(outcome: &Outcome) -> &Accepted {
    if let Err(err) = &outcome.client {
        panic!("client failed: {err}");
    }
    match &outcome.server {
        Ok(accepted) => accepted,
        Err(err) => panic!("server failed: {err}"),
    }
}

/// The certificate error behind a handshake failure, if that is what it was.
#[track_caller]
fn certificate_error(side: &str, res: &io::Result<impl std::fmt::Debug>) -> CertificateError {
    match res {
        Ok(value) => panic!("{side} unexpectedly succeeded: {value:?}"),
        Err(err) => match rustls_error(err) {
            Some(rustls::Error::InvalidCertificate(cert_err)) => cert_err.clone(),
            _ => panic!("{side} failed, but not on a certificate: {err}"),
        },
    }
}

#[track_caller]
fn assert_server_refused(outcome: &Outcome, expected: fn(&CertificateError) -> bool) {
    let cert_err = certificate_error("server", &outcome.server);
    assert!(expected(&cert_err), "unexpected server error: {cert_err:?}");
    assert!(outcome.client.is_err(), "the client must not get through");
}

#[track_caller]
fn assert_client_refused(outcome: &Outcome, expected: fn(&CertificateError) -> bool) {
    let cert_err = certificate_error("client", &outcome.client);
    assert!(expected(&cert_err), "unexpected client error: {cert_err:?}");
    assert!(outcome.server.is_err(), "the server must not get through");
}

fn is_access_denied(err: &CertificateError) -> bool {
    matches!(err, CertificateError::ApplicationVerificationFailure)
}

fn is_expired(err: &CertificateError) -> bool {
    matches!(err, CertificateError::ExpiredContext { .. })
}

fn is_not_yet_valid(err: &CertificateError) -> bool {
    matches!(err, CertificateError::NotValidYetContext { .. })
}

fn is_bad_signature(err: &CertificateError) -> bool {
    matches!(err, CertificateError::BadSignature)
}

fn is_unknown_issuer(err: &CertificateError) -> bool {
    matches!(err, CertificateError::UnknownIssuer)
}

fn is_wrong_name(err: &CertificateError) -> bool {
    matches!(err, CertificateError::NotValidForNameContext { .. })
}

// === shared mode ===

#[tokio::test]
async fn shared_same_certificate_connects_and_cp_sees_dp_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = generate_shared_cert(dir.path()).unwrap();
    let settings = TlsSettings {
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        ..shared_settings(&self_signed("unused", &[], Validity::Current))
    };
    let cp = load(&settings);
    let dp = load(&settings);

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;

    let accepted = assert_ok(&outcome);
    assert_eq!(*accepted.identity(), *dp.identity());
    assert_eq!(
        accepted.identity().common_name.as_deref(),
        Some(SHARED_SERVER_NAME)
    );
    assert_eq!(accepted.alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn shared_kong_style_certificate_without_san_connects() {
    let pem = kong_style_cert();
    let cp = load(&shared_settings(&pem));
    let dp = load(&shared_settings(&pem));

    let outcome = handshake(&cp, &dp, "cp.example.test").await;

    let accepted = assert_ok(&outcome);
    assert_eq!(accepted.identity().sans, Vec::<String>::new());
    assert_eq!(
        accepted.identity().common_name.as_deref(),
        Some(SHARED_SERVER_NAME)
    );
}

#[tokio::test]
async fn shared_dp_refuses_cp_with_a_different_certificate() {
    let cp = load(&shared_settings(&self_signed(
        SHARED_SERVER_NAME,
        &[SHARED_SERVER_NAME],
        Validity::Current,
    )));
    let dp = load(&shared_settings(&self_signed(
        SHARED_SERVER_NAME,
        &[SHARED_SERVER_NAME],
        Validity::Current,
    )));

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;

    assert_client_refused(&outcome, is_access_denied);
}

#[tokio::test]
async fn shared_cp_refuses_dp_with_a_different_certificate() {
    let cp_pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let other = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let cp = load(&shared_settings(&cp_pem));

    let outcome = raw_handshake(
        Server::Cluster(&cp),
        lenient_client(Some(certified_key(&other.cert, &other.key)), false),
    )
    .await;
    assert_server_refused(&outcome, is_access_denied);

    // The same client presenting the right certificate gets through.
    let outcome = raw_handshake(
        Server::Cluster(&cp),
        lenient_client(Some(certified_key(&cp_pem.cert, &cp_pem.key)), false),
    )
    .await;
    assert_ok(&outcome);
}

#[tokio::test]
async fn shared_cp_refuses_dp_without_client_certificate() {
    let cp = load(&shared_settings(&self_signed(
        SHARED_SERVER_NAME,
        &[],
        Validity::Current,
    )));

    let outcome = raw_handshake(Server::Cluster(&cp), lenient_client(None, false)).await;

    match &outcome.server {
        Err(err) => assert!(
            matches!(
                rustls_error(err),
                Some(rustls::Error::NoCertificatesPresented)
            ),
            "unexpected server error: {err}"
        ),
        Ok(accepted) => panic!("server accepted a client without certificate: {accepted:?}"),
    }
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn shared_expired_certificate_is_refused_by_both_sides() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Expired);
    let cp = load(&shared_settings(&pem));
    let dp = load(&shared_settings(&pem));

    // The DP checks the CP first.
    let outcome = handshake(&cp, &dp, "127.0.0.1").await;
    assert_client_refused(&outcome, is_expired);

    // The CP refuses the expired certificate on its own too.
    let outcome = raw_handshake(
        Server::Cluster(&cp),
        lenient_client(Some(certified_key(&pem.cert, &pem.key)), false),
    )
    .await;
    assert_server_refused(&outcome, is_expired);
}

#[tokio::test]
async fn shared_not_yet_valid_certificate_is_refused() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::NotYetValid);
    let cp = load(&shared_settings(&pem));
    let dp = load(&shared_settings(&pem));

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;
    assert_client_refused(&outcome, is_not_yet_valid);

    let outcome = raw_handshake(
        Server::Cluster(&cp),
        lenient_client(Some(certified_key(&pem.cert, &pem.key)), false),
    )
    .await;
    assert_server_refused(&outcome, is_not_yet_valid);
}

/// Holding the public certificate is not enough: the DP must sign with the certificate's key.
#[tokio::test]
async fn shared_cp_refuses_dp_with_right_certificate_but_another_key() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let stolen = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let cp = load(&shared_settings(&pem));

    for tls12_only in [false, true] {
        let outcome = raw_handshake(
            Server::Cluster(&cp),
            lenient_client(Some(certified_key(&pem.cert, &stolen.key)), tls12_only),
        )
        .await;
        assert_server_refused(&outcome, is_bad_signature);

        // The same client with the right key gets through.
        let outcome = raw_handshake(
            Server::Cluster(&cp),
            lenient_client(Some(certified_key(&pem.cert, &pem.key)), tls12_only),
        )
        .await;
        assert_ok(&outcome);
    }
}

/// The DP side of the same attack: an impostor CP with a copy of the certificate.
#[tokio::test]
async fn shared_dp_refuses_cp_with_right_certificate_but_another_key() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let stolen = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let dp = load(&shared_settings(&pem));

    for tls12_only in [false, true] {
        let outcome = raw_handshake(
            Server::Raw(lenient_server(
                certified_key(&pem.cert, &stolen.key),
                tls12_only,
            )),
            dp.client_config(),
        )
        .await;
        assert_client_refused(&outcome, is_bad_signature);

        let outcome = raw_handshake(
            Server::Raw(lenient_server(
                certified_key(&pem.cert, &pem.key),
                tls12_only,
            )),
            dp.client_config(),
        )
        .await;
        assert_ok(&outcome);
    }
}

// === pki mode ===

struct PkiFixture {
    ca: Ca,
    cp: Pem,
}

fn pki_fixture() -> PkiFixture {
    let ca = ca("deltaplane test CA");
    let cp = issue(&ca, "cp", &["cp.example.test"]);
    PkiFixture { ca, cp }
}

#[tokio::test]
async fn pki_ca_signed_dp_connects() {
    let fixture = pki_fixture();
    let cp = load(&pki_settings(&fixture.cp, &fixture.ca, None, &[]));
    let dp = load(&pki_settings(
        &issue(&fixture.ca, "dp-1", &[]),
        &fixture.ca,
        Some("cp.example.test"),
        &[],
    ));

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;

    let accepted = assert_ok(&outcome);
    assert_eq!(accepted.identity().common_name.as_deref(), Some("dp-1"));
    assert_eq!(*accepted.identity(), *dp.identity());
}

#[tokio::test]
async fn pki_cp_refuses_dp_from_another_ca() {
    let fixture = pki_fixture();
    let other_ca = ca("other CA");
    let cp = load(&pki_settings(&fixture.cp, &fixture.ca, None, &[]));
    // The DP trusts the right CA for the CP, but its own certificate comes from another CA.
    let dp = load(&TlsSettings {
        ca_cert: Some(fixture.ca.pem.clone()),
        ..pki_settings(
            &issue(&other_ca, "dp-1", &[]),
            &other_ca,
            Some("cp.example.test"),
            &[],
        )
    });

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;

    assert_server_refused(&outcome, is_unknown_issuer);
}

#[tokio::test]
async fn pki_allowed_common_names_restrict_dps() {
    let fixture = pki_fixture();
    let cp = load(&pki_settings(
        &fixture.cp,
        &fixture.ca,
        None,
        &["dp-1", "dp-san.example.test"],
    ));
    let dp = |common_name: &str, sans: &[&str]| {
        load(&pki_settings(
            &issue(&fixture.ca, common_name, sans),
            &fixture.ca,
            Some("cp.example.test"),
            &[],
        ))
    };

    let outcome = handshake(&cp, &dp("dp-1", &[]), "127.0.0.1").await;
    assert_ok(&outcome);

    let outcome = handshake(&cp, &dp("dp-2", &["dp-2.example.test"]), "127.0.0.1").await;
    assert_server_refused(&outcome, is_access_denied);

    // An IP address is not a name: it does not match even if listed.
    let cp_by_ip = load(&pki_settings(&fixture.cp, &fixture.ca, None, &["10.1.2.3"]));
    let outcome = handshake(&cp_by_ip, &dp("dp-4", &["10.1.2.3"]), "127.0.0.1").await;
    assert_server_refused(&outcome, is_access_denied);

    // A DNS name matches as well as the CN.
    let outcome = handshake(&cp, &dp("dp-3", &["DP-SAN.example.test"]), "127.0.0.1").await;
    let accepted = assert_ok(&outcome);
    assert_eq!(accepted.identity().sans, vec!["DP-SAN.example.test"]);
}

#[tokio::test]
async fn pki_dp_refuses_cp_whose_certificate_does_not_match_the_server_name() {
    let fixture = pki_fixture();
    let cp = load(&pki_settings(&fixture.cp, &fixture.ca, None, &[]));
    let dp_pem = issue(&fixture.ca, "dp-1", &[]);
    let dp = load(&pki_settings(
        &dp_pem,
        &fixture.ca,
        Some("other.example.test"),
        &[],
    ));

    let outcome = handshake(&cp, &dp, "cp.example.test").await;
    assert_client_refused(&outcome, is_wrong_name);

    // Without `server_name` the host is checked: right host first, then an IP not in the cert.
    let dp = load(&pki_settings(&dp_pem, &fixture.ca, None, &[]));
    let outcome = handshake(&cp, &dp, "cp.example.test").await;
    assert_ok(&outcome);
    let outcome = handshake(&cp, &dp, "127.0.0.1").await;
    assert_client_refused(&outcome, is_wrong_name);
}

#[tokio::test]
async fn pki_dp_refuses_cp_from_another_ca() {
    let fixture = pki_fixture();
    let other_ca = ca("other CA");
    let cp = load(&TlsSettings {
        ca_cert: Some(fixture.ca.pem.clone()),
        ..pki_settings(
            &issue(&other_ca, "cp", &["cp.example.test"]),
            &other_ca,
            None,
            &[],
        )
    });
    let dp = load(&pki_settings(
        &issue(&fixture.ca, "dp-1", &[]),
        &fixture.ca,
        Some("cp.example.test"),
        &[],
    ));

    let outcome = handshake(&cp, &dp, "127.0.0.1").await;

    assert_client_refused(&outcome, is_unknown_issuer);
}

// === server names ===

#[test]
fn server_name_for_follows_the_mode() {
    let shared = load(&shared_settings(&kong_style_cert()));
    assert_eq!(shared.server_name_for("cp.example.test"), shared_name());

    let fixture = pki_fixture();
    let with_name = load(&pki_settings(
        &fixture.cp,
        &fixture.ca,
        Some("cp.example.test"),
        &[],
    ));
    assert_eq!(
        with_name.server_name_for("10.0.0.1"),
        ServerName::try_from("cp.example.test").unwrap()
    );

    let by_host = load(&pki_settings(&fixture.cp, &fixture.ca, None, &[]));
    assert_eq!(
        by_host.server_name_for("cp2.example.test"),
        ServerName::try_from("cp2.example.test").unwrap()
    );
    assert_eq!(
        by_host.server_name_for("[::1]"),
        ServerName::try_from("::1").unwrap()
    );
    assert!(by_host.try_server_name_for("not a host").is_err());
    assert_eq!(
        by_host.server_name_for("not a host"),
        ServerName::try_from("invalid").unwrap()
    );
}

// === loading ===

#[test]
fn load_accepts_path_pem_text_and_base64_pem() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("c.crt");
    let key_path = dir.path().join("c.key");
    std::fs::write(&cert_path, &pem.cert).unwrap();
    std::fs::write(&key_path, &pem.key).unwrap();
    let base64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);

    let from_text = load(&shared_settings(&pem));
    let from_path = load(&TlsSettings {
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        ..shared_settings(&pem)
    });
    let from_base64 = load(&TlsSettings {
        cert: base64(&pem.cert),
        key: base64(&pem.key),
        ..shared_settings(&pem)
    });

    let expected =
        PeerIdentity::from_der(&source::parse_certs("cert", pem.cert.as_bytes()).unwrap()[0])
            .unwrap();
    assert_eq!(*from_text.identity(), expected);
    assert_eq!(*from_path.identity(), expected);
    assert_eq!(*from_base64.identity(), expected);

    // pki: the CA may be given the same three ways.
    let fixture = pki_fixture();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &fixture.ca.pem).unwrap();
    for ca_cert in [
        fixture.ca.pem.clone(),
        ca_path.display().to_string(),
        base64(&fixture.ca.pem),
    ] {
        let settings = TlsSettings {
            ca_cert: Some(ca_cert),
            ..pki_settings(&fixture.cp, &fixture.ca, None, &[])
        };
        ClusterTls::load(&settings).unwrap();
    }
}

#[track_caller]
fn assert_load_error(settings: &TlsSettings, expected: &str) {
    match ClusterTls::load(settings) {
        Ok(tls) => panic!("load unexpectedly succeeded: {tls:?}"),
        Err(err) => {
            let message = format!("{err:#}");
            assert!(
                message.contains(expected),
                "error `{message}` does not contain `{expected}`"
            );
        }
    }
}

#[test]
fn load_rejects_a_key_that_does_not_match_the_certificate() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let other = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    assert_load_error(
        &TlsSettings {
            key: other.key,
            ..shared_settings(&pem)
        },
        "key does not match cert",
    );
}

#[test]
fn load_reports_clear_errors() {
    let pem = self_signed(SHARED_SERVER_NAME, &[], Validity::Current);
    let fixture = pki_fixture();
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing.crt");

    let cases: Vec<(TlsSettings, String)> = vec![
        (
            TlsSettings {
                cert: missing.display().to_string(),
                ..shared_settings(&pem)
            },
            format!("cert: file {} does not exist", missing.display()),
        ),
        (
            TlsSettings {
                key: missing.display().to_string(),
                ..shared_settings(&pem)
            },
            format!("key: file {} does not exist", missing.display()),
        ),
        (
            TlsSettings {
                cert: not_pem.display().to_string(),
                ..shared_settings(&pem)
            },
            "does not contain PEM data".to_owned(),
        ),
        (
            TlsSettings {
                cert: pem.key.clone(),
                ..shared_settings(&pem)
            },
            "cert: no CERTIFICATE block".to_owned(),
        ),
        (
            TlsSettings {
                key: pem.cert.clone(),
                ..shared_settings(&pem)
            },
            "key: no unencrypted private key".to_owned(),
        ),
        (
            TlsSettings {
                cert: String::new(),
                ..shared_settings(&pem)
            },
            "cert is empty".to_owned(),
        ),
        (
            TlsSettings {
                cert: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
                ..shared_settings(&pem)
            },
            "not a valid X.509 certificate".to_owned(),
        ),
        (
            TlsSettings {
                ca_cert: None,
                ..pki_settings(&fixture.cp, &fixture.ca, None, &[])
            },
            "ca_cert must be set".to_owned(),
        ),
        (
            TlsSettings {
                ca_cert: Some(missing.display().to_string()),
                ..pki_settings(&fixture.cp, &fixture.ca, None, &[])
            },
            "ca_cert: file".to_owned(),
        ),
        (
            pki_settings(&fixture.cp, &fixture.ca, Some("not a name"), &[]),
            "server_name `not a name` is not a valid".to_owned(),
        ),
        (
            TlsSettings {
                allowed_common_names: vec!["dp-1".to_owned()],
                ..shared_settings(&pem)
            },
            "allowed_common_names applies only to mTLS mode `pki`".to_owned(),
        ),
    ];
    for (settings, expected) in &cases {
        assert_load_error(settings, expected);
    }

    // Key material is never echoed, neither by `Debug` nor in errors.
    let debug = format!("{:?}", shared_settings(&pem));
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    let err = ClusterTls::load(&TlsSettings {
        cert: pem.key.replace("-----BEGIN ", "").replace("\n", "\n "),
        ..shared_settings(&pem)
    })
    .unwrap_err();
    assert!(!format!("{err:#}").contains("PRIVATE KEY"), "{err:#}");
}

#[test]
fn mtls_mode_parses_kong_values() {
    assert_eq!("shared".parse::<MtlsMode>().unwrap(), MtlsMode::Shared);
    assert_eq!("pki".parse::<MtlsMode>().unwrap(), MtlsMode::Pki);
    assert!("PKI".parse::<MtlsMode>().is_err());
    assert_eq!(MtlsMode::Pki.to_string(), "pki");
}

// === certificate generation ===

#[cfg(unix)]
fn file_mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generate_shared_cert_writes_loadable_files_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");

    let (cert_path, key_path) = generate_shared_cert(&out).unwrap();

    assert_eq!(cert_path, out.join("cluster.crt"));
    assert_eq!(key_path, out.join("cluster.key"));
    #[cfg(unix)]
    assert_eq!(file_mode(&key_path), 0o600);
    let tls = load(&TlsSettings {
        cert: cert_path.display().to_string(),
        key: key_path.display().to_string(),
        ..shared_settings(&kong_style_cert())
    });
    let identity = tls.identity();
    assert_eq!(identity.common_name.as_deref(), Some(SHARED_SERVER_NAME));
    assert_eq!(identity.sans, vec![SHARED_SERVER_NAME]);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let three_years = 1095 * 24 * 60 * 60;
    assert!((identity.not_after - (now + three_years)).abs() < 60);
    assert!(identity.not_before < now);

    let cert_before = std::fs::read(&cert_path).unwrap();
    let key_before = std::fs::read(&key_path).unwrap();
    let err = generate_shared_cert(&out).unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert_before);
    assert_eq!(std::fs::read(&key_path).unwrap(), key_before);

    // Only the key left over: still refused, and the key is kept.
    std::fs::remove_file(&cert_path).unwrap();
    assert!(generate_shared_cert(&out).is_err());
    assert_eq!(std::fs::read(&key_path).unwrap(), key_before);
    assert!(!cert_path.exists());
}

#[test]
fn ensure_dev_cert_creates_once_then_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");

    let (cert_path, key_path, created) = ensure_dev_cert(&data_dir).unwrap();
    assert!(created);
    let cert_before = std::fs::read(&cert_path).unwrap();

    let (cert_again, key_again, created) = ensure_dev_cert(&data_dir).unwrap();
    assert!(!created);
    assert_eq!((&cert_again, &key_again), (&cert_path, &key_path));
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert_before);

    std::fs::remove_file(&cert_path).unwrap();
    let err = ensure_dev_cert(&data_dir).unwrap_err();
    assert!(format!("{err:#}").contains("only one of"), "{err:#}");
}

// === peer identity ===

#[test]
fn peer_identity_reads_names_expiry_and_fingerprint() {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = params(
        "dp-1",
        &["dp-1.example.test", "10.1.2.3"],
        Validity::Expired,
    );
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.self_signed(&key_pair).unwrap();

    let identity = PeerIdentity::from_der(cert.der()).unwrap();

    assert_eq!(identity.common_name.as_deref(), Some("dp-1"));
    assert_eq!(identity.sans, vec!["dp-1.example.test", "10.1.2.3"]);
    assert_eq!(identity.not_after, 978_307_200); // 2001-01-01T00:00:00Z
    assert_eq!(identity.not_before, 946_684_800); // 2000-01-01T00:00:00Z
    use sha2::Digest;
    assert_eq!(
        identity.fingerprint_sha256,
        hex::encode(sha2::Sha256::digest(cert.der()))
    );
    assert_eq!(PeerIdentity::from_der(b"not a certificate"), None);
}
