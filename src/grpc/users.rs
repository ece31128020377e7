//! UserService: decodes and validates each request, calls [`UserService`].

use tonic::{Request, Response, Status};

use super::authz::{self, Caller};
use super::convert::{parse_id, parse_optional_id};
use crate::domain::{
    Attributes, BreachedList, Email, NewPassword, Pager, Password, Username,
    text::{self, fold, nfkc_trimmed, no_control},
    user::person_name,
};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::users::{Lookup, NewUser, UserFilter, UserService, UserUpdate};
use crate::service::verify::Authenticated;

/// The gRPC face of [`UserService`].
#[derive(Debug, Clone)]
pub struct UsersGrpc {
    users: UserService,
    registration_open: bool,
    breached: BreachedList,
}

impl UsersGrpc {
    /// Serves `users`; anonymous callers may register when
    /// `registration_open`; new passwords must not be in `breached`.
    pub fn new(users: UserService, registration_open: bool, breached: BreachedList) -> Self {
        Self {
            users,
            registration_open,
            breached,
        }
    }
}

/// The paths of an update mask that UpdateUser accepts.
const MUTABLE_FIELDS: &[&str] = &[
    "first_name",
    "last_name",
    "is_active",
    "is_superuser",
    "is_verified",
    "attributes",
];

fn new_user(req: pb::CreateUserRequest, breached: &BreachedList) -> Result<NewUser, Error> {
    let mut v = Violations::new();
    let username = v.check("username", Username::parse(&req.username));
    let email = v.check("email", Email::parse(&req.email));
    let forbidden: Vec<&str> = username
        .iter()
        .map(Username::canonical)
        .chain(email.iter().map(Email::canonical))
        .collect();
    let password = if req.is_service {
        if !req.password.is_empty() {
            v.add(
                "password",
                "a service account has no password: leave it empty",
            );
        }
        Some(None)
    } else {
        v.check(
            "password",
            Password::parse(&req.password, &forbidden, breached),
        )
        .map(Some)
    };
    let first_name = v.check("first_name", person_name(&req.first_name));
    let last_name = v.check("last_name", person_name(&req.last_name));
    let attributes = v.check("attributes", Attributes::parse(&req.attributes));
    v.finish()?;
    match (username, email, password, first_name, last_name, attributes) {
        (
            Some(username),
            Some(email),
            Some(password),
            Some(first_name),
            Some(last_name),
            Some(attributes),
        ) => Ok(NewUser {
            username,
            email,
            password,
            first_name,
            last_name,
            is_superuser: req.is_superuser,
            is_active: req.is_active.unwrap_or(true),
            is_verified: req.is_verified,
            attributes,
            is_service: req.is_service,
        }),
        _ => Err(Error::internal(
            "a field failed validation without a violation",
        )),
    }
}

fn lookup(req: pb::GetUserRequest) -> Result<Lookup, Error> {
    use pb::get_user_request::Lookup as L;
    match req.lookup {
        None => Err(Error::invalid("lookup", "set one of id, username or email")),
        Some(L::Id(id)) => Ok(Lookup::Id(parse_id("id", &id)?)),
        Some(L::Username(name)) => {
            no_control(&name).map_err(|e| Error::invalid("username", e))?;
            Ok(Lookup::Username(fold(&nfkc_trimmed(&name))))
        }
        Some(L::Email(email)) => {
            no_control(&email).map_err(|e| Error::invalid("email", e))?;
            Ok(Lookup::Email(fold(email.trim())))
        }
    }
}

