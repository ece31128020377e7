//! TOTP (RFC 6238) as identity uses it: HMAC-SHA-1, 6 digits, 30-second
//! steps, one step of clock skew either way, and a code accepted once.
//!
//! Codes are made and compared by `totp-rs`, the maintained crate of the
//! field (its `Token` compares in constant time). I ask it about one step at
//! a time (a skew of 0) and apply the ±1 step here, because the replay rule
//! needs to know *which* steps match, not only that one does; totp-rs's own
//! windowed `check` stops at the first (oldest) match. The `otpauth://` URI
//! is written here too: totp-rs's `to_url` leaves out `algorithm`, `digits`
//! and `period` when they are the defaults (the contract wants them spelled
//! out for apps that guess otherwise) and refuses a `:` in the account.
//!
//! A secret is 20 random bytes (RFC 4226's recommended 160 bits) from
//! aws-lc-rs's generator, the one the signing keys use.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Seconds in a step (RFC 6238's X).
pub const STEP_SECONDS: i64 = 30;
/// Digits in a code.
pub const DIGITS: usize = 6;
/// Steps of clock skew accepted either way.
pub const SKEW_STEPS: i64 = 1;
/// Bytes in a generated secret.
pub const SECRET_BYTES: usize = 20;

/// RFC 4226 requires at least 128 bits.
const MIN_SECRET_BYTES: usize = 16;
/// SHA-1's block: a longer "secret" would be hashed down by HMAC, so a blob
/// this long is more likely something else taken for a secret.
const MAX_SECRET_BYTES: usize = 64;

/// Why a secret (or recovery codes) could not be made.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TotpError {
    /// The operating system's random source failed.
    #[error("the random source failed")]
    Random,
    /// Bytes that cannot be a TOTP secret (after decryption, say).
    #[error("a TOTP secret must be 16 to 64 bytes, got {0}")]
    SecretLength(usize),
}

/// Why a presented code is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Not 6 digits, or matches none of the steps now-1, now, now+1.
    #[error("the code is not valid")]
    Invalid,
    /// Matches a step already used, or one older than it: a code is
    /// accepted once, and no older code after a newer one.
    #[error("the code was already used")]
    Reused,
}

/// A user's TOTP shared secret. Its `Debug` hides the bytes.
#[derive(Clone)]
pub struct TotpSecret {
    /// SHA-1, 6 digits, 30 s and a skew of 0 (see the module comment).
    totp: totp_rs::Totp,
}

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpSecret").finish_non_exhaustive()
    }
}

impl TotpSecret {
    /// A new secret of [`SECRET_BYTES`] random bytes.
    pub fn generate() -> Result<Self, TotpError> {
        let mut bytes = vec![0u8; SECRET_BYTES];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TotpError::Random)?;
        Self::from_bytes(bytes)
    }

    /// A secret as stored (decrypted): 16 to 64 bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, TotpError> {
        let len = bytes.len();
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&len) {
            return Err(TotpError::SecretLength(len));
        }
        let totp = totp_rs::Builder::new()
            .with_algorithm(totp_rs::Algorithm::SHA1)
            .with_digits(DIGITS as u8)
            .with_step_duration(STEP_SECONDS as u64)
            .with_skew(0)
            .with_secret(totp_rs::Secret::new(bytes.into_boxed_slice()))
            .build()
            // Its checks (digits, secret of 128 bits or more, a step) hold
            // by the constants and the length checked above.
            .map_err(|_| TotpError::SecretLength(len))?;
        Ok(Self { totp })
    }

    /// The raw bytes, to encrypt and store.
    pub fn as_bytes(&self) -> &[u8] {
        self.totp.secret().as_bytes()
    }

    /// RFC 4648 base32, upper case, no padding: what a person types into an
    /// authenticator app.
    pub fn base32(&self) -> String {
        self.totp.secret().to_base32()
    }

    /// The Key URI an authenticator app reads from a QR code:
    /// `otpauth://totp/Issuer:account?secret=...&issuer=Issuer&algorithm=SHA1&digits=6&period=30`.
    ///
    /// Issuer and account are UTF-8 percent-encoded, everything but RFC
    /// 3986's unreserved characters escaped: a space is `%20` (never `+`),
    /// `@` is `%40`, and a `:` inside either is `%3A`, so the label's one
    /// literal `:` stays the separator. (Google's Key URI format forbids a
    /// colon in either; apps that decode the label before splitting it
    /// would misplace an issuer's colon, but still read the `issuer`
    /// parameter, so ISSUER is best kept free of colons.) An empty issuer
    /// gives a label of the account alone and no `issuer` parameter.
    pub fn otpauth_uri(&self, issuer: &str, account: &str) -> String {
        let account = utf8_percent_encode(account, URI_COMPONENT);
        let secret = self.base32();
        let params = "algorithm=SHA1&digits=6&period=30";
        if issuer.is_empty() {
            format!("otpauth://totp/{account}?secret={secret}&{params}")
        } else {
            let issuer = utf8_percent_encode(issuer, URI_COMPONENT);
            format!("otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}&{params}")
        }
    }

    /// The first second of `step` (Unix time / 30); `None` before 1970.
    fn time_of_step(step: i64) -> Option<u64> {
        u64::try_from(step.checked_mul(STEP_SECONDS)?).ok()
    }
}

