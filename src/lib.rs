//! arkgate: an edge proxy for OpenAI-compatible LLM APIs (Volcengine ARK), built on Pingora.
//!
//! It forwards every request to the configured upstream endpoints (failing over between them),
//! rewrites request and response bodies by byte rules while they stream, or hands the model a
//! `json_schema` in a system message (see [`transform::structured`]), and answers failures with
//! OpenAI-style JSON errors.
//!
//! # Layout
//! - [`alloc`]: the binary's global allocator (mimalloc, called through its plain `malloc` where
//!   the alignment allows).
//! - [`cli`]: the command line: the gateway's run flags (handed to Pingora) and the subcommands.
//! - [`bench`]: `arkgate bench`, a load generator for chat completions endpoints (baseline
//!   mode, JSON reports, `bench compare`); only that subcommand reaches it.
//! - [`config`]: the YAML file, one file per section, validated into a typed, ready-to-run
//!   `Config`; every file check (certificates, CA bundle) in `config::files`.
//! - [`server`]: builds the Pingora server and its services from a `Config`.
//! - [`shared`]: the state every proxy app and the admin listener share (endpoints, drain
//!   signal, the Redis client), built once at start.
//! - [`lifecycle`]: the per-server drain signal and the watcher that sets it.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/upstreams`, `/cache`, `/keys`)
//!   and its token.
//! - [`cache`]: the response cache: request keys, stored entries, memory and Redis backends,
//!   in-flight coalescing, and the `arkgate cache` command.
//! - [`clients`]: client keys (looked up by SHA-256 in constant time), each key's record and
//!   today's counts, the upstream key file, and the `arkgate key` command.
//! - [`downstream`]: client connections around the proxy: first-request deadline, h2c sniffing,
//!   and the deferred cleanup that makes graceful upgrades lossless.
//! - [`proxy`]: the `ProxyHttp` implementation: each hook calls the stages (auth, client,
//!   limits, body, retry, failover, forwarded, usage, policy, rate limits, cache, observe,
//!   access log), one file each with its slice of the context.
//! - [`transform`]: pure body transforms: the streaming byte replacer, the schema-aware
//!   `json_schema` downgrade, the model sniffer.
//! - [`upstream`]: the endpoints (selection, circuit breaker, health checks, warm-up, DNS,
//!   peers), all off the request path.
//! - [`policy`]: content policies, compiled once; one pass per side over JSON bodies and SSE.
//! - [`error`]: request-time error types and their single mapping to an HTTP status and JSON body.
//! - [`metrics`]: counters, gauges and histograms, alone or in bounded labelled families, listed
//!   in one registry and rendered for Prometheus.
//! - [`ratelimit`]: requests and tokens per minute and tokens per day: the pure arithmetic and
//!   its memory and Redis stores.
//! - [`store`]: the one Redis client shared by every feature with a Redis backend.

pub mod admin;
#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod clients;
pub mod config;
pub mod downstream;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod server;
pub mod shared;
pub mod store;
pub mod transform;
pub mod upstream;

pub use config::{Config, ConfigError};

/// Installs the build's global allocator in a binary: mimalloc (the `mimalloc` feature, the
/// default) keeps Pingora's per-response 64 KiB body buffer in a thread-local page, where the
/// system allocator takes it from a shared arena (README, Performance); jemalloc when built with
/// `--no-default-features --features jemalloc`; the system allocator with neither. A macro, not a
/// static here, so that test binaries can install an allocator of their own.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[cfg(feature = "mimalloc")]
        #[global_allocator]
        static ALLOCATOR: $crate::alloc::MiMalloc = $crate::alloc::MiMalloc;

        #[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
        #[global_allocator]
        static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
    };
}
