//! Token `usage` from OpenAI-compatible responses, and the edits that make streamed chat
//! completions report it.
//!
//! Token metrics, per-minute token limits and daily budgets all need the upstream's
//! `{"prompt_tokens":N,"completion_tokens":M,"total_tokens":T}`. Three pure pieces, no Pingora
//! types, each fed by the proxy as bytes pass:
//!
//! - [`UsageExtractor`] reads the response body chunk by chunk and yields the [`Usage`]. It also
//!   reports, per chunk, whether the stream's first data event or its `[DONE]` ended in it
//!   ([`Progress`]), which is what time-to-first-token needs.
//! - [`ensure_include_usage`] turns a streamed request (`"stream": true`) into one that asks for
//!   usage (`stream_options.include_usage: true`), editing only the bytes it must.
//! - [`UsageChunkFilter`] removes the usage-only event (`"choices": []` with a `usage` object)
//!   from an SSE stream, for a client that had not asked for it; the extractor, fed the same
//!   chunks before the filter, still sees it.
//!
//! # JSON bodies: a top-level scan, not a tail window
//!
//! A JSON answer may be megabytes long and `usage` may appear inside it as text (a model asked
//! about the API writes `"usage": {...}` in `choices[0].message.content`). The extractor therefore
//! does not search for the key: it runs a small lexer over every byte that tracks nesting depth
//! and whether it is inside a string (string bodies are skipped with `memchr2` for `"` and `\`,
//! so content text costs about one `memchr` pass). Only a key at depth 1 of the top-level object
//! can be `usage`, and only that key's value is copied aside (at most [`MAX_USAGE_BYTES`]).
//!
//! Guarantees: for any syntactically valid JSON object, whatever its key order, whitespace or
//! escapes and however it is cut into chunks, the result is exactly its top-level `usage`, read
//! by [`Usage::from_json`]; text or nested objects elsewhere never count. Memory is constant:
//! a few bytes of lexer state plus the captured value. Limits: a key spelled with escapes
//! (`"us\u0061ge"`) is not recognised; a `usage` value longer than [`MAX_USAGE_BYTES`] is
//! ignored; after the top-level value closes, the rest is ignored. On invalid JSON the result is
//! best effort (never a panic).
//!
//! # SSE streams
//!
//! Events end at a blank line (`\n\n`, `\r\n\r\n`, or the two mixed); lines end with `\n` or
//! `\r\n` (a lone `\r` as line end is not supported: no provider sends it). An event's data is
//! its `data:` lines joined with `\n`; comments (`: ping`) and other fields are ignored. The
//! usage is the last non-null top-level `usage` of any data event before `data: [DONE]`, which
//! covers OpenAI's final `"choices": []` chunk, providers that put it in the last content chunk,
//! and DeepSeek/ARK's `"usage": null` on every earlier chunk. Events whose bytes contain no
//! `"usage"` are never parsed as JSON. An event that is not finished when a chunk ends is kept
//! until its blank line arrives, up to [`MAX_EVENT_BYTES`]; a longer event is not kept (its usage,
//! if any, is lost; it still counts as a data event). That is the one case where the cuts
//! matter: an event longer than the limit that arrives within one chunk is still read whole.
//! Otherwise the result, and the filter's output, do not depend on how the stream was cut.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::{memchr, memchr2, memmem, memrchr};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest SSE event kept while it arrives over several chunks. Usage-only events are a few
/// hundred bytes; a longer event is passed on (by the filter) or skipped (by the extractor)
/// without being kept.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Longest top-level `usage` value the JSON scan copies aside (with its details objects a real
/// one is under 400 bytes).
pub const MAX_USAGE_BYTES: usize = 4 * 1024;

/// Top-level keys longer than this are not kept while scanning (`usage` is 5 bytes).
const MAX_KEY_BYTES: usize = 8;

/// The key as it appears in the bytes of any event or body that carries usage.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// Token counts reported by the upstream for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the request (`prompt_tokens`).
    pub prompt_tokens: u64,
    /// Tokens generated (`completion_tokens`).
    pub completion_tokens: u64,
    /// `total_tokens` as reported, or the sum of the two when it is absent.
    pub total_tokens: u64,
}

impl Usage {
    /// Reads one `usage` value. `None` for `null`, for anything but an object, for an object
    /// with none of the three counts, and for a count that is not a non-negative integer (or a
    /// count given twice). A missing count is 0, except `total_tokens`, which is then the sum.
    /// Other members (`prompt_tokens_details`, ...) are ignored.
    pub fn from_json(value: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct Counts {
            prompt_tokens: Option<u64>,
            completion_tokens: Option<u64>,
            total_tokens: Option<u64>,
        }
        let counts: Option<Counts> = serde_json::from_slice(value).ok()?;
        let Counts {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        } = counts?;
        if prompt_tokens.is_none() && completion_tokens.is_none() && total_tokens.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt_tokens.unwrap_or(0), completion_tokens.unwrap_or(0));
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total_tokens.unwrap_or(prompt.saturating_add(completion)),
        })
    }
}

/// How a response body is framed, which decides how [`UsageExtractor`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// One JSON object (`application/json`).
    Json,
    /// Server-sent events (`text/event-stream`).
    EventStream,
}

impl BodyKind {
    /// The kind for a `Content-Type` value: `text/event-stream` → [`BodyKind::EventStream`],
    /// `application/json` or any `+json` type → [`BodyKind::Json`]; parameters and case are
    /// ignored. Anything else carries no usage: `None`.
    pub fn from_content_type(value: &str) -> Option<BodyKind> {
        let essence = value.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Some(BodyKind::EventStream)
        } else if essence.eq_ignore_ascii_case("application/json")
            || essence.len() > 5
                && essence.as_bytes()[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
        {
            Some(BodyKind::Json)
        } else {
            None
        }
    }
}

/// What one [`UsageExtractor::push`] saw. Each flag is true on exactly one chunk at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// This chunk completed the first data event (SSE: the first event whose data is neither
    /// empty nor `[DONE]`; JSON: the chunk is the first non-empty one). Time to first token ends
    /// here.
    pub first_data: bool,
    /// This chunk completed the stream (SSE: the `data: [DONE]` event; JSON: the top-level
    /// object closed).
    pub done: bool,
}

/// What a whole body yielded, from [`UsageExtractor::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The usage, or `None` when the body carried none (never zeros in its place).
    pub usage: Option<Usage>,
    /// Some data arrived (see [`Progress::first_data`]).
    pub saw_data: bool,
    /// The stream ended properly (see [`Progress::done`]); false for a truncated body.
    pub completed: bool,
}

/// What has been learnt from a body so far.
#[derive(Debug, Default)]
struct Findings {
    usage: Option<Usage>,
    saw_data: bool,
    done: bool,
}

/// Streaming reader of the `usage` in a response body that arrives in arbitrary chunks.
///
/// Its result never depends on how the body was cut. Memory is bounded whatever the body's
/// size: see the module doc for what is kept and the limits.
#[derive(Debug)]
pub struct UsageExtractor {
    found: Findings,
    reader: Reader,
}

#[derive(Debug)]
enum Reader {
    Json(JsonScan),
    Sse(SseEvents),
}

impl UsageExtractor {
    /// A reader for a body of `kind`, before its first chunk.
    pub fn new(kind: BodyKind) -> UsageExtractor {
        let reader = match kind {
            BodyKind::Json => Reader::Json(JsonScan::default()),
            BodyKind::EventStream => Reader::Sse(SseEvents::default()),
        };
        UsageExtractor {
            found: Findings::default(),
            reader,
        }
    }

    /// Reads one chunk and says what ended in it.
    pub fn push(&mut self, chunk: &[u8]) -> Progress {
        let mut progress = Progress::default();
        match &mut self.reader {
            Reader::Json(scan) => {
                if !chunk.is_empty() && !self.found.saw_data {
                    self.found.saw_data = true;
                    progress.first_data = true;
                }
                if scan.push(chunk, &mut self.found) {
                    self.found.done = true;
                    progress.done = true;
                }
            }
            Reader::Sse(events) => events.push(chunk, &mut self.found, &mut progress),
        }
        progress
    }

