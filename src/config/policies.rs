//! The `policies:` and `policy_stream:` sections: content policies (block, redact, flag) over
//! the text of requests and answers, compiled once at start into one
//! [`PolicySet`](crate::policy::PolicySet), and how long a stream's text may be held back to
//! catch a match split across events.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::policy::{
    Action, Pattern, PolicyErrorKind, PolicySet, PolicySpec, Side, StreamSettings,
    DEFAULT_REPLACEMENT,
};

/// On-disk shape of one entry of `policies:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: String,
    on: Vec<RawSide>,
    regex: Option<String>,
    words: Option<Vec<String>>,
    action: RawAction,
    replacement: Option<String>,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawSide {
    Request,
    Response,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Block,
    Redact,
    Flag,
}

/// On-disk shape of `policy_stream:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicyStream {
    buffer_bytes: usize,
    flush_interval_ms: u64,
}

impl Default for RawPolicyStream {
    fn default() -> Self {
        RawPolicyStream {
            buffer_bytes: 4096,
            flush_interval_ms: 100,
        }
    }
}

/// The validated content policies.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// Every policy, compiled; `None` when none is configured (the proxy then skips the stage).
    pub set: Option<Arc<PolicySet>>,
    /// How much of a stream's text may be held back, and for how long.
    pub stream: StreamSettings,
}

/// Compiles `policies:` (in order) with `policy_stream:`.
pub(super) fn validate(
    raw: Vec<RawPolicy>,
    stream: RawPolicyStream,
) -> Result<Policies, ConfigError> {
    if stream.buffer_bytes == 0 {
        return Err(ConfigError::invalid(
            "policy_stream.buffer_bytes",
            "must be at least 1",
        ));
    }
    if stream.flush_interval_ms == 0 {
        return Err(ConfigError::invalid(
            "policy_stream.flush_interval_ms",
            "must be at least 1",
        ));
    }
    let stream = StreamSettings {
        buffer_bytes: stream.buffer_bytes,
        flush_interval: Duration::from_millis(stream.flush_interval_ms),
    };
    let mut specs = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        specs.push(p.spec(i)?);
    }
    if specs.is_empty() {
        return Ok(Policies { set: None, stream });
    }
    let set = PolicySet::compile(specs).map_err(|e| {
        let field = match e.kind {
            PolicyErrorKind::InvalidName | PolicyErrorKind::DuplicateName => "name",
            PolicyErrorKind::NoSides => "on",
            PolicyErrorKind::EmptyWords => "words",
            PolicyErrorKind::EmptyModelGlob => "models",
            PolicyErrorKind::InvalidRegex(_) | PolicyErrorKind::MatchesEmpty => "pattern",
        };
        // `policies[2] (no-keys-out): invalid regex: …` → key `policies[2].pattern`.
        let full = e.to_string();
        let why = full.split_once("): ").map_or(full.as_str(), |(_, w)| w);
        ConfigError::invalid(
            format!("policies[{}].{field}", e.index),
            format!("policy {}: {why}", e.name),
        )
    })?;
    Ok(Policies {
        set: Some(Arc::new(set)),
        stream,
    })
}

impl RawPolicy {
    fn spec(self, i: usize) -> Result<PolicySpec, ConfigError> {
        let key = |field: &str| format!("policies[{i}].{field}");
        let pattern = match (self.regex, self.words) {
            (Some(regex), None) => Pattern::Regex(regex),
            (None, Some(words)) => Pattern::Words(words),
            _ => {
                return Err(ConfigError::invalid(
                    key("regex"),
                    format!(
                        "policy {}: give exactly one of `regex` and `words`",
                        self.name
                    ),
                ))
            }
        };
        let action = match self.action {
            RawAction::Block => Action::Block,
            RawAction::Redact => Action::Redact,
            RawAction::Flag => Action::Flag,
        };
        // `replacement` is kept for `block` and `flag` too (and ignored), so switching a
        // policy's action is a one-word change.
        let mut sides = Vec::with_capacity(2);
        for side in self.on {
            let side = match side {
                RawSide::Request => Side::Request,
                RawSide::Response => Side::Response,
            };
            if !sides.contains(&side) {
                sides.push(side);
            }
        }
        Ok(PolicySpec {
            name: self.name,
            sides,
            pattern,
            action,
            replacement: self
                .replacement
                .unwrap_or_else(|| DEFAULT_REPLACEMENT.to_string()),
            models: self.models,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;
    use crate::policy::Side;

    #[test]
    fn no_policies_means_no_set() {
        let cfg = Config::from_yaml(MINIMAL).expect("valid");
        assert!(cfg.policies.set.is_none());
        assert_eq!(cfg.policies.stream.buffer_bytes, 4096);
    }

    #[test]
    fn policies_compile_with_their_sides_and_stream_settings() {
        let yaml = format!(
            "{MINIMAL}policies:\n  - {{name: no-keys-out, on: [request, response], regex: \"sk-[A-Za-z0-9]{{20,}}\", action: redact, replacement: \"[REDACTED]\", models: [\"*\"]}}\n  - {{name: words, on: [response], words: [internal.example], action: flag}}\npolicy_stream: {{buffer_bytes: 64, flush_interval_ms: 50}}\n"
        );
        let cfg = Config::from_yaml(&yaml).expect("valid");
        let set = cfg.policies.set.expect("compiled");
        assert!(set.has(Side::Request) && set.has(Side::Response));
        assert_eq!(cfg.policies.stream.buffer_bytes, 64);
        assert_eq!(cfg.policies.stream.flush_interval.as_millis(), 50);
    }

    #[test]
    fn a_bad_pattern_is_rejected_naming_the_policy() {
        let e = err(&format!(
            "{MINIMAL}policies:\n  - {{name: ok, on: [request], words: [x], action: flag}}\n  - {{name: broken-keys, on: [request], regex: \"sk-[A-Z\", action: block}}\n"
        ));
        assert!(
            e.starts_with("policies[1].pattern: policy broken-keys: invalid regex"),
            "{e}"
        );
    }

    #[test]
    fn other_bad_policies_are_rejected_with_their_key() {
        let cases = [
            (
                "{name: a, on: [request], action: flag}",
                "policies[0].regex",
            ),
            (
                "{name: a, on: [request], regex: x, words: [y], action: flag}",
                "policies[0].regex",
            ),
            (
                "{name: a, on: [], regex: x, action: flag}",
                "policies[0].on",
            ),
            ("{name: a, on: [request], regex: x, action: drop}", "action"),
        ];
        for (policy, want) in cases {
            let e = err(&format!("{MINIMAL}policies: [{policy}]\n"));
            assert!(e.contains(want), "{policy}: {e}");
        }
        let e = err(&format!("{MINIMAL}policy_stream: {{buffer_bytes: 0}}\n"));
        assert!(e.starts_with("policy_stream.buffer_bytes"), "{e}");
    }
}
