//! Passwords too easy to guess (NIST SP 800-63B 3.1.1.2: refuse commonly
//! used, expected or compromised values): one of the 30,000 most common
//! passwords of zxcvbn's list (Dropbox's, from leaked password sets), in any
//! case, reversed or with l33t substitutions; a trivial variant of one
//! (digits or symbols added before or after, as in `Password1!`); or a
//! repeated, sequential or keyboard pattern (`aaaaaaaa`, `abcabcabc`,
//! `12345678`, `abcdefgh`, `qwertyuiop`). The `zxcvbn` crate finds them;
//! only a password that is wholly one such match is refused, so a long
//! passphrase of common words stays valid. No composition rules.

use zxcvbn::matching::patterns::MatchPattern;

use super::Violation;

/// Why `password` is too easy to guess, if it is.
pub fn weakness(password: &str) -> Option<Violation> {
    let lower = password.to_lowercase();
    if lower.chars().count() > ANALYSED {
        // No common password is that long, nor a sequence (an alphabet is
        // shorter): only a repetition can be, found without the analysis.
        return periodic(&lower).then_some(Violation::PasswordPattern);
    }
    if let Some(v) = wholly(&lower) {
        return Some(v);
    }
    // A common password with digits or symbols around it.
    let core = lower.trim_matches(|c: char| !c.is_alphabetic());
    if core.chars().count() >= 4 && core.len() < lower.len() {
        return wholly(core).filter(|v| *v == Violation::PasswordCommon);
    }
    None
}

/// The longest password analysed with zxcvbn (whose cost grows with the
/// length: 0.3 ms at 28 characters, 3 ms at 256; twice for a password with digits or symbols around it).
const ANALYSED: usize = 32;

/// Whether `s` is one shorter string repeated (a partial last round
/// allowed): `abcabcab`.
fn periodic(s: &str) -> bool {
    let c: Vec<char> = s.chars().collect();
    (1..=c.len() / 2).any(|p| (p..c.len()).all(|i| c[i] == c[i - p]))
}

/// The violation when `s` is wholly one common password or one pattern.
fn wholly(s: &str) -> Option<Violation> {
    let entropy = zxcvbn::zxcvbn(s, &[]);
    let [only] = entropy.sequence() else {
        return None;
    };
    match &only.pattern {
        // The type of `dictionary_name` is not exported; its name is.
        MatchPattern::Dictionary(d) if format!("{:?}", d.dictionary_name) == "Passwords" => {
            Some(Violation::PasswordCommon)
        }
        MatchPattern::Repeat(_) | MatchPattern::Sequence(_) | MatchPattern::Spatial(_) => {
            Some(Violation::PasswordPattern)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_passwords_their_variants_and_patterns_are_weak() {
        for common in [
            "password",
            "Password",
            "PASSWORD1",
            "Password1",
            "Password1!",
            "p@ssw0rd",
            "P@ssw0rd2024",
            "iloveyou",
            "sunshine",
            "trustno1",
            "dragon123",
            "!!monkey!!",
            "drowssap",
            "letmein1",
        ] {
            assert_eq!(
                weakness(common),
                Some(Violation::PasswordCommon),
                "{common}"
            );
        }
        for pattern in [
            "aaaaaaaa",
            "zzzzzzzzzzzzzzzz",
            "abcabcabcabc",
            "abcdefgh",
            "abcdefghijklmnop",
            "zyxwvuts",
            "acegikmo",
            "qwertyuiop",
            "qazwsxedcrfv",
            "asdfghjkl;",
        ] {
            assert!(weakness(pattern).is_some(), "{pattern}");
        }
        assert!(weakness("12345678").is_some());
        // Past the analysed length, repetitions still.
        assert_eq!(
            weakness(&"ab1".repeat(40)),
            Some(Violation::PasswordPattern)
        );
        assert_eq!(weakness(&"x".repeat(256)), Some(Violation::PasswordPattern));
        assert!(weakness("87654321").is_some());
    }

    #[test]
    fn passphrases_and_random_passwords_are_not() {
        for fine in [
            "correct horse battery staple",
            "a long admin password",
            "bench horse battery staple",
            "the root secret password",
            "gravel lantern oyster",
            "tX9#qLm2vR7!",
            "Kq8s-Zp3w-Lm5n",
            "a long enough secret",
            "first secret password",
            "a passphrase well past the analysed length of this check, made of words",
        ] {
            assert_eq!(weakness(fine), None, "{fine}");
        }
    }

    /// How long a check takes (CreateUser's bar is a millisecond):
    /// `cargo test --release --lib weak -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost() {
        let _ = weakness("warm up the dictionaries");
        let longest: String = (0..256u32)
            .map(|i| char::from(b'a' + ((i.wrapping_mul(2_654_435_761) >> 7) % 26) as u8))
            .collect();
        let at_limit = &longest[..ANALYSED];
        // Digits around it: the core is analysed too (the worst case).
        let wrapped = format!("1{}1", &longest[..ANALYSED - 2]);
        let samples = [
            at_limit,
            wrapped.as_str(),
            "correct horse battery staple",
            "Password1!",
            "tX9#qLm2vR7!xx",
            longest.as_str(),
        ];
        for s in samples {
            let start = std::time::Instant::now();
            for _ in 0..200 {
                std::hint::black_box(weakness(s));
            }
            println!(
                "{} characters: {:?} a check",
                s.len(),
                start.elapsed() / 200
            );
        }
    }
}
