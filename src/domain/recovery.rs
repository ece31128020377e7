//! Recovery codes: the way back in when the authenticator is lost. Ten per
//! enrolment, shown once, each working once; only their SHA-256 is kept.
//!
//! A code is 10 characters of Crockford's base32 alphabet in lower case
//! (`0-9a-z` without `i`, `l`, `o` and `u`), 50 random bits, shown as
//! `xxxxx-xxxxx`. Crockford's alphabet is made to be read aloud and typed
//! back: what a person may take for a left-out letter is read as the digit
//! it looks like (`o` as `0`, `i` and `l` as `1`), so those typos still work.
//! Case, dashes and spaces do not matter either.
//!
//! SHA-256 without salt, like the opaque tokens: a lookup by hash needs no
//! per-code salt, and a code is only as strong as its 50 bits against an
//! offline search of a stolen table.

use std::fmt;

use sha2::{Digest, Sha256};

use super::totp::TotpError;

/// Codes per enrolment.
pub const COUNT: usize = 10;
/// Characters in a code, dash left out.
pub const LENGTH: usize = 10;

/// Crockford's base32, lower case: 32 symbols, 5 bits each.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// New recovery codes: what the user is shown once, and what is stored.
/// Its `Debug` hides both.
pub struct RecoveryCodes {
    /// `xxxxx-xxxxx`, [`COUNT`] of them, distinct.
    pub codes: Vec<String>,
    /// [`recovery_hash`] of each code, in the same order.
    pub hashes: Vec<Vec<u8>>,
}

impl fmt::Debug for RecoveryCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryCodes")
            .field("count", &self.codes.len())
            .finish_non_exhaustive()
    }
}

impl RecoveryCodes {
    /// [`COUNT`] distinct codes from the operating system's random source.
    pub fn generate() -> Result<Self, TotpError> {
        let mut codes: Vec<String> = Vec::with_capacity(COUNT);
        while codes.len() < COUNT {
            // 256 is a multiple of 32, so the low 5 bits of a random byte
            // are a uniform symbol.
            let mut bytes = [0u8; LENGTH];
            aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TotpError::Random)?;
            let mut code = String::with_capacity(LENGTH + 1);
            for (i, b) in bytes.iter().enumerate() {
                if i == LENGTH / 2 {
                    code.push('-');
                }
                code.push(char::from(ALPHABET[usize::from(b & 0x1f)]));
            }
            // Two equal codes out of 2^50 are next to impossible; cheaper to
            // rule out than to explain.
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        let hashes = codes
            .iter()
            .map(|c| recovery_hash(c).expect("a generated code is a code"))
            .collect();
        Ok(Self { codes, hashes })
    }
}

/// The stored form of a presented recovery code: SHA-256 of its canonical
/// form (10 lower-case characters, no dash). `None` when the input cannot
/// be a code, so that it need not be looked up.
pub fn recovery_hash(input: &str) -> Option<Vec<u8>> {
    normalize(input).map(|canonical| Sha256::digest(canonical.as_bytes()).to_vec())
}

/// Lower case, dashes and spaces dropped, Crockford's look-alikes read as
/// digits; then exactly [`LENGTH`] symbols of the alphabet.
fn normalize(input: &str) -> Option<String> {
    // A code with a dash and some spaces is far shorter than this.
    if input.len() > 4 * LENGTH {
        return None;
    }
    let mut canonical = String::with_capacity(LENGTH);
    for c in input.chars() {
        let c = match c.to_ascii_lowercase() {
            '-' | ' ' | '\t' | '\n' | '\r' => continue,
            'o' => '0',
            'i' | 'l' => '1',
            c if c.is_ascii() && ALPHABET.contains(&(c as u8)) => c,
            _ => return None,
        };
        canonical.push(c);
    }
    (canonical.len() == LENGTH).then_some(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_distinct_codes_of_the_shown_format() {
        let new = RecoveryCodes::generate().unwrap();
        assert_eq!(new.codes.len(), 10);
        assert_eq!(new.hashes.len(), 10);
        for code in &new.codes {
            assert_eq!(code.len(), 11, "{code}");
            assert_eq!(&code[5..6], "-", "{code}");
            assert!(
                code.bytes()
                    .enumerate()
                    .all(|(i, b)| i == 5 || ALPHABET.contains(&b)),
                "{code}"
            );
        }
        let mut distinct = new.codes.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 10);
        let mut hashes = new.hashes.clone();
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), 10);
    }

    #[test]
    fn every_symbol_of_the_alphabet_turns_up() {
        let mut seen = [false; 32];
        for _ in 0..20 {
            for code in RecoveryCodes::generate().unwrap().codes {
                for b in code.bytes().filter(|&b| b != b'-') {
                    seen[ALPHABET.iter().position(|&a| a == b).unwrap()] = true;
                }
            }
        }
        // 2,000 draws of 32 symbols: a missing one is a bug, not bad luck.
        assert!(seen.iter().all(|&s| s), "{seen:?}");
    }

    #[test]
    fn stored_hashes_are_sha256_of_the_code_without_its_dash() {
        let new = RecoveryCodes::generate().unwrap();
        for (code, hash) in new.codes.iter().zip(&new.hashes) {
            let plain = code.replace('-', "");
            assert_eq!(hash, &Sha256::digest(plain.as_bytes()).to_vec());
            assert_eq!(recovery_hash(code).as_ref(), Some(hash));
        }
    }

    #[test]
    fn case_dashes_spaces_and_look_alikes_do_not_matter() {
        let hash = recovery_hash("ab0c1-d2e3f").unwrap();
        for presented in [
            "ab0c1d2e3f",
            "AB0C1-D2E3F",
            "  ab0c1 - d2e3f \n",
            "ab0c1 d2e3f",
            "ab-0c-1d-2e-3f",
            "abOc1-d2e3f",
            "abocI-d2e3f",
            "ab0cl-D2E3F",
        ] {
            assert_eq!(
                recovery_hash(presented).as_ref(),
                Some(&hash),
                "{presented:?}"
            );
        }
        assert_ne!(recovery_hash("ab0c1-d2e3g"), Some(hash));
    }

    #[test]
    fn what_cannot_be_a_code_has_no_hash() {
        for presented in [
            "",
            "-----",
            "ab0c1-d2e3",
            "ab0c1-d2e3f4",
            // `u` is not in Crockford's alphabet, and reads as nothing.
            "ab0cu-d2e3f",
            "ab0c1_d2e3f",
            "ab0c1.d2e3f",
            "ab0c1-d2é3f",
            "ab0c1-d2e3f\u{0}",
            "123456",
        ] {
            assert_eq!(recovery_hash(presented), None, "{presented:?}");
        }
        assert_eq!(recovery_hash(&" ".repeat(1000)), None);
    }

    #[test]
    fn debug_hides_codes_and_hashes() {
        let new = RecoveryCodes::generate().unwrap();
        let debug = format!("{new:?}");
        assert_eq!(debug, "RecoveryCodes { count: 10, .. }");
    }
}
