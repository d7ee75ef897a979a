//! The SSE filter: response policies over a chat completion stream, catching matches that are
//! split across events.
//!
//! # How text is held back and events re-emitted
//!
//! The stream is cut into events at blank lines (chunks may cut anywhere). A `data:` event whose
//! JSON has a non-empty `choices` array is a *text event*: each `choices[i].delta.content` and
//! `delta.reasoning_content` string is a *slot*, and the slots of one choice and field, in stream
//! order, make one *channel* of text (so a match never spans a choice's reasoning and its answer,
//! nor two choices).
//!
//! Events wait in one queue, in arrival order, and leave it only from the front, so they always
//! reach the client in their original order, each with its own `id`, `model`, `finish_reason`,
//! tool-call deltas and every other field. Text stays in the event it came in: an event leaves
//! when every slot in it (and in every event before it) has been *released*. When nothing in an
//! event was redacted it leaves as the exact bytes it arrived as; otherwise its JSON is the same
//! bytes with only the changed string literals rewritten. An event that carries no text (the
//! first `role` delta, a tool-call delta) waits only for the events before it.
//!
//! After each text event, the policies run once over each changed channel's unreleased text
//! (plus one character of released text before it, as context for `\b` and `^`). Then text is
//! released up to a cut:
//!
//! - normally, everything before the first position where a match could begin and still be
//!   unfinished at the end of the held text (found by stepping the policies' lazy DFA from each
//!   start until it dies), so text that cannot be part of a match leaves at once; but never
//!   more than the last `buffer_bytes` (rounded to a character boundary) are held, so any match
//!   up to `buffer_bytes` long is seen whole however the events split it;
//! - text that arrived `flush_interval` ago or more is released whatever its position;
//! - a choice's whole text is released when its `finish_reason` arrives, and every channel's
//!   before an event that is not a text event (`[DONE]`, the usage chunk with empty `choices`, an
//!   error, a comment, anything not JSON), which then passes through as it was;
//! - a cut never falls inside a match: it moves to the match's end, so a released match is
//!   always released redacted.
//!
//! A redacted match puts the replacement in the slot where the match began and removes the
//! matched text from the slots it continued into (which may end up as `""`).
//!
//! On a `block` match the held events are dropped and the filter emits one
//! `data: {"error":{…"code":"content_policy_violation"}}` event; it then emits nothing more and
//! the caller ends the response. Flags are recorded (each policy once) and change nothing.
//!
//! # Limits
//!
//! A match longer than `buffer_bytes`, or still growing when the flush interval releases it (a
//! token delivered slower than `flush_interval`), can leak its part outside the held window.
//! Anchors at the end of a pattern (`$`, `\b`) see the end of the held text as the end. An event
//! larger than [`MAX_EVENT_BYTES`] without a blank line is passed through unexamined (after
//! releasing everything held), so a broken stream cannot grow memory without bound.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::compile::{Active, PolicySet, Side, SidePolicies, Span};
use super::text::{array, json_str, literal_range, members, note, splice};
use super::violation_body;

/// Most bytes one SSE event may take before it is passed through unexamined.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// How much text a [`StreamPolicy`] may hold back, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Text held back at most, per choice and field (rounded up to a UTF-8 character boundary).
    pub buffer_bytes: usize,
    /// Text is never held longer than this.
    pub flush_interval: Duration,
}

impl Default for StreamSettings {
    /// 4096 bytes, 100 ms.
    fn default() -> Self {
        StreamSettings {
            buffer_bytes: 4096,
            flush_interval: Duration::from_millis(100),
        }
    }
}

