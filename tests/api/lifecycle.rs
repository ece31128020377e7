//! The `identity serve` binary on its embedded cluster: first start, clean
//! shutdown on SIGTERM, restart with data kept, recovery after kill -9 and
//! from a stale postmaster.pid, and one process per DATA_DIR.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use tonic::transport::Channel;

use crate::helpers::{AuthServiceClient, TempDir, TestUser, UserServiceClient};
use identity::proto::identity::v1 as pb;

/// The lines a process wrote, and a way to wait for one.
#[derive(Default)]
pub struct Log {
    lines: std::sync::Mutex<Vec<String>>,
    grown: std::sync::Condvar,
}

impl Log {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.grown.notify_all();
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (on each new line, not by polling) until a line after the
    /// first `skip` contains `needle`; false after `timeout`.
    pub fn wait_for(&self, skip: usize, needle: &str, timeout: Duration) -> bool {
        let lines = self.lines.lock().unwrap();
        let (_lines, result) = self
            .grown
            .wait_timeout_while(lines, timeout, |lines| {
                !lines.iter().skip(skip).any(|l| l.contains(needle))
            })
            .unwrap();
        !result.timed_out()
    }

    /// Waits (on each new line) until a line after the first `skip`
    /// satisfies `found`; false after `timeout`.
    pub fn wait_until(&self, skip: usize, found: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let lines = self.lines.lock().unwrap();
        let (_lines, result) = self
            .grown
            .wait_timeout_while(lines, timeout, |lines| {
                !lines.iter().skip(skip).any(|l| found(l))
            })
            .unwrap();
        !result.timed_out()
    }

    /// Waits until `count` lines after the first `skip` contain `needle`.
    pub fn wait_for_count(
        &self,
        skip: usize,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let lines = self.lines.lock().unwrap();
        let (_lines, result) = self
            .grown
            .wait_timeout_while(lines, timeout, |lines| {
                lines
                    .iter()
                    .skip(skip)
                    .filter(|l| l.contains(needle))
                    .count()
                    < count
            })
            .unwrap();
        !result.timed_out()
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// A running `identity serve` and the address it reported when ready.
pub struct Serve {
    child: Child,
    pub addr: SocketAddr,
    /// Every line written to standard error so far.
    pub log: std::sync::Arc<Log>,
    drain: Option<std::thread::JoinHandle<()>>,
}

pub fn command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_identity"));
    cmd.arg("serve")
        .env_remove("DATABASE_URL")
        .env("DATA_DIR", data_dir)
        .env("KEYS_DIR", data_dir.with_file_name("keys"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("ARGON2_MEMORY_KIB", "4096")
        .env("ARGON2_ITERATIONS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

impl Serve {
    /// Starts the binary and waits for its "ready" log line (an event, not a
    /// sleep); its later output keeps being drained.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(command(data_dir))
    }

    /// Starts `cmd` (see [`command`]) and waits for it to be ready.
    pub fn start_with(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().expect("spawn identity");
        let log = std::sync::Arc::new(Log::default());
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let drain = std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[serve] {line}");
                }
                sink.push(line.clone());
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["fields"]["message"] == "identity ready" {
                            let addr = v["fields"]["listen_addr"].as_str().unwrap().to_owned();
                            let _ = tx.send(Ok(addr));
                            sent = true;
                        }
                    } else if line.starts_with("identity:") {
                        let _ = tx.send(Err(line));
                        sent = true;
                    }
                }
            }
            if !sent {
                let _ = tx.send(Err("exited before it was ready".into()));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a ready line within 2 minutes")
            .expect("identity serve started");
        Self {
            child,
            addr: addr.parse().unwrap(),
            log,
            drain: Some(drain),
        }
    }

    async fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(self) -> i32 {
        self.signal(Signal::SIGTERM);
        self.wait()
    }

    /// Waits for the process to exit (after a signal sent with
    /// [`Serve::signal`]); its exit code.
    pub fn wait(mut self) -> i32 {
        let status = self.child.wait().unwrap();
        // The log is complete once the pipe is drained.
        if let Some(drain) = self.drain.take() {
            drain.join().unwrap();
        }
        status.code().unwrap_or(-1)
    }
}

/// A test that fails half-way must not leave its server running: stop it as
/// an operator would (SIGTERM, which also stops its embedded cluster).
impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("pg/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Whether a process runs (a zombie waiting for its parent does not count).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// The user, found by logging in as it (a public RPC).
async fn find(serve: &Serve, username: &str) -> Option<pb::User> {
    let req = pb::LoginRequest {
        login: username.into(),
        password: TestUser::named(username).password,
    };
    let mut auth = AuthServiceClient::connect(format!("http://{}", serve.addr))
        .await
        .unwrap();
    auth.login(req).await.ok().and_then(|r| r.into_inner().user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_cluster_survives_restarts_kills_and_stale_pid_files() {
    let dir = TempDir::new("identity-lc");
    let data = dir.0.join("data");

    // First start: initdb, migrations, a user.
    let serve = Serve::start(&data);
    let created = serve
        .users()
        .await
        .create_user(TestUser::named("survivor").request())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let postmaster = postmaster_pid(&data).expect("a running cluster");
    assert!(alive(postmaster));

    // A second service on the same DATA_DIR is refused.
    let second = command(&data).output().unwrap();
    assert_ne!(second.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));

    // SIGTERM: exit 0, no process and no postmaster.pid left behind.
    assert_eq!(serve.terminate(), 0);
    assert!(!alive(postmaster), "postmaster stopped");
    assert!(!data.join("pg/postmaster.pid").exists());

    // Restart: the data is still there.
    let serve = Serve::start(&data);
    assert_eq!(find(&serve, "survivor").await.unwrap().id, created.id);

    // kill -9: the postmaster is orphaned; the next start deals with it.
    let postmaster = postmaster_pid(&data).unwrap();
    serve.signal(Signal::SIGKILL);
    let mut serve = serve;
    serve.child.wait().unwrap();
    assert!(alive(postmaster), "an orphan is left by kill -9");
    let serve = Serve::start(&data);
    assert!(!alive(postmaster), "the orphan was stopped");
    assert_eq!(find(&serve, "survivor").await.unwrap().id, created.id);
    assert_eq!(serve.terminate(), 0);

    // A stale postmaster.pid naming a dead process.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(
        data.join("pg/postmaster.pid"),
        format!("{dead_pid}\n{}\n", data.join("pg").display()),
    )
    .unwrap();
    let serve = Serve::start(&data);
    assert_eq!(find(&serve, "survivor").await.unwrap().id, created.id);
    assert_eq!(serve.terminate(), 0);
    assert!(!data.join("pg/postmaster.pid").exists());
}

/// Run as root, the cluster runs as `postgres`, which must be able to reach
/// DATA_DIR: a folder on the way that it cannot enter is named at once,
/// rather than surfacing as initdb's "Permission denied".
#[test]
fn a_data_dir_postgres_cannot_reach_is_named() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return; // Only root hands the cluster to another user.
    }
    let root = TempDir::new("identity-closed");
    std::fs::set_permissions(&root.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let output = command(&root.0.join("data")).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot enter") && stderr.contains(&*root.0.to_string_lossy()),
        "{stderr}"
    );
}

