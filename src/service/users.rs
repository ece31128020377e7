//! The UserService use cases.

use super::audit;
use uuid::Uuid;

use crate::db::{
    self, Pool,
    users::{NewUserRow, UserChangesRow},
};
use crate::domain::{
    Attributes, Email, EndReason, NewPassword, PageRequest, Password, User, Username, text,
};
use crate::error::{Error, Field, Resource};
use crate::hashing::Hasher;
use crate::service::Page;

/// The filters of ListUsers, validated.
#[derive(Debug, Default, Clone)]
pub struct UserFilter {
    /// A `LIKE` pattern over the folded search text.
    pub search: Option<String>,
    /// Only users with this `is_active`.
    pub is_active: Option<bool>,
    /// Only users with this `is_superuser`.
    pub is_superuser: Option<bool>,
    /// Only users with this `is_verified`.
    pub is_verified: Option<bool>,
    /// Only members of this group.
    pub group_id: Option<Uuid>,
}

impl UserFilter {
    /// The same filter, in the table's terms.
    fn to_db(&self) -> db::users::Filter<'_> {
        db::users::Filter {
            search: self.search.as_deref(),
            is_active: self.is_active,
            is_superuser: self.is_superuser,
            is_verified: self.is_verified,
            group_id: self.group_id,
        }
    }
}

/// A user to create, every field validated.
#[derive(Debug)]
pub struct NewUser {
    /// Its canonical form must be no other user's username or email.
    pub username: Username,
    /// Its canonical form must be no other user's username or email.
    pub email: Email,
    /// The password in clear, hashed (argon2id) before anything is stored;
    /// none for a service account.
    pub password: Option<Password>,
    /// Given name, at most 150 characters; may be empty.
    pub first_name: String,
    /// Family name, at most 150 characters; may be empty.
    pub last_name: String,
    /// May administer users and groups.
    pub is_superuser: bool,
    /// Whether the user may log in.
    pub is_active: bool,
    /// Whether the email address counts as verified already.
    pub is_verified: bool,
    /// Custom attributes.
    pub attributes: Attributes,
    /// A service account (no password).
    pub is_service: bool,
}

/// The password hash of a service account: no PHC string, so no password
/// can match it.
pub(crate) const SERVICE_HASH: &str = "!";

/// How GetUser finds a user.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// By id.
    Id(Uuid),
    /// By the canonical form of a username.
    Username(String),
    /// By the canonical form of an email.
    Email(String),
}

/// The fields UpdateUser changes: `Some` for each path of the mask.
#[derive(Debug, Default)]
pub struct UserUpdate {
    /// A new given name.
    pub first_name: Option<String>,
    /// A new family name.
    pub last_name: Option<String>,
    /// Activates or deactivates the user; the last active superuser cannot
    /// be deactivated.
    pub is_active: Option<bool>,
    /// Grants or revokes superuser; the last active superuser cannot be
    /// demoted.
    pub is_superuser: Option<bool>,
    /// Marks the email address verified or not.
    pub is_verified: Option<bool>,
    /// Replaces the whole attribute map.
    pub attributes: Option<Attributes>,
}

/// A user to create, whatever asks for it (CreateUser, `createsuperuser`,
/// an import): the fields, checked, and the password's hash.
pub(crate) struct Account<'a> {
    pub id: Uuid,
    pub username: &'a Username,
    pub email: &'a Email,
    pub hash: &'a str,
    pub first_name: &'a str,
    pub last_name: &'a str,
    pub is_superuser: bool,
    pub is_active: bool,
    pub is_verified: bool,
    pub attributes: serde_json::Value,
    pub is_service: bool,
}

