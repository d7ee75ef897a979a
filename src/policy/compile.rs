//! Content policies compiled once at start into one matcher per side.
//!
//! A [`PolicySpec`] is the plain description of one policy (the config section builds these);
//! [`PolicySet::compile`] turns a list of them into a [`PolicySet`], refusing a bad one with a
//! [`PolicyError`] that names it. Per side (request, response) the set holds one [`RegexSet`] over
//! every policy of that side, so deciding which policies match a text is a single linear-time
//! pass however many policies there are; only a policy that matched, and only a `redact` one, runs
//! its own [`Regex`] afterwards, to find the spans to replace.
//!
//! The engine is the `regex` crate (finite automata: time linear in the text, no backtracking), and
//! each pattern's compiled size is capped ([`REGEX_SIZE_LIMIT_BYTES`]), so a pattern that would be
//! huge (`a{1000}{1000}`) is refused here rather than slow or memory-hungry at request time.

use std::fmt;
use std::sync::Arc;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::{Anchored, Input};

use crate::transform::structured::glob_match;

/// The most memory one compiled pattern may take. The `regex` crate's own default is 10 MiB;
/// policies are short literals and token shapes, which need a few KiB.
pub const REGEX_SIZE_LIMIT_BYTES: usize = 1 << 20;

/// The replacement text `redact` uses when the config gives none.
pub const DEFAULT_REPLACEMENT: &str = "[REDACTED]";

/// Longest accepted policy name. Names appear in logs, error messages and metric labels.
const MAX_NAME_BYTES: usize = 64;

/// Which side of an exchange a policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client's request: the `content` of every message.
    Request,
    /// The upstream's answer: assistant `content` and `reasoning_content`, JSON or SSE.
    Response,
}

impl Side {
    /// `"request"` or `"response"`, as the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Request => "request",
            Side::Response => "response",
        }
    }
}

/// What a policy matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// A regular expression in the `regex` crate's syntax (no look-around, no back-references).
    Regex(String),
    /// Literal words or phrases, matched case-insensitively anywhere in the text.
    Words(Vec<String>),
}

/// What happens when a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse: a request gets a 400, a response becomes (or a stream ends with) an error.
    Block,
    /// Replace every matched span with the policy's replacement text.
    Redact,
    /// Forward untouched; the caller counts and logs the policy's name.
    Flag,
}

impl Action {
    /// `"block"`, `"redact"` or `"flag"`, as the config spells it (and for metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Flag => "flag",
        }
    }
}

/// One policy as configured, before compilation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Unique name: letters, digits, `-`, `_` and `.`, at most 64 bytes. The only thing about a
    /// policy that reaches logs, metrics and error bodies (never the matched text).
    pub name: String,
    /// The sides it applies to; at least one.
    pub sides: Vec<Side>,
    /// What it matches.
    pub pattern: Pattern,
    /// What it does on a match.
    pub action: Action,
    /// For [`Action::Redact`]: the literal text put in place of each match (`$` is not special).
    /// Ignored by the other actions.
    pub replacement: String,
    /// Globs on the request's `model` (`*` any run, `?` one character); empty means every model.
    pub models: Vec<String>,
}

/// Why [`PolicySet::compile`] refused a policy. Its `Display` is one line naming the policy:
/// `policies[2] (no-keys-out): invalid regex: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// 0-based position of the policy in the list.
    pub index: usize,
    /// The policy's name as given.
    pub name: String,
    /// What is wrong with it.
    pub kind: PolicyErrorKind,
}