    /// The last usage read so far.
    pub fn usage(&self) -> Option<Usage> {
        self.found.usage
    }

    /// Whether the stream has ended properly so far (see [`Progress::done`]).
    pub fn completed(&self) -> bool {
        self.found.done
    }

    /// Ends the body: an SSE event left without its blank line is read as if it had one, and
    /// so is a top-level `usage` value cut short by the end of a truncated JSON body.
    pub fn finish(mut self) -> Summary {
        match &mut self.reader {
            Reader::Sse(events) => events.finish(&mut self.found),
            Reader::Json(scan) => scan.end_capture(&[], &mut self.found),
        }
        Summary {
            usage: self.found.usage,
            saw_data: self.found.saw_data,
            completed: self.found.done,
        }
    }
}

/// Lexer state for [`BodyKind::Json`]: just enough to know when a byte is a top-level key.
#[derive(Debug, Default)]
struct JsonScan {
    /// Nesting depth: 1 inside the top-level object.
    depth: u32,
    in_string: bool,
    /// The previous byte was a `\` inside a string.
    escaped: bool,
    top_is_object: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    /// The string being read is a top-level key.
    in_key: bool,
    key: [u8; MAX_KEY_BYTES],
    key_len: usize,
    /// The key being read cannot be `usage` (too long, or escaped).
    key_other: bool,
    /// The last top-level key was `usage`: its `:` starts the capture.
    usage_key: bool,
    capturing: bool,
    /// The captured value outgrew [`MAX_USAGE_BYTES`]: it will be ignored.
    capture_overflow: bool,
    capture: Vec<u8>,
    /// The top-level value has closed; the rest is ignored.
    closed: bool,
}

impl JsonScan {
    /// Scans one chunk; true when the top-level value closed in it.
    fn push(&mut self, chunk: &[u8], found: &mut Findings) -> bool {
        if self.closed {
            return false;
        }
        let mut capture_from = 0;
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                let end = memchr2(b'"', b'\\', &chunk[i..]).map(|at| i + at);
                if self.in_key {
                    self.key_bytes(&chunk[i..end.unwrap_or(chunk.len())]);
                }
                let Some(end) = end else { break };
                if chunk[end] == b'\\' {
                    self.escaped = true;
                    // An escaped key is never taken for `usage`.
                    self.key_other |= self.in_key;
                } else {
                    self.in_string = false;
                    if self.in_key {
                        self.in_key = false;
                        self.usage_key = !self.key_other && self.key[..self.key_len] == *b"usage";
                    }
                }
                i = end + 1;
                continue;
            }
            match chunk[i] {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.expect_key {
                        self.expect_key = false;
                        self.in_key = true;
                        self.key_len = 0;
                        self.key_other = false;
                    }
                }
                open @ (b'{' | b'[') => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.top_is_object = open == b'{';
                        self.expect_key = self.top_is_object;
                    }
                }
                b'}' | b']' => {
                    if self.depth == 1 {
                        self.end_capture(&chunk[capture_from..i], found);
                        self.closed = true;
                        return true;
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                b':' if self.depth == 1 && self.usage_key => {
                    self.usage_key = false;
                    self.capturing = true;
                    self.capture_overflow = false;
                    self.capture.clear();
                    capture_from = i + 1;
                }
                b',' if self.depth == 1 => {
                    self.end_capture(&chunk[capture_from..i], found);
                    self.usage_key = false;
                    self.expect_key = self.top_is_object;
                }
                _ => {}
            }
            i += 1;
        }
        if self.capturing {
            self.capture_bytes(&chunk[capture_from.min(chunk.len())..]);
        }
        false
    }

    fn key_bytes(&mut self, bytes: &[u8]) {
        if self.key_other {
            return;
        }
        match self.key.get_mut(self.key_len..self.key_len + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.key_len += bytes.len();
            }
            None => self.key_other = true,
        }
    }

    fn capture_bytes(&mut self, bytes: &[u8]) {
        if self.capture_overflow {
            return;
        }
        if self.capture.len() + bytes.len() > MAX_USAGE_BYTES {
            self.capture_overflow = true;
            self.capture = Vec::new();
        } else {
            self.capture.extend_from_slice(bytes);
        }
    }

    /// Ends the value being captured, if any, with its last bytes `rest`. A later top-level
    /// `usage` (a duplicate key) replaces an earlier one unless it is null or unreadable.
    fn end_capture(&mut self, rest: &[u8], found: &mut Findings) {
        if !self.capturing {
            return;
        }
        self.capturing = false;
        self.capture_bytes(rest);
        if !self.capture_overflow {
            if let Some(usage) = Usage::from_json(&self.capture) {
                found.usage = Some(usage);
            }
        }
    }
}

/// The last two bytes (at most) of an event that is still arriving: enough to see a blank line
/// that straddles two chunks.
#[derive(Debug, Default, Clone, Copy)]
struct Tail {
    bytes: [u8; 2],
    len: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        match data {
            [] => {}
            [byte] => {
                if self.len == 0 {
                    self.bytes[0] = *byte;
                    self.len = 1;
                } else {
                    self.bytes = [self.bytes[self.len - 1], *byte];
                    self.len = 2;
                }
            }
            [.., a, b] => {
                self.bytes = [*a, *b];
                self.len = 2;
            }
        }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Offset just past the first blank line in `buf`: the end of the event that begins at 0.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = memchr(b'\n', &buf[from..]) {
        let at = from + at;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at + 2),
            Some(b'\r') if buf.get(at + 2) == Some(&b'\n') => return Some(at + 3),
            _ => from = at + 1,
        }
    }
    None
}

/// Offset in `chunk` just past the blank line that ends an event whose bytes so far end with
/// `tail` (the blank line may begin in `tail`).
fn event_end_after(tail: &[u8], chunk: &[u8]) -> Option<usize> {
    let head = &chunk[..chunk.len().min(2)];
    let mut joint = [0u8; 4];
    joint[..tail.len()].copy_from_slice(tail);
    joint[tail.len()..tail.len() + head.len()].copy_from_slice(head);
    let joint = &joint[..tail.len() + head.len()];
    for start in 0..tail.len() {
        if joint[start] != b'\n' {
            continue;
        }
        let end = match (joint.get(start + 1), joint.get(start + 2)) {
            (Some(b'\n'), _) => start + 2,
            (Some(b'\r'), Some(b'\n')) => start + 3,
            _ => continue,
        };
        if end > tail.len() {
            return Some(end - tail.len());
        }
    }
    event_end(chunk)
}

/// Offset just past the last blank line in `buf`, or 0. Every byte between the last event end
/// a forward scan finds and this offset is part of a blank line, so both split the content the
/// same way.
fn last_event_end(buf: &[u8]) -> usize {
    let mut to = buf.len();
    while let Some(at) = memrchr(b'\n', &buf[..to]) {
        let blank = (at >= 1 && buf[at - 1] == b'\n')
            || (at >= 2 && buf[at - 1] == b'\r' && buf[at - 2] == b'\n');
        if blank {
            return at + 1;
        }
        to = at;
    }
    0
}

/// The lines of an event, without their `\n` or `\r\n`.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr(b'\n', rest) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        rest = next;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

/// The value of a `data` field line, or `None` for a comment or another field.
fn data_value(line: &[u8]) -> Option<&[u8]> {
    match line.strip_prefix(b"data")? {
        [] => Some(&[]),
        [b':', value @ ..] => Some(value.strip_prefix(b" ").unwrap_or(value)),
        _ => None,
    }
}

