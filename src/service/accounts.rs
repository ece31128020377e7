//! The AccountService use cases: email verification, password reset, and
//! importing users with their existing password hashes.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use uuid::Uuid;

use crate::db::{
    self, Pool,
    accounts::{Purpose, TokenState},
};
use crate::domain::{
    Attributes, Email, EndReason, NewPassword, OpaqueToken, Slug, User, Username, user::person_name,
};
use crate::error::{Error, Field, Reason, Resource};
use crate::hashing::{self, Hasher};
use crate::token::opaque;

/// Throttling of reset requests per address: free requests a day, then a
/// lock doubling up to an hour.
const FREE_RESET_REQUESTS: i32 = 5;
const MAX_RESET_LOCK_SECONDS: i32 = 3600;

/// The most users one import call (one transaction) takes: each is a
/// savepoint, and PostgreSQL keeps up to 64 subtransactions per transaction
/// cheaply.
pub const MAX_IMPORT_BATCH: usize = 64;

/// A token just issued: its text (shown once) and expiry.
#[derive(Clone)]
pub struct IssuedToken {
    pub token: String,
    pub expire_time: DateTime<Utc>,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"<redacted>")
            .field("expire_time", &self.expire_time)
            .finish()
    }
}

/// A user to import, as given (a JSON line, or an RPC message). Its Debug
/// form leaves the password hash out.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportedUser {
    pub id: Option<String>,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
    pub is_superuser: bool,
    pub is_active: Option<bool>,
    pub is_verified: bool,
    pub attributes: BTreeMap<String, String>,
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

/// Email verification, password reset, import.
#[derive(Clone)]
pub struct AccountService {
    pool: Pool,
    hasher: Hasher,
    verification_ttl: Duration,
    reset_ttl: Duration,
}

impl AccountService {
    pub fn new(
        pool: Pool,
        hasher: Hasher,
        verification_ttl: Duration,
        reset_ttl: Duration,
    ) -> Self {
        Self {
            pool,
            hasher,
            verification_ttl,
            reset_ttl,
        }
    }