/// What is wrong with a refused policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyErrorKind {
    /// The name is empty, too long, or has characters other than letters, digits, `-_.`.
    InvalidName,
    /// An earlier policy has the same name.
    DuplicateName,
    /// `on` names no side.
    NoSides,
    /// `words` is empty or holds an empty word.
    EmptyWords,
    /// A `models` glob is empty.
    EmptyModelGlob,
    /// The regex does not parse, or compiles larger than [`REGEX_SIZE_LIMIT_BYTES`]. The text is
    /// the `regex` crate's explanation, on one line.
    InvalidRegex(String),
    /// The pattern matches the empty text, so it would match everywhere.
    MatchesEmpty,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PolicyErrorKind::InvalidName => {
                write!(f, "policies[{}] ({:?}): ", self.index, self.name)?
            }
            _ => write!(f, "policies[{}] ({}): ", self.index, self.name)?,
        }
        match &self.kind {
            PolicyErrorKind::InvalidName => write!(
                f,
                "name must be 1 to {MAX_NAME_BYTES} letters, digits, `-`, `_` or `.`"
            ),
            PolicyErrorKind::DuplicateName => f.write_str("name is used by an earlier policy"),
            PolicyErrorKind::NoSides => {
                f.write_str("`on` must name at least one side (request, response)")
            }
            PolicyErrorKind::EmptyWords => f.write_str("`words` must hold non-empty words"),
            PolicyErrorKind::EmptyModelGlob => f.write_str("`models` must not hold an empty glob"),
            PolicyErrorKind::InvalidRegex(why) => write!(f, "invalid regex: {why}"),
            PolicyErrorKind::MatchesEmpty => {
                f.write_str("pattern matches the empty text, so it would match everywhere")
            }
        }
    }
}

impl std::error::Error for PolicyError {}

/// One compiled policy.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) name: Arc<str>,
    pub(crate) action: Action,
    pub(crate) replacement: Box<str>,
    /// Empty: every model.
    models: Box<[Box<str>]>,
    /// The policy's own matcher, for redaction spans.
    pub(crate) regex: Regex,
}

impl Compiled {
    fn applies_to(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|glob| glob_match(glob, model))
    }
}

/// The policies of one side and the [`RegexSet`] that runs them all in one pass.
#[derive(Debug)]
pub(crate) struct SidePolicies {
    /// Pattern `i` of `set` is `policies[i]`'s.
    set: RegexSet,
    pub(crate) policies: Vec<Arc<Compiled>>,
    /// Whether every policy of this side applies to every model (no per-request mask needed).
    all_models: bool,
    /// The same patterns as one lazy DFA, for [`SidePolicies::live_start`]; `None` when it
    /// could not be built (the caller then holds its whole window).
    prefix: Option<DFA>,
}

/// Which of a side's policies apply to one request's model.
#[derive(Debug, Clone)]
pub(crate) enum Active {
    /// All of them (the common case: no `models` globs); costs nothing to build.
    All,
    /// `mask[i]`: whether policy `i` applies.
    Some(Box<[bool]>),
}

impl Active {
    pub(crate) fn contains(&self, index: usize) -> bool {
        match self {
            Active::All => true,
            Active::Some(mask) => mask.get(index).copied().unwrap_or(false),
        }
    }
}

/// What one evaluation of a text found, as policy indices in config order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Hits {
    /// The first `block` policy that matched.
    pub(crate) block: Option<usize>,
    pub(crate) flags: Vec<usize>,
    pub(crate) redacts: Vec<usize>,
}

/// A span of a text to replace, and the policy whose replacement goes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) policy: usize,
}

impl SidePolicies {
    /// The policies that apply to `model` (absent model: `""`, which only `*`-like globs match),
    /// or `None` when none does, so the caller can skip the side entirely.
    pub(crate) fn active(&self, model: Option<&str>) -> Option<Active> {
        if self.all_models {
            return Some(Active::All);
        }
        let model = model.unwrap_or("");
        let mask: Box<[bool]> = self.policies.iter().map(|p| p.applies_to(model)).collect();
        mask.iter().any(|&on| on).then_some(Active::Some(mask))
    }

