//! A group's fields and their input rules.

use super::Violation;
use super::text::{fold, length, nfkc_trimmed, no_control, no_invisible};

/// The longest slug.
pub const MAX_SLUG: usize = 64;

/// A valid groupname, as shown and in its canonical (unique) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groupname {
    display: String,
    canonical: String,
}

impl Groupname {
    /// Trimmed, NFKC, 1 to 150 characters, no control characters.
    pub fn parse(raw: &str) -> Result<Self, Violation> {
        let raw = raw.trim();
        no_control(raw)?;
        let display = nfkc_trimmed(raw);
        no_invisible(&display)?;
        length(&display, 1, 150)?;
        let canonical = fold(&display);
        Ok(Self { display, canonical })
    }

    /// The groupname as shown.
    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// The NFKC case fold that carries the unique index.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// A group as the service knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// A UUIDv7 assigned at creation. Immutable.
    pub id: uuid::Uuid,
    /// As shown (NFKC, trimmed); unique by its NFKC case fold. Immutable.
    pub groupname: String,
    /// Unique, `^[a-z0-9]+(-[a-z0-9]+)*$`, at most [`MAX_SLUG`] characters.
    /// Immutable.
    pub slug: String,
    /// When the group was created.
    pub create_time: chrono::DateTime<chrono::Utc>,
}

/// A slug is always a valid groupname (lowercase ASCII letters, digits and
/// dashes, 1 to 64 characters): the name of a group created from its slug.
impl From<&Slug> for Groupname {
    fn from(slug: &Slug) -> Self {
        Self {
            display: slug.0.clone(),
            canonical: fold(&slug.0),
        }
    }
}

/// A valid slug: `^[a-z0-9]+(-[a-z0-9]+)*$`, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slug(String);

impl Slug {
    /// Validates an explicit slug; it is never rewritten.
    pub fn parse(raw: &str) -> Result<Self, Violation> {
        no_control(raw)?;
        if raw.is_empty() || raw.len() > MAX_SLUG {
            return Err(Violation::SlugLength { max: MAX_SLUG });
        }
        let valid = raw.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        if !valid {
            return Err(Violation::SlugShape);
        }
        Ok(Self(raw.to_owned()))
    }

    /// Derives a slug from a groupname: transliterated to ASCII (deunicode:
    /// "Администраторы" gives "administratory"), lowercased, each run of
    /// other characters one `-`, trimmed at both ends, cut to 64 characters.
    /// `None` when nothing is left.
    pub fn derive(groupname: &Groupname) -> Option<Self> {
        let ascii = deunicode::deunicode(groupname.as_str()).to_ascii_lowercase();
        let mut slug = String::with_capacity(ascii.len());
        for c in ascii.chars() {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                slug.push(c);
            } else if !slug.is_empty() && !slug.ends_with('-') {
                slug.push('-');
            }
        }
        slug.truncate(MAX_SLUG);
        let slug = slug.trim_end_matches('-');
        (!slug.is_empty()).then(|| Self(slug.to_owned()))
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derive(name: &str) -> Option<String> {
        Slug::derive(&Groupname::parse(name).unwrap()).map(|s| s.0)
    }

    #[test]
    fn slugs_are_transliterated() {
        assert_eq!(derive("Администраторы").as_deref(), Some("administratory"));
        assert_eq!(derive("Équipe Ops").as_deref(), Some("equipe-ops"));
        assert_eq!(
            derive("  --Site  Reliability!!  ").as_deref(),
            Some("site-reliability")
        );
        assert_eq!(derive("北京").as_deref(), Some("bei-jing"));
        assert_eq!(derive("!!!"), None);
    }

    #[test]
    fn derived_slugs_are_cut_to_64_without_a_trailing_dash() {
        let long = format!("{} {}", "a".repeat(63), "b".repeat(10));
        let slug = derive(&long).unwrap();
        assert_eq!(slug, "a".repeat(63));
        assert!(Slug::parse(&slug).is_ok());
    }

    #[test]
    fn explicit_slugs_are_validated_not_rewritten() {
        assert!(Slug::parse("ops-team-2").is_ok());
        for bad in [
            "",
            "Ops",
            "ops--team",
            "-ops",
            "ops-",
            "ops team",
            "öps",
            &"a".repeat(65),
        ] {
            assert!(Slug::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Slug::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn groupnames_are_bounded_and_folded() {
        assert!(Groupname::parse("").is_err());
        assert!(Groupname::parse("   ").is_err());
        assert!(Groupname::parse(&"g".repeat(150)).is_ok());
        assert!(Groupname::parse(&"g".repeat(151)).is_err());
        assert_eq!(
            Groupname::parse("Ops").unwrap().canonical(),
            Groupname::parse("ＯＰＳ").unwrap().canonical()
        );
    }
}
