//! Token verification: VerifyToken and the bearer check behind every
//! authenticated call. An access token is checked offline (signature, kid,
//! exp, nbf, iss, aud), then its user and session as they are now, in one
//! read (`db::sessions::fresh`), or from the verification cache
//! (`fresh.rs`) while it is fresh, behind the same two functions.

use uuid::Uuid;

use super::AuthService;
use crate::db::{self, sessions};
use crate::domain::{Group, User};
use crate::error::{Error, Reason};
use crate::token::AccessClaims;

/// The bearer check's answer: a valid access token, and its user and
/// session as they are now.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The token's user as it is now, not as the claims say.
    pub user: User,
    /// The token's claims, signature and times checked.
    pub claims: AccessClaims,
    /// The token's session (its `sid`), live now.
    pub session_id: Uuid,
}

/// VerifyToken's answer: as [`Authenticated`], with the user's groups now.
/// A separate type, so that no caller of the bearer check (which does not
/// read groups) can take an empty list for the user's groups.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The token, its user and its session, as the bearer check finds them.
    pub caller: Authenticated,
    /// Every group of the user now, by id: all of them, where the `groups`
    /// claim may be cut short.
    pub groups: Vec<Group>,
}

impl AuthService {
    /// VerifyToken: checks an access token offline (signature, kid, exp,
    /// nbf, iss, aud), then the user, session and groups as they are now,
    /// in one round trip.
    pub async fn verify(&self, access_token: &str) -> Result<Verified, Error> {
        let (caller, groups) = self.check(access_token, true).await?;
        let groups = groups.ok_or_else(|| Error::internal("groups asked for, not read"))?;
        Ok(Verified { caller, groups })
    }

    /// The bearer check of every signed-in call: as [`Self::verify`], but
    /// without reading the user's groups, which authorization never needs.
    pub async fn authenticate(&self, access_token: &str) -> Result<Authenticated, Error> {
        Ok(self.check(access_token, false).await?.0)
    }

    /// The checks of both; the groups only `with_groups`.
    async fn check(
        &self,
        access_token: &str,
        with_groups: bool,
    ) -> Result<(Authenticated, Option<Vec<Group>>), Error> {
        let claims = self.tokens.verify(access_token)?;
        let malformed = || Error::InvalidToken(Reason::TokenMalformed);
        let user_id = Uuid::try_parse(&claims.sub).map_err(|_| malformed())?;
        let session_id = Uuid::try_parse(&claims.sid).map_err(|_| malformed())?;
        let fresh = match self
            .cache
            .as_ref()
            .map(|c| c.get(user_id, session_id, with_groups))
        {
            Some(Ok(hit)) => hit,
            Some(Err(ticket)) => {
                let fresh = self.read_fresh(user_id, session_id, with_groups).await?;
                if let Some(cache) = &self.cache {
                    cache.put(ticket, session_id, &fresh);
                }
                fresh
            }
            None => self.read_fresh(user_id, session_id, with_groups).await?,
        };
        if !fresh.user.is_active {
            return Err(Error::InvalidToken(Reason::UserInactive));
        }
        if !fresh.session_live {
            return Err(Error::InvalidToken(Reason::SessionEnded));
        }
        if issue_millis(&claims) < fresh.password_changed_at.timestamp_millis() {
            return Err(Error::InvalidToken(Reason::CredentialsChanged));
        }
        let caller = Authenticated {
            user: fresh.user,
            claims,
            session_id,
        };
        Ok((caller, fresh.groups))
    }
}

impl AuthService {
    /// The user and session as they are in the database now.
    async fn read_fresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        with_groups: bool,
    ) -> Result<sessions::Fresh, Error> {
        let mut conn = db::conn(&self.pool).await?;
        sessions::fresh(&mut conn, user_id, session_id, with_groups)
            .await?
            .ok_or(Error::InvalidToken(Reason::UserNotFound))
    }
}

/// When a token was issued, to the millisecond: `iat` has whole seconds
/// only, too coarse to tell a token issued just before a password change
/// from one issued just after; our `jti` is a UUIDv7, which carries the
/// millisecond (and is covered by the signature).
fn issue_millis(claims: &AccessClaims) -> i64 {
    Uuid::try_parse(&claims.jti)
        .ok()
        .filter(|id| id.get_version_num() == 7)
        .and_then(|id| id.get_timestamp())
        .map(|ts| {
            let (secs, nanos) = ts.to_unix();
            i64::try_from(secs).unwrap_or(i64::MAX) * 1000 + i64::from(nanos / 1_000_000)
        })
        .unwrap_or(claims.iat.saturating_mul(1000))
}
