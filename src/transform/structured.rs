//! Structured-output requests (`response_format: {"type": "json_schema", ...}`) for models that
//! cannot take them.
//!
//! Agent frameworks (the openai SDK's `beta.chat.completions.parse`, openai-agents with a Pydantic
//! output type) ask for a JSON Schema. ARK (DeepSeek) rejects `json_schema` and knows only `text`
//! and `json_object`; its JSON mode also needs the word "JSON" in the prompt or it may answer blank.
//! So the *downgrade* turns the request into JSON mode and hands the model the schema in a system
//! message.
//!
//! # In the request's path
//!
//! Built once at start: a [`Policy`] says, per model, which [`Mode`] applies. If
//! [`Policy::inspects_bodies`] is false, the proxy never looks at bodies as JSON. Otherwise, for a
//! candidate request it reads the whole body (bounded by the body limit) and:
//!
//! 1. [`mentions_json_schema`]: a memchr scan of the raw bytes; a body without `json_schema` is
//!    never parsed;
//! 2. [`inspect`]: parses the top level once, borrowing every value, and yields the `model`;
//! 3. [`Policy::mode_for`] picks the mode; for [`Mode::Downgrade`], [`Inspection::downgrade`]
//!    returns the new body, or a [`Skip`] saying why the body goes upstream untouched.
//!
//! The rewrite touches only `response_format` and the `messages` array itself: every other
//! top-level value and every existing message is copied byte for byte (numbers such as `0.70`,
//! key order, escapes, whitespace inside values), so user text is never rewritten.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use memchr::memmem;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What to do with structured-output requests for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The configured byte rules apply (the legacy behaviour).
    Bytes,
    /// `json_schema` becomes `json_object` plus a system message carrying the schema.
    Downgrade,
    /// Forwarded untouched: the model supports `json_schema` natively.
    Passthrough,
}

impl Mode {
    /// The name used in the config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Bytes => "bytes",
            Mode::Downgrade => "downgrade",
            Mode::Passthrough => "passthrough",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = ParseModeError;

    /// Accepts exactly `bytes`, `downgrade` or `passthrough`.
    fn from_str(name: &str) -> Result<Mode, ParseModeError> {
        match name {
            "bytes" => Ok(Mode::Bytes),
            "downgrade" => Ok(Mode::Downgrade),
            "passthrough" => Ok(Mode::Passthrough),
            _ => Err(ParseModeError(name.to_owned())),
        }
    }
}

/// A structured-output mode name that is not one of the allowed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseModeError(String);

impl fmt::Display for ParseModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown structured-output mode {:?}: expected one of bytes, downgrade, passthrough",
            self.0
        )
    }
}

impl std::error::Error for ParseModeError {}

/// Per-model structured-output policy: an ordered list of (glob, mode), first match wins, else the
/// default. Built once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    default: Mode,
    models: Vec<(String, Mode)>,
    inspects_bodies: bool,
}

impl Policy {
    /// `models` pairs a [`glob_match`] pattern with the mode for the models it matches, in
    /// priority order.
    pub fn new(default: Mode, models: Vec<(String, Mode)>) -> Policy {
        let inspects_bodies =
            default != Mode::Bytes || models.iter().any(|(_, mode)| *mode != Mode::Bytes);
        Policy {
            default,
            models,
            inspects_bodies,
        }
    }

    /// The mode of the first pattern matching `model`; the default when none does or when the
    /// request names no model (`None`).
    pub fn mode_for(&self, model: Option<&str>) -> Mode {
        let Some(model) = model else {
            return self.default;
        };
        self.models
            .iter()
            .find(|(pattern, _)| glob_match(pattern, model))
            .map_or(self.default, |(_, mode)| *mode)
    }

    /// False when every mode is [`Mode::Bytes`]: the proxy then never needs to look at request
    /// bodies as JSON.
    pub fn inspects_bodies(&self) -> bool {
        self.inspects_bodies
    }

    /// True when some model has its own rule, so the request's `model` decides the mode.
    pub fn has_model_rules(&self) -> bool {
        !self.models.is_empty()
    }

