//! Conversions between generated messages and rows, and field parsing shared
//! by the services.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Group, User, Violation};
use crate::error::Error;
use crate::proto::identity::v1 as pb;

/// A required UUID field, in its canonical hyphenated form (any case).
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Error> {
    uuid(value).map_err(|v| Error::invalid(field, v))
}

/// A UUID in its canonical hyphenated form (any case).
fn uuid(value: &str) -> Result<Uuid, Violation> {
    if value.is_empty() {
        return Err(Violation::Required);
    }
    if value.len() != 36 {
        return Err(Violation::NotUuid);
    }
    Uuid::try_parse(value).map_err(|_| Violation::NotUuid)
}

/// An optional UUID field: empty means absent.
pub fn parse_optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Error> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

/// The description of a single-field INVALID_ARGUMENT, to collect it with
/// others in one [`crate::error::Violations`].
pub fn describe(e: Error) -> String {
    match e {
        Error::InvalidArgument(mut v) => v.pop().map(|f| f.description).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

impl From<User> for pb::User {
    fn from(row: User) -> Self {
        let attributes = match row.attributes {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) => Some((k, s)),
                    _ => None,
                })
                .collect(),
            _ => Default::default(),
        };
        pb::User {
            id: row.id.to_string(),
            username: row.username,
            email: row.email,
            first_name: row.first_name,
            last_name: row.last_name,
            is_superuser: row.is_superuser,
            is_active: row.is_active,
            is_verified: row.is_verified,
            create_time: Some(timestamp(row.create_time)),
            update_time: Some(timestamp(row.update_time)),
            attributes,
            is_service: row.is_service,
        }
    }
}

impl From<Group> for pb::Group {
    fn from(row: Group) -> Self {
        pb::Group {
            id: row.id.to_string(),
            groupname: row.groupname,
            slug: row.slug,
            create_time: Some(timestamp(row.create_time)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_hyphenated_uuids() {
        let id = Uuid::now_v7();
        assert_eq!(parse_id("id", &id.to_string()).unwrap(), id);
        assert_eq!(parse_id("id", &id.to_string().to_uppercase()).unwrap(), id);
        assert!(parse_id("id", &id.simple().to_string()).is_err());
        assert!(parse_id("id", "").is_err());
        assert!(parse_id("id", "not-a-uuid-not-a-uuid-not-a-uuid-xx").is_err());
        assert_eq!(parse_optional_id("group_id", "").unwrap(), None);
    }
}
