//! AuthService: decodes each request, calls [`AuthService`].

use tonic::{Request, Response, Status};

use super::authz::Caller;
use super::convert::{parse_id, parse_optional_id, timestamp};
use crate::domain::{
    BreachedList, EndReason, Login, NewPassword, OpaqueToken, Pager, Session, Violation,
};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::{AuthService, auth::IssuedTokens, verify::Credential};

/// The gRPC face of [`AuthService`].
#[derive(Debug, Clone)]
pub struct AuthGrpc {
    auth: AuthService,
    breached: BreachedList,
}

impl AuthGrpc {
    /// Serves `auth`; new passwords must not be in `breached` (Login never
    /// looks at it).
    pub fn new(auth: AuthService, breached: BreachedList) -> Self {
        Self { auth, breached }
    }
}

impl From<IssuedTokens> for pb::Tokens {
    fn from(t: IssuedTokens) -> Self {
        pb::Tokens {
            access_token: t.access_token,
            refresh_token: t.refresh_token,
            token_type: "Bearer".to_owned(),
            access_token_expire_time: Some(timestamp(t.access_expire)),
            refresh_token_expire_time: Some(timestamp(t.refresh_expire)),
        }
    }
}

fn seconds(s: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: s,
        nanos: 0,
    })
}

#[tonic::async_trait]
impl pb::auth_service_server::AuthService for AuthGrpc {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = request.into_inner();
        let login = Login::parse(&req.login).map_err(|e| Error::invalid("login", e))?;
        let (tokens, user) = self.auth.login(&login, &req.password).await?;
        Ok(Response::new(pb::LoginResponse {
            tokens: Some(tokens.into()),
            user: Some(user.into()),
        }))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let token = OpaqueToken::refresh(&request.into_inner().refresh_token)
            .map_err(|e| Error::invalid("refresh_token", e))?;
        let (tokens, user) = self.auth.refresh(&token).await?;
        Ok(Response::new(pb::RefreshResponse {
            tokens: Some(tokens.into()),
            user: Some(user.into()),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let req = request.into_inner();
        let token = OpaqueToken::refresh(&req.refresh_token)
            .map_err(|e| Error::invalid("refresh_token", e))?;
        self.auth.logout(&token, req.all_sessions).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let verified = self.auth.verify(&request.into_inner().access_token).await?;
        let claims = match verified.caller.credential {
            Credential::Token { claims, .. } => pb::TokenClaims {
                subject: claims.sub,
                token_id: claims.jti,
                session_id: claims.sid,
                issue_time: seconds(claims.iat),
                expire_time: seconds(claims.exp),
                issuer: claims.iss,
                audience: claims.aud.to_vec(),
            },
            // An API key: its id, no session, nothing signed.
            Credential::ApiKey { id, .. } => pb::TokenClaims {
                subject: verified.caller.user.id.to_string(),
                token_id: id.to_string(),
                ..Default::default()
            },
        };
        Ok(Response::new(pb::VerifyTokenResponse {
            user: Some(verified.caller.user.into()),
            groups: verified.groups.into_iter().map(Into::into).collect(),
            claims: Some(claims),
        }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<pb::GetPublicKeysRequest>,
    ) -> Result<Response<pb::GetPublicKeysResponse>, Status> {
        let keys = self.auth.tokens().keys();
        Ok(Response::new(pb::GetPublicKeysResponse {
            keys: keys
                .keys()
                .iter()
                .map(|k| pb::PublicKey {
                    key_id: k.kid.clone(),
                    algorithm: crate::token::keys::algorithm_name(k.algorithm).to_owned(),
                    pem: k.public_pem.clone(),
                })
                .collect(),
            jwks_json: keys.jwks_json().to_owned(),
        }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        if caller.user.is_service {
            // Whatever was sent: there is no password to change.
            return Err(Error::service_account().into());
        }
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.current_password.is_empty() {
            v.add("current_password", Violation::Required);
        }
        let new = v.check(
            "new_password",
            NewPassword::parse(&req.new_password, &self.breached),
        );
        v.finish()?;
        let Some(new) = new else {
            return Err(Error::internal("a field failed validation without a violation").into());
        };
        self.auth
            .change_password(caller, &req.current_password, new)
            .await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = Caller::of(&request);
        let signed_in = caller.signed_in()?;
        let req = request.into_inner();
        let user_id = parse_optional_id("user_id", &req.user_id)?.unwrap_or(signed_in.user.id);
        if user_id != signed_in.user.id && !caller.is_superuser() {
            return Err(caller.refusal().into());
        }
        let pager = Pager::for_filters(&[
            "sessions",
            &user_id.to_string(),
            if req.include_ended { "all" } else { "live" },
        ]);
        let page = pager
            .parse(req.page_size, &req.page_token)
            .map_err(|(field, e)| Error::invalid(field, e))?;
        let page = self
            .auth
            .list_sessions(user_id, req.include_ended, page)
            .await?;
        Ok(Response::new(pb::ListSessionsResponse {
            next_page_token: page.last.map(|id| pager.next(id)).unwrap_or_default(),
            sessions: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn exchange_api_key(
        &self,
        request: Request<pb::ExchangeApiKeyRequest>,
    ) -> Result<Response<pb::ExchangeApiKeyResponse>, Status> {
        let (tokens, user) = self
            .auth
            .exchange_api_key(&request.into_inner().api_key)
            .await?;
        Ok(Response::new(pb::ExchangeApiKeyResponse {
            tokens: Some(pb::Tokens {
                access_token: tokens.access_token,
                refresh_token: String::new(),
                token_type: "Bearer".to_owned(),
                access_token_expire_time: Some(timestamp(tokens.access_expire)),
                refresh_token_expire_time: None,
            }),
            user: Some(user.into()),
        }))
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        let id = parse_id("session_id", &request.get_ref().session_id)?;
        self.auth.end_session(caller, id).await?;
        Ok(Response::new(pb::EndSessionResponse {}))
    }
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        pb::Session {
            id: s.id.to_string(),
            user_id: s.user_id.to_string(),
            create_time: Some(timestamp(s.create_time)),
            last_refresh_time: Some(timestamp(s.refresh_time)),
            refresh_token_expire_time: Some(timestamp(s.refresh_expire_time)),
            end_time: s.end_time.map(timestamp),
            end_reason: s
                .end_reason
                .as_deref()
                .map(EndReason::wire_name)
                .unwrap_or_default(),
            api_key_id: s.api_key_id.map(|id| id.to_string()).unwrap_or_default(),
        }
    }
}