/// An event's data: its `data:` values joined with `\n` (borrowed when there is one line), or
/// `None` when it has no `data` field.
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for value in lines(event).filter_map(data_value) {
        data = Some(match data {
            None => Cow::Borrowed(value),
            Some(previous) => {
                let mut joined = previous.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    data
}

/// Length of the blank lines an event starts with (usually 0). A removed event keeps them, so
/// where a scan put the boundary between two events does not change the output.
fn leading_blank_len(event: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match &event[at..] {
            [b'\n', ..] => at += 1,
            [b'\r', b'\n', ..] => at += 2,
            _ => return at,
        }
    }
}

fn is_done_marker(data: &[u8]) -> bool {
    data.trim_ascii() == b"[DONE]"
}

/// The two top-level members of a chunk that matter here; others are skipped unread.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    choices: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

/// A data event's top-level members, when its data is a JSON object that may hold a usage
/// object ([`may_hold_usage`]); other data is not parsed.
fn envelope(data: &[u8]) -> Option<Envelope<'_>> {
    if !may_hold_usage(data) {
        return None;
    }
    serde_json::from_slice(data).ok()
}

/// Whether some `"usage"` in `data` is followed by `:` and `{` (whitespace allowed between), as
/// a top-level usage object must be. Cheap, and false for DeepSeek/ARK's `"usage":null` on
/// every chunk, so those events are never parsed.
fn may_hold_usage(data: &[u8]) -> bool {
    key_followed_by(&USAGE_KEY, data, b"{")
}

/// Whether some occurrence of the quoted key `key` in `data` is followed by `:` and a value
/// that starts with `value` (whitespace allowed between). A cheap necessary condition for a
/// top-level member `key: value…`, checked before any parse.
fn key_followed_by(key: &memmem::Finder<'_>, data: &[u8], value: &[u8]) -> bool {
    key.find_iter(data).any(|at| {
        let rest = data[at + key.needle().len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(value))
    })
}

/// Whether an event is the usage-only chunk: its data is a JSON object whose `usage` is an
/// object and whose `choices` is `[]` or absent.
fn is_usage_only(event: &[u8]) -> bool {
    if USAGE_KEY.find(event).is_none() {
        return false;
    }
    let Some(data) = event_data(event) else {
        return false;
    };
    let Some(Envelope { choices, usage }) = envelope(&data) else {
        return false;
    };
    let empty_array = |raw: &RawValue| {
        raw.get()
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inside| inside.trim_ascii().is_empty())
    };
    usage.is_some_and(|usage| usage.get().starts_with('{')) && choices.is_none_or(empty_array)
}

impl Findings {
    /// Reads one complete event.
    fn event(&mut self, event: &[u8], progress: &mut Progress) {
        if self.done {
            return;
        }
        let Some(data) = event_data(event) else {
            return;
        };
        if is_done_marker(&data) {
            self.done = true;
            progress.done = true;
            return;
        }
        if data.trim_ascii().is_empty() {
            return;
        }
        self.data_seen(progress);
        if let Some(usage) = envelope(&data)
            .and_then(|envelope| envelope.usage)
            .and_then(|usage| Usage::from_json(usage.get().as_bytes()))
        {
            self.usage = Some(usage);
        }
    }

    fn data_seen(&mut self, progress: &mut Progress) {
        if !self.saw_data {
            self.saw_data = true;
            progress.first_data = true;
        }
    }
}

/// Event framing for the extractor: what is kept of an event still arriving.
#[derive(Debug, Default)]
struct SseEvents {
    held: Vec<u8>,
    tail: Tail,
    /// An event is under way (its bytes are in `held`, or it outgrew the limit).
    in_event: bool,
    /// The event under way outgrew [`MAX_EVENT_BYTES`] and is no longer kept.
    oversized: bool,
    /// The oversized event has a `data` field.
    oversized_data: bool,
}

impl SseEvents {
    fn push(&mut self, chunk: &[u8], found: &mut Findings, progress: &mut Progress) {
        let mut at = 0;
        if self.in_event {
            let Some(end) = event_end_after(self.tail.get(), chunk) else {
                self.hold(chunk);
                return;
            };
            self.end_held(&chunk[..end], found, progress);
            at = end;
        }
        while let Some(end) = event_end(&chunk[at..]) {
            found.event(&chunk[at..at + end], progress);
            at += end;
        }
        self.hold(&chunk[at..]);
    }

    fn hold(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.in_event = true;
        self.tail.push(bytes);
        if self.oversized {
            return;
        }
        self.held.extend_from_slice(bytes);
        if self.held.len() > MAX_EVENT_BYTES {
            self.oversized = true;
            self.oversized_data = lines(&self.held).any(|line| data_value(line).is_some());
            self.held = Vec::new();
        }
    }

    /// Completes the event under way with its last bytes `rest`.
    fn end_held(&mut self, rest: &[u8], found: &mut Findings, progress: &mut Progress) {
        if self.oversized {
            if self.oversized_data && !found.done {
                found.data_seen(progress);
            }
        } else {
            self.held.extend_from_slice(rest);
            found.event(&self.held, progress);
        }
        self.held.clear();
        self.tail = Tail::default();
        self.in_event = false;
        self.oversized = false;
        self.oversized_data = false;
    }

    fn finish(&mut self, found: &mut Findings) {
        if self.in_event {
            self.end_held(&[], found, &mut Progress::default());
        }
    }
}

/// Streaming SSE filter that removes the usage-only event (data whose
/// `usage` is an object and whose `choices` is `[]` or absent) from a chat-completion stream.
///
/// Used when the proxy added `include_usage` to a request whose client had not asked for it
/// ([`StreamUsage::Added`]). Every other event leaves byte for byte and in order, including a
/// content chunk that also carries `usage` (some providers put it there) and `"usage": null`
/// chunks. An event cut by a chunk boundary is held only until its blank line arrives (at most
/// [`MAX_EVENT_BYTES`]; a longer event is passed on as it comes, unfiltered); complete events,
/// `[DONE]` included, are never held. Nothing is allocated for a chunk without `"usage"` beyond
/// keeping the unfinished event at its end (in a buffer reused across chunks).
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    held: Vec<u8>,
    tail: Tail,
    /// The event under way outgrew [`MAX_EVENT_BYTES`]: its bytes are passed on as they come.
    passing: bool,
    removed: u64,
}

/// The bytes one [`UsageChunkFilter::push`] returns: a slice of the chunk while possible, a copy
/// once pieces are not contiguous.
struct Output<'a> {
    chunk: &'a Bytes,
    span: Option<Range<usize>>,
    copy: Option<BytesMut>,
}

impl<'a> Output<'a> {
    fn new(chunk: &'a Bytes) -> Output<'a> {
        Output {
            chunk,
            span: None,
            copy: None,
        }
    }

    /// Appends `chunk[range]`.
    fn range(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match (&mut self.copy, &mut self.span) {
            (Some(copy), _) => copy.extend_from_slice(&self.chunk[range]),
            (None, Some(span)) if span.end == range.start => span.end = range.end,
            (None, None) => self.span = Some(range),
            (None, Some(_)) => {
                let chunk = self.chunk;
                self.copied().extend_from_slice(&chunk[range]);
            }
        }
    }

    /// Appends bytes from elsewhere (an event held from earlier chunks).
    fn bytes(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.copied().extend_from_slice(bytes);
        }
    }

    /// The copy, started (with the span so far) when needed.
    fn copied(&mut self) -> &mut BytesMut {
        let chunk = self.chunk;
        let span = self.span.take();
        self.copy.get_or_insert_with(|| {
            let mut copy = BytesMut::with_capacity(chunk.len() + 4096);
            if let Some(span) = span {
                copy.extend_from_slice(&chunk[span]);
            }
            copy
        })
    }

    fn finish(self) -> Bytes {
        match (self.copy, self.span) {
            (Some(copy), _) => copy.freeze(),
            (None, Some(span)) if span.len() == self.chunk.len() => self.chunk.clone(),
            (None, Some(span)) => self.chunk.slice(span),
            (None, None) => Bytes::new(),
        }
    }
}

impl UsageChunkFilter {
    /// A filter before the stream's first chunk.
    pub fn new() -> UsageChunkFilter {
        UsageChunkFilter::default()
    }

