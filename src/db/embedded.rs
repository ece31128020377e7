//! The embedded PostgreSQL cluster: what `identity serve` runs on when
//! `DATABASE_URL` is unset, and what the test harness runs on.
//!
//! One concern, kept in one file although it passes 400 lines of code: the
//! life of one cluster (lock, initdb, start, orphan and stale-pid recovery,
//! file modes, stop) is one state machine over one folder, and split up it
//! would scatter the order its steps must keep.
//!
//! The cluster lives in `DATA_DIR/pg` and listens only on a Unix socket in
//! `DATA_DIR/run` (no TCP port). When the service runs as root, PostgreSQL
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

/// Why the embedded cluster could not be set up, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No `initdb`/`pg_ctl`/`postgres` found.
    #[error(
        "no PostgreSQL server binaries found (looked on PATH and in /usr/lib/postgresql/*/bin); \
         install PostgreSQL (e.g. apt-get install postgresql), set PG_BIN_DIR, or set DATABASE_URL"
    )]
    NoBinaries,
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
        let bin_dir = match bin_dir {
            Some(dir) if has_server_binaries(dir) => dir.to_owned(),
            Some(_) => return Err(EmbeddedError::NoBinaries),
            None => find_binaries().ok_or(EmbeddedError::NoBinaries)?,
        };
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

        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name(POSTGRES_OS_USER)
                .ok()
                .flatten()
                .ok_or(EmbeddedError::NoUser)?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };

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

    fn write_config(&self, durability: Durability) -> Result<(), EmbeddedError> {
        // Settings identity owns live in their own file, rewritten at every
        // start; postgresql.conf includes it once.
        let ours = self.pgdata.join("identity.conf");
        let mut conf = format!(
            "# Written by identity at every start; edit postgresql.conf instead.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n\
             max_connections = 200\n\
             timezone = 'UTC'\n",
            self.socket_dir.to_string_lossy().replace('\'', "''")
        );
        if durability == Durability::Throwaway {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        fs::write(&ours, conf).map_err(io_err("writing", &ours))?;
        self.chown(&ours)?;

        let main = self.pgdata.join("postgresql.conf");
        let text = fs::read_to_string(&main).map_err(io_err("reading", &main))?;
        let include = "include_if_exists = 'identity.conf'";
        if !text.contains(include) {
            fs::write(&main, format!("{text}\n{include}\n")).map_err(io_err("writing", &main))?;
        }
        Ok(())
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
        let mut cmd = Command::new(self.bin_dir.join(tool));
        // The working folder must be one PostgreSQL's user can enter.
        cmd.current_dir(&self.socket_dir);
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            // std drops root's supplementary groups when it sets a uid.
            cmd.uid(uid).gid(gid);
        }
        cmd
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
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
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
    fn socket_folders_with_odd_characters_are_encoded() {
        assert_eq!(percent_encode("/tmp/a b/run"), "/tmp/a%20b/run");
        assert_eq!(percent_encode("/srv/id&x"), "/srv/id%26x");
    }
}
