//! The server under test: the release-built `identity serve` in its own
//! process, and what `/proc` says about it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// A running `identity serve`. Dropping it sends SIGTERM and waits.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub pid: i32,
}

impl Server {
    /// Starts the binary with `envs` and waits for its "identity ready" line
    /// (an event, not a sleep). Its later output is drained and dropped;
    /// warnings and errors are echoed.
    pub fn start(data_dir: &Path, keys_dir: &Path, database_url: Option<&str>) -> Self {
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
        Self { child, addr, pid }
    }

    /// Resets the peak resident set size the kernel keeps (VmHWM).
    pub fn reset_peak_rss(&self) {
        // "5" resets VmHWM (Linux 4.0+); without it the peak is since start.
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }

    /// The peak resident set size since the last reset, in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kib(self.pid, "VmHWM:") * 1024
    }

    /// CPU time (user + system) used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
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

fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12] // utime, stime (fields 14 and 15)
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
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
