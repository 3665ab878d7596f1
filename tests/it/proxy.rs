//! A loopback TCP fault proxy for tests: listens on 127.0.0.1:0 and forwards every connection
//! to a target (bytes only: TLS passes through untouched), with faults switchable at run time
//! through a shared [`FaultProxy`]: added latency per chunk, a bandwidth cap, stalls in either
//! direction, reset (RST) of every connection now, reset after N bytes towards the client
//! (mid-frame), and refusing new connections.
//!
//! "Up" is client → target (data plane → control plane), "down" is target → client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The faults in force. Every connection reads the current value before each chunk.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before forwarding each chunk, both directions.
    pub latency: Duration,
    /// Bytes per second per direction and connection; `None` is unlimited.
    pub bandwidth: Option<u64>,
    /// Stop reading from the client (up) / from the target (down): TCP pushes back.
    pub stall_up: bool,
    pub stall_down: bool,
    /// Reset a connection once this many bytes went down on it (the rest of that chunk is
    /// dropped), for every connection while set.
    pub reset_after_down: Option<u64>,
    /// Stall down on a connection once this many bytes went down on it, while set.
    pub stall_down_after: Option<u64>,
    /// Accept and reset at once.
    pub refuse: bool,
    /// Bumped by [`FaultProxy::reset_all`]; a connection started under an older value resets.
    reset_generation: u64,
}

