//! Use cases. Each takes validated domain values, decides, and owns its
//! transaction; the `db` functions it calls only query.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod changes;
mod errors;
pub mod fresh;
pub mod groups;
pub mod import;
mod sessions;
pub mod throttle;
pub mod totp;
pub mod users;
pub mod verify;

/// One page of a list, and where the next starts (made by `db`'s one
/// keyset pagination).
pub use crate::db::Page;
pub use accounts::AccountService;
pub use auth::AuthService;
pub use changes::ChangeService;
pub use groups::GroupService;
pub use users::UserService;

use uuid::Uuid;

use crate::error::Error;

/// What every password change (ChangePassword, SetPassword, ResetPassword)
/// does beside writing the new hash, in the same transaction: every unspent
/// reset token of the user is spent (a link mailed earlier cannot take the
/// account back), a login lock is lifted, and every session but `keep`
/// ends with `reason`. Returns how many sessions ended.
pub(crate) async fn password_changed(
    conn: &mut diesel_async::AsyncPgConnection,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: crate::domain::EndReason,
) -> Result<usize, Error> {
    use crate::db::{accounts::Purpose, sessions, throttle};
    crate::db::accounts::spend_all(conn, user_id, Purpose::ResetPassword).await?;
    throttle::clear(conn, &self::throttle::user_key(user_id)).await?;
    Ok(sessions::end_all_of_user(conn, user_id, keep, reason).await?)
}

/// RESOURCE_EXHAUSTED until `until` (a throttling lock), with the wait
/// rounded up to whole seconds in its RetryInfo.
pub(crate) fn throttled(message: &'static str, until: chrono::DateTime<chrono::Utc>) -> Error {
    let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
    Error::Throttled {
        message,
        retry_after: std::time::Duration::from_secs(
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        ),
    }
}
