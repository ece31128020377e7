//! The AuthService use cases: login, refresh, logout, password change.
//! Token verification (VerifyToken and the bearer check of every
//! authenticated call) is in `service::verify`.

use super::audit;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use crate::db::{
    self, Pool,
    sessions::{self, NewSessionRow, Rotation},
};
use crate::domain::{EndReason, Group, Login, NewPassword, OpaqueToken, Password, User, text};
use crate::error::{Error, Reason};
use crate::hashing::Hasher;
use crate::service::throttle::{Throttle, hashed_key, user_key};
use crate::service::verify::Authenticated;
use crate::token::{TokenIssuer, jwt::Subject, opaque};

/// The `amr` of a login proved by a password alone (RFC 8176).
const PWD: &str = "pwd";

/// Retired refresh tokens a session keeps for reuse detection: a client
/// refreshing in a loop keeps at most this many rows (docs/tokens.md).
pub const KEEP_RETIRED: i64 = 64;

/// FAILED_PRECONDITION EMAIL_NOT_VERIFIED: `REQUIRE_VERIFIED_LOGIN` is on
/// and the user's address is not verified.
fn email_not_verified() -> Error {
    Error::Refused {
        reason: Reason::EmailNotVerified,
        message: "email not verified",
    }
}

/// What a login with the right password gives.
#[derive(Debug)]
pub enum LoginOutcome {
    /// A new session: its tokens, and the user.
    Session(Box<(IssuedTokens, User)>),
    /// TOTP is on: no session until CompleteLogin with this challenge
    /// (opaque, single use, 5 minutes) and a code. Its `Debug` hides it.
    SecondFactor(Challenge),
}

/// A login's challenge, shown once.
pub struct Challenge(pub String);

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenge")
    }
}

/// A pair of tokens and their lifetimes. Its `Debug` hides the tokens.
pub struct IssuedTokens {
    /// The signed access token, a JWT (RFC 9068).
    pub access_token: String,
    /// The opaque refresh token: 256 random bits, shown once. Only its
    /// SHA-256 is stored.
    pub refresh_token: String,
    /// When the access token expires: its `exp`.
    pub access_expire: chrono::DateTime<Utc>,
    /// When the refresh token expires, unless a refresh replaces it first.
    pub refresh_expire: chrono::DateTime<Utc>,
}

impl std::fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("access_expire", &self.access_expire)
            .field("refresh_expire", &self.refresh_expire)
            .finish_non_exhaustive()
    }
}

/// Logins, sessions and tokens.
#[derive(Clone)]
pub struct AuthService {
    pub(super) pool: Pool,
    pub(super) hasher: Hasher,
    pub(super) tokens: TokenIssuer,
    pub(super) refresh_ttl: Duration,
    require_verified: bool,
    pub(super) throttle: Throttle,
    /// The key that seals TOTP secrets; none: the second factor is not
    /// offered (tests and commands that do not serve).
    pub(super) mfa: Option<std::sync::Arc<crate::token::mfa_key::MfaKeys>>,
    pub(super) cache: Option<super::fresh::FreshCache>,
    /// When each API key's use was last written, on this replica.
    pub(super) key_uses:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, std::time::Instant>>>,
}

impl AuthService {
    /// The service over `pool`. `call_limit` is the longest a call may
    /// last (`REQUEST_TIMEOUT`): a login's throttling lease outlives it.
    pub fn new(
        pool: Pool,
        hasher: Hasher,
        tokens: TokenIssuer,
        refresh_ttl: Duration,
        call_limit: Duration,
    ) -> Self {
        Self {
            throttle: Throttle::new(pool.clone(), call_limit + Duration::from_secs(30)),
            pool,
            hasher,
            tokens,
            refresh_ttl,
            require_verified: false,
            mfa: None,
            cache: None,
            key_uses: Default::default(),
        }
    }

