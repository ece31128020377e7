//! Keyset pagination, written once for every list: a page of a table's
//! filtered rows in key order, how many rows match in all, and whether more
//! follow, read from one snapshot. [`Page`] is what the service hands out.

use diesel::dsl::{self, CountStar};
use diesel::expression::Expression;
use diesel::prelude::*;
use diesel::query_dsl::methods::{FilterDsl, LimitDsl, OrderDsl, SelectDsl};
use diesel::sql_types;
use diesel_async::methods::LoadQuery;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use crate::domain::PageRequest;

/// One page of a list, and where the next starts.
#[derive(Debug)]
pub struct Page<T> {
    /// The page's items, in key order (ascending id).
    pub items: Vec<T>,
    /// The last item of a full page, from which the next page starts.
    pub last: Option<Uuid>,
    /// How many rows match the filters, across all pages.
    pub total: i64,
}

impl<T> Page<T> {
    /// A page; `more` when items follow it.
    pub fn new(items: Vec<T>, total: i64, more: bool, id: impl Fn(&T) -> Uuid) -> Self {
        let last = if more { items.last().map(id) } else { None };
        Self { items, last, total }
    }
}

/// One page of the rows of `filtered()` (a table's boxed query with the
/// list's filters, built twice: once for the page, once for the count),
/// ordered by the key column `key`, read through `select` as `R` and handed
/// out as `T` (whose key `key_of` reads).
///
/// The page and the count are read in one read-only repeatable-read
/// transaction, so the total agrees with the page. One row more than asked
/// is read: a full last page then has no next token.
//
// Not an `async fn`: its future's `Send` would then be proved at each
// caller, where rustc fails on the transaction's higher-ranked closure
// ("implementation of `Send` is not general enough"); `+ Send` here proves
// it once, from the bounds.
#[allow(clippy::manual_async_fn)]
pub(super) fn keyset<Q, K, S, R, T>(
    conn: &mut AsyncPgConnection,
    page: PageRequest,
    key: K,
    select: S,
    filtered: impl Fn() -> Q + Send + Sync,
    key_of: impl Fn(&T) -> Uuid + Send,
) -> impl Future<Output = Result<Page<T>, Error>> + Send
where
    K: Expression<SqlType = sql_types::Uuid> + Copy + Send + Sync,
    S: Expression + Send,
    Q: FilterDsl<dsl::Gt<K, Uuid>, Output = Q>
        + OrderDsl<K, Output = Q>
        + LimitDsl<Output = Q>
        + SelectDsl<S>
        + SelectDsl<CountStar>
        + Send,
    dsl::Select<Q, S>: LoadQuery<'static, AsyncPgConnection, R> + 'static,
    dsl::Select<Q, CountStar>: LoadQuery<'static, AsyncPgConnection, i64> + 'static,
    R: Into<T> + Send,
    T: Send,
{
    async move {
        conn.build_transaction()
            .read_only()
            .repeatable_read()
            .run(async |conn| {
                let mut query = filtered();
                if let Some(after) = page.after {
                    query = query.filter(key.gt(after));
                }
                let mut rows: Vec<R> = query
                    .order(key)
                    .limit(page.size + 1)
                    .select(select)
                    .load(conn)
                    .await?;
                let more = rows.len() as i64 > page.size;
                rows.truncate(page.size as usize);
                let total = filtered()
                    .select(dsl::count_star())
                    .get_result(conn)
                    .await?;
                let items = rows.into_iter().map(Into::into).collect();
                Ok(Page::new(items, total, more, key_of))
            })
            .await
    }
}
