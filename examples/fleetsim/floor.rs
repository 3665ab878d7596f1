//! `floor`: the CP's fan-out work with everything but the unavoidable taken away, measured on
//! one thread with no async runtime, so that the CP's figures have something to be compared
//! with in the same run.
//!
//! * [`plain`]: a bare loop writing `bytes` to each of N loopback TCP sockets: no TLS, no
//!   framing, the cost of one `write` per socket.
//! * [`tls`]: the CP's per-DP, per-version work on mTLS connections without the WebSocket, the
//!   JSON and the runtime: encrypt a pushed frame and write its TLS record to each DP (push),
//!   then take one status report from each DP through one epoll instance (report). The
//!   connections use the CP's own TLS configuration (`ClusterTls`, ring provider) and a shared
//!   certificate from the CP's own generator (P-256), and complete a real TLS 1.3 mutual
//!   handshake over their sockets before anything is timed.
//!
//! Each loop runs `reps` times; every repetition gives its wall time and this thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), and the readers are drained between repetitions (not timed) so
//! that no socket buffer fills.
//!
//! Loopback delivery normally runs inside the writer's `write` (the receiving side's TCP work
//! is then charged to the writer's CPU time), but when the kernel defers it to `ksoftirqd` and
//! the per-CPU backlog (`netdev_max_backlog`, 1,000 packets) overflows, segments are dropped
//! and retransmitted later. A burst of 9,000 writes on a busy machine does that (a DP side once
//! found nothing 20 ms after its push), so the TLS floor waits for every delivery outside the
//! timed parts, and every loop reports the machine's backlog drops (`/proc/net/softnet_stat`)
//! during its repetitions: a repetition with drops did less work than it should have (the
//! receiving side's, for the segments dropped).
//!
//! Shared by `examples/fleetsim/main.rs` and `tests/it/fleetsim.rs` (which runs the TLS floor
//! on a few connections, for correctness).
#![allow(dead_code)]

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use deltaplane::net::tls::{self, ClusterTls, TlsSettings};
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};

/// How long the receiving side is left alone after a timed loop's writes, before it is
/// drained or read (the plain floor's pause, kept for the TLS loops).
const SETTLE: Duration = Duration::from_millis(20);

/// No single wait of the report loop, nor a handshake, should take this long on loopback.
const STUCK: Duration = Duration::from_secs(10);

/// Events taken per `epoll_wait`: as tokio's I/O driver (`max_io_events_per_tick`, 1,024).
const EPOLL_EVENTS: usize = 1024;

/// One timed loop's repetitions: wall time and this thread's CPU time, ns per repetition.
#[derive(Default)]
pub struct Reps {
    wall_ns: Vec<u64>,
    cpu_ns: Vec<u64>,
    /// The machine's loopback backlog drops during each repetition.
    drops: Vec<u64>,
}

/// Min and median of a loop over its repetitions.
#[derive(Clone, Copy)]
pub struct MinMedian {
    pub min: f64,
    pub median: f64,
}

/// [`tls`]'s result.
pub struct TlsFloor {
    /// The CP side encrypts `bytes` and writes the record to each connection.
    pub push: Reps,
    /// The CP side takes one report from each connection through epoll.
    pub report: Reps,
    /// Per repetition, push + report.
    pub sum: Reps,
    /// What the handshakes negotiated, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
    pub negotiated: String,
    /// Bytes on the wire per push (record header, tag and content type included).
    pub push_wire_bytes: usize,
    /// `epoll_wait` calls of the report loop, median over the repetitions.
    pub epoll_waits: u64,
}

// === impl Reps ===

impl Reps {
    fn push(&mut self, wall: Duration, cpu_ns: u64, drops: u64) {
        self.wall_ns.push(wall.as_nanos() as u64);
        self.cpu_ns.push(cpu_ns);
        self.drops.push(drops);
    }

    /// How many repetitions saw backlog drops, and how many packets were dropped in all, e.g.
    /// `drops in 0/7 reps`.
    pub fn drops(&self) -> String {
        let n_reps = self.drops.iter().filter(|&&d| d > 0).count();
        let total: u64 = self.drops.iter().sum();
        if total == 0 {
            format!("drops in 0/{} reps", self.drops.len())
        } else {
            format!(
                "drops in {n_reps}/{} reps ({total} packets)",
                self.drops.len()
            )
        }
    }

    /// Wall time of the whole loop, in milliseconds.
    pub fn wall_ms(&self) -> MinMedian {
        min_median(&self.wall_ns, 1e6)
    }

    /// Wall time per socket, in microseconds.
    pub fn wall_us_per(&self, n: usize) -> MinMedian {
        min_median(&self.wall_ns, 1e3 * n as f64)
    }

