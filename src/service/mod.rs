//! Use cases. Each takes validated domain values, decides, and owns its
//! transaction; the `db` functions it calls only query.

pub mod auth;
pub mod users;

pub use auth::AuthService;
pub use users::UserService;
