//! The JSON walker: finds the text inside a whole chat request or answer, runs the policies over
//! it and, when something was redacted, writes the new body.
//!
//! Texts are found by parsing only the objects on the way to them, every value kept as the raw
//! bytes it was ([`RawValue`]): in a request, the `content` of every message (a string, or the
//! `text` of each part of an array of parts); in an answer, `content` and `reasoning_content` of
//! every `choices[i].message`. Each text is evaluated on its own (a match never spans two
//! messages), with escapes resolved, so `sk-\u0061bc` is seen as `sk-abc`.
//!
//! A redacted body is the original with only the changed string literals replaced by newly
//! serialised ones: every other byte (keys, order, numbers, whitespace, other strings and their
//! escapes) is the same. A key repeated in an object is walked in each occurrence, so a second
//! `messages` cannot smuggle text past the policies.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::compile::{Active, PolicySet, Side, SidePolicies, Span};

/// What the policies decided about one body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The first `block` policy (in config order) that matched: refuse the body. When set, no
    /// redacted body is produced.
    pub blocked_by: Option<Arc<str>>,
    /// `flag` policies that matched, each once, in the order they were first seen.
    pub flagged: Vec<Arc<str>>,
    /// `redact` policies that replaced something, each once.
    pub redacted_by: Vec<Arc<str>>,
    /// The body to send instead of the original, when something was redacted.
    pub body: Option<Vec<u8>>,
}

impl Outcome {
    /// Whether some text was replaced (and [`Outcome::body`] holds the new body).
    pub fn redacted(&self) -> bool {
        self.body.is_some()
    }

    /// Whether no policy matched at all.
    pub fn is_clean(&self) -> bool {
        self.blocked_by.is_none() && self.flagged.is_empty() && self.redacted_by.is_empty()
    }
}

/// Why a body could not be walked. The policies did not run; the caller chooses whether to
/// forward it (an upstream refuses invalid JSON too) or refuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Not a JSON object (invalid JSON, invalid UTF-8, another type, trailing bytes).
    NotJsonObject,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unreadable::NotJsonObject => f.write_str("body is not a JSON object"),
        }
    }
}

impl std::error::Error for Unreadable {}

impl PolicySet {
    /// Runs the request-side policies over a chat request body (its `model` selects them).
    ///
    /// ```
    /// # use arkgate::policy::{Action, Pattern, PolicySet, PolicySpec, Side};
    /// let set = PolicySet::compile(vec![PolicySpec {
    ///     name: "no-keys-out".into(),
    ///     sides: vec![Side::Request],
    ///     pattern: Pattern::Regex("sk-[A-Za-z0-9]{20,}".into()),
    ///     action: Action::Redact,
    ///     replacement: "[REDACTED]".into(),
    ///     models: vec![],
    /// }])?;
    /// let body = br#"{"model":"m","messages":[{"role":"user","content":"my key sk-0123456789abcdefghijXYZ"}]}"#;
    /// let outcome = set.check_request(body)?;
    /// assert_eq!(
    ///     outcome.body.as_deref(),
    ///     Some(&br#"{"model":"m","messages":[{"role":"user","content":"my key [REDACTED]"}]}"#[..])
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_request(&self, body: &[u8]) -> Result<Outcome, Unreadable> {
        let Some(side) = self.side(Side::Request) else {
            return Ok(Outcome::default());
        };
        let top = members(body).ok_or(Unreadable::NotJsonObject)?;
        let model = top
            .iter()
            .rev()
            .find(|(key, _)| key == "model")
            .and_then(|(_, value)| json_str(value));
        let Some(active) = side.active(model.as_deref()) else {
            return Ok(Outcome::default());
        };
        let mut sites = Vec::new();
        for (key, value) in &top {
            if key != "messages" {
                continue;
            }
            for message in array(value) {
                for (key, value) in members(message.get().as_bytes()).unwrap_or_default() {
                    if key == "content" {
                        content_sites(value, &mut sites);
                    }
                }
            }
        }
        evaluate(side, &active, body, sites)
    }

