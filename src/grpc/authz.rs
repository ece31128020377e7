//! Who may call what: the authorization table (docs/security.md), in one place.
//!
//! [`AuthLayer`] is a tower layer around every route. For each call it looks
//! up the RPC's [`Access`], verifies the bearer token when the RPC needs or
//! accepts one (the same check as VerifyToken: signature, claims, and the
//! user and session read fresh), refuses what the table refuses, and puts
//! the [`Caller`] into the request's extensions. Rules that depend on the
//! request's content (self or others, which fields) are the functions below,
//! called by the handlers with the caller the layer found.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use uuid::Uuid;

use crate::error::Error;
use crate::error::Reason;
use crate::service::{AuthService, changes::Announcer, verify::Authenticated};

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No token (on an RPC that allows that).
    Anonymous,
    /// A verified token, and its user as it is now.
    User(Arc<Authenticated>),
    /// A superuser's session that no second factor proved, while
    /// `REQUIRE_MFA_FOR_SUPERUSERS` is on: signed in, without a superuser's
    /// powers; what needs them is refused with reason MFA_REQUIRED.
    Unproved(Arc<Authenticated>),
}

impl Caller {
    /// The caller of a request, as the layer put it there.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// Whether the caller is an active superuser now.
    pub fn is_superuser(&self) -> bool {
        matches!(self, Caller::User(v) if v.user.is_superuser)
    }

    /// The signed-in caller, or UNAUTHENTICATED.
    pub fn signed_in(&self) -> Result<&Arc<Authenticated>, Error> {
        match self {
            Caller::User(v) | Caller::Unproved(v) => Ok(v),
            Caller::Anonymous => Err(Error::InvalidToken(Reason::TokenMissing)),
        }
    }

    /// The refusal for this caller: UNAUTHENTICATED to the anonymous,
    /// PERMISSION_DENIED to the signed-in.
    pub fn refusal(&self) -> Error {
        match self {
            Caller::Anonymous => Error::InvalidToken(Reason::TokenMissing),
            Caller::User(_) => Error::PermissionDenied,
            Caller::Unproved(_) => Error::MfaRequired,
        }
    }
}

/// What an RPC asks of its caller before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone; a token is not even read.
    Public,
    /// Anyone; a token, when sent, must be valid (CreateUser).
    Optional,
    /// A signed-in user; the handler may narrow it to "self".
    SignedIn,
    /// A superuser.
    Superuser,
}

/// What `path` asks of its caller: its row of `table`. RPCs of this API
/// without a row are superuser-only, so a new RPC is closed until someone
/// opens it on purpose (and a unit test fails until it has its row).
pub fn access(path: &str) -> Access {
    table(path).unwrap_or(if path.starts_with("/identity.") {
        Access::Superuser
    } else {
        // Health, reflection, /pub-key and the JWKS are public.
        Access::Public
    })
}

