//! Text rules shared by every field: canonical forms and control characters.

use unicode_normalization::UnicodeNormalization;

use super::Violation;

/// The canonical form under which two names are "the same": the NFKC case
/// fold, computed here rather than by PostgreSQL's `lower()`, whose result
/// depends on the database's locale.
///
/// This is Unicode's NFKC_Casefold in practice: NFKC, full case folding
/// (so `ß` matches `SS`), then NFKC again since folding can denormalize.
pub fn fold(s: &str) -> String {
    let nfkc: String = s.nfkc().collect();
    caseless::default_case_fold_str(&nfkc).nfkc().collect()
}

/// NFKC, then trimmed: NFKC can turn exotic spaces (U+3000) into plain ones.
pub fn nfkc_trimmed(s: &str) -> String {
    let nfkc: String = s.trim().nfkc().collect();
    nfkc.trim().to_owned()
}

/// Refuses NUL and every other control character (Unicode Cc).
pub fn no_control(s: &str) -> Result<(), Violation> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(Violation::Control(c)),
        None => Ok(()),
    }
}

/// Refuses characters that display as nothing or reorder what follows:
/// Unicode's Default_Ignorable_Code_Point (zero-width space, soft hyphen,
/// word joiner, variation selectors, Hangul fillers, ...) and every format
/// character (General_Category Cf: bidi controls, ...). In a username,
/// email or groupname they make two names that look alike differ
/// (`admin@exa\u{200B}mple.com`).
pub fn no_invisible(s: &str) -> Result<(), Violation> {
    invisible(s, |_| false)
}

/// As [`no_invisible`], for people's names: the zero-width non-joiner and
/// joiner (which Persian, Indic scripts and emoji sequences need) and the
/// variation selectors (emoji presentation) are allowed.
pub fn no_invisible_in_name(s: &str) -> Result<(), Violation> {
    invisible(
        s,
        |c| matches!(c, '\u{200C}' | '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}'),
    )
}

fn invisible(s: &str, allowed: impl Fn(char) -> bool) -> Result<(), Violation> {
    use icu_properties::{
        CodePointMapData, CodePointSetData,
        props::{DefaultIgnorableCodePoint, GeneralCategory},
    };
    let ignorable = CodePointSetData::new::<DefaultIgnorableCodePoint>();
    let category = CodePointMapData::<GeneralCategory>::new();
    match s.chars().find(|&c| {
        (ignorable.contains(c) || category.get(c) == GeneralCategory::Format) && !allowed(c)
    }) {
        Some(c) => Err(Violation::Invisible(c)),
        None => Ok(()),
    }
}

/// Checks a length in characters (Unicode scalar values).
pub fn length(s: &str, min: usize, max: usize) -> Result<(), Violation> {
    let got = s.chars().count();
    if got < min {
        Err(Violation::TooShort { min, got })
    } else if got > max {
        Err(Violation::TooLong { max, got })
    } else {
        Ok(())
    }
}

/// A free-text name (first_name, last_name): trimmed, then at most `max`
/// characters, no control characters, no invisible ones but those scripts
/// need ([`no_invisible_in_name`]).
pub fn name(s: &str, max: usize) -> Result<String, Violation> {
    let s = s.trim();
    no_control(s)?;
    no_invisible_in_name(s)?;
    length(s, 0, max)?;
    Ok(s.to_owned())
}

/// A `LIKE` pattern matching `query` as a literal substring of a folded
/// text: `%`, `_` and `\` in the query are escaped, so they match themselves.
pub fn substring_pattern(query: &str) -> String {
    let folded = fold(query);
    let mut pattern = String::with_capacity(folded.len() + 2);
    pattern.push('%');
    for c in folded.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Validates a search query: no control characters, at most 256 characters.
pub fn query(s: &str) -> Result<Option<String>, Violation> {
    no_control(s)?;
    length(s, 0, 256)?;
    Ok((!s.is_empty()).then(|| substring_pattern(s)))
}

/// The separator between the fields of a search text. A query cannot contain
/// it (control characters are refused), so no match spans two fields.
pub const SEARCH_SEPARATOR: char = '\u{1f}';

/// The folded text that `query` patterns are matched against.
pub fn search_text(fields: &[&str]) -> String {
    let sep = SEARCH_SEPARATOR.to_string();
    fields
        .iter()
        .map(|f| fold(f))
        .collect::<Vec<_>>()
        .join(&sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_is_nfkc_and_case_insensitive() {
        assert_eq!(fold("ＡＬＩＣＥ"), "alice");
        assert_eq!(fold("Straße"), fold("STRASSE"));
        assert_eq!(fold("ǅ"), fold("dž"));
    }

    #[test]
    fn patterns_escape_like_wildcards() {
        assert_eq!(substring_pattern("a%b_c\\"), "%a\\%b\\_c\\\\%");
        assert_eq!(substring_pattern("Bob"), "%bob%");
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(no_control("a\0b").is_err());
        assert!(no_control("a\u{7f}").is_err());
        assert!(no_control("tab\t").is_err());
        assert!(no_control("Zoë").is_ok());
    }

    #[test]
    fn invisible_characters_are_refused() {
        for s in [
            "a\u{200B}b",  // zero-width space
            "a\u{00AD}b",  // soft hyphen
            "a\u{2060}b",  // word joiner
            "a\u{202E}b",  // right-to-left override
            "a\u{2066}b",  // left-to-right isolate
            "a\u{FEFF}b",  // zero-width no-break space
            "a\u{034F}b",  // combining grapheme joiner
            "a\u{3164}b",  // Hangul filler
            "a\u{E0041}b", // tag latin capital letter a
        ] {
            assert!(no_invisible(s).is_err(), "{s:?}");
        }
        assert!(no_invisible("Zoë Ωmega").is_ok());
    }

    #[test]
    fn names_keep_the_joiners_scripts_need() {
        assert!(
            no_invisible_in_name(
                "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}"
            )
            .is_ok()
        );
        assert!(no_invisible_in_name("\u{1F468}\u{200D}\u{1F469}\u{2764}\u{FE0F}").is_ok());
        assert!(no_invisible_in_name("a\u{200B}b").is_err());
        assert!(no_invisible_in_name("a\u{202E}b").is_err());
        assert!(no_invisible("a\u{200D}b").is_err());
    }

    #[test]
    fn names_are_trimmed_before_they_are_checked() {
        assert_eq!(name("\tAda\n", 150).unwrap(), "Ada");
        assert!(name("A\tda", 150).is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name("  Ada ", 150).unwrap(), "Ada");
        assert!(name(&"x".repeat(150), 150).is_ok());
        assert!(name(&"x".repeat(151), 150).is_err());
    }
}
