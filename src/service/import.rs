//! Importing users from another system with their password hashes
//! (ImportUsers, `identity import`): each user checked against the input
//! rules and its hash against the accepted formats, then created through
//! the one path that creates users, in a savepoint of its own.

use super::audit;
use std::collections::BTreeMap;

use diesel_async::AsyncConnection;
use uuid::Uuid;

use super::AccountService;
use crate::db;
use crate::domain::{Attributes, Email, Slug, Username, user::person_name};
use crate::error::{Error, Field};
use crate::hashing;

/// The most users one import call (one transaction) takes: each is a
/// savepoint, and PostgreSQL keeps up to 64 subtransactions per transaction
/// cheaply.
pub const MAX_IMPORT_BATCH: usize = 64;

/// A user to import, as given (a JSON line, or an RPC message). Its Debug
/// form leaves the password hash out.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportedUser {
    /// The user's id (a UUID) in the other system; absent or empty: a new
    /// UUIDv7.
    pub id: Option<String>,
    /// As for CreateUser ([`Username::parse`]).
    pub username: String,
    /// As for CreateUser ([`Email::parse`]).
    pub email: String,
    /// An argon2 PHC string or a bcrypt hash, stored as it is (trimmed); see
    /// [`hashing::check_imported_hash`] for the formats and bounds accepted.
    pub password_hash: String,
    /// Given name, as for CreateUser.
    pub first_name: String,
    /// Family name, as for CreateUser.
    pub last_name: String,
    /// May administer users and groups.
    pub is_superuser: bool,
    /// Whether the user may log in; absent: true.
    pub is_active: Option<bool>,
    /// Whether the email address was verified already.
    pub is_verified: bool,
    /// Custom attributes, under CreateUser's rules.
    pub attributes: BTreeMap<String, String>,
    /// Slugs of the user's groups; a missing group is created, named by its
    /// slug.
    pub groups: Vec<String>,
}

impl std::fmt::Debug for ImportedUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedUser")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("email", &self.email)
            .field("password_hash", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What became of one imported user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Imported now, with this id.
    Imported(Uuid),
    /// There already, with the same id, username and email: left alone.
    AlreadyImported(Uuid),
    /// Refused: why, naming the field.
    Refused(String),
}

/// A user to import whose every field passed its rules.
struct ValidUser {
    id: Uuid,
    /// Whether the id came with the user (else it is new).
    id_given: bool,
    username: Username,
    email: Email,
    hash: String,
    first_name: String,
    last_name: String,
    is_superuser: bool,
    is_active: bool,
    is_verified: bool,
    attributes: serde_json::Value,
    groups: Vec<Slug>,
}

impl AccountService {
    /// Imports `users` in one transaction (each user in a savepoint, so that
    /// one refusal does not undo the others). Idempotent: a user already
    /// there with the same id, username and email is left alone, so a batch
    /// can be run again after an interruption.
    #[tracing::instrument(skip_all, fields(count = users.len()))]
    pub async fn import(&self, users: Vec<ImportedUser>) -> Result<Vec<ImportOutcome>, Error> {
        if users.len() > MAX_IMPORT_BATCH {
            return Err(Error::invalid(
                "users",
                format!("at most {MAX_IMPORT_BATCH} users per call"),
            ));
        }
        let checked: Vec<Result<ValidUser, String>> = users.into_iter().map(validate).collect();
        let mut conn = db::conn(&self.pool).await?;
        let outcomes = audit::transaction(&mut conn, async |conn| {
            // One import at a time: concurrent runs of overlapping files
            // would otherwise race on the same names (or deadlock).
            diesel_async::SimpleAsyncConnection::batch_execute(
                conn,
                "SELECT pg_advisory_xact_lock(7263551846239217)",
            )
            .await?;
            let mut outcomes = Vec::with_capacity(checked.len());
            for user in &checked {
                let outcome = match user {
                    Err(why) => ImportOutcome::Refused(why.clone()),
                    Ok(user) => import_one(conn, user).await?,
                };
                outcomes.push(outcome);
            }
            Ok::<_, Error>(outcomes)
        })
        .await?;
        let imported = outcomes
            .iter()
            .filter(|o| matches!(o, ImportOutcome::Imported(_)))
            .count();
        tracing::info!(imported, "users imported");
        Ok(outcomes)
    }
}

