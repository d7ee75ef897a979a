//! Streaming find-and-replace over request and response bodies.
//!
//! The proxy rewrites bodies (JSON requests, JSON responses, SSE streams) while they pass
//! through, chunk by chunk, without ever buffering a whole body. [`RuleSet`] is compiled once
//! at start from the configured rules and shared by every request; each body gets its own
//! [`Replacer`], which is fed the body's chunks as they arrive and returns what is ready to
//! forward. Pure: only `bytes` and `memchr`, no pingora types.
//!
//! # Semantics
//!
//! Rules are `(find, replace)` byte strings in priority order. Bytes are arbitrary (not
//! necessarily UTF-8). The body is scanned left to right from a current position `p`, which
//! starts at 0:
//!
//! 1. Find the leftmost position `s >= p` where some rule's `find` occurs.
//! 2. If several rules' `find`s occur at `s`, the one listed first wins ("leftmost-first", as
//!    aho-corasick's `MatchKind::LeftmostFirst`).
//! 3. Emit the input between `p` and `s`, then that rule's `replace`, and continue at
//!    `s + find.len()`. The replacement is never rescanned.
//! 4. When no `find` occurs at or after `p`, emit the rest of the input unchanged.
//!
//! So occurrences never overlap: `aaa → X` turns `aaaaa` into `Xaa`. A rule whose `find`
//! begins with an earlier rule's `find` can never match, since the earlier rule always wins at
//! the same position; it is accepted and skipped.
//!
//! # Streaming
//!
//! [`RuleSet::replace_all`] applies these semantics to a whole buffer. [`Replacer::push`]
//! applies them to a body cut into arbitrary chunks, and its concatenated output equals
//! `replace_all` of the whole body whatever the cuts. To get there it holds back, between
//! calls, the shortest suffix that could still begin a winning match: the bytes from the
//! earliest position (after the last committed match) whose remainder is a proper prefix of
//! some rule's `find`. A match that starts before that position is final, because every match
//! that could still beat it (starting earlier, or at the same place with a higher priority)
//! would have to start inside what is held back. The held suffix is never longer than
//! [`RuleSet::max_holdback`]; with the rule `json_schema` a chunk ending in an SSE boundary
//! (`\n\n`) is never held back at all.
//!
//! # Cost
//!
//! A chunk with no match and nothing held back costs one `memmem` search per rule and is
//! returned as-is (same allocation, no copy). When only a tail is held back, the head is
//! returned as a slice of the chunk and the tail (at most `max_holdback` bytes) is copied
//! aside. A chunk with matches is rendered into one exact-size allocation. After a held-back
//! tail, the next chunk is copied once, into that chunk's output, since the output has to begin
//! with the held bytes. Each rule's next match position is cached while scanning, so with
//! several rules each byte is searched once per rule, not once per match.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use memchr::memmem::Finder;

/// Rule sets up to this size cache each rule's next match position on the stack while
/// scanning; larger ones use a `Vec` kept in the [`Replacer`] (allocated once per body).
const INLINE_RULES: usize = 8;

/// Next-match cache entry for a rule with no occurrence left in the buffer being scanned.
const NO_MATCH: usize = usize::MAX;

/// Why a rule list was rejected by [`RuleSet::new`]. `index` is the rule's 0-based position
/// in the list, as the messages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleError {
    /// The rule's `find` is empty, which would match between every two bytes.
    EmptyFind {
        /// 0-based position of the offending rule.
        index: usize,
    },
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleError::EmptyFind { index } => write!(f, "rule {index}: `find` must not be empty"),
        }
    }
}

impl std::error::Error for RuleError {}

/// One rule that can match, compiled.
struct Rule {
    /// Searcher for the rule's `find`, which it also owns (`Finder::needle`).
    finder: Finder<'static>,
    replace: Box<[u8]>,
}

impl Rule {
    fn find(&self) -> &[u8] {
        self.finder.needle()
    }
}

/// One compiled rule set, built once at start and shared (in an `Arc`) by every request.
///
/// Holds a `memmem` searcher per rule and the facts the proxy needs before streaming a body
/// ([`changes_length`](Self::changes_length), [`max_holdback`](Self::max_holdback)).
pub struct RuleSet {
    /// Rules that can match, in priority order (rules shadowed by an earlier one are dropped).
    rules: Vec<Rule>,
    /// Number of rules given to [`RuleSet::new`], shadowed ones included.
    declared: usize,
    max_holdback: usize,
    changes_length: bool,
    /// `starts[b]` is true when some rule's `find` begins with byte `b`: a cheap check before
    /// comparing a body's tail with every rule.
    starts: [bool; 256],
}