impl std::fmt::Debug for Account<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash stays out.
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The one path that creates users: inserts the row (with its canonical
/// forms and search text) and claims its login names, the username and (when
/// it differs) the email; ALREADY_EXISTS naming the field when another user
/// logs in with either. Run it in a transaction (or a savepoint), so that a
/// lost claim leaves nothing behind.
pub(crate) async fn insert_account(
    conn: &mut diesel_async::AsyncPgConnection,
    account: &Account<'_>,
) -> Result<User, Error> {
    let search = text::search_text(&[
        account.username.as_str(),
        account.email.as_str(),
        account.first_name,
        account.last_name,
    ]);
    let (username, email) = (account.username.canonical(), account.email.canonical());
    let row = NewUserRow {
        id: account.id,
        username: account.username.as_str(),
        username_canonical: username,
        email: account.email.as_str(),
        email_canonical: email,
        password_hash: account.hash,
        first_name: account.first_name,
        last_name: account.last_name,
        is_superuser: account.is_superuser,
        is_active: account.is_active,
        is_verified: account.is_verified,
        attributes: account.attributes.clone(),
        search: &search,
        password_changed_at: chrono::Utc::now(),
        is_service: account.is_service,
    };
    let user = db::users::insert(conn, &row).await?;
    let taken = |field| Error::AlreadyExists { field, hint: None };
    if !db::users::claim_login_name(conn, username, user.id).await? {
        return Err(taken(Field::Username));
    }
    if email != username && !db::users::claim_login_name(conn, email, user.id).await? {
        return Err(taken(Field::Email));
    }
    Ok(user)
}

/// Users: creation, lookup, listing, changes, deletion and passwords.
#[derive(Clone)]
pub struct UserService {
    pool: Pool,
    hasher: Hasher,
}

impl UserService {
    /// The service over `pool`, hashing with `hasher`.
    pub fn new(pool: Pool, hasher: Hasher) -> Self {
        Self { pool, hasher }
    }

    /// Creates a user. The hash is computed before a connection is taken, so
    /// a slow hash never holds one.
    #[tracing::instrument(skip_all, fields(username = %new.username.as_str()))]
    pub async fn create(&self, new: NewUser) -> Result<User, Error> {
        let hash = match &new.password {
            Some(password) => self.hasher.hash(password).await?,
            // No password matches it: argon2 cannot even parse it.
            None => SERVICE_HASH.to_owned(),
        };
        let account = Account {
            id: Uuid::now_v7(),
            username: &new.username,
            email: &new.email,
            hash: &hash,
            first_name: &new.first_name,
            last_name: &new.last_name,
            is_superuser: new.is_superuser,
            is_active: new.is_active,
            is_verified: new.is_verified,
            attributes: new.attributes.to_json(),
            is_service: new.is_service,
        };
        let mut conn = db::conn(&self.pool).await?;
        let user = audit::transaction_touching(&mut conn, &[account.id], async |conn| {
            insert_account(conn, &account).await
        })
        .await?;
        tracing::info!(user_id = %user.id, "user created");
        Ok(user)
    }

    /// The user found by `lookup`; NOT_FOUND when there is none.
    pub async fn get(&self, lookup: &Lookup) -> Result<User, Error> {
        let mut conn = db::conn(&self.pool).await?;
        let found = match lookup {
            Lookup::Id(id) => db::users::by_id(&mut conn, *id).await?,
            Lookup::Username(canonical) => db::users::by_username(&mut conn, canonical).await?,
            Lookup::Email(canonical) => db::users::by_email(&mut conn, canonical).await?,
        };
        found.ok_or(Error::NotFound(Resource::User))
    }

    /// One page of the users matching `filter`. A `group_id` naming no group
    /// is NOT_FOUND rather than an empty list, so a typo is not mistaken for
    /// an empty group.
    pub async fn list(&self, filter: &UserFilter, page: PageRequest) -> Result<Page<User>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        if let Some(group) = filter.group_id
            && !db::users::group_exists(&mut conn, group).await?
        {
            return Err(Error::NotFound(Resource::Group));
        }
        Ok(db::users::list(&mut conn, &filter.to_db(), page).await?)
    }

    /// Applies `update` to the user `id`: a read-modify-write under a row
    /// lock, so concurrent updates of other fields are not lost.
    #[tracing::instrument(skip(self, update))]
    pub async fn update(&self, id: Uuid, update: UserUpdate) -> Result<User, Error> {
        let mut conn = db::conn(&self.pool).await?;
        let user = audit::transaction_touching(&mut conn, &[id], async |conn| {
            let demotes = update.is_superuser == Some(false) || update.is_active == Some(false);
            if demotes {
                keep_a_superuser(conn, id).await?;
            }
            let Some(current) = db::users::by_id_for_update(conn, id).await? else {
                return Err(Error::NotFound(Resource::User));
            };
            let first_name = update.first_name.unwrap_or(current.first_name);
            let last_name = update.last_name.unwrap_or(current.last_name);
            let changes = UserChangesRow {
                search: text::search_text(&[
                    &current.username,
                    &current.email,
                    &first_name,
                    &last_name,
                ]),
                first_name,
                last_name,
                is_superuser: update.is_superuser.unwrap_or(current.is_superuser),
                is_active: update.is_active.unwrap_or(current.is_active),
                is_verified: update.is_verified.unwrap_or(current.is_verified),
                attributes: update
                    .attributes
                    .as_ref()
                    .map_or(current.attributes, Attributes::to_json),
                update_time: chrono::Utc::now(),
            };
            db::users::update(conn, id, &changes)
                .await?
                .ok_or(Error::NotFound(Resource::User))
        })
        .await?;
        tracing::info!(user_id = %id, "user updated");
        Ok(user)
    }

    /// Deletes a user with its memberships and sessions (one statement: the
    /// foreign keys cascade).
    #[tracing::instrument(skip(self))]
    pub async fn delete(&self, id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        audit::transaction_touching(&mut conn, &[id], async |conn| {
            keep_a_superuser(conn, id).await?;
            if db::users::delete(conn, id).await? {
                Ok(())
            } else {
                Err(Error::NotFound(Resource::User))
            }
        })
        .await?;
        tracing::info!(user_id = %id, "user deleted");
        Ok(())
    }

    /// Replaces a user's password. The new one must not be the user's
    /// username or email, which needs the user: so NOT_FOUND comes first.
    #[tracing::instrument(skip(self, new_password))]
    pub async fn set_password(&self, id: Uuid, new_password: NewPassword) -> Result<(), Error> {
        let (username, email) = {
            let mut conn = db::conn(&self.pool).await?;
            let (username, email, is_service) = db::users::canonical_names(&mut conn, id)
                .await?
                .ok_or(Error::NotFound(Resource::User))?;
            if is_service {
                return Err(Error::service_account());
            }
            (username, email)
        };
        let password = new_password
            .for_user(&[&username, &email])
            .map_err(|e| Error::invalid("new_password", e))?;
        let hash = self.hasher.hash(&password).await?;
        let mut conn = db::conn(&self.pool).await?;
        let ended = audit::transaction_touching(&mut conn, &[id], async |conn| {
            if !db::users::set_password_hash(conn, id, &hash).await? {
                return Err(Error::NotFound(Resource::User));
            }
            // A new password from an administrator also lifts a lock.
            super::password_changed(conn, id, None, EndReason::PasswordSet).await
        })
        .await?;
        tracing::info!(user_id = %id, sessions_ended = ended, "password set");
        Ok(())
    }
}

/// Refuses to demote, deactivate or delete `id` when it is the last active
/// superuser: nobody could administer the service afterwards. The active
/// superusers stay locked until the transaction ends, so two superusers
/// cannot demote each other at once.
async fn keep_a_superuser(
    conn: &mut diesel_async::AsyncPgConnection,
    id: Uuid,
) -> Result<(), Error> {
    let supers = db::users::lock_active_superusers(conn).await?;
    if supers == [id] {
        return Err(Error::FailedPrecondition(
            "the last active superuser cannot be demoted, deactivated or deleted",
        ));
    }
    Ok(())
}

impl std::fmt::Debug for UserService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserService").finish_non_exhaustive()
    }
}
