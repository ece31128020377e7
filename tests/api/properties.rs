//! Properties of the domain's canonical forms, through the public API:
//! folding is idempotent, derived slugs are valid slugs, and names that look
//! alike (case, width, surrounding spaces) share one canonical form, the
//! same one GetUser and Login compute from the raw text.

use identity::domain::{
    Email, Groupname, Slug, Username,
    text::{fold, nfkc_trimmed},
};
use proptest::prelude::*;

/// Fragments that stress case folding and NFKC, `|`-separated: ß and ẞ,
/// the three sigmas, U+0345 (folds to ι), Greek with iota subscript and
/// dialytika, dotted and dotless i, ligatures, titlecase digraphs,
/// fullwidth and halfwidth forms, the ohm and kelvin signs, long s, ℌ, ①,
/// ㎏, combining marks, Hangul jamo, U+3000 and other spaces.
const TRICKY: &str = "ß|ẞ|SS|ς|σ|Σ|\u{345}|ᾳ|ΐ|İ|ı|i|ﬁ|ﬀ|ǅ|Ǆ|ǆ|ＡＢＣ|ａ|Ａ|ｶ|ﾞ|e|E|é|\
                      \u{301}|\u{308}|Ω|\u{2126}|K|\u{212A}|ſ|ℌ|①|㎏|가|\u{1100}\u{1161}|\
                      \u{3000}|\u{A0}| ";

/// One of [`TRICKY`]'s fragments.
fn tricky() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(TRICKY.split('|').collect::<Vec<_>>())
}

/// Text likely to be a name: letters and digits of any script, the
/// username punctuation, spaces, and the tricky fragments above.
fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\p{L}\\p{N} ._@+-]{0,40}",
        proptest::collection::vec(tricky(), 0..12).prop_map(|parts| parts.concat()),
        (
            "[\\p{L}\\p{N}._-]{0,12}",
            proptest::collection::vec(tricky(), 0..6),
        )
            .prop_map(|(name, parts)| format!("{name}{}", parts.concat())),
    ]
}

/// Text likely to be a username: as [`names`], and mostly letters of one
/// script (usernames may not mix scripts), with the tricky fragments.
fn usernames() -> impl Strategy<Value = String> {
    prop_oneof![
        names(),
        "[\\p{Latin}0-9._@+-]{3,30}",
        "[\\p{Greek}0-9._-]{3,30}",
        "[\\p{Cyrillic}0-9._-]{3,30}",
        "[\\p{Han}\\p{Hiragana}\\p{Katakana}]{3,20}",
        (
            "[\\p{Latin}]{1,12}",
            proptest::collection::vec(tricky(), 1..6),
        )
            .prop_map(|(name, parts)| format!("{name}{}", parts.concat())),
    ]
}

/// `s` with its printable ASCII in fullwidth forms (U+FF01 to U+FF5E).
fn fullwidth(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '!'..='~' => char::from_u32(c as u32 - 0x21 + 0xFF01).expect("a fullwidth form"),
            other => other,
        })
        .collect()
}

proptest! {
    #[test]
    fn case_folding_is_idempotent(s in names()) {
        let once = fold(&s);
        prop_assert_eq!(fold(&once), once);
    }

    #[test]
    fn a_derived_slug_is_always_a_valid_slug(raw in names()) {
        if let Ok(groupname) = Groupname::parse(&raw)
            && let Some(slug) = Slug::derive(&groupname)
        {
            prop_assert!(Slug::parse(slug.as_str()).is_ok(), "{:?} -> {:?}", raw, slug);
        }
    }

    #[test]
    fn a_valid_slug_is_the_canonical_form_of_its_groupname(
        raw in "[a-z0-9]{1,10}(-[a-z0-9]{1,10}){0,4}",
    ) {
        let slug = Slug::parse(&raw).expect("a valid slug");
        let groupname = Groupname::from(&slug);
        prop_assert_eq!(groupname.canonical(), slug.as_str());
    }

    #[test]
    fn a_usernames_canonical_form_is_the_fold_of_its_raw_text(raw in usernames()) {
        if let Ok(username) = Username::parse(&raw) {
            prop_assert_eq!(username.canonical(), fold(&nfkc_trimmed(&raw)));
            prop_assert_eq!(Username::parse(username.as_str()).ok(), Some(username));
        }
    }

    #[test]
    fn case_width_and_space_variants_of_a_username_share_its_canonical_form(
        raw in "[a-zA-Z][a-zA-Z0-9._@+-]{2,30}",
    ) {
        let canonical = Username::parse(&raw).expect("a valid username").canonical().to_owned();
        for variant in [
            raw.to_uppercase(),
            raw.to_lowercase(),
            fullwidth(&raw),
            fullwidth(&raw.to_uppercase()),
            format!(" {raw}\u{3000}"),
            format!("\t{}\u{3000}", fullwidth(&raw)),
        ] {
            let parsed = Username::parse(&variant).ok().map(|v| v.canonical().to_owned());
            prop_assert_eq!(parsed, Some(canonical.clone()), "{:?}", variant);
        }
    }

    #[test]
    fn an_emails_canonical_form_is_the_fold_of_its_trimmed_text(
        raw in prop_oneof![
            names(),
            "[\\p{L}\\p{N}._+-]{1,20}@[\\p{L}\\p{N}-]{1,15}\\.[\\p{L}]{2,6}",
        ],
    ) {
        if let Ok(email) = Email::parse(&raw) {
            prop_assert_eq!(email.canonical(), fold(raw.trim()));
            prop_assert_eq!(Email::parse(email.as_str()).ok(), Some(email));
        }
    }

    #[test]
    fn case_and_space_variants_of_an_email_share_its_canonical_form(
        raw in "[a-zA-Z0-9._+-]{1,20}@[a-zA-Z0-9-]{1,15}\\.[a-zA-Z]{2,6}",
    ) {
        let canonical = Email::parse(&raw).expect("a valid email").canonical().to_owned();
        for variant in [raw.to_uppercase(), raw.to_lowercase(), format!(" {raw}\t")] {
            let parsed = Email::parse(&variant).ok().map(|v| v.canonical().to_owned());
            prop_assert_eq!(parsed, Some(canonical.clone()), "{:?}", variant);
        }
    }

    #[test]
    fn a_groupnames_canonical_form_is_the_fold_of_its_raw_text(raw in names()) {
        if let Ok(groupname) = Groupname::parse(&raw) {
            prop_assert_eq!(groupname.canonical(), fold(&nfkc_trimmed(&raw)));
            prop_assert_eq!(Groupname::parse(groupname.as_str()).ok(), Some(groupname));
        }
    }
}

/// Every code point on its own, beside the sampled strings above (a few
/// seconds in a debug build).
#[test]
fn case_folding_is_idempotent_on_every_code_point() {
    let unstable: Vec<String> = (0..=char::MAX as u32)
        .filter_map(char::from_u32)
        .map(|c| c.to_string())
        .filter(|s| {
            let once = fold(s);
            fold(&once) != once
        })
        .map(|s| format!("U+{:04X}", s.chars().next().unwrap() as u32))
        .collect();
    assert!(unstable.is_empty(), "{unstable:?}");
}