/// A committed match: where it starts in the scanned buffer and which rule (index into
/// `RuleSet::rules`) it belongs to.
#[derive(Debug, Clone, Copy)]
struct Hit {
    start: usize,
    rule: usize,
}

/// What the end of a scanned buffer means.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// The body ends here: commit every match, hold nothing back.
    Final,
    /// More of the body may follow: hold back the shortest suffix that could begin a match.
    Open,
    /// The buffer is a window over a longer body: commit only matches starting before this
    /// position (every such match lies wholly inside the window), hold nothing back.
    Cut(usize),
}

impl RuleSet {
    /// Compiles `(find, replace)` rules, given in priority order.
    ///
    /// Rejects an empty `find` ([`RuleError::EmptyFind`]), which would match between every
    /// two bytes. A rule whose `find` starts with an earlier rule's `find` (say `ab` after `a`,
    /// or `a` again) is accepted but can never match, so it is not searched for; the
    /// configuration refuses such rules before they get here. An empty list is valid and
    /// matches nothing.
    pub fn new(rules: Vec<(Vec<u8>, Vec<u8>)>) -> Result<RuleSet, RuleError> {
        let declared = rules.len();
        for (index, (find, _)) in rules.iter().enumerate() {
            if find.is_empty() {
                return Err(RuleError::EmptyFind { index });
            }
        }
        let mut compiled: Vec<Rule> = Vec::with_capacity(rules.len());
        for (find, replace) in rules {
            let shadowed = compiled
                .iter()
                .any(|earlier| find.starts_with(earlier.find()));
            if !shadowed {
                compiled.push(Rule {
                    finder: Finder::new(&find).into_owned(),
                    replace: replace.into_boxed_slice(),
                });
            }
        }
        let mut starts = [false; 256];
        for rule in &compiled {
            starts[usize::from(rule.find()[0])] = true;
        }
        Ok(RuleSet {
            max_holdback: compiled
                .iter()
                .map(|rule| rule.find().len() - 1)
                .max()
                .unwrap_or(0),
            changes_length: compiled
                .iter()
                .any(|rule| rule.find().len() != rule.replace.len()),
            rules: compiled,
            declared,
            starts,
        })
    }

    /// True when the set was built from an empty list: nothing will ever be replaced.
    pub fn is_empty(&self) -> bool {
        self.declared == 0
    }

    /// Number of rules given to [`RuleSet::new`].
    pub fn len(&self) -> usize {
        self.declared
    }

    /// True when some rule that can match has a replacement whose length differs from its
    /// `find`: a rewritten body may then change length, and the caller must drop
    /// `Content-Length` (and send the body chunked).
    pub fn changes_length(&self) -> bool {
        self.changes_length
    }

    /// The longest `find` (among rules that can match) minus one: the most bytes a
    /// [`Replacer`] ever holds back between two chunks. 0 for an empty set.
    pub fn max_holdback(&self) -> usize {
        self.max_holdback
    }

