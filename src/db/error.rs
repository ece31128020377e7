//! What goes wrong in the database, in the schema's own words: the
//! constraint that refused a row, a database that is away, or anything
//! else. Built once, here, from diesel's and deadpool's errors; given API
//! meaning once, in `service::errors`.

/// A boxed cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A database error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A unique constraint or primary key refused a row.
    #[error("unique constraint {} violated", .0.name())]
    Unique(UniqueKey),
    /// A foreign key points at a row that is not there (deleted meanwhile).
    #[error("foreign key {} violated", .0.name())]
    MissingRef(Ref),
    /// The database cannot be reached, or lost the connection or the
    /// transaction: transient, worth a retry.
    #[error("database unavailable")]
    Unavailable(#[source] BoxError),
    /// Anything else: a bug, or a constraint no variant names.
    #[error("database error")]
    Other(#[source] BoxError),
}

/// Declares an enum of constraints with their names in the schema, both
/// ways, and the list of them all (for the test that holds it to the
/// migrations).
macro_rules! constraints {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $sql:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every constraint of this kind in the schema.
            pub const ALL: &[Self] = &[$(Self::$variant),*];

            /// The constraint's name in the schema.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $sql,)*
                }
            }

            /// The constraint named `name`, if it is one of these.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($sql => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

constraints! {
    /// The unique constraints and primary keys of `migrations/`.
    UniqueKey {
        /// `users.id`.
        UsersPkey = "users_pkey",
        /// `users.username_canonical`.
        UsersUsernameCanonical = "users_username_canonical_key",
        /// `users.email_canonical`.
        UsersEmailCanonical = "users_email_canonical_key",
        /// `login_names.name`.
        LoginNamesPkey = "login_names_pkey",
        /// `groups.id`.
        GroupsPkey = "groups_pkey",
        /// `groups.groupname_canonical`.
        GroupsGroupnameCanonical = "groups_groupname_canonical_key",
        /// `groups.slug`.
        GroupsSlug = "groups_slug_key",
        /// `group_members (group_id, user_id)`.
        GroupMembersPkey = "group_members_pkey",
        /// `sessions.id`.
        SessionsPkey = "sessions_pkey",
        /// `sessions.refresh_hash`.
        SessionsRefreshHash = "sessions_refresh_hash_key",
        /// `retired_refresh_tokens.hash`.
        RetiredRefreshTokensPkey = "retired_refresh_tokens_pkey",
        /// `login_failures.key`.
        LoginFailuresPkey = "login_failures_pkey",
        /// `login_attempts.id`.
        LoginAttemptsPkey = "login_attempts_pkey",
        /// `account_tokens.hash`.
        AccountTokensPkey = "account_tokens_pkey",
        /// `change_purge.one` (the purge mark has one row).
        ChangePurgePkey = "change_purge_pkey",
        /// `changes (xid, seq)`.
        ChangesPkey = "changes_pkey",
        /// `api_keys.id`.
        ApiKeysPkey = "api_keys_pkey",
        /// `api_keys.prefix` (a new key with a taken prefix gets another).
        ApiKeysPrefix = "api_keys_prefix_key",
        /// `totp_factors.user_id` (one factor a user; `begin` upserts).
        TotpFactorsPkey = "totp_factors_pkey",
        /// `recovery_codes (user_id, code_hash)`.
        RecoveryCodesPkey = "recovery_codes_pkey",
        /// `mfa_challenges.challenge_hash`.
        MfaChallengesPkey = "mfa_challenges_pkey",
    }
}

constraints! {
    /// The foreign keys of `migrations/`, named by the row they point from.
    Ref {
        /// A login name's user.
        LoginNamesUser = "login_names_user_id_fkey",
        /// A membership's group.
        GroupMembersGroup = "group_members_group_id_fkey",
        /// A membership's user.
        GroupMembersUser = "group_members_user_id_fkey",
        /// A session's user.
        SessionsUser = "sessions_user_id_fkey",
        /// A retired refresh token's session.
        RetiredRefreshTokensSession = "retired_refresh_tokens_session_id_fkey",
        /// An account token's user.
        AccountTokensUser = "account_tokens_user_id_fkey",
        /// An API key's user.
        ApiKeysUser = "api_keys_user_id_fkey",
        /// The key an ExchangeApiKey session came from.
        SessionsApiKey = "sessions_api_key_id_fkey",
        /// A TOTP factor's user.
        TotpFactorsUser = "totp_factors_user_id_fkey",
        /// A recovery code's user.
        RecoveryCodesUser = "recovery_codes_user_id_fkey",
        /// A login challenge's user.
        MfaChallengesUser = "mfa_challenges_user_id_fkey",
    }
}

/// The CHECK constraints of `migrations/`: a violation is a bug (the input
/// rules come first), so it is [`Error::Other`].
pub const CHECKS: &[&str] = &[
    "users_attributes_is_object",
    "account_tokens_purpose_check",
    "change_purge_one_check",
    "totp_factors_pending_or_on",
];

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match e {
            // COMMIT or ROLLBACK failed: the connection went away mid-transaction.
            D::RollbackErrorOnCommit { .. } | D::BrokenTransactionManager => {
                Error::Unavailable(Box::new(e))
            }
            D::DatabaseError(DatabaseErrorKind::UniqueViolation, ref info) => {
                match info.constraint_name().and_then(UniqueKey::from_name) {
                    Some(key) => Error::Unique(key),
                    None => Error::Other(Box::new(e)),
                }
            }
            D::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, ref info) => {
                match info.constraint_name().and_then(Ref::from_name) {
                    Some(fk) => Error::MissingRef(fk),
                    None => Error::Other(Box::new(e)),
                }
            }
            // A lost connection, a standby that took over (read-only), or a
            // transaction that lost a conflict: all transient, worth a retry.
            D::DatabaseError(
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ReadOnlyTransaction
                | DatabaseErrorKind::SerializationFailure,
                _,
            ) => Error::Unavailable(Box::new(e)),
            D::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if info.message().starts_with("terminating connection")
                    || info.message().contains("the database system is") =>
            {
                // 57P01 admin_shutdown and 57P03 cannot_connect_now: the
                // server is going away or not there yet.
                Error::Unavailable(Box::new(e))
            }
            other => Error::Other(Box::new(other)),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        use deadpool::managed::PoolError as P;
        match e {
            // No connection in time, or none could be made: the database is
            // away (or overloaded); worth a retry.
            P::Timeout(_) | P::Backend(_) | P::Closed => Error::Unavailable(Box::new(e)),
            P::NoRuntimeSpecified | P::PostCreateHook(_) => Error::Other(Box::new(e)),
        }
    }
}

impl From<diesel::ConnectionError> for Error {
    fn from(e: diesel::ConnectionError) -> Self {
        Error::Unavailable(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_names_go_both_ways() {
        for key in UniqueKey::ALL {
            assert_eq!(UniqueKey::from_name(key.name()), Some(*key));
        }
        for fk in Ref::ALL {
            assert_eq!(Ref::from_name(fk.name()), Some(*fk));
        }
        assert_eq!(UniqueKey::from_name("no_such_key"), None);
    }
}
