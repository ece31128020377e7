//! `identity backup`, `identity restore` and `identity after-restore`.
//!
//! The first two work on the embedded cluster only. `pg_dump` and
//! `pg_restore` are those beside the cluster's server, run as the OS user
//! that runs it (`postgres` when identity runs as root), against its
//! socket; identity itself writes the dump file and reads it, through
//! pipes, so the file may be anywhere the caller can reach, and a dump
//! that fails half-way leaves no file behind. A restore goes into a
//! database of its own, migrated and cleaned (`db::restore`) there, and
//! replaces `identity` only once all of that succeeded.
//!
//! With `DATABASE_URL` they refuse: such a database has its own backups
//! (its provider's snapshots and point-in-time recovery, or `pg_dump` of
//! its own version), a restore there needs rights (CREATE DATABASE, a
//! rename) that identity's role should not hold, and passing its
//! credentials on to another program is a risk better left to the
//! operator. `after-restore` works on both.

use std::{
    fs,
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
    process::{Child, Stdio},
};

use clap::Args;

use super::admin::admin_database;
use crate::app::StartupError;
use crate::config::Config;
use crate::db::{
    self,
    embedded::{Client, Durability, EmbeddedError, EmbeddedPostgres},
    restore::AfterRestore,
};

/// The embedded cluster's database.
const DATABASE: &str = "identity";
/// Where a restore is made, before it replaces [`DATABASE`].
const RESTORING: &str = "identity_restoring";
/// What [`DATABASE`] is renamed to while the restored one takes its
/// place; dropped right after.
const REPLACED: &str = "identity_replaced";
/// The first bytes of a custom-format archive of `pg_dump`.
const DUMP_MAGIC: &[u8; 5] = b"PGDMP";

#[derive(Debug, Args)]
pub(super) struct BackupArgs {
    /// The file to write, mode 0600, replaced whole (`-`: standard
    /// output).
    file: PathBuf,
    #[command(flatten)]
    pub(super) config: Config,
}

#[derive(Debug, Args)]
pub(super) struct RestoreArgs {
    /// A dump made by `identity backup` (or `pg_dump --format=custom`).
    file: PathBuf,
    #[command(flatten)]
    pub(super) config: Config,
}

#[derive(Debug, Args)]
pub(super) struct AfterRestoreArgs {
    #[command(flatten)]
    pub(super) config: Config,
}

/// Refuses `DATABASE_URL` for the commands that need the embedded cluster.
fn embedded_only(config: &Config, command: &str) -> Result<(), StartupError> {
    match config.database_url {
        Some(_) => Err(StartupError::Setting(
            "DATABASE_URL",
            format!(
                "identity {command} works on the embedded cluster only (DATABASE_URL unset); \
                 with DATABASE_URL use pg_dump or pg_restore, then identity after-restore \
                 (docs/operations.md, Backup and restore)"
            ),
        )),
        None => Ok(()),
    }
}

/// Starts the embedded cluster (blocking work, off the runtime).
async fn start_cluster(config: &Config) -> Result<EmbeddedPostgres, StartupError> {
    let data_dir = config.data_dir.clone();
    let bin_dir = config.pg_bin_dir.clone();
    tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&data_dir, bin_dir.as_deref(), Durability::Full)
    })
    .await
    .map_err(|e| StartupError::Other(e.to_string()))?
    .map_err(StartupError::Embedded)
}

/// Stops the cluster if this process started it.
async fn stop_cluster(pg: Option<EmbeddedPostgres>) -> Result<(), StartupError> {
    if let Some(mut pg) = pg {
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .map_err(|e| StartupError::Other(e.to_string()))??;
    }
    Ok(())
}

/// A tool's standard error, as one line (the CLI's errors are one line).
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "no message".to_owned()
    } else {
        lines.join("; ")
    }
}

/// Reads a child's standard error on a thread of its own, so that a tool
/// that writes much there never blocks on it while its output is read.
fn drain_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    })
}