/// The table: one explicit row for every RPC of `proto/`.
fn table(path: &str) -> Option<Access> {
    use Access::*;
    Some(match path {
        "/identity.v1.AuthService/Login"
        | "/identity.v1.AuthService/Refresh"
        | "/identity.v1.AuthService/Logout"
        | "/identity.v1.AuthService/VerifyToken"
        | "/identity.v1.AuthService/GetPublicKeys"
        | "/identity.v1.AccountService/ConfirmEmail"
        | "/identity.v1.AccountService/ResetPassword"
        // The key is in the message.
        | "/identity.v1.AuthService/ExchangeApiKey"
        // The challenge is in the message.
        | "/identity.v1.AuthService/CompleteLogin"
        // The sidecar's question carries the proxied request's credential
        // in its message, none of its own.
        | "/envoy.service.auth.v3.Authorization/Check" => Public,
        "/identity.v1.UserService/CreateUser" => Optional,
        "/identity.v1.UserService/GetUser"
        | "/identity.v1.UserService/UpdateUser"
        | "/identity.v1.AuthService/ChangePassword"
        | "/identity.v1.GroupService/GetGroup"
        | "/identity.v1.GroupService/ListGroups"
        | "/identity.v1.GroupService/ListUserGroups"
        | "/identity.v1.AuthService/ListSessions"
        | "/identity.v1.AuthService/EndSession"
        // The caller's own second factor.
        | "/identity.v1.AuthService/BeginTotpEnrollment"
        | "/identity.v1.AuthService/ConfirmTotpEnrollment"
        | "/identity.v1.AuthService/DisableTotp"
        // Self, or a superuser for anyone: narrowed by the handlers.
        | "/identity.v1.ApiKeyService/CreateApiKey"
        | "/identity.v1.ApiKeyService/ListApiKeys"
        | "/identity.v1.ApiKeyService/RevokeApiKey" => SignedIn,
        "/identity.v1.UserService/ListUsers"
        | "/identity.v1.UserService/DeleteUser"
        | "/identity.v1.UserService/SetPassword"
        | "/identity.v1.GroupService/CreateGroup"
        | "/identity.v1.GroupService/DeleteGroup"
        | "/identity.v1.GroupService/AddGroupMember"
        | "/identity.v1.GroupService/RemoveGroupMember"
        | "/identity.v1.GroupService/ListGroupMembers"
        | "/identity.v1.AccountService/IssueVerificationToken"
        | "/identity.v1.AccountService/RequestPasswordReset"
        | "/identity.v1.AccountService/ImportUsers"
        | "/identity.v1.ChangeService/WatchChanges"
        | "/identity.v1.ChangeService/ListChanges"
        | "/identity.v1.AuthService/ResetSecondFactor" => Superuser,
        _ => return None,
    })
}

/// CreateUser: anonymous callers and users only while registration is open,
/// and only with default flags; superusers always, with any flags.
pub fn create_user(
    caller: &Caller,
    registration_open: bool,
    is_superuser: bool,
    is_active: Option<bool>,
    is_verified: bool,
) -> Result<(), Error> {
    if caller.is_superuser() {
        return Ok(());
    }
    let default_flags = !is_superuser && is_active.unwrap_or(true) && !is_verified;
    if registration_open && default_flags {
        Ok(())
    } else {
        Err(caller.refusal())
    }
}

/// GetUser, ListUserGroups: a user may read itself; a superuser anyone.
pub fn read_user(
    caller: &Caller,
    is_self: impl FnOnce(&Authenticated) -> bool,
) -> Result<(), Error> {
    let v = match caller {
        Caller::User(v) | Caller::Unproved(v) => v,
        Caller::Anonymous => return Err(caller.refusal()),
    };
    if caller.is_superuser() || is_self(v) {
        Ok(())
    } else {
        Err(caller.refusal())
    }
}

/// The fields a user may change on itself.
pub const SELF_UPDATABLE: &[&str] = &["first_name", "last_name", "attributes"];

/// UpdateUser: a user may change its own names and attributes; a superuser
/// any mutable field of anyone.
pub fn update_user(caller: &Caller, target: Uuid, paths: &[String]) -> Result<(), Error> {
    match caller {
        Caller::User(v) if v.user.is_superuser => Ok(()),
        Caller::User(v) | Caller::Unproved(v)
            if v.user.id == target
                && paths.iter().all(|p| SELF_UPDATABLE.contains(&p.as_str())) =>
        {
            Ok(())
        }
        _ => Err(caller.refusal()),
    }
}

/// The bearer token of a request: `None` when there is no Authorization
/// header, `Some(Err)` when it is not a bearer token.
fn bearer(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let value = headers.get(http::header::AUTHORIZATION)?;
    let value = value.to_str().map_err(|_| ());
    Some(value.and_then(|v| {
        let (scheme, token) = v.split_once(' ').ok_or(())?;
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            Ok(token)
        } else {
            Err(())
        }
    }))
}

/// The tower layer that enforces [`access`] and finds the [`Caller`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: AuthService,
    announcer: Announcer,
    require_mfa: bool,
}

impl AuthLayer {
    /// Verifies tokens with `auth`; the calls' commits of changes are
    /// announced by `announcer`.
    pub fn new(auth: AuthService, announcer: Announcer) -> Self {
        Self {
            auth,
            announcer,
            require_mfa: false,
        }
    }

