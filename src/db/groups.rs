//! Queries on `groups` and `group_members`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::{group_members, groups};
use crate::error::Error;

/// A group as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = groups, check_for_backend(diesel::pg::Pg))]
pub struct GroupRow {
    pub id: Uuid,
    pub groupname: String,
    pub slug: String,
    pub create_time: DateTime<Utc>,
}

/// The groups of a user, by id.
pub async fn of_user(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<Vec<GroupRow>, Error> {
    Ok(group_members::table
        .inner_join(groups::table)
        .filter(group_members::user_id.eq(user_id))
        .order(groups::id)
        .select(GroupRow::as_select())
        .load(conn)
        .await?)
}