    /// Answers token checks from `cache` while it is fresh
    /// (`VERIFY_CACHE=on`).
    pub fn with_cache(mut self, cache: super::fresh::FreshCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Counts attempts its throttle refuses in `refusals` (the server's).
    pub fn with_refusals(mut self, refusals: crate::limits::Refusals) -> Self {
        self.throttle.count_in(refusals);
        self
    }

    /// Offers TOTP, its secrets sealed with `keys`.
    pub fn with_mfa(mut self, keys: std::sync::Arc<crate::token::mfa_key::MfaKeys>) -> Self {
        self.mfa = Some(keys);
        self
    }

    /// The token issuer (and its keys).
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// Makes Login refuse users whose email is not verified (after their
    /// password matched, so the refusal tells nothing to a guesser).
    pub fn require_verified_login(mut self, required: bool) -> Self {
        self.require_verified = required;
        self
    }

    /// Logs in by username or email. An unknown login costs the same hash as
    /// a wrong password and gets the same answer, and is throttled the same
    /// way, so that neither the answer, its timing nor the throttle tells
    /// whether an account exists.
    #[tracing::instrument(skip_all)]
    pub async fn login(&self, login: &Login, password: &str) -> Result<LoginOutcome, Error> {
        let canonical = login.canonical();
        let key_of = |found: &Option<db::users::Credentials>| match found {
            Some(c) => user_key(c.user.id),
            None => hashed_key("login", canonical),
        };
        let mut conn = db::conn(&self.pool).await?;
        let mut found = db::users::for_login(&mut conn, canonical).await?;
        if found.as_ref().is_some_and(|c| c.user.is_service) {
            // No password to check: a service account uses API keys.
            return Err(Error::service_account());
        }
        let lease = loop {
            let key = key_of(&found);
            let (lease, waited) = self.throttle.claim(conn, key.clone()).await?;
            if !waited {
                break lease;
            }
            // The password, or who the login names, may have changed while
            // this attempt waited: read again, and claim again if the
            // throttling key is another one now.
            let mut again = db::conn(&self.pool).await?;
            found = db::users::for_login(&mut again, canonical).await?;
            if key_of(&found) == key {
                break lease;
            }
            conn = again;
        };

        // Dropped unsettled (an error here, or the call cancelled), the
        // lease counts nothing.
        let hash = found.as_ref().map(|c| c.hash.as_str());
        let matches = self.hasher.verify(password, hash).await?;
        let mut conn = db::conn(&self.pool).await?;
        let found = match found {
            Some(c) if matches && c.user.is_active => c,
            _ => {
                lease.mismatched(&mut conn).await?;
                tracing::info!("login failed");
                return Err(Error::InvalidCredentials);
            }
        };
        let user = found.user;
        if found.has_totp && self.mfa.is_some() {
            // Half way: the failures on the key stay (a wrong code counts
            // on it too) until the second factor is right.
            lease.undecided(&mut conn).await?;
            if self.require_verified && !user.is_verified {
                tracing::info!(user_id = %user.id, "login refused: email not verified");
                return Err(email_not_verified());
            }
            let challenge = self
                .challenge(&mut conn, &user, found.password_changed_at)
                .await?;
            drop(conn);
            self.upgrade_hash_if_needed(user.id, &found.hash, password)
                .await;
            tracing::info!(user_id = %user.id, "password matched: second factor asked for");
            return Ok(LoginOutcome::SecondFactor(Challenge(challenge)));
        }
        lease.matched(&mut conn).await?;
        if self.require_verified && !user.is_verified {
            tracing::info!(user_id = %user.id, "login refused: email not verified");
            return Err(email_not_verified());
        }
        let started = self
            .start_session(
                &mut conn,
                &user,
                found.password_changed_at,
                &[PWD.to_owned()],
            )
            .await?;
        drop(conn);
        let Some(tokens) = started else {
            // The password changed (or the user was deactivated) between
            // the check and the session: the checked password is no more.
            tracing::info!(user_id = %user.id, "login lost a race with a password change");
            return Err(Error::InvalidCredentials);
        };
        self.upgrade_hash_if_needed(user.id, &found.hash, password)
            .await;
        tracing::info!(user_id = %user.id, "logged in");
        Ok(LoginOutcome::Session(Box::new((tokens, user))))
    }

    async fn upgrade_hash_if_needed(&self, user_id: Uuid, hash: &str, password: &str) {
        if self.hasher.needs_rehash(hash) {
            // Best effort: the login stands even if the upgrade must wait for
            // another day (hashing queue full, a database blip).
            if let Err(e) = self.upgrade_hash(user_id, hash, password).await {
                tracing::warn!(user_id = %user_id, error = %e, "password hash not upgraded");
            }
        }
    }

    async fn upgrade_hash(&self, user_id: Uuid, old: &str, password: &str) -> Result<(), Error> {
        // The password already matched the stored hash; only its length rule
        // may differ from today's, so hash it as given.
        let password = Password::unchecked(password);
        let new = self.hasher.hash(&password).await?;
        let mut conn = db::conn(&self.pool).await?;
        db::users::upgrade_password_hash(&mut conn, user_id, old, &new).await?;
        tracing::info!(user_id = %user_id, "password hash upgraded to the current parameters");
        Ok(())
    }

    /// A new session and its tokens, unless the password changed since
    /// `password_changed_at` or the user was deactivated (`None`).
    async fn start_session(
        &self,
        conn: &mut db::Conn,
        user: &User,
        password_changed_at: chrono::DateTime<Utc>,
        amr: &[String],
    ) -> Result<Option<IssuedTokens>, Error> {
        let session_id = Uuid::now_v7();
        let refresh = opaque::generate().map_err(|_| Error::internal("no randomness"))?;
        let refresh_expire = Utc::now() + self.refresh_ttl;
        let row = NewSessionRow {
            id: session_id,
            user_id: user.id,
            refresh_hash: &refresh.hash,
            refresh_expire_time: refresh_expire,
            amr,
        };
        // The session starts as the user's own doing: the password proved
        // who the anonymous caller is.
        let origin = audit::as_user(user.id);
        let started = audit::transaction_as_touching(conn, &origin, &[user.id], async |conn| {
            sessions::start(conn, &row, password_changed_at).await
        })
        .await?;
        if !started {
            return Ok(None);
        }
        let groups = db::groups::of_user(conn, user.id).await?;
        self.issue(
            user,
            &groups,
            session_id,
            amr,
            refresh.token,
            refresh_expire,
        )
        .map(Some)
    }

    /// An access token for a new session `session_id` of `user`, which an
    /// API key proved (no `amr`).
    pub(super) fn issue_for(
        &self,
        user: &User,
        groups: &[Group],
        session_id: Uuid,
    ) -> Result<IssuedTokens, Error> {
        self.issue(user, groups, session_id, &[], String::new(), Utc::now())
    }

    pub(super) fn issue(
        &self,
        user: &User,
        groups: &[Group],
        session_id: Uuid,
        amr: &[String],
        refresh_token: String,
        refresh_expire: chrono::DateTime<Utc>,
    ) -> Result<IssuedTokens, Error> {
        let (access_token, claims) = self.tokens.issue(Subject {
            user_id: user.id,
            session_id,
            username: &user.username,
            email: &user.email,
            is_superuser: user.is_superuser,
            is_active: user.is_active,
            is_verified: user.is_verified,
            groups: groups.iter().map(|g| g.slug.clone()).collect(),
            amr,
        })?;
        Ok(IssuedTokens {
            access_token,
            refresh_token,
            access_expire: chrono::DateTime::from_timestamp(claims.exp, 0).unwrap_or_default(),
            refresh_expire,
        })
    }

    /// Rotates a refresh token: the presented one is retired, a new pair is
    /// issued for the same session with claims from the user's state now.
    #[tracing::instrument(skip_all)]
    pub async fn refresh(
        &self,
        refresh_token: &OpaqueToken,
    ) -> Result<(IssuedTokens, User), Error> {
        let old = opaque::hash(refresh_token.expose());
        let new = opaque::generate().map_err(|_| Error::internal("no randomness"))?;
        let refresh_expire = Utc::now() + self.refresh_ttl;
        let mut conn = db::conn(&self.pool).await?;
        // Rotation, the fresh read and signing commit together: if anything
        // after the rotation fails, the old token stays current, so that the
        // client's retry is not mistaken for reuse.
        let outcome = audit::transaction_without_changes(&mut conn, async |conn| {
            let rotation =
                sessions::rotate(conn, &old, &new.hash, refresh_expire, KEEP_RETIRED).await?;
            let Rotation::Rotated {
                session_id,
                user_id,
                amr,
            } = rotation
            else {
                return Ok(Err(rotation));
            };
            let fresh = sessions::fresh(conn, user_id, session_id, true)
                .await?
                .ok_or(Error::InvalidToken(Reason::UserNotFound))?;
            if self.require_verified && !fresh.user.is_verified {
                // Rolled back: the token stays current, usable once the
                // address is verified.
                return Err(email_not_verified());
            }
            let tokens = self.issue(
                &fresh.user,
                fresh.groups.as_deref().unwrap_or_default(),
                session_id,
                &amr,
                new.token.clone(),
                refresh_expire,
            )?;
            Ok::<_, Error>(Ok((tokens, fresh.user, session_id, user_id)))
        })
        .await?;
        let (tokens, user, session_id, user_id) = match outcome {
            Ok(issued) => issued,
            Err(Rotation::Reused) => {
                // Outside the rolled-back transaction: reuse ends the session
                // for good. Recorded with no actor: whoever replayed the
                // token is not proven to be its user.
                audit::transaction(&mut conn, async |conn| {
                    sessions::end_reused(conn, &old).await
                })
                .await?;
                return Err(Error::InvalidToken(Reason::SessionEnded));
            }
            Err(_) => return Err(Error::InvalidToken(Reason::RefreshTokenInvalid)),
        };
        drop(conn);
        tracing::info!(user_id = %user_id, session_id = %session_id, "refreshed");
        Ok((tokens, user))
    }

    /// Ends the session of a refresh token (current or already rotated), or
    /// with `all_sessions` every session of its user.
    #[tracing::instrument(skip_all)]
    pub async fn logout(
        &self,
        refresh_token: &OpaqueToken,
        all_sessions: bool,
    ) -> Result<(), Error> {
        let hash = opaque::hash(refresh_token.expose());
        let mut conn = db::conn(&self.pool).await?;
        let owner = sessions::owner_of(&mut conn, &hash)
            .await?
            .ok_or(Error::InvalidToken(Reason::RefreshTokenInvalid))?;
        let (session_id, user_id) = (owner.session_id, owner.user_id);
        // The refresh token speaks for its user: the changes are theirs.
        let origin = audit::as_user(user_id);
        if all_sessions && !owner.current_and_live {
            // Only the current token of a live session speaks for the user:
            // an old one (which may have leaked) ends its own session only.
            audit::transaction_as_touching(&mut conn, &origin, &[user_id], async |conn| {
                sessions::end(conn, session_id, EndReason::Logout).await
            })
            .await?;
            return Err(Error::InvalidToken(Reason::RefreshTokenInvalid));
        }
        audit::transaction_as_touching(&mut conn, &origin, &[user_id], async |conn| {
            if all_sessions {
                sessions::end_all_of_user(conn, user_id, None, EndReason::Logout).await?;
            } else {
                sessions::end(conn, session_id, EndReason::Logout).await?;
            }
            Ok::<_, db::Error>(())
        })
        .await?;
        tracing::info!(user_id = %user_id, session_id = %session_id, all_sessions, "logged out");
        Ok(())
    }

    /// Changes the caller's own password. A wrong current password is
    /// UNAUTHENTICATED and counts as a failed login; the caller's other
    /// sessions end, its own lives on.
    #[tracing::instrument(skip_all, fields(user_id = %caller.user.id))]
    pub async fn change_password(
        &self,
        caller: &Authenticated,
        current: &str,
        new: NewPassword,
    ) -> Result<(), Error> {
        let user = &caller.user;
        if user.is_service {
            return Err(Error::service_account());
        }
        let forbidden = [text::fold(&user.username), text::fold(&user.email)];
        let new = new
            .for_user(&[&forbidden[0], &forbidden[1]])
            .map_err(|e| Error::invalid("new_password", e))?;
        let mut conn = db::conn(&self.pool).await?;
        let (stored, changed_at) = db::users::password_hash(&mut conn, user.id)
            .await?
            .ok_or(Error::InvalidToken(Reason::UserNotFound))?;
        let (lease, waited) = self.throttle.claim(conn, user_key(user.id)).await?;
        let (stored, changed_at) = if waited {
            let mut conn = db::conn(&self.pool).await?;
            db::users::password_hash(&mut conn, user.id)
                .await?
                .ok_or(Error::InvalidToken(Reason::UserNotFound))?
        } else {
            (stored, changed_at)
        };
        let matches = self.hasher.verify(current, Some(&stored)).await?;
        let mut conn = db::conn(&self.pool).await?;
        if !matches {
            lease.mismatched(&mut conn).await?;
            return Err(Error::InvalidCredentials);
        }
        lease.matched(&mut conn).await?;
        drop(conn);
        let hash = self.hasher.hash(&new).await?;
        let mut conn = db::conn(&self.pool).await?;
        let (user_id, keep) = (user.id, caller.session_id());
        let ended = audit::transaction_touching(&mut conn, &[user_id], async |conn| {
            // Only over the password just checked: a password set meanwhile
            // (SetPassword) is not silently overwritten.
            if !db::users::replace_password_hash(conn, user_id, changed_at, &hash).await? {
                return Err(Error::InvalidCredentials);
            }
            super::password_changed(conn, user_id, keep, EndReason::PasswordChanged).await
        })
        .await?;
        tracing::info!(other_sessions_ended = ended, "password changed");
        Ok(())
    }
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService").finish_non_exhaustive()
    }
}
