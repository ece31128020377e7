//! The user's fields and their input rules (documented on the fields in `proto/`).

use std::{collections::BTreeMap, fmt};

use unicode_normalization::char::is_combining_mark;
use unicode_script::{Script, UnicodeScript};

use super::text::{fold, length, name, nfkc_trimmed, no_control, no_invisible};
use super::{BreachedList, Violation};

/// A user as the service knows it: never its password or hash.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// A UUIDv7 assigned at creation, or the id an import brought. Immutable.
    pub id: uuid::Uuid,
    /// As shown (NFKC, trimmed); unique by its NFKC case fold, also against
    /// every other user's email. Immutable.
    pub username: String,
    /// As given (trimmed); unique by its NFKC case fold, also against every
    /// other user's username. Immutable.
    pub email: String,
    /// Given name, at most 150 characters; may be empty.
    pub first_name: String,
    /// Family name, at most 150 characters; may be empty.
    pub last_name: String,
    /// May administer users and groups.
    pub is_superuser: bool,
    /// An inactive user cannot log in and its tokens are refused.
    pub is_active: bool,
    /// Whether the email address was verified.
    pub is_verified: bool,
    /// A JSON object of strings, as stored (see [`Attributes`]).
    pub attributes: serde_json::Value,
    /// When the user was created.
    pub create_time: chrono::DateTime<chrono::Utc>,
    /// When the user last changed, a new password included.
    pub update_time: chrono::DateTime<chrono::Utc>,
    /// A service account: created without a password, never logs in; its
    /// credentials are API keys. Set at creation, never changed.
    pub is_service: bool,
}

/// A valid username, as shown and in its canonical (unique) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    display: String,
    canonical: String,
}

impl Username {
    /// Trims, applies NFKC, then checks length, characters and script.
    pub fn parse(raw: &str) -> Result<Self, Violation> {
        let raw = raw.trim();
        no_control(raw)?;
        let display = nfkc_trimmed(raw);
        no_invisible(&display)?;
        length(&display, 3, 150)?;
        let mut scripts: Vec<Script> = Vec::new();
        for c in display.chars() {
            if c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '@' | '+') {
                continue;
            }
            if !(c.is_alphanumeric() || is_combining_mark(c)) {
                return Err(Violation::UsernameChar(c));
            }
            let script = c.script();
            if !matches!(script, Script::Common | Script::Inherited) && !scripts.contains(&script) {
                scripts.push(script);
            }
        }
        if !one_writing_system(&scripts) {
            return Err(Violation::MixedScripts);
        }
        let canonical = fold(&display);
        Ok(Self { display, canonical })
    }

    /// The username as shown.
    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// The NFKC case fold that carries the unique index.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// Whether the scripts of a name belong to one writing system. Japanese mixes
/// Han with Hiragana and Katakana, Korean Han with Hangul, Chinese Han with
/// Bopomofo: Unicode's UTS #39 treats each of these as a single script, and
/// refusing them would lock out ordinary names.
fn one_writing_system(scripts: &[Script]) -> bool {
    if scripts.len() <= 1 {
        return true;
    }
    let within = |set: &[Script]| scripts.iter().all(|s| set.contains(s));
    within(&[Script::Han, Script::Hiragana, Script::Katakana])
        || within(&[Script::Han, Script::Hangul])
        || within(&[Script::Han, Script::Bopomofo])
}

/// A valid email address, as given (trimmed) and in its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    display: String,
    canonical: String,
}

impl Email {
    /// Trims, then checks the shape of the address. Deliberately simple: the
    /// only real test of an address is a mail that arrives.
    pub fn parse(raw: &str) -> Result<Self, Violation> {
        let display = raw.trim();
        no_control(display)?;
        no_invisible(display)?;
        length(display, 3, 254)?;
        if display.chars().any(char::is_whitespace) {
            return Err(Violation::Spaces);
        }
        let Some((local, domain)) = display.split_once('@') else {
            return Err(Violation::NoAt);
        };
        if domain.contains('@') {
            return Err(Violation::ManyAts);
        }
        if local.is_empty() {
            return Err(Violation::NoLocalPart);
        }
        if local.chars().count() > 64 {
            return Err(Violation::LongLocalPart);
        }
        if !domain.contains('.') || domain.split('.').any(str::is_empty) {
            return Err(Violation::NoDottedDomain);
        }
        Ok(Self {
            display: display.to_owned(),
            canonical: fold(display),
        })
    }

