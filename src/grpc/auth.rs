//! AuthService. Not built yet: every RPC answers UNIMPLEMENTED (the
//! generated default), so clients can be generated against the whole API.

use crate::proto::identity::v1 as pb;

/// The gRPC face of logins and tokens.
#[derive(Debug, Clone, Default)]
pub struct AuthGrpc;

impl pb::auth_service_server::AuthService for AuthGrpc {}
