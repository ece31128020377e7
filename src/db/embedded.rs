//! The embedded PostgreSQL cluster: what `identity serve` runs on when
//! `DATABASE_URL` is unset, and what the test harness runs on.
//!
//! One concern, kept in one file although it passes 400 lines of code: the
//! life of one cluster (lock, initdb, start, orphan and stale-pid recovery,
//! file modes, stop) is one state machine over one folder, and split up it
//! would scatter the order its steps must keep.
//!
//! The cluster lives in `DATA_DIR/pg` and listens only on a Unix socket in
//! `DATA_DIR/run` (no TCP port). Its `postgresql.conf` is the operator's,
//! between two includes identity writes at every start: its defaults
//! first (`identity-defaults.conf`, which the operator's lines override),
//! its socket settings last (`identity.conf`, which nothing overrides but
//! `ALTER SYSTEM`). When the service runs as root, PostgreSQL
//! (which refuses root) runs as the `postgres` user, and the folders it owns
//! are handed to that user.
//!
//! What is under `DATA_DIR` is private: the server's log holds usernames and
//! emails (in failed statements, for one). `DATA_DIR` is made mode 0700 and
//! its files (the log, the lock) 0600, owned by the user that runs the
//! cluster; the data folder and the socket folder are 0700 as PostgreSQL
//! wants them. A `DATA_DIR` found open to others (one made by an older
//! version, or by hand) is closed at start with a warning in the log,
//! rather than refused: refusing would stop every existing installation at
//! its first upgrade, for a fix the service can make itself. A lock file, held for the life of the process,
//! tells a second service on the same `DATA_DIR` to go away, and lets the
//! holder treat a postmaster still running as an orphan of a killed run.
//!
//! Everything here blocks: call it from `spawn_blocking` or before the
//! runtime starts.