    /// This thread's CPU time per socket, in microseconds.
    pub fn cpu_us_per(&self, n: usize) -> MinMedian {
        min_median(&self.cpu_ns, 1e3 * n as f64)
    }

    fn sum(a: &Reps, b: &Reps) -> Reps {
        let add = |x: &[u64], y: &[u64]| x.iter().zip(y).map(|(x, y)| x + y).collect();
        Reps {
            wall_ns: add(&a.wall_ns, &b.wall_ns),
            cpu_ns: add(&a.cpu_ns, &b.cpu_ns),
            drops: add(&a.drops, &b.drops),
        }
    }
}

/// Min and lower median of `ns`, each divided by `div`.
fn min_median(ns: &[u64], div: f64) -> MinMedian {
    let mut v: Vec<u64> = ns.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return MinMedian {
            min: f64::NAN,
            median: f64::NAN,
        };
    }
    MinMedian {
        min: v[0] as f64 / div,
        median: v[(v.len() - 1) / 2] as f64 / div,
    }
}

impl std::fmt::Display for MinMedian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}/{:.2}", self.min, self.median)
    }
}

// === plain ===

/// A bare loop writing `bytes` to each of `n` connected loopback sockets, `reps` times (the
/// readers drained between reps).
pub fn plain(n: usize, bytes: usize, reps: usize) -> anyhow::Result<Reps> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let c = TcpStream::connect(addr).context("floor: connect")?;
        c.set_nodelay(true)?;
        let (s, _) = listener.accept()?;
        s.set_nonblocking(true)?;
        clients.push(c);
        servers.push(s);
    }
    let buf = vec![b'x'; bytes];
    let mut res = Reps::default();
    let mut sink = vec![0u8; 64 * 1024];
    for _ in 0..reps.max(1) {
        let drops = backlog_drops();
        let (t, cpu) = (Instant::now(), thread_cpu_ns());
        for c in &mut clients {
            c.write_all(&buf)?;
        }
        // Left to right: the clocks are read before the drops.
        res.push(t.elapsed(), thread_cpu_ns() - cpu, backlog_drops() - drops);
        std::thread::sleep(SETTLE);
        for s in &mut servers {
            while let Ok(k) = s.read(&mut sink) {
                if k == 0 {
                    break;
                }
            }
        }
    }
    Ok(res)
}

// === tls ===

/// One mTLS connection over loopback: the CP side (server) and the DP side (client).
struct Pair {
    cp: ServerConnection,
    cp_sock: TcpStream,
    dp: ClientConnection,
    dp_sock: TcpStream,
}