/// The response policies applied to one SSE response, fed its chunks in order.
///
/// ```
/// # use std::sync::Arc;
/// # use std::time::{Duration, Instant};
/// # use arkgate::policy::{Action, Pattern, PolicySet, PolicySpec, Side, StreamPolicy, StreamSettings};
/// let set = Arc::new(PolicySet::compile(vec![PolicySpec {
///     name: "no-keys-out".into(),
///     sides: vec![Side::Response],
///     pattern: Pattern::Regex("sk-[A-Za-z0-9]{20,}".into()),
///     action: Action::Redact,
///     replacement: "[REDACTED]".into(),
///     models: vec![],
/// }])?);
/// let mut filter = StreamPolicy::new(set, Some("m"), StreamSettings::default()).expect("applies");
/// let now = Instant::now();
/// let mut out = Vec::new();
/// out.extend_from_slice(&filter.push(
///     r#"data: {"choices":[{"index":0,"delta":{"content":"sk-0123456789"}}]}"#.into(),
///     now,
/// ));
/// out.extend_from_slice(&filter.push("\n\n".into(), now));
/// assert!(out.is_empty()); // held: the key may continue in the next event
/// assert_eq!(filter.deadline(), Some(now + Duration::from_millis(100)));
/// out.extend_from_slice(&filter.push(
///     r#"data: {"choices":[{"index":0,"delta":{"content":"abcdefghijKL."}}]}"#.into(),
///     now,
/// ));
/// out.extend_from_slice(&filter.push("\n\ndata: [DONE]\n\n".into(), now));
/// assert_eq!(
///     String::from_utf8(out)?,
///     "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"[REDACTED]\"}}]}\n\n\
///      data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\".\"}}]}\n\n\
///      data: [DONE]\n\n"
/// );
/// assert_eq!(filter.deadline(), None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StreamPolicy {
    set: Arc<PolicySet>,
    active: Active,
    settings: StreamSettings,
    /// Bytes not yet cut into events; `input[..scanned]` holds no event boundary.
    input: BytesMut,
    scanned: usize,
    /// Events waiting to leave, oldest first; `queue[0]` has sequence number `front_seq`.
    queue: VecDeque<Event>,
    front_seq: u64,
    channels: Vec<Channel>,
    /// Bytes ready for the caller.
    out: BytesMut,
    /// Scratch for redaction spans.
    spans: Vec<Span>,
    /// The lazy DFA's cache, for finding where a match could still begin.
    prefix: Option<regex_automata::hybrid::dfa::Cache>,
    blocked_by: Option<Arc<str>>,
    flagged: Vec<Arc<str>>,
    redacted_by: Vec<Arc<str>>,
    /// Blocked or finished: input is ignored.
    done: bool,
}

/// One SSE event in the queue.
struct Event {
    /// The event as it arrived, blank line included.
    raw: Bytes,
    /// Its text slots; `None` for an event passed through as it is.
    text: Option<TextEvent>,
    /// Slots whose text is not fully released yet.
    waiting: usize,
}

/// Where a text event's JSON is, and its slots.
struct TextEvent {
    json: Json,
    slots: Vec<Slot>,
}

/// A text event's JSON: one `data:` line (the common case) or several joined by `\n`.
enum Json {
    /// `raw[range]` is the JSON.
    Line(Range<usize>),
    /// The JSON joined from several `data:` lines, and the range of each of those lines in
    /// `raw` (terminator included).
    Joined {
        json: String,
        lines: Vec<Range<usize>>,
    },
}

/// One text string literal in an event.
struct Slot {
    /// The literal, quotes included, within the event's JSON.
    literal: Range<usize>,
    /// The released text, redactions applied.
    out: String,
    /// Whether a redaction touched it (else the literal is left as it was).
    changed: bool,
}

/// Which text field of a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Content,
    Reasoning,
}

/// The unreleased text of one choice's field, across events.
struct Channel {
    choice: u64,
    field: Field,
    /// `text[..lead]`: released text kept as context (at most one character); `text[lead..]`:
    /// held text, the concatenation of `pieces`.
    text: String,
    lead: usize,
    pieces: VecDeque<Piece>,
}

/// A part of a channel's held text and the slot it belongs to.
struct Piece {
    seq: u64,
    slot: usize,
    len: usize,
    arrived: Instant,
}

/// Where to release a channel's text up to.
#[derive(Clone, Copy)]
enum Cut {
    /// All but the last `buffer_bytes`, plus whatever arrived at or before the instant.
    Window(Instant),
    /// Everything.
    All,
}

