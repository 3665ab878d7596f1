//! Process plumbing shared by the benchmark harnesses (`loadtest`, `proxybench`): child
//! processes killed and reaped on drop, free loopback ports, the load average, and a
//! process's CPU time. Included with `#[path]`, as each example is its own crate.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Child processes, killed (SIGKILL) and reaped on drop: on success, error and panic alike.
/// Children spawned with [`Procs::spawn_graceful`] get SIGTERM first (nginx: a killed master
/// leaves its workers running). Their own children listed in `grandchildren` (nginx's
/// workers) are killed too.
#[derive(Default)]
pub struct Procs {
    /// (name, child, log, stopped with SIGTERM first).
    children: Vec<(String, Child, PathBuf, bool)>,
    /// (pid, command name) of processes our children started.
    pub grandchildren: Vec<(u32, String)>,
}

impl Procs {
    /// Spawns `cmd` with stdout discarded and stderr to `log`; returns its pid.
    pub fn spawn(&mut self, name: &str, cmd: Command, log: &Path) -> anyhow::Result<u32> {
        self.spawn_with(name, cmd, log, false)
    }

    /// [`Procs::spawn`] for a process that must be stopped with SIGTERM first.
    #[allow(dead_code)] // not every harness has one
    pub fn spawn_graceful(&mut self, name: &str, cmd: Command, log: &Path) -> anyhow::Result<u32> {
        self.spawn_with(name, cmd, log, true)
    }

    fn spawn_with(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        graceful: bool,
    ) -> anyhow::Result<u32> {
        // Defaults only: no DELTAPLANE_* setting from the caller's environment leaks in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DELTAPLANE_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let pid = child.id();
        self.children
            .push((name.to_owned(), child, log.to_path_buf(), graceful));
        Ok(pid)
    }

    /// Fails if any child has exited, with the tail of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child, log, _) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{name} exited ({status}); log tail:\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }

    /// Stops the child `name` now: SIGTERM (nginx's fast shutdown, which also ends its
    /// workers), then SIGKILL after 3 s; reaps it.
    #[allow(dead_code)] // not every harness stops a child early
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, ..)| n == name) {
            let (_, child, _, _) = self.children.remove(i);
            terminate(child);
        }
        self.kill_grandchildren();
    }

    /// Kills the child with pid `pid` (SIGKILL) and reaps it, so a next run may reuse its
    /// name and files; nothing when no such child is left.
    #[allow(dead_code)] // not every harness kills a child early
    pub fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        if let Some(i) = self.children.iter().position(|(_, c, ..)| c.id() == pid) {
            let (_, mut child, _, _) = self.children.remove(i);
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGKILLs the listed grandchildren still running under their recorded name.
    fn kill_grandchildren(&mut self) {
        for (pid, comm) in self.grandchildren.drain(..) {
            let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if now.trim() == comm {
                // SAFETY: kill has no memory preconditions; the pid was checked just above
                // to still be the process we recorded.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// SIGTERM, SIGKILL after 3 s, reaped.
fn terminate(mut child: Child) {
    // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Procs {
    fn drop(&mut self) {
        let (graceful, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.children)
            .into_iter()
            .partition(|(.., g)| *g);
        for (_, child, _, _) in graceful {
            terminate(child);
        }
        let mut rest: Vec<Child> = rest.into_iter().map(|(_, c, _, _)| c).collect();
        for child in &mut rest {
            let _ = child.kill();
        }
        for child in &mut rest {
            let _ = child.wait();
        }
        self.kill_grandchildren();
    }
}

/// Free loopback ports: all bound at once (so they are distinct), then released.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unavailable ({e})"))
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / hz)
}
