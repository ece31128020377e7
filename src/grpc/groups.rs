//! GroupService: decodes and validates each request, calls [`GroupService`].

use tonic::{Request, Response, Status};

use super::authz::{self, Caller};
use super::convert::{describe, parse_id};
use crate::domain::{
    Groupname, Pager, Slug,
    text::{self, fold, nfkc_trimmed, no_control},
};
use crate::error::{Error, Violations};
use crate::proto::identity::v1 as pb;
use crate::service::groups::{GroupLookup, GroupService};

/// The gRPC face of [`GroupService`].
#[derive(Debug, Clone)]
pub struct GroupsGrpc {
    groups: GroupService,
}

impl GroupsGrpc {
    /// Serves `groups`.
    pub fn new(groups: GroupService) -> Self {
        Self { groups }
    }
}

fn lookup(req: pb::GetGroupRequest) -> Result<GroupLookup, Error> {
    use pb::get_group_request::Lookup as L;
    match req.lookup {
        None => Err(Error::invalid("lookup", "set one of id, groupname or slug")),
        Some(L::Id(id)) => Ok(GroupLookup::Id(parse_id("id", &id)?)),
        Some(L::Groupname(name)) => {
            no_control(&name).map_err(|e| Error::invalid("groupname", e))?;
            Ok(GroupLookup::Groupname(fold(&nfkc_trimmed(&name))))
        }
        Some(L::Slug(slug)) => {
            no_control(&slug).map_err(|e| Error::invalid("slug", e))?;
            Ok(GroupLookup::Slug(slug))
        }
    }
}

fn parse_ids(group_id: &str, user_id: &str) -> Result<(uuid::Uuid, uuid::Uuid), Error> {
    let mut v = Violations::new();
    let group = v.check("group_id", parse_id("group_id", group_id).map_err(describe));
    let user = v.check("user_id", parse_id("user_id", user_id).map_err(describe));
    v.finish()?;
    group
        .zip(user)
        .ok_or_else(|| Error::internal("ids failed without a violation"))
}

#[tonic::async_trait]
impl pb::group_service_server::GroupService for GroupsGrpc {
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let groupname = v.check("groupname", Groupname::parse(&req.groupname));
        let slug = if req.slug.is_empty() {
            None
        } else {
            v.check("slug", Slug::parse(&req.slug))
        };
        v.finish()?;
        let groupname =
            groupname.ok_or_else(|| Error::internal("groupname without a violation"))?;
        let group = self.groups.create(groupname, slug).await?;
        Ok(Response::new(pb::CreateGroupResponse {
            group: Some(group.into()),
        }))
    }

    async fn get_group(
        &self,
        request: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        let lookup = lookup(request.into_inner())?;
        let group = self.groups.get(&lookup).await?;
        Ok(Response::new(pb::GetGroupResponse {
            group: Some(group.into()),
        }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let req = request.into_inner();
        let pager = Pager::for_filters(&["groups", &req.query]);
        let page = pager
            .parse(req.page_size, &req.page_token)
            .map_err(|(field, e)| Error::invalid(field, e))?;
        let search = text::query(&req.query).map_err(|e| Error::invalid("query", e))?;
        let page = self.groups.list(search.as_deref(), page).await?;
        Ok(Response::new(pb::ListGroupsResponse {
            next_page_token: page.last.map(|id| pager.next(id)).unwrap_or_default(),
            total_size: page.total,
            groups: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let id = parse_id("id", &request.into_inner().id)?;
        self.groups.delete(id).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn add_group_member(
        &self,
        request: Request<pb::AddGroupMemberRequest>,
    ) -> Result<Response<pb::AddGroupMemberResponse>, Status> {
        let req = request.into_inner();
        let (group, user) = parse_ids(&req.group_id, &req.user_id)?;
        self.groups.add_member(group, user).await?;
        Ok(Response::new(pb::AddGroupMemberResponse {}))
    }

    async fn remove_group_member(
        &self,
        request: Request<pb::RemoveGroupMemberRequest>,
    ) -> Result<Response<pb::RemoveGroupMemberResponse>, Status> {
        let req = request.into_inner();
        let (group, user) = parse_ids(&req.group_id, &req.user_id)?;
        self.groups.remove_member(group, user).await?;
        Ok(Response::new(pb::RemoveGroupMemberResponse {}))
    }

    async fn list_group_members(
        &self,
        request: Request<pb::ListGroupMembersRequest>,
    ) -> Result<Response<pb::ListGroupMembersResponse>, Status> {
        let req = request.into_inner();
        let group = parse_id("group_id", &req.group_id)?;
        let pager = Pager::for_filters(&["members", &req.group_id.to_ascii_lowercase()]);
        let page = pager
            .parse(req.page_size, &req.page_token)
            .map_err(|(field, e)| Error::invalid(field, e))?;
        let page = self.groups.members(group, page).await?;
        Ok(Response::new(pb::ListGroupMembersResponse {
            next_page_token: page.last.map(|id| pager.next(id)).unwrap_or_default(),
            total_size: page.total,
            users: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn list_user_groups(
        &self,
        request: Request<pb::ListUserGroupsRequest>,
    ) -> Result<Response<pb::ListUserGroupsResponse>, Status> {
        let caller = Caller::of(&request);
        let user = parse_id("user_id", &request.into_inner().user_id)?;
        authz::read_user(&caller, |me| me.user.id == user)?;
        let groups = self.groups.of_user(user).await?;
        Ok(Response::new(pb::ListUserGroupsResponse {
            groups: groups.into_iter().map(Into::into).collect(),
        }))
    }
}
