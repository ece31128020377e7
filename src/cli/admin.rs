//! The admin subcommands: `migrate`, `createsuperuser` and `keys`, and the
//! admin database that `createsuperuser` and `import` share (opened beside
//! a running service, migrated, a pool of one, closed afterwards).

use std::io::Read;

use clap::{Args, Subcommand};

use crate::app::{Database, StartupError};
use crate::config::Config;
use crate::db::{self, embedded::EmbeddedError};
use crate::domain::{Attributes, Email, Password, Username};
use crate::hashing::Hasher;
use crate::service::users::{NewUser, UserService};

#[derive(Debug, Args)]
pub(super) struct KeysArgs {
    #[command(subcommand)]
    action: KeysAction,
    #[command(flatten)]
    pub(super) config: Config,
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
pub(super) struct MigrateArgs {
    /// List every migration and whether it is applied.
    #[arg(long, conflicts_with = "revert")]
    status: bool,
    /// Revert the last applied migration.
    #[arg(long)]
    revert: bool,
    #[command(flatten)]
    pub(super) config: Config,
}

#[derive(Debug, Args)]
pub(super) struct CreateSuperuserArgs {
    /// The new superuser's username.
    #[arg(long)]
    username: String,
    /// The new superuser's email.
    #[arg(long)]
    email: String,
    #[command(flatten)]
    pub(super) config: Config,
}

/// The database for an admin command: like `serve`'s, but when a running
/// service owns the embedded cluster, its socket is used as it is.
pub(super) async fn admin_database(config: &Config) -> Result<Database, StartupError> {
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
pub(super) async fn with_admin_db<T>(
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

pub(super) async fn migrate(args: MigrateArgs) -> Result<(), StartupError> {
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

pub(super) async fn create_superuser(args: CreateSuperuserArgs) -> Result<(), StartupError> {
    let invalid = |field: &str, e: crate::domain::Violation| {
        StartupError::Input(format!("invalid {field}: {e}"))
    };
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
    let breached = crate::app::load_breached(&args.config).await?;
    let password = Password::parse(&raw, &[username.canonical(), email.canonical()], &breached)
        .map_err(|e| invalid("password", e))?;

    with_admin_db(&args.config, async |pool, hasher| {
        let users = UserService::new(pool, hasher);
        let created = crate::service::audit::within(
            super::import::command_origin("identity createsuperuser"),
            None,
            users.create(NewUser {
                username,
                email,
                password: Some(password),
                first_name: String::new(),
                last_name: String::new(),
                is_superuser: true,
                is_active: true,
                is_verified: true,
                attributes: Attributes::default(),
                is_service: false,
            }),
        )
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

pub(super) fn keys(args: KeysArgs) -> Result<(), StartupError> {
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
            let newest = keys::KeyStore::load(dir, alg, std::time::Duration::ZERO)?;
            let kid = &newest.signing().kid;
            let store = keys::KeyStore::load(dir, alg, delay)?;
            let staged = delay.is_zero() || store.signing().kid != *kid;
            let delay = humantime::format_duration(delay);
            if !staged {
                // No key of `alg` is KEYS_ACTIVATION_DELAY old: the documented
                // fallback signs with the newest, this one, from the next
                // reload, before verifiers may have fetched it.
                tracing::warn!(
                    kid = %kid,
                    keys_activation_delay = %delay,
                    "no other {alg} key in KEYS_DIR is KEYS_ACTIVATION_DELAY old: the new key \
                     signs at the services' next reload, before verifiers with a cached JWKS may \
                     know it (their checks can fail until they refetch it)"
                );
                println!(
                    "generated {kid} ({}); it verifies and signs at once (no older {alg} key is \
                     {delay} old)",
                    path.display()
                );
            } else {
                println!(
                    "generated {kid} ({}); it verifies at once and signs after \
                     KEYS_ACTIVATION_DELAY ({delay})",
                    path.display()
                );
            }
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
