//! AccountService: decodes each request, calls [`AccountService`].

use tonic::{Request, Response, Status};

use super::convert::{parse_id, timestamp};
use crate::domain::{BreachedList, Email, NewPassword, OpaqueToken};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::{
    AccountService,
    import::{ImportOutcome, ImportedUser},
};

/// The gRPC face of [`AccountService`].
#[derive(Debug, Clone)]
pub struct AccountsGrpc {
    accounts: AccountService,
    breached: BreachedList,
}

impl AccountsGrpc {
    /// Serves `accounts`; new passwords must not be in `breached` (imported
    /// hashes are not judged).
    pub fn new(accounts: AccountService, breached: BreachedList) -> Self {
        Self { accounts, breached }
    }
}

impl From<pb::ImportedUser> for ImportedUser {
    fn from(u: pb::ImportedUser) -> Self {
        ImportedUser {
            id: Some(u.id),
            username: u.username,
            email: u.email,
            password_hash: u.password_hash,
            first_name: u.first_name,
            last_name: u.last_name,
            is_superuser: u.is_superuser,
            is_active: u.is_active,
            is_verified: u.is_verified,
            attributes: u.attributes.into_iter().collect(),
            groups: u.groups,
        }
    }
}

#[tonic::async_trait]
impl pb::account_service_server::AccountService for AccountsGrpc {
    async fn issue_verification_token(
        &self,
        request: Request<pb::IssueVerificationTokenRequest>,
    ) -> Result<Response<pb::IssueVerificationTokenResponse>, Status> {
        let id = parse_id("user_id", &request.into_inner().user_id)?;
        let (issued, email) = self.accounts.issue_verification(id).await?;
        Ok(Response::new(pb::IssueVerificationTokenResponse {
            token: issued.token,
            email,
            expire_time: Some(timestamp(issued.expire_time)),
        }))
    }

    async fn confirm_email(
        &self,
        request: Request<pb::ConfirmEmailRequest>,
    ) -> Result<Response<pb::ConfirmEmailResponse>, Status> {
        let token = OpaqueToken::account(&request.into_inner().token)
            .map_err(|e| Error::invalid("token", e))?;
        let user = self.accounts.confirm_email(&token).await?;
        Ok(Response::new(pb::ConfirmEmailResponse {
            user: Some(user.into()),
        }))
    }

    async fn request_password_reset(
        &self,
        request: Request<pb::RequestPasswordResetRequest>,
    ) -> Result<Response<pb::RequestPasswordResetResponse>, Status> {
        let email =
            Email::parse(&request.into_inner().email).map_err(|e| Error::invalid("email", e))?;
        let issued = self.accounts.request_reset(&email).await?;
        Ok(Response::new(match issued {
            Some(issued) => pb::RequestPasswordResetResponse {
                token: issued.token,
                expire_time: Some(timestamp(issued.expire_time)),
            },
            None => pb::RequestPasswordResetResponse::default(),
        }))
    }

    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let token = v.check("token", OpaqueToken::account(&req.token));
        let password = v.check(
            "new_password",
            NewPassword::parse(&req.new_password, &self.breached),
        );
        v.finish()?;
        let (Some(token), Some(password)) = (token, password) else {
            return Err(Error::internal("a field failed validation without a violation").into());
        };
        self.accounts.reset_password(&token, password).await?;
        Ok(Response::new(pb::ResetPasswordResponse {}))
    }

    async fn import_users(
        &self,
        request: Request<pb::ImportUsersRequest>,
    ) -> Result<Response<pb::ImportUsersResponse>, Status> {
        let users: Vec<ImportedUser> = request
            .into_inner()
            .users
            .into_iter()
            .map(Into::into)
            .collect();
        let outcomes = self.accounts.import(users).await?;
        let results = outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| {
                let index = i32::try_from(index).map_err(Error::internal)?;
                use pb::import_result::Outcome;
                Ok(match outcome {
                    ImportOutcome::Imported(id) => pb::ImportResult {
                        index,
                        outcome: Outcome::Imported.into(),
                        id: id.to_string(),
                        reason: String::new(),
                    },
                    ImportOutcome::AlreadyImported(id) => pb::ImportResult {
                        index,
                        outcome: Outcome::AlreadyImported.into(),
                        id: id.to_string(),
                        reason: String::new(),
                    },
                    ImportOutcome::Refused(reason) => pb::ImportResult {
                        index,
                        outcome: Outcome::Refused.into(),
                        id: String::new(),
                        reason,
                    },
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Response::new(pb::ImportUsersResponse { results }))
    }
}