    /// Runs every policy of the side over `haystack[start..]` in one pass (the bytes before
    /// `start` are context for `\b` and `^`, never matched). `None` when no active policy matched,
    /// which allocates nothing.
    pub(crate) fn hits(&self, active: &Active, haystack: &str, start: usize) -> Option<Hits> {
        if !self.set.is_match_at(haystack, start) {
            return None;
        }
        let mut hits = Hits::default();
        for index in self.set.matches_at(haystack, start).iter() {
            if !active.contains(index) {
                continue;
            }
            match self.policies[index].action {
                Action::Block => {
                    hits.block.get_or_insert(index);
                }
                Action::Flag => hits.flags.push(index),
                Action::Redact => hits.redacts.push(index),
            }
        }
        (hits.block.is_some() || !hits.flags.is_empty() || !hits.redacts.is_empty()).then_some(hits)
    }

    /// The spans of `haystack[start..]` the `redacts` policies replace, sorted and merged: where
    /// two overlap, the union is replaced once, by the replacement of the one starting first (on
    /// a tie, the one listed first). Offsets are into `haystack`. Empty matches are skipped.
    pub(crate) fn redact_spans(
        &self,
        redacts: &[usize],
        haystack: &str,
        start: usize,
        out: &mut Vec<Span>,
    ) {
        out.clear();
        for &policy in redacts {
            let regex = &self.policies[policy].regex;
            let mut at = start;
            while at <= haystack.len() {
                let Some(found) = regex.find_at(haystack, at) else {
                    break;
                };
                if found.is_empty() {
                    // Only a pattern like `\b` matches empty text here; step past one character.
                    at = found.end()
                        + haystack[found.end()..]
                            .chars()
                            .next()
                            .map_or(1, char::len_utf8);
                    continue;
                }
                out.push(Span {
                    start: found.start(),
                    end: found.end(),
                    policy,
                });
                at = found.end();
            }
        }
        out.sort_unstable_by_key(|span| (span.start, span.policy));
        let mut merged = 0;
        for i in 0..out.len() {
            if merged > 0 && out[i].start < out[merged - 1].end {
                out[merged - 1].end = out[merged - 1].end.max(out[i].end);
            } else {
                out[merged] = out[i];
                merged += 1;
            }
        }
        out.truncate(merged);
    }

    /// A cache for [`live_start`](Self::live_start), one per stream.
    pub(crate) fn prefix_cache(&self) -> Option<Cache> {
        self.prefix.as_ref().map(DFA::create_cache)
    }

    /// The first character boundary `p` in `from..haystack.len()` where a match of some policy
    /// may begin and still be unfinished at the end of `haystack` (more text could complete or
    /// extend it), or `haystack.len()` when there is none: the text before `p` can be released
    /// now without ever cutting a match. Each start is stepped through the DFA until it dies,
    /// so the cost is the total length of those runs (usually one byte each). Without a DFA, or
    /// when it gives up (a Unicode `\b` on non-ASCII text), `from` is returned: hold it all.
    pub(crate) fn live_start(
        &self,
        cache: &mut Option<Cache>,
        haystack: &str,
        from: usize,
    ) -> usize {
        let (Some(dfa), Some(cache)) = (self.prefix.as_ref(), cache.as_mut()) else {
            return from;
        };
        let bytes = haystack.as_bytes();
        let mut p = from;
        while p < bytes.len() {
            if haystack.is_char_boundary(p) {
                match alive_to_end(dfa, cache, haystack, p) {
                    Some(false) => {}
                    Some(true) | None => return p,
                }
            }
            p += 1;
        }
        bytes.len()
    }

    pub(crate) fn name(&self, index: usize) -> &Arc<str> {
        &self.policies[index].name
    }

    pub(crate) fn replacement(&self, index: usize) -> &str {
        &self.policies[index].replacement
    }
}

/// Whether the anchored search from `start` is still alive after the last byte of `haystack`
/// (`None`: the DFA gave up).
fn alive_to_end(dfa: &DFA, cache: &mut Cache, haystack: &str, start: usize) -> Option<bool> {
    let input = Input::new(haystack).range(start..).anchored(Anchored::Yes);
    let mut sid = dfa.start_state_forward(cache, &input).ok()?;
    for &byte in &haystack.as_bytes()[start..] {
        sid = dfa.next_state(cache, sid, byte).ok()?;
        if sid.is_dead() {
            return Some(false);
        }
        if sid.is_quit() {
            return None;
        }
    }
    Some(true)
}

