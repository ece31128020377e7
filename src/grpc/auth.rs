//! AuthService: decodes each request, calls [`AuthService`].

use tonic::{Request, Response, Status};

use super::authz::Caller;
use super::convert::{parse_id, parse_optional_id, timestamp};
use crate::domain::{
    BreachedList, EndReason, Login, NewPassword, OpaqueToken, Pager, Session, Violation,
};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::{
    AuthService,
    auth::{IssuedTokens, LoginOutcome},
    totp::Proof,
    verify::Credential,
};

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
        Ok(Response::new(
            match self.auth.login(&login, &req.password).await? {
                LoginOutcome::Session(session) => {
                    let (tokens, user) = *session;
                    pb::LoginResponse {
                        tokens: Some(tokens.into()),
                        user: Some(user.into()),
                        ..Default::default()
                    }
                }
                LoginOutcome::SecondFactor(challenge) => pb::LoginResponse {
                    mfa_required: true,
                    mfa_challenge: challenge.0,
                    ..Default::default()
                },
            },
        ))
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
                amr: claims.amr,
                acr: claims.acr.unwrap_or_default(),
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

    async fn begin_totp_enrollment(
        &self,
        request: Request<pb::BeginTotpEnrollmentRequest>,
    ) -> Result<Response<pb::BeginTotpEnrollmentResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        require_session(caller)?;
        let enrollment = self.auth.begin_totp(&caller.user).await?;
        Ok(Response::new(pb::BeginTotpEnrollmentResponse {
            otpauth_uri: enrollment.otpauth_uri,
            secret_base32: enrollment.secret_base32,
            expire_time: Some(timestamp(enrollment.expire)),
        }))
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<pb::ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<pb::ConfirmTotpEnrollmentResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        require_session(caller)?;
        let code = &request.get_ref().code;
        if code.trim().is_empty() {
            return Err(Error::invalid("code", Violation::Required).into());
        }
        let recovery_codes = self.auth.confirm_totp(&caller.user, code).await?;
        Ok(Response::new(pb::ConfirmTotpEnrollmentResponse {
            recovery_codes,
        }))
    }

    async fn disable_totp(
        &self,
        request: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        require_session(caller)?;
        let req = request.get_ref();
        let (password, code) = match (req.current_password.is_empty(), req.code.trim().is_empty()) {
            (false, true) => (Some(req.current_password.as_str()), None),
            (true, false) => (None, Some(req.code.as_str())),
            (true, true) => {
                return Err(Error::invalid(
                    "current_password",
                    "give the current password or a TOTP code (code)",
                )
                .into());
            }
            (false, false) => {
                return Err(Error::invalid(
                    "code",
                    "give the current password or a TOTP code, not both",
                )
                .into());
            }
        };
        self.auth.disable_totp(&caller.user, password, code).await?;
        Ok(Response::new(pb::DisableTotpResponse {}))
    }

    async fn reset_second_factor(
        &self,
        request: Request<pb::ResetSecondFactorRequest>,
    ) -> Result<Response<pb::ResetSecondFactorResponse>, Status> {
        let id = parse_id("user_id", &request.get_ref().user_id)?;
        self.auth.reset_second_factor(id).await?;
        Ok(Response::new(pb::ResetSecondFactorResponse {}))
    }

    async fn complete_login(
        &self,
        request: Request<pb::CompleteLoginRequest>,
    ) -> Result<Response<pb::CompleteLoginResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.mfa_challenge.is_empty() {
            v.add("mfa_challenge", Violation::Required);
        } else if req.mfa_challenge.len() > 128 {
            v.add("mfa_challenge", "not a login challenge");
        }
        let proof = match (
            req.code.trim().is_empty(),
            req.recovery_code.trim().is_empty(),
        ) {
            (false, true) => Some(Proof::Code(&req.code)),
            (true, false) => Some(Proof::RecoveryCode(&req.recovery_code)),
            (true, true) => {
                v.add(
                    "code",
                    "give a TOTP code (code) or a recovery code (recovery_code)",
                );
                None
            }
            (false, false) => {
                v.add(
                    "recovery_code",
                    "give a TOTP code or a recovery code, not both",
                );
                None
            }
        };
        v.finish()?;
        let Some(proof) = proof else {
            return Err(Error::internal("a field failed validation without a violation").into());
        };
        let (tokens, user) = self.auth.complete_login(&req.mfa_challenge, proof).await?;
        Ok(Response::new(pb::CompleteLoginResponse {
            tokens: Some(tokens.into()),
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

/// Enrolment and its undoing are a person's acts, in a session: an API
/// key (a service's credential) cannot turn a second factor on or off.
fn require_session(caller: &crate::service::verify::Authenticated) -> Result<(), Error> {
    if caller.user.is_service {
        return Err(Error::service_account());
    }
    match caller.credential {
        Credential::Token { .. } => Ok(()),
        Credential::ApiKey { .. } => Err(Error::PermissionDenied),
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
