//! Who is acting: the origin (actor, RPC, request id) of the call being
//! served, kept for the length of the call in a task-local, and the
//! transaction every service runs its writes in, which hands that origin
//! to the change feed's triggers (`db::changes::transaction`).

use diesel_async::AsyncPgConnection;
use uuid::Uuid;

use crate::db::changes::{self, Origin};

tokio::task_local! {
    static ORIGIN: Origin;
}

/// Runs `call` with `origin` as the origin of every change it makes.
pub async fn within<F: Future>(origin: Origin, call: F) -> F::Output {
    ORIGIN.scope(origin, call).await
}

/// The origin of the call being served; empty outside a call.
pub fn current() -> Origin {
    ORIGIN.try_with(Clone::clone).unwrap_or_default()
}

/// The origin of the call being served, acting as `actor`: for calls that
/// prove who the caller is by other means than a bearer token (Login by
/// password, Logout and Refresh by refresh token, ResetPassword and
/// ConfirmEmail by account token).
pub fn as_user(actor: Uuid) -> Origin {
    Origin {
        actor_id: Some(actor),
        ..current()
    }
}

/// Runs `f` in a transaction whose changes are recorded as the current
/// call's.
pub async fn transaction<T, E, F>(conn: &mut AsyncPgConnection, f: F) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    changes::transaction(conn, &current(), f).await
}

/// As [`transaction`], with `origin` instead of the current call's.
pub async fn transaction_as<T, E, F>(
    conn: &mut AsyncPgConnection,
    origin: &Origin,
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    changes::transaction(conn, origin, f).await
}