use std::{
    fs::{self, File, TryLockError},
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The OS user PostgreSQL runs as when the service runs as root.
const POSTGRES_OS_USER: &str = "postgres";
/// The database superuser of the embedded cluster.
pub const SUPERUSER: &str = "postgres";
/// Unix socket paths are limited to 107 bytes (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;
const SOCKET_FILE: &str = ".s.PGSQL.5432";
/// identity's choices, which the operator's `postgresql.conf` overrides.
const DEFAULTS_FILE: &str = "identity-defaults.conf";
/// What identity holds whatever `postgresql.conf` says: the socket.
const HELD_FILE: &str = "identity.conf";
/// The first lines of `postgresql.conf`.
const DEFAULTS_INCLUDE: [&str; 5] = [
    "# identity's defaults: a setting below this line overrides them. When identity",
    "# first laid this file out, it commented out the lines below that set one of",
    "# them (initdb's, or an edit that identity.conf used to override): they had no",
    "# effect until then. Uncomment one, or add a line, to override identity's value.",
    "include_if_exists = 'identity-defaults.conf'",
];
/// The last lines of `postgresql.conf`: a plain `include`, so that a
/// missing file stops the server rather than let it listen on TCP.
const HELD_INCLUDE: [&str; 2] = [
    "# identity's socket settings, read last so that they hold: keep this last.",
    "include = 'identity.conf'",
];
/// What versions before the split appended (`identity.conf` then held
/// the defaults too).
const OLD_INCLUDE: &str = "include_if_exists = 'identity.conf'";
/// The server binaries, which `PG_BIN_DIR` must hold.
pub const SERVER_TOOLS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// The client tools `identity backup` and `identity restore` run.
pub const DUMP_TOOLS: [&str; 2] = ["pg_dump", "pg_restore"];

/// Why the embedded cluster could not be set up, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No `initdb`/`pg_ctl`/`postgres` found.
    #[error(
        "no PostgreSQL server binaries found (looked on PATH and in /usr/lib/postgresql/*/bin); \
         install PostgreSQL (e.g. apt-get install postgresql), set PG_BIN_DIR, or set DATABASE_URL"
    )]
    NoBinaries,
    /// `PG_BIN_DIR` names a folder without the tools needed.
    #[error("invalid value for PG_BIN_DIR: {0}: {1}")]
    BinDir(PathBuf, String),
    /// A client tool (`pg_dump`, `pg_restore`) is missing beside the server's.
    #[error(
        "{0} not found: identity backs up and restores with the pg_dump and pg_restore \
         beside the cluster's server (set PG_BIN_DIR to a folder holding both)"
    )]
    NoTool(PathBuf),
    /// DATA_DIR holds no cluster (yet).
    #[error("DATA_DIR {0} holds no PostgreSQL cluster")]
    NoCluster(PathBuf),
    /// The socket path would exceed the kernel's limit.
    #[error(
        "DATA_DIR {0} is too long for a Unix socket path ({1} bytes, at most {MAX_SOCKET_PATH}); \
         choose a shorter DATA_DIR"
    )]
    SocketPathTooLong(PathBuf, usize),
    /// Another process holds DATA_DIR.
    #[error("DATA_DIR {0} is in use by another identity process")]
    Busy(PathBuf),
    /// A folder above DATA_DIR that the unprivileged user cannot enter.
    #[error(
        "the '{POSTGRES_OS_USER}' user, which runs PostgreSQL, cannot enter {0}: \
         allow it (e.g. chmod o+x) or choose a DATA_DIR it can reach"
    )]
    Unreachable(PathBuf),
    /// DATA_DIR, or a file in it, is open to other users and cannot be
    /// closed (it belongs to another user).
    #[error(
        "DATA_DIR: {path} is open to other users (mode {was:04o}) and cannot be made private \
         ({source}); make it mode {want:04o}, owned by the user that runs identity"
    )]
    NotPrivate {
        /// DATA_DIR or the file in it.
        path: PathBuf,
        /// Its mode.
        was: u32,
        /// The mode it should have.
        want: u32,
        /// Why chmod failed.
        source: io::Error,
    },
    /// Running as root with no unprivileged user to run PostgreSQL as.
    #[error("running as root, and there is no '{POSTGRES_OS_USER}' user to run PostgreSQL as")]
    NoUser,
    /// A PostgreSQL tool failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// Which step.
        what: &'static str,
        /// Its output, or the log's last lines.
        detail: String,
    },
    /// A file-system step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// How hard the cluster tries to keep committed data across a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults: what a service needs.
    Full,
    /// fsync off: for throwaway test clusters only.
    Throwaway,
}

/// A running embedded cluster. Dropping it stops the cluster.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    owner: Option<(u32, u32)>,
    running: bool,
    // Held for the life of the cluster; released when dropped.
    _lock: File,
}

impl EmbeddedPostgres {
    /// Initialises (first run) and starts the cluster under `data_dir`.
    pub fn start(
        data_dir: &Path,
        bin_dir: Option<&Path>,
        durability: Durability,
    ) -> Result<Self, EmbeddedError> {
        let bin_dir = resolve_bin_dir(bin_dir)?;
        mkdir_private(data_dir)?;
        let data_dir = fs::canonicalize(data_dir).map_err(io_err("resolving", data_dir))?;
        restrict(&data_dir, PRIVATE_DIR)?;
        let socket_dir = data_dir.join("run");
        let socket_len = socket_dir.join(SOCKET_FILE).as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(EmbeddedError::SocketPathTooLong(data_dir, socket_len));
        }

        let lock_path = data_dir.join("identity.lock");
        let lock = create_private_file(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(EmbeddedError::Busy(data_dir)),
            Err(TryLockError::Error(e)) => return Err(io_err("locking", &lock_path)(e)),
        }

        let owner = cluster_owner()?;

        if let Some((uid, gid)) = owner
            && let Some(blocked) = data_dir
                .ancestors()
                .skip(1)
                .find(|dir| !can_enter(dir, uid, gid))
        {
            return Err(EmbeddedError::Unreachable(blocked.to_owned()));
        }

