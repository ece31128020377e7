//! The `identity` command: every admin task is a subcommand, every setting an
//! environment variable (see [`crate::config`]).

use std::io::Read;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{Application, Database, StartupError};
use crate::config::{Config, LogFormat};
use crate::db::{self, embedded::EmbeddedError};
use crate::domain::{Attributes, Email, Password, Username};
use crate::error::Error;
use crate::hashing::Hasher;
use crate::service::users::{NewUser, UserService};

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
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The JSON Lines file (`-`: standard input).
    file: std::path::PathBuf,
    /// Lines per transaction.
    #[arg(long, default_value = "64",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    batch_size: u32,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Args)]
struct KeysArgs {
    #[command(subcommand)]
    action: KeysAction,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Writes a key of JWT_ALGORITHM when KEYS_DIR has none of it yet.
    Generate,
    /// Writes a new key of JWT_ALGORITHM: running services publish and
    /// accept it at their next reload (SIGHUP or KEYS_RELOAD_INTERVAL) and
    /// sign with it once it is KEYS_ACTIVATION_DELAY old; the older keys
    /// keep verifying the tokens they signed.
    Rotate,
    /// Lists the keys: id, algorithm, file, and which one signs.
    List,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// List every migration and whether it is applied.
    #[arg(long, conflicts_with = "revert")]
    status: bool,
    /// Revert the last applied migration.
    #[arg(long)]
    revert: bool,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Args)]
struct CreateSuperuserArgs {
    /// The new superuser's username.
    #[arg(long)]
    username: String,
    /// The new superuser's email.
    #[arg(long)]
    email: String,
    #[command(flatten)]
    config: Config,
}

impl Cli {
    /// Parses the command line and environment. A bad setting ends the
    /// program here with one line naming it and exit code 2.
    pub fn parse_or_exit() -> Self {
        match Self::try_parse() {
            Ok(cli) => cli,
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

    /// The settings of the chosen subcommand.
    pub fn config(&self) -> &Config {
        match &self.command {
            Command::Serve(config) => config,
            Command::Migrate(args) => &args.config,
            Command::CreateSuperuser(args) => &args.config,
            Command::Keys(args) => &args.config,
            Command::Import(args) => &args.config,
        }
    }

    /// How logs are written.
    pub fn log_format(&self) -> LogFormat {
        self.config().log_format
    }

    /// Runs the subcommand.
    pub async fn run(self) -> ExitCode {
        let result = match self.command {
            Command::Serve(config) => serve(config).await,
            Command::Migrate(args) => migrate(args).await,
            Command::CreateSuperuser(args) => create_superuser(args).await,
            Command::Keys(args) => keys(args),
            Command::Import(args) => import(args).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
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
                eprintln!("identity: {message}");
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(config: Config) -> Result<(), StartupError> {
    // From the first moment, SIGHUP means "reload keys", never the default
    // "terminate": a rotation hook may fire while the service starts.
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| StartupError::Other(format!("cannot handle SIGHUP: {e}")))?;
    let stop = shutdown_signal();
    let app = Application::build(&config).await?;
    app.run_until_stopped(stop).await
}

/// Resolves on Ctrl-C or SIGTERM (what a mesh or orchestrator sends). The
/// handlers are installed when this is called, not when the future is first
/// polled (once serving starts): a SIGTERM that arrives while the service
/// starts, or just after its ready line, then stops it cleanly instead of
/// killing it with the default action and orphaning its embedded cluster.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(signal: std::io::Result<Signal>, name: &str) {
        match signal {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                std::future::pending::<()>().await;
            }
        }
    }
    let interrupt = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        tokio::select! {
            _ = received(interrupt, "SIGINT") => tracing::info!("interrupt received: shutting down"),
            _ = received(term, "SIGTERM") => tracing::info!("SIGTERM received: shutting down"),
        }
    }
}