    /// Runs the response-side policies over a JSON chat answer, for a request whose model was
    /// `model`.
    ///
    /// ```
    /// # use arkgate::policy::{Action, Pattern, PolicySet, PolicySpec, Side};
    /// let set = PolicySet::compile(vec![PolicySpec {
    ///     name: "no-internal".into(),
    ///     sides: vec![Side::Response],
    ///     pattern: Pattern::Words(vec!["internal.example".into()]),
    ///     action: Action::Block,
    ///     replacement: String::new(),
    ///     models: vec![],
    /// }])?;
    /// let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"see Internal.Example"}}]}"#;
    /// let outcome = set.check_response(Some("m"), body)?;
    /// assert_eq!(outcome.blocked_by.as_deref(), Some("no-internal"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_response(&self, model: Option<&str>, body: &[u8]) -> Result<Outcome, Unreadable> {
        let Some(side) = self.side(Side::Response) else {
            return Ok(Outcome::default());
        };
        let Some(active) = side.active(model) else {
            return Ok(Outcome::default());
        };
        let top = members(body).ok_or(Unreadable::NotJsonObject)?;
        let mut sites = Vec::new();
        for (key, value) in &top {
            if key != "choices" {
                continue;
            }
            for choice in array(value) {
                for (key, value) in members(choice.get().as_bytes()).unwrap_or_default() {
                    if key != "message" {
                        continue;
                    }
                    for (key, value) in members(value.get().as_bytes()).unwrap_or_default() {
                        match &*key {
                            "content" => content_sites(value, &mut sites),
                            "reasoning_content" => string_site(value, &mut sites),
                            _ => {}
                        }
                    }
                }
            }
        }
        evaluate(side, &active, body, sites)
    }
}

/// One string literal of the body holding text the policies look at.
pub(crate) struct Site<'a> {
    pub(crate) literal: &'a RawValue,
    pub(crate) text: Cow<'a, str>,
}

/// Evaluates every site; on a redaction, splices the new literals into a copy of `body`.
fn evaluate(
    side: &SidePolicies,
    active: &Active,
    body: &[u8],
    sites: Vec<Site<'_>>,
) -> Result<Outcome, Unreadable> {
    let mut outcome = Outcome::default();
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut spans = Vec::new();
    for site in sites {
        let Some(hits) = side.hits(active, &site.text, 0) else {
            continue;
        };
        for &index in &hits.flags {
            note(&mut outcome.flagged, side.name(index));
        }
        if let Some(index) = hits.block {
            outcome.blocked_by = Some(Arc::clone(side.name(index)));
            return Ok(outcome);
        }
        if hits.redacts.is_empty() {
            continue;
        }
        side.redact_spans(&hits.redacts, &site.text, 0, &mut spans);
        for span in &spans {
            note(&mut outcome.redacted_by, side.name(span.policy));
        }
        let mut text = String::with_capacity(site.text.len());
        render(side, &site.text, 0, &spans, &mut text);
        let literal = serde_json::to_string(&text).expect("a string always serialises");
        let range = literal_range(body, site.literal).ok_or(Unreadable::NotJsonObject)?;
        edits.push((range, literal));
    }
    if !edits.is_empty() {
        edits.sort_unstable_by_key(|(range, _)| range.start);
        outcome.body = Some(splice(body, &edits));
    }
    Ok(outcome)
}

/// Appends `name` to `names` unless it is there already.
pub(crate) fn note(names: &mut Vec<Arc<str>>, name: &Arc<str>) {
    if !names.iter().any(|n| n == name) {
        names.push(Arc::clone(name));
    }
}

/// Appends `text[from..]` to `out` with every span (sorted, merged, at or after `from`) replaced
/// by its policy's replacement.
pub(crate) fn render(
    side: &SidePolicies,
    text: &str,
    from: usize,
    spans: &[Span],
    out: &mut String,
) {
    let mut at = from;
    for span in spans {
        out.push_str(&text[at..span.start]);
        out.push_str(side.replacement(span.policy));
        at = span.end;
    }
    out.push_str(&text[at..]);
}

