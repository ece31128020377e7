//! Sessions: why one ended.

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
        }
    }
}