fn spawn(cmd: &mut std::process::Command, tool: &str) -> Result<Child, StartupError> {
    cmd.spawn()
        .map_err(|e| StartupError::Other(format!("running {tool}: {e}")))
}

/// Where a backup goes: standard output, or a file written beside its
/// place and renamed into it once complete.
enum Sink {
    Stdout,
    File {
        staging: PathBuf,
        dest: PathBuf,
        file: fs::File,
        /// Renamed into place: nothing to remove.
        done: bool,
    },
}

impl Sink {
    /// Opens the staging file (mode 0600) beside `dest`: a destination
    /// that cannot be written fails here, before any database work.
    fn create(dest: &Path) -> Result<Self, StartupError> {
        use std::os::unix::fs::OpenOptionsExt;
        if dest == Path::new("-") {
            return Ok(Self::Stdout);
        }
        let failed = |e: io::Error| StartupError::Other(format!("writing {}: {e}", dest.display()));
        let name = dest
            .file_name()
            .ok_or_else(|| failed(io::Error::other("not a file name")))?;
        if dest.is_dir() {
            return Err(failed(io::Error::other("is a folder")));
        }
        let staging = dest.with_file_name(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)
            .map_err(failed)?;
        Ok(Self::File {
            staging,
            dest: dest.to_owned(),
            file,
            done: false,
        })
    }