/// Every configured policy, compiled: built once at start, shared (in an `Arc`) by all requests.
#[derive(Debug)]
pub struct PolicySet {
    pub(crate) request: Option<SidePolicies>,
    pub(crate) response: Option<SidePolicies>,
}

impl PolicySet {
    /// A stable description of every compiled policy (side, name, action, replacement, model
    /// globs, pattern), for keys that must change whenever the policies do (the response
    /// cache's): the same configuration gives the same text in every process.
    pub fn fingerprint(&self) -> String {
        let mut out = String::new();
        for (side, policies) in [("request", &self.request), ("response", &self.response)] {
            for p in policies.iter().flat_map(|s| s.policies.iter()) {
                out.push_str(&format!(
                    "{side}|{}|{}|{:?}|{:?}|{:?};",
                    p.name,
                    p.action.as_str(),
                    p.replacement,
                    p.models,
                    p.regex.as_str()
                ));
            }
        }
        out
    }

    /// Compiles `specs` (in config order, which is also the order of precedence among policies
    /// that match the same text). Refuses the first bad policy, naming it.
    ///
    /// ```
    /// use arkgate::policy::{Action, Pattern, PolicySet, PolicySpec, Side};
    /// let set = PolicySet::compile(vec![PolicySpec {
    ///     name: "no-keys-out".into(),
    ///     sides: vec![Side::Request, Side::Response],
    ///     pattern: Pattern::Regex("sk-[A-Za-z0-9]{20,}".into()),
    ///     action: Action::Redact,
    ///     replacement: "[REDACTED]".into(),
    ///     models: vec!["*".into()],
    /// }])
    /// .expect("valid policy");
    /// assert!(set.has(Side::Request) && set.has(Side::Response));
    /// ```
    pub fn compile(specs: Vec<PolicySpec>) -> Result<PolicySet, PolicyError> {
        let mut request = Vec::new();
        let mut response = Vec::new();
        let mut names: Vec<&str> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let fail = |kind| PolicyError {
                index,
                name: spec.name.clone(),
                kind,
            };
            let name_ok = !spec.name.is_empty()
                && spec.name.len() <= MAX_NAME_BYTES
                && spec
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !name_ok {
                return Err(fail(PolicyErrorKind::InvalidName));
            }
            if names.contains(&spec.name.as_str()) {
                return Err(fail(PolicyErrorKind::DuplicateName));
            }
            names.push(&spec.name);
            if spec.sides.is_empty() {
                return Err(fail(PolicyErrorKind::NoSides));
            }
            if spec.models.iter().any(String::is_empty) {
                return Err(fail(PolicyErrorKind::EmptyModelGlob));
            }
            let source =
                pattern_source(&spec.pattern).ok_or_else(|| fail(PolicyErrorKind::EmptyWords))?;
            let regex = RegexBuilder::new(&source)
                .size_limit(REGEX_SIZE_LIMIT_BYTES)
                .build()
                .map_err(|e| fail(PolicyErrorKind::InvalidRegex(one_line(&e.to_string()))))?;
            if regex.is_match("") {
                return Err(fail(PolicyErrorKind::MatchesEmpty));
            }
            let all_models = spec.models.is_empty() || spec.models.iter().any(|g| g == "*");
            let compiled = Arc::new(Compiled {
                name: Arc::from(spec.name.as_str()),
                action: spec.action,
                replacement: spec.replacement.as_str().into(),
                models: if all_models {
                    Box::default()
                } else {
                    spec.models.iter().map(|g| g.as_str().into()).collect()
                },
                regex,
            });
            if spec.sides.contains(&Side::Request) {
                request.push((index, source.clone(), Arc::clone(&compiled)));
            }
            if spec.sides.contains(&Side::Response) {
                response.push((index, source, compiled));
            }
        }
        Ok(PolicySet {
            request: side(request, &specs)?,
            response: side(response, &specs)?,
        })
    }

    /// Whether any policy looks at `side`. When false, the caller skips that side entirely (no
    /// body is read as JSON, no stream is held back).
    pub fn has(&self, side: Side) -> bool {
        self.side(side).is_some()
    }

    /// Whether any policy on `side` applies to requests for `model` (absent: `""`).
    pub fn applies(&self, side: Side, model: Option<&str>) -> bool {
        self.side(side).is_some_and(|s| s.active(model).is_some())
    }

    /// Whether no policy is configured at all.
    pub fn is_empty(&self) -> bool {
        self.request.is_none() && self.response.is_none()
    }

    pub(crate) fn side(&self, side: Side) -> Option<&SidePolicies> {
        match side {
            Side::Request => self.request.as_ref(),
            Side::Response => self.response.as_ref(),
        }
    }
}