    /// The address as given.
    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// The case fold that carries the unique index.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// A password that passed the rules. Its `Debug` hides it, so that it cannot
/// reach a log by accident.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// 8 to 256 characters, taken exactly as given (never trimmed); not
    /// too easy to guess, not in `breached`; not the username or email
    /// (compared case-insensitively). No composition rules, per NIST SP
    /// 800-63B.
    pub fn parse(
        raw: &str,
        forbidden: &[&str],
        breached: &BreachedList,
    ) -> Result<Self, Violation> {
        NewPassword::parse(raw, breached)?.for_user(forbidden)
    }

    /// A password taken as given, without the rules: only for re-hashing one
    /// that already matched its stored hash.
    pub fn unchecked(raw: &str) -> Self {
        Self(raw.to_owned())
    }

    /// The password itself, for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A new password that passed the rules that need no user (no control
/// characters, 8 to 256 characters, never trimmed, not in the breached
/// list: [`super::breached`], not too easy to guess: [`super::weak`]):
/// parsed at the edge, before the service reads the user for the last rule
/// ([`NewPassword::for_user`]). Its `Debug` hides it.
#[derive(Clone)]
pub struct NewPassword(String);

impl NewPassword {
    /// The rules that need no user. The list comes from
    /// BREACHED_PASSWORDS_FILE (or is [`BreachedList::empty`]); it is
    /// passed rather than global so that each server, and each test, has
    /// its own. It is checked before zxcvbn: a microsecond against up to
    /// 0.6 ms.
    pub fn parse(raw: &str, breached: &BreachedList) -> Result<Self, Violation> {
        no_control(raw)?;
        length(raw, 8, 256)?;
        if breached.contains(raw) {
            return Err(Violation::PasswordBreached);
        }
        if let Some(weak) = super::weak::weakness(raw) {
            return Err(weak);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The last rule: not the user's canonical username or email (compared
    /// by case fold).
    pub fn for_user(self, forbidden: &[&str]) -> Result<Password, Violation> {
        let folded = fold(&self.0);
        if forbidden.iter().any(|f| *f == folded) {
            return Err(Violation::PasswordIsName);
        }
        Ok(Password(self.0))
    }
}

impl fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewPassword(***)")
    }
}

/// What Login names: a username or an email, trimmed, in the canonical form
/// both are stored under (their NFKC case fold), so that either finds the
/// account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    canonical: String,
}

impl Login {
    /// Trimmed; no control characters; 1 to 254 characters.
    pub fn parse(raw: &str) -> Result<Self, Violation> {
        let raw = raw.trim();
        no_control(raw)?;
        length(raw, 1, 254)?;
        Ok(Self {
            canonical: fold(&nfkc_trimmed(raw)),
        })
    }

    /// The canonical form, as `login_names` holds it.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

/// A secret the service handed out (a refresh token, an account token),
/// presented again. Its `Debug` hides it.
#[derive(Clone)]
pub struct OpaqueToken(String);

impl OpaqueToken {
    /// A refresh token: required, taken as given.
    pub fn refresh(raw: &str) -> Result<Self, Violation> {
        if raw.is_empty() {
            return Err(Violation::Required);
        }
        Ok(Self(raw.to_owned()))
    }

    /// An account token (email verification, password reset): trimmed (it
    /// travels by mail), 1 to 128 printable ASCII characters.
    pub fn account(raw: &str) -> Result<Self, Violation> {
        let token = raw.trim();
        if token.is_empty() || token.len() > 128 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Violation::NotOurToken);
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself, to hash.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OpaqueToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OpaqueToken(***)")
    }
}

/// Custom attributes: at most 64 keys, keys `^[a-z][a-z0-9_.-]{0,63}$`,
/// values of at most 1024 characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes(pub BTreeMap<String, String>);

impl Attributes {
    /// Checks every key and value.
    pub fn parse<'a>(
        raw: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, Violation> {
        let map: BTreeMap<String, String> = raw
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if map.len() > 64 {
            return Err(Violation::TooManyKeys { got: map.len() });
        }
        for (key, value) in &map {
            if !valid_key(key) {
                return Err(Violation::AttributeKey(key.clone()));
            }
            let value_violation = |why| Violation::AttributeValue {
                key: key.clone(),
                why: Box::new(why),
            };
            no_control(value).map_err(value_violation)?;
            length(value, 0, 1024).map_err(value_violation)?;
        }
        Ok(Self(map))
    }

    /// The attributes as a JSON object of strings, as stored.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    }
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some('a'..='z'))
        && key.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-'))
}