/// Checks an imported user against the input rules; the first violation,
/// naming its field.
fn validate(raw: ImportedUser) -> Result<ValidUser, String> {
    fn field<E: std::fmt::Display>(name: &'static str) -> impl Fn(E) -> String {
        move |e| format!("{name}: {e}")
    }
    let (id, id_given) = match raw.id.as_deref().map(str::trim) {
        None | Some("") => (Uuid::now_v7(), false),
        Some(id) => (
            Uuid::try_parse(id).map_err(|_| "id: not a UUID".to_owned())?,
            true,
        ),
    };
    let username = Username::parse(&raw.username).map_err(field("username"))?;
    let email = Email::parse(&raw.email).map_err(field("email"))?;
    hashing::check_imported_hash(&raw.password_hash).map_err(field("password_hash"))?;
    let first_name = person_name(&raw.first_name).map_err(field("first_name"))?;
    let last_name = person_name(&raw.last_name).map_err(field("last_name"))?;
    let attributes = Attributes::parse(raw.attributes.iter()).map_err(field("attributes"))?;
    let groups = raw
        .groups
        .iter()
        .map(|s| Slug::parse(s).map_err(field("groups")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ValidUser {
        id,
        id_given,
        username,
        email,
        hash: raw.password_hash.trim().to_owned(),
        first_name,
        last_name,
        is_superuser: raw.is_superuser,
        is_active: raw.is_active.unwrap_or(true),
        is_verified: raw.is_verified,
        attributes: attributes.to_json(),
        groups,
    })
}

async fn import_one(
    conn: &mut diesel_async::AsyncPgConnection,
    user: &ValidUser,
) -> Result<ImportOutcome, Error> {
    // Already there (a re-run): the same id with the same names.
    if let Some((username, email, _)) = db::users::canonical_names(conn, user.id).await? {
        return Ok(
            if username == user.username.canonical() && email == user.email.canonical() {
                ImportOutcome::AlreadyImported(user.id)
            } else {
                ImportOutcome::Refused("id: taken by another user".into())
            },
        );
    }
    // Imported before without an id: the same username and email.
    if !user.id_given
        && let Some(existing) = db::users::by_username(conn, user.username.canonical()).await?
        && let Some((_, email, _)) = db::users::canonical_names(conn, existing.id).await?
        && email == user.email.canonical()
    {
        return Ok(ImportOutcome::AlreadyImported(existing.id));
    }
    let account = super::users::Account {
        id: user.id,
        username: &user.username,
        email: &user.email,
        hash: &user.hash,
        first_name: &user.first_name,
        last_name: &user.last_name,
        is_superuser: user.is_superuser,
        is_active: user.is_active,
        is_verified: user.is_verified,
        attributes: user.attributes.clone(),
        is_service: false,
    };
    // A savepoint: a taken name rolls back this user only.
    let inserted = conn
        .transaction(async |conn| {
            super::users::insert_account(conn, &account).await?;
            for slug in &user.groups {
                let Some(group) = db::groups::ensure_by_slug(conn, slug).await? else {
                    return Err(Error::AlreadyExists {
                        field: Field::Groupname,
                        hint: Some("a group of that name has another slug"),
                    });
                };
                db::groups::add_member(conn, group, user.id).await?;
            }
            Ok::<_, Error>(())
        })
        .await;
    match inserted {
        Ok(()) => Ok(ImportOutcome::Imported(user.id)),
        Err(Error::AlreadyExists {
            field: Field::Groupname,
            hint: Some(hint),
        }) => Ok(ImportOutcome::Refused(format!("groups: {hint}"))),
        Err(Error::AlreadyExists { field, .. }) => Ok(ImportOutcome::Refused(format!(
            "{}: taken by another user",
            field.as_str()
        ))),
        Err(e) => Err(e),
    }
}