    /// Replaces every match in a whole buffer, with the same semantics as streaming (see the
    /// module doc). Returns `Cow::Borrowed(input)` when nothing matched.
    pub fn replace_all<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        let mut hits = Vec::new();
        let mut spill = Vec::new();
        let end = self.scan(input, 0, Tail::Final, &mut spill, &mut hits);
        if hits.is_empty() {
            return Cow::Borrowed(input);
        }
        let mut out = Vec::with_capacity(self.rendered_len(0, end, &hits));
        self.render(&mut out, input, 0, end, &hits);
        Cow::Owned(out)
    }

    /// Scans `hay` from `from`, appending each committed match to `hits`. Returns where the
    /// bytes that can be emitted end: the end of `hay` ([`Tail::Final`]), the start of the
    /// held-back suffix ([`Tail::Open`]), or the end of the last committed match but at least
    /// the cut ([`Tail::Cut`]).
    ///
    /// `spill` holds the next-match cache when there are more than [`INLINE_RULES`] rules.
    fn scan(
        &self,
        hay: &[u8],
        from: usize,
        tail: Tail,
        spill: &mut Vec<usize>,
        hits: &mut Vec<Hit>,
    ) -> usize {
        // Matches starting at or after `limit` are not committed (yet).
        let mut limit = match tail {
            Tail::Final => hay.len(),
            Tail::Open => self.held_from(hay, from),
            Tail::Cut(cut) => cut,
        };
        let mut pos = from;
        let advance = |pos: usize, limit: &mut usize| {
            // A match may run past the held-back start; what it covered can no longer begin
            // a match, so look for the earliest partial match again after it.
            if matches!(tail, Tail::Open) && pos > *limit {
                *limit = self.held_from(hay, pos);
            }
        };

        if let [rule] = self.rules.as_slice() {
            // The common case (one rule, e.g. `json_schema` → `json_object`): no cache.
            while let Some(offset) = rule.finder.find(&hay[pos..]) {
                let start = pos + offset;
                if start >= limit {
                    break;
                }
                hits.push(Hit { start, rule: 0 });
                pos = start + rule.find().len();
                advance(pos, &mut limit);
            }
        } else {
            let mut inline = [NO_MATCH; INLINE_RULES];
            let next: &mut [usize] = if self.rules.len() <= INLINE_RULES {
                &mut inline[..self.rules.len()]
            } else {
                spill.clear();
                spill.resize(self.rules.len(), NO_MATCH);
                spill
            };
            for (slot, rule) in next.iter_mut().zip(&self.rules) {
                *slot = search(rule, hay, pos);
            }
            // Leftmost start wins; on a tie the first rule does (`min_by_key` keeps the first
            // of equal keys). An empty set has no candidate at all.
            while let Some((index, &start)) = next.iter().enumerate().min_by_key(|&(_, &at)| at) {
                // Ends the scan too when no rule matches any more: NO_MATCH is past every limit.
                if start >= limit {
                    break;
                }
                hits.push(Hit { start, rule: index });
                pos = start + self.rules[index].find().len();
                // Only rules whose cached match the committed one swallowed search again.
                for (slot, rule) in next.iter_mut().zip(&self.rules) {
                    if *slot != NO_MATCH && *slot < pos {
                        *slot = search(rule, hay, pos);
                    }
                }
                advance(pos, &mut limit);
            }
        }

        match tail {
            Tail::Final => hay.len(),
            Tail::Open => limit,
            Tail::Cut(cut) => pos.max(cut),
        }
    }

    /// The earliest position at or after `from` whose remainder of `hay` is a proper prefix of
    /// some rule's `find`, or `hay.len()` when there is none. Only the last `max_holdback`
    /// bytes can qualify. Shadowed rules are gone, so every such prefix could still grow into
    /// a match that wins at its position.
    fn held_from(&self, hay: &[u8], from: usize) -> usize {
        let mut at = from.max(hay.len().saturating_sub(self.max_holdback));
        // Skip to bytes that begin some `find` (usually none in the tail) before comparing.
        while let Some(offset) = hay[at..]
            .iter()
            .position(|&byte| self.starts[usize::from(byte)])
        {
            at += offset;
            let rest = &hay[at..];
            if self
                .rules
                .iter()
                .any(|rule| rule.find().len() > rest.len() && rule.find().starts_with(rest))
            {
                return at;
            }
            at += 1;
        }
        hay.len()
    }

    /// Length of `render(_, _, from, to, hits)`.
    fn rendered_len(&self, from: usize, to: usize, hits: &[Hit]) -> usize {
        let (found, replaced) = hits.iter().fold((0, 0), |(found, replaced), hit| {
            let rule = &self.rules[hit.rule];
            (found + rule.find().len(), replaced + rule.replace.len())
        });
        to - from - found + replaced
    }

    /// Appends `hay[from..to]` to `out`, each hit (all inside that range) replaced.
    fn render(&self, out: &mut Vec<u8>, hay: &[u8], from: usize, to: usize, hits: &[Hit]) {
        let mut pos = from;
        for hit in hits {
            let rule = &self.rules[hit.rule];
            out.extend_from_slice(&hay[pos..hit.start]);
            out.extend_from_slice(&rule.replace);
            pos = hit.start + rule.find().len();
        }
        out.extend_from_slice(&hay[pos..to]);
    }
}

