//! Pagination (AIP-158): page sizes and opaque page tokens.
//!
//! A token holds the id of the last item shown and a fingerprint of the
//! filters it was made for; a token reused with other filters is refused
//! rather than silently giving a page of another list.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Violation;

/// Default page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// The largest page; larger requests are cut to it.
pub const MAX_PAGE_SIZE: i64 = 1000;

const VERSION: u8 = 1;
const LEN: usize = 1 + 16 + 8;

/// Where a page starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// How many items to return.
    pub size: i64,
    /// Items with ids greater than this one; `None` from the start.
    pub after: Option<Uuid>,
}

/// The fingerprint of a list's filters, carried in its page tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pager([u8; 8]);

impl Pager {
    /// The fingerprint of the given filter values.
    pub fn for_filters(parts: &[&str]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut fp = [0; 8];
        fp.copy_from_slice(&digest[..8]);
        Self(fp)
    }

    /// Checks `page_size` and decodes `page_token`. Errors name the field.
    pub fn parse(
        &self,
        page_size: i32,
        page_token: &str,
    ) -> Result<PageRequest, (&'static str, Violation)> {
        let size = match page_size {
            n if n < 0 => return Err(("page_size", Violation::NegativePageSize)),
            0 => DEFAULT_PAGE_SIZE,
            n => i64::from(n).min(MAX_PAGE_SIZE),
        };
        if page_token.is_empty() {
            return Ok(PageRequest { size, after: None });
        }
        let invalid = || ("page_token", Violation::ForeignPageToken);
        let bytes = URL_SAFE_NO_PAD.decode(page_token).map_err(|_| invalid())?;
        if bytes.len() != LEN || bytes[0] != VERSION || bytes[17..] != self.0 {
            return Err(invalid());
        }
        let id = Uuid::from_slice(&bytes[1..17]).map_err(|_| invalid())?;
        Ok(PageRequest {
            size,
            after: Some(id),
        })
    }

    /// The token of the page after the item `last`.
    pub fn next(&self, last: Uuid) -> String {
        let mut bytes = Vec::with_capacity(LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(last.as_bytes());
        bytes.extend_from_slice(&self.0);
        URL_SAFE_NO_PAD.encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_follow_aip_158() {
        let t = Pager::for_filters(&[]);
        assert_eq!(t.parse(0, "").unwrap().size, 50);
        assert_eq!(t.parse(7, "").unwrap().size, 7);
        assert_eq!(t.parse(5000, "").unwrap().size, 1000);
        assert_eq!(t.parse(-1, "").unwrap_err().0, "page_size");
    }

    #[test]
    fn tokens_round_trip_and_bind_to_their_filters() {
        let a = Pager::for_filters(&["query", "ali"]);
        let b = Pager::for_filters(&["query", "bob"]);
        let id = Uuid::now_v7();
        let token = a.next(id);
        assert_eq!(a.parse(10, &token).unwrap().after, Some(id));
        assert_eq!(b.parse(10, &token).unwrap_err().0, "page_token");
        assert_eq!(a.parse(10, "garbage!").unwrap_err().0, "page_token");
    }
}