    /// Feeds one chunk and returns the bytes ready to forward; `end` marks the stream's last
    /// chunk (which may be empty) and flushes an unfinished event (removed too if it is the
    /// usage-only one).
    ///
    /// The outputs concatenated do not depend on how the stream was cut. A chunk without
    /// `"usage"` that starts and ends on event boundaries is returned as-is (the same `Bytes`,
    /// no copy); one that ends inside an event is returned as a slice and its tail is held.
    pub fn push(&mut self, chunk: Bytes, end: bool) -> Bytes {
        let in_event = self.passing || !self.held.is_empty();
        if !in_event && USAGE_KEY.find(&chunk).is_none() {
            let keep = if end {
                chunk.len()
            } else {
                last_event_end(&chunk)
            };
            if keep == chunk.len() {
                return chunk;
            }
            let mut out = Output::new(&chunk);
            out.range(0..keep);
            self.hold(keep..chunk.len(), &mut out);
            return out.finish();
        }

        let mut out = Output::new(&chunk);
        let mut at = 0;
        if in_event {
            match event_end_after(self.tail.get(), &chunk) {
                Some(end) => {
                    if self.passing {
                        out.range(0..end);
                    } else {
                        self.held.extend_from_slice(&chunk[..end]);
                        self.emit_held(&mut out);
                    }
                    self.reset();
                    at = end;
                }
                None => {
                    self.hold(0..chunk.len(), &mut out);
                    at = chunk.len();
                }
            }
        }
        while let Some(len) = event_end(&chunk[at..]) {
            let event = at..at + len;
            if is_usage_only(&chunk[event.clone()]) {
                self.removed += 1;
                out.range(at..at + leading_blank_len(&chunk[event]));
            } else {
                out.range(event);
            }
            at += len;
        }
        self.hold(at..chunk.len(), &mut out);
        if end {
            if !self.held.is_empty() {
                self.emit_held(&mut out);
            }
            self.reset();
        }
        out.finish()
    }

    /// How many usage-only events were removed so far.
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// How many bytes are held back now (at most [`MAX_EVENT_BYTES`]).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Keeps `out.chunk[range]`, the unfinished start of an event, or passes it on when the
    /// event is too long to keep.
    fn hold(&mut self, range: Range<usize>, out: &mut Output<'_>) {
        if range.is_empty() {
            return;
        }
        let bytes = &out.chunk[range.clone()];
        self.tail.push(bytes);
        if !self.passing && self.held.len() + bytes.len() > MAX_EVENT_BYTES {
            out.bytes(&self.held);
            self.held.clear();
            self.passing = true;
        }
        if self.passing {
            out.range(range);
        } else {
            self.held.extend_from_slice(bytes);
        }
    }

    /// Forwards the held event, or only its leading blank lines when it is the usage-only one.
    fn emit_held(&mut self, out: &mut Output<'_>) {
        if is_usage_only(&self.held) {
            self.removed += 1;
            out.bytes(&self.held[..leading_blank_len(&self.held)]);
        } else {
            out.bytes(&self.held);
        }
        self.held.clear();
    }

    fn reset(&mut self) {
        self.held.clear();
        self.tail = Tail::default();
        self.passing = false;
    }
}

/// What [`ensure_include_usage`] did to a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamUsage {
    /// A streamed request that had not asked for usage: this body asks for it. The client did
    /// not ask, so its stream should go through a [`UsageChunkFilter`].
    Added(Vec<u8>),
    /// A streamed request whose `stream_options.include_usage` is already `true`: forward it
    /// as it is, usage chunk included.
    Requested,
    /// Not a streamed request (`stream` absent or not `true`): forward it as it is; the usage
    /// is in the JSON answer.
    NotStreamed,
    /// Left as it is because it cannot be edited safely: not a JSON object, a key given twice
    /// at the top level or in `stream_options`, or a `stream_options` that is neither an object
    /// nor `null`.
    Unsupported,
}

impl StreamUsage {
    /// Whether the response stream must lose its usage-only event before the client sees it.
    pub fn strips_usage_chunk(&self) -> bool {
        matches!(self, StreamUsage::Added(_))
    }
}

/// Makes a streamed chat request (`"stream": true`) ask for usage: sets
/// `stream_options.include_usage` to `true`, adding `stream_options` at the end of the object,
/// or the key at the end of `stream_options`, or replacing a `false`/`null` value.
///
/// Every other byte stays as it was (key order, whitespace, escapes, numbers): the new text is
/// spliced in at one place. Keys are compared with their escapes resolved. A body without the
/// bytes `"stream"` followed by `:` and `true` is [`StreamUsage::NotStreamed`] without being
/// parsed (a `"stream": true` inside a string only costs the parse that finds it is not one).
pub fn ensure_include_usage(body: &[u8]) -> StreamUsage {
    static STREAM_KEY: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"stream\""));
    // Most requests do not stream: no `"stream": true` anywhere means no parse at all.
    if !key_followed_by(&STREAM_KEY, body, b"true") {
        return StreamUsage::NotStreamed;
    }
    let Some(members) = object_members(body) else {
        return StreamUsage::Unsupported;
    };
    if member(&members, "stream").map(RawValue::get) != Some("true") {
        return StreamUsage::NotStreamed;
    }
    let splice = |at: Range<usize>, text: &[u8]| {
        let mut out = Vec::with_capacity(body.len() + text.len());
        out.extend_from_slice(&body[..at.start]);
        out.extend_from_slice(text);
        out.extend_from_slice(&body[at.end..]);
        StreamUsage::Added(out)
    };
    let Some(options) = member(&members, "stream_options") else {
        let last = members.last().expect("the object has a `stream` member");
        let at = span(body, last.value).end;
        return splice(at..at, br#","stream_options":{"include_usage":true}"#);
    };
    match options.get().as_bytes().first() {
        Some(b'n') => return splice(span(body, options), br#"{"include_usage":true}"#),
        Some(b'{') => {}
        _ => return StreamUsage::Unsupported,
    }
    let Some(inner) = object_members(options.get().as_bytes()) else {
        return StreamUsage::Unsupported;
    };
    match (member(&inner, "include_usage"), inner.last()) {
        (Some(flag), _) if flag.get() == "true" => StreamUsage::Requested,
        (Some(flag), _) => splice(span(body, flag), b"true"),
        (None, Some(last)) => {
            let at = span(body, last.value).end;
            splice(at..at, br#","include_usage":true"#)
        }
        (None, None) => {
            let at = span(body, options).start + 1;
            splice(at..at, br#""include_usage":true"#)
        }
    }
}

/// Where `value`, borrowed from `body`, lies in it.
fn span(body: &[u8], value: &RawValue) -> Range<usize> {
    let text = value.get();
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    debug_assert!(start + text.len() <= body.len(), "value borrowed from body");
    start..start + text.len()
}

/// One `"key": value` pair of a JSON object, borrowed as it appeared.
struct Member<'a> {
    /// The key with its escapes resolved.
    name: Cow<'a, str>,
    value: &'a RawValue,
}

/// The members of a JSON object, in order; `None` when `json` is not one or repeats a key.
fn object_members(json: &[u8]) -> Option<Vec<Member<'_>>> {
    #[derive(Deserialize)]
    struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

    let RawMembers(raw) = serde_json::from_slice(json).ok()?;
    let members = raw
        .into_iter()
        .map(|(key, value)| {
            let Key(name) = serde_json::from_str(key.get()).ok()?;
            Some(Member { name, value })
        })
        .collect::<Option<Vec<_>>>()?;
    let mut names: Vec<&str> = members.iter().map(|m| &*m.name).collect();
    names.sort_unstable();
    if names.windows(2).any(|pair| pair[0] == pair[1]) {
        return None;
    }
    Some(members)
}

fn member<'a>(members: &[Member<'a>], name: &str) -> Option<&'a RawValue> {
    members.iter().find(|m| m.name == name).map(|m| m.value)
}

