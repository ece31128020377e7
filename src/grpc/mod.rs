//! Transport: decodes requests into domain values, calls a service, encodes
//! the answer. No SQL and no rules beyond the shape of the messages.

pub mod accounts;
pub mod api_keys;
pub mod auth;
pub mod authz;
pub mod changes;
pub mod convert;
pub mod envoy;
pub mod groups;
pub mod users;

pub use accounts::AccountsGrpc;
pub use api_keys::ApiKeysGrpc;
pub use auth::AuthGrpc;
pub use changes::ChangesGrpc;
pub use envoy::EnvoyGrpc;
pub use groups::GroupsGrpc;
pub use users::UsersGrpc;
