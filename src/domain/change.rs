//! The change feed: what a change is, and the cursor that says where a
//! reader stands in it.

use uuid::Uuid;

/// What a change did; the number is `identity.v1.ChangeKind`'s, and what the
/// triggers store in `changes.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum ChangeKind {
    /// A user was created.
    UserCreated = 1,
    /// Fields of a user changed.
    UserUpdated = 2,
    /// A user was deleted.
    UserDeleted = 3,
    /// A user's password changed.
    PasswordChanged = 4,
    /// A session started.
    SessionStarted = 5,
    /// A session ended.
    SessionEnded = 6,
    /// A group was created.
    GroupCreated = 7,
    /// A group was deleted.
    GroupDeleted = 8,
    /// A user joined a group.
    MemberAdded = 9,
    /// A user left a group.
    MemberRemoved = 10,
    /// An API key was created.
    ApiKeyCreated = 11,
    /// An API key was revoked.
    ApiKeyRevoked = 12,
    /// A replica's set of signing keys changed.
    KeysChanged = 13,
    /// A user's second factor was turned on.
    MfaEnabled = 14,
    /// A user's second factor was removed.
    MfaDisabled = 15,
}

impl ChangeKind {
    /// Every kind, in number order.
    pub const ALL: [ChangeKind; 15] = [
        ChangeKind::UserCreated,
        ChangeKind::UserUpdated,
        ChangeKind::UserDeleted,
        ChangeKind::PasswordChanged,
        ChangeKind::SessionStarted,
        ChangeKind::SessionEnded,
        ChangeKind::GroupCreated,
        ChangeKind::GroupDeleted,
        ChangeKind::MemberAdded,
        ChangeKind::MemberRemoved,
        ChangeKind::ApiKeyCreated,
        ChangeKind::ApiKeyRevoked,
        ChangeKind::KeysChanged,
        ChangeKind::MfaEnabled,
        ChangeKind::MfaDisabled,
    ];

    /// The kind numbered `n`, if any.
    pub fn from_number(n: i32) -> Option<ChangeKind> {
        Self::ALL.into_iter().find(|k| *k as i32 == n)
    }

    /// The short name, as in metrics and the command line (`user_created`).
    pub const fn name(self) -> &'static str {
        match self {
            ChangeKind::UserCreated => "user_created",
            ChangeKind::UserUpdated => "user_updated",
            ChangeKind::UserDeleted => "user_deleted",
            ChangeKind::PasswordChanged => "password_changed",
            ChangeKind::SessionStarted => "session_started",
            ChangeKind::SessionEnded => "session_ended",
            ChangeKind::GroupCreated => "group_created",
            ChangeKind::GroupDeleted => "group_deleted",
            ChangeKind::MemberAdded => "member_added",
            ChangeKind::MemberRemoved => "member_removed",
            ChangeKind::ApiKeyCreated => "api_key_created",
            ChangeKind::ApiKeyRevoked => "api_key_revoked",
            ChangeKind::KeysChanged => "keys_changed",
            ChangeKind::MfaEnabled => "mfa_enabled",
            ChangeKind::MfaDisabled => "mfa_disabled",
        }
    }
}

/// Where a reader stands: after the change numbered `seq` of transaction
/// `xid` (`seq` = `i64::MAX`: after all of it, and of every transaction
/// before it). The feed is ordered by (xid, seq). Shown to clients as 32
/// hexadecimal digits, which they treat as opaque.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The transaction's id (`changes.xid`, PostgreSQL's 64-bit xid8).
    pub xid: i64,
    /// The change's number (`changes.seq`).
    pub seq: i64,
}

impl Cursor {
    /// After every change of every transaction below `horizon`, whose
    /// changes are all final.
    pub const fn before(horizon: i64) -> Cursor {
        Cursor {
            xid: horizon - 1,
            seq: i64::MAX,
        }
    }

    /// Reads a cursor given back by a client.
    pub fn parse(s: &str) -> Result<Cursor, &'static str> {
        const BAD: &str = "not a cursor from this service";
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BAD);
        }
        let xid = i64::from_str_radix(&s[..16], 16).map_err(|_| BAD)?;
        let seq = i64::from_str_radix(&s[16..], 16).map_err(|_| BAD)?;
        if xid < 0 || seq < 0 {
            return Err(BAD);
        }
        Ok(Cursor { xid, seq })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.xid, self.seq)
    }
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where a reader stands after it.
    pub cursor: Cursor,
    /// When it was recorded, in its transaction (which commits right
    /// after).
    pub commit_time: chrono::DateTime<chrono::Utc>,
    /// What it did.
    pub kind: ChangeKind,
    /// The user changed, if one was.
    pub user_id: Option<Uuid>,
    /// The session, if one changed.
    pub session_id: Option<Uuid>,
    /// The group, if one changed.
    pub group_id: Option<Uuid>,
    /// The API key, if one changed.
    pub api_key_id: Option<Uuid>,
    /// Who did it; none for anonymous callers and SQL.
    pub actor_id: Option<Uuid>,
    /// The RPC that did it; empty for SQL.
    pub rpc: String,
    /// The call's request id; empty for SQL.
    pub request_id: String,
    /// USER_UPDATED: the fields that changed.
    pub fields: Vec<String>,
    /// SESSION_ENDED: why.
    pub end_reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_order_as_the_feed() {
        let a = Cursor { xid: 41, seq: 7 };
        let b = Cursor::before(42);
        let c = Cursor { xid: 42, seq: 1 };
        assert!(a < b && b < c);
        for x in [a, b, c] {
            assert_eq!(Cursor::parse(&x.to_string()), Ok(x));
        }
        for bad in ["", "41", &"g".repeat(32), &"f".repeat(32), &"0".repeat(33)] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_number_as_the_proto() {
        for (i, k) in ChangeKind::ALL.into_iter().enumerate() {
            assert_eq!(k as i32, i as i32 + 1);
            assert_eq!(ChangeKind::from_number(k as i32), Some(k));
        }
        assert_eq!(ChangeKind::from_number(0), None);
        assert_eq!(ChangeKind::from_number(16), None);
        // The proto's enum, by the same numbers.
        use crate::proto::identity::v1::ChangeKind as Wire;
        for k in ChangeKind::ALL {
            assert!(Wire::try_from(k as i32).is_ok(), "{k:?}");
        }
        assert!(
            Wire::try_from(16).is_err(),
            "a kind the proto has and the domain lacks"
        );
    }
}