/// The database for an admin command: like `serve`'s, but when a running
/// service owns the embedded cluster, its socket is used as it is.
async fn admin_database(config: &Config) -> Result<Database, StartupError> {
    match Database::open(config).await {
        Err(StartupError::Embedded(EmbeddedError::Busy(dir))) => {
            let url = crate::db::embedded::running_cluster_url(&dir, "identity")
                .ok_or(StartupError::Embedded(EmbeddedError::Busy(dir)))?;
            Ok(Database {
                url,
                embedded: None,
            })
        }
        other => other,
    }
}

/// Runs `work` the way every admin command that writes users does: with a
/// hasher of one thread (built first, so that argon2 settings refused
/// together fail before any database work, as in `serve`), the admin
/// database migrated, and a pool of one connection. The database is closed
/// whether `work` succeeds or fails; `work`'s error is reported before a
/// failure to close.
async fn with_admin_db<T>(
    config: &Config,
    work: impl AsyncFnOnce(db::Pool, Hasher) -> Result<T, StartupError>,
) -> Result<T, StartupError> {
    let hasher = Hasher::new(config.hash_params(), 1, 1)?;
    let database = admin_database(config).await?;
    let result = async {
        db::migrations::run_pending(&database.url)
            .await
            .map_err(|e| StartupError::Database(e.into()))?;
        let pool = db::pool(&database.url, 1).map_err(|e| StartupError::Database(e.into()))?;
        work(pool, hasher).await
    }
    .await;
    let closed = database.close().await;
    let value = result?;
    closed?;
    Ok(value)
}

async fn migrate(args: MigrateArgs) -> Result<(), StartupError> {
    let database = admin_database(&args.config).await?;
    let result = if args.status {
        db::migrations::status(&database.url).await.map(|all| {
            for m in all {
                println!("{} {}", if m.applied { "[X]" } else { "[ ]" }, m.version);
            }
        })
    } else if args.revert {
        db::migrations::revert_last(&database.url)
            .await
            .map(|v| println!("reverted {v}"))
    } else {
        db::migrations::run_pending(&database.url)
            .await
            .map(|applied| {
                if applied.is_empty() {
                    println!("no pending migrations");
                }
                for v in applied {
                    println!("applied {v}");
                }
            })
    };
    let closed = database.close().await;
    result.map_err(|e| StartupError::Database(e.into()))?;
    closed
}

async fn create_superuser(args: CreateSuperuserArgs) -> Result<(), StartupError> {
    let invalid = |field: &str, e: String| StartupError::Other(format!("invalid {field}: {e}"));
    let username = Username::parse(&args.username).map_err(|e| invalid("username", e))?;
    let email = Email::parse(&args.email).map_err(|e| invalid("email", e))?;
    let raw = match std::env::var("IDENTITY_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let mut p = String::new();
            std::io::stdin()
                .read_to_string(&mut p)
                .map_err(|e| StartupError::Other(format!("reading the password: {e}")))?;
            // One line from a pipe or a terminal: its line ending is not part of it.
            p.strip_suffix('\n')
                .map(|p| p.strip_suffix('\r').unwrap_or(p))
                .unwrap_or(&p)
                .to_owned()
        }
    };
    let password = Password::parse(&raw, &[username.canonical(), email.canonical()])
        .map_err(|e| invalid("password", e))?;

    with_admin_db(&args.config, async |pool, hasher| {
        let created = UserService::new(pool, hasher)
            .create(NewUser {
                username,
                email,
                password,
                first_name: String::new(),
                last_name: String::new(),
                is_superuser: true,
                is_active: true,
                is_verified: true,
                attributes: Attributes::default(),
            })
            .await;
        match created {
            Ok(user) => {
                println!("created superuser {} ({})", user.username, user.id);
                Ok(())
            }
            Err(crate::error::Error::AlreadyExists { field, .. }) => Err(StartupError::Other(
                format!("that {} is already taken", field.as_str()),
            )),
            Err(e) => Err(StartupError::Database(e)),
        }
    })
    .await
}

