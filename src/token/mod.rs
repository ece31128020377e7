//! Tokens: signing keys in `KEYS_DIR`, access tokens (JWT), refresh tokens.

pub mod jwt;
pub mod keys;
pub mod refresh;

pub use jwt::{AccessClaims, TokenIssuer};
pub use keys::KeyStore;