        let mut pg = Self {
            bin_dir,
            pgdata: data_dir.join("pg"),
            socket_dir,
            log_file: data_dir.join("postgresql.log"),
            owner,
            running: false,
            _lock: lock,
        };
        // Mode 0700: the cluster's user must own DATA_DIR to reach its
        // folders and its log inside.
        pg.chown(&data_dir)?;
        pg.prepare_dir(&pg.socket_dir.clone())?;
        if !pg.pgdata.join("PG_VERSION").exists() {
            pg.initdb(&data_dir)?;
        }
        pg.write_config(durability)?;
        pg.clear_orphan()?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// A connection URL for `database` over the cluster's socket.
    pub fn url(&self, database: &str) -> String {
        socket_url(&self.socket_dir, database)
    }

    /// Stops the cluster (fast shutdown: sessions are ended, committed data
    /// is kept) and waits until it is gone.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let postmaster = self.postmaster_pid();
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])?;
        if !out.status.success() {
            return Err(EmbeddedError::Command {
                what: "pg_ctl stop",
                detail: output_text(&out),
            });
        }
        // pg_ctl returns once postmaster.pid is gone, which the postmaster
        // removes just before it exits: wait for the process itself, so that
        // none is left when the service has exited.
        if let Some(pid) = postmaster {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while process_running(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// The postmaster's process id, from the first line of `postmaster.pid`.
    fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.pgdata.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    fn initdb(&self, data_dir: &Path) -> Result<(), EmbeddedError> {
        // initdb into a side folder and rename it into place, so that a run
        // killed half-way leaves nothing that looks like a cluster.
        let staging = data_dir.join("pg.initdb");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("removing", &staging))?;
        }
        let mut last = None;
        for locale in ["C.UTF-8", "C"] {
            self.prepare_dir(&staging)?;
            let out = self
                .command("initdb")
                .arg("-D")
                .arg(&staging)
                .args([
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ])
                .arg(format!("--locale={locale}"))
                .output()
                .map_err(io_err("running", &self.bin_dir.join("initdb")))?;
            if out.status.success() {
                fs::rename(&staging, &self.pgdata).map_err(io_err("renaming", &staging))?;
                return Ok(());
            }
            last = Some(output_text(&out));
            fs::remove_dir_all(&staging).map_err(io_err("removing", &staging))?;
        }
        Err(EmbeddedError::Command {
            what: "initdb",
            detail: last.unwrap_or_default(),
        })
    }

    /// Writes identity's two settings files and puts their includes in
    /// place in `postgresql.conf`: `identity-defaults.conf` at the top,
    /// so that the operator's own lines below override its values, and
    /// `identity.conf` at the end, so that nothing before it moves the
    /// cluster off its socket. A `postgresql.conf` laid out by an older
    /// version (one include, at the end, of a file that held both kinds)
    /// is laid out again.
    fn write_config(&self, durability: Durability) -> Result<(), EmbeddedError> {
        let mut defaults = String::from(
            "# Written by identity at every start. Included at the top of postgresql.conf:\n\
             # a setting given again in postgresql.conf overrides the value here.\n\
             max_connections = 200\n\
             timezone = 'UTC'\n",
        );
        if durability == Durability::Throwaway {
            defaults.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let held = format!(
            "# Written by identity at every start. Included at the end of postgresql.conf,\n\
             # so these hold whatever it says: identity reaches the cluster only here.\n\
             listen_addresses = ''\n\
             port = 5432\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n",
            self.socket_dir.to_string_lossy().replace('\'', "''")
        );
        for (name, text) in [(DEFAULTS_FILE, &defaults), (HELD_FILE, &held)] {
            let path = self.pgdata.join(name);
            fs::write(&path, text).map_err(io_err("writing", &path))?;
            self.chown(&path)?;
        }

        let main = self.pgdata.join("postgresql.conf");
        let text = fs::read_to_string(&main).map_err(io_err("reading", &main))?;
        let arranged = arrange_main_config(&text, &defaults);
        if arranged != text {
            // Beside it and renamed into place: a crash half-way must not
            // leave the cluster without its configuration.
            let staging = self.pgdata.join("postgresql.conf.identity-new");
            let _ = fs::remove_file(&staging);
            create_private_file(&staging)?;
            fs::write(&staging, arranged).map_err(io_err("writing", &staging))?;
            self.chown(&staging)?;
            fs::rename(&staging, &main).map_err(io_err("renaming", &staging))?;
        }
        Ok(())
    }

    /// The cluster's client tools, run as it is run.
    pub fn client(&self) -> Client {
        Client {
            bin_dir: client_dir(&self.bin_dir),
            socket_dir: self.socket_dir.clone(),
            owner: self.owner,
        }
    }

    /// We hold the lock, so a postmaster still running on this folder is the
    /// orphan of a killed run: stop it. A `postmaster.pid` with no server
    /// behind it is stale: remove it.
    fn clear_orphan(&self) -> Result<(), EmbeddedError> {
        let pid_file = self.pgdata.join("postmaster.pid");
        if !pid_file.exists() {
            return Ok(());
        }
        let status = self.pg_ctl(&["status"])?;
        if status.status.success() {
            tracing::warn!("stopping a PostgreSQL server left running by an earlier run");
            let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])?;
            if !out.status.success() {
                return Err(EmbeddedError::Command {
                    what: "pg_ctl stop (orphan)",
                    detail: output_text(&out),
                });
            }
        }
        if pid_file.exists() {
            tracing::warn!("removing a stale postmaster.pid");
            fs::remove_file(&pid_file).map_err(io_err("removing", &pid_file))?;
        }
        Ok(())
    }

    fn pg_ctl_start(&mut self) -> Result<(), EmbeddedError> {
        // pg_ctl appends to it, keeping its mode and owner.
        create_private_file(&self.log_file)?;
        self.chown(&self.log_file)?;
        let log = self.log_file.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["start", "-w", "-t", "120", "-l", &log])?;
        if !out.status.success() {
            return Err(EmbeddedError::Command {
                what: "pg_ctl start",
                detail: format!("{}\n{}", output_text(&out), tail(&self.log_file, 20)),
            });
        }
        self.running = true;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output, EmbeddedError> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.pgdata)
            .args(args)
            .output()
            .map_err(io_err("running", &self.bin_dir.join("pg_ctl")))
    }

    fn command(&self, tool: &str) -> Command {
        command_as(&self.bin_dir, &self.socket_dir, self.owner, tool)
    }

    /// Creates `dir` (mode 0700) owned by PostgreSQL's user.
    fn prepare_dir(&self, dir: &Path) -> Result<(), EmbeddedError> {
        mkdir(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting the mode of", dir))?;
        self.chown(dir)
    }

    fn chown(&self, path: &Path) -> Result<(), EmbeddedError> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err("changing the owner of", path))?;
        }
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "could not stop the embedded PostgreSQL");
        }
    }
}

