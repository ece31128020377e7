//! Text rules shared by every field: canonical forms and control characters.

use unicode_normalization::UnicodeNormalization;

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
pub fn no_control(s: &str) -> Result<(), String> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "must not contain control characters (found U+{:04X})",
            c as u32
        )),
        None => Ok(()),
    }
}

/// Checks a length in characters (Unicode scalar values).
pub fn length(s: &str, min: usize, max: usize) -> Result<(), String> {
    let n = s.chars().count();
    if n < min {
        Err(format!("must be at least {min} characters (got {n})"))
    } else if n > max {
        Err(format!("must be at most {max} characters (got {n})"))
    } else {
        Ok(())
    }
}

/// A free-text name (first_name, last_name): trimmed, at most `max`
/// characters, no control characters.
pub fn name(s: &str, max: usize) -> Result<String, String> {
    no_control(s)?;
    let s = s.trim();
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
pub fn query(s: &str) -> Result<Option<String>, String> {
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
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name("  Ada ", 150).unwrap(), "Ada");
        assert!(name(&"x".repeat(150), 150).is_ok());
        assert!(name(&"x".repeat(151), 150).is_err());
    }
}
