//! API keys (ApiKeyService) and ExchangeApiKey: made for the caller or, by
//! a superuser, for anyone; listed; revoked at once everywhere (the
//! revocation is a change of the feed, which evicts the key's user from
//! every replica's verification cache).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{AuthService, audit, auth::IssuedTokens, verify::Authenticated};
use crate::db::{self, api_keys::NewApiKeyRow, sessions};
use crate::domain::{ApiKey, PageRequest, User};
use crate::error::{Error, Reason, Resource};
use crate::token::{apikey, opaque};

/// A key to make, every field checked.
#[derive(Debug)]
pub struct NewApiKey {
    /// Whose key.
    pub user_id: Uuid,
    /// For people.
    pub display_name: String,
    /// None: never.
    pub expire_time: Option<DateTime<Utc>>,
    /// Full method names of identity's RPCs; empty: not limited.
    pub allowed_methods: Vec<String>,
}

/// A new key and its secret, shown once. Its `Debug` hides the secret.
pub struct CreatedKey {
    /// The key.
    pub key: ApiKey,
    /// The secret.
    pub secret: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl AuthService {
    /// Makes a key. A caller may make keys for itself, a superuser for
    /// anyone; a caller authenticated by a key limited to some methods only
    /// keys limited to some of those (a key cannot widen itself).
    #[tracing::instrument(skip_all, fields(caller = %caller.user.id, user_id = %new.user_id))]
    pub async fn create_api_key(
        &self,
        caller: &Authenticated,
        new: NewApiKey,
    ) -> Result<CreatedKey, Error> {
        if new.user_id != caller.user.id && !caller.user.is_superuser {
            return Err(Error::PermissionDenied);
        }
        if let super::verify::Credential::ApiKey {
            allowed_methods, ..
        } = &caller.credential
            && !allowed_methods.is_empty()
            && (new.allowed_methods.is_empty()
                || !new
                    .allowed_methods
                    .iter()
                    .all(|m| allowed_methods.contains(m)))
        {
            return Err(Error::PermissionDenied);
        }
        let key = make_key(&self.pool, &new).await?;
        tracing::info!(api_key_id = %key.key.id, prefix = %key.key.prefix, "API key created");
        Ok(key)
    }

    /// One page of `user_id`'s keys, oldest first.
    pub async fn list_api_keys(
        &self,
        user_id: Uuid,
        page: PageRequest,
    ) -> Result<db::Page<ApiKey>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        if db::users::by_id(&mut conn, user_id).await?.is_none() {
            return Err(Error::NotFound(Resource::User));
        }
        Ok(db::api_keys::list(&mut conn, user_id, page).await?)
    }

    /// Revokes key `id` (its user's or a superuser's call); revoking a
    /// revoked key changes nothing. The sessions ExchangeApiKey made from it
    /// end with it.
    #[tracing::instrument(skip(self, caller), fields(caller = %caller.user.id))]
    pub async fn revoke_api_key(&self, caller: &Authenticated, id: Uuid) -> Result<ApiKey, Error> {
        revoke_key(&self.pool, id, Some(caller)).await
    }

    /// ExchangeApiKey: an access token (no refresh token) of a new session
    /// of the key's user, which ends when the key is revoked. A key limited
    /// to some methods is refused: the token would not be.
    #[tracing::instrument(skip_all)]
    pub async fn exchange_api_key(&self, secret: &str) -> Result<(IssuedTokens, User), Error> {
        if !apikey::looks_like_key(secret) {
            return Err(Error::InvalidToken(Reason::ApiKeyInvalid));
        }
        let verified = self.verify(secret).await?;
        let super::verify::Credential::ApiKey {
            id: key_id,
            allowed_methods,
        } = &verified.caller.credential
        else {
            return Err(Error::InvalidToken(Reason::ApiKeyInvalid));
        };
        if !allowed_methods.is_empty() {
            return Err(Error::Refused {
                reason: Reason::ApiKeyRestricted,
                message: "a key limited to some methods cannot be exchanged for an access token",
            });
        }
        let user = verified.caller.user;
        let session_id = Uuid::now_v7();
        // A refresh hash nobody holds: the session is never refreshed.
        let unused = opaque::generate().map_err(|_| Error::internal("no randomness"))?;
        let mut tokens = self.issue_for(&user, &verified.groups, session_id)?;
        tokens.refresh_token = String::new();
        tokens.refresh_expire = tokens.access_expire;
        let row = sessions::NewSessionRow {
            id: session_id,
            user_id: user.id,
            refresh_hash: &unused.hash,
            refresh_expire_time: tokens.access_expire,
            amr: &[],
        };
        let origin = audit::as_user(user.id);
        let mut conn = db::conn(&self.pool).await?;
        let started =
            audit::transaction_as_touching(&mut conn, &origin, &[user.id], async |conn| {
                sessions::start_for_key(conn, &row, *key_id).await
            })
            .await?;
        if !started {
            return Err(Error::InvalidToken(Reason::ApiKeyRevoked));
        }
        tracing::info!(user_id = %user.id, api_key_id = %key_id, session_id = %session_id, "API key exchanged");
        Ok((tokens, user))
    }
}

/// Makes a key for `new.user_id` (NOT_FOUND if there is no such user), in
/// the caller's audit origin: CreateApiKey's, or `identity apikeys`'.
pub async fn make_key(pool: &db::Pool, new: &NewApiKey) -> Result<CreatedKey, Error> {
    let mut conn = db::conn(pool).await?;
    audit::transaction_touching(&mut conn, &[new.user_id], async |conn| {
        if db::users::by_id(conn, new.user_id).await?.is_none() {
            return Err(Error::NotFound(Resource::User));
        }
        // A taken prefix (47 random bits: rare) takes another secret.
        for _ in 0..4 {
            let made = apikey::generate().map_err(|_| Error::internal("no randomness"))?;
            let row = NewApiKeyRow {
                id: Uuid::now_v7(),
                user_id: new.user_id,
                display_name: &new.display_name,
                prefix: &made.prefix,
                secret_hash: &made.hash,
                allowed_methods: &new.allowed_methods,
                expire_time: new.expire_time,
            };
            if let Some(key) = db::api_keys::insert(conn, &row).await? {
                return Ok(CreatedKey {
                    key,
                    secret: made.secret,
                });
            }
        }
        Err(Error::internal("four API key prefixes in a row were taken"))
    })
    .await
}

/// Revokes key `id` as `caller` (its user or a superuser; `None`: an
/// administrator's `identity apikeys revoke`), in the caller's audit origin;
/// revoking a revoked key changes nothing. NOT_FOUND for no such key.
pub async fn revoke_key(
    pool: &db::Pool,
    id: Uuid,
    caller: Option<&Authenticated>,
) -> Result<ApiKey, Error> {
    let mut conn = db::conn(pool).await?;
    let key = db::api_keys::by_id(&mut conn, id)
        .await?
        .ok_or(Error::NotFound(Resource::ApiKey))?;
    if let Some(caller) = caller
        && key.user_id != caller.user.id
        && !caller.user.is_superuser
    {
        return Err(Error::PermissionDenied);
    }
    let key = audit::transaction_touching(&mut conn, &[key.user_id], async |conn| {
        db::api_keys::revoke(conn, id)
            .await?
            .ok_or(Error::NotFound(Resource::ApiKey))
    })
    .await?;
    tracing::info!(api_key_id = %id, user_id = %key.user_id, "API key revoked");
    Ok(key)
}