/// Where the client tools of the server in `bin_dir` are: there, or, when
/// `bin_dir` holds only links to the server's binaries (a folder on PATH),
/// in the folder its `postgres` really is in, with the rest of its version.
fn client_dir(bin_dir: &Path) -> PathBuf {
    if DUMP_TOOLS.iter().all(|tool| bin_dir.join(tool).is_file()) {
        return bin_dir.to_owned();
    }
    fs::canonicalize(bin_dir.join("postgres"))
        .ok()
        .and_then(|server| server.parent().map(Path::to_owned))
        .filter(|dir| DUMP_TOOLS.iter().all(|tool| dir.join(tool).is_file()))
        .unwrap_or_else(|| bin_dir.to_owned())
}

/// `tool` of `bin_dir`, run as the cluster's OS user (`owner`, when this
/// process is root) from `socket_dir`.
fn command_as(bin_dir: &Path, socket_dir: &Path, owner: Option<(u32, u32)>, tool: &str) -> Command {
    let mut cmd = Command::new(bin_dir.join(tool));
    // The working folder must be one PostgreSQL's user can enter.
    cmd.current_dir(socket_dir);
    cmd.env_remove("PGDATA").env("LC_ALL", "C");
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        // std drops root's supplementary groups when it sets a uid.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// The client tools of a cluster (`pg_dump`, `pg_restore`): those beside
/// its server, run as the OS user that runs it (`postgres` under root; the
/// socket's folder is open to that user only), against its socket.
#[derive(Debug, Clone)]
pub struct Client {
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    owner: Option<(u32, u32)>,
}

impl Client {
    /// The tools for the cluster another process runs under `data_dir`
    /// (the service, whose lock makes [`EmbeddedPostgres::start`] answer
    /// [`EmbeddedError::Busy`]): `None` when its socket is not there.
    pub fn of_running(
        data_dir: &Path,
        bin_dir: Option<&Path>,
    ) -> Result<Option<Self>, EmbeddedError> {
        let bin_dir = resolve_bin_dir(bin_dir)?;
        let Ok(data_dir) = fs::canonicalize(data_dir) else {
            return Ok(None);
        };
        let socket_dir = data_dir.join("run");
        if !socket_dir.join(SOCKET_FILE).exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            bin_dir: client_dir(&bin_dir),
            socket_dir,
            owner: cluster_owner()?,
        }))
    }

    /// A connection URL for `database` over the cluster's socket.
    pub fn url(&self, database: &str) -> String {
        socket_url(&self.socket_dir, database)
    }

    /// `tool` connecting to `database`: the connection's parameters go
    /// in `PG*` environment variables (those of this process are not
    /// passed on), none on its command line.
    pub fn command(&self, tool: &str, database: &str) -> Result<Command, EmbeddedError> {
        let path = self.bin_dir.join(tool);
        if !path.is_file() {
            return Err(EmbeddedError::NoTool(path));
        }
        let mut cmd = command_as(&self.bin_dir, &self.socket_dir, self.owner, tool);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                cmd.env_remove(name);
            }
        }
        cmd.env("PGHOST", &self.socket_dir)
            .env("PGPORT", "5432")
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", database);
        Ok(cmd)
    }
}

