//! Content policies: block, redact or flag what a person wrote or a model produced.
//!
//! # In the request's path
//!
//! Built once at start: [`PolicySet::compile`] turns the configured [`PolicySpec`]s into one
//! linear-time matcher per side. Then, per request:
//!
//! - request side: the glue reads the whole body and calls [`PolicySet::check_request`], which
//!   walks the JSON to the `content` of every message and returns an [`Outcome`]: blocked (answer
//!   400 with [`violation_body`]), redacted (send [`Outcome::body`] with a new `Content-Length`),
//!   flagged (count and log the names) or clean;
//! - response side, JSON answer: [`PolicySet::check_response`] on the whole body, same outcome;
//! - response side, SSE: one [`StreamPolicy`] per response ([`StreamPolicy::new`] returns `None`
//!   when no response policy applies, and the glue then skips it), fed every chunk; it holds back
//!   a bounded tail of each choice's text so a match split across events is caught, and asks to
//!   be polled by [`StreamPolicy::deadline`] so nothing is held longer than the flush interval.
//!
//! Only text is ever matched or changed: the message contents and the assistant's `content` and
//! `reasoning_content`. Keys, ids, models, tool arguments and every other field are left as they
//! are, byte for byte. Names of policies are the only thing about a match that leaves this module
//! (never the matched text), so they can go to logs, metrics and error bodies.
//!
//! - [`compile`]: specs, compiled policies, the one-pass matcher per side.
//! - [`text`]: the JSON walker for whole request and response bodies.
//! - [`stream`]: the SSE filter with its per-choice hold-back.

pub mod compile;
pub mod stream;
pub mod text;

pub use compile::{
    Action, Pattern, PolicyError, PolicyErrorKind, PolicySet, PolicySpec, Side,
    DEFAULT_REPLACEMENT, REGEX_SIZE_LIMIT_BYTES,
};
pub use stream::{StreamPolicy, StreamSettings};
pub use text::{Outcome, Unreadable};

/// The `code` of the error a blocking policy produces.
pub const VIOLATION_CODE: &str = "content_policy_violation";

/// The OpenAI-style error body for a text blocked by policy `name` on `side`:
/// `{"error":{"message":"request blocked by content policy no-keys-out","type":
/// "invalid_request_error","code":"content_policy_violation"}}`. It names the policy, never the
/// matched text. (Policy names are restricted to `[A-Za-z0-9._-]`, so nothing needs escaping.)
pub fn violation_body(side: Side, name: &str) -> Vec<u8> {
    format!(
        r#"{{"error":{{"message":"{} blocked by content policy {}","type":"invalid_request_error","code":"{VIOLATION_CODE}"}}}}"#,
        side.as_str(),
        name
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_violation_body_is_openai_shaped_and_names_the_policy() {
        let body = violation_body(Side::Request, "no-keys-out");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["error"]["code"], VIOLATION_CODE);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(
            v["error"]["message"],
            "request blocked by content policy no-keys-out"
        );
    }
}
