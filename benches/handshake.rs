//! CPU cost of one cluster mTLS handshake (shared mode, as a data plane and the control plane
//! do it on connect), per side, by certificate key type: the generated certificate's P-384
//! (Kong's `kong hybrid gen_cert` key type too) next to P-256 and Ed25519.
//!
//! `cargo bench --bench handshake [-- N]` (default N = 300 handshakes per key type). The server
//! and the client each run on their own thread with a current-thread runtime; each side's CPU is
//! that thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`), so the figures are CPU, not wall time.

use std::path::Path;
use std::time::Duration;

use deltaplane::net::tls::{ClusterTls, SHARED_SERVER_NAME, TlsSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct passed in.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A shared-mode certificate like the generated one, with `alg`'s key.
fn shared_cert(dir: &Path, name: &str, alg: &'static rcgen::SignatureAlgorithm) -> ClusterTls {
    let key = rcgen::KeyPair::generate_for(alg).expect("key");
    let mut params = rcgen::CertificateParams::new(vec![SHARED_SERVER_NAME.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SHARED_SERVER_NAME);
    let cert = params.self_signed(&key).expect("self-signed");
    let (crt, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    ClusterTls::load(&TlsSettings::shared(
        crt.display().to_string(),
        key_path.display().to_string(),
    ))
    .expect("load")
}

/// (server CPU, client CPU) per handshake over `n` sequential handshakes on loopback.
fn measure(tls: ClusterTls, n: usize) -> (Duration, Duration) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let server_tls = tls.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let start = thread_cpu();
            for _ in 0..n {
                let (tcp, _) = listener.accept().await.unwrap();
                let (mut s, _) = server_tls.accept(tcp).await.unwrap();
                // One byte each way: TLS 1.3 finishes the client's certificate check here.
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b).await.unwrap();
                s.flush().await.unwrap();
            }
            thread_cpu() - start
        })
    });
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let start = thread_cpu();
            for _ in 0..n {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut s = tls.connect(tcp, "127.0.0.1").await.unwrap();
                s.write_all(b"x").await.unwrap();
                s.flush().await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
            }
            thread_cpu() - start
        })
    });
    let c = client.join().unwrap();
    let s = server.join().unwrap();
    (s / n as u32, c / n as u32)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir().unwrap();
    println!("cluster mTLS handshake CPU per side, shared mode, {n} sequential handshakes");
    println!("{:<26} {:>12} {:>12}", "key", "server µs", "client µs");
    for (name, alg) in [
        ("P-384 (generated, Kong)", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("P-256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("Ed25519", &rcgen::PKCS_ED25519),
    ] {
        let tls = shared_cert(dir.path(), &name.replace(' ', "_"), alg);
        // Warm-up, then the measured run.
        let _ = measure(tls.clone(), 10);
        let (s, c) = measure(tls, n);
        println!(
            "{:<26} {:>12.0} {:>12.0}",
            name,
            s.as_secs_f64() * 1e6,
            c.as_secs_f64() * 1e6
        );
    }
}