async fn import(args: ImportArgs) -> Result<(), StartupError> {
    use crate::service::accounts::AccountService;
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| StartupError::Other(format!("reading {}: {e}", args.file.display())))?;
        Box::new(std::io::BufReader::new(file))
    };
    let config = &args.config;
    let counts = with_admin_db(config, async |pool, hasher| {
        // Nothing is hashed here: the hashes come with the users.
        let accounts = AccountService::new(
            pool,
            hasher,
            config.email_verification_ttl,
            config.password_reset_ttl,
        );
        read_lines(&accounts, reader, args.batch_size as usize)
            .await
            .map_err(StartupError::Database)
    })
    .await;
    let (imported, already, refused) = counts?;
    println!("imported {imported}, already there {already}, refused {refused}");
    if refused > 0 {
        return Err(StartupError::Other(format!(
            "{refused} line(s) refused; fix them and run the import again"
        )));
    }
    Ok(())
}

/// Reads the JSON Lines of `identity import` in batches of `batch_size`
/// users and hands each batch to the service; prints one line per refused
/// line and a running count. Returns (imported, already there, refused).
async fn read_lines(
    accounts: &crate::service::accounts::AccountService,
    reader: impl std::io::BufRead,
    batch_size: usize,
) -> Result<(usize, usize, usize), Error> {
    use crate::service::accounts::{ImportOutcome, ImportedUser};
    let (mut imported, mut already, mut refused) = (0usize, 0usize, 0usize);
    let mut lines = reader.lines().enumerate().peekable();
    while lines.peek().is_some() {
        // One batch: parsed lines go to the service, unreadable ones are
        // refused here; both are reported by line number.
        let mut batch: Vec<(usize, ImportedUser)> = Vec::new();
        for (n, line) in lines.by_ref() {
            let number = n + 1;
            let line = line.map_err(|e| Error::internal(format!("reading line {number}: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<ImportedUser>(&line) {
                Ok(user) => batch.push((number, user)),
                Err(e) => {
                    refused += 1;
                    println!("line {number}: refused: not a valid user object: {e}");
                }
            }
            if batch.len() == batch_size {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let (numbers, users): (Vec<usize>, Vec<ImportedUser>) = batch.into_iter().unzip();
        let outcomes = accounts.import(users).await?;
        for (number, outcome) in numbers.iter().zip(outcomes) {
            match outcome {
                ImportOutcome::Imported(_) => imported += 1,
                ImportOutcome::AlreadyImported(_) => already += 1,
                ImportOutcome::Refused(why) => {
                    refused += 1;
                    println!("line {number}: refused: {why}");
                }
            }
        }
        eprintln!(
            "up to line {}: {imported} imported, {already} already there, {refused} refused",
            numbers.last().copied().unwrap_or(0)
        );
    }
    Ok((imported, already, refused))
}

fn keys(args: KeysArgs) -> Result<(), StartupError> {
    use crate::token::keys;
    let dir = &args.config.keys_dir;
    let alg = args.config.jwt_algorithm;
    let delay = args.config.keys_activation_delay;
    match args.action {
        KeysAction::Generate => {
            let before = keys::KeyStore::load(dir, alg, delay).ok();
            let store = keys::KeyStore::load_or_generate(dir, alg, delay)?;
            match before {
                Some(_) => println!("a {alg} key exists already: {}", store.signing().kid),
                None => println!("generated {}", store.signing().kid),
            }
        }
        KeysAction::Rotate => {
            let path = keys::generate(dir, alg)?;
            let store = keys::KeyStore::load(dir, alg, std::time::Duration::ZERO)?;
            println!(
                "generated {} ({}); it verifies at once and signs after KEYS_ACTIVATION_DELAY ({})",
                store.signing().kid,
                path.display(),
                humantime::format_duration(delay)
            );
        }
        KeysAction::List => {
            let store = keys::KeyStore::load(dir, alg, delay)?;
            for (i, key) in store.keys().iter().enumerate() {
                let role = if i == 0 { "signs" } else { "verifies" };
                println!(
                    "{}  {}  {role}  {}",
                    key.kid,
                    keys::algorithm_name(key.algorithm),
                    key.path.display()
                );
            }
        }
    }
    Ok(())
}
