//! API keys: credentials of service accounts (and people) that work where
//! an access token does. The secret is never kept (`token::apikey`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// A UUIDv7.
    pub id: Uuid,
    /// The user the key acts as.
    pub user_id: Uuid,
    /// A name for people.
    pub display_name: String,
    /// The first characters of the secret, for people.
    pub prefix: String,
    /// Full method names the key may call; empty: all its user may.
    pub allowed_methods: Vec<String>,
    /// When it was made.
    pub create_time: DateTime<Utc>,
    /// When it stops working; never if none.
    pub expire_time: Option<DateTime<Utc>>,
    /// When it was last used, to the minute.
    pub last_use_time: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoke_time: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether the key lets its holder call `method` (`/package.Service/Method`).
    pub fn allows(&self, method: &str) -> bool {
        allows(&self.allowed_methods, method)
    }
}

/// Whether a key limited to `allowed` (empty: not limited) may call `method`.
pub fn allows(allowed: &[String], method: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|m| m == method)
}
