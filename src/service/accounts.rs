//! The AccountService use cases: email verification and password reset.
//! The import of users with their hashes is in `service::import`.

use super::audit;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::{
    self, Pool,
    accounts::{Purpose, TokenState},
};
use crate::domain::{Email, EndReason, NewPassword, OpaqueToken, User};
use crate::error::{Error, Reason, Resource};
use crate::hashing::Hasher;
use crate::token::opaque;

/// Throttling of reset requests per address: free requests a day, then a
/// lock doubling up to an hour.
const FREE_RESET_REQUESTS: i32 = 5;
const MAX_RESET_LOCK_SECONDS: i32 = 3600;

/// A token just issued: its text (shown once) and expiry.
#[derive(Clone)]
pub struct IssuedToken {
    /// The secret for the caller to send on: 256 random bits, URL-safe
    /// base64. Only its SHA-256 is stored.
    pub token: String,
    /// When it stops being accepted.
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

/// Email verification, password reset, import (`service::import`).
#[derive(Clone)]
pub struct AccountService {
    pub(super) pool: Pool,
    hasher: Hasher,
    verification_ttl: Duration,
    reset_ttl: Duration,
    /// Where a reset request refused for its address is counted.
    refusals: crate::limits::Refusals,
}

impl AccountService {
    /// The service over `pool`, hashing with `hasher`; verification tokens
    /// last `verification_ttl` (`EMAIL_VERIFICATION_TTL`), reset tokens
    /// `reset_ttl` (`PASSWORD_RESET_TTL`).
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
            refusals: crate::limits::Refusals::default(),
        }
    }

    /// Counts reset requests refused for their address in `refusals` (the
    /// server's), as `Cause::ResetThrottle`.
    pub fn with_refusals(mut self, refusals: crate::limits::Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// Issues a verification token for the user `user_id`, bound to its
    /// current email. Returns the token, the address and the expiry.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn issue_verification(&self, user_id: Uuid) -> Result<(IssuedToken, String), Error> {
        let mut conn = db::conn(&self.pool).await?;
        let user = db::users::by_id(&mut conn, user_id)
            .await?
            .ok_or(Error::NotFound(Resource::User))?;
        if user.is_service {
            return Err(Error::service_account());
        }
        let (_, email_canonical, _) = db::users::canonical_names(&mut conn, user_id)
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
        let user = audit::transaction(&mut conn, async |conn| {
            let Some((user_id, email)) =
                db::accounts::use_token(conn, &hash, Purpose::VerifyEmail).await?
            else {
                return Err(refusal(
                    db::accounts::state(conn, &hash, Purpose::VerifyEmail).await?,
                ));
            };
            // The token speaks for its user: the change is theirs.
            db::changes::act_as(conn, user_id).await?;
            let current = db::users::canonical_names(conn, user_id).await?;
            if current.as_ref().is_some_and(|(_, _, service)| *service) {
                return Err(Error::service_account());
            }
            if current.as_ref().map(|(_, e, _)| e) != Some(&email) {
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
            tracing::info!("password reset request refused: throttled");
            self.refusals.refuse(crate::limits::Cause::ResetThrottle);
            return Err(crate::service::throttled(
                "too many password reset requests for this address",
                until,
            ));
        }
        let Some(user) = db::users::by_email(&mut conn, email.canonical()).await? else {
            tracing::info!("password reset asked for an unknown address");
            return Ok(None);
        };
        if user.is_service {
            return Err(Error::service_account());
        }
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
            if names.2 {
                return Err(Error::service_account());
            }
            (user_id, names)
        };
        let password = new_password
            .for_user(&[&names.0, &names.1])
            .map_err(|e| Error::invalid("new_password", e))?;
        let new_hash = self.hasher.hash(&password).await?;
        let mut conn = db::conn(&self.pool).await?;
        // The token speaks for its user: the changes are theirs.
        let ended = audit::transaction_as(&mut conn, &audit::as_user(user_id), async |conn| {
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
            if used_by != user_id || !active || current.as_ref().map(|(_, e, _)| e) != Some(&email)
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

impl std::fmt::Debug for AccountService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountService").finish_non_exhaustive()
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