/// What a parsed event is.
enum Parsed {
    PassThrough,
    Text {
        json: Json,
        slots: Vec<(u64, Field, Range<usize>, String)>,
        finished: Vec<u64>,
    },
}

impl StreamPolicy {
    /// A filter for one response to a request for `model`, or `None` when no response policy
    /// applies to it: the caller then forwards the stream untouched and pays nothing.
    pub fn new(
        set: Arc<PolicySet>,
        model: Option<&str>,
        settings: StreamSettings,
    ) -> Option<StreamPolicy> {
        let side = set.side(Side::Response)?;
        let active = side.active(model)?;
        let prefix = side.prefix_cache();
        Some(StreamPolicy {
            prefix,
            set,
            active,
            settings,
            input: BytesMut::new(),
            scanned: 0,
            queue: VecDeque::new(),
            front_seq: 0,
            channels: Vec::new(),
            out: BytesMut::new(),
            spans: Vec::new(),
            blocked_by: None,
            flagged: Vec::new(),
            redacted_by: Vec::new(),
            done: false,
        })
    }

    /// Feeds the next chunk, received at `now`; returns the bytes ready to send (often empty:
    /// text is being held). After a block or [`finish`](Self::finish), input is ignored.
    pub fn push(&mut self, chunk: Bytes, now: Instant) -> Bytes {
        if self.done {
            return Bytes::new();
        }
        self.release_due(now);
        self.input.extend_from_slice(&chunk);
        while !self.done {
            if let Some(end) = self.next_boundary() {
                let raw = self.input.split_to(end).freeze();
                self.scanned = 0;
                self.event(raw, now);
            } else {
                if self.input.len() > MAX_EVENT_BYTES {
                    self.release_all();
                    if self.done {
                        break;
                    }
                    let raw = self.input.split().freeze();
                    self.scanned = 0;
                    self.out.extend_from_slice(&raw);
                }
                break;
            }
        }
        self.out.split().freeze()
    }

    /// Releases text held since `flush_interval` before `now` or longer; returns the bytes now
    /// ready (empty when nothing was due). Call it at [`deadline`](Self::deadline).
    pub fn flush_due(&mut self, now: Instant) -> Bytes {
        if !self.done {
            self.release_due(now);
        }
        self.out.split().freeze()
    }

