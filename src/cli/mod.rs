//! The `identity` command: every admin task is a subcommand, every setting an
//! environment variable (see [`crate::config`]). This file holds the
//! command line and its dispatch; each family of subcommands has a file:
//! `serve.rs` (the service and its stop signals), `admin.rs` (migrate,
//! createsuperuser, keys, and the admin database they share),
//! `import.rs` (the JSON Lines reader of `identity import`),
//! `changes.rs` (a gRPC client printing the change feed),
//! `passwords.rs` (the breached-password list, built offline) and
//! `backup.rs` (backup, restore and after-restore).

mod admin;
mod apikeys;
mod backup;
mod changes;
mod healthcheck;
mod import;
mod passwords;
mod serve;

pub use serve::shutdown_signal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

use admin::{CreateSuperuserArgs, KeysArgs, MigrateArgs};
use changes::ChangesArgs;
use import::ImportArgs;

/// identity: users, groups, logins and JWT access tokens over gRPC.
#[derive(Debug, Parser)]
#[command(name = "identity", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the service; applies pending migrations first.
    Serve(Config),
    /// Applies pending migrations, or shows or reverts them.
    Migrate(MigrateArgs),
    /// Creates a superuser. The password comes from IDENTITY_PASSWORD or
    /// standard input, never from a flag.
    #[command(name = "createsuperuser")]
    CreateSuperuser(CreateSuperuserArgs),
    /// Manages the signing keys in KEYS_DIR.
    Keys(KeysArgs),
    /// Imports users with their password hashes from a JSON Lines file:
    /// one object per line with username, email, password_hash (argon2 PHC
    /// or bcrypt $2b$) and optionally id, first_name, last_name,
    /// is_superuser, is_active, is_verified, attributes and groups (slugs).
    /// Batches of lines run in one transaction each; a run again skips the
    /// users already imported, so an interrupted import is resumed by
    /// running it again. Exits 1 when a line was refused.
    Import(ImportArgs),
    /// Prints the change feed of a running server, one line per change:
    /// who did what, when, in the feed's order (`tail -f` with --follow). A
    /// gRPC client: the server from --server / IDENTITY_SERVER, a
    /// superuser's access token from IDENTITY_TOKEN (never a flag: command
    /// lines show in `ps`). On exit the cursor to resume from (--after) is
    /// printed to standard error. Exits 1 on a refusal, 2 on a bad option.
    Changes(ChangesArgs),
    /// Makes, lists and revokes API keys on the database directly, as an
    /// administrator: `apikeys create --user U [--allow METHOD]...
    /// [--expires 90d]` prints the new secret once.
    #[command(name = "apikeys")]
    ApiKeys(apikeys::ApiKeysArgs),
    /// Asks the local service's health service (LISTEN_ADDR, or --addr):
    /// exits 0 when it answers SERVING, 1 otherwise (a container's
    /// HEALTHCHECK, an exec probe). With TLS_CERT set it speaks TLS and
    /// trusts that certificate.
    Healthcheck(healthcheck::HealthcheckArgs),
    /// The breached-password list of BREACHED_PASSWORDS_FILE, offline:
    /// `passwords build INPUT OUTPUT [--min-count N]` converts Have I Been
    /// Pwned's SHA-1 list into the compact file the service loads fastest;
    /// `passwords check FILE` loads either form as the service would.
    Passwords(passwords::PasswordsArgs),
    /// Dumps the embedded cluster's database (pg_dump --format=custom)
    /// into FILE (mode 0600, written whole or not at all; `-`: standard
    /// output), whether a service runs on it or not. Not with DATABASE_URL.
    Backup(backup::BackupArgs),
    /// Replaces the embedded cluster's database with a dump made by
    /// `backup`: refused while a service runs on it; restored into a
    /// database of its own, migrated, cleaned as by `after-restore`, and
    /// only then swapped in. Not with DATABASE_URL.
    Restore(backup::RestoreArgs),
    /// After a restore, in one transaction: ends every session, spends
    /// every account token, drops the logins waiting for a second factor
    /// and restarts the change feed; prints the counts. With DATABASE_URL
    /// or the embedded cluster, also while services run.
    #[command(name = "after-restore")]
    AfterRestore(backup::AfterRestoreArgs),
}