/// RFC 3986 unreserved characters pass; everything else is escaped.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The step of a Unix time (RFC 6238's T), rounding towards the past.
pub fn step_of(unix: i64) -> i64 {
    unix.div_euclid(STEP_SECONDS)
}

/// The code at Unix time `unix` (before 1970: the code of step 0). For
/// tests and for cross-checks against other implementations.
pub fn code_at(secret: &TotpSecret, unix: i64) -> String {
    let time = TotpSecret::time_of_step(step_of(unix).max(0)).unwrap_or(0);
    secret.totp.generate(time).to_string()
}

/// Checks `code` at `now_unix` and returns the step it matched, to be stored
/// as the user's new `last_used_step` in the same transaction that accepts
/// the code.
///
/// The code is 6 ASCII digits; whitespace around it and one space inside it
/// ("123 456", as apps show it) are allowed. It may match the step before
/// now, now, or the step after; when it matches more than one (a one in a
/// million coincidence), the oldest step not yet used wins. A match only at
/// or before `last_used_step` is [`CodeError::Reused`]: RFC 6238 § 5.2 wants
/// a code accepted once, and after a newer code no older one is taken.
/// Every step of the window is computed and compared, in constant time,
/// whatever the answer.
pub fn check_code(
    secret: &TotpSecret,
    code: &str,
    now_unix: i64,
    last_used_step: Option<i64>,
) -> Result<i64, CodeError> {
    let code = normalize(code).ok_or(CodeError::Invalid)?;
    let now = step_of(now_unix);
    let mut fresh: Option<i64> = None;
    let mut spent = false;
    for step in now - SKEW_STEPS..=now + SKEW_STEPS {
        let Some(time) = TotpSecret::time_of_step(step) else {
            continue;
        };
        // A check at exactly this step (the skew is 0): totp-rs parses the
        // code and compares it with the step's in constant time.
        let matches = secret.totp.check(&code, time).is_some();
        if !matches {
            continue;
        }
        if last_used_step.is_some_and(|last| step <= last) {
            spent = true;
        } else if fresh.is_none() {
            fresh = Some(step);
        }
    }
    match (fresh, spent) {
        (Some(step), _) => Ok(step),
        (None, true) => Err(CodeError::Reused),
        (None, false) => Err(CodeError::Invalid),
    }
}

