//! Use cases. Each takes validated domain values, decides, and owns its
//! transaction; the `db` functions it calls only query.

pub mod auth;
pub mod groups;
pub mod users;

pub use auth::AuthService;
pub use groups::GroupService;
pub use users::UserService;
