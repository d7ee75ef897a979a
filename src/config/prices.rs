//! The `prices:` section: what a model's tokens cost, per million prompt and completion tokens,
//! for `arkgate_cost_total`. The first entry whose `match` (a glob: `*` is any run of
//! characters) fits the model wins.

use serde::Deserialize;

use super::ConfigError;

/// On-disk shape of one `prices[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    prompt_per_million: f64,
    #[serde(default)]
    completion_per_million: f64,
}

/// One validated price.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// The glob, split at its `*`s.
    parts: Vec<String>,
    /// Per million prompt tokens.
    pub prompt_per_million: f64,
    /// Per million completion tokens.
    pub completion_per_million: f64,
}

/// The price list, in config order (empty: no cost is counted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices {
    prices: Vec<Price>,
}

impl Prices {
    /// Whether no price is configured.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The cost of a call to `model`, or None when no entry matches.
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> Option<f64> {
        let p = self.prices.iter().find(|p| glob_match(&p.parts, model))?;
        Some(
            (prompt_tokens as f64 * p.prompt_per_million
                + completion_tokens as f64 * p.completion_per_million)
                / 1e6,
        )
    }
}

/// Whether `text` fits the glob whose literal pieces (between `*`s) are `parts`.
fn glob_match(parts: &[String], text: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        return parts.first().is_some_and(|only| only == text);
    };
    let Some(mut rest) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    for part in middle {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last.as_str())
}

pub(super) fn validate(raw: Vec<RawPrice>) -> Result<Prices, ConfigError> {
    let mut prices = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        if p.pattern.is_empty() {
            return Err(ConfigError::invalid(
                format!("prices[{i}].match"),
                "must not be empty",
            ));
        }
        for (key, v) in [
            ("prompt_per_million", p.prompt_per_million),
            ("completion_per_million", p.completion_per_million),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::invalid(
                    format!("prices[{i}].{key}"),
                    "must be a number of at least 0",
                ));
            }
        }
        prices.push(Price {
            parts: p.pattern.split('*').map(str::to_owned).collect(),
            prompt_per_million: p.prompt_per_million,
            completion_per_million: p.completion_per_million,
        });
    }
    Ok(Prices { prices })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    fn parts(glob: &str) -> Vec<String> {
        glob.split('*').map(str::to_owned).collect()
    }

    #[test]
    fn globs_match_like_shell_stars() {
        assert!(glob_match(&parts("deepseek-v3*"), "deepseek-v3-250324"));
        assert!(glob_match(&parts("deepseek-v3*"), "deepseek-v3"));
        assert!(!glob_match(&parts("deepseek-v3*"), "deepseek-r1"));
        assert!(glob_match(&parts("exact"), "exact"));
        assert!(!glob_match(&parts("exact"), "exactly"));
        assert!(glob_match(&parts("*"), "anything"));
        assert!(glob_match(&parts("a*b*c"), "a-b-c"));
        assert!(!glob_match(&parts("ab*ba"), "aba"));
    }

    #[test]
    fn the_first_matching_price_wins() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}prices:\n  - {{match: \"deepseek-v3*\", prompt_per_million: 2.0, completion_per_million: 8.0}}\n  - {{match: \"*\", prompt_per_million: 1.0}}\n"
        ))
        .expect("valid");
        assert_eq!(
            c.prices.cost("deepseek-v3-1", 1_000_000, 500_000),
            Some(6.0)
        );
        assert_eq!(c.prices.cost("other", 2_000_000, 9), Some(2.0));
        assert!(Config::from_yaml(MINIMAL).expect("valid").prices.is_empty());
        let e = err(&format!(
            "{MINIMAL}prices: [{{match: x, prompt_per_million: -1}}]\n"
        ));
        assert_eq!(
            e,
            "prices[0].prompt_per_million: must be a number of at least 0"
        );
    }
}
