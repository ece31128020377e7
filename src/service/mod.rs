//! Use cases. Each takes validated domain values, decides, and owns its
//! transaction; the `db` functions it calls only query.

pub mod accounts;
pub mod auth;
pub mod groups;
pub mod users;

pub use accounts::AccountService;
pub use auth::AuthService;
pub use groups::GroupService;
pub use users::UserService;

use uuid::Uuid;

/// One page of a list, and where the next starts.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The last item of a full page, from which the next page starts.
    pub last: Option<Uuid>,
    pub total: i64,
}

impl<T> Page<T> {
    /// A page; `more` when items follow it.
    pub fn new(items: Vec<T>, total: i64, more: bool, id: impl Fn(&T) -> Uuid) -> Self {
        let last = if more { items.last().map(id) } else { None };
        Self { items, last, total }
    }
}