    /// Copies `from` to the end; the bytes copied.
    fn copy_from(&mut self, from: &mut impl Read) -> io::Result<u64> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                let n = io::copy(from, &mut out)?;
                out.flush()?;
                Ok(n)
            }
            Self::File { file, .. } => io::copy(from, file),
        }
    }

    /// Flushes the file to disk and renames it into place.
    fn finish(mut self) -> Result<(), StartupError> {
        let Self::File {
            staging,
            dest,
            file,
            done,
        } = &mut self
        else {
            return Ok(());
        };
        let failed = |e: io::Error| StartupError::Other(format!("writing {}: {e}", dest.display()));
        file.sync_all().map_err(failed)?;
        fs::rename(&*staging, &*dest).map_err(failed)?;
        *done = true;
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The rename itself, on disk (best effort: some file systems
            // refuse to sync a folder).
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

/// A backup that did not finish leaves no file.
impl Drop for Sink {
    fn drop(&mut self) {
        if let Self::File {
            staging,
            done: false,
            ..
        } = self
        {
            let _ = fs::remove_file(staging);
        }
    }
}

/// Runs `pg_dump` of [`DATABASE`] into `sink`; the bytes written.
fn dump(client: &Client, mut sink: Sink) -> Result<u64, StartupError> {
    let mut cmd = client.command("pg_dump", DATABASE)?;
    cmd.args(["--format=custom", "--no-password"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut cmd, "pg_dump")?;
    let stderr = drain_stderr(&mut child);
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| StartupError::Other("pg_dump: no output".into()))?;
    let copied = sink.copy_from(&mut out);
    // Closed before the wait: a pg_dump still writing then ends (EPIPE).
    drop(out);
    let status = child
        .wait()
        .map_err(|e| StartupError::Other(format!("waiting for pg_dump: {e}")))?;
    let errors = stderr.join().unwrap_or_default();
    let written = match (copied, &sink) {
        (Err(e), Sink::File { dest, .. }) => {
            return Err(StartupError::Other(format!(
                "writing {}: {e}",
                dest.display()
            )));
        }
        (Err(e), Sink::Stdout) => {
            return Err(StartupError::Other(format!(
                "writing to standard output: {e}"
            )));
        }
        (Ok(n), _) => n,
    };
    if !status.success() {
        return Err(EmbeddedError::Command {
            what: "pg_dump",
            detail: one_line(&errors),
        }
        .into());
    }
    sink.finish()?;
    Ok(written)
}

/// `identity backup FILE`.
pub(super) async fn backup(args: BackupArgs) -> Result<(), StartupError> {
    let config = &args.config;
    embedded_only(config, "backup")?;
    if !db::embedded::has_cluster(&config.data_dir) {
        return Err(EmbeddedError::NoCluster(config.data_dir.clone()).into());
    }
    let sink = Sink::create(&args.file)?;
    // The running service's cluster, through its socket (pg_dump reads one
    // snapshot, whatever the service writes meanwhile); else started here.
    let (client, own) = match start_cluster(config).await {
        Ok(pg) => (pg.client(), Some(pg)),
        Err(StartupError::Embedded(EmbeddedError::Busy(dir))) => {
            match Client::of_running(&dir, config.pg_bin_dir.as_deref())? {
                Some(client) => (client, None),
                None => return Err(EmbeddedError::Busy(dir).into()),
            }
        }
        Err(e) => return Err(e),
    };
    let result = async {
        let version = db::migrations::newest_applied(&client.url(DATABASE))
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        let for_dump = client.clone();
        let written = tokio::task::spawn_blocking(move || dump(&for_dump, sink))
            .await
            .map_err(|e| StartupError::Other(e.to_string()))??;
        Ok::<_, StartupError>((version, written))
    }
    .await;
    let stopped = stop_cluster(own).await;
    let (version, written) = result?;
    stopped?;
    let line = format!(
        "wrote {} ({written} bytes): database {DATABASE} at migration {}",
        if args.file == Path::new("-") {
            "standard output".to_owned()
        } else {
            args.file.display().to_string()
        },
        version.as_deref().unwrap_or("none")
    );
    // Standard output carries the dump itself when FILE is `-`.
    if args.file == Path::new("-") {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Runs `pg_restore` into [`RESTORING`], fed from `file` through a pipe.
fn pg_restore(client: &Client, mut file: fs::File, path: &Path) -> Result<(), StartupError> {
    let mut cmd = client.command("pg_restore", RESTORING)?;
    cmd.args([
        "--dbname",
        RESTORING,
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--no-password",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = spawn(&mut cmd, "pg_restore")?;
    let stderr = drain_stderr(&mut child);
    let fed = match child.stdin.take() {
        Some(mut stdin) => io::copy(&mut file, &mut stdin).map(drop),
        None => Ok(()),
    };
    let status = child
        .wait()
        .map_err(|e| StartupError::Other(format!("waiting for pg_restore: {e}")))?;
    let errors = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(EmbeddedError::Command {
            what: "pg_restore",
            detail: one_line(&errors),
        }
        .into());
    }
    // pg_restore may stop reading once it has what it needs; a broken
    // pipe after its success is no error, a file that failed to read is.
    match fed {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(StartupError::Other(format!(
            "reading {}: {e}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// What a restore did, to tell.
struct Restored {
    version: String,
    /// Whether there was a database to replace.
    replaced: bool,
    applied: Vec<String>,
    cleaned: AfterRestore,
}

/// The restore proper, on a cluster this process runs: into [`RESTORING`],
/// migrated and cleaned there, then swapped in for [`DATABASE`].
async fn restore_into(
    pg: &EmbeddedPostgres,
    file: fs::File,
    path: &Path,
) -> Result<Restored, StartupError> {
    let database = |e: db::Error| StartupError::Database(e.into());
    let admin = pg.url("postgres");
    // Left by a run that was killed: neither holds anything to keep.
    db::admin::drop_database(&admin, RESTORING)
        .await
        .map_err(database)?;
    db::admin::drop_database(&admin, REPLACED)
        .await
        .map_err(database)?;
    db::admin::create_empty_database(&admin, RESTORING)
        .await
        .map_err(database)?;

    let client = pg.client();
    let owned_path = path.to_owned();
    tokio::task::spawn_blocking(move || pg_restore(&client, file, &owned_path))
        .await
        .map_err(|e| StartupError::Other(e.to_string()))??;

    let url = pg.url(RESTORING);
    let Some(version) = db::migrations::newest_applied(&url)
        .await
        .map_err(database)?
    else {
        return Err(StartupError::Other(format!(
            "{} holds no migrations table: not a dump of identity's database",
            path.display()
        )));
    };
    let applied = db::migrations::run_pending(&url).await.map_err(database)?;
    let cleaned = clean(&url, "identity restore").await?;
    let replaced = db::admin::swap_database(&admin, RESTORING, DATABASE, REPLACED)
        .await
        .map_err(database)?;
    db::admin::drop_database(&admin, REPLACED)
        .await
        .map_err(database)?;
    Ok(Restored {
        version,
        replaced,
        applied,
        cleaned,
    })
}

/// `identity restore FILE`.
pub(super) async fn restore(args: RestoreArgs) -> Result<(), StartupError> {
    let config = &args.config;
    embedded_only(config, "restore")?;
    let path = &args.file;
    let mut file = fs::File::open(path)
        .map_err(|e| StartupError::Other(format!("reading {}: {e}", path.display())))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut magic = [0u8; DUMP_MAGIC.len()];
    if file.read_exact(&mut magic).is_err() || &magic != DUMP_MAGIC {
        return Err(StartupError::Setting(
            "restore",
            format!(
                "{} is not a dump made by identity backup (pg_dump --format=custom)",
                path.display()
            ),
        ));
    }
    file.rewind()
        .map_err(|e| StartupError::Other(format!("reading {}: {e}", path.display())))?;

    let pg = match start_cluster(config).await {
        Ok(pg) => pg,
        Err(StartupError::Embedded(EmbeddedError::Busy(dir))) => {
            return Err(StartupError::Other(format!(
                "DATA_DIR {} is in use by a running identity: stop identity first \
                 (a restore replaces the database under it)",
                dir.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let result = restore_into(&pg, file, path).await;
    if result.is_err() {
        // The old database is untouched; the half-made one goes.
        let _ = db::admin::drop_database(&pg.url("postgres"), RESTORING).await;
    }
    let stopped = stop_cluster(Some(pg)).await;
    let restored = result?;
    stopped?;
    println!(
        "restored {} ({size} bytes, database at migration {}) into DATA_DIR {}{}",
        path.display(),
        restored.version,
        config.data_dir.display(),
        if restored.replaced {
            "; the database it replaced is dropped"
        } else {
            ""
        }
    );
    for version in &restored.applied {
        println!("applied {version}");
    }
    report(&restored.cleaned);
    Ok(())
}

/// [`db::restore::after_restore`] in one transaction of its own, recorded
/// in the change feed as made by `command`.
async fn clean(url: &str, command: &str) -> Result<AfterRestore, StartupError> {
    let mut conn = db::connect::establish(url)
        .await
        .map_err(|e| StartupError::Database(db::Error::from(e).into()))?;
    let origin = super::import::command_origin(command);
    db::changes::transaction(&mut conn, &origin, async |conn| {
        db::restore::after_restore(conn).await
    })
    .await
    .map_err(|e: db::Error| StartupError::Database(e.into()))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Tells what [`db::restore::after_restore`] did, one line each.
fn report(done: &AfterRestore) {
    println!(
        "ended {} (reason RESTORED)",
        plural(done.sessions_ended, "session", "sessions")
    );
    println!(
        "spent {} and {}",
        plural(
            done.reset_tokens_spent,
            "password reset token",
            "password reset tokens"
        ),
        plural(
            done.verification_tokens_spent,
            "email verification token",
            "email verification tokens"
        )
    );
    println!(
        "dropped {}",
        plural(
            done.mfa_challenges_dropped,
            "login waiting for its second factor",
            "logins waiting for their second factor"
        )
    );
    if done.foreign_changes_moved > 0 {
        println!(
            "moved {} of another cluster below the restart of the change feed",
            plural(
                done.foreign_changes_moved,
                "change feed entry",
                "change feed entries"
            )
        );
    }
    println!("restarted the change feed: cursors from before get CURSOR_EXPIRED");
}

/// `identity after-restore`.
pub(super) async fn after_restore(args: AfterRestoreArgs) -> Result<(), StartupError> {
    let database = admin_database(&args.config).await?;
    let result = async {
        db::migrations::run_pending(&database.url)
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        clean(&database.url, "identity after-restore").await
    }
    .await;
    let closed = database.close().await;
    let done = result?;
    closed?;
    report(&done);
    Ok(())
}
