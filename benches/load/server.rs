//! The server under test: the release-built `identity serve` in its own
//! process, and what `/proc` says about it, about the load generator (this
//! process) and about the embedded PostgreSQL cluster.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// A running `identity serve`. Dropping it sends SIGTERM and waits.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub pid: i32,
    /// Its resident set size when it said it was ready (VmRSS), in bytes:
    /// before any call.
    pub rss_at_start: u64,
    /// The embedded cluster's `postmaster.pid`, when this server runs one.
    postmaster_pid: Option<PathBuf>,
}

impl Server {
    /// Starts the binary with `envs` and waits for its "identity ready" line
    /// (an event, not a sleep). Its later output is drained and dropped;
    /// warnings and errors are echoed.
    pub fn start(data_dir: &Path, keys_dir: &Path, database_url: Option<&str>) -> Self {
        Self::start_with(data_dir, keys_dir, database_url, &[])
    }

    /// As [`Self::start`], with more settings in its environment.
    pub fn start_with(
        data_dir: &Path,
        keys_dir: &Path,
        database_url: Option<&str>,
        envs: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_identity"));
        cmd.arg("serve")
            .env("DATA_DIR", data_dir)
            .env("KEYS_DIR", keys_dir)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("KEYS_ACTIVATION_DELAY", "0s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.envs(envs.iter().copied());
        match database_url {
            Some(url) => cmd.env("DATABASE_URL", url),
            None => cmd.env_remove("DATABASE_URL"),
        };
        let mut child = cmd.spawn().expect("spawn identity serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The access log: drained, as a container runtime would,
                // not parsed.
                if line.contains(r#""target":"identity::access""#) {
                    continue;
                }
                let parsed = serde_json::from_str::<serde_json::Value>(&line).ok();
                let level = parsed
                    .as_ref()
                    .and_then(|v| v["level"].as_str().map(str::to_owned));
                if matches!(level.as_deref(), Some("WARN" | "ERROR")) || parsed.is_none() {
                    eprintln!("[server] {line}");
                }
                if sent {
                    continue;
                }
                if let Some(v) = &parsed
                    && v["fields"]["message"] == "identity ready"
                {
                    let _ = tx.send(Ok(v["fields"]["listen_addr"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned()));
                    sent = true;
                } else if line.starts_with("identity:") {
                    let _ = tx.send(Err(line));
                    sent = true;
                }
            }
            if !sent {
                let _ = tx.send(Err("identity serve exited before it was ready".into()));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(Ok(addr)) => addr.parse().expect("a listen address"),
            Ok(Err(e)) => panic!("identity serve did not start: {e}"),
            Err(_) => panic!("identity serve not ready within 5 minutes"),
        };
        let pid = child.id() as i32;
        Self {
            child,
            addr,
            pid,
            rss_at_start: status_kib(pid, "VmRSS:") * 1024,
            postmaster_pid: database_url
                .is_none()
                .then(|| data_dir.join("pg").join("postmaster.pid")),
        }
    }

    /// Resets the peak resident set size the kernel keeps (VmHWM).
    pub fn reset_peak_rss(&self) {
        // "5" resets VmHWM (Linux 4.0+); without it the peak is since start.
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }

    /// The resident set size now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        status_kib(self.pid, "VmRSS:") * 1024
    }

    /// The peak resident set size since the last reset, in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kib(self.pid, "VmHWM:") * 1024
    }

    /// CPU time (user + system) used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
    }

    /// CPU time used so far by the embedded PostgreSQL cluster this server
    /// started: the postmaster, its live children (the backends and
    /// background workers), and the children it has reaped. None on
    /// `DATABASE_URL`.
    pub fn postgres_cpu_seconds(&self) -> Option<f64> {
        let file = self.postmaster_pid.as_ref()?;
        let postmaster: i32 = std::fs::read_to_string(file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        let mut ticks = 0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(fields) = stat_fields(pid) else {
                continue;
            };
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
            if pid == postmaster {
                // utime, stime, cutime, cstime (fields 14 to 17)
                ticks += (11..=14).filter_map(field).sum::<u64>();
            } else if field(1) == Some(postmaster as u64) {
                ticks += (11..=12).filter_map(field).sum::<u64>();
            }
        }
        Some(ticks as f64 / clock_ticks())
    }
}

/// CPU seconds used so far by the processes a scenario loads, and when.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    server: f64,
    generator: f64,
    postgres: Option<f64>,
}

/// CPU used between a mark and now, in % of one core.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuShares {
    /// The server under test.
    pub server: f64,
    /// This process: the load generator.
    pub generator: f64,
    /// The embedded cluster, when the server runs one.
    pub postgres: Option<f64>,
}

impl CpuMark {
    pub fn now(server: &Server) -> Self {
        Self {
            at: Instant::now(),
            server: server.cpu_seconds(),
            generator: cpu_seconds(std::process::id() as i32),
            postgres: server.postgres_cpu_seconds(),
        }
    }

    /// The shares since this mark.
    pub fn shares(&self, server: &Server) -> CpuShares {
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-9);
        let share = |now: f64, then: f64| (now - then) / elapsed * 100.0;
        let now = Self::now(server);
        CpuShares {
            server: share(now.server, self.server),
            generator: share(now.generator, self.generator),
            postgres: now
                .postgres
                .zip(self.postgres)
                .map(|(now, then)| share(now, then)),
        }
    }

    /// Another server's share since this mark (a second replica).
    pub fn server_share(&self, other: &Server, other_before: f64) -> f64 {
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-9);
        (other.cpu_seconds() - other_before) / elapsed * 100.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold
/// spaces): index 0 is field 3 (state), 1 the parent's pid, 11 and 12 utime
/// and stime, 13 and 14 the reaped children's.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn cpu_seconds(pid: i32) -> f64 {
    let fields = stat_fields(pid).unwrap_or_default();
    let ticks: u64 = [11, 12] // utime, stime (fields 14 and 15)
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// A folder removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("identity-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