/// The CP's per-DP work per version on `n` mTLS connections: push `bytes`, take a
/// `report_bytes` report; `reps` times each.
///
/// Setup (not timed): `n` loopback TCP pairs with `TCP_NODELAY` (as the CP's listener and the
/// DP's dialer), a full handshake on each over its non-blocking sockets, then the DP sides
/// blocking (with a timeout) and every CP-side socket registered (level-triggered, `EPOLLIN`)
/// with one epoll instance. Then per repetition:
/// * push (timed): for each connection, `writer().write_all` of the frame and `write_tls` to
///   the socket until nothing is left to write; then (not timed) each DP side reads and
///   decrypts it, waiting for it if needed, and checks that it is the frame.
/// * report: (not timed) each DP side encrypts and writes its report, and every report is
///   waited for until it is queued whole on its CP-side socket (`FIONREAD`), so that the timed
///   part never waits for a retransmission; then, timed, `epoll_wait` and, for each ready
///   socket, one `read_tls`, `process_new_packets` and the plaintext read from `reader()`
///   until it would block, until all `n` reports are in. Level-triggered with one `read_tls`
///   per event: a report is one record, far below what one `read_tls` takes (4 KiB), so no
///   read is spent on learning that a socket is empty.
pub fn tls(n: usize, bytes: usize, report_bytes: usize, reps: usize) -> anyhow::Result<TlsFloor> {
    ensure!(
        n >= 1 && bytes >= 1 && report_bytes >= 1,
        "floor --tls: sizes ≥ 1"
    );
    let dir = tempfile::Builder::new()
        .prefix("fleetsim-floor-")
        .tempdir()
        .context("floor --tls: temp dir for the certificate")?;
    let (cert, key) = tls::generate_shared_cert(dir.path())?;
    let cluster = ClusterTls::load(&TlsSettings::shared(
        cert.display().to_string(),
        key.display().to_string(),
    ))
    .context("floor --tls: loading the generated certificate")?;
    let server_config = cluster.server_config();
    let client_config = cluster.client_config();
    let server_name = cluster.server_name_for("127.0.0.1");

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        let dp_sock = TcpStream::connect(addr).context("floor --tls: connect")?;
        let (cp_sock, _) = listener.accept().context("floor --tls: accept")?;
        for s in [&dp_sock, &cp_sock] {
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
        }
        let mut pair = Pair {
            cp: ServerConnection::new(server_config.clone())?,
            cp_sock,
            dp: ClientConnection::new(client_config.clone(), server_name.clone())?,
            dp_sock,
        };
        handshake(&mut pair).with_context(|| format!("floor --tls: handshake {i}"))?;
        pair.dp_sock.set_nonblocking(false)?;
        pair.dp_sock.set_read_timeout(Some(STUCK))?;
        pairs.push(pair);
    }
    let first = &pairs[0].cp;
    ensure!(
        first.peer_certificates().is_some_and(|c| !c.is_empty()),
        "floor --tls: the DP side presented no certificate"
    );
    let negotiated = format!(
        "{:?} {:?} {:?}",
        first.protocol_version().context("no protocol version")?,
        first
            .negotiated_cipher_suite()
            .context("no cipher suite")?
            .suite(),
        first
            .negotiated_key_exchange_group()
            .context("no key exchange group")?
            .name(),
    );
    ensure!(
        first.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
        "floor --tls: negotiated {negotiated}, not TLS 1.3"
    );

    let epoll = epoll_register(&pairs)?;
    let push = vec![b'p'; bytes];
    let report = vec![b'r'; report_bytes];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EPOLL_EVENTS];
    let mut plaintext = vec![0u8; 64 * 1024];
    let mut received = vec![0u8; bytes];
    let mut report_wire = vec![0usize; n];
    let mut got = vec![0usize; n];
    let (mut push_reps, mut report_reps) = (Reps::default(), Reps::default());
    let mut push_wire_bytes = 0;
    let mut epoll_waits = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        // Push, timed.
        let mut wire = 0;
        let drops = backlog_drops();
        let (t, cpu) = (Instant::now(), thread_cpu_ns());
        for p in &mut pairs {
            p.cp.writer().write_all(&push)?;
            while p.cp.wants_write() {
                wire +=
                    p.cp.write_tls(&mut p.cp_sock)
                        .context("floor --tls: push write (socket buffer full?)")?;
            }
        }
        push_reps.push(t.elapsed(), thread_cpu_ns() - cpu, backlog_drops() - drops);
        push_wire_bytes = wire / n;
        std::thread::sleep(SETTLE);
        for (i, p) in pairs.iter_mut().enumerate() {
            receive_exactly(&mut p.dp, &mut p.dp_sock, &mut received)
                .with_context(|| format!("floor --tls: DP {i} reading the push"))?;
            ensure!(
                received == push,
                "floor --tls: DP {i} decrypted {bytes} B that are not the push"
            );
        }

        // Report: the DP sides write theirs and they are waited for, then the CP side reads
        // them, timed.
        for (p, wire) in pairs.iter_mut().zip(&mut report_wire) {
            p.dp.writer().write_all(&report)?;
            *wire = 0;
            while p.dp.wants_write() {
                *wire +=
                    p.dp.write_tls(&mut p.dp_sock)
                        .context("floor --tls: report write")?;
            }
        }
        std::thread::sleep(SETTLE);
        for (i, (p, &wire)) in pairs.iter().zip(&report_wire).enumerate() {
            wait_queued(&p.cp_sock, wire)
                .with_context(|| format!("floor --tls: DP {i}'s report"))?;
        }
        got.fill(0);
        let (mut left, mut waits) = (n, 0u64);
        let drops = backlog_drops();
        let (t, cpu) = (Instant::now(), thread_cpu_ns());
        while left > 0 {
            // SAFETY: `events` is valid for `events.len()` entries; `epoll` is open.
            let k = unsafe {
                libc::epoll_wait(
                    epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    STUCK.as_millis() as i32,
                )
            };
            waits += 1;
            if k < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("floor --tls: epoll_wait");
            }
            ensure!(
                k > 0,
                "floor --tls: {left} reports still missing after {STUCK:?}"
            );
            for ev in &events[..k as usize] {
                let i = ev.u64 as usize;
                let p = &mut pairs[i];
                match p.cp.read_tls(&mut p.cp_sock) {
                    Ok(0) => bail!("floor --tls: DP {i} closed its connection"),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e).context("floor --tls: report read_tls"),
                }
                p.cp.process_new_packets()
                    .context("floor --tls: report process_new_packets")?;
                let before = got[i];
                loop {
                    match p.cp.reader().read(&mut plaintext) {
                        Ok(0) => bail!("floor --tls: DP {i} closed its TLS session"),
                        Ok(k) => got[i] += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).context("floor --tls: report read"),
                    }
                }
                if before < report_bytes && got[i] >= report_bytes {
                    left -= 1;
                }
            }
        }
        report_reps.push(t.elapsed(), thread_cpu_ns() - cpu, backlog_drops() - drops);
        epoll_waits.push(waits);
        if let Some(i) = got.iter().position(|&g| g != report_bytes) {
            bail!(
                "floor --tls: DP {i}'s report arrived as {} B, not {report_bytes} B",
                got[i]
            );
        }
    }
    epoll_waits.sort_unstable();
    Ok(TlsFloor {
        sum: Reps::sum(&push_reps, &report_reps),
        push: push_reps,
        report: report_reps,
        negotiated,
        push_wire_bytes,
        epoll_waits: epoll_waits[(epoll_waits.len() - 1) / 2],
    })
}

