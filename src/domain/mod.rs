//! Validated types and the input rules of the contract. No tonic, no diesel:
//! a value of a type here has passed its rules, so later layers need not
//! check again.

pub mod api_key;
pub mod breached;
pub mod change;
pub mod group;
pub mod page;
pub mod recovery;
pub mod session;
pub mod text;
pub mod totp;
pub mod user;
pub mod violation;
pub mod weak;

pub use api_key::ApiKey;
pub use breached::BreachedList;
pub use change::{Change, ChangeKind, Cursor};
pub use group::{Group, Groupname, Slug};
pub use page::{PageRequest, Pager};
pub use recovery::{RecoveryCodes, recovery_hash};
pub use session::{EndReason, Session};
pub use totp::{CodeError, TotpError, TotpSecret, check_code, code_at};
pub use user::{Attributes, Email, Login, NewPassword, OpaqueToken, Password, User, Username};
pub use violation::Violation;