/// Builds one side's `RegexSet` from its policies (`(config index, source, compiled)`).
fn side(
    policies: Vec<(usize, String, Arc<Compiled>)>,
    specs: &[PolicySpec],
) -> Result<Option<SidePolicies>, PolicyError> {
    if policies.is_empty() {
        return Ok(None);
    }
    let set = RegexSetBuilder::new(policies.iter().map(|(_, source, _)| source))
        .size_limit(REGEX_SIZE_LIMIT_BYTES.saturating_mul(policies.len()))
        .build()
        .map_err(|e| {
            // Each pattern compiled alone within its limit, so this is the combined size; name
            // the last policy, the one that tipped it over.
            let (index, _, _) = policies[policies.len() - 1];
            PolicyError {
                index,
                name: specs[index].name.clone(),
                kind: PolicyErrorKind::InvalidRegex(one_line(&e.to_string())),
            }
        })?;
    let all_models = policies.iter().all(|(_, _, p)| p.models.is_empty());
    let sources: Vec<&str> = policies.iter().map(|(_, s, _)| s.as_str()).collect();
    let prefix = DFA::builder()
        .configure(DFA::config().unicode_word_boundary(true))
        .build_many(&sources)
        .ok();
    Ok(Some(SidePolicies {
        prefix,
        set,
        policies: policies.into_iter().map(|(_, _, p)| p).collect(),
        all_models,
    }))
}

/// The regex source of a pattern; for words, an escaped case-insensitive alternation. `None` for
/// an empty word list or an empty word.
fn pattern_source(pattern: &Pattern) -> Option<String> {
    match pattern {
        Pattern::Regex(source) => Some(source.clone()),
        Pattern::Words(words) => {
            if words.is_empty() || words.iter().any(String::is_empty) {
                return None;
            }
            let escaped: Vec<String> = words.iter().map(|w| regex::escape(w)).collect();
            Some(format!("(?i:{})", escaped.join("|")))
        }
    }
}

