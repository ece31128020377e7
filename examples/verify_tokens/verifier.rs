//! What a Rust service needs to trust identity's access tokens: verify them
//! offline with the published keys (no call per request), and ask
//! VerifyToken when an operation needs the user's state now rather than
//! when the token was issued (up to its lifetime ago, 15 minutes by
//! default).
//!
//! Copy this file into your service; it depends on tonic, jsonwebtoken
//! (one crypto backend), serde_json and the client generated from identity's
//! `proto/` (here `identity::proto`).

use std::{collections::HashMap, sync::RwLock};

use identity::proto::identity::v1::{self as pb, auth_service_client::AuthServiceClient};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;
use tonic::transport::Channel;

/// The claims a service usually reads. identity issues more (see
/// docs/tokens.md); serde ignores the rest.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// The session the token belongs to.
    pub sid: String,
    pub username: String,
    pub email: String,
    pub is_superuser: bool,
    pub is_active: bool,
    pub is_verified: bool,
    /// The slugs of the user's groups when the token was issued.
    pub groups: Vec<String>,
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Offline: malformed, bad signature, expired, wrong issuer or audience,
    /// unknown key.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// VerifyToken refused it; `reason` is identity's ErrorInfo reason, such
    /// as SESSION_ENDED, USER_INACTIVE or CREDENTIALS_CHANGED.
    #[error("refused by identity: {reason} ({status})")]
    Stale {
        reason: String,
        status: tonic::Status,
    },
    /// identity could not be asked (network, overload).
    #[error("identity unavailable: {0}")]
    Unavailable(tonic::Status),
}

/// Verifies access tokens offline, and fresh through VerifyToken.
pub struct Verifier {
    client: AuthServiceClient<Channel>,
    issuer: String,
    audience: String,
    keys: RwLock<HashMap<String, (Algorithm, DecodingKey)>>,
}

impl Verifier {
    /// A verifier over `channel` (one connection, shared and multiplexed),
    /// for tokens of `issuer` meant for `audience` (JWT_ISSUER and
    /// JWT_AUDIENCE of the service; both "identity" by default). Loads the
    /// keys at once.
    pub async fn new(
        channel: Channel,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, tonic::Status> {
        let verifier = Self {
            client: AuthServiceClient::new(channel),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            keys: RwLock::new(HashMap::new()),
        };
        verifier.reload_keys().await?;
        Ok(verifier)
    }

    /// Fetches the published keys (GetPublicKeys; the same set is served
    /// as `GET /.well-known/jwks.json`). Call it on a timer too, a few
    /// minutes apart: a new key is published before it signs.
    pub async fn reload_keys(&self) -> Result<(), tonic::Status> {
        let response = self
            .client
            .clone()
            .get_public_keys(pb::GetPublicKeysRequest {})
            .await?
            .into_inner();
        let set: JwkSet = serde_json::from_str(&response.jwks_json)
            .map_err(|e| tonic::Status::internal(format!("JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // A key without kid or algorithm, or of a kind this build cannot
            // use, is skipped: it can verify nothing here.
            let (Some(kid), Some(alg)) = (&jwk.common.key_id, jwk.common.key_algorithm) else {
                continue;
            };
            let (Ok(alg), Ok(key)) = (Algorithm::try_from(alg), DecodingKey::from_jwk(jwk)) else {
                continue;
            };
            keys.insert(kid.clone(), (alg, key));
        }
        *self.keys.write().expect("unpoisoned") = keys;
        Ok(())
    }

    /// Verifies `token` offline: the key named by its `kid` (its algorithm
    /// pinned, whatever the header says), the signature, `exp`, `nbf`,
    /// `iss`, `aud` and the type `at+jwt`. No network call: the answer is
    /// the user's state when the token was issued.
    pub fn verify_offline(&self, token: &str) -> Result<Claims, Refused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Refused::Invalid(e.to_string()))?;
        if !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("at+jwt"))
        {
            return Err(Refused::Invalid("not an access token (typ)".into()));
        }
        let kid = header
            .kid
            .ok_or_else(|| Refused::Invalid("no kid".into()))?;
        let keys = self.keys.read().expect("unpoisoned");
        let (alg, key) = keys
            .get(&kid)
            .ok_or_else(|| Refused::Invalid(format!("unknown key {kid}: reload the keys")))?;
        let mut validation = Validation::new(*alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 10;
        jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| Refused::Invalid(e.to_string()))
    }

    /// Verifies `token` offline first (garbage never costs a call), then
    /// asks identity for the user's state now: for operations that must not
    /// act on a deactivated user, an ended session or changed credentials.
    pub async fn verify_fresh(&self, token: &str) -> Result<pb::VerifyTokenResponse, Refused> {
        self.verify_offline(token)?;
        match self
            .client
            .clone()
            .verify_token(pb::VerifyTokenRequest {
                access_token: token.to_owned(),
            })
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                let reason = error_reason(&status).unwrap_or_else(|| "UNAUTHENTICATED".into());
                Err(Refused::Stale { reason, status })
            }
            Err(status) => Err(Refused::Unavailable(status)),
        }
    }
}

/// The `google.rpc.ErrorInfo` reason in a status's details, if any.
pub fn error_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status.get_details_error_info().map(|info| info.reason)
}
