//! Who is acting: the origin (actor, RPC, request id) of the call being
//! served, kept for the length of the call in a task-local, and the
//! transaction every service runs its writes in, which hands that origin
//! to the change feed's triggers (`db::changes::transaction`) and, once it
//! has committed, announces the commit to every replica's watchers.

use diesel_async::AsyncPgConnection;
use uuid::Uuid;

use super::changes::Announcer;
use crate::db::changes::{self, Origin};

/// The call being served: its origin, and who announces its commits.
#[derive(Debug, Clone)]
struct Call {
    origin: Origin,
    announcer: Option<Announcer>,
}

tokio::task_local! {
    static CALL: Call;
}

/// Runs `call` with `origin` as the origin of every change it makes;
/// `announcer` (the replica's) announces each commit to the watchers, else
/// the triggers notify them.
pub async fn within<F: Future>(origin: Origin, announcer: Option<Announcer>, call: F) -> F::Output {
    let origin = Origin {
        announce: announcer.is_some(),
        ..origin
    };
    CALL.scope(Call { origin, announcer }, call).await
}

/// The origin of the call being served; empty outside a call.
pub fn current() -> Origin {
    CALL.try_with(|c| c.origin.clone()).unwrap_or_default()
}

/// The origin of the call being served, acting as `actor`: for calls that
/// prove who the caller is by other means than a bearer token (Login by
/// password, Logout by refresh token, ResetPassword and ConfirmEmail by
/// account token).
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
    transaction_as(conn, &current(), f).await
}

/// As [`transaction`], for a transaction that records no change (the
/// rotation of a refresh token): no announcement after it. Should it record
/// one all the same, its triggers notify the watchers.
pub async fn transaction_without_changes<T, E, F>(
    conn: &mut AsyncPgConnection,
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    let origin = Origin {
        announce: false,
        ..current()
    };
    changes::transaction(conn, &origin, f).await
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
    run(conn, origin, None, f).await
}

/// As [`transaction`], for a transaction whose changes are all about
/// `users` (an UpdateUser, a membership of one user): they are evicted from
/// the verification cache after the commit without asking the transaction
/// which users it touched (a statement less on the write path).
pub async fn transaction_touching<T, E, F>(
    conn: &mut AsyncPgConnection,
    users: &[Uuid],
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    run(conn, &current(), Some(users), f).await
}

/// As [`transaction_touching`], with `origin` instead of the current
/// call's.
pub async fn transaction_as_touching<T, E, F>(
    conn: &mut AsyncPgConnection,
    origin: &Origin,
    users: &[Uuid],
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    run(conn, origin, Some(users), f).await
}

/// The transaction, then the evictions (of `users` if given, else of the
/// users its changes name, asked before it commits) and the announcement:
/// the call's answer follows both evictions.
async fn run<T, E, F>(
    conn: &mut AsyncPgConnection,
    origin: &Origin,
    users: Option<&[Uuid]>,
    f: F,
) -> Result<T, E>
where
    F: AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    E: From<diesel::result::Error>,
{
    let announcer = CALL
        .try_with(|c| c.announcer.clone())
        .ok()
        .flatten()
        .filter(|_| origin.announce);
    let cache = announcer.as_ref().and_then(|a| a.cache().cloned());
    let value = match (&cache, users) {
        (Some(cache), None) => {
            let (value, touched) = changes::transaction(conn, origin, async |conn| {
                let value = f(conn).await?;
                let touched = changes::touched(conn).await?;
                Ok::<_, E>((value, touched))
            })
            .await?;
            cache.evict(touched);
            value
        }
        (Some(cache), Some(users)) => {
            let value = changes::transaction(conn, origin, f).await?;
            cache.evict(users.iter().copied());
            value
        }
        (None, _) => changes::transaction(conn, origin, f).await?,
    };
    if let Some(announcer) = &announcer {
        announcer.announce();
    }
    Ok(value)
}