/// `body` with each `(range, replacement)` applied; ranges sorted and disjoint.
pub(crate) fn splice(body: &[u8], edits: &[(Range<usize>, String)]) -> Vec<u8> {
    let grown: usize = edits.iter().map(|(_, s)| s.len()).sum();
    let mut out = Vec::with_capacity(body.len() + grown);
    let mut at = 0;
    for (range, replacement) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(replacement.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// Where `literal`, parsed out of `body` (so borrowing it), lies in `body`.
pub(crate) fn literal_range(body: &[u8], literal: &RawValue) -> Option<Range<usize>> {
    let start = (literal.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(literal.get().len())?;
    (end <= body.len()).then_some(start..end)
}

/// The sites in a message's `content`: the string itself, or the string `text` of each part.
pub(crate) fn content_sites<'a>(content: &'a RawValue, sites: &mut Vec<Site<'a>>) {
    match content.get().as_bytes().first() {
        Some(b'"') => string_site(content, sites),
        Some(b'[') => {
            for part in array(content) {
                for (key, value) in members(part.get().as_bytes()).unwrap_or_default() {
                    if key == "text" {
                        string_site(value, sites);
                    }
                }
            }
        }
        _ => {}
    }
}

/// `value` as a site, when it is a string.
pub(crate) fn string_site<'a>(value: &'a RawValue, sites: &mut Vec<Site<'a>>) {
    if let Some(text) = json_str(value) {
        sites.push(Site {
            literal: value,
            text,
        });
    }
}

/// The elements of a raw JSON array (nothing when it is not one).
pub(crate) fn array(value: &RawValue) -> Vec<&RawValue> {
    if value.get().as_bytes().first() != Some(&b'[') {
        return Vec::new();
    }
    serde_json::from_str(value.get()).unwrap_or_default()
}

/// The string a raw JSON value holds (borrowed unless it had escapes), or `None`.
pub(crate) fn json_str(value: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    if value.get().as_bytes().first() != Some(&b'"') {
        return None;
    }
    serde_json::from_str::<Text<'_>>(value.get())
        .ok()
        .map(|Text(text)| text)
}

/// The members of a JSON object in order, duplicates kept, keys resolved, values raw; `None`
/// when `json` is not exactly one object.
pub(crate) fn members(json: &[u8]) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    let trimmed = json.trim_ascii_start();
    if trimmed.first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Members<'_>>(json)
        .ok()
        .map(|Members(members)| members)
}