    /// When [`flush_due`](Self::flush_due) next has something to release: the arrival of the
    /// oldest held text plus `flush_interval`. `None` when nothing is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.channels
            .iter()
            .filter_map(|c| c.pieces.front())
            .map(|p| p.arrived + self.settings.flush_interval)
            .min()
    }

    /// The stream ended: evaluates a last event left without its blank line, releases everything
    /// and returns the rest of the output.
    pub fn finish(&mut self, now: Instant) -> Bytes {
        if !self.done {
            if !self.input.is_empty() {
                let raw = self.input.split().freeze();
                self.event(raw, now);
            }
            if !self.done {
                self.release_all();
            }
            self.done = true;
        }
        self.out.split().freeze()
    }

    /// The `block` policy that ended the stream, if one did.
    pub fn blocked_by(&self) -> Option<&Arc<str>> {
        self.blocked_by.as_ref()
    }

    /// The `flag` policies that matched so far, each once.
    pub fn flagged(&self) -> &[Arc<str>] {
        &self.flagged
    }

    /// The `redact` policies that replaced text so far, each once.
    pub fn redacted_by(&self) -> &[Arc<str>] {
        &self.redacted_by
    }

    /// The end of the next complete event in `input`, if there is one.
    fn next_boundary(&mut self) -> Option<usize> {
        let bytes = &self.input[..];
        let mut from = self.scanned;
        while let Some(i) = memchr::memchr(b'\n', &bytes[from..]) {
            let p = from + i;
            match (bytes.get(p + 1), bytes.get(p + 2)) {
                (Some(b'\n'), _) => return Some(p + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(p + 3),
                (None, _) | (Some(b'\r'), None) => {
                    // The blank line may still come: look here again with the next chunk.
                    self.scanned = p;
                    return None;
                }
                _ => from = p + 1,
            }
        }
        self.scanned = bytes.len();
        None
    }

    /// Takes one complete event.
    fn event(&mut self, raw: Bytes, now: Instant) {
        match parse(&raw) {
            Parsed::PassThrough => {
                self.release_all();
                if self.done {
                    return;
                }
                self.enqueue(Event {
                    raw,
                    text: None,
                    waiting: 0,
                });
            }
            Parsed::Text {
                json,
                slots,
                finished,
            } => {
                let seq = self.front_seq + self.queue.len() as u64;
                let mut event = TextEvent {
                    json,
                    slots: Vec::with_capacity(slots.len()),
                };
                let mut waiting = 0;
                let mut touched: Vec<usize> = Vec::new();
                for (index, (choice, field, literal, text)) in slots.into_iter().enumerate() {
                    event.slots.push(Slot {
                        literal,
                        out: String::new(),
                        changed: false,
                    });
                    if text.is_empty() {
                        continue;
                    }
                    waiting += 1;
                    let ch = self.channel(choice, field);
                    let channel = &mut self.channels[ch];
                    channel.text.push_str(&text);
                    channel.pieces.push_back(Piece {
                        seq,
                        slot: index,
                        len: text.len(),
                        arrived: now,
                    });
                    if !touched.contains(&ch) {
                        touched.push(ch);
                    }
                }
                self.queue.push_back(Event {
                    raw,
                    text: Some(event),
                    waiting,
                });
                for ch in touched {
                    if self.done {
                        return;
                    }
                    self.settle(ch, Cut::Window(now));
                }
                for choice in finished {
                    for ch in 0..self.channels.len() {
                        if !self.done && self.channels[ch].choice == choice {
                            self.settle(ch, Cut::All);
                        }
                    }
                    // A finished choice sends no more text; forget its channels once released.
                    self.channels
                        .retain(|c| c.choice != choice || !c.pieces.is_empty());
                }
                self.drain();
            }
        }
    }

    /// Adds an event behind the others and sends what can leave.
    fn enqueue(&mut self, event: Event) {
        self.queue.push_back(event);
        self.drain();
    }

    /// The index of the channel for `choice` and `field`, created when new.
    fn channel(&mut self, choice: u64, field: Field) -> usize {
        if let Some(i) = self
            .channels
            .iter()
            .position(|c| c.choice == choice && c.field == field)
        {
            return i;
        }
        self.channels.push(Channel {
            choice,
            field,
            text: String::new(),
            lead: 0,
            pieces: VecDeque::new(),
        });
        self.channels.len() - 1
    }

    /// Releases what is due at `now` in every channel, then sends what can leave.
    fn release_due(&mut self, now: Instant) {
        let interval = self.settings.flush_interval;
        for ch in 0..self.channels.len() {
            // A block clears the channels: stop looking at them.
            if self.done {
                return;
            }
            let due = self.channels[ch]
                .pieces
                .front()
                .is_some_and(|p| p.arrived + interval <= now);
            if due {
                self.settle(ch, Cut::Window(now));
            }
        }
        self.drain();
    }

    /// Releases everything held, then sends the whole queue.
    fn release_all(&mut self) {
        for ch in 0..self.channels.len() {
            if !self.done {
                self.settle(ch, Cut::All);
            }
        }
        self.drain();
    }

    /// Evaluates a channel's held text and releases it up to `cut`.
    fn settle(&mut self, ch: usize, cut: Cut) {
        let set = Arc::clone(&self.set);
        let Some(side) = set.side(Side::Response) else {
            return;
        };
        let channel = &self.channels[ch];
        if channel.pieces.is_empty() {
            return;
        }
        let (text, lead) = (&channel.text, channel.lead);
        self.spans.clear();
        if let Some(hits) = side.hits(&self.active, text, lead) {
            for &index in &hits.flags {
                note(&mut self.flagged, side.name(index));
            }
            if let Some(index) = hits.block {
                self.block(Arc::clone(side.name(index)));
                return;
            }
            if !hits.redacts.is_empty() {
                side.redact_spans(&hits.redacts, text, lead, &mut self.spans);
            }
        }
        let mut at = match cut {
            Cut::All => text.len(),
            Cut::Window(now) => {
                let mut at = text
                    .len()
                    .saturating_sub(self.settings.buffer_bytes)
                    .max(lead);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                // Hold only from where a match could still be unfinished (usually nowhere).
                let at = side.live_start(&mut self.prefix, text, at);
                let interval = self.settings.flush_interval;
                let due: usize = channel
                    .pieces
                    .iter()
                    .take_while(|p| p.arrived + interval <= now)
                    .map(|p| p.len)
                    .sum();
                at.max(lead + due)
            }
        };
        if let Some(span) = self.spans.iter().find(|s| s.start < at && at < s.end) {
            at = span.end;
        }
        if at > lead {
            self.release(side, ch, at);
        }
    }

    /// Moves `channels[ch].text[lead..at]` into its slots, with the redactions in `self.spans`
    /// (none of which straddles `at`).
    fn release(&mut self, side: &SidePolicies, ch: usize, at: usize) {
        let channel = &mut self.channels[ch];
        let text = &channel.text;
        let mut pos = channel.lead;
        let mut next_span = 0;
        while pos < at {
            let Some(piece) = channel.pieces.front_mut() else {
                break;
            };
            let end = (pos + piece.len).min(at);
            let Some(event) = usize::try_from(piece.seq - self.front_seq)
                .ok()
                .and_then(|i| self.queue.get_mut(i))
            else {
                break;
            };
            let Some(slot) = event
                .text
                .as_mut()
                .and_then(|t| t.slots.get_mut(piece.slot))
            else {
                break;
            };
            let mut from = pos;
            while let Some(span) = self.spans.get(next_span).filter(|s| s.start < end) {
                if span.start >= from {
                    slot.out.push_str(&text[from..span.start]);
                    slot.out.push_str(side.replacement(span.policy));
                    note(&mut self.redacted_by, side.name(span.policy));
                }
                // Else the span began in an earlier piece, which holds its replacement.
                slot.changed = true;
                if span.end > end {
                    from = end;
                    break;
                }
                from = span.end;
                next_span += 1;
            }
            slot.out.push_str(&text[from..end]);
            piece.len -= end - pos;
            if piece.len == 0 {
                event.waiting -= 1;
                channel.pieces.pop_front();
            }
            pos = end;
        }
        // Keep the last released character as context for the next evaluation.
        let mut keep = at.saturating_sub(1);
        while !channel.text.is_char_boundary(keep) {
            keep -= 1;
        }
        channel.text.drain(..keep);
        channel.lead = at - keep;
    }

    /// Sends every event at the front of the queue whose text is all released.
    fn drain(&mut self) {
        while self.queue.front().is_some_and(|e| e.waiting == 0) {
            let Some(event) = self.queue.pop_front() else {
                break;
            };
            self.front_seq += 1;
            write_event(&event, &mut self.out);
        }
    }

    /// Ends the stream with the violation event.
    fn block(&mut self, name: Arc<str>) {
        self.queue.clear();
        self.channels.clear();
        self.input.clear();
        self.out.extend_from_slice(b"data: ");
        self.out
            .extend_from_slice(&violation_body(Side::Response, &name));
        self.out.extend_from_slice(b"\n\n");
        self.blocked_by = Some(name);
        self.done = true;
    }
}