/// Whether the user `uid` (group `gid`) may enter `dir`, by its mode bits.
fn can_enter(dir: &Path, uid: u32, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(dir) else {
        return true; // Let the step that needs it report the real error.
    };
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    SERVER_TOOLS.iter().all(|tool| dir.join(tool).is_file())
}

/// Why `dir`, given as `PG_BIN_DIR`, cannot serve: not a folder, or
/// without some of `tools`.
pub fn check_bin_dir(dir: &Path, tools: &[&str]) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("no such folder".to_owned());
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !dir.join(tool).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} missing (a folder of PostgreSQL's binaries, such as /usr/lib/postgresql/15/bin)",
            missing.join(", ")
        ))
    }
}

/// `PG_BIN_DIR` when set (checked), else the binaries found.
fn resolve_bin_dir(bin_dir: Option<&Path>) -> Result<PathBuf, EmbeddedError> {
    match bin_dir {
        Some(dir) => match check_bin_dir(dir, &SERVER_TOOLS) {
            Ok(()) => Ok(dir.to_owned()),
            Err(why) => Err(EmbeddedError::BinDir(dir.to_owned(), why)),
        },
        None => find_binaries().ok_or(EmbeddedError::NoBinaries),
    }
}

/// The OS user (uid, gid) the cluster runs as: `postgres` when this process
/// is root (PostgreSQL refuses root), else this process's own (`None`).
fn cluster_owner() -> Result<Option<(u32, u32)>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(POSTGRES_OS_USER)
        .ok()
        .flatten()
        .ok_or(EmbeddedError::NoUser)?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