/// The mode bits of `path` (no file type).
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// DATA_DIR 0700 and its files 0600, owned so that the cluster (run as
/// `postgres` under root) works in it.
fn assert_private(data: &Path) {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(mode(data), 0o700, "DATA_DIR {}", data.display());
    for dir in ["pg", "run"] {
        assert_eq!(mode(&data.join(dir)), 0o700, "{dir}");
    }
    for file in ["postgresql.log", "identity.lock"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    if nix::unistd::geteuid().is_root() {
        let postgres = nix::unistd::User::from_name("postgres")
            .unwrap()
            .unwrap()
            .uid
            .as_raw();
        assert_eq!(std::fs::metadata(data).unwrap().uid(), postgres);
        assert_eq!(
            std::fs::metadata(data.join("postgresql.log"))
                .unwrap()
                .uid(),
            postgres
        );
    }
    // The cluster could write its log there.
    let log = std::fs::read_to_string(data.join("postgresql.log")).unwrap();
    assert!(log.contains("database system is ready"), "{log}");
}

#[test]
fn the_data_dir_is_private_from_the_first_start_and_an_open_one_is_closed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("identity-private");
    let data = dir.0.join("data");

    let serve = Serve::start(&data);
    assert_private(&data);
    assert_eq!(serve.terminate(), 0);

    // As older versions left it, or as an operator opened it.
    let open = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(&data, 0o755);
    open(&data.join("postgresql.log"), 0o644);
    open(&data.join("identity.lock"), 0o664);
    let serve = Serve::start(&data);
    assert_private(&data);
    let warned: Vec<String> = serve
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"WARN\"") && l.contains("DATA_DIR"))
        .collect();
    for path in [
        data.clone(),
        data.join("postgresql.log"),
        data.join("identity.lock"),
    ] {
        let path = std::fs::canonicalize(path).unwrap();
        assert!(
            warned.iter().any(|l| l.contains(&*path.to_string_lossy())),
            "a warning names {}: {warned:?}",
            path.display()
        );
    }
    assert_eq!(serve.terminate(), 0);
}

#[test]
fn a_sigterm_during_start_up_stops_the_service_cleanly_once_started() {
    let dir = TempDir::new("identity-early-term");
    let data = dir.0.join("data");
    let mut child = command(&data).spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines().map_while(Result::ok);
    // Logged while start-up is under way, before serving begins.
    assert!(
        lines.any(|l| l.contains("applied migrations")),
        "no start-up line"
    );
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("SIGTERM received")));
    assert!(
        !data.join("pg/postmaster.pid").exists(),
        "the cluster was stopped"
    );
}

/// A KEYS_ACTIVATION_DELAY shorter than the mesh's JWKS caches is warned
/// about at start; the default (30 minutes) is not.
#[test]
fn a_short_key_activation_delay_is_warned_about_and_the_default_is_not() {
    let warned = |delay: Option<&str>| {
        let dir = TempDir::new("identity-delay");
        let mut cmd = command(&dir.0.join("data"));
        cmd.env_remove("KEYS_ACTIVATION_DELAY");
        if let Some(d) = delay {
            cmd.env("KEYS_ACTIVATION_DELAY", d);
        }
        let serve = Serve::start_with(cmd);
        let lines = serve.log.lines();
        assert_eq!(serve.terminate(), 0);
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("KEYS_ACTIVATION_DELAY is shorter"))
    };
    assert!(warned(Some("6m")));
    assert!(!warned(None));
}