/// Writes an event: as it arrived, or with its changed literals rewritten.
fn write_event(event: &Event, out: &mut BytesMut) {
    let Some(text) = event
        .text
        .as_ref()
        .filter(|t| t.slots.iter().any(|s| s.changed))
    else {
        out.extend_from_slice(&event.raw);
        return;
    };
    let json: &[u8] = match &text.json {
        Json::Line(range) => &event.raw[range.clone()],
        Json::Joined { json, .. } => json.as_bytes(),
    };
    let edits: Vec<(Range<usize>, String)> = text
        .slots
        .iter()
        .filter(|s| s.changed)
        .map(|s| {
            let literal = serde_json::to_string(&s.out).expect("a string always serialises");
            (s.literal.clone(), literal)
        })
        .collect();
    let json = splice(json, &edits);
    match &text.json {
        Json::Line(range) => {
            out.extend_from_slice(&event.raw[..range.start]);
            out.extend_from_slice(&json);
            out.extend_from_slice(&event.raw[range.end..]);
        }
        Json::Joined { lines, .. } => {
            // The first `data:` line carries the whole JSON; the others are dropped.
            let mut at = 0;
            for (i, line) in lines.iter().enumerate() {
                out.extend_from_slice(&event.raw[at..line.start]);
                if i == 0 {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&json);
                    out.extend_from_slice(b"\n");
                }
                at = line.end;
            }
            out.extend_from_slice(&event.raw[at..]);
        }
    }
}

