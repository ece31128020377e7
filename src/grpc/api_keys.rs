//! ApiKeyService: requests checked and turned into the service's terms.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::authz::Caller;
use super::convert::{parse_id, parse_optional_id, timestamp};
use crate::domain::{ApiKey, Pager, text::no_control};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::{AuthService, api_keys::NewApiKey};

/// The most methods one key may be limited to.
const MAX_METHODS: usize = 64;
/// The longest display name.
const MAX_NAME: usize = 150;

/// Serves [`pb::api_key_service_server::ApiKeyService`].
#[derive(Debug, Clone)]
pub struct ApiKeysGrpc {
    auth: AuthService,
}

impl ApiKeysGrpc {
    /// Serves keys through `auth`.
    pub fn new(auth: AuthService) -> Self {
        Self { auth }
    }
}

impl From<ApiKey> for pb::ApiKey {
    fn from(k: ApiKey) -> Self {
        pb::ApiKey {
            id: k.id.to_string(),
            user_id: k.user_id.to_string(),
            display_name: k.display_name,
            prefix: k.prefix,
            create_time: Some(timestamp(k.create_time)),
            expire_time: k.expire_time.map(timestamp),
            last_use_time: k.last_use_time.map(timestamp),
            revoke_time: k.revoke_time.map(timestamp),
            allowed_methods: k.allowed_methods,
        }
    }
}

/// Whether `method` is a full gRPC method name: `/package.Service/Method`.
fn method_shaped(method: &str) -> bool {
    let Some((service, name)) = method.strip_prefix('/').and_then(|m| m.split_once('/')) else {
        return false;
    };
    let ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    !service.is_empty() && service.split('.').all(ident) && ident(name)
}

/// The checked fields of a CreateApiKey request, every mistake at once.
pub(crate) fn new_key(
    req: pb::CreateApiKeyRequest,
    user_id: uuid::Uuid,
    now: DateTime<Utc>,
) -> Result<NewApiKey, Error> {
    let mut v = Violations::new();
    let display_name = req.display_name.trim().to_owned();
    if display_name.chars().count() > MAX_NAME {
        v.add("display_name", format!("at most {MAX_NAME} characters"));
    } else if let Err(e) = no_control(&display_name) {
        v.add("display_name", e);
    }
    let expire_time = match req.expire_time {
        None => None,
        Some(t) => match DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)) {
            Some(t) if t > now => Some(t),
            Some(_) => {
                v.add("expire_time", "must be in the future");
                None
            }
            None => {
                v.add("expire_time", "not a valid time");
                None
            }
        },
    };
    let known: Vec<String> = crate::limits::rpc_methods()
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    if req.allowed_methods.len() > MAX_METHODS {
        v.add("allowed_methods", format!("at most {MAX_METHODS} methods"));
    }
    for method in &req.allowed_methods {
        if !method_shaped(method) {
            v.add(
                "allowed_methods",
                format!(
                    "{method:?} is not a full method name such as /identity.v1.UserService/GetUser"
                ),
            );
        } else if method.starts_with("/identity.") && !known.contains(method) {
            v.add("allowed_methods", format!("{method} is no RPC of identity"));
        }
    }
    v.finish()?;
    let mut allowed_methods = req.allowed_methods;
    allowed_methods.sort();
    allowed_methods.dedup();
    Ok(NewApiKey {
        user_id,
        display_name,
        expire_time,
        allowed_methods,
    })
}

#[tonic::async_trait]
impl pb::api_key_service_server::ApiKeyService for ApiKeysGrpc {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        let req = request.into_inner();
        let user_id = parse_optional_id("user_id", &req.user_id)?.unwrap_or(caller.user.id);
        let new = new_key(req, user_id, Utc::now())?;
        let created = self.auth.create_api_key(caller, new).await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(created.key.into()),
            secret: created.secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = Caller::of(&request);
        let signed_in = caller.signed_in()?;
        let req = request.into_inner();
        let user_id = parse_optional_id("user_id", &req.user_id)?.unwrap_or(signed_in.user.id);
        if user_id != signed_in.user.id && !caller.is_superuser() {
            return Err(caller.refusal().into());
        }
        let pager = Pager::for_filters(&["api_keys", &user_id.to_string()]);
        let page = pager
            .parse(req.page_size, &req.page_token)
            .map_err(|(field, e)| Error::invalid(field, e))?;
        let page = self.auth.list_api_keys(user_id, page).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            next_page_token: page.last.map(|id| pager.next(id)).unwrap_or_default(),
            api_keys: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = Caller::of(&request);
        let caller = caller.signed_in()?;
        let id = parse_id("id", &request.get_ref().id)?;
        let key = self.auth.revoke_api_key(caller, id).await?;
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(key.into()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::method_shaped;

    #[test]
    fn method_names_have_their_shape() {
        assert!(method_shaped("/identity.v1.UserService/GetUser"));
        assert!(method_shaped("/orders.v1.Orders/Get_2"));
        for bad in [
            "",
            "/",
            "identity.v1.X/Y",
            "/identity.v1.X/",
            "/a b/C",
            "/x/y/z",
            "//Y",
        ] {
            assert!(!method_shaped(bad), "{bad:?}");
        }
    }
}