/// `postgresql.conf` with identity's includes where they belong: the
/// defaults' first, the socket's last, every other line kept in its order
/// (the old single include at the end dropped). The first time (no
/// defaults' include yet: a new cluster, or one laid out by an older
/// version), the lines that set a parameter of `defaults` are commented
/// out: until now they had no effect (identity.conf overrode them, or
/// initdb wrote them for identity to override), and the start must not
/// change what the cluster runs with. Laying out its own output again
/// changes nothing.
fn arrange_main_config(text: &str, defaults: &str) -> String {
    let include = DEFAULTS_INCLUDE[DEFAULTS_INCLUDE.len() - 1];
    let first_time = !text.lines().any(|l| l.trim() == include);
    let ours = |line: &str| {
        let line = line.trim();
        line == OLD_INCLUDE || DEFAULTS_INCLUDE.contains(&line) || HELD_INCLUDE.contains(&line)
    };
    let chosen: Vec<&str> = defaults
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let sets_chosen = |line: &str| {
        let line = line.trim_start();
        chosen.iter().any(|name| {
            line.get(..name.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(name))
                && line[name.len()..].starts_with([' ', '\t', '='])
        })
    };
    let mut body: Vec<String> = text
        .lines()
        .filter(|l| !ours(l))
        .map(|l| {
            if first_time && sets_chosen(l) {
                format!("#{l}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    while body.last().is_some_and(|l| l.trim().is_empty()) {
        body.pop();
    }
    let first = body.iter().position(|l| !l.trim().is_empty());
    let body = &body[first.unwrap_or(body.len())..];
    let mut out = DEFAULTS_INCLUDE.join("\n");
    out.push_str("\n\n");
    for line in body {
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&HELD_INCLUDE.join("\n"));
    out.push('\n');
    out
}

/// Looks on PATH, then in Debian's and the source build's usual folders,
/// newest major version first.
pub fn find_binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| has_server_binaries(d)))
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server_binaries(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .or_else(|| Some(PathBuf::from("/usr/local/pgsql/bin")).filter(|d| has_server_binaries(d)))
}

fn mkdir(dir: &Path) -> Result<(), EmbeddedError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))
}

