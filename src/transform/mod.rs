//! Pure body transforms: no Pingora types, so unit and property tests and criterion benches drive
//! them directly.
//!
//! - [`rewrite`]: the streaming byte replacer behind the `rewrite:` rules.
//! - [`model`]: the request's top-level `model`, sniffed from the body as it streams.
//! - [`structured`]: the schema-aware `json_schema` downgrade (one JSON pass + per-model policy).
//! - [`usage`]: the streaming `usage` extractor for JSON and SSE responses, the request edit that
//!   asks a stream for usage, and the filter that removes the usage-only event again.

pub mod model;
pub mod rewrite;
pub mod structured;
pub mod usage;
