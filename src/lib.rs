//! identity: a gRPC identity service. Users, groups, logins and short-lived
//! JWT access tokens, on PostgreSQL. `ARCHITECTURE.md` has the map; the
//! modules, from the outside in:

/// Start-up and lifetime: build and bind, serve, the health prober, the key
/// reloader, the hourly purge, shutdown.
pub mod app;
/// The `identity` command line, a file per family: serve; migrate,
/// createsuperuser, keys; import; changes (a client of the feed);
/// passwords (the breached list, offline).
pub mod cli;
/// Every setting, from the environment or flags, validated at start.
pub mod config;
/// All diesel code: pool, migrations, embedded cluster, schema, queries.
pub mod db;
/// Validated types and input rules; no tonic, no diesel.
pub mod domain;
/// The one error enum and its mapping to gRPC statuses.
pub mod error;
/// Transport: the gRPC services, decoding and encoding only.
pub mod grpc;
/// argon2id hashing on threads of its own behind a bounded queue, and the
/// hash formats it verifies (argon2 PHC, imported bcrypt).
pub mod hashing;
/// Plain HTTP beside gRPC: the public key and the JWKS.
pub mod http;
/// Deadlines and request-size limits, as tower layers.
pub mod limits;
/// Prometheus metrics and the layer that records calls.
pub mod metrics;
/// Code generated from `proto/`, and its descriptor set.
pub mod proto;
/// Use cases; they own transactions.
pub mod service;
/// Log output.
pub mod telemetry;
/// Signing keys, access tokens (JWT) and refresh tokens.
pub mod token;