/// Start of `rule`'s first match in `hay` at or after `from`, or [`NO_MATCH`].
fn search(rule: &Rule, hay: &[u8], from: usize) -> usize {
    rule.finder
        .find(&hay[from..])
        .map_or(NO_MATCH, |offset| from + offset)
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.declared)
            .field("searched", &self.rules.len())
            .field("max_holdback", &self.max_holdback)
            .field("changes_length", &self.changes_length)
            .finish()
    }
}

/// Per-body streaming state: feeds a body's chunks through a shared [`RuleSet`].
///
/// Holds back at most [`RuleSet::max_holdback`] bytes between calls, so the output never
/// depends on how the body was cut. Cheap to create: nothing is allocated until something is
/// held back or replaced (or, with more than 8 rules, until the first chunk).
#[derive(Debug)]
pub struct Replacer {
    rules: Arc<RuleSet>,
    /// Held-back suffix of the input seen so far; also the window where it meets the next
    /// chunk.
    carry: Vec<u8>,
    /// Matches of the chunk being processed; kept to reuse its allocation.
    hits: Vec<Hit>,
    /// Next-match cache for rule sets larger than [`INLINE_RULES`].
    spill: Vec<usize>,
    replacements: u64,
    matched_bytes: u64,
}

impl Replacer {
    /// Starts a body with nothing held back and nothing replaced.
    pub fn new(rules: Arc<RuleSet>) -> Replacer {
        Replacer {
            rules,
            carry: Vec::new(),
            hits: Vec::new(),
            spill: Vec::new(),
            replacements: 0,
            matched_bytes: 0,
        }
    }

    /// Feeds one chunk and returns the bytes ready to forward; `end` marks the body's last
    /// chunk (which may be empty) and flushes everything held back.
    ///
    /// The outputs concatenated equal [`RuleSet::replace_all`] of the inputs concatenated,
    /// however the body was cut. A chunk with no match and nothing held back is returned
    /// as-is (the same `Bytes`, no copy); when only its tail must be held back, the head is
    /// returned as a slice of it. The result may be empty when everything was held back.
    pub fn push(&mut self, chunk: Bytes, end: bool) -> Bytes {
        let tail = if end { Tail::Final } else { Tail::Open };
        let Replacer {
            rules,
            carry,
            hits,
            spill,
            ..
        } = self;
        hits.clear();

        let out = if carry.is_empty() {
            let ready = rules.scan(&chunk, 0, tail, spill, hits);
            carry.extend_from_slice(&chunk[ready..]);
            if hits.is_empty() {
                if ready == chunk.len() {
                    chunk
                } else {
                    chunk.slice(..ready)
                }
            } else {
                let mut out = Vec::with_capacity(rules.rendered_len(0, ready, hits));
                rules.render(&mut out, &chunk, 0, ready, hits);
                Bytes::from(out)
            }
        } else {
            // A match starting in the carry ends within `max_holdback` bytes of the chunk, so
            // the carry plus that much of the chunk is a window that sees all of them.
            let reach = chunk.len().min(rules.max_holdback);
            let held = carry.len();
            carry.extend_from_slice(&chunk[..reach]);
            if reach == chunk.len() {
                // The window is the whole buffer: scan it like a chunk, keep what is held.
                let ready = rules.scan(carry, 0, tail, spill, hits);
                let out = if ready == 0 {
                    Bytes::new()
                } else {
                    let mut out = Vec::with_capacity(rules.rendered_len(0, ready, hits));
                    rules.render(&mut out, carry, 0, ready, hits);
                    Bytes::from(out)
                };
                carry.drain(..ready);
                out
            } else {
                // Commit the matches that start in the carry, then go on in the chunk itself.
                let window_end = rules.scan(carry, 0, Tail::Cut(held), spill, hits);
                let window_hits = hits.len();
                let resume = window_end - held;
                let ready = rules.scan(&chunk, resume, tail, spill, hits);
                let (before, after) = hits.split_at(window_hits);
                let mut out = Vec::with_capacity(
                    rules.rendered_len(0, window_end, before)
                        + rules.rendered_len(resume, ready, after),
                );
                rules.render(&mut out, carry, 0, window_end, before);
                rules.render(&mut out, &chunk, resume, ready, after);
                carry.clear();
                carry.extend_from_slice(&chunk[ready..]);
                Bytes::from(out)
            }
        };

        self.replacements += self.hits.len() as u64;
        self.matched_bytes += self
            .hits
            .iter()
            .map(|hit| self.rules.rules[hit.rule].find().len() as u64)
            .sum::<u64>();
        out
    }

