//! ChangeService: decodes each request, calls [`ChangeService`], renders
//! changes. Who may call (superusers) is `authz.rs`'s table.

use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::convert::{describe, parse_optional_id, timestamp};
use crate::db::changes::Filter;
use crate::domain::{Change, Cursor, EndReason};
use crate::error::Violations;
use crate::proto::identity::v1 as pb;
use crate::service::changes::{self, Batch, ChangeService, DEFAULT_PAGE, MAX_PAGE};

/// The gRPC face of [`ChangeService`].
#[derive(Debug, Clone)]
pub struct ChangesGrpc {
    changes: ChangeService,
}

impl ChangesGrpc {
    /// Serves `changes`.
    pub fn new(changes: ChangeService) -> Self {
        Self { changes }
    }
}

fn id(id: Option<uuid::Uuid>) -> String {
    id.map(|u| u.to_string()).unwrap_or_default()
}

impl From<Change> for pb::Change {
    fn from(c: Change) -> Self {
        pb::Change {
            cursor: c.cursor.to_string(),
            commit_time: Some(timestamp(c.commit_time)),
            kind: c.kind as i32,
            user_id: id(c.user_id),
            session_id: id(c.session_id),
            group_id: id(c.group_id),
            api_key_id: id(c.api_key_id),
            actor_id: id(c.actor_id),
            rpc: c.rpc,
            fields: c.fields,
            request_id: c.request_id,
            end_reason: if c.end_reason.is_empty() {
                String::new()
            } else {
                EndReason::wire_name(&c.end_reason)
            },
        }
    }
}

fn cursor(v: &mut Violations, value: &str) -> Option<Cursor> {
    if value.is_empty() {
        return None;
    }
    v.check("after_cursor", Cursor::parse(value))
}

#[tonic::async_trait]
impl pb::change_service_server::ChangeService for ChangesGrpc {
    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::WatchChangesResponse>>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let after = cursor(&mut v, &req.after_cursor);
        let kinds = v.check("kinds", changes::kinds(&req.kinds));
        v.finish()?;
        let stream = self
            .changes
            .watch(after, kinds.unwrap_or_default())
            .await?
            .map(|item| {
                item.map(|Batch { changes, cursor }| pb::WatchChangesResponse {
                    changes: changes.into_iter().map(Into::into).collect(),
                    cursor: cursor.to_string(),
                })
                .map_err(Status::from)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_changes(
        &self,
        request: Request<pb::ListChangesRequest>,
    ) -> Result<Response<pb::ListChangesResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let after = cursor(&mut v, &req.after_cursor);
        let kinds = v.check("kinds", changes::kinds(&req.kinds));
        if req.page_size < 0 {
            v.add("page_size", "must not be negative");
        }
        let user_id = v
            .check(
                "user_id",
                parse_optional_id("user_id", &req.user_id).map_err(describe),
            )
            .flatten();
        let actor_id = v
            .check(
                "actor_id",
                parse_optional_id("actor_id", &req.actor_id).map_err(describe),
            )
            .flatten();
        v.finish()?;
        let page_size = match i64::from(req.page_size) {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = Filter {
            kinds: kinds.unwrap_or_default(),
            user_id,
            actor_id,
        };
        let Batch { changes, cursor } = self.changes.list(after, &filter, page_size).await?;
        Ok(Response::new(pb::ListChangesResponse {
            changes: changes.into_iter().map(Into::into).collect(),
            cursor: cursor.to_string(),
        }))
    }
}
