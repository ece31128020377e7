//! The one place where what the database says gets its API meaning: a
//! unique constraint becomes ALREADY_EXISTS naming the request field it
//! guards, a foreign key NOT_FOUND naming the row that is gone, a database
//! that is away UNAVAILABLE. Exhaustive, with no catch-all arm: a new
//! constraint does not compile until someone decides what it means.

use crate::db::{self, Ref, UniqueKey};
use crate::error::{Error, Field, Resource};

impl From<db::Error> for Error {
    fn from(e: db::Error) -> Self {
        let taken = |field| Error::AlreadyExists { field, hint: None };
        match e {
            db::Error::Unique(key) => match key {
                UniqueKey::UsersPkey => taken(Field::Id),
                UniqueKey::UsersUsernameCanonical => taken(Field::Username),
                UniqueKey::UsersEmailCanonical => taken(Field::Email),
                UniqueKey::GroupsGroupnameCanonical => taken(Field::Groupname),
                UniqueKey::GroupsSlug => taken(Field::Slug),
                // Claimed with ON CONFLICT, or keyed by UUIDv7s and random
                // secrets: a violation is a bug.
                UniqueKey::LoginNamesPkey
                | UniqueKey::GroupsPkey
                | UniqueKey::GroupMembersPkey
                | UniqueKey::SessionsPkey
                | UniqueKey::SessionsRefreshHash
                | UniqueKey::RetiredRefreshTokensPkey
                | UniqueKey::LoginFailuresPkey
                | UniqueKey::LoginAttemptsPkey
                | UniqueKey::AccountTokensPkey
                | UniqueKey::ApiKeysPkey
                | UniqueKey::ApiKeysPrefix
                // Upserted; deleted before inserted; random challenges.
                | UniqueKey::TotpFactorsPkey
                | UniqueKey::RecoveryCodesPkey
                | UniqueKey::MfaChallengesPkey
                // The feed's: one purge mark, rows keyed by xid and sequence.
                | UniqueKey::ChangePurgePkey
                | UniqueKey::ChangesPkey => Error::internal(db::Error::Unique(key)),
            },
            db::Error::MissingRef(fk) => match fk {
                // A group or user deleted while a membership was added.
                Ref::GroupMembersGroup => Error::NotFound(Resource::Group),
                Ref::GroupMembersUser => Error::NotFound(Resource::User),
                // A user deleted while a key was made for it.
                Ref::ApiKeysUser => Error::NotFound(Resource::User),
                // A user deleted during an enrolment or a login: as if the
                // credential had gone.
                Ref::TotpFactorsUser | Ref::RecoveryCodesUser => Error::NotFound(Resource::User),
                Ref::MfaChallengesUser => Error::InvalidCredentials,
                Ref::LoginNamesUser
                | Ref::SessionsUser
                | Ref::RetiredRefreshTokensSession
                | Ref::AccountTokensUser
                // Inserted from the key's share-locked row.
                | Ref::SessionsApiKey => Error::internal(db::Error::MissingRef(fk)),
            },
            db::Error::Unavailable(source) => Error::Unavailable(source),
            db::Error::Other(source) => Error::Internal(source),
        }
    }
}

/// For the services' transactions (`conn.transaction(async |conn| ..)`),
/// whose error type must come from diesel's: through [`db::Error`], so that
/// diesel's errors are read in `db` only.
impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        db::Error::from(e).into()
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        db::Error::from(e).into()
    }
}