/// Reads one event: its `data:` lines, and if they are a chat chunk with choices, its slots.
fn parse(raw: &[u8]) -> Parsed {
    // (value range, whole line range with terminator) of every `data:` line.
    let mut data: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    let mut start = 0;
    while start < raw.len() {
        let end = memchr::memchr(b'\n', &raw[start..]).map_or(raw.len(), |i| start + i + 1);
        let mut line = &raw[start..end];
        line = line.strip_suffix(b"\n").unwrap_or(line);
        line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(value) = line.strip_prefix(b"data:") {
            let skip = 5 + usize::from(value.first() == Some(&b' '));
            data.push((start + skip..start + line.len(), start..end));
        }
        start = end;
    }
    let json = match data.as_slice() {
        [] => return Parsed::PassThrough,
        [(value, _)] => Json::Line(value.clone()),
        _ => {
            let mut joined = Vec::new();
            for (i, (value, _)) in data.iter().enumerate() {
                if i > 0 {
                    joined.push(b'\n');
                }
                joined.extend_from_slice(&raw[value.clone()]);
            }
            let Ok(json) = String::from_utf8(joined) else {
                return Parsed::PassThrough;
            };
            Json::Joined {
                json,
                lines: data.into_iter().map(|(_, line)| line).collect(),
            }
        }
    };
    let bytes: &[u8] = match &json {
        Json::Line(range) => &raw[range.clone()],
        Json::Joined { json, .. } => json.as_bytes(),
    };
    let Some(top) = members(bytes) else {
        return Parsed::PassThrough;
    };
    let mut slots = Vec::new();
    let mut finished = Vec::new();
    let mut any_choice = false;
    for (key, value) in &top {
        if key != "choices" {
            continue;
        }
        for (position, choice) in array(value).into_iter().enumerate() {
            any_choice = true;
            let fields = members(choice.get().as_bytes()).unwrap_or_default();
            let index = fields
                .iter()
                .rev()
                .find(|(key, _)| key == "index")
                .and_then(|(_, v)| v.get().parse::<u64>().ok())
                .unwrap_or(position as u64);
            for (key, value) in &fields {
                match &**key {
                    "delta" => {
                        for (key, value) in members(value.get().as_bytes()).unwrap_or_default() {
                            let field = match &*key {
                                "content" => Field::Content,
                                "reasoning_content" => Field::Reasoning,
                                _ => continue,
                            };
                            let (Some(text), Some(literal)) =
                                (json_str(value), literal_range(bytes, value))
                            else {
                                continue;
                            };
                            slots.push((index, field, literal, text.into_owned()));
                        }
                    }
                    "finish_reason" if value.get() != "null" => finished.push(index),
                    _ => {}
                }
            }
        }
    }
    if !any_choice {
        return Parsed::PassThrough;
    }
    Parsed::Text {
        json,
        slots,
        finished,
    }
}

#[cfg(test)]
mod tests;