/// first_name and last_name: at most 150 characters, no control characters.
pub fn person_name(raw: &str) -> Result<String, Violation> {
    name(raw, 150)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_bounded_at_3_and_150() {
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse("abc").is_ok());
        assert!(Username::parse(&"a".repeat(150)).is_ok());
        assert!(Username::parse(&"a".repeat(151)).is_err());
    }

    #[test]
    fn usernames_are_nfkc_and_case_folded() {
        let full = Username::parse("ａｌｉｃｅ").unwrap();
        assert_eq!(full.as_str(), "alice");
        assert_eq!(
            Username::parse("Alice").unwrap().canonical(),
            Username::parse("alice").unwrap().canonical()
        );
        assert_eq!(Username::parse("  bob  ").unwrap().as_str(), "bob");
    }

    #[test]
    fn usernames_of_one_script_pass_and_mixed_ones_fail() {
        assert!(Username::parse("алиса").is_ok());
        assert!(Username::parse("j.doe+test@corp-1_x").is_ok());
        assert!(Username::parse("山田たろう").is_ok());
        // A Cyrillic "а" in a Latin name.
        assert!(Username::parse("\u{430}lice").is_err());
        assert!(Username::parse("alice bob").is_err());
        assert!(Username::parse("al\u{200b}ice").is_err());
        assert!(Username::parse("ali\0ce").is_err());
        assert!(Username::parse("alice!").is_err());
    }

    #[test]
    fn emails_need_one_at_and_a_dotted_domain() {
        assert!(Email::parse("a@example.com").is_ok());
        assert_eq!(
            Email::parse(" A@Example.COM ").unwrap().as_str(),
            "A@Example.COM"
        );
        assert_eq!(
            Email::parse("A@Example.COM").unwrap().canonical(),
            Email::parse("a@example.com").unwrap().canonical()
        );
        for bad in [
            "a.example.com",
            "a@b@c.com",
            "@example.com",
            "a@localhost",
            "a@.com",
            "a@example.",
            "a b@example.com",
            "a\0@example.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        let local = "x".repeat(64);
        assert!(Email::parse(&format!("{local}@example.com")).is_ok());
        assert!(Email::parse(&format!("x{local}@example.com")).is_err());
        let long = format!("a@{}.com", "d".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn passwords_are_bounded_and_kept_as_given() {
        let none = BreachedList::empty();
        // Letters in no pattern (a repeated one is refused as such).
        let letters = |n: usize| -> String {
            let mut x: u32 = 7;
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    char::from(b'a' + ((x >> 16) % 26) as u8)
                })
                .collect()
        };
        assert!(Password::parse(&letters(7), &[], &none).is_err());
        assert!(Password::parse(&letters(8), &[], &none).is_ok());
        assert!(Password::parse(&letters(256), &[], &none).is_ok());
        assert!(Password::parse(&letters(257), &[], &none).is_err());
        assert_eq!(
            Password::parse(&"p".repeat(8), &[], &none).err(),
            Some(Violation::PasswordPattern)
        );
        assert_eq!(
            Password::parse(" spaced  ", &[], &none).unwrap().expose(),
            " spaced  "
        );
        assert!(Password::parse("AliceSmith", &["alicesmith"], &none).is_err());
        assert_eq!(
            format!(
                "{:?}",
                Password::parse("hunter2 and more", &[], &none).unwrap()
            ),
            "Password(***)"
        );
    }

    #[test]
    fn a_breached_password_is_refused_before_any_other_judgement() {
        let breached = BreachedList::of_passwords(&["tangerine velvet orchestra", "password"]);
        assert_eq!(
            NewPassword::parse("tangerine velvet orchestra", &breached).err(),
            Some(Violation::PasswordBreached)
        );
        // Common too, but the list's answer comes first (it is cheaper).
        assert_eq!(
            Password::parse("password", &[], &breached).err(),
            Some(Violation::PasswordBreached)
        );
        // Too short to be judged at all.
        assert!(matches!(
            NewPassword::parse("pass", &BreachedList::of_passwords(&["pass"])).err(),
            Some(Violation::TooShort { .. })
        ));
        assert!(NewPassword::parse("tangerine velvet orchestras", &breached).is_ok());
        assert!(NewPassword::parse("tangerine velvet orchestra", &BreachedList::empty()).is_ok());
    }

    #[test]
    fn attribute_keys_and_values_are_checked() {
        let ok: BTreeMap<String, String> = [("team.name".to_owned(), "core".to_owned())].into();
        assert!(Attributes::parse(&ok).is_ok());
        for key in ["Team", "1team", "", "team name"] {
            let m: BTreeMap<String, String> = [(key.to_owned(), "v".to_owned())].into();
            assert!(Attributes::parse(&m).is_err(), "{key}");
        }
        let long: BTreeMap<String, String> = [("k".to_owned(), "v".repeat(1025))].into();
        assert!(Attributes::parse(&long).is_err());
        let many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(Attributes::parse(&many).is_err());
    }
}
