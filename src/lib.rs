//! arkgate: an edge proxy for OpenAI-compatible LLM APIs (Volcengine ARK), built on Pingora.
//!
//! It forwards every request to the configured upstream base URL, rewrites request and response
//! bodies by byte rules while they stream, or hands the model a `json_schema` in a system message
//! (see [`structured`]), and answers failures with OpenAI-style JSON errors.
//!
//! # Layout
//! - [`config`]: the YAML file's shape and its validation into a typed, ready-to-run `Config`.
//! - [`server`]: builds the Pingora server and its services from a `Config`.
//! - [`lifecycle`]: the per-server drain signal and the watcher that sets it.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`).
//! - [`clients`]: client keys (looked up by SHA-256 in constant time), the upstream key file,
//!   and the `arkgate key` command.
//! - [`downstream`]: client connections around the proxy: first-request deadline, h2c sniffing,
//!   and the deferred cleanup that makes graceful upgrades lossless.
//! - [`proxy`]: the `ProxyHttp` implementation, hook by hook along a request's path.
//! - [`transform`]: pure body transforms: the streaming byte replacer and the schema-aware
//!   `json_schema` downgrade.
//! - [`upstream`]: upstream addresses resolved off the request path, and the peers built from them.
//! - [`error`]: request-time error types and their single mapping to an HTTP status and JSON body.
//! - [`metrics`]: counters and histograms in one static, rendered for Prometheus.
//! - [`ratelimit`]: requests and tokens per minute and tokens per day: the pure arithmetic and
//!   its memory and Redis stores.
//! - [`store`]: the one Redis client shared by every feature with a Redis backend.

pub mod admin;
pub mod clients;
pub mod config;
pub mod downstream;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod transform;
pub mod upstream;

pub use config::{Config, ConfigError};
