//! The `rewrite:` section: byte rules for request and/or response bodies, compiled into one
//! [`RuleSet`] per direction.
//!
//! This file owns rule validation: it checks what only the configuration knows (directions,
//! and a rule that an earlier one in the same direction would always beat), and maps the one
//! thing [`RuleSet::new`] itself refuses (an empty `find`) to the rule's `rewrite[i]` key.

use serde::Deserialize;

use super::ConfigError;
use crate::transform::rewrite::{RuleError, RuleSet};

/// On-disk shape of `rewrite:`. Absent (or empty, `rewrite:` with nothing after it), it is the
/// one rule `json_schema → json_object` on both sides; `rewrite: []` turns rewriting off.
#[derive(Debug, Deserialize)]
#[serde(from = "Option<Vec<RawRule>>")]
pub(super) struct RawRewrite(Vec<RawRule>);

impl From<Option<Vec<RawRule>>> for RawRewrite {
    fn from(rules: Option<Vec<RawRule>>) -> Self {
        rules.map_or_else(RawRewrite::default, RawRewrite)
    }
}

impl Default for RawRewrite {
    fn default() -> Self {
        RawRewrite(vec![RawRule {
            find: "json_schema".into(),
            replace: "json_object".into(),
            on: Directions::default(),
        }])
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    find: String,
    replace: String,
    #[serde(default)]
    on: Directions,
}

/// The body directions a rule applies to; absent, both.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
struct Directions(Vec<Direction>);

impl Default for Directions {
    fn default() -> Self {
        Directions(vec![Direction::Request, Direction::Response])
    }
}

impl Directions {
    fn contains(&self, d: Direction) -> bool {
        self.0.contains(&d)
    }

    fn overlaps(&self, other: &Directions) -> bool {
        self.0.iter().any(|d| other.contains(*d))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Request,
    Response,
}

/// The compiled rules: one set for request bodies, one for response bodies.
pub(super) struct Rules {
    pub(super) request: RuleSet,
    pub(super) response: RuleSet,
}

impl RawRewrite {
    pub(super) fn validate(self) -> Result<Rules, ConfigError> {
        let rules = self.0;
        if let Some(i) = rules.iter().position(|r| r.on.0.is_empty()) {
            return Err(ConfigError::invalid(
                format!("rewrite[{i}].on"),
                "must name request, response or both",
            ));
        }
        let request = compile(&rules, Direction::Request)?;
        let response = compile(&rules, Direction::Response)?;
        // Every `find` is non-empty now (RuleSet::new refused empty ones), so a prefix match
        // means the earlier rule really wins at the same place.
        for (i, r) in rules.iter().enumerate() {
            let shadowing = rules[..i].iter().position(|earlier| {
                earlier.on.overlaps(&r.on) && r.find.starts_with(&earlier.find)
            });
            if let Some(j) = shadowing {
                return Err(ConfigError::invalid(
                    format!("rewrite[{i}].find"),
                    format!(
                        "can never match: rewrite[{j}] (`{}`) matches at the same place first",
                        rules[j].find
                    ),
                ));
            }
        }
        Ok(Rules { request, response })
    }
}

/// The rules for one direction, in order, as a [`RuleSet`]; its errors name `rewrite[i]`.
fn compile(rules: &[RawRule], direction: Direction) -> Result<RuleSet, ConfigError> {
    let (origin, pairs): (Vec<usize>, Vec<_>) = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.on.contains(direction))
        .map(|(i, r)| {
            (
                i,
                (r.find.as_bytes().to_vec(), r.replace.as_bytes().to_vec()),
            )
        })
        .unzip();
    RuleSet::new(pairs).map_err(|e| match e {
        RuleError::EmptyFind { index } => ConfigError::invalid(
            format!("rewrite[{}].find", origin[index]),
            "must not be empty",
        ),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{err, MINIMAL};
    use crate::config::Config;

    #[test]
    fn absent_rewrite_is_the_json_schema_rule_both_ways() {
        let c = Config::from_yaml(MINIMAL).expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
        assert_eq!(
            c.request_rules.replace_all(b"\"json_schema\"").as_ref(),
            b"\"json_object\""
        );
    }

    #[test]
    fn null_rewrite_is_the_default_rule_as_when_absent() {
        let c = Config::from_yaml(&format!("{MINIMAL}rewrite:\n")).expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
    }

    #[test]
    fn empty_find_is_rejected() {
        let e = err(&format!("{MINIMAL}rewrite: [{{find: \"\", replace: x}}]\n"));
        assert_eq!(e, "rewrite[0].find: must not be empty");
    }

    #[test]
    fn empty_find_names_its_place_in_the_whole_list() {
        let e = err(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [request]}}\n  - {{find: \"\", replace: x, on: [response]}}\n"
        ));
        assert_eq!(e, "rewrite[1].find: must not be empty");
    }

    #[test]
    fn empty_directions_are_rejected() {
        let e = err(&format!(
            "{MINIMAL}rewrite: [{{find: a, replace: b, on: []}}]\n"
        ));
        assert_eq!(e, "rewrite[0].on: must name request, response or both");
    }

    #[test]
    fn shadowed_rule_is_rejected_with_its_index() {
        let e = err(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [response]}}\n  - {{find: json, replace: x, on: [request]}}\n  - {{find: json_schema, replace: y}}\n"
        ));
        assert_eq!(
            e,
            "rewrite[2].find: can never match: rewrite[1] (`json`) matches at the same place first"
        );
    }

    #[test]
    fn repeated_find_in_one_direction_is_rejected_as_shadowed() {
        let e = err(&format!(
            "{MINIMAL}rewrite:\n  - {{find: json, replace: a}}\n  - {{find: json, replace: b, on: [response]}}\n"
        ));
        assert_eq!(
            e,
            "rewrite[1].find: can never match: rewrite[0] (`json`) matches at the same place first"
        );
    }

    #[test]
    fn same_find_in_other_directions_is_allowed() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [request]}}\n  - {{find: a, replace: c, on: [response]}}\n"
        ))
        .expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
    }

    #[test]
    fn rules_split_by_direction() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}rewrite:\n  - {{find: a, replace: b, on: [request]}}\n  - {{find: c, replace: dd, on: [response]}}\n"
        ))
        .expect("valid");
        assert_eq!(c.request_rules.len(), 1);
        assert_eq!(c.response_rules.len(), 1);
        assert!(!c.request_rules.changes_length());
        assert!(c.response_rules.changes_length());
    }

    #[test]
    fn empty_rewrite_list_disables_rules() {
        let c = Config::from_yaml(&format!("{MINIMAL}rewrite: []\n")).expect("valid");
        assert!(c.request_rules.is_empty());
        assert!(c.response_rules.is_empty());
    }
}