    /// Issues a verification token for the user `user_id`, bound to its
    /// current email. Returns the token, the address and the expiry.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn issue_verification(&self, user_id: Uuid) -> Result<(IssuedToken, String), Error> {
        let mut conn = db::conn(&self.pool).await?;
        let user = db::users::by_id(&mut conn, user_id)
            .await?
            .ok_or(Error::NotFound(Resource::User))?;
        let (_, email_canonical) = db::users::canonical_names(&mut conn, user_id)
            .await?
            .ok_or(Error::NotFound(Resource::User))?;
        let issued = self
            .issue(
                &mut conn,
                Purpose::VerifyEmail,
                user_id,
                &email_canonical,
                self.verification_ttl,
            )
            .await?;
        tracing::info!("verification token issued");
        Ok((issued, user.email))
    }

    /// Uses a verification token: its user becomes verified, if its email is
    /// still the one the token was issued for. Nothing changes otherwise.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_email(&self, token: &OpaqueToken) -> Result<User, Error> {
        let hash = opaque::hash(token.expose());
        let mut conn = db::conn(&self.pool).await?;
        let user = conn
            .transaction(async |conn| {
                let Some((user_id, email)) =
                    db::accounts::use_token(conn, &hash, Purpose::VerifyEmail).await?
                else {
                    return Err(refusal(
                        db::accounts::state(conn, &hash, Purpose::VerifyEmail).await?,
                    ));
                };
                let current = db::users::canonical_names(conn, user_id).await?;
                if current.as_ref().map(|(_, e)| e) != Some(&email) {
                    // Rolled back: the token stays unused.
                    return Err(Error::Refused {
                        reason: Reason::AccountTokenInvalid,
                        message: "token not valid for this address",
                    });
                }
                db::users::set_verified(conn, user_id)
                    .await?
                    .ok_or(Error::NotFound(Resource::User))
            })
            .await?;
        tracing::info!(user_id = %user.id, "email verified");
        Ok(user)
    }

    /// Issues a reset token for the active user with `email`, if there is
    /// one. The answer is the same (OK) either way; the token goes only to
    /// the trusted caller. Requests per address are throttled like logins.
    #[tracing::instrument(skip_all)]
    pub async fn request_reset(&self, email: &Email) -> Result<Option<IssuedToken>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        let key = super::throttle::hashed_key("reset", email.canonical());
        let locked = db::throttle::count_request(
            &mut conn,
            &key,
            FREE_RESET_REQUESTS,
            MAX_RESET_LOCK_SECONDS,
        )
        .await?;
        if let Some(until) = locked {
            return Err(crate::service::throttled(
                "too many password reset requests for this address",
                until,
            ));
        }
        let Some(user) = db::users::by_email(&mut conn, email.canonical()).await? else {
            tracing::info!("password reset asked for an unknown address");
            return Ok(None);
        };
        if !user.is_active {
            tracing::info!(user_id = %user.id, "password reset asked for an inactive user");
            return Ok(None);
        }
        let issued = self
            .issue(
                &mut conn,
                Purpose::ResetPassword,
                user.id,
                email.canonical(),
                self.reset_ttl,
            )
            .await?;
        tracing::info!(user_id = %user.id, "password reset token issued");
        Ok(Some(issued))
    }

    /// Sets a new password with a reset token: the input rules apply, every
    /// session ends, the token (and any other reset token of the user)
    /// cannot be used again, and a login lock is lifted.
    #[tracing::instrument(skip_all)]
    pub async fn reset_password(
        &self,
        token: &OpaqueToken,
        new_password: NewPassword,
    ) -> Result<(), Error> {
        let hash = opaque::hash(token.expose());
        // Checked before hashing, so that a bad token costs no hash.
        let (user_id, names) = {
            let mut conn = db::conn(&self.pool).await?;
            let state = db::accounts::state(&mut conn, &hash, Purpose::ResetPassword).await?;
            let TokenState::Valid { user_id, .. } = state else {
                return Err(refusal(state));
            };
            // A user deactivated since the token was issued gets no password.
            if !db::users::by_id(&mut conn, user_id)
                .await?
                .is_some_and(|u| u.is_active)
            {
                return Err(Error::Refused {
                    reason: Reason::AccountTokenInvalid,
                    message: "invalid reset token",
                });
            }
            let names = db::users::canonical_names(&mut conn, user_id)
                .await?
                .ok_or(Error::Refused {
                    reason: Reason::AccountTokenInvalid,
                    message: "invalid reset token",
                })?;
            (user_id, names)
        };
        let password = new_password
            .for_user(&[&names.0, &names.1])
            .map_err(|e| Error::invalid("new_password", e))?;
        let new_hash = self.hasher.hash(&password).await?;
        let mut conn = db::conn(&self.pool).await?;
        let ended = conn
            .transaction(async |conn| {
                let Some((used_by, email)) =
                    db::accounts::use_token(conn, &hash, Purpose::ResetPassword).await?
                else {
                    // Used by a concurrent call meanwhile, or just expired.
                    return Err(refusal(
                        db::accounts::state(conn, &hash, Purpose::ResetPassword).await?,
                    ));
                };
                let current = db::users::canonical_names(conn, used_by).await?;
                let active = db::users::by_id_for_update(conn, used_by)
                    .await?
                    .is_some_and(|u| u.is_active);
                if used_by != user_id || !active || current.as_ref().map(|(_, e)| e) != Some(&email)
                {
                    // Rolled back: nothing changes, the token stays unused.
                    return Err(Error::Refused {
                        reason: Reason::AccountTokenInvalid,
                        message: "invalid reset token",
                    });
                }
                if !db::users::set_password_hash(conn, user_id, &new_hash).await? {
                    return Err(Error::Refused {
                        reason: Reason::AccountTokenInvalid,
                        message: "invalid reset token",
                    });
                }
                super::password_changed(conn, user_id, None, EndReason::PasswordReset).await
            })
            .await?;
        tracing::info!(user_id = %user_id, sessions_ended = ended, "password reset");
        Ok(())
    }

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
        let outcomes = conn
            .transaction(async |conn| {
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

    async fn issue(
        &self,
        conn: &mut db::Conn,
        purpose: Purpose,
        user_id: Uuid,
        email_canonical: &str,
        ttl: Duration,
    ) -> Result<IssuedToken, Error> {
        let new = opaque::generate().map_err(|_| Error::internal("no randomness"))?;
        let expire_time = Utc::now()
            + chrono::Duration::from_std(ttl)
                .map_err(|_| Error::internal("token lifetime out of range"))?;
        db::accounts::insert(
            conn,
            &new.hash,
            purpose,
            user_id,
            email_canonical,
            expire_time,
        )
        .await?;
        Ok(IssuedToken {
            token: new.token,
            expire_time,
        })
    }
}

/// The stored hash of a presented token; INVALID_ARGUMENT when it cannot be
/// one of ours.
fn refusal(state: TokenState) -> Error {
    match state {
        TokenState::Used => Error::Refused {
            reason: Reason::AccountTokenUsed,
            message: "token already used",
        },
        TokenState::Expired => Error::Refused {
            reason: Reason::AccountTokenExpired,
            message: "token expired",
        },
        // A valid token that could not be used was used meanwhile.
        TokenState::Valid { .. } => Error::Refused {
            reason: Reason::AccountTokenUsed,
            message: "token already used",
        },
        TokenState::Unknown => Error::Refused {
            reason: Reason::AccountTokenInvalid,
            message: "invalid token",
        },
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
    if let Some((username, email)) = db::users::canonical_names(conn, user.id).await? {
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
        && let Some((_, email)) = db::users::canonical_names(conn, existing.id).await?
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
