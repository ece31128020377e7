//! The GroupService use cases.

use uuid::Uuid;

use super::audit;
use crate::db::{self, Pool, groups::NewGroupRow};
use crate::domain::{Group, Groupname, PageRequest, Slug, User, text};
use crate::error::{Error, Field, Resource};
use crate::service::Page;

/// How GetGroup finds a group.
#[derive(Debug, Clone)]
pub enum GroupLookup {
    /// By id.
    Id(Uuid),
    /// By the canonical form of a groupname.
    Groupname(String),
    /// By slug.
    Slug(String),
}

/// Groups and memberships.
#[derive(Clone)]
pub struct GroupService {
    pool: Pool,
}

impl GroupService {
    /// The service over `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Creates a group. Without an explicit slug, one is derived from the
    /// groupname; if that one is taken, the answer says to pass one.
    #[tracing::instrument(skip_all, fields(groupname = %groupname.as_str()))]
    pub async fn create(&self, groupname: Groupname, slug: Option<Slug>) -> Result<Group, Error> {
        let derived = slug.is_none();
        let slug = match slug {
            Some(slug) => slug,
            None => Slug::derive(&groupname).ok_or_else(|| {
                Error::invalid(
                    "groupname",
                    "derives an empty slug (no letters or digits); pass slug explicitly",
                )
            })?,
        };
        let search = text::search_text(&[groupname.as_str(), slug.as_str()]);
        let row = NewGroupRow {
            id: Uuid::now_v7(),
            groupname: groupname.as_str(),
            groupname_canonical: groupname.canonical(),
            slug: slug.as_str(),
            search: &search,
        };
        let mut conn = db::conn(&self.pool).await?;
        let inserted =
            audit::transaction(&mut conn, async |conn| db::groups::insert(conn, &row).await).await;
        let group = match inserted {
            Err(db::Error::Unique(db::UniqueKey::GroupsSlug)) if derived => {
                return Err(Error::AlreadyExists {
                    field: Field::Slug,
                    hint: Some(
                        "the slug derived from this groupname is taken; pass a slug explicitly",
                    ),
                });
            }
            other => other?,
        };
        tracing::info!(group_id = %group.id, slug = %group.slug, "group created");
        Ok(group)
    }

    /// The group found by `lookup`.
    pub async fn get(&self, lookup: &GroupLookup) -> Result<Group, Error> {
        let mut conn = db::conn(&self.pool).await?;
        let found = match lookup {
            GroupLookup::Id(id) => db::groups::by_id(&mut conn, *id).await?,
            GroupLookup::Groupname(canonical) => {
                db::groups::by_groupname(&mut conn, canonical).await?
            }
            GroupLookup::Slug(slug) => db::groups::by_slug(&mut conn, slug).await?,
        };
        found.ok_or(Error::NotFound(Resource::Group))
    }

    /// One page of the groups matching `search`.
    pub async fn list(
        &self,
        search: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<Group>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        Ok(db::groups::list(&mut conn, search, page).await?)
    }

    /// Deletes a group with its memberships (the foreign key cascades, in
    /// the same statement).
    #[tracing::instrument(skip(self))]
    pub async fn delete(&self, id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        let deleted =
            audit::transaction(&mut conn, async |conn| db::groups::delete(conn, id).await).await?;
        if !deleted {
            return Err(Error::NotFound(Resource::Group));
        }
        tracing::info!(group_id = %id, "group deleted");
        Ok(())
    }

    /// Adds a member; adding one twice is fine.
    #[tracing::instrument(skip(self))]
    pub async fn add_member(&self, group_id: Uuid, user_id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        audit::transaction_touching(&mut conn, &[user_id], async |conn| {
            db::groups::add_member(conn, group_id, user_id).await
        })
        .await?;
        tracing::info!(group_id = %group_id, user_id = %user_id, "member added");
        Ok(())
    }

    /// Removes a member; removing a non-member is fine, but the group and
    /// the user must exist.
    #[tracing::instrument(skip(self))]
    pub async fn remove_member(&self, group_id: Uuid, user_id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        match db::groups::both_exist(&mut conn, group_id, user_id).await? {
            (false, _) => return Err(Error::NotFound(Resource::Group)),
            (_, false) => return Err(Error::NotFound(Resource::User)),
            _ => {}
        }
        audit::transaction_touching(&mut conn, &[user_id], async |conn| {
            db::groups::remove_member(conn, group_id, user_id).await
        })
        .await?;
        tracing::info!(group_id = %group_id, user_id = %user_id, "member removed");
        Ok(())
    }

    /// One page of a group's members.
    pub async fn members(&self, group_id: Uuid, page: PageRequest) -> Result<Page<User>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        if db::groups::by_id(&mut conn, group_id).await?.is_none() {
            return Err(Error::NotFound(Resource::Group));
        }
        let filter = db::users::Filter {
            group_id: Some(group_id),
            ..Default::default()
        };
        Ok(db::users::list(&mut conn, &filter, page).await?)
    }

    /// The groups of a user.
    pub async fn of_user(&self, user_id: Uuid) -> Result<Vec<Group>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        if db::users::by_id(&mut conn, user_id).await?.is_none() {
            return Err(Error::NotFound(Resource::User));
        }
        Ok(db::groups::of_user(&mut conn, user_id).await?)
    }
}

impl std::fmt::Debug for GroupService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupService").finish_non_exhaustive()
    }
}