    /// Number of replacements made so far in this body.
    pub fn replacements(&self) -> u64 {
        self.replacements
    }

    /// Bytes of input consumed by the replacements made so far (the matched `find`s).
    pub fn matched_bytes(&self) -> u64 {
        self.matched_bytes
    }

    /// Bytes currently held back, waiting for the next chunk; never more than
    /// [`RuleSet::max_holdback`].
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// Forgets everything (held bytes and counters), as if just created: used when a request
    /// is retried and its body replayed from the start. Keeps allocations for reuse.
    pub fn reset(&mut self) {
        self.carry.clear();
        self.hits.clear();
        self.replacements = 0;
        self.matched_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule_set(rules: &[(&str, &str)]) -> Arc<RuleSet> {
        let rules = rules
            .iter()
            .map(|(find, replace)| (find.as_bytes().to_vec(), replace.as_bytes().to_vec()))
            .collect();
        Arc::new(RuleSet::new(rules).expect("valid rules"))
    }

    /// Feeds `chunks` through a fresh replacer, the last one with `end`, and joins the output.
    fn stream(rules: &Arc<RuleSet>, chunks: &[&[u8]]) -> Vec<u8> {
        let mut replacer = Replacer::new(rules.clone());
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            out.extend_from_slice(&replacer.push(Bytes::copy_from_slice(chunk), end));
            assert!(replacer.held() <= rules.max_holdback());
        }
        assert_eq!(replacer.held(), 0, "end=true flushes everything");
        out
    }

