//! The request's `model`, read from a JSON body as it streams, without parsing the body.
//!
//! Metrics, limits and the access log label a request by model, but most bodies stream to the
//! upstream untouched: parsing each one whole would cost more than the proxying. [`ModelSniffer`]
//! runs a small tokenizer over the first [`SCAN_LIMIT_BYTES`] of the body that tracks strings,
//! escapes and nesting depth, so only a top-level `"model"` key counts (not one inside a message,
//! a tool schema or a string), and it keeps at most [`MAX_MODEL_BYTES`] of the value.

/// Bytes of a body looked at before giving up (the model comes first in practice).
pub const SCAN_LIMIT_BYTES: usize = 16 * 1024;
/// Longest model name kept; longer values are not a model name anyone configured.
pub const MAX_MODEL_BYTES: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside any string.
    Structure,
    /// Inside a string; `key` says whether it is a key at depth 1.
    InString { key: bool },
    /// After the `\` of an escape inside a string.
    Escape { key: bool },
    /// Found the top-level key `model`; waiting for `:` and the opening quote of its value.
    AfterModelKey { colon: bool },
    /// Inside the model's value.
    InValue,
    /// After a `\` inside the model's value.
    ValueEscape,
    /// Finished: found, or gave up.
    Done,
}

/// Streaming finder of the top-level `"model"` string (see the module doc).
#[derive(Debug)]
pub struct ModelSniffer {
    state: State,
    depth: u32,
    /// Whether the next string at depth 1 is a key (after `{` or `,`), not a value.
    expect_key: bool,
    /// The current key at depth 1, up to 6 bytes (`model`), or the value being read.
    buf: Vec<u8>,
    key_overflow: bool,
    seen: usize,
    model: Option<String>,
}

impl Default for ModelSniffer {
    fn default() -> Self {
        ModelSniffer::new()
    }
}

impl ModelSniffer {
    pub fn new() -> ModelSniffer {
        ModelSniffer {
            state: State::Structure,
            depth: 0,
            expect_key: false,
            buf: Vec::new(),
            key_overflow: false,
            seen: 0,
            model: None,
        }
    }

    /// True once the model was found or the scan gave up: further chunks need not be fed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The model, once found.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Feeds the next piece of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.is_done() {
            return;
        }
        let room = SCAN_LIMIT_BYTES.saturating_sub(self.seen);
        let chunk = &chunk[..chunk.len().min(room)];
        self.seen += chunk.len();
        for &b in chunk {
            self.step(b);
            if self.is_done() {
                return;
            }
        }
        if self.seen >= SCAN_LIMIT_BYTES {
            self.state = State::Done;
        }
    }

    fn step(&mut self, b: u8) {
        self.state = match self.state {
            State::Structure => self.structure(b),
            State::InString { key } => self.in_string(b, key),
            State::Escape { key } => {
                self.key_overflow |= key;
                State::InString { key }
            }
            State::AfterModelKey { colon } => match (b, colon) {
                (b':', false) => State::AfterModelKey { colon: true },
                (b'"', true) => State::InValue,
                (b' ' | b'\t' | b'\r' | b'\n', _) => State::AfterModelKey { colon },
                // Not a string value (null, a number): no model to report.
                _ => State::Done,
            },
            State::InValue => match b {
                b'"' => {
                    self.model = String::from_utf8(std::mem::take(&mut self.buf)).ok();
                    State::Done
                }
                b'\\' => State::ValueEscape,
                _ if self.buf.len() >= MAX_MODEL_BYTES => State::Done,
                _ => {
                    self.buf.push(b);
                    State::InValue
                }
            },
            // An escaped model name is not one anyone configured: give up.
            State::ValueEscape => State::Done,
            State::Done => State::Done,
        };
    }

    fn structure(&mut self, b: u8) -> State {
        match b {
            b'{' | b'[' => {
                self.depth += 1;
                self.expect_key = b == b'{' && self.depth == 1;
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    return State::Done;
                }
            }
            b',' if self.depth == 1 => self.expect_key = true,
            b'"' => {
                let key = self.depth == 1 && self.expect_key;
                self.expect_key = false;
                self.buf.clear();
                self.key_overflow = false;
                return State::InString { key };
            }
            _ => {}
        }
        State::Structure
    }

    fn in_string(&mut self, b: u8, key: bool) -> State {
        match b {
            b'"' if key && !self.key_overflow && self.buf == b"model" => {
                self.buf.clear();
                State::AfterModelKey { colon: false }
            }
            b'"' => State::Structure,
            b'\\' => State::Escape { key },
            _ if key => {
                if self.buf.len() < 5 {
                    self.buf.push(b);
                } else {
                    self.key_overflow = true;
                }
                State::InString { key }
            }
            _ => State::InString { key },
        }
    }
}

/// The top-level model of a complete body (see [`ModelSniffer`]).
pub fn sniff(body: &[u8]) -> Option<String> {
    let mut s = ModelSniffer::new();
    s.push(body);
    s.model
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_the_top_level_model() {
        assert_eq!(
            sniff(br#"{"model":"deepseek-v3","messages":[]}"#).as_deref(),
            Some("deepseek-v3")
        );
        assert_eq!(
            sniff(b"{ \"stream\" : true ,\n \"model\" :\t\"m-1\" }").as_deref(),
            Some("m-1")
        );
    }

    #[test]
    fn ignores_nested_and_quoted_models() {
        let body = br#"{"messages":[{"role":"user","content":"{\"model\":\"fake\"}"}],
            "tools":[{"model":"nested"}],"metadata":{"model":"deeper"},"model":"real"}"#;
        assert_eq!(sniff(body).as_deref(), Some("real"));
    }

    #[test]
    fn a_value_that_says_model_is_not_a_key() {
        assert_eq!(sniff(br#"{"name":"model","x":1}"#), None);
        assert_eq!(sniff(br#"{"modelx":"a","xmodel":"b"}"#), None);
    }

    #[test]
    fn non_string_or_escaped_values_give_no_model() {
        assert_eq!(sniff(br#"{"model":null}"#), None);
        assert_eq!(sniff(br#"{"model":"a\"b"}"#), None);
        assert_eq!(sniff(b"not json"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn an_overlong_model_or_a_late_key_is_not_reported() {
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
        assert_eq!(sniff(long.as_bytes()), None);
        let late = format!(
            r#"{{"pad":"{}","model":"m"}}"#,
            "x".repeat(SCAN_LIMIT_BYTES)
        );
        assert_eq!(sniff(late.as_bytes()), None);
    }

    proptest! {
        #[test]
        fn the_result_does_not_depend_on_chunking(cuts in proptest::collection::vec(0usize..80, 0..6)) {
            let body = br#"{"messages":[{"content":"\"model\": \"no\""}],"model":"deepseek-v3-250324","stream":true}"#;
            let mut s = ModelSniffer::new();
            let mut at = 0;
            let mut cuts = cuts;
            cuts.sort_unstable();
            for c in cuts {
                let c = c.min(body.len());
                if c > at {
                    s.push(&body[at..c]);
                    at = c;
                }
            }
            s.push(&body[at..]);
            prop_assert_eq!(s.model(), Some("deepseek-v3-250324"));
        }
    }
}