    /// True when some request may end up in [`Mode::Bytes`] (default or a model rule).
    pub fn has_bytes_mode(&self) -> bool {
        self.default == Mode::Bytes || self.models.iter().any(|(_, mode)| *mode == Mode::Bytes)
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (including none),
/// `?` exactly one character, and everything else itself. Case-sensitive; no allocation.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (mut pattern, mut text) = (pattern, text);
    // After a mismatch, retry from just past the last `*`, letting it swallow one more character.
    let mut retry: Option<(&str, &str)> = None;
    loop {
        let mut rest = pattern.chars();
        match (rest.next(), text.chars().next()) {
            (Some('*'), _) => {
                pattern = rest.as_str();
                retry = Some((pattern, text));
            }
            (Some(want), Some(got)) if want == '?' || want == got => {
                pattern = rest.as_str();
                text = &text[got.len_utf8()..];
            }
            (None, None) => return true,
            _ => {
                let Some((after_star, swallowed)) = retry else {
                    return false;
                };
                let mut swallowed = swallowed.chars();
                if swallowed.next().is_none() {
                    return false;
                }
                pattern = after_star;
                text = swallowed.as_str();
                retry = Some((pattern, text));
            }
        }
    }
}

/// Cheap pre-check on the raw body: does it contain `json_schema` anywhere? A body that does not
/// needs no parsing. (A request spelling the type with escapes, `json\u005fschema`, is missed and
/// goes upstream untouched; no client does that.)
pub fn mentions_json_schema(body: &[u8]) -> bool {
    static FINDER: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new("json_schema"));
    FINDER.find(body).is_some()
}

/// Why a body was left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `response_format` is absent, or its `type` is not `json_schema`.
    NoJsonSchema,
    /// The body is not a JSON object (invalid JSON, another type, trailing bytes).
    InvalidJson,
    /// Ambiguous or malformed: duplicate keys at the top level or in `response_format`, or a
    /// `json_schema` request whose `json_schema` is missing or not an object, whose `schema` is
    /// missing or neither an object nor a boolean, or whose `messages` is missing or not an array.
    UnexpectedShape,
}

impl Skip {
    /// A stable snake_case name, for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Skip::NoJsonSchema => "no_json_schema",
            Skip::InvalidJson => "invalid_json",
            Skip::UnexpectedShape => "unexpected_shape",
        }
    }
}

/// One request body, parsed at the top level only: every value still borrows the body's bytes.
///
/// [`inspect`] succeeds for any JSON object without duplicate keys, whether or not it asks for a
/// schema, so the proxy always learns the model; [`Inspection::downgrade`] then decides whether
/// there is anything to rewrite.
#[derive(Debug)]
pub struct Inspection<'a> {
    /// The request's `model`, when it is a string (borrowed unless it contained escapes).
    pub model: Option<Cow<'a, str>>,
    members: Vec<Member<'a>>,
    body_len: usize,
}

/// One `"key": value` pair of a JSON object, both exactly as they appeared.
#[derive(Debug)]
struct Member<'a> {
    key: &'a RawValue,
    /// The key with its escapes resolved, for lookups and duplicate checks.
    name: Cow<'a, str>,
    value: &'a RawValue,
}

/// Parses the top level of a request body once.
///
/// Errors: [`Skip::InvalidJson`] when the body is not a JSON object, [`Skip::UnexpectedShape`]
/// when a top-level key appears twice.
pub fn inspect(body: &[u8]) -> Result<Inspection<'_>, Skip> {
    let members = parse_object(body)?;
    let model = member(&members, "model").and_then(json_str);
    Ok(Inspection {
        model,
        members,
        body_len: body.len(),
    })
}

