//! Opaque secrets: refresh tokens and account tokens (email verification,
//! password reset). 256 random bits, shown once, stored only as SHA-256.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// A new secret and the hash to store. Its `Debug` hides the secret.
pub struct NewSecret {
    /// What the client gets.
    pub token: String,
    /// What the database keeps.
    pub hash: Vec<u8>,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret").finish_non_exhaustive()
    }
}

/// Makes a secret from the OS's random source.
pub fn generate() -> Result<NewSecret, aws_lc_rs::error::Unspecified> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)?;
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash(&token);
    Ok(NewSecret { token, hash })
}

/// The stored form of a presented token. A high-entropy token needs no salt
/// or slow hash: SHA-256 makes a stolen table useless.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bits_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a.token).unwrap().len(), 32);
        assert_ne!(a.token, b.token);
        assert_eq!(hash(&a.token), a.hash);
    }
}
