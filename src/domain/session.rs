//! Sessions: what one is, and why one ended.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A login session, as ListSessions shows it (never its refresh token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The session id (the `sid` claim).
    pub id: Uuid,
    /// Whose it is.
    pub user_id: Uuid,
    /// When it started.
    pub create_time: DateTime<Utc>,
    /// When it was last refreshed (its start, if never).
    pub refresh_time: DateTime<Utc>,
    /// When its current refresh token expires.
    pub refresh_expire_time: DateTime<Utc>,
    /// When it ended, if it did.
    pub end_time: Option<DateTime<Utc>>,
    /// Why it ended, as stored ([`EndReason::as_str`]).
    pub end_reason: Option<String>,
    /// The API key it was made from (ExchangeApiKey), if any.
    pub api_key_id: Option<Uuid>,
}

/// Why a session ended, as stored (`sessions.end_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Logout.
    Logout,
    /// ChangePassword ended the caller's other sessions.
    PasswordChanged,
    /// SetPassword by a superuser.
    PasswordSet,
    /// ResetPassword with a reset token.
    PasswordReset,
    /// A retired refresh token was presented again.
    RefreshReused,
    /// EndSession by a superuser (its own user ending it is a Logout).
    EndedByAdmin,
    /// The API key an ExchangeApiKey session came from was revoked.
    ApiKeyRevoked,
    /// `identity after-restore` (or `identity restore`): a session brought
    /// back by a restore might have ended since the backup.
    Restored,
    /// The housekeeping found it past its refresh token's expiry, never
    /// ended, and ended it (at that expiry) before deleting it.
    Expired,
}

impl EndReason {
    /// The stored value.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndReason::Logout => "logout",
            EndReason::PasswordChanged => "password_changed",
            EndReason::PasswordSet => "password_set",
            EndReason::PasswordReset => "password_reset",
            EndReason::RefreshReused => "refresh_token_reused",
            EndReason::EndedByAdmin => "ended_by_admin",
            EndReason::ApiKeyRevoked => "api_key_revoked",
            EndReason::Restored => "restored",
            EndReason::Expired => "expired",
        }
    }

    /// The name clients see (`Session.end_reason`, `Change.end_reason`) for
    /// a stored reason: LOGOUT, PASSWORD_CHANGED, PASSWORD_SET,
    /// PASSWORD_RESET, REUSE_DETECTED, ENDED_BY_ADMIN, API_KEY_REVOKED,
    /// RESTORED, EXPIRED, USER_DELETED (a live
    /// session deleted with its user), or the stored text in capitals (a
    /// reason written by hand in SQL).
    pub fn wire_name(stored: &str) -> String {
        match stored {
            "refresh_token_reused" => "REUSE_DETECTED".to_owned(),
            other => other.to_ascii_uppercase(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EndReason;

    #[test]
    fn reasons_have_their_wire_names() {
        assert_eq!(EndReason::wire_name(EndReason::Logout.as_str()), "LOGOUT");
        assert_eq!(
            EndReason::wire_name(EndReason::RefreshReused.as_str()),
            "REUSE_DETECTED"
        );
        assert_eq!(
            EndReason::wire_name(EndReason::EndedByAdmin.as_str()),
            "ENDED_BY_ADMIN"
        );
        assert_eq!(EndReason::wire_name("user_deleted"), "USER_DELETED");
        assert_eq!(
            EndReason::wire_name(EndReason::Restored.as_str()),
            "RESTORED"
        );
    }
}
