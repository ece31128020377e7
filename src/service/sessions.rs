//! Sessions an administrator (or their own user) can see and end:
//! ListSessions and EndSession, in AuthService.

use uuid::Uuid;

use super::{AuthService, Page, audit, verify::Authenticated};
use crate::db::{self, sessions};
use crate::domain::{EndReason, PageRequest, Session};
use crate::error::{Error, Resource};

impl AuthService {
    /// One page of `user_id`'s sessions: live ones, or all that are kept.
    /// NOT_FOUND when there is no such user. Who may ask is the caller's
    /// business (`grpc::authz`): the user or a superuser.
    pub async fn list_sessions(
        &self,
        user_id: Uuid,
        include_ended: bool,
        page: PageRequest,
    ) -> Result<Page<Session>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        if db::users::by_id(&mut conn, user_id).await?.is_none() {
            return Err(Error::NotFound(Resource::User));
        }
        Ok(sessions::list(&mut conn, user_id, include_ended, page).await?)
    }

    /// Ends session `id`: as LOGOUT when it is the caller's own, as
    /// ENDED_BY_ADMIN when a superuser ends another user's. Ending an ended
    /// session is OK and changes nothing; an unknown one is NOT_FOUND;
    /// another user's, for a caller who is not a superuser,
    /// PERMISSION_DENIED. Access tokens of the session are refused from
    /// then on, everywhere (every check reads the session).
    #[tracing::instrument(skip(self, caller), fields(caller = %caller.user.id))]
    pub async fn end_session(&self, caller: &Authenticated, id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        let session = sessions::by_id(&mut conn, id)
            .await?
            .ok_or(Error::NotFound(Resource::Session))?;
        let own = session.user_id == caller.user.id;
        if !own && !caller.user.is_superuser {
            return Err(Error::PermissionDenied);
        }
        let reason = if own {
            EndReason::Logout
        } else {
            EndReason::EndedByAdmin
        };
        let ended = audit::transaction_touching(&mut conn, &[session.user_id], async |conn| {
            sessions::end(conn, id, reason).await
        })
        .await?;
        if ended {
            tracing::info!(session_id = %id, user_id = %session.user_id, reason = reason.as_str(), "session ended");
        }
        Ok(())
    }
}
