//! GroupService. Not built yet: every RPC answers UNIMPLEMENTED (the
//! generated default), so clients can be generated against the whole API.

use crate::proto::identity::v1 as pb;

/// The gRPC face of groups.
#[derive(Debug, Clone, Default)]
pub struct GroupsGrpc;

impl pb::group_service_server::GroupService for GroupsGrpc {}