    /// `REQUIRE_MFA_FOR_SUPERUSERS`: a superuser's powers need a session
    /// that a second factor proved (API keys, a service's credential, are
    /// not sessions and keep them).
    pub fn require_mfa_for_superusers(mut self, required: bool) -> Self {
        self.require_mfa = required;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthMiddleware<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthMiddleware {
            inner,
            auth: self.auth.clone(),
            announcer: self.announcer.clone(),
            require_mfa: self.require_mfa,
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct AuthMiddleware<S> {
    inner: S,
    auth: AuthService,
    announcer: Announcer,
    require_mfa: bool,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthMiddleware<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone is ready only if polled; keep the polled one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let announcer = self.announcer.clone();
        let require_mfa = self.require_mfa;
        Box::pin(async move {
            let access = access(request.uri().path());
            let token = match access {
                Access::Public => None,
                _ => bearer(request.headers()),
            };
            let caller = match token {
                None => Caller::Anonymous,
                Some(Err(())) => return Ok(refuse(Error::InvalidToken(Reason::TokenMalformed))),
                Some(Ok(token)) => match auth.authenticate(token).await {
                    Ok(verified) => {
                        // For the access log line, whatever the call's fate.
                        if let Some(slot) =
                            request.extensions().get::<crate::telemetry::CallerSlot>()
                        {
                            slot.set(verified.user.id);
                        }
                        if require_mfa && verified.user.is_superuser && !verified.mfa_satisfied() {
                            Caller::Unproved(Arc::new(verified))
                        } else {
                            Caller::User(Arc::new(verified))
                        }
                    }
                    Err(e) => return Ok(refuse(e)),
                },
            };
            let allowed = match access {
                Access::Public | Access::Optional => true,
                Access::SignedIn => matches!(caller, Caller::User(_) | Caller::Unproved(_)),
                Access::Superuser => caller.is_superuser(),
            };
            if !allowed {
                return Ok(refuse(caller.refusal()));
            }
            // An API key limited to some methods calls only those.
            if let Caller::User(user) | Caller::Unproved(user) = &caller
                && !user.allows(request.uri().path())
            {
                return Ok(refuse(Error::PermissionDenied));
            }
            // Every change the call makes is recorded as made by the
            // caller, through this RPC, under this request id.
            let origin = crate::db::changes::Origin {
                actor_id: match &caller {
                    Caller::User(user) | Caller::Unproved(user) => Some(user.user.id),
                    Caller::Anonymous => None,
                },
                rpc: request.uri().path().to_owned(),
                request_id: request
                    .extensions()
                    .get::<crate::telemetry::RequestId>()
                    .map(|id| id.0.clone())
                    .unwrap_or_default(),
                announce: true,
            };
            request.extensions_mut().insert(caller);
            crate::service::audit::within(origin, Some(announcer), inner.call(request)).await
        })
    }
}

fn refuse<B: Default>(error: Error) -> Response<B> {
    tonic::Status::from(error).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_rpcs_of_the_api_are_closed_and_others_are_open() {
        assert_eq!(
            access("/identity.v1.UserService/SomethingNew"),
            Access::Superuser
        );
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(access("/pub-key"), Access::Public);
    }

    /// The paths of every RPC in `proto/`'s descriptor set, as the router
    /// sees them: `/identity.v1.UserService/GetUser`.
    fn rpc_paths() -> Vec<String> {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut paths = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        paths
    }

    #[test]
    fn every_rpc_of_the_descriptor_set_has_an_explicit_row() {
        let paths = rpc_paths();
        assert!(
            paths.iter().any(|p| p == "/identity.v1.AuthService/Login"),
            "the walk finds the API: {paths:?}"
        );
        let missing: Vec<&String> = paths
            .iter()
            .filter(|p| p.starts_with("/identity.v1.") && table(p).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "RPCs without a row in the authorization table (superuser-only by default): {missing:?}"
        );
    }

    #[test]
    fn only_bearer_tokens_are_read() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(Ok("abc")));
        h.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some(Ok("abc")));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(Err(())));
        h.insert("authorization", "Bearer".parse().unwrap());
        assert_eq!(bearer(&h), Some(Err(())));
    }
}