/// The mode of `DATA_DIR` and the folders in it.
const PRIVATE_DIR: u32 = 0o700;
/// The mode of the files in `DATA_DIR`.
const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` with mode 0700 (its parents as usual: PostgreSQL's user
/// must be able to pass through them).
fn mkdir_private(dir: &Path) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        mkdir(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("creating", dir)(e)),
    }
}

/// Opens `path` for writing, created with mode 0600 when missing, and made
/// 0600 when it was more open.
fn create_private_file(path: &Path) -> Result<File, EmbeddedError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE)
        .open(path)
        .map_err(io_err("creating", path))?;
    restrict(path, PRIVATE_FILE)?;
    Ok(file)
}

/// Takes every permission of group and others off `path` (to `mode`), with a
/// warning naming it, when it had any. A symbolic link is left alone (its
/// target is someone else's choice), as is a path that does not exist.
fn restrict(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading the mode of", path)(e)),
    };
    let was = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() || was & 0o077 == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        EmbeddedError::NotPrivate {
            path: path.to_owned(),
            was,
            want: mode,
            source,
        }
    })?;
    tracing::warn!(
        path = %path.display(),
        was = %format!("{was:04o}"),
        now = %format!("{mode:04o}"),
        "DATA_DIR: other users could read or enter this; now only its owner can"
    );
    Ok(())
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError {
    let path = path.to_owned();
    move |source| EmbeddedError::Io { what, path, source }
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text.push('\n');
        text.push_str(stdout.trim());
    }
    text
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `data_dir` holds a cluster (made by a first start).
pub fn has_cluster(data_dir: &Path) -> bool {
    data_dir.join("pg").join("PG_VERSION").is_file()
}

/// The URL of `database` on a cluster that another process runs under
/// `data_dir`, when its socket is there.
pub fn running_cluster_url(data_dir: &Path, database: &str) -> Option<String> {
    let socket_dir = fs::canonicalize(data_dir).ok()?.join("run");
    socket_dir
        .join(SOCKET_FILE)
        .exists()
        .then(|| socket_url(&socket_dir, database))
}

fn socket_url(socket_dir: &Path, database: &str) -> String {
    format!(
        "postgres://{SUPERUSER}@/{database}?host={}",
        percent_encode(&socket_dir.to_string_lossy())
    )
}

/// Percent-encodes a socket folder for the `host` parameter of a URL.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn process_running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_others_could_open_is_closed_and_the_rest_left_alone() {
        let root = std::env::temp_dir().join(format!("identity-modes-{}", uuid::Uuid::now_v7()));
        let data = root.join("a/data");
        mkdir_private(&data).unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&data), 0o700, "made private");
        mkdir_private(&data).unwrap();

        let log = data.join("postgresql.log");
        create_private_file(&log).unwrap();
        assert_eq!(mode(&log), 0o600, "created private");
        fs::write(&log, "kept").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).unwrap();
        create_private_file(&log).unwrap();
        assert_eq!(mode(&log), 0o600, "closed");
        assert_eq!(fs::read_to_string(&log).unwrap(), "kept", "not truncated");

        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        restrict(&data, PRIVATE_DIR).unwrap();
        assert_eq!(mode(&data), 0o700);

        // A link's target is not ours to change; a missing path is no error.
        let target = root.join("elsewhere.log");
        fs::write(&target, "").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let link = data.join("linked.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        restrict(&link, PRIVATE_FILE).unwrap();
        assert_eq!(mode(&target), 0o644);
        restrict(&data.join("missing"), PRIVATE_FILE).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_old_postgresql_conf_gets_the_defaults_first_and_the_socket_last() {
        let defaults = "# comment = no\nmax_connections = 200\ntimezone = 'UTC'\n";
        let old = "# PostgreSQL configuration file\nshared_buffers = 128MB\n\
                   max_connections = 100\t\t# (change requires restart)\n\
                   #max_connections = 7\nlog_timezone = 'Etc/UTC'\n\
                   TimeZone 'Etc/UTC'\n\ninclude_if_exists = 'identity.conf'\n";
        let new = arrange_main_config(old, defaults);
        let lines: Vec<&str> = new.lines().collect();
        assert_eq!(lines[4], "include_if_exists = 'identity-defaults.conf'");
        assert_eq!(lines[lines.len() - 1], "include = 'identity.conf'");
        assert!(!new.contains(OLD_INCLUDE), "{new}");
        // What had no effect is commented out, the rest kept as it was.
        for line in [
            "shared_buffers = 128MB",
            "#max_connections = 100\t\t# (change requires restart)",
            "#max_connections = 7",
            "log_timezone = 'Etc/UTC'",
            "#TimeZone 'Etc/UTC'",
        ] {
            let at = lines.iter().position(|l| *l == line);
            assert!(
                at.is_some_and(|at| at > 4 && at < lines.len() - 2),
                "{line}: {new}"
            );
        }
        assert_eq!(
            arrange_main_config(&new, defaults),
            new,
            "laid out once for all"
        );

        // From now on the operator's lines count, wherever they are, and
        // the socket's include goes back to the end.
        let edited = format!("{new}max_connections = 57\n");
        let again = arrange_main_config(&edited, defaults);
        assert!(
            again.ends_with(&format!(
                "max_connections = 57\n\n{}\n",
                HELD_INCLUDE.join("\n")
            )),
            "{again}"
        );
    }

    #[test]
    fn a_pg_bin_dir_without_the_tools_is_named_with_what_it_lacks() {
        assert_eq!(
            check_bin_dir(Path::new("/nonexistent"), &SERVER_TOOLS).unwrap_err(),
            "no such folder"
        );
        let why = check_bin_dir(Path::new("/"), &SERVER_TOOLS).unwrap_err();
        assert!(why.starts_with("initdb, pg_ctl, postgres missing"), "{why}");
    }

    #[test]
    fn socket_folders_with_odd_characters_are_encoded() {
        assert_eq!(percent_encode("/tmp/a b/run"), "/tmp/a%20b/run");
        assert_eq!(percent_encode("/srv/id&x"), "/srv/id%26x");
    }
}