impl Cli {
    /// Parses the command line and environment. A bad setting ends the
    /// program here with one line naming it and exit code 2.
    pub fn parse_or_exit() -> Self {
        match Self::try_parse() {
            Ok(cli) => {
                // DATABASE_URL's TLS options and CA file: read here, so that
                // a typo is a bad setting too (the URL is never printed).
                if let Some(url) = cli.config().and_then(|c| c.database_url.as_deref())
                    && let Err(e) = crate::db::connect::Target::parse(url)
                {
                    eprintln!("identity: invalid value for DATABASE_URL: {e}");
                    std::process::exit(2);
                }
                // PG_BIN_DIR, when the embedded cluster is used: a folder
                // without the binaries is refused here, by name, rather
                // than reported later as none found.
                if let Some(config) = cli.config().filter(|c| c.database_url.is_none())
                    && let Some(dir) = config.pg_bin_dir.as_deref()
                    && !dir.as_os_str().is_empty()
                {
                    use crate::db::embedded::{DUMP_TOOLS, SERVER_TOOLS, check_bin_dir};
                    let mut tools = SERVER_TOOLS.to_vec();
                    if matches!(cli.command, Command::Backup(_) | Command::Restore(_)) {
                        tools.extend(DUMP_TOOLS);
                    }
                    if let Err(why) = check_bin_dir(dir, &tools) {
                        eprintln!(
                            "identity: invalid value for PG_BIN_DIR: {}: {why}",
                            dir.display()
                        );
                        std::process::exit(2);
                    }
                }
                cli
            }
            Err(e) => {
                use clap::error::ErrorKind::*;
                if matches!(
                    e.kind(),
                    DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
                ) {
                    e.exit();
                }
                // One line: the error and what it names, without the usage.
                let rendered = e.render().to_string();
                let line = rendered
                    .lines()
                    .take_while(|l| {
                        !l.starts_with("Usage:") && !l.starts_with("For more information")
                    })
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                eprintln!("identity: {}", line.trim_start_matches("error: "));
                std::process::exit(2);
            }
        }
    }

    /// The service settings of the chosen subcommand; none for `changes`,
    /// `healthcheck` and `passwords`, which need none of them.
    pub fn config(&self) -> Option<&Config> {
        match &self.command {
            Command::Serve(config) => Some(config),
            Command::Migrate(args) => Some(&args.config),
            Command::CreateSuperuser(args) => Some(&args.config),
            Command::Keys(args) => Some(&args.config),
            Command::Import(args) => Some(&args.config),
            Command::Changes(_) => None,
            Command::ApiKeys(args) => Some(&args.config),
            Command::Healthcheck(_) => None,
            Command::Passwords(_) => None,
            Command::Backup(args) => Some(&args.config),
            Command::Restore(args) => Some(&args.config),
            Command::AfterRestore(args) => Some(&args.config),
        }
    }

    /// How logs are written.
    pub fn log_format(&self) -> LogFormat {
        self.config().map_or(LogFormat::Text, |c| c.log_format)
    }

    /// Where spans are exported, if anywhere: only `serve` makes calls.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        match &self.command {
            Command::Serve(config) => config.otel_exporter_otlp_endpoint.as_deref(),
            _ => None,
        }
    }

    /// Where errors are reported, if anywhere.
    pub fn sentry_dsn(&self) -> Option<&str> {
        self.config().and_then(|c| c.sentry_dsn.as_deref())
    }

    /// The runtime's worker threads: `WEB_CONCURRENCY` or the cores; one
    /// for a client command, which reads one stream.
    pub fn worker_threads(&self) -> usize {
        self.config().map_or(1, Config::worker_threads)
    }

    /// Runs the subcommand.
    pub async fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Serve(config) => serve::serve(config).await,
            Command::Migrate(args) => admin::migrate(args).await,
            Command::CreateSuperuser(args) => admin::create_superuser(args).await,
            Command::Keys(args) => admin::keys(args),
            Command::Import(args) => import::import(args).await,
            Command::Changes(args) => return changes::changes(args).await,
            Command::ApiKeys(args) => apikeys::apikeys(args).await,
            Command::Healthcheck(args) => return healthcheck::healthcheck(args).await,
            Command::Passwords(args) => passwords::passwords(args).await,
            Command::Backup(args) => backup::backup(args).await,
            Command::Restore(args) => backup::restore(args).await,
            Command::AfterRestore(args) => backup::after_restore(args).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            // A bad setting found at start: one line and exit code 2, as for
            // one refused when parsed; not an event for the logs or Sentry.
            Err(
                e @ (crate::app::StartupError::Setting(..) | crate::app::StartupError::Input(_)),
            ) => {
                crate::telemetry::finish_logs();
                eprintln!("identity: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                // The whole chain: "database: database unavailable" alone
                // would hide why (the causes carry no credentials).
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    // Some errors already print their cause: say it once.
                    let cause_text = cause.to_string();
                    if !message.contains(&cause_text) {
                        message.push_str(&format!(": {cause_text}"));
                    }
                    source = cause.source();
                }
                tracing::error!(error = %message, "identity failed");
                // The log first, so that this line is the last.
                crate::telemetry::finish_logs();
                eprintln!("identity: {message}");
                ExitCode::FAILURE
            }
        }
    }
}
