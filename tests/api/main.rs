//! End-to-end tests: the real server on 127.0.0.1:0, a fresh PostgreSQL
//! database per test (cloned from a migrated template on one embedded test
//! cluster), called through the generated clients. Logs show only when
//! `TEST_LOG` is set.

// `pub` in a private module is how a test binary shares its helpers between
// modules (and how `examples/verify_tokens/verifier.rs`, included here,
// offers its API); nothing here is reachable from outside anyway.
#![allow(unreachable_pub)]

mod helpers;

mod access_log;
mod accounts;
mod api_keys;
mod auth;
mod authz;
mod changes;
mod changes_cli;
mod changes_keys;
mod changes_list;
mod changes_order;
mod changes_watch;
mod cli;
mod envoy;
mod examples;
mod faults;
mod groups;
mod hardening;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod migrations;
mod operations;
mod passwords;
mod postgres_tls;
mod properties;
mod restore;
mod sentry;
mod server;
mod sessions;
mod statements;
mod tls;
mod totp;
mod traces;
mod users;
mod verify_cache;