/// Drives both ends of `pair` through the handshake over its (non-blocking) sockets, until
/// both are done and nothing is left to send.
fn handshake(pair: &mut Pair) -> anyhow::Result<()> {
    let deadline = Instant::now() + STUCK;
    while pair.cp.is_handshaking()
        || pair.dp.is_handshaking()
        || pair.cp.wants_write()
        || pair.dp.wants_write()
    {
        ensure!(Instant::now() < deadline, "no progress in {STUCK:?}");
        flush(&mut pair.dp, &mut pair.dp_sock)?;
        flush(&mut pair.cp, &mut pair.cp_sock)?;
        pump(&mut pair.cp, &mut pair.cp_sock)?;
        pump(&mut pair.dp, &mut pair.dp_sock)?;
    }
    Ok(())
}

/// Writes what `conn` has to send, as far as the socket takes it.
fn flush<D>(conn: &mut ConnectionCommon<D>, sock: &mut TcpStream) -> anyhow::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e).context("write_tls"),
        }
    }
    Ok(())
}

/// Reads and processes the TLS records waiting on the (non-blocking) socket.
fn pump<D>(conn: &mut ConnectionCommon<D>, sock: &mut TcpStream) -> anyhow::Result<()> {
    loop {
        match conn.read_tls(sock) {
            Ok(0) => bail!("the peer closed the connection"),
            Ok(_) => {
                conn.process_new_packets().context("process_new_packets")?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e).context("read_tls"),
        }
    }
}

/// Reads and decrypts exactly `buf.len()` bytes of plaintext from the (blocking) socket into
/// `buf`.
fn receive_exactly<D>(
    conn: &mut ConnectionCommon<D>,
    sock: &mut TcpStream,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match conn.reader().read(&mut buf[got..]) {
            Ok(0) => bail!("the peer closed its TLS session"),
            Ok(k) => {
                got += k;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("reading plaintext"),
        }
        match conn.read_tls(sock) {
            Ok(0) => bail!("the peer closed the connection"),
            Ok(_) => {
                conn.process_new_packets().context("process_new_packets")?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("{got} of {} B after {STUCK:?}", buf.len())
            }
            Err(e) => return Err(e).context("read_tls"),
        }
    }
    Ok(())
}

/// Waits until at least `bytes` are queued for reading on `sock` (`FIONREAD`).
fn wait_queued(sock: &TcpStream, bytes: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + STUCK;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: the descriptor is open; FIONREAD writes one c_int to `queued`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
            return Err(io::Error::last_os_error()).context("ioctl FIONREAD");
        }
        if queued as usize >= bytes {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{queued} of {bytes} B queued after {STUCK:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One epoll instance with every CP-side socket registered for input, level-triggered, its
/// index in `pairs` as the event's data.
fn epoll_register(pairs: &[Pair]) -> anyhow::Result<OwnedFd> {
    // SAFETY: no pointer arguments; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("floor --tls: epoll_create1");
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    for (i, p) in pairs.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: both descriptors are open; `ev` is a valid event.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                p.cp_sock.as_raw_fd(),
                &mut ev,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("floor --tls: epoll_ctl");
        }
    }
    Ok(epoll)
}

/// This thread's CPU time (user + system), in nanoseconds.
fn thread_cpu_ns() -> u64 {
    super::sim::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The machine's loopback backlog drops so far: the second column of
/// `/proc/net/softnet_stat` (hex), summed over the CPUs; 0 when it cannot be read.
pub fn backlog_drops() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/net/softnet_stat") else {
        return 0;
    };
    stat.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|d| u64::from_str_radix(d, 16).ok())
        .sum()
}