/// The `regex` crate explains syntax errors over several lines (pattern, caret, message); config
/// errors are one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(name: &str, pattern: Pattern, action: Action) -> PolicySpec {
        PolicySpec {
            name: name.into(),
            sides: vec![Side::Request, Side::Response],
            pattern,
            action,
            replacement: DEFAULT_REPLACEMENT.into(),
            models: vec![],
        }
    }

    fn regex(source: &str) -> Pattern {
        Pattern::Regex(source.into())
    }

    fn error_of(specs: Vec<PolicySpec>) -> String {
        match PolicySet::compile(specs) {
            Ok(_) => panic!("expected a refusal"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_fingerprint_is_stable_and_changes_with_any_policy_field() {
        let make = |replacement: &str| {
            let mut s = spec("keys", regex("sk-[a-z]{4}"), Action::Redact);
            s.replacement = replacement.into();
            PolicySet::compile(vec![s]).expect("valid")
        };
        assert_eq!(make("[X]").fingerprint(), make("[X]").fingerprint());
        assert_ne!(make("[X]").fingerprint(), make("[Y]").fingerprint());
        let block = PolicySet::compile(vec![spec("keys", regex("sk-[a-z]{4}"), Action::Block)])
            .expect("valid");
        assert_ne!(block.fingerprint(), make("[X]").fingerprint());
    }

    #[test]
    fn a_bad_regex_is_refused_naming_the_policy() {
        let message = error_of(vec![
            spec("a", regex("x"), Action::Flag),
            spec("b", regex("y"), Action::Flag),
            spec("no-keys-out", regex("sk-[A-Z"), Action::Redact),
        ]);
        assert!(
            message.starts_with("policies[2] (no-keys-out): invalid regex: "),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn a_pattern_too_large_to_compile_is_refused_at_start() {
        let message = error_of(vec![spec("huge", regex("a{1000}{1000}"), Action::Block)]);
        assert!(
            message.starts_with("policies[0] (huge): invalid regex: "),
            "{message}"
        );
        assert!(message.contains("size limit"), "{message}");
    }

    #[test]
    fn other_bad_policies_are_refused_with_their_reason() {
        let cases = [
            (
                spec("", regex("x"), Action::Flag),
                "policies[0] (\"\"): name must be",
            ),
            (
                spec("a b", regex("x"), Action::Flag),
                "policies[0] (\"a b\"): name must be",
            ),
            (
                spec("e", regex("x*"), Action::Flag),
                "policies[0] (e): pattern matches the empty",
            ),
            (
                spec("w", Pattern::Words(vec![]), Action::Flag),
                "policies[0] (w): `words` must hold",
            ),
            (
                spec(
                    "w",
                    Pattern::Words(vec!["ok".into(), String::new()]),
                    Action::Flag,
                ),
                "policies[0] (w): `words` must hold",
            ),
            (
                PolicySpec {
                    sides: vec![],
                    ..spec("s", regex("x"), Action::Flag)
                },
                "policies[0] (s): `on` must name",
            ),
            (
                PolicySpec {
                    models: vec![String::new()],
                    ..spec("m", regex("x"), Action::Flag)
                },
                "policies[0] (m): `models` must not",
            ),
        ];
        for (bad, want) in cases {
            let message = error_of(vec![bad]);
            assert!(message.starts_with(want), "{message} / {want}");
        }
        let message = error_of(vec![
            spec("dup", regex("x"), Action::Flag),
            spec("dup", regex("y"), Action::Flag),
        ]);
        assert_eq!(
            message,
            "policies[1] (dup): name is used by an earlier policy"
        );
    }

    #[test]
    fn words_are_case_insensitive_literals() {
        let set = PolicySet::compile(vec![spec(
            "words",
            Pattern::Words(vec!["internal.example".into(), "a+b".into()]),
            Action::Redact,
        )])
        .expect("valid");
        let side = set.side(Side::Request).expect("request side");
        let text = "see INTERNAL.Example and a+b, not internalXexample or aab";
        let hits = side.hits(&Active::All, text, 0).expect("matches");
        let mut spans = Vec::new();
        side.redact_spans(&hits.redacts, text, 0, &mut spans);
        let found: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
        assert_eq!(found, ["INTERNAL.Example", "a+b"]);
    }

    #[test]
    fn one_pass_reports_every_matching_policy_by_action() {
        let set = PolicySet::compile(vec![
            spec("flag-1", regex("alpha"), Action::Flag),
            spec("block-1", regex("beta"), Action::Block),
            spec("redact-1", regex("gamma"), Action::Redact),
            spec("block-2", regex("alpha"), Action::Block),
            spec("quiet", regex("delta"), Action::Flag),
        ])
        .expect("valid");
        let side = set.side(Side::Response).expect("response side");
        let hits = side
            .hits(&Active::All, "alpha beta gamma", 0)
            .expect("matches");
        assert_eq!(hits.block, Some(1));
        assert_eq!(hits.flags, [0]);
        assert_eq!(hits.redacts, [2]);
        assert_eq!(side.hits(&Active::All, "nothing here", 0), None);
    }

    #[test]
    fn overlapping_redactions_merge_and_the_first_starting_wins() {
        let set = PolicySet::compile(vec![
            PolicySpec {
                replacement: "<B>".into(),
                ..spec("b", regex("cdef"), Action::Redact)
            },
            PolicySpec {
                replacement: "<A>".into(),
                ..spec("a", regex("abcd"), Action::Redact)
            },
        ])
        .expect("valid");
        let side = set.side(Side::Request).expect("request side");
        let text = "xxabcdefyy";
        let hits = side.hits(&Active::All, text, 0).expect("matches");
        let mut spans = Vec::new();
        side.redact_spans(&hits.redacts, text, 0, &mut spans);
        assert_eq!(
            spans,
            [Span {
                start: 2,
                end: 8,
                policy: 1
            }]
        );
        assert_eq!(side.replacement(spans[0].policy), "<A>");
    }

    #[test]
    fn sides_and_model_globs_select_policies() {
        let set = PolicySet::compile(vec![
            PolicySpec {
                sides: vec![Side::Request],
                models: vec!["deepseek-*".into()],
                ..spec("ds-only", regex("x"), Action::Flag)
            },
            PolicySpec {
                sides: vec![Side::Request],
                ..spec("all", regex("y"), Action::Flag)
            },
        ])
        .expect("valid");
        assert!(set.has(Side::Request));
        assert!(!set.has(Side::Response));
        assert!(!set.applies(Side::Response, Some("deepseek-v3")));
        let side = set.side(Side::Request).expect("request side");
        let ds = side.active(Some("deepseek-v3")).expect("applies");
        let other = side.active(Some("doubao-pro")).expect("applies");
        assert!(side.hits(&ds, "x", 0).is_some());
        assert_eq!(side.hits(&other, "x", 0), None);
        assert!(side.hits(&other, "y", 0).is_some());

        let only = PolicySet::compile(vec![PolicySpec {
            models: vec!["deepseek-*".into()],
            ..spec("ds-only", regex("x"), Action::Flag)
        }])
        .expect("valid");
        assert!(only.applies(Side::Request, Some("deepseek-r1")));
        assert!(!only.applies(Side::Request, Some("doubao-pro")));
        assert!(!only.applies(Side::Request, None));
    }

    #[test]
    fn context_before_start_is_seen_but_never_matched() {
        let set = PolicySet::compile(vec![spec("word", regex(r"\bkey\b"), Action::Redact)])
            .expect("valid");
        let side = set.side(Side::Request).expect("request side");
        // "monkey": the `k` at 3 follows a letter, so `\bkey` does not match there.
        assert_eq!(side.hits(&Active::All, "monkey", 3), None);
        assert!(side.hits(&Active::All, "a key", 1).is_some());
    }

    #[test]
    fn a_pathological_pattern_runs_in_linear_time_on_five_megabytes() {
        let set =
            PolicySet::compile(vec![spec("evil", regex("(a+)+$"), Action::Redact)]).expect("valid");
        let side = set.side(Side::Request).expect("request side");
        // Catastrophic for a backtracking engine: all `a`s, then a character that fails `$`.
        let mut text = "a".repeat(5 << 20);
        text.push('!');
        let started = std::time::Instant::now();
        assert_eq!(side.hits(&Active::All, &text, 0), None);
        text.pop();
        let hits = side.hits(&Active::All, &text, 0).expect("all a's match");
        let mut spans = Vec::new();
        side.redact_spans(&hits.redacts, &text, 0, &mut spans);
        assert_eq!(
            spans,
            [Span {
                start: 0,
                end: 5 << 20,
                policy: 0
            }]
        );
        // A backtracking engine would not finish this in any bound; a linear one takes well
        // under a second even unoptimised.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
