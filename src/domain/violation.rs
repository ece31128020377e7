//! What is wrong with one field: the domain parsers' error. Its `Display`
//! is the text of the field violation clients read in a
//! `google.rpc.BadRequest` (the grpc layer names the field).

use std::fmt;

/// Why a field's value breaks its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Empty where a value is needed.
    Required,
    /// A control character (Unicode Cc), such as NUL or a tab inside.
    Control(char),
    /// A character that displays as nothing (Default_Ignorable_Code_Point
    /// or a format character).
    Invisible(char),
    /// Fewer characters than allowed.
    TooShort {
        /// The least allowed.
        min: usize,
        /// How many there were.
        got: usize,
    },
    /// More characters than allowed.
    TooLong {
        /// The most allowed.
        max: usize,
        /// How many there were.
        got: usize,
    },
    /// A username character outside letters, digits and `. _ - @ +`.
    UsernameChar(char),
    /// Letters of more than one script in a username.
    MixedScripts,
    /// Spaces in an email.
    Spaces,
    /// An email without an `@`.
    NoAt,
    /// An email with more than one `@`.
    ManyAts,
    /// An email with nothing before its `@`.
    NoLocalPart,
    /// An email whose part before the `@` is longer than 64 characters.
    LongLocalPart,
    /// An email without a dotted domain.
    NoDottedDomain,
    /// A password equal to the username or email.
    PasswordIsName,
    /// One of the most common passwords, or a trivial variant of one.
    PasswordCommon,
    /// A repeated or sequential pattern (aaaaaaaa, abcdefgh, qwertyuiop).
    PasswordPattern,
    /// In the list of passwords exposed in breaches (BREACHED_PASSWORDS_FILE).
    PasswordBreached,
    /// A slug of the wrong length.
    SlugLength {
        /// The most allowed.
        max: usize,
    },
    /// A slug not of the form `^[a-z0-9]+(-[a-z0-9]+)*$`.
    SlugShape,
    /// More attributes than allowed.
    TooManyKeys {
        /// How many there were.
        got: usize,
    },
    /// An attribute key not of the form `^[a-z][a-z0-9_.-]{0,63}$`.
    AttributeKey(String),
    /// An attribute value that breaks a rule.
    AttributeValue {
        /// Its key.
        key: String,
        /// What is wrong with it.
        why: Box<Violation>,
    },
    /// A negative page size.
    NegativePageSize,
    /// A page token not from a previous call with the same filters.
    ForeignPageToken,
    /// Not a UUID in its hyphenated form.
    NotUuid,
    /// A token not of this service's form.
    NotOurToken,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Required => write!(f, "is required"),
            Violation::Control(c) => write!(
                f,
                "must not contain control characters (found U+{:04X})",
                *c as u32
            ),
            Violation::Invisible(c) => write!(
                f,
                "must not contain invisible characters (found U+{:04X})",
                *c as u32
            ),
            Violation::TooShort { min, got } => {
                write!(f, "must be at least {min} characters (got {got})")
            }
            Violation::TooLong { max, got } => {
                write!(f, "must be at most {max} characters (got {got})")
            }
            Violation::UsernameChar(c) => write!(
                f,
                "may contain only letters, digits and . _ - @ + (found {c:?})"
            ),
            Violation::MixedScripts => write!(f, "must use the letters of a single script"),
            Violation::Spaces => write!(f, "must not contain spaces"),
            Violation::NoAt => write!(f, "must contain an @"),
            Violation::ManyAts => write!(f, "must contain exactly one @"),
            Violation::NoLocalPart => write!(f, "must have a part before the @"),
            Violation::LongLocalPart => {
                write!(f, "the part before the @ must be at most 64 characters")
            }
            Violation::NoDottedDomain => {
                write!(f, "must have a domain with a dot, such as example.com")
            }
            Violation::PasswordIsName => write!(f, "must not be the username or email"),
            Violation::PasswordCommon => write!(
                f,
                "is one of the most common passwords, or a trivial variant of one: choose another (a few unrelated words make a good one)"
            ),
            Violation::PasswordPattern => write!(
                f,
                "is a repeated or sequential pattern (like aaaaaaaa, abcdefgh or qwertyuiop): choose another"
            ),
            Violation::PasswordBreached => write!(
                f,
                "appears in a list of passwords exposed in data breaches, which attackers try first: choose another (a few unrelated words make a good one)"
            ),
            Violation::SlugLength { max } => write!(f, "must be 1 to {max} characters"),
            Violation::SlugShape => write!(
                f,
                "must match ^[a-z0-9]+(-[a-z0-9]+)*$ (lowercase letters and digits, single dashes between)"
            ),
            Violation::TooManyKeys { got } => write!(f, "at most 64 keys (got {got})"),
            Violation::AttributeKey(key) => {
                write!(f, "key {key:?} must match ^[a-z][a-z0-9_.-]{{0,63}}$")
            }
            Violation::AttributeValue { key, why } => write!(f, "value of {key:?} {why}"),
            Violation::NegativePageSize => write!(f, "must not be negative"),
            Violation::ForeignPageToken => {
                write!(f, "is not a token from a previous call with these filters")
            }
            Violation::NotUuid => write!(
                f,
                "must be a UUID such as 0192f3a4-5b6c-7d8e-9f00-112233445566"
            ),
            Violation::NotOurToken => write!(f, "not a token issued by this service"),
        }
    }
}

impl std::error::Error for Violation {}

/// The text of a field violation.
impl From<Violation> for String {
    fn from(v: Violation) -> Self {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_read_as_before() {
        assert_eq!(
            Violation::Control('\t').to_string(),
            "must not contain control characters (found U+0009)"
        );
        assert_eq!(
            Violation::TooShort { min: 3, got: 2 }.to_string(),
            "must be at least 3 characters (got 2)"
        );
        assert_eq!(
            Violation::AttributeValue {
                key: "team".into(),
                why: Box::new(Violation::TooLong {
                    max: 1024,
                    got: 1025
                })
            }
            .to_string(),
            "value of \"team\" must be at most 1024 characters (got 1025)"
        );
    }
}
