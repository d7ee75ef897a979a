//! TEMPORARY stand-in (replaced by the real replacer).
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::sync::Arc;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleError { EmptyFind { index: usize }, DuplicateFind { index: usize } }
impl std::fmt::Display for RuleError { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") } }
impl std::error::Error for RuleError {}
#[derive(Debug)]
pub struct RuleSet { rules: Vec<(Vec<u8>, Vec<u8>)> }
impl RuleSet {
    pub fn new(rules: Vec<(Vec<u8>, Vec<u8>)>) -> Result<RuleSet, RuleError> {
        for (i, r) in rules.iter().enumerate() { if r.0.is_empty() { return Err(RuleError::EmptyFind { index: i }); } }
        Ok(RuleSet { rules }) }
    pub fn is_empty(&self) -> bool { self.rules.is_empty() }
    pub fn len(&self) -> usize { self.rules.len() }
    pub fn changes_length(&self) -> bool { self.rules.iter().any(|(a, b)| a.len() != b.len()) }
    pub fn max_holdback(&self) -> usize { self.rules.iter().map(|r| r.0.len()).max().unwrap_or(1) - 1 }
    pub fn replace_all<'a>(&self, input: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Vec::new(); let mut i = 0; let mut changed = false;
        'outer: while i < input.len() { for (f, r) in &self.rules { if input[i..].starts_with(f) { out.extend_from_slice(r); i += f.len(); changed = true; continue 'outer; } } out.push(input[i]); i += 1; }
        if changed { Cow::Owned(out) } else { Cow::Borrowed(input) } }
}
pub struct Replacer { rules: Arc<RuleSet>, buf: BytesMut, n: u64 }
impl Replacer {
    pub fn new(rules: Arc<RuleSet>) -> Replacer { Replacer { rules, buf: BytesMut::new(), n: 0 } }
    pub fn push(&mut self, chunk: Bytes, end: bool) -> Bytes {
        self.buf.extend_from_slice(&chunk); if !end { return Bytes::new(); }
        let all = std::mem::take(&mut self.buf); let out = self.rules.replace_all(&all).into_owned(); if out != all.as_ref() { self.n += 1; } Bytes::from(out) }
    pub fn replacements(&self) -> u64 { self.n }
    pub fn held(&self) -> usize { self.buf.len() }
    pub fn reset(&mut self) { self.buf.clear(); }
}
