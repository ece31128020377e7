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
use crate::token::{AccessClaims, apikey};

/// The bearer check's answer: a valid credential (an access token or an
/// API key), and its user as it is now.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The credential's user as it is now, not as any claim says.
    pub user: User,
    /// What the caller presented.
    pub credential: Credential,
}

/// A checked credential.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An access token: its claims (signature and times checked) and its
    /// session (`sid`), live now.
    Token {
        /// The claims.
        claims: Box<AccessClaims>,
        /// The session, live now.
        session_id: Uuid,
    },
    /// An API key, neither revoked nor expired now.
    ApiKey {
        /// The key's id.
        id: Uuid,
        /// The methods it is limited to; empty: not limited.
        allowed_methods: std::sync::Arc<[String]>,
    },
}

impl Authenticated {
    /// The session of an access token; none for an API key.
    pub fn session_id(&self) -> Option<Uuid> {
        match &self.credential {
            Credential::Token { session_id, .. } => Some(*session_id),
            Credential::ApiKey { .. } => None,
        }
    }

    /// How the session was authenticated (RFC 8176 `amr`); empty for an
    /// API key.
    pub fn amr(&self) -> &[String] {
        match &self.credential {
            Credential::Token { claims, .. } => &claims.amr,
            Credential::ApiKey { .. } => &[],
        }
    }

    /// Whether the credential meets `REQUIRE_MFA_FOR_SUPERUSERS`: a session
    /// that a second factor proved, or an API key (a service's credential,
    /// which no person types in; restrict it with allowed methods).
    pub fn mfa_satisfied(&self) -> bool {
        match &self.credential {
            Credential::Token { claims, .. } => claims.second_factor(),
            Credential::ApiKey { .. } => true,
        }
    }

    /// Whether the credential lets its holder call `method`: an API key
    /// limited to some methods only those; anything else, any method (the
    /// authorization table still applies).
    pub fn allows(&self, method: &str) -> bool {
        match &self.credential {
            Credential::Token { .. } => true,
            Credential::ApiKey {
                allowed_methods, ..
            } => crate::domain::api_key::allows(allowed_methods, method),
        }
    }
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

    /// The checks of both; the groups only `with_groups`. An API key
    /// (`idk_...`) is checked as a key, anything else as an access token.
    async fn check(
        &self,
        access_token: &str,
        with_groups: bool,
    ) -> Result<(Authenticated, Option<Vec<Group>>), Error> {
        if apikey::looks_like_key(access_token) {
            return self.check_key(access_token, with_groups).await;
        }
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
            credential: Credential::Token {
                claims: Box::new(claims),
                session_id,
            },
        };
        Ok((caller, fresh.groups))
    }

    /// An API key's check: its shape and checksum (no lookup for a typo),
    /// then the key found by its prefix, its hash compared in constant
    /// time, and the key and its user as they are now, from the
    /// verification cache while it is fresh (a revocation evicts the key's
    /// user, like any change of the user).
    async fn check_key(
        &self,
        secret: &str,
        with_groups: bool,
    ) -> Result<(Authenticated, Option<Vec<Group>>), Error> {
        let invalid = || Error::InvalidToken(Reason::ApiKeyInvalid);
        let (prefix, hash) = apikey::parse(secret).ok_or_else(invalid)?;
        let known = self.cache.as_ref().and_then(|c| c.key(&hash));
        let cached = match (&self.cache, &known) {
            (Some(cache), Some(k)) => Some(cache.get(k.user_id, k.key_id, true)),
            (Some(cache), None) => Some(Err(cache.ticket())),
            (None, _) => None,
        };
        let (fresh, key_id, allowed_methods) = match (cached, known) {
            (Some(Ok(hit)), Some(k)) => (hit, k.key_id, k.allowed_methods),
            (cached, _) => {
                let read = {
                    let mut conn = db::conn(&self.pool).await?;
                    db::api_keys::fresh_key(&mut conn, prefix).await?
                };
                let read = read
                    .filter(|k| apikey::matches(&k.secret_hash, &hash))
                    .ok_or_else(invalid)?;
                let allowed: std::sync::Arc<[String]> = read.allowed_methods.into();
                if let (Some(cache), Some(Err(ticket))) = (&self.cache, cached) {
                    cache.put(ticket, read.key_id, &read.fresh);
                    cache.remember_key(hash, read.fresh.user.id, read.key_id, allowed.clone());
                }
                (read.fresh, read.key_id, allowed)
            }
        };
        if !fresh.session_open {
            return Err(Error::InvalidToken(Reason::ApiKeyRevoked));
        }
        if !fresh.session_live {
            return Err(Error::InvalidToken(Reason::ApiKeyExpired));
        }
        if !fresh.user.is_active {
            return Err(Error::InvalidToken(Reason::UserInactive));
        }
        self.note_key_use(key_id);
        let caller = Authenticated {
            user: fresh.user,
            credential: Credential::ApiKey {
                id: key_id,
                allowed_methods,
            },
        };
        Ok((caller, fresh.groups.filter(|_| with_groups)))
    }

    /// Notes that key `id` was used: in the database at most once a minute
    /// per key and replica, off the call's path.
    fn note_key_use(&self, id: Uuid) {
        let now = std::time::Instant::now();
        {
            let mut noted = self.key_uses.lock().unwrap_or_else(|p| p.into_inner());
            if noted
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < KEY_USE_EVERY)
            {
                return;
            }
            if noted.len() >= 10_000 {
                noted.retain(|_, t| now.duration_since(*t) < KEY_USE_EVERY);
            }
            noted.insert(id, now);
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let noted = async {
                let mut conn = db::conn(&pool).await?;
                db::api_keys::note_use(&mut conn, id).await?;
                Ok::<_, Error>(())
            };
            if let Err(e) = noted.await {
                tracing::warn!(api_key_id = %id, error = %e, "the key's last use was not noted");
            }
        });
    }
}

/// How often a key's use is written, at most.
const KEY_USE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

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
