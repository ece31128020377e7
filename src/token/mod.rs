//! Tokens: signing keys in `KEYS_DIR`, access tokens (JWT), and opaque
//! secrets (refresh and account tokens).

pub mod apikey;
pub mod jwt;
pub mod keys;
pub mod opaque;

pub use jwt::{AccessClaims, TokenIssuer};
pub use keys::KeyStore;
