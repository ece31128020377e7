//! The janitor: the hourly purge of rows that no check needs any more. A
//! task of its own, started by [`super::Application::run_until_stopped`]
//! and ended with it.

use std::time::Duration;

use crate::db::{self, Pool};
use crate::error::Error;

/// Deletes, every hour, what no check needs any more: sessions ended or
/// expired a week ago (with their retired refresh tokens) and throttling
/// rows idle for a day, and changes older than `CHANGES_RETENTION`. Every replica may run it; the deletes are idempotent.
pub(super) async fn purge_old_rows(
    pool: Pool,
    refresh_ttl: Duration,
    changes_retention: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    const EVERY: Duration = Duration::from_secs(3600);
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let result = async {
            let mut conn = db::conn(&pool).await?;
            let sessions =
                db::sessions::purge_sessions(&mut conn, chrono::Duration::days(7)).await?;
            let failures = db::throttle::purge(&mut conn).await?;
            let ttl = chrono::Duration::from_std(refresh_ttl).unwrap_or(chrono::Duration::days(30));
            let retired = db::sessions::purge_retired(&mut conn, ttl).await?;
            let tokens = db::accounts::purge(&mut conn).await?;
            let mfa = db::totp::delete_expired(&mut conn).await?;
            drop(conn);
            let changes = crate::service::changes::purge(&pool, changes_retention).await?;
            Ok::<_, Error>((sessions + retired + tokens + mfa + changes, failures))
        }
        .await;
        match result {
            Ok((0, 0)) => {}
            Ok((sessions, failures)) => tracing::info!(sessions, failures, "purged old rows"),
            Err(e) => tracing::warn!(error = %e, "purge failed; next try in an hour"),
        }
    }
}