impl Inspection<'_> {
    /// The body with its `json_schema` response format downgraded: `response_format` becomes
    /// exactly `{"type":"json_object"}` and a system message carrying the schema is inserted after
    /// the leading run of `system`/`developer` messages. Everything else is copied as it was; the
    /// top level and the `messages` array are written compactly, in the original order.
    pub fn downgrade(&self) -> Result<Vec<u8>, Skip> {
        let format = self.member("response_format").ok_or(Skip::NoJsonSchema)?;
        let spec = schema_request(format)?;
        let messages: Vec<&RawValue> = self
            .member("messages")
            .and_then(|messages| serde_json::from_str(messages.get()).ok())
            .ok_or(Skip::UnexpectedShape)?;
        let at = messages.iter().take_while(|m| is_instruction(m)).count();
        let instruction = spec.instruction_message();

        let mut out = Vec::with_capacity(self.body_len + instruction.len());
        out.push(b'{');
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(member.key.get().as_bytes());
            out.push(b':');
            match &*member.name {
                "response_format" => out.extend_from_slice(br#"{"type":"json_object"}"#),
                "messages" => {
                    out.push(b'[');
                    let (before, after) = messages.split_at(at);
                    let instruction = instruction.as_str();
                    let all = before.iter().map(|m| m.get());
                    let all = all
                        .chain([instruction])
                        .chain(after.iter().map(|m| m.get()));
                    for (j, message) in all.enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(message.as_bytes());
                    }
                    out.push(b']');
                }
                _ => out.extend_from_slice(member.value.get().as_bytes()),
            }
        }
        out.push(b'}');
        Ok(out)
    }

    fn member(&self, name: &str) -> Option<&RawValue> {
        member(&self.members, name)
    }
}

/// [`inspect`] then [`Inspection::downgrade`], whatever the model.
pub fn downgrade(body: &[u8]) -> Result<Vec<u8>, Skip> {
    inspect(body)?.downgrade()
}

/// What a `json_schema` response format asks for.
#[derive(Deserialize)]
struct SchemaRequest<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(default)]
    strict: Option<bool>,
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
}

impl SchemaRequest<'_> {
    /// The system message, serialized: the instruction ends with the compact schema on its own
    /// line, and says "JSON", which DeepSeek's JSON mode requires.
    fn instruction_message(&self) -> String {
        let mut content = String::from(
            "Respond with exactly one JSON object that matches the JSON Schema below, and nothing \
             else: no text before or after it, no Markdown code fences.\n",
        );
        if let Some(name) = &self.name {
            content.push_str("Schema name: ");
            content.push_str(name);
            content.push('\n');
        }
        if let Some(description) = &self.description {
            content.push_str("Schema description: ");
            content.push_str(description);
            content.push('\n');
        }
        content.push_str(if self.strict == Some(true) {
            "Strict: yes. Follow the schema exactly: include every required property, add no \
             property it does not allow, and use the types and values it gives.\n"
        } else {
            "Strict: no. Follow the schema as closely as you can.\n"
        });
        content.push_str("JSON Schema:\n");
        if let Some(schema) = self.schema {
            push_compact(&mut content, schema.get());
        }
        let content = serde_json::to_string(&content).expect("a string always serializes");
        format!(r#"{{"role":"system","content":{content}}}"#)
    }
}

/// Reads a `response_format` value: the schema request when its type is `json_schema`.
fn schema_request(format: &RawValue) -> Result<SchemaRequest<'_>, Skip> {
    let members = match parse_object(format.get().as_bytes()) {
        Ok(members) => members,
        Err(Skip::InvalidJson) => return Err(Skip::NoJsonSchema),
        Err(skip) => return Err(skip),
    };
    let kind = member(&members, "type").and_then(json_str);
    if kind.as_deref() != Some("json_schema") {
        return Err(Skip::NoJsonSchema);
    }
    let spec = member(&members, "json_schema").ok_or(Skip::UnexpectedShape)?;
    // Fails on a non-object, a field of the wrong type, or a duplicate field.
    let spec: SchemaRequest<'_> =
        serde_json::from_str(spec.get()).map_err(|_| Skip::UnexpectedShape)?;
    match spec.schema.map(|schema| schema.get().as_bytes().first()) {
        Some(Some(b'{' | b't' | b'f')) => Ok(spec),
        _ => Err(Skip::UnexpectedShape),
    }
}

/// Whether a message belongs to the caller's leading instructions (role `system` or `developer`).
fn is_instruction(message: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Role<'a> {
        #[serde(borrow, default)]
        role: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<Role<'_>>(message.get())
        .is_ok_and(|m| matches!(m.role.as_deref(), Some("system" | "developer")))
}

