//! Queries on `groups` and `group_members`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Error;
use super::page::{Page, keyset};
use super::schema::{group_members, groups};
use crate::domain::{Group, PageRequest};

/// A group's row, as read; the service sees [`Group`].
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = groups, check_for_backend(diesel::pg::Pg))]
pub(crate) struct GroupRow {
    pub id: Uuid,
    pub groupname: String,
    pub slug: String,
    pub create_time: DateTime<Utc>,
}

impl From<GroupRow> for Group {
    fn from(r: GroupRow) -> Self {
        Group {
            id: r.id,
            groupname: r.groupname,
            slug: r.slug,
            create_time: r.create_time,
        }
    }
}

/// The groups of a user, by id.
pub async fn of_user(conn: &mut AsyncPgConnection, user_id: Uuid) -> Result<Vec<Group>, Error> {
    Ok(group_members::table
        .inner_join(groups::table)
        .filter(group_members::user_id.eq(user_id))
        .order(groups::id)
        .select(GroupRow::as_select())
        .load::<GroupRow>(conn)
        .await?
        .into_iter()
        .map(Group::from)
        .collect())
}

/// A group about to be inserted.
#[derive(Debug, Insertable)]
#[diesel(table_name = groups)]
pub struct NewGroupRow<'a> {
    /// A new UUIDv7.
    pub id: Uuid,
    /// As shown: NFKC, trimmed (the slug, for a group an import creates).
    pub groupname: &'a str,
    /// The NFKC case fold of `groupname`; unique.
    pub groupname_canonical: &'a str,
    /// Unique, `^[a-z0-9]+(-[a-z0-9]+)*$`, at most 64 characters.
    pub slug: &'a str,
    /// The folded groupname and slug that ListGroups' `query` matches
    /// ([`crate::domain::text::search_text`]).
    pub search: &'a str,
}

/// Inserts a group; ALREADY_EXISTS names `groupname` or `slug`.
pub async fn insert(conn: &mut AsyncPgConnection, row: &NewGroupRow<'_>) -> Result<Group, Error> {
    Ok(diesel::insert_into(groups::table)
        .values(row)
        .returning(GroupRow::as_returning())
        .get_result(conn)
        .await?
        .into())
}

/// The group with this id.
pub async fn by_id(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Group>, Error> {
    Ok(groups::table
        .find(id)
        .select(GroupRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Group::from))
}

/// The group whose groupname has this canonical form.
pub async fn by_groupname(
    conn: &mut AsyncPgConnection,
    canonical: &str,
) -> Result<Option<Group>, Error> {
    Ok(groups::table
        .filter(groups::groupname_canonical.eq(canonical))
        .select(GroupRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Group::from))
}

/// The group with this slug.
pub async fn by_slug(conn: &mut AsyncPgConnection, slug: &str) -> Result<Option<Group>, Error> {
    Ok(groups::table
        .filter(groups::slug.eq(slug))
        .select(GroupRow::as_select())
        .first(conn)
        .await
        .optional()?
        .map(Group::from))
}

fn filtered(search: Option<&str>) -> groups::BoxedQuery<'static, diesel::pg::Pg> {
    let mut query = groups::table.into_boxed();
    if let Some(pattern) = search {
        query = query.filter(groups::search.like(pattern.to_owned()));
    }
    query
}

/// One page of the groups matching `search`, by id; how many match; and
/// whether more follow. One snapshot, like [`super::users::list`].
pub async fn list(
    conn: &mut AsyncPgConnection,
    search: Option<&str>,
    page: PageRequest,
) -> Result<Page<Group>, Error> {
    keyset(
        conn,
        page,
        groups::id,
        GroupRow::as_select(),
        || filtered(search),
        |g: &Group| g.id,
    )
    .await
}

/// Deletes a group (its memberships go with it); whether there was one.
pub async fn delete(conn: &mut AsyncPgConnection, id: Uuid) -> Result<bool, Error> {
    Ok(diesel::delete(groups::table.find(id)).execute(conn).await? > 0)
}

/// Whether the group and the user exist, in one round trip.
pub async fn both_exist(
    conn: &mut AsyncPgConnection,
    group_id: Uuid,
    user_id: Uuid,
) -> Result<(bool, bool), Error> {
    use super::schema::users;
    Ok(diesel::select((
        diesel::dsl::exists(groups::table.find(group_id)),
        diesel::dsl::exists(users::table.find(user_id)),
    ))
    .get_result(conn)
    .await?)
}

/// The id of the group with `slug`, created (named by its slug) when there
/// is none; `None` when another group already has that name.
pub async fn ensure_by_slug(
    conn: &mut AsyncPgConnection,
    slug: &crate::domain::Slug,
) -> Result<Option<Uuid>, Error> {
    if let Some(group) = by_slug(conn, slug.as_str()).await? {
        return Ok(Some(group.id));
    }
    let name = crate::domain::Groupname::from(slug);
    let search = crate::domain::text::search_text(&[name.as_str(), slug.as_str()]);
    diesel::insert_into(groups::table)
        .values(&NewGroupRow {
            id: Uuid::now_v7(),
            groupname: name.as_str(),
            groupname_canonical: name.canonical(),
            slug: slug.as_str(),
            search: &search,
        })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(by_slug(conn, slug.as_str()).await?.map(|group| group.id))
}

/// Adds a membership; nothing when it exists (concurrent adds of one pair
/// both succeed, with one row). A missing group or user is a foreign-key
/// violation, mapped to NOT_FOUND.
pub async fn add_member(
    conn: &mut AsyncPgConnection,
    group_id: Uuid,
    user_id: Uuid,
) -> Result<(), Error> {
    diesel::insert_into(group_members::table)
        .values((
            group_members::group_id.eq(group_id),
            group_members::user_id.eq(user_id),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// Removes a membership, if there is one.
pub async fn remove_member(
    conn: &mut AsyncPgConnection,
    group_id: Uuid,
    user_id: Uuid,
) -> Result<(), Error> {
    diesel::delete(
        group_members::table
            .filter(group_members::group_id.eq(group_id))
            .filter(group_members::user_id.eq(user_id)),
    )
    .execute(conn)
    .await?;
    Ok(())
}