/// A JSON object's members with keys and values borrowed raw, duplicates kept.
struct RawMembers<'a>(Vec<(&'a RawValue, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawMembers<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = RawMembers<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(RawMembers(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    const USAGE: Usage = Usage {
        prompt_tokens: 19,
        completion_tokens: 10,
        total_tokens: 29,
    };

    /// A non-streamed chat completion as ARK returns it: `usage` last.
    fn json_answer(content: &str) -> String {
        format!(
            r#"{{"choices":[{{"finish_reason":"stop","index":0,"logprobs":null,"message":{{"content":{content},"role":"assistant"}}}}],"created":1742631811,"id":"0217426318107460cfa43dc3f3683b1de1c09624ff49085a456ac","model":"deepseek-v3-250324","service_tier":"default","object":"chat.completion","usage":{{"completion_tokens":10,"prompt_tokens":19,"total_tokens":29,"prompt_tokens_details":{{"cached_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0}}}}}}"#,
            content = serde_json::to_string(content).expect("a string serializes"),
        )
    }

    /// A text that talks about the API: a `"usage"` object inside message content.
    const TRICKY: &str = r#"The answer has "usage": {"prompt_tokens": 999, "completion_tokens": 999} and a \ backslash, "usage":{"total_tokens":1}}"#;

    fn data(json: &str) -> String {
        format!("data: {json}\n\n")
    }

    fn content_chunk(i: usize, usage: &str) -> String {
        data(&format!(
            r#"{{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"word {i} "}},"finish_reason":null}}]{usage}}}"#
        ))
    }

    /// The usage-only event OpenAI sends with `stream_options.include_usage`.
    fn usage_only_chunk() -> String {
        data(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#,
        )
    }

    /// An OpenAI-style stream: content chunks, the usage-only chunk, `[DONE]`.
    fn openai_stream(with_usage: bool) -> String {
        let mut s = String::from(": keep-alive\n\n");
        for i in 0..3 {
            s += &content_chunk(i, "");
        }
        if with_usage {
            s += &usage_only_chunk();
        }
        s + "data: [DONE]\n\n"
    }

    /// A DeepSeek/ARK-style stream: `"usage":null` on every chunk, the counts on the last.
    fn ark_stream() -> String {
        let mut s = String::new();
        for i in 0..3 {
            s += &content_chunk(i, r#","usage":null"#);
        }
        s += &data(
            r#"{"choices":[{"delta":{"content":"","role":"assistant"},"finish_reason":"stop","index":0}],"created":1,"id":"c1","model":"m","object":"chat.completion.chunk","usage":{"completion_tokens":10,"prompt_tokens":19,"total_tokens":29}}"#,
        );
        s + "data: [DONE]\n\n"
    }

    fn extract(kind: BodyKind, chunks: &[&[u8]]) -> (Summary, Vec<Progress>) {
        let mut extractor = UsageExtractor::new(kind);
        let progress = chunks.iter().map(|c| extractor.push(c)).collect();
        (extractor.finish(), progress)
    }

    fn extract_one(kind: BodyKind, body: &str) -> Option<Usage> {
        extract(kind, &[body.as_bytes()]).0.usage
    }

    fn filter_all(chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let mut filter = UsageChunkFilter::new();
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            out.extend_from_slice(&filter.push(Bytes::copy_from_slice(chunk), end));
        }
        (out, filter.removed())
    }

    /// `body` cut at the given offsets (sorted, deduplicated, clamped).
    fn cut<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|&c| c % (body.len() + 1)).collect();
        at.sort_unstable();
        at.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([body.len()]) {
            pieces.push(&body[from..to]);
            from = to;
        }
        pieces
    }

    fn bytes_per_byte(body: &[u8]) -> Vec<&[u8]> {
        body.chunks(1).collect()
    }

    fn added(body: &str) -> String {
        match ensure_include_usage(body.as_bytes()) {
            StreamUsage::Added(out) => String::from_utf8(out).expect("utf-8"),
            other => panic!("not added: {other:?} for {body}"),
        }
    }

    // --- Usage ---

    #[test]
    fn usage_reads_counts_in_any_order_and_ignores_details() {
        let forms = [
            r#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}"#,
            r#"{ "total_tokens" : 29 , "completion_tokens":10,"prompt_tokens":19 }"#,
            "{\n\t\"completion_tokens\": 10,\r\n \"prompt_tokens\": 19,\n \"total_tokens\": 29,\n \"prompt_tokens_details\": {\"cached_tokens\": 3}\n}",
            r#"{"prompt_tokens":19,"completion_tokens":10}"#,
        ];
        for form in forms {
            assert_eq!(Usage::from_json(form.as_bytes()), Some(USAGE), "{form}");
        }
    }

    #[test]
    fn usage_keeps_a_reported_total_and_fills_missing_counts_with_zero() {
        assert_eq!(
            Usage::from_json(br#"{"prompt_tokens":5,"completion_tokens":1,"total_tokens":9}"#),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 1,
                total_tokens: 9
            })
        );
        assert_eq!(
            Usage::from_json(br#"{"prompt_tokens":7,"completion_tokens":null}"#),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 0,
                total_tokens: 7
            })
        );
    }

    #[test]
    fn missing_or_unreadable_usage_is_none_not_zero() {
        for value in [
            "null",
            "{}",
            r#"{"cached_tokens":3}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":1.5}"#,
            r#"{"prompt_tokens":"19"}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            "[]",
            "7",
            "",
            "{",
        ] {
            assert_eq!(Usage::from_json(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn content_types_choose_the_body_kind() {
        let kind = BodyKind::from_content_type;
        assert_eq!(kind("application/json"), Some(BodyKind::Json));
        assert_eq!(
            kind("Application/JSON; charset=utf-8"),
            Some(BodyKind::Json)
        );
        assert_eq!(kind("application/problem+json"), Some(BodyKind::Json));
        assert_eq!(kind("text/event-stream"), Some(BodyKind::EventStream));
        assert_eq!(
            kind(" text/event-stream ;charset=utf-8"),
            Some(BodyKind::EventStream)
        );
        for other in [
            "text/plain",
            "",
            "+json",
            "application/jsonx",
            "text/x+jsonp",
        ] {
            assert_eq!(kind(other), None, "{other}");
        }
    }

    // --- JSON bodies ---

    #[test]
    fn json_answer_yields_its_top_level_usage() {
        let body = json_answer("Hello!");
        let (summary, progress) = extract(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(summary.saw_data && summary.completed);
        assert_eq!(
            progress,
            [Progress {
                first_data: true,
                done: true
            }]
        );
    }

    #[test]
    fn usage_inside_message_content_is_not_taken() {
        let body = json_answer(TRICKY);
        assert!(body.contains(r#"\"usage\": {\"prompt_tokens\": 999"#));
        assert_eq!(extract_one(BodyKind::Json, &body), Some(USAGE));
        let without = body.replace(
            r#","usage":{"completion_tokens":10,"prompt_tokens":19,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}"#,
            "",
        );
        assert_ne!(without, body);
        assert_eq!(extract_one(BodyKind::Json, &without), None);
    }

    #[test]
    fn nested_usage_objects_and_string_values_are_not_taken() {
        for body in [
            r#"{"choices":[{"usage":{"prompt_tokens":1,"completion_tokens":1}}],"id":"x"}"#,
            r#"{"meta":{"usage":{"prompt_tokens":1}},"note":"usage"}"#,
            r#"{"id":"usage","usage_total":{"prompt_tokens":1}}"#,
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
            r#"{"usage":null}"#,
            r#"{"us\u0061ge":{"prompt_tokens":1}}"#,
        ] {
            assert_eq!(extract_one(BodyKind::Json, body), None, "{body}");
        }
    }

    #[test]
    fn usage_first_pretty_printed_or_beside_escapes_is_found() {
        let usage = r#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}"#;
        for body in [
            format!(r#"{{"usage":{usage},"choices":[{{"message":{{"content":"}}]"}}}}]}}"#),
            format!("{{\n  \"id\" : \"a\\\\\",\n  \"usage\" :\n {usage}\r\n}}\n"),
            format!(r#"{{"a":"\"","b":"\\","c":["{{[","\u0022"],"usage":{usage}}}"#),
            format!(r#"{{"usage":null,"usage":{usage}}}"#),
            format!(r#"{{"usage":{usage},"usage":null}}"#),
        ] {
            assert_eq!(extract_one(BodyKind::Json, &body), Some(USAGE), "{body}");
        }
    }

    #[test]
    fn content_after_the_top_level_object_is_ignored() {
        let body = r#"{"id":"a"} {"usage":{"prompt_tokens":1}}"#;
        let (summary, progress) = extract(BodyKind::Json, &[body.as_bytes()]);
        assert_eq!(summary.usage, None);
        assert!(progress[0].done);
    }

    #[test]
    fn truncated_json_keeps_what_was_read_and_is_not_completed() {
        let body = json_answer("x");
        let truncated = &body.as_bytes()[..body.len() - 1];
        let (summary, _) = extract(BodyKind::Json, &[truncated]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(!summary.completed);
        let (summary, _) = extract(BodyKind::Json, &[&body.as_bytes()[..body.len() - 40]]);
        assert_eq!(summary.usage, None);
    }

    #[test]
    fn oversized_usage_value_is_ignored() {
        let filler = "x".repeat(MAX_USAGE_BYTES);
        let body = format!(r#"{{"usage":{{"prompt_tokens":1,"note":"{filler}"}}}}"#);
        assert_eq!(extract_one(BodyKind::Json, &body), None);
        let body = format!(
            r#"{{"usage":{{"prompt_tokens":1,"note":"{}"}}}}"#,
            &filler[..100]
        );
        assert!(extract_one(BodyKind::Json, &body).is_some());
    }

    #[test]
    fn large_json_answer_is_scanned_in_constant_memory() {
        let body = json_answer(&TRICKY.repeat(40_000));
        assert!(body.len() > 5_000_000);
        let mut extractor = UsageExtractor::new(BodyKind::Json);
        for chunk in body.as_bytes().chunks(16 * 1024) {
            extractor.push(chunk);
            if let Reader::Json(scan) = &extractor.reader {
                assert!(scan.capture.capacity() <= MAX_USAGE_BYTES);
            }
        }
        assert_eq!(extractor.finish().usage, Some(USAGE));
    }

    #[test]
    fn json_first_data_and_done_fall_on_the_right_chunks() {
        let body = json_answer("hi");
        let (a, b) = body.as_bytes().split_at(10);
        let (summary, progress) = extract(BodyKind::Json, &[b"", a, b, b"\n"]);
        assert_eq!(summary.usage, Some(USAGE));
        let flags: Vec<_> = progress.iter().map(|p| (p.first_data, p.done)).collect();
        assert_eq!(
            flags,
            [(false, false), (true, false), (false, true), (false, false)]
        );
    }

    // --- SSE streams ---

    #[test]
    fn openai_usage_only_chunk_is_read() {
        let stream = openai_stream(true);
        let (summary, _) = extract(BodyKind::EventStream, &[stream.as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(summary.completed && summary.saw_data);
        assert_eq!(
            extract_one(BodyKind::EventStream, &openai_stream(false)),
            None
        );
    }

    #[test]
    fn ark_null_usage_on_every_chunk_then_the_counts_last() {
        assert_eq!(
            extract_one(BodyKind::EventStream, &ark_stream()),
            Some(USAGE)
        );
        // A null after the counts does not erase them: the last non-null usage wins.
        let stream = ark_stream().replace(
            "data: [DONE]",
            &format!(
                "{}data: [DONE]",
                content_chunk(9, r#","usage":null"#).trim_end()
            ),
        );
        assert_eq!(extract_one(BodyKind::EventStream, &stream), Some(USAGE));
    }

    #[test]
    fn the_last_non_null_usage_wins() {
        let stream = format!(
            "{}{}data: [DONE]\n\n",
            content_chunk(0, r#","usage":{"prompt_tokens":1,"completion_tokens":1}"#),
            content_chunk(1, r#","usage":{"prompt_tokens":19,"completion_tokens":10}"#)
        );
        assert_eq!(extract_one(BodyKind::EventStream, &stream), Some(USAGE));
    }

    #[test]
    fn crlf_line_endings_comments_and_other_fields_are_understood() {
        let stream = openai_stream(true).replace('\n', "\r\n").replace(
            "data: [DONE]",
            ": ping\r\nevent: done\r\nid: 7\r\nretry: 10\r\ndata: [DONE]",
        );
        assert!(stream.contains("\r\n\r\n"));
        let (summary, _) = extract(BodyKind::EventStream, &[stream.as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(summary.completed);
        // Mixed: `\n` then `\r\n` ends an event too.
        let mixed = format!("{}\n\r\ndata: [DONE]\r\n\n", usage_only_chunk().trim_end());
        let (summary, progress) = extract(BodyKind::EventStream, &[mixed.as_bytes()]);
        assert_eq!((summary.usage, progress[0].done), (Some(USAGE), true));
    }

    #[test]
    fn multi_line_data_is_joined() {
        let stream = "data: {\"choices\":[],\ndata:\"usage\":\ndata:  {\"prompt_tokens\":19,\"completion_tokens\":10}}\n\ndata:[DONE]\n\n";
        let (summary, _) = extract(BodyKind::EventStream, &[stream.as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(summary.completed);
    }

    #[test]
    fn done_split_across_chunks_is_reported_on_the_chunk_that_ends_it() {
        let stream = openai_stream(true);
        let at = stream.find("[DO").expect("done marker") + 3;
        let (head, rest) = stream.as_bytes().split_at(at);
        let (tail, last) = rest.split_at(rest.len() - 1);
        let (summary, progress) = extract(BodyKind::EventStream, &[head, tail, last]);
        assert_eq!(summary.usage, Some(USAGE));
        let done: Vec<bool> = progress.iter().map(|p| p.done).collect();
        assert_eq!(done, [false, false, true]);
    }

    #[test]
    fn first_data_ignores_comments_empty_data_and_done() {
        let (first, second) = (content_chunk(0, ""), content_chunk(1, ""));
        let chunks = [
            ": ping\n\n".as_bytes(),
            b"data:\n\n",
            b"event: x\n\n",
            &first.as_bytes()[..20],
            &first.as_bytes()[20..],
            second.as_bytes(),
        ];
        let (summary, progress) = extract(BodyKind::EventStream, &chunks);
        let first: Vec<bool> = progress.iter().map(|p| p.first_data).collect();
        assert_eq!(first, [false, false, false, false, true, false]);
        assert!(summary.saw_data && !summary.completed);
        let (summary, progress) = extract(BodyKind::EventStream, &[b"data: [DONE]\n\n"]);
        assert!(!progress[0].first_data && progress[0].done && !summary.saw_data);
    }

    #[test]
    fn events_after_done_are_ignored() {
        let stream = format!("data: [DONE]\n\n{}", usage_only_chunk());
        let (summary, progress) = extract(BodyKind::EventStream, &[stream.as_bytes()]);
        assert_eq!(summary.usage, None);
        assert!(progress[0].done);
    }

    #[test]
    fn an_unterminated_last_event_is_read_at_the_end() {
        let stream = usage_only_chunk();
        let (summary, _) = extract(BodyKind::EventStream, &[stream.trim_end().as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        let stream = format!("{stream}data: [DONE]");
        let (summary, progress) = extract(BodyKind::EventStream, &[stream.as_bytes()]);
        assert_eq!(summary.usage, Some(USAGE));
        assert!(summary.completed && !progress[0].done);
    }

    #[test]
    fn an_oversized_event_is_not_kept_but_counts_as_data() {
        let big = content_chunk(0, "").replace("word 0", &"w".repeat(MAX_EVENT_BYTES));
        let stream = format!("{big}{}data: [DONE]\n\n", usage_only_chunk());
        let mut extractor = UsageExtractor::new(BodyKind::EventStream);
        let mut firsts = 0;
        for chunk in stream.as_bytes().chunks(4096) {
            firsts += usize::from(extractor.push(chunk).first_data);
            if let Reader::Sse(events) = &extractor.reader {
                assert!(events.held.len() <= MAX_EVENT_BYTES);
            }
        }
        assert_eq!(firsts, 1);
        assert_eq!(extractor.finish().usage, Some(USAGE));
        // An oversized event that carries the usage loses it.
        let big_usage = usage_only_chunk().replace(
            "\"id\":\"c1\"",
            &format!("\"id\":\"{}\"", "i".repeat(2 * MAX_EVENT_BYTES)),
        );
        let chunks: Vec<&[u8]> = big_usage.as_bytes().chunks(1000).collect();
        assert_eq!(extract(BodyKind::EventStream, &chunks).0.usage, None);
    }

    #[test]
    fn byte_by_byte_streams_give_the_one_shot_result() {
        for stream in [
            openai_stream(true),
            ark_stream(),
            openai_stream(true).replace('\n', "\r\n"),
        ] {
            let whole = extract(BodyKind::EventStream, &[stream.as_bytes()]).0;
            let bytes = extract(BodyKind::EventStream, &bytes_per_byte(stream.as_bytes())).0;
            assert_eq!(whole, bytes);
            assert_eq!(whole.usage, Some(USAGE));
        }
        let body = json_answer(TRICKY);
        let whole = extract(BodyKind::Json, &[body.as_bytes()]).0;
        assert_eq!(
            whole,
            extract(BodyKind::Json, &bytes_per_byte(body.as_bytes())).0
        );
    }

    // --- the usage-only chunk filter ---

    #[test]
    fn only_a_usage_key_followed_by_an_object_is_worth_parsing() {
        for yes in [
            r#"{"usage":{}}"#,
            "{\"usage\" :\r\n\t{",
            // Conservative: a nested key passes too (the parse then rejects it).
            r#"{"usage":null,"x":{"usage":{}}}"#,
        ] {
            assert!(may_hold_usage(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"{"usage":null}"#,
            r#"{"usage": 5,"u":"\"usage\""}"#,
            r#"{"usage"}"#,
            r#""usage":"#,
            r#"{"usage" null {}"#,
            "",
        ] {
            assert!(!may_hold_usage(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn filter_removes_only_the_usage_only_event() {
        let (out, removed) = filter_all(&[openai_stream(true).as_bytes()]);
        assert_eq!(String::from_utf8(out).expect("utf-8"), openai_stream(false));
        assert_eq!(removed, 1);
    }

    #[test]
    fn filter_passes_usage_in_content_chunks_and_null_usage() {
        let stream = ark_stream();
        let (out, removed) = filter_all(&[stream.as_bytes()]);
        assert_eq!(out, stream.as_bytes());
        assert_eq!(removed, 0);
    }

    #[test]
    fn filter_removes_usage_only_events_without_choices_and_with_spaced_brackets() {
        let without = data(r#"{"id":"c","usage":{"prompt_tokens":1}}"#);
        let spaced = data(r#"{"choices": [ ],"usage":{"prompt_tokens":1}}"#);
        for event in [without, spaced] {
            let stream = format!("{}{event}data: [DONE]\n\n", content_chunk(0, ""));
            let (out, removed) = filter_all(&[stream.as_bytes()]);
            assert_eq!(removed, 1, "{event}");
            assert_eq!(
                out,
                format!("{}data: [DONE]\n\n", content_chunk(0, "")).as_bytes()
            );
        }
    }

    #[test]
    fn filter_passes_events_that_only_look_like_usage() {
        for event in [
            data(r#"{"choices":[],"usage":null}"#),
            data(r#"{"choices":[],"usage":"none"}"#),
            data(r#"{"choices":[],"note":"\"usage\":{}"}"#),
            data(r#"{"choices":[],"usage":{},"usage":{}}"#),
            data(r#"not json "usage":{}"#),
            ": \"usage\":{} in a comment\n\n".to_owned(),
            "event: \"usage\"\n\n".to_owned(),
        ] {
            let (out, removed) = filter_all(&[event.as_bytes()]);
            assert_eq!((out, removed), (event.clone().into_bytes(), 0), "{event}");
        }
    }

    #[test]
    fn filter_returns_a_clean_chunk_as_the_same_bytes() {
        let mut filter = UsageChunkFilter::new();
        let chunk = Bytes::from(openai_stream(false));
        let out = filter.push(chunk.clone(), false);
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(out.len(), chunk.len());
        assert_eq!(filter.held(), 0);
    }

    #[test]
    fn filter_holds_a_cut_event_until_its_blank_line_and_never_holds_done() {
        let event = content_chunk(0, "");
        let mut filter = UsageChunkFilter::new();
        let (head, rest) = event.as_bytes().split_at(30);
        let chunk = Bytes::copy_from_slice(head);
        assert!(filter.push(chunk, false).is_empty());
        assert_eq!(filter.held(), 30);
        let (middle, last) = rest.split_at(rest.len() - 1);
        assert!(filter
            .push(Bytes::copy_from_slice(middle), false)
            .is_empty());
        let out = filter.push(Bytes::copy_from_slice(last), false);
        assert_eq!(out, event.as_bytes());
        assert_eq!(filter.held(), 0);
        // A complete `[DONE]` event leaves at once, after a usage-only event in the same chunk.
        let chunk = format!("{}data: [DONE]\n\ndata: {{\"cho", usage_only_chunk());
        let out = filter.push(Bytes::from(chunk), false);
        assert_eq!(out, "data: [DONE]\n\n".as_bytes());
        assert_eq!(filter.held(), "data: {\"cho".len());
    }

    #[test]
    fn filter_end_flushes_an_unfinished_event() {
        let stream = format!("{}data: [DONE]", content_chunk(0, ""));
        let (out, _) = filter_all(&[stream.as_bytes(), b""]);
        assert_eq!(out, stream.as_bytes());
        let stream = format!("data: [DONE]\n\n{}", usage_only_chunk().trim_end());
        let (out, removed) = filter_all(&[stream.as_bytes()]);
        assert_eq!((out, removed), (b"data: [DONE]\n\n".to_vec(), 1));
    }

    #[test]
    fn filter_handles_crlf_and_usage_key_split_across_chunks() {
        let stream = openai_stream(true).replace('\n', "\r\n");
        let at = stream.find("\"usage\"").expect("usage key") + 3;
        let (a, b) = stream.as_bytes().split_at(at);
        let (out, removed) = filter_all(&[a, b]);
        assert_eq!(out, openai_stream(false).replace('\n', "\r\n").as_bytes());
        assert_eq!(removed, 1);
    }

    #[test]
    fn filter_passes_an_oversized_event_without_holding_it() {
        let big = content_chunk(0, "").replace("word 0", &"w".repeat(2 * MAX_EVENT_BYTES));
        let stream = format!("{big}{}data: [DONE]\n\n", usage_only_chunk());
        let mut filter = UsageChunkFilter::new();
        let mut out = Vec::new();
        for chunk in stream.as_bytes().chunks(8192) {
            out.extend_from_slice(&filter.push(Bytes::copy_from_slice(chunk), false));
            assert!(filter.held() <= MAX_EVENT_BYTES);
        }
        out.extend_from_slice(&filter.push(Bytes::new(), true));
        assert_eq!(out, format!("{big}data: [DONE]\n\n").as_bytes());
    }

    #[test]
    fn removed_event_keeps_surrounding_blank_lines() {
        let stream = format!(
            "{}\n\n{}\ndata: [DONE]\n\n",
            content_chunk(0, ""),
            usage_only_chunk()
        );
        let (out, removed) = filter_all(&[stream.as_bytes()]);
        assert_eq!(removed, 1);
        assert_eq!(
            out,
            format!("{}\n\n\ndata: [DONE]\n\n", content_chunk(0, "")).as_bytes()
        );
        let (bytes, _) = filter_all(&bytes_per_byte(stream.as_bytes()));
        assert_eq!(bytes, out);
    }

    // --- ensure_include_usage ---

    #[test]
    fn streamed_request_gets_stream_options_at_the_end() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"Caf\u00e9 \"x\""}],"temperature":0.70,"stream":true}"#;
        let out = added(body);
        assert_eq!(
            out,
            r#"{"model":"m","messages":[{"role":"user","content":"Caf\u00e9 \"x\""}],"temperature":0.70,"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert!(ensure_include_usage(body.as_bytes()).strips_usage_chunk());
    }

    #[test]
    fn pretty_printed_request_keeps_its_whitespace() {
        let body = "{\n  \"stream\" : true,\n  \"model\": \"m\"\n}\n";
        assert_eq!(
            added(body),
            "{\n  \"stream\" : true,\n  \"model\": \"m\",\"stream_options\":{\"include_usage\":true}\n}\n"
        );
    }

    #[test]
    fn existing_stream_options_get_the_key_inside() {
        let cases = [
            (
                r#"{"stream":true,"stream_options":{}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{ },"n":1}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true },"n":1}"#,
            ),
            (
                r#"{"stream_options":{"chunk_size": 5 },"stream":true}"#,
                r#"{"stream_options":{"chunk_size": 5,"include_usage":true },"stream":true}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage": false,"x":1}}"#,
                r#"{"stream":true,"stream_options":{"include_usage": true,"x":1}}"#,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":null}}"#,
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"stream":true,"stream_options": null }"#,
                r#"{"stream":true,"stream_options": {"include_usage":true} }"#,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(added(body), expected, "{body}");
            let parsed: Value = serde_json::from_str(expected).expect("valid JSON");
            assert_eq!(parsed["stream_options"]["include_usage"], true);
        }
    }

    #[test]
    fn a_client_that_asked_for_usage_is_left_alone() {
        for body in [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream_options":{ "include\u005fusage" : true },"stream":true}"#,
        ] {
            let result = ensure_include_usage(body.as_bytes());
            assert_eq!(result, StreamUsage::Requested, "{body}");
            assert!(!result.strips_usage_chunk());
        }
    }

    #[test]
    fn requests_that_do_not_stream_are_not_streamed() {
        for body in [
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","stream":false}"#,
            r#"{"model":"m","stream":"true"}"#,
            r#"{"model":"m","stream":null,"stream_options":{}}"#,
            r#"{"messages":[{"role":"user","content":"\"stream\":true"}]}"#,
            r#"{"messages":[{"role":"user","content":"say \"stream\": true"}],"stream":false}"#,
            r#"["stream"]"#,
            "",
        ] {
            assert_eq!(
                ensure_include_usage(body.as_bytes()),
                StreamUsage::NotStreamed,
                "{body}"
            );
        }
    }

    #[test]
    fn ambiguous_or_malformed_requests_are_unsupported() {
        for body in [
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true,"str\u0065am":false}"#,
            r#"{"stream":true,"stream_options":"yes"}"#,
            r#"{"stream":true,"stream_options":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":false}}"#,
            r#"{"stream":true"#,
            r#"[{"stream":true}]"#,
            r#"{"stream":true} trailing"#,
        ] {
            let result = ensure_include_usage(body.as_bytes());
            assert_eq!(result, StreamUsage::Unsupported, "{body}");
            assert!(!result.strips_usage_chunk());
        }
    }

    #[test]
    fn every_other_byte_is_kept() {
        let body = r#"{"messages":[{"role":"user","content":"a\/b \ud83d\ude00 1e2"}],"stream":true,"top_p":1e0,"tools":[{"type":"function"}],"stream_options":{"x":[1, 2]}}"#;
        let out = added(body);
        let inserted = r#","include_usage":true"#;
        let at = out.find(inserted).expect("inserted");
        assert_eq!(
            format!("{}{}", &out[..at], &out[at + inserted.len()..]),
            body
        );
    }

    // --- chunking does not matter ---

    /// Streams with every case: CRLF, comments, multi-line data, null usage, split `[DONE]`.
    fn sample_streams() -> Vec<String> {
        let multi = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10}}\n\n";
        vec![
            openai_stream(true),
            openai_stream(true).replace('\n', "\r\n"),
            ark_stream(),
            format!(
                ": ping\n\n{}{multi}\n\ndata: [DONE]\n\n",
                content_chunk(0, "")
            ),
            format!(
                "\n{}\n\n\n{}\r\n\r\ndata: [DONE]",
                content_chunk(1, r#","usage":null"#),
                usage_only_chunk().trim_end()
            ),
        ]
    }

    proptest! {
        #[test]
        fn extractor_result_does_not_depend_on_the_cuts(
            which in 0usize..5,
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let stream = &sample_streams()[which];
            let whole = extract(BodyKind::EventStream, &[stream.as_bytes()]).0;
            let pieces = cut(stream.as_bytes(), &cuts);
            let (summary, progress) = extract(BodyKind::EventStream, &pieces);
            prop_assert_eq!(summary, whole);
            prop_assert_eq!(summary.usage, Some(USAGE));
            prop_assert_eq!(progress.iter().filter(|p| p.first_data).count(), 1);
            prop_assert!(progress.iter().filter(|p| p.done).count() <= 1);
        }

        #[test]
        fn first_data_is_reported_on_the_chunk_that_ends_the_first_event(
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let stream = openai_stream(true);
            let first_end = ": keep-alive\n\n".len() + content_chunk(0, "").len();
            let done_end = stream.len();
            let pieces = cut(stream.as_bytes(), &cuts);
            let (_, progress) = extract(BodyKind::EventStream, &pieces);
            let mut from = 0;
            for (piece, progress) in pieces.iter().zip(progress) {
                let to = from + piece.len();
                let holds = |end: usize| from < end && end <= to;
                prop_assert_eq!(progress.first_data, holds(first_end));
                prop_assert_eq!(progress.done, holds(done_end));
                from = to;
            }
        }

        #[test]
        fn json_extractor_result_does_not_depend_on_the_cuts(
            which in 0usize..3,
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let bodies = [
                json_answer(TRICKY),
                r#"{ "usage" : {"prompt_tokens":19, "completion_tokens":10} , "x":"\\\"usage\":{}" }"#.to_owned(),
                json_answer("\\\"usage\\\": {\"prompt_tokens\": 1}"),
            ];
            let body = &bodies[which];
            let whole = extract(BodyKind::Json, &[body.as_bytes()]).0;
            prop_assert_eq!(whole.usage, Some(USAGE));
            prop_assert_eq!(extract(BodyKind::Json, &cut(body.as_bytes(), &cuts)).0, whole);
        }

        #[test]
        fn filter_output_does_not_depend_on_the_cuts(
            which in 0usize..5,
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let stream = &sample_streams()[which];
            let whole = filter_all(&[stream.as_bytes()]);
            prop_assert_eq!(filter_all(&cut(stream.as_bytes(), &cuts)), whole.clone());
            // What is left is the stream minus the usage-only event, still with its usage
            // chunks that carry content.
            let left = extract(BodyKind::EventStream, &[&whole.0]).0;
            prop_assert_eq!(left.usage.is_some(), which == 2);
        }

        #[test]
        fn arbitrary_streams_cut_anywhere_agree_with_one_shot(
            events in proptest::collection::vec(
                prop_oneof![
                    Just("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}".to_owned()),
                    Just("data: {\"choices\":[{}],\"usage\":null}".to_owned()),
                    Just(": ping".to_owned()),
                    Just("data: [DONE]".to_owned()),
                    Just(String::new()),
                    "[a-z\"{}:]{0,12}",
                ],
                0..8,
            ),
            endings in proptest::collection::vec(prop_oneof![Just("\n"), Just("\r\n")], 8),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut stream = String::new();
            for (i, event) in events.iter().enumerate() {
                stream += event;
                stream += endings[i];
                stream += endings[(i + 3) % 8];
            }
            let pieces = cut(stream.as_bytes(), &cuts);
            prop_assert_eq!(filter_all(&pieces), filter_all(&[stream.as_bytes()]));
            prop_assert_eq!(
                extract(BodyKind::EventStream, &pieces).0,
                extract(BodyKind::EventStream, &[stream.as_bytes()]).0
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let pieces = cut(&body, &cuts);
            let _ = extract(BodyKind::Json, &pieces);
            let _ = extract(BodyKind::EventStream, &pieces);
            let (out, _) = filter_all(&pieces);
            prop_assert!(out.len() <= body.len());
            if let StreamUsage::Added(out) = ensure_include_usage(&body) {
                let _: Value = serde_json::from_slice(&out).expect("an edited body is valid JSON");
            }
        }
    }
}