/// Deserialises an object into its members; see [`members`].
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// An object key, borrowed from the input unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((key, value));
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::{Action, Pattern, PolicySpec, DEFAULT_REPLACEMENT};
    use serde_json::Value;

    const KEY: &str = "sk-0123456789abcdefghijKLMN";

    fn policy(name: &str, source: &str, action: Action, sides: &[Side]) -> PolicySpec {
        PolicySpec {
            name: name.into(),
            sides: sides.to_vec(),
            pattern: Pattern::Regex(source.into()),
            action,
            replacement: DEFAULT_REPLACEMENT.into(),
            models: vec![],
        }
    }

    fn set(specs: Vec<PolicySpec>) -> PolicySet {
        PolicySet::compile(specs).expect("valid policies")
    }

    fn keys(action: Action) -> PolicySet {
        set(vec![policy(
            "no-keys",
            "sk-[A-Za-z0-9]{20,}",
            action,
            &[Side::Request, Side::Response],
        )])
    }

    fn request(content: &str) -> Vec<u8> {
        format!(
            r#"{{"model":"doubao-pro","temperature":0.70,"messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":{}}}]}}"#,
            serde_json::to_string(content).expect("string")
        )
        .into_bytes()
    }

    fn answer(content: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"chatcmpl-1","model":"doubao-pro","choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}],"usage":{{"total_tokens":9}}}}"#,
            serde_json::to_string(content).expect("string")
        )
        .into_bytes()
    }

    /// The body parsed, for comparing structure.
    fn parsed(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("valid JSON")
    }

    #[test]
    fn request_block_names_the_policy_and_produces_no_body() {
        let outcome = keys(Action::Block)
            .check_request(&request(&format!("use {KEY}")))
            .expect("readable");
        assert_eq!(outcome.blocked_by.as_deref(), Some("no-keys"));
        assert_eq!(outcome.body, None);
    }

    #[test]
    fn request_redact_changes_only_the_matched_string() {
        let body = request(&format!("use {KEY} now"));
        let outcome = keys(Action::Redact).check_request(&body).expect("readable");
        assert_eq!(outcome.redacted_by.len(), 1);
        let new = outcome.body.expect("redacted");
        let want = String::from_utf8(body.clone())
            .expect("utf-8")
            .replace(KEY, "[REDACTED]");
        assert_eq!(String::from_utf8(new).expect("utf-8"), want);
    }

    #[test]
    fn request_flag_forwards_untouched() {
        let outcome = keys(Action::Flag)
            .check_request(&request(&format!("use {KEY}")))
            .expect("readable");
        assert_eq!(outcome.flagged.len(), 1);
        assert_eq!(outcome.flagged[0].as_ref(), "no-keys");
        assert_eq!(outcome.body, None);
        assert_eq!(outcome.blocked_by, None);
    }

    #[test]
    fn a_clean_request_is_clean() {
        let outcome = keys(Action::Block)
            .check_request(&request("hello"))
            .expect("readable");
        assert!(outcome.is_clean());
        assert!(!outcome.redacted());
    }

    #[test]
    fn response_actions_apply_to_message_content_and_reasoning() {
        let body = answer(&format!("here: {KEY}"));
        let blocked = keys(Action::Block)
            .check_response(Some("doubao-pro"), &body)
            .expect("readable");
        assert_eq!(blocked.blocked_by.as_deref(), Some("no-keys"));

        let flagged = keys(Action::Flag)
            .check_response(Some("doubao-pro"), &body)
            .expect("readable");
        assert_eq!(flagged.flagged.len(), 1);
        assert_eq!(flagged.body, None);

        let redacted = keys(Action::Redact)
            .check_response(Some("doubao-pro"), &body)
            .expect("readable");
        let mut want = parsed(&body);
        want["choices"][0]["message"]["content"] = "here: [REDACTED]".into();
        assert_eq!(parsed(&redacted.body.expect("redacted")), want);

        let reasoning = format!(
            r#"{{"choices":[{{"message":{{"role":"assistant","content":"ok","reasoning_content":"thinking {KEY}"}}}}]}}"#
        );
        let outcome = keys(Action::Redact)
            .check_response(None, reasoning.as_bytes())
            .expect("readable");
        assert_eq!(
            parsed(&outcome.body.expect("redacted"))["choices"][0]["message"]["reasoning_content"],
            "thinking [REDACTED]"
        );
    }

    #[test]
    fn text_parts_are_matched_and_other_parts_left_alone() {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"https://x/{KEY}"}}}},{{"type":"text","text":"a {KEY}"}},{{"type":"text","text":"b"}}]}}]}}"#
        );
        let outcome = keys(Action::Redact)
            .check_request(body.as_bytes())
            .expect("readable");
        let new = String::from_utf8(outcome.body.expect("redacted")).expect("utf-8");
        let want = body.replacen(&format!("a {KEY}"), "a [REDACTED]", 1);
        assert_eq!(new, want);
    }

    #[test]
    fn only_message_content_is_matched() {
        let body = format!(
            r#"{{"model":"{KEY}","user":"{KEY}","messages":[{{"role":"assistant","content":null,"tool_calls":[{{"id":"call_1","type":"function","function":{{"name":"f","arguments":"{{\"key\":\"{KEY}\"}}"}}}}]}},{{"role":"tool","tool_call_id":"{KEY}","content":"fine"}}],"tools":[{{"type":"function","function":{{"name":"{KEY}","description":"{KEY}"}}}}]}}"#
        );
        let outcome = keys(Action::Block)
            .check_request(body.as_bytes())
            .expect("readable");
        assert!(outcome.is_clean(), "{outcome:?}");

        let answer = format!(
            r#"{{"id":"{KEY}","model":"{KEY}","choices":[{{"index":0,"message":{{"role":"assistant","content":null,"tool_calls":[{{"id":"{KEY}","function":{{"name":"f","arguments":"{KEY}"}}}}]}}}}]}}"#
        );
        let outcome = keys(Action::Block)
            .check_response(Some("m"), answer.as_bytes())
            .expect("readable");
        assert!(outcome.is_clean(), "{outcome:?}");
    }

    #[test]
    fn escaped_text_is_matched_as_it_reads_and_every_other_byte_is_kept() {
        // `\u0073k-` reads `sk-`; the other message keeps its own escapes and spacing.
        let body = br#"{ "model" : "m", "n": 1.50, "messages" : [ {"role":"user","content":"k\u00e9y: \u0073k-0123456789abcdefghijKLMN!"}, {"role":"user","content":"caf\u00e9 \"q\""} ] }"#;
        let outcome = keys(Action::Redact).check_request(body).expect("readable");
        let new = String::from_utf8(outcome.body.expect("redacted")).expect("utf-8");
        assert_eq!(
            new,
            r#"{ "model" : "m", "n": 1.50, "messages" : [ {"role":"user","content":"kéy: [REDACTED]!"}, {"role":"user","content":"caf\u00e9 \"q\""} ] }"#
        );
    }

    #[test]
    fn a_repeated_messages_key_is_walked_too() {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"messages":[{{"role":"user","content":"{KEY}"}}]}}"#
        );
        let outcome = keys(Action::Block)
            .check_request(body.as_bytes())
            .expect("readable");
        assert_eq!(outcome.blocked_by.as_deref(), Some("no-keys"));
    }

    #[test]
    fn block_wins_over_redact_and_flag_and_flags_are_listed_once() {
        let set = set(vec![
            policy("flag-a", "alpha", Action::Flag, &[Side::Request]),
            policy("redact-b", "beta", Action::Redact, &[Side::Request]),
            policy("block-c", "gamma", Action::Block, &[Side::Request]),
        ]);
        let body =
            br#"{"messages":[{"content":"alpha beta"},{"content":"alpha"},{"content":"gamma"}]}"#;
        let outcome = set.check_request(body).expect("readable");
        assert_eq!(outcome.blocked_by.as_deref(), Some("block-c"));
        assert_eq!(outcome.flagged.len(), 1);
        assert_eq!(outcome.body, None);

        let body = br#"{"messages":[{"content":"alpha beta"},{"content":"alpha beta"}]}"#;
        let outcome = set.check_request(body).expect("readable");
        assert_eq!(outcome.flagged.len(), 1);
        assert_eq!(outcome.redacted_by.len(), 1);
        assert_eq!(
            outcome.body.as_deref(),
            Some(
                &br#"{"messages":[{"content":"alpha [REDACTED]"},{"content":"alpha [REDACTED]"}]}"#
                    [..]
            )
        );
    }

    #[test]
    fn model_globs_select_request_policies_from_the_body() {
        let set = set(vec![PolicySpec {
            models: vec!["deepseek-*".into()],
            ..policy(
                "ds",
                "secret",
                Action::Block,
                &[Side::Request, Side::Response],
            )
        }]);
        let ds = br#"{"model":"deepseek-v3","messages":[{"content":"secret"}]}"#;
        let other = br#"{"model":"doubao-pro","messages":[{"content":"secret"}]}"#;
        assert!(set
            .check_request(ds)
            .expect("readable")
            .blocked_by
            .is_some());
        assert!(set.check_request(other).expect("readable").is_clean());
        let body = answer("secret");
        assert!(set
            .check_response(Some("deepseek-r1"), &body)
            .expect("readable")
            .blocked_by
            .is_some());
        assert!(set
            .check_response(Some("doubao-pro"), &body)
            .expect("readable")
            .is_clean());
    }

    #[test]
    fn a_side_without_policies_does_not_parse_the_body() {
        let response_only = set(vec![policy("r", "x", Action::Block, &[Side::Response])]);
        assert_eq!(
            response_only.check_request(b"not json"),
            Ok(Outcome::default())
        );
        assert_eq!(
            keys(Action::Block).check_request(b"not json"),
            Err(Unreadable::NotJsonObject)
        );
        assert_eq!(
            keys(Action::Block).check_response(None, b"[1]"),
            Err(Unreadable::NotJsonObject)
        );
    }

    #[test]
    fn a_match_never_spans_two_messages() {
        let set = set(vec![policy("ab", "ab", Action::Block, &[Side::Request])]);
        let body = br#"{"messages":[{"content":"xa"},{"content":"bx"}]}"#;
        assert!(set.check_request(body).expect("readable").is_clean());
    }
}
