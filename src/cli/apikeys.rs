//! `identity apikeys`: API keys made, listed and revoked on the database
//! directly, as an administrator (no superuser password in a script: the
//! first service's key comes from here).

use clap::{Args, Subcommand};
use uuid::Uuid;

use super::admin::with_admin_db;
use crate::app::StartupError;
use crate::config::Config;
use crate::db;
use crate::domain::{PageRequest, text::fold};
use crate::proto::identity::v1 as pb;
use crate::service::api_keys::{make_key, revoke_key};

#[derive(Debug, Args)]
pub(super) struct ApiKeysArgs {
    #[command(subcommand)]
    action: ApiKeysAction,
    #[command(flatten)]
    pub(super) config: Config,
}

#[derive(Debug, Subcommand)]
enum ApiKeysAction {
    /// Makes a key and prints its secret, alone on standard output, once
    /// (identity keeps only its hash): `KEY=$(identity apikeys create ...)`.
    Create {
        /// The key's user: its id, username or email.
        #[arg(long)]
        user: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// A full method name the key may call (repeat for more); none: all
        /// its user may call.
        #[arg(long = "allow", value_name = "METHOD")]
        allow: Vec<String>,
        /// How long the key works (90d, 12h, 1y); none: until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// Lists a user's keys, oldest first (never their secrets).
    List {
        /// The user: its id, username or email.
        #[arg(long)]
        user: String,
    },
    /// Revokes a key, at once on every replica.
    Revoke {
        /// The key's id.
        id: Uuid,
    },
}

/// The user named by an id, a username or an email.
async fn find_user(pool: &db::Pool, name: &str) -> Result<crate::domain::User, StartupError> {
    let mut conn = db::conn(pool)
        .await
        .map_err(|e| StartupError::Database(e.into()))?;
    let found = match Uuid::try_parse(name) {
        Ok(id) => db::users::by_id(&mut conn, id).await,
        Err(_) if name.contains('@') => db::users::by_email(&mut conn, &fold(name)).await,
        Err(_) => db::users::by_username(&mut conn, &fold(name)).await,
    }
    .map_err(|e| StartupError::Database(crate::error::Error::from(e)))?;
    found.ok_or_else(|| StartupError::Other(format!("no user {name:?}")))
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or("-".to_owned(), |t| {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    })
}

pub(super) async fn apikeys(args: ApiKeysArgs) -> Result<(), StartupError> {
    let origin = super::import::command_origin(match &args.action {
        ApiKeysAction::Create { .. } => "identity apikeys create",
        ApiKeysAction::List { .. } => "identity apikeys list",
        ApiKeysAction::Revoke { .. } => "identity apikeys revoke",
    });
    with_admin_db(&args.config, async |pool, _| {
        crate::service::audit::within(origin, None, async {
            match args.action {
                ApiKeysAction::Create {
                    user,
                    name,
                    allow,
                    expires,
                } => {
                    let user = find_user(&pool, &user).await?;
                    let now = chrono::Utc::now();
                    let expire_time = expires
                        .map(|d| chrono::Duration::from_std(d).map(|d| now + d))
                        .transpose()
                        .map_err(|_| StartupError::Input("--expires: too long".into()))?;
                    let request = pb::CreateApiKeyRequest {
                        user_id: user.id.to_string(),
                        display_name: name,
                        expire_time: expire_time.map(crate::grpc::convert::timestamp),
                        allowed_methods: allow,
                    };
                    let new =
                        crate::grpc::api_keys::new_key(request, user.id, now).map_err(|e| {
                            StartupError::Input(tonic::Status::from(e).message().to_owned())
                        })?;
                    let created = make_key(&pool, &new)
                        .await
                        .map_err(StartupError::Database)?;
                    eprintln!(
                        "created API key {} ({}) for {}; the secret is shown once:",
                        created.key.id, created.key.prefix, user.username
                    );
                    println!("{}", created.secret);
                    Ok(())
                }
                ApiKeysAction::List { user } => {
                    let user = find_user(&pool, &user).await?;
                    let mut conn = db::conn(&pool)
                        .await
                        .map_err(|e| StartupError::Database(e.into()))?;
                    let mut after = None;
                    println!(
                        "id\tprefix\tname\tcreated\texpires\tlast_used\trevoked\tallowed_methods"
                    );
                    loop {
                        let page = db::api_keys::list(
                            &mut conn,
                            user.id,
                            PageRequest { size: 1000, after },
                        )
                        .await
                        .map_err(|e| StartupError::Database(e.into()))?;
                        for k in &page.items {
                            println!(
                                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                                k.id,
                                k.prefix,
                                k.display_name,
                                time(Some(k.create_time)),
                                time(k.expire_time),
                                time(k.last_use_time),
                                time(k.revoke_time),
                                if k.allowed_methods.is_empty() {
                                    "*".to_owned()
                                } else {
                                    k.allowed_methods.join(",")
                                }
                            );
                        }
                        match page.last {
                            Some(last) => after = Some(last),
                            None => return Ok(()),
                        }
                    }
                }
                ApiKeysAction::Revoke { id } => match revoke_key(&pool, id, None).await {
                    Ok(key) => {
                        println!(
                            "revoked API key {id} ({}) at {}",
                            key.prefix,
                            time(key.revoke_time)
                        );
                        Ok(())
                    }
                    Err(crate::error::Error::NotFound(_)) => {
                        Err(StartupError::Other(format!("no API key {id}")))
                    }
                    Err(e) => Err(StartupError::Database(e)),
                },
            }
        })
        .await
    })
    .await
}