/// Parses one JSON object into its members, in order, keys and values left raw.
fn parse_object(json: &[u8]) -> Result<Vec<Member<'_>>, Skip> {
    let Members(members) = serde_json::from_slice(json).map_err(|_| Skip::InvalidJson)?;
    let members = members
        .into_iter()
        .map(|(key, value)| {
            let name = json_str(key).ok_or(Skip::InvalidJson)?;
            Ok(Member { key, name, value })
        })
        .collect::<Result<Vec<_>, Skip>>()?;

    let mut names: Vec<&str> = members.iter().map(|m| &*m.name).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(Skip::UnexpectedShape);
    }
    Ok(members)
}

fn member<'a>(members: &[Member<'a>], name: &str) -> Option<&'a RawValue> {
    members.iter().find(|m| m.name == name).map(|m| m.value)
}

/// The string a raw JSON value holds, or `None` when it is not a string.
fn json_str(value: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    serde_json::from_str::<Text<'_>>(value.get())
        .ok()
        .map(|Text(text)| text)
}

/// The members of a JSON object, in order, keys and values borrowed raw. Duplicates are kept, so
/// the caller can reject them.
struct Members<'a>(Vec<(&'a RawValue, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Appends valid JSON without the whitespace between its tokens; strings and numbers unchanged.
fn push_compact(out: &mut String, json: &str) {
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
            in_string = c == '"';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const SCHEMA: &str = r##"{"type":"object","properties":{"answer":{"$ref":"#/$defs/Answer"}},"required":["answer"],"additionalProperties":false,"$defs":{"Answer":{"type":"object","properties":{"text":{"type":"string"},"score":{"type":"number"}},"required":["text","score"],"additionalProperties":false}}}"##;

    /// As openai-agents-python sends it for an agent with a Pydantic `output_type`.
    fn agents_body() -> String {
        format!(
            r#"{{"messages":[{{"content":"You are a careful grader.","role":"system"}},{{"role":"user","content":"Grade this essay."}}],"model":"deepseek-v3-250324","response_format":{{"type":"json_schema","json_schema":{{"name":"final_output","strict":true,"schema":{SCHEMA}}}}},"stream":false,"temperature":0.70,"top_p":1e0}}"#
        )
    }

    /// As the openai SDK's `beta.chat.completions.stream` sends it, with tools.
    fn streaming_body() -> String {
        format!(
            r#"{{"messages":[{{"role":"developer","content":"Be terse."}},{{"role":"system","content":"Caf\u00e9 rules apply."}},{{"role":"user","content":"Score it."}}],"model":"deepseek-v3-250324","response_format":{{"type":"json_schema","json_schema":{{"schema":{SCHEMA},"name":"Grade","description":"A grade for one essay.","strict":true}}}},"stream":true,"stream_options":{{"include_usage":true}},"temperature":0.70,"tools":[{{"type":"function","function":{{"name":"lookup","strict":true,"parameters":{{"type":"object","properties":{{"q":{{"type":"string"}}}},"required":["q"],"additionalProperties":false}}}}}}],"max_tokens":1e2}}"#
        )
    }

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("output is valid JSON")
    }

    fn downgraded(body: &str) -> Value {
        parse(&downgrade(body.as_bytes()).expect("body is downgraded"))
    }

    fn instruction(output: &Value, at: usize) -> String {
        let message = &output["messages"][at];
        assert_eq!(message["role"], "system");
        assert_eq!(message.as_object().map(|m| m.len()), Some(2));
        message["content"]
            .as_str()
            .expect("plain string content")
            .to_owned()
    }

    /// The schema carried by an instruction: its last line.
    fn carried_schema(instruction: &str) -> Value {
        let (_, schema) = instruction
            .rsplit_once('\n')
            .expect("schema on its own line");
        serde_json::from_str(schema).expect("schema is JSON")
    }

    #[test]
    fn response_format_becomes_exactly_json_object() {
        let out = downgrade(agents_body().as_bytes()).expect("downgraded");
        let text = String::from_utf8(out.clone()).expect("utf-8");
        assert!(text.contains(r#""response_format":{"type":"json_object"}"#));
        assert_eq!(
            parse(&out)["response_format"],
            json!({"type": "json_object"})
        );
    }

    #[test]
    fn schema_travels_unchanged_in_a_system_message_after_the_callers_system_prompt() {
        let out = downgraded(&agents_body());
        let messages = out["messages"].as_array().expect("array");
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0]["content"], "You are a careful grader.");
        let text = instruction(&out, 1);
        assert_eq!(carried_schema(&text), parse(SCHEMA.as_bytes()));
        assert!(text.contains(SCHEMA), "schema is copied compactly, as sent");
        assert_eq!(messages[2]["role"], "user");
    }

    #[test]
    fn instruction_says_json_names_the_schema_and_says_it_is_strict() {
        let text = instruction(&downgraded(&agents_body()), 1);
        assert!(text.contains("JSON"));
        assert!(text.contains("exactly one JSON object"));
        assert!(text.contains("Schema name: final_output"));
        assert!(text.contains("Strict: yes"));
        assert!(!text.contains("Schema description"));
    }

    #[test]
    fn instruction_includes_the_description_when_present() {
        let text = instruction(&downgraded(&streaming_body()), 2);
        assert!(text.contains("Schema name: Grade"));
        assert!(text.contains("Schema description: A grade for one essay."));
    }

    #[test]
    fn non_strict_schema_is_marked_not_strict() {
        let body = agents_body().replace(r#""strict":true"#, r#""strict":false"#);
        let text = instruction(&downgraded(&body), 1);
        assert!(text.contains("Strict: no"));
        let body = agents_body().replace(r#""strict":true,"#, "");
        let text = instruction(&downgraded(&body), 1);
        assert!(text.contains("Strict: no"));
    }

    #[test]
    fn pretty_printed_schema_is_carried_compactly() {
        // SCHEMA has no `,` or `:` inside its strings.
        let pretty = SCHEMA.replace(',', ",\n\t ").replace(':', " : ");
        let body = agents_body().replace(SCHEMA, &pretty);
        let text = instruction(&downgraded(&body), 1);
        assert!(text.ends_with(SCHEMA));
    }

    #[test]
    fn other_fields_stay_byte_identical_and_in_order() {
        for body in [agents_body(), streaming_body()] {
            let out = downgrade(body.as_bytes()).expect("downgraded");
            let text = std::str::from_utf8(&out).expect("utf-8");
            for raw in [
                r#""temperature":0.70"#,
                r#""top_p":1e0"#,
                r#""max_tokens":1e2"#,
                r#""stream":true,"stream_options":{"include_usage":true}"#,
                r#""model":"deepseek-v3-250324""#,
                r#""tools":[{"type":"function","function":{"name":"lookup""#,
            ] {
                assert_eq!(body.contains(raw), text.contains(raw), "{raw}");
            }

            let (mut before, after) = (parse(body.as_bytes()), parse(&out));
            before["response_format"] = json!({"type": "json_object"});
            before["messages"] = after["messages"].clone();
            assert_eq!(before, after);
            let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
            let key_order = |s: &str| {
                let mut found: Vec<_> = keys(&after)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|k| s.find(&format!("\"{k}\":")).map(|at| (at, k)))
                    .collect();
                found.sort();
                found.into_iter().map(|(_, k)| k).collect::<Vec<_>>()
            };
            assert_eq!(key_order(&body), key_order(text));
        }
    }

    #[test]
    fn existing_messages_stay_byte_identical() {
        let body = streaming_body();
        let out = downgrade(body.as_bytes()).expect("downgraded");
        let text = std::str::from_utf8(&out).expect("utf-8");
        for raw in [
            r#"{"role":"developer","content":"Be terse."}"#,
            r#"{"role":"system","content":"Caf\u00e9 rules apply."}"#,
            r#"{"role":"user","content":"Score it."}"#,
        ] {
            assert!(body.contains(raw));
            assert!(text.contains(raw), "{raw}");
        }
    }

    #[test]
    fn instruction_follows_leading_developer_and_system_messages() {
        let out = downgraded(&streaming_body());
        let roles: Vec<_> = out["messages"]
            .as_array()
            .expect("array")
            .iter()
            .map(|m| m["role"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(roles, ["developer", "system", "system", "user"]);
        assert!(instruction(&out, 2).contains("JSON Schema"));
    }

    #[test]
    fn instruction_goes_first_when_there_is_no_system_message() {
        let body = agents_body().replace(
            r#"{"content":"You are a careful grader.","role":"system"},"#,
            "",
        );
        let out = downgraded(&body);
        assert_eq!(out["messages"].as_array().map(Vec::len), Some(2));
        assert!(instruction(&out, 0).contains("JSON"));
        assert_eq!(out["messages"][1]["role"], "user");
    }

    #[test]
    fn only_the_leading_run_of_system_messages_counts() {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}},{{"role":"system","content":"late"}}],"response_format":{{"type":"json_schema","json_schema":{{"name":"x","schema":{SCHEMA}}}}}}}"#
        );
        let out = downgraded(&body);
        assert!(instruction(&out, 0).contains("JSON"));
        assert_eq!(out["messages"][2]["content"], "late");
    }

    #[test]
    fn empty_messages_get_just_the_instruction() {
        let body = r#"{"messages":[],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":true}}}"#;
        let out = downgraded(body);
        assert_eq!(out["messages"].as_array().map(Vec::len), Some(1));
        assert!(instruction(&out, 0).ends_with("\ntrue"));
    }

    #[test]
    fn user_text_mentioning_json_schema_survives() {
        let user = r#"{"role":"user","content":"Explain \"json_schema\" vs json_object, then use response_format json_schema."}"#;
        let body = agents_body().replace(r#"{"role":"user","content":"Grade this essay."}"#, user);
        let out = downgrade(body.as_bytes()).expect("downgraded");
        assert!(std::str::from_utf8(&out).expect("utf-8").contains(user));
    }

    #[test]
    fn user_text_mentioning_json_schema_alone_is_not_a_schema_request() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"what is json_schema?"}]}"#;
        assert!(mentions_json_schema(body.as_bytes()));
        assert_eq!(downgrade(body.as_bytes()), Err(Skip::NoJsonSchema));
    }

    #[test]
    fn output_is_compact_at_the_top_level() {
        let body = agents_body()
            .replace(r#","model":"#, ",\n  \"model\" :  ")
            .replace(r#"{"messages":"#, "{ \"messages\":");
        let out = downgrade(body.as_bytes()).expect("downgraded");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert!(text.starts_with(r#"{"messages":[{"content":"#));
        assert!(text.contains(r#"],"model":"deepseek-v3-250324","#));
    }

    #[test]
    fn json_object_text_and_absent_formats_are_not_schema_requests() {
        for format in [
            r#","response_format":{"type":"json_object"}"#,
            r#","response_format":{"type":"text"}"#,
            r#","response_format":null"#,
            r#","response_format":"json_schema""#,
            r#","response_format":{"json_schema":{"schema":{}}}"#,
            "",
        ] {
            let body = format!(r#"{{"model":"m","messages":[]{format}}}"#);
            assert_eq!(
                downgrade(body.as_bytes()),
                Err(Skip::NoJsonSchema),
                "{body}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_invalid_json() {
        let truncated = agents_body();
        let truncated = &truncated[..truncated.len() - 1];
        for body in [
            "",
            "not json",
            "[1,2]",
            r#""json_schema""#,
            "null",
            truncated,
            r#"{"model":"m"} trailing"#,
            r#"{"model":"m"}{}"#,
        ] {
            assert_eq!(
                downgrade(body.as_bytes()).err(),
                Some(Skip::InvalidJson),
                "{body}"
            );
        }
        assert_eq!(downgrade(b"{\"a\":\"\xff\"}"), Err(Skip::InvalidJson));
    }

    #[test]
    fn malformed_schema_requests_are_unexpected_shapes() {
        let format = |json_schema: &str| {
            format!(
                r#"{{"model":"m","messages":[],"response_format":{{"type":"json_schema"{json_schema}}}}}"#
            )
        };
        for body in [
            format(""),
            format(r#","json_schema":null"#),
            format(r#","json_schema":"final_output""#),
            format(r#","json_schema":{"name":"x"}"#),
            format(r#","json_schema":{"name":"x","schema":"object"}"#),
            format(r#","json_schema":{"name":"x","schema":[]}"#),
            format(r#","json_schema":{"name":"x","schema":null}"#),
            format(r#","json_schema":{"name":7,"schema":{}}"#),
            format(r#","json_schema":{"name":"x","strict":"yes","schema":{}}"#),
            format(r#","json_schema":{"name":"x","schema":{},"schema":{}}"#),
            format(r#","json_schema":{"schema":{}},"json_schema":{"schema":{}}"#),
            r#"{"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}"#.into(),
            r#"{"messages":{},"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}"#.into(),
            r#"{"messages":[],"messages":[],"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}"#.into(),
        ] {
            assert_eq!(downgrade(body.as_bytes()), Err(Skip::UnexpectedShape), "{body}");
        }
    }

    #[test]
    fn duplicate_top_level_keys_are_rejected_even_when_escaped() {
        let body = r#"{"model":"a","mod\u0065l":"b","messages":[]}"#;
        assert_eq!(inspect(body.as_bytes()).err(), Some(Skip::UnexpectedShape));
    }

    #[test]
    fn escaped_keys_are_recognised_and_copied_as_sent() {
        let body = r#"{"response\u005fformat":{"type":"json\u005fschema","json_schema":{"schema":{}}},"m\u0065ssages":[]}"#;
        let out = downgrade(body.as_bytes()).expect("downgraded");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert!(text.starts_with(
            r#"{"response\u005fformat":{"type":"json_object"},"m\u0065ssages":[{"role":"system""#
        ));
    }

    #[test]
    fn inspection_yields_the_model_of_any_object() {
        let model = |body: &str| inspect(body.as_bytes()).map(|i| i.model.map(Cow::into_owned));
        assert_eq!(model(&agents_body()), Ok(Some("deepseek-v3-250324".into())));
        assert_eq!(
            model(r#"{"model":"deepseek-r1"}"#),
            Ok(Some("deepseek-r1".into()))
        );
        assert_eq!(model(r#"{"model":"caf\u00e9"}"#), Ok(Some("café".into())));
        assert_eq!(model(r#"{"model":7}"#), Ok(None));
        assert_eq!(model(r#"{"messages":[]}"#), Ok(None));
        assert_eq!(model("[]"), Err(Skip::InvalidJson));
    }

    #[test]
    fn model_is_borrowed_from_the_body() {
        let body = agents_body();
        let inspection = inspect(body.as_bytes()).expect("object");
        assert!(matches!(inspection.model, Some(Cow::Borrowed(_))));
        assert_eq!(inspection.downgrade(), downgrade(body.as_bytes()));
    }

    #[test]
    fn deeply_nested_values_are_copied_without_recursing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = format!(
            r#"{{"messages":[],"extra":{deep},"response_format":{{"type":"json_schema","json_schema":{{"schema":{{"default":{deep}}}}}}}}}"#
        );
        let out = downgrade(body.as_bytes()).expect("downgraded");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert!(text.contains(&format!(r#","extra":{deep},"#)));
    }

    #[test]
    fn skip_names_are_stable() {
        assert_eq!(Skip::NoJsonSchema.as_str(), "no_json_schema");
        assert_eq!(Skip::InvalidJson.as_str(), "invalid_json");
        assert_eq!(Skip::UnexpectedShape.as_str(), "unexpected_shape");
    }

    #[test]
    fn glob_matches_stars_question_marks_and_literals() {
        let cases = [
            ("deepseek-v3-*", "deepseek-v3-250324", true),
            ("deepseek-v3-*", "deepseek-v3-", true),
            ("deepseek-v3-*", "deepseek-r1-250528", false),
            ("*", "anything", true),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("x", "", false),
            ("deepseek-r?", "deepseek-r1", true),
            ("deepseek-r?", "deepseek-r", false),
            ("deepseek-r?", "deepseek-r10", false),
            ("?", "é", true),
            ("caf?", "café", true),
            ("doubao-seed-1.6", "doubao-seed-1.6", true),
            ("doubao-seed-1.6", "doubao-seed-1x6", false),
            ("Deepseek-*", "deepseek-v3", false),
            ("*-thinking-*", "doubao-seed-1-6-thinking-250715", true),
            ("*a*b*c", "xaxbxbxc", true),
            ("*a*b*c", "xaxbxbxcx", false),
            ("a*", "ba", false),
            ("**", "", true),
            ("*?", "", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern, text),
                expected,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn policy_takes_the_first_matching_pattern_else_the_default() {
        let policy = Policy::new(
            Mode::Bytes,
            vec![
                ("deepseek-v3-250324".into(), Mode::Passthrough),
                ("deepseek-*".into(), Mode::Downgrade),
                ("deepseek-v3-*".into(), Mode::Passthrough),
            ],
        );
        assert_eq!(
            policy.mode_for(Some("deepseek-v3-250324")),
            Mode::Passthrough
        );
        assert_eq!(policy.mode_for(Some("deepseek-v3-1")), Mode::Downgrade);
        assert_eq!(policy.mode_for(Some("doubao-1.5-pro")), Mode::Bytes);
        assert_eq!(policy.mode_for(None), Mode::Bytes);
        assert!(policy.inspects_bodies());
    }

    #[test]
    fn policy_inspects_bodies_unless_every_mode_is_bytes() {
        let glob = |mode| vec![("deepseek-*".to_owned(), mode)];
        assert!(!Policy::new(Mode::Bytes, vec![]).inspects_bodies());
        assert!(!Policy::new(Mode::Bytes, glob(Mode::Bytes)).inspects_bodies());
        assert!(Policy::new(Mode::Downgrade, vec![]).inspects_bodies());
        assert!(Policy::new(Mode::Passthrough, glob(Mode::Bytes)).inspects_bodies());
        assert!(Policy::new(Mode::Bytes, glob(Mode::Passthrough)).inspects_bodies());
    }

    #[test]
    fn modes_parse_from_their_names_and_nothing_else() {
        for mode in [Mode::Bytes, Mode::Downgrade, Mode::Passthrough] {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        for bad in ["", "Downgrade", "json_object", " bytes"] {
            let error = bad.parse::<Mode>().expect_err("rejected").to_string();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
            assert!(error.contains("bytes, downgrade, passthrough"), "{error}");
        }
    }

    #[test]
    fn pre_check_finds_json_schema_anywhere_in_the_bytes() {
        assert!(mentions_json_schema(agents_body().as_bytes()));
        assert!(mentions_json_schema(b"json_schema"));
        assert!(!mentions_json_schema(b""));
        assert!(!mentions_json_schema(
            br#"{"response_format":{"type":"json_object"}}"#
        ));
        assert!(!mentions_json_schema(b"json_schem"));
        assert!(!mentions_json_schema(b"JSON_SCHEMA"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = mentions_json_schema(&body);
            let _ = downgrade(&body);
        }

        #[test]
        fn truncated_and_corrupted_bodies_never_panic(
            cut in 0usize..2000,
            at in 0usize..2000,
            byte in any::<u8>(),
        ) {
            let body = streaming_body().into_bytes();
            let cut = cut.min(body.len());
            if let Ok(out) = downgrade(&body[..cut]) {
                parse(&out);
            }
            let mut corrupted = body.clone();
            let at = at % corrupted.len();
            corrupted[at] = byte;
            if let Ok(out) = downgrade(&corrupted) {
                parse(&out);
            }
        }

        #[test]
        fn glob_never_panics_and_star_matches_everything(
            pattern in "[a-c*?é]{0,8}",
            text in "[a-cé]{0,8}",
        ) {
            let _ = glob_match(&pattern, &text);
            prop_assert!(glob_match("*", &text));
            prop_assert!(glob_match(&text, &text));
        }
    }
}