fn update(req: pb::UpdateUserRequest) -> Result<(uuid::Uuid, UserUpdate, Vec<String>), Error> {
    let user = req
        .user
        .ok_or_else(|| Error::invalid("user", "is required"))?;
    let id = parse_id("user.id", &user.id)?;
    let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask",
            format!(
                "is required: name the fields to change ({})",
                MUTABLE_FIELDS.join(", ")
            ),
        ));
    }
    let mut v = Violations::new();
    let mut out = UserUpdate::default();
    for path in &paths {
        match path.as_str() {
            "first_name" => {
                out.first_name = v.check("user.first_name", person_name(&user.first_name))
            }
            "last_name" => out.last_name = v.check("user.last_name", person_name(&user.last_name)),
            "is_active" => out.is_active = Some(user.is_active),
            "is_superuser" => out.is_superuser = Some(user.is_superuser),
            "is_verified" => out.is_verified = Some(user.is_verified),
            "attributes" => {
                out.attributes = v.check("user.attributes", Attributes::parse(&user.attributes))
            }
            "id" | "username" | "email" | "create_time" | "update_time" => {
                v.add("update_mask", format!("{path} cannot be changed"));
            }
            other => v.add("update_mask", format!("unknown field {other:?}")),
        }
    }
    v.finish()?;
    Ok((id, out, paths))
}

fn filter(req: &pb::ListUsersRequest) -> Result<UserFilter, Error> {
    let mut v = Violations::new();
    let search = v.check("query", text::query(&req.query)).flatten();
    let group_id = match parse_optional_id("group_id", &req.group_id) {
        Ok(id) => id,
        Err(Error::InvalidArgument(mut violations)) => {
            v.add(
                "group_id",
                violations.pop().map(|f| f.description).unwrap_or_default(),
            );
            None
        }
        Err(e) => return Err(e),
    };
    v.finish()?;
    Ok(UserFilter {
        search,
        is_active: req.is_active,
        is_superuser: req.is_superuser,
        is_verified: req.is_verified,
        group_id,
    })
}

fn pager(req: &pb::ListUsersRequest) -> Pager {
    let flag = |b: Option<bool>| match b {
        None => "",
        Some(true) => "1",
        Some(false) => "0",
    };
    Pager::for_filters(&[
        "users",
        &req.query,
        flag(req.is_active),
        flag(req.is_superuser),
        flag(req.is_verified),
        &req.group_id,
    ])
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UsersGrpc {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        authz::create_user(
            &caller,
            self.registration_open,
            req.is_superuser || req.is_service,
            req.is_active,
            req.is_verified,
        )?;
        let new = new_user(req, &self.breached)?;
        let user = self.users.create(new).await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = Caller::of(&request);
        let lookup = lookup(request.into_inner())?;
        let is_self = |me: &Authenticated| match &lookup {
            Lookup::Id(id) => me.user.id == *id,
            Lookup::Username(canonical) => fold(&me.user.username) == *canonical,
            Lookup::Email(canonical) => fold(&me.user.email) == *canonical,
        };
        authz::read_user(&caller, is_self)?;
        // The caller asking for itself: the bearer check has just read it,
        // as fresh as any read (from the database, or the verification
        // cache within its guarantees).
        if let Caller::User(me) | Caller::Unproved(me) = &caller
            && is_self(me)
        {
            return Ok(Response::new(pb::GetUserResponse {
                user: Some(me.user.clone().into()),
            }));
        }
        let user = self.users.get(&lookup).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let req = request.into_inner();
        let pager = pager(&req);
        let page = pager
            .parse(req.page_size, &req.page_token)
            .map_err(|(field, e)| Error::invalid(field, e))?;
        let filter = filter(&req)?;
        let page = self.users.list(&filter, page).await?;
        Ok(Response::new(pb::ListUsersResponse {
            next_page_token: page.last.map(|id| pager.next(id)).unwrap_or_default(),
            total_size: page.total,
            users: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let caller = Caller::of(&request);
        let (id, changes, paths) = update(request.into_inner())?;
        authz::update_user(&caller, id, &paths)?;
        let user = self.users.update(id, changes).await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user.into()),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let id = parse_id("id", &request.into_inner().id)?;
        self.users.delete(id).await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let req = request.into_inner();
        let id = parse_id("id", &req.id)?;
        // The rules that need no user here; the service adds "not the
        // username or email" once it has read the user.
        let password = NewPassword::parse(&req.new_password, &self.breached)
            .map_err(|e| Error::invalid("new_password", e))?;
        self.users.set_password(id, password).await?;
        Ok(Response::new(pb::SetPasswordResponse {}))
    }
}