/// Counters, for tests to check that a fault actually bit.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub resets: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Chunks that waited for a stall to clear.
    pub stalled_chunks: AtomicU64,
    /// Bytes down on the most recently finished connection.
    pub last_conn_down: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    faults: watch::Sender<Faults>,
    pub stats: Arc<Stats>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (faults, _) = watch::channel(Faults::default());
        let stats = Arc::new(Stats::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            faults.subscribe(),
            stats.clone(),
        ));
        FaultProxy {
            addr,
            faults,
            stats,
            accept,
        }
    }

    /// Changes the faults in force (the reset generation is kept).
    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        self.faults.send_modify(f);
    }

    /// Back to a clean wire (does not reset connections).
    pub fn clear(&self) {
        self.faults.send_modify(|f| {
            let generation = f.reset_generation;
            *f = Faults {
                reset_generation: generation,
                ..Faults::default()
            };
        });
    }

    /// Resets (RST) every connection open now.
    pub fn reset_all(&self) {
        self.faults.send_modify(|f| f.reset_generation += 1);
    }

    pub fn resets(&self) -> u64 {
        self.stats.resets.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connections end on the next generation.
        self.faults.send_modify(|f| f.reset_generation += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    faults: watch::Receiver<Faults>,
    stats: Arc<Stats>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if faults.borrow().refuse {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                conns.spawn(connection(client, target, faults.clone(), stats.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A client socket as a slow, distant host would have it: a small receive buffer and a small
/// MSS (set before connecting). On loopback the MSS is ~64 KiB and the sender's kernel sizes
/// its send buffer from it (megabytes); with a small MSS a reader that stops reading pushes
/// back on the sender's writes within tens of KiB.
pub fn slow_host_socket(recv_buffer: u32) -> tokio::net::TcpSocket {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
    set_mss(&sock, 1024);
    sock
}

fn set_mss(sock: &tokio::net::TcpSocket, mss: i32) {
    use std::os::fd::AsRawFd as _;
    // Linux: IPPROTO_TCP = 6, TCP_MAXSEG = 2. std exposes no setsockopt; libc is linked anyway.
    unsafe extern "C" {
        fn setsockopt(
            fd: i32,
            level: i32,
            name: i32,
            value: *const std::ffi::c_void,
            len: u32,
        ) -> i32;
    }
    // SAFETY: a valid fd owned by `sock`, a pointer to an i32 and its size.
    let r = unsafe {
        setsockopt(
            sock.as_raw_fd(),
            6,
            2,
            (&raw const mss).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt(TCP_MAXSEG): {}",
        std::io::Error::last_os_error()
    );
}

/// `SO_RCVBUF` of the proxy's socket towards the target.
const TARGET_RECV_BUFFER: u32 = 32 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Up,
    Down,
}

enum Ended {
    Clean,
    Reset,
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    stats: Arc<Stats>,
) {
    let _ = client.set_nodelay(true);
    // A small receive buffer towards the target, so a stall pushes back on the target within
    // tens of KB instead of the megabytes loopback autotuning allows.
    let server = slow_host_socket(TARGET_RECV_BUFFER).connect(target);
    let Ok(mut server) = server.await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = server.set_nodelay(true);
    let generation = faults.borrow().reset_generation;
    let down_bytes = AtomicU64::new(0);
    let ended = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pump(cr, sw, Dir::Up, faults.clone(), &stats, &down_bytes);
        let down = pump(sr, cw, Dir::Down, faults.clone(), &stats, &down_bytes);
        let both = async {
            // One direction ending cleanly half-closes the other side; an error ends both.
            tokio::pin!(up, down);
            let first = tokio::select! {
                r = &mut up => (r, true),
                r = &mut down => (r, false),
            };
            match first {
                (Ended::Reset, _) => Ended::Reset,
                (Ended::Clean, up_done) => {
                    if up_done {
                        down.await
                    } else {
                        up.await
                    }
                }
            }
        };
        tokio::select! {
            e = both => e,
            _ = faults.wait_for(|f| f.reset_generation != generation) => Ended::Reset,
        }
    };
    stats
        .last_conn_down
        .store(down_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    if let Ended::Reset = ended {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        // SO_LINGER 0: the close sends RST and discards anything unsent.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    dir: Dir,
    mut faults: watch::Receiver<Faults>,
    stats: &Stats,
    down_bytes: &AtomicU64,
) -> Ended {
    let stalled = |f: &Faults| match dir {
        Dir::Up => f.stall_up,
        Dir::Down => {
            f.stall_down
                || f.stall_down_after
                    .is_some_and(|n| down_bytes.load(Ordering::Relaxed) >= n)
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A stall stops reading, so the sender's buffers fill up.
        if stalled(&faults.borrow()) {
            stats.stalled_chunks.fetch_add(1, Ordering::Relaxed);
            if faults.wait_for(|f| !stalled(f)).await.is_err() {
                return Ended::Reset;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Ended::Clean;
            }
            Ok(n) => n,
            Err(_) => return Ended::Reset,
        };
        // A chunk read just before a stall began waits for the stall to clear too.
        if stalled(&faults.borrow()) {
            stats.stalled_chunks.fetch_add(1, Ordering::Relaxed);
            if faults.wait_for(|f| !stalled(f)).await.is_err() {
                return Ended::Reset;
            }
        }
        let f = faults.borrow().clone();
        if !f.latency.is_zero() {
            tokio::time::sleep(f.latency).await;
        }
        let mut chunk = &buf[..n];
        let mut reset = false;
        if dir == Dir::Down {
            let before = down_bytes.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(limit) = f.reset_after_down
                && before + n as u64 >= limit
            {
                chunk = &chunk[..limit.saturating_sub(before) as usize];
                reset = true;
            }
        }
        // The cap paces each chunk in slices of at most a tenth of a second's worth.
        let slice = match f.bandwidth {
            Some(bps) => ((bps / 10).max(1) as usize).min(chunk.len().max(1)),
            None => chunk.len().max(1),
        };
        for part in chunk.chunks(slice) {
            if let Some(bps) = f.bandwidth {
                tokio::time::sleep(Duration::from_secs_f64(part.len() as f64 / bps as f64)).await;
            }
            if to.write_all(part).await.is_err() {
                return Ended::Reset;
            }
            let counter = match dir {
                Dir::Up => &stats.bytes_up,
                Dir::Down => &stats.bytes_down,
            };
            counter.fetch_add(part.len() as u64, Ordering::Relaxed);
        }
        if reset {
            let _ = to.flush().await;
            return Ended::Reset;
        }
    }
}
