//! The janitor: the purge of rows that no check needs any more, at start
//! and then hourly. A task of its own, started by
//! [`super::Application::run_until_stopped`] and ended with it.

use std::time::Duration;

use crate::db::{self, Pool};
use crate::error::Error;

/// Deletes, at start and then every hour, what no check needs any more:
/// sessions ended or expired a week ago (with their retired refresh
/// tokens), retired refresh tokens older than `REFRESH_TOKEN_TTL`, account
/// tokens expired a day ago, second-factor challenges and enrolments past
/// their expiry, throttling rows idle for a day, and changes older than
/// `CHANGES_RETENTION`. Every replica runs it; the deletes are idempotent.
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
            Ok::<_, Error>([sessions, retired, tokens, mfa, failures, changes])
        }
        .await;
        match result {
            Ok(counts) if counts.iter().all(|&n| n == 0) => {}
            Ok([sessions, retired, tokens, mfa, failures, changes]) => tracing::info!(
                sessions,
                retired_refresh_tokens = retired,
                account_tokens = tokens,
                second_factor = mfa,
                failures,
                changes,
                "purged old rows"
            ),
            Err(e) => tracing::warn!(error = %e, "purge failed; next try in an hour"),
        }
    }
}
