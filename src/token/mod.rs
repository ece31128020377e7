//! Tokens: signing keys in `KEYS_DIR`, access tokens (JWT), opaque
//! secrets (refresh and account tokens), and the key that encrypts TOTP
//! secrets at rest.

pub mod apikey;
pub mod jwt;
pub mod keys;
pub mod mfa_key;
pub mod opaque;

pub use jwt::{AccessClaims, TokenIssuer};
pub use keys::KeyStore;
pub use mfa_key::{MfaKeyError, MfaKeys};