    /// Cuts `body` at the given offsets (taken modulo `len + 1`, sorted) into chunks, empty ones
    /// included.
    fn cut<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for at in cuts {
            chunks.push(&body[from..at]);
            from = at;
        }
        chunks.push(&body[from..]);
        chunks
    }

    /// Independent, obviously-correct reference for the semantics in the module doc.
    fn naive(rules: &[(Vec<u8>, Vec<u8>)], input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        'scan: while pos < input.len() {
            for (find, replace) in rules {
                if input[pos..].starts_with(find) {
                    out.extend_from_slice(replace);
                    pos += find.len();
                    continue 'scan;
                }
            }
            out.push(input[pos]);
            pos += 1;
        }
        out
    }

    const ALPHABET: &[u8] = b"abc\x00\xff\n";

    fn bytes_from(
        alphabet: &'static [u8],
        len: std::ops::Range<usize>,
    ) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(alphabet), len)
    }

    /// 1–3 rules with finds of 1–6 bytes drawn from `finds`, so they often share prefixes,
    /// overlap or repeat (a repeated `find` is shadowed), and replacements that may contain
    /// `a` (which must not be rescanned).
    fn rules_from(finds: &'static [u8]) -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
        prop::collection::vec((bytes_from(finds, 1..7), bytes_from(b"aXYZ", 0..7)), 1..4)
    }

    /// One piece of a generated body: a whole `find`, a proper prefix of one, or one byte.
    type Fragment = (u8, prop::sample::Index, prop::sample::Index, u8);

    fn fragments() -> impl Strategy<Value = Vec<Fragment>> {
        let piece = (
            0u8..4,
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            prop::sample::select(ALPHABET),
        );
        prop::collection::vec(piece, 0..60)
    }

    /// Builds a body where matches, near-misses and cut-off matches are common.
    fn assemble(rules: &[(Vec<u8>, Vec<u8>)], fragments: &[Fragment]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, which, len, byte) in fragments {
            let find = &rules[which.index(rules.len())].0;
            match kind {
                0 => body.extend_from_slice(find),
                1 => body.extend_from_slice(&find[..len.index(find.len())]),
                _ => body.push(*byte),
            }
        }
        body
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn streaming_equals_replace_all_for_any_cuts(
            rules in rules_from(b"abc\xff"),
            fragments in fragments(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let body = assemble(&rules, &fragments);
            let set = Arc::new(RuleSet::new(rules.clone()).expect("non-empty finds"));
            let whole = set.replace_all(&body);
            prop_assert_eq!(&whole[..], &naive(&rules, &body)[..]);
            prop_assert_eq!(stream(&set, &cut(&body, &cuts)), whole.into_owned());
        }

        #[test]
        fn streaming_equals_replace_all_for_random_bytes(
            rules in rules_from(b"abc\xff"),
            body in bytes_from(ALPHABET, 0..200),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let set = Arc::new(RuleSet::new(rules.clone()).expect("non-empty finds"));
            let whole = set.replace_all(&body);
            prop_assert_eq!(&whole[..], &naive(&rules, &body)[..]);
            prop_assert_eq!(stream(&set, &cut(&body, &cuts)), whole.into_owned());
        }

        #[test]
        fn held_bytes_are_a_possible_match_start_within_max_holdback(
            rules in rules_from(b"abc\xff"),
            fragments in fragments(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let body = assemble(&rules, &fragments);
            let set = Arc::new(RuleSet::new(rules.clone()).expect("non-empty finds"));
            let mut replacer = Replacer::new(set.clone());
            for chunk in cut(&body, &cuts) {
                replacer.push(Bytes::copy_from_slice(chunk), false);
                prop_assert!(replacer.held() <= set.max_holdback());
                let held = &replacer.carry;
                prop_assert!(
                    held.is_empty()
                        || rules.iter().any(|(find, _)| find.len() > held.len() && find.starts_with(held)),
                    "held {:?} is no proper prefix of any find", held
                );
            }
        }

        #[test]
        fn body_without_matches_comes_out_unchanged(
            rules in rules_from(b"abc"),
            body in bytes_from(b"de\x00\xff\n", 0..200),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let set = Arc::new(RuleSet::new(rules).expect("non-empty finds"));
            prop_assert_eq!(stream(&set, &cut(&body, &cuts)), body.clone());
            prop_assert!(matches!(set.replace_all(&body), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn match_split_across_a_cut_at_every_offset_is_replaced() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let body = b"{\"type\":\"json_schema\",\"x\":1}";
        for at in 0..=body.len() {
            let out = stream(&rules, &[&body[..at], &body[at..]]);
            assert_eq!(out, b"{\"type\":\"json_object\",\"x\":1}", "cut at {at}");
        }
    }

    #[test]
    fn one_byte_chunks_give_the_same_output() {
        let rules = rule_set(&[("json_schema", "json_object"), ("ab", "")]);
        let body = b"jsonjson_schemaabjson_schemjson_schema_ab";
        let chunks: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            stream(&rules, &chunks),
            rules.replace_all(body).into_owned()
        );
        assert_eq!(
            rules.replace_all(body).as_ref(),
            b"jsonjson_objectjson_schemjson_object_"
        );
    }

    #[test]
    fn overlapping_occurrences_match_leftmost_and_do_not_overlap() {
        let rules = rule_set(&[("aaa", "X")]);
        assert_eq!(rules.replace_all(b"aaaaa").as_ref(), b"Xaa");
        assert_eq!(rules.replace_all(b"aaaaaa").as_ref(), b"XX");
        assert_eq!(stream(&rules, &[b"aa", b"aaa"]), b"Xaa");
        assert_eq!(stream(&rules, &[b"a", b"a", b"a", b"a", b"a"]), b"Xaa");
    }

    #[test]
    fn first_listed_rule_wins_among_prefix_sharing_rules() {
        let short_first = rule_set(&[("ab", "1"), ("abc", "2")]);
        assert_eq!(short_first.replace_all(b"abcab").as_ref(), b"1c1");
        let long_first = rule_set(&[("abc", "2"), ("ab", "1")]);
        assert_eq!(long_first.replace_all(b"abcab").as_ref(), b"21");
        assert_eq!(stream(&long_first, &[b"ab", b"cab"]), b"21");
        assert_eq!(stream(&long_first, &[b"ab", b"d"]), b"1d");
    }

    #[test]
    fn shadowed_rule_does_not_make_a_winning_match_wait() {
        // `abc` can never win after `ab`, so a chunk ending in `ab` is replaced at once.
        let rules = rule_set(&[("ab", "1"), ("abc", "2")]);
        let mut replacer = Replacer::new(rules);
        assert_eq!(
            replacer.push(Bytes::from_static(b"xab"), false).as_ref(),
            b"x1"
        );
        assert_eq!(replacer.held(), 0);
    }

    #[test]
    fn longer_earlier_rule_blocks_a_shorter_match_until_it_fails() {
        let rules = rule_set(&[("abcd", "X"), ("bc", "Y")]);
        assert_eq!(stream(&rules, &[b"abc", b"d"]), b"X");
        assert_eq!(stream(&rules, &[b"abc", b"e"]), b"aYe");
        assert_eq!(stream(&rules, &[b"ab", b"c", b"d"]), b"X");

        let mut replacer = Replacer::new(rules);
        assert!(replacer.push(Bytes::from_static(b"abc"), false).is_empty());
        assert_eq!(replacer.held(), 3);
    }

    #[test]
    fn only_the_shortest_possible_match_start_is_held_back() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        let out = replacer.push(Bytes::from_static(b"x json json_sch"), false);
        assert_eq!(out.as_ref(), b"x json ");
        assert_eq!(replacer.held(), 8);
        let out = replacer.push(Bytes::from_static(b"ema}"), true);
        assert_eq!(out.as_ref(), b"json_object}");
    }

    #[test]
    fn sse_event_boundary_is_never_held_back() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        let event = Bytes::from_static(b"data: {\"type\":\"json_schema\"}\n\n");
        let out = replacer.push(event, false);
        assert_eq!(out.as_ref(), b"data: {\"type\":\"json_object\"}\n\n");
        assert_eq!(replacer.held(), 0);
    }

    #[test]
    fn empty_body_gives_empty_output() {
        let rules = rule_set(&[("a", "b")]);
        assert!(stream(&rules, &[b""]).is_empty());
        assert!(rules.replace_all(b"").is_empty());
    }

    #[test]
    fn empty_chunks_in_the_middle_change_nothing() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let out = stream(&rules, &[b"a json_", b"", b"sch", b"", b"", b"ema b"]);
        assert_eq!(out, b"a json_object b");
    }

    #[test]
    fn end_on_an_empty_chunk_flushes_the_carry() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        assert_eq!(
            replacer.push(Bytes::from_static(b"{json_"), false).as_ref(),
            b"{"
        );
        assert_eq!(replacer.held(), 5);
        assert_eq!(replacer.push(Bytes::new(), true).as_ref(), b"json_");
        assert_eq!(replacer.held(), 0);
    }

    #[test]
    fn non_utf8_bytes_around_a_match_pass_through() {
        let rules = Arc::new(
            RuleSet::new(vec![(b"\xff\x00k".to_vec(), b"\xc3(".to_vec())]).expect("valid"),
        );
        let body = b"\x80\xff\xff\x00k\x00\xfe";
        let expected = b"\x80\xff\xc3(\x00\xfe";
        assert_eq!(rules.replace_all(body).as_ref(), expected);
        for at in 0..=body.len() {
            assert_eq!(stream(&rules, &[&body[..at], &body[at..]]), expected);
        }
    }

    #[test]
    fn chunk_without_match_or_carry_is_returned_without_copy() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        let chunk = Bytes::from(b"data: {\"type\":\"text\"}\n\n".to_vec());
        let ptr = chunk.as_ptr();
        let out = replacer.push(chunk.clone(), false);
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out, chunk);
    }

    #[test]
    fn head_before_a_held_tail_is_a_slice_of_the_chunk() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        let chunk = Bytes::from(b"{\"type\":\"json_sch".to_vec());
        let ptr = chunk.as_ptr();
        let out = replacer.push(chunk, false);
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out.as_ref(), b"{\"type\":\"");
        assert_eq!(replacer.held(), 8);
    }

    #[test]
    fn shorter_replacement_shrinks_the_body() {
        let rules = rule_set(&[("json_schema", "js")]);
        assert!(rules.changes_length());
        assert_eq!(stream(&rules, &[b"a json_sc", b"hema b"]), b"a js b");
    }

    #[test]
    fn longer_replacement_grows_the_body() {
        let rules = rule_set(&[("ab", "a longer text")]);
        assert!(rules.changes_length());
        assert_eq!(
            stream(&rules, &[b"xa", b"bya", b"b"]),
            b"xa longer textya longer text"
        );
    }

    #[test]
    fn empty_replacement_deletes_the_match() {
        let rules = rule_set(&[("secret", "")]);
        assert_eq!(stream(&rules, &[b"a secr", b"et b secret"]), b"a  b ");
        assert_eq!(rules.replace_all(b"secretsecret").as_ref(), b"");
    }

    #[test]
    fn replacement_is_not_rescanned() {
        let rules = rule_set(&[("a", "aa"), ("b", "a")]);
        assert_eq!(stream(&rules, &[b"ab", b"a"]), b"aaaaa");
    }

    #[test]
    fn same_length_rules_keep_the_length() {
        assert!(!rule_set(&[("json_schema", "json_object")]).changes_length());
        assert!(!rule_set(&[]).changes_length());
    }

    #[test]
    fn empty_find_is_rejected_with_its_index() {
        let err = RuleSet::new(vec![
            (b"a".to_vec(), b"b".to_vec()),
            (b"c".to_vec(), b"d".to_vec()),
            (Vec::new(), b"x".to_vec()),
        ])
        .expect_err("empty find");
        assert_eq!(err, RuleError::EmptyFind { index: 2 });
        assert_eq!(err.to_string(), "rule 2: `find` must not be empty");
    }

    #[test]
    fn repeated_find_is_accepted_and_the_first_one_wins() {
        let rules = rule_set(&[("json", "a"), ("json", "b")]);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules.replace_all(b"json json").as_ref(), b"a a");
        assert_eq!(stream(&rules, &[b"js", b"on j", b"son"]), b"a a");
    }

    #[test]
    fn sizes_and_holdback_describe_the_rules() {
        let rules = rule_set(&[("json_schema", "json_object"), ("ab", "c")]);
        assert_eq!(rules.len(), 2);
        assert!(!rules.is_empty());
        assert_eq!(rules.max_holdback(), 10);
        let none = rule_set(&[]);
        assert!(none.is_empty());
        assert_eq!(none.max_holdback(), 0);
    }

    #[test]
    fn replace_all_borrows_when_nothing_matched() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let body = b"{\"type\":\"json_object\"}";
        assert!(matches!(rules.replace_all(body), Cow::Borrowed(b) if b.as_ptr() == body.as_ptr()));
        assert!(matches!(rules.replace_all(b"json_schema"), Cow::Owned(_)));
    }

    #[test]
    fn reset_forgets_the_carry_and_the_counters() {
        let rules = rule_set(&[("json_schema", "json_object")]);
        let mut replacer = Replacer::new(rules);
        replacer.push(Bytes::from_static(b"json_schema json_"), false);
        assert_eq!(replacer.replacements(), 1);
        assert_eq!(replacer.matched_bytes(), 11);
        assert_eq!(replacer.held(), 5);
        replacer.reset();
        assert_eq!(
            (
                replacer.replacements(),
                replacer.matched_bytes(),
                replacer.held()
            ),
            (0, 0, 0)
        );
        assert_eq!(
            replacer.push(Bytes::from_static(b"schema"), true).as_ref(),
            b"schema"
        );
    }

    #[test]
    fn counters_add_up_across_chunks() {
        let rules = rule_set(&[("json_schema", "json_object"), ("ab", "")]);
        let mut replacer = Replacer::new(rules);
        replacer.push(Bytes::from_static(b"json_sc"), false);
        replacer.push(Bytes::from_static(b"hema a"), false);
        replacer.push(Bytes::from_static(b"b"), true);
        assert_eq!(replacer.replacements(), 2);
        assert_eq!(replacer.matched_bytes(), 13);
    }

    #[test]
    fn rule_set_is_shared_across_threads_and_replacer_moves_between_them() {
        fn shared<T: Send + Sync>() {}
        fn moved<T: Send>() {}
        shared::<RuleSet>();
        moved::<Replacer>();
    }

    #[test]
    fn many_rules_use_the_spilled_cache_correctly() {
        let rules: Vec<(Vec<u8>, Vec<u8>)> = (0..20u8)
            .map(|i| (vec![b'k', b'a' + i, b'z'], vec![b'A' + i]))
            .collect();
        let set = Arc::new(RuleSet::new(rules.clone()).expect("valid"));
        let body: Vec<u8> = (0..400u32)
            .flat_map(|i| [b'k', b'a' + (i % 23) as u8, b'z', b'.'])
            .collect();
        let expected = naive(&rules, &body);
        assert_eq!(set.replace_all(&body).as_ref(), &expected[..]);
        let chunks: Vec<&[u8]> = body.chunks(7).collect();
        assert_eq!(stream(&set, &chunks), expected);
    }
}