/// Six ASCII digits out of `raw`: trimmed, with at most one space inside.
fn normalize(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let mut digits = String::with_capacity(DIGITS);
    let mut spaces = 0;
    for c in raw.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' => spaces += 1,
            _ => return None,
        }
        if digits.len() > DIGITS || spaces > 1 {
            return None;
        }
    }
    (digits.len() == DIGITS).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B's SHA-1 secret.
    fn rfc_secret() -> TotpSecret {
        TotpSecret::from_bytes(b"12345678901234567890".to_vec()).unwrap()
    }

    /// A time 5 s into its step, and that step.
    const NOW: i64 = 1_700_000_015;
    const NOW_STEP: i64 = NOW / 30;

    fn code_of_step(secret: &TotpSecret, step: i64) -> String {
        code_at(secret, step * STEP_SECONDS)
    }

    #[test]
    fn codes_match_the_rfc_6238_sha1_test_vectors() {
        let secret = rfc_secret();
        for (time, eight_digits) in [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            let six = &eight_digits[2..];
            assert_eq!(code_at(&secret, time), six, "T = {time}");
            assert_eq!(
                check_code(&secret, six, time, None),
                Ok(time / 30),
                "T = {time}"
            );
        }
    }

    #[test]
    fn a_code_one_step_early_or_late_is_accepted_and_two_steps_are_not() {
        let secret = rfc_secret();
        for offset in [-1, 0, 1] {
            let code = code_of_step(&secret, NOW_STEP + offset);
            assert_eq!(
                check_code(&secret, &code, NOW, None),
                Ok(NOW_STEP + offset),
                "offset {offset}"
            );
        }
        for offset in [-2, 2] {
            let code = code_of_step(&secret, NOW_STEP + offset);
            // A 6-digit code may coincide with a neighbour's; not these.
            for near in -1..=1 {
                assert_ne!(code, code_of_step(&secret, NOW_STEP + near));
            }
            assert_eq!(
                check_code(&secret, &code, NOW, None),
                Err(CodeError::Invalid),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn the_window_follows_the_step_boundaries() {
        let secret = rfc_secret();
        let start = NOW_STEP * 30;
        let previous = code_of_step(&secret, NOW_STEP - 1);
        // The first and last seconds of a step see the same window.
        assert!(check_code(&secret, &previous, start, None).is_ok());
        assert!(check_code(&secret, &previous, start + 29, None).is_ok());
        assert_eq!(
            check_code(&secret, &previous, start + 30, None),
            Err(CodeError::Invalid)
        );
    }

    #[test]
    fn a_code_is_accepted_once() {
        let secret = rfc_secret();
        let code = code_of_step(&secret, NOW_STEP);
        let step = check_code(&secret, &code, NOW, None).unwrap();
        assert_eq!(
            check_code(&secret, &code, NOW, Some(step)),
            Err(CodeError::Reused)
        );
        // Still refused later in its window.
        assert_eq!(
            check_code(&secret, &code, NOW + 30, Some(step)),
            Err(CodeError::Reused)
        );
        // The next step's code is fine.
        let next = code_of_step(&secret, NOW_STEP + 1);
        assert_eq!(
            check_code(&secret, &next, NOW + 30, Some(step)),
            Ok(NOW_STEP + 1)
        );
    }

    #[test]
    fn an_older_code_after_a_newer_one_is_refused() {
        let secret = rfc_secret();
        let newer = code_of_step(&secret, NOW_STEP + 1);
        let older = code_of_step(&secret, NOW_STEP - 1);
        let step = check_code(&secret, &newer, NOW, None).unwrap();
        assert_eq!(step, NOW_STEP + 1);
        assert_eq!(
            check_code(&secret, &older, NOW, Some(step)),
            Err(CodeError::Reused)
        );
        assert_eq!(
            check_code(&secret, &code_of_step(&secret, NOW_STEP), NOW, Some(step)),
            Err(CodeError::Reused)
        );
    }

    #[test]
    fn a_wrong_code_is_invalid_not_reused() {
        let secret = rfc_secret();
        let right = code_at(&secret, NOW);
        let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
        let window: Vec<String> = (-1..=1)
            .map(|o| code_of_step(&secret, NOW_STEP + o))
            .collect();
        assert!(!window.contains(&wrong));
        assert_eq!(
            check_code(&secret, &wrong, NOW, Some(NOW_STEP + 1)),
            Err(CodeError::Invalid)
        );
    }

    #[test]
    fn codes_with_spaces_around_or_one_inside_are_accepted() {
        let secret = rfc_secret();
        let code = code_at(&secret, NOW);
        let (a, b) = code.split_at(3);
        for presented in [
            code.clone(),
            format!("  {code}\n"),
            format!("{a} {b}"),
            format!("\t{a} {b} "),
            format!("{} {}", &code[..1], &code[1..]),
        ] {
            assert_eq!(
                check_code(&secret, &presented, NOW, None),
                Ok(NOW_STEP),
                "{presented:?}"
            );
        }
    }

    #[test]
    fn malformed_codes_are_invalid() {
        let secret = rfc_secret();
        let code = code_at(&secret, NOW);
        let (a, b) = code.split_at(3);
        for presented in [
            String::new(),
            "   ".to_owned(),
            code[..5].to_owned(),
            format!("{code}0"),
            format!("0{code}"),
            format!("{a}  {b}"),
            format!("{a} {} {}", &b[..1], &b[1..]),
            format!("{a}-{b}"),
            format!("{a}\t{b}"),
            format!("+{}", &code[1..]),
            format!("-{}", &code[1..]),
            "abcdef".to_owned(),
            // Arabic-Indic digits are digits, but not ASCII ones.
            "١٢٣٤٥٦".to_owned(),
            // Fullwidth digits.
            "１２３４５６".to_owned(),
        ] {
            assert_eq!(
                check_code(&secret, &presented, NOW, None),
                Err(CodeError::Invalid),
                "{presented:?}"
            );
        }
    }

    #[test]
    fn times_before_1970_do_not_panic() {
        let secret = rfc_secret();
        assert_eq!(code_at(&secret, -100), code_at(&secret, 0));
        assert_eq!(check_code(&secret, "000000", -100, None).ok(), None);
        // Step 0's code, seen from step 0: its step -1 does not exist.
        let zero = code_at(&secret, 0);
        assert_eq!(check_code(&secret, &zero, 0, None), Ok(0));
    }

    #[test]
    fn secrets_are_20_random_bytes_and_debug_hides_them() {
        let a = TotpSecret::generate().unwrap();
        let b = TotpSecret::generate().unwrap();
        assert_eq!(a.as_bytes().len(), 20);
        assert_ne!(a.as_bytes(), b.as_bytes());
        let debug = format!("{a:?}");
        assert_eq!(debug, "TotpSecret { .. }");
        assert!(!debug.contains(&a.base32()));
    }

    #[test]
    fn secrets_of_the_wrong_length_are_refused() {
        assert_eq!(
            TotpSecret::from_bytes(vec![7; 15]).unwrap_err(),
            TotpError::SecretLength(15)
        );
        assert_eq!(
            TotpSecret::from_bytes(vec![7; 65]).unwrap_err(),
            TotpError::SecretLength(65)
        );
        assert!(TotpSecret::from_bytes(vec![7; 16]).is_ok());
        assert!(TotpSecret::from_bytes(vec![7; 64]).is_ok());
    }

    #[test]
    fn base32_is_rfc_4648_upper_case_without_padding_and_round_trips() {
        let secret = rfc_secret();
        assert_eq!(secret.base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        for _ in 0..20 {
            let secret = TotpSecret::generate().unwrap();
            let text = secret.base32();
            assert_eq!(text.len(), 32, "160 bits are 32 characters, no padding");
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)),
                "{text}"
            );
            let back = totp_rs::Secret::try_from_base32(&text).unwrap();
            assert_eq!(back.as_bytes(), secret.as_bytes());
        }
        // 16 bytes do not fill a base32 block: still no '='.
        let short = TotpSecret::from_bytes(vec![0xff; 16]).unwrap();
        assert_eq!(short.base32(), "77777777777777777777777774");
    }

    #[test]
    fn the_otpauth_uri_spells_out_every_parameter() {
        let secret = rfc_secret();
        assert_eq!(
            secret.otpauth_uri("Identity", "ada"),
            "otpauth://totp/Identity:ada?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Identity&algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn the_otpauth_uri_percent_encodes_issuer_and_account() {
        let secret = rfc_secret();
        let uri = secret.otpauth_uri("Acme Corp: Staging", "zoë.o'neil+x@example.com");
        assert_eq!(
            uri,
            "otpauth://totp/Acme%20Corp%3A%20Staging:zo%C3%AB.o%27neil%2Bx%40example.com\
             ?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Acme%20Corp%3A%20Staging\
             &algorithm=SHA1&digits=6&period=30"
        );
        assert_eq!(
            secret.otpauth_uri("", "ada"),
            "otpauth://totp/ada?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &algorithm=SHA1&digits=6&period=30"
        );
    }

    #[test]
    fn the_otpauth_uri_reads_back_with_totp_rs() {
        let secret = TotpSecret::generate().unwrap();
        let uri = secret.otpauth_uri("Acme Identity", "Zoë Åberg@example.com");
        let parsed = totp_rs::Totp::from_url(&uri).unwrap();
        assert_eq!(parsed.issuer(), Some("Acme Identity"));
        assert_eq!(parsed.account_name(), "Zoë Åberg@example.com");
        assert_eq!(parsed.secret().as_bytes(), secret.as_bytes());
        assert_eq!(parsed.algorithm(), totp_rs::Algorithm::SHA1);
        assert_eq!(parsed.digits(), 6);
        assert_eq!(parsed.step(), 30);
        assert_eq!(
            parsed.generate(NOW as u64).to_string(),
            code_at(&secret, NOW)
        );

        // A colon in the account survives as %3A; totp-rs's strict parser
        // refuses such an account, its lenient one reads it back whole.
        let uri = secret.otpauth_uri("Acme", "team:ada");
        let parsed = totp_rs::Totp::from_url_unchecked(&uri).unwrap();
        assert_eq!(parsed.issuer(), Some("Acme"));
        assert_eq!(parsed.account_name(), "team:ada");
    }
}
