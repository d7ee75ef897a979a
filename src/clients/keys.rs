//! Client keys: the table of configured keys (by SHA-256 hash, never the token itself), the
//! lookup of a request's bearer token in it, and the making of new keys.
//!
//! # Why the lookup leaks nothing about near matches
//! The token is hashed first, and only the 32-byte hashes are compared: a token that shares a
//! prefix with a valid one has a hash unrelated to that key's, so even a timing difference in
//! the comparison would tell an attacker nothing about the token. On top of that, every entry
//! is compared in full (four 64-bit XORs ORed together, no branch, then [`subtle`]'s
//! constant-time equality on the result) and the match, if any, is picked with a constant-time
//! select, so the time taken depends only on the number of entries, not on which entry matched
//! or how many bytes of any hash agreed. The one data-dependent branch is
//! the final "found or not", which the response (200 or 401) reveals anyway.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::ratelimit::Limits;

/// The prefix of keys made by [`new_key`], so a leaked one is recognisable in a scan.
pub const KEY_PREFIX: &str = "ak-";
/// Random bytes in a key made by [`new_key`].
pub const KEY_RANDOM_BYTES: usize = 32;
/// Base-62 digits that hold [`KEY_RANDOM_BYTES`] (62^43 > 2^256).
const KEY_DIGITS: usize = 43;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// One configured key as the config file gives it (`clients.keys[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// A name for logs, metrics and the limiter (never secret).
    pub name: String,
    /// SHA-256 of the bearer token, 64 hex digits.
    pub key_sha256: String,
    /// Requests per minute; 0 = unlimited.
    pub rpm: u64,
    /// Tokens per minute; 0 = unlimited.
    pub tpm: u64,
    /// Tokens per UTC day; 0 = unlimited.
    pub daily_tokens: u64,
}

/// A validated key: its name, its hash and its limits.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// The configured name.
    pub name: String,
    /// SHA-256 of the bearer token.
    pub hash: [u8; 32],
    /// Its limits (0 = unlimited in each).
    pub limits: Limits,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash identifies the key: keep it out of debug output and so out of logs.
        f.debug_struct("ClientKey")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The configured keys, looked up by a request's bearer token.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    keys: Vec<ClientKey>,
}

impl KeyTable {
    /// Validates `entries`: every `key_sha256` 64 hex digits, names non-empty and unique, hashes
    /// unique. Errors name the entry by position and name, never by hash.
    pub fn new(entries: Vec<KeyEntry>) -> Result<KeyTable, String> {
        let mut keys: Vec<ClientKey> = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let at = format!("clients.keys[{i}]");
            if e.name.trim().is_empty() {
                return Err(format!("{at}.name: must not be empty"));
            }
            let hash = parse_hash(&e.key_sha256).ok_or_else(|| {
                format!(
                    "{at}.key_sha256 ({}): must be 64 hex digits (the SHA-256 of the key; \
                     `arkgate key hash` prints it)",
                    e.name
                )
            })?;
            if let Some(other) = keys.iter().find(|k| k.name == e.name) {
                return Err(format!("{at}.name: {} is used twice", other.name));
            }
            if let Some(other) = keys.iter().find(|k| k.hash == hash) {
                return Err(format!(
                    "{at}.key_sha256 ({}): the same key as {}",
                    e.name, other.name
                ));
            }
            keys.push(ClientKey {
                name: e.name,
                hash,
                limits: Limits {
                    rpm: e.rpm,
                    tpm: e.tpm,
                    daily_tokens: e.daily_tokens,
                },
            });
        }
        Ok(KeyTable { keys })
    }

    /// The entry whose hash is SHA-256(`bearer`), compared in constant time against every
    /// entry (see the module doc).
    pub fn lookup(&self, bearer: &[u8]) -> Option<&ClientKey> {
        let hash: [u8; 32] = Sha256::digest(bearer).into();
        // Index + 1 of the match, 0 for none; hashes are unique, so at most one matches.
        let mut found = 0u32;
        let wanted = words(&hash);
        for (i, key) in self.keys.iter().enumerate() {
            let candidate = u32::try_from(i + 1).unwrap_or(u32::MAX);
            found.conditional_assign(&candidate, same_hash(&words(&key.hash), &wanted));
        }
        let index = usize::try_from(found).ok()?.checked_sub(1)?;
        self.keys.get(index)
    }

    /// The keys, in config order.
    pub fn keys(&self) -> &[ClientKey] {
        &self.keys
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A hash as four 64-bit words, so a comparison is four XORs rather than 32 byte steps.
fn words(hash: &[u8; 32]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for (word, bytes) in out.iter_mut().zip(hash.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        *word = u64::from_le_bytes(b);
    }
    out
}

/// Constant-time equality of two hashes: every word is XORed and the differences ORed together
/// with no branch, and only the final word goes through [`subtle`]'s constant-time comparison.
fn same_hash(a: &[u64; 4], b: &[u64; 4]) -> subtle::Choice {
    let diff = a.iter().zip(b).fold(0u64, |acc, (x, y)| acc | (x ^ y));
    diff.ct_eq(&0)
}

/// 64 hex digits (either case) to 32 bytes.
fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

/// The token of an `Authorization` value: what follows `Bearer ` (the scheme in any case),
/// spaces around it trimmed. `None` for another scheme or an empty token.
pub fn bearer(header_value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    let value = trim(header_value);
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = trim(&value[SCHEME.len()..]);
    (!token.is_empty()).then_some(token)
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// SHA-256 of a key, as the 64 lowercase hex digits `clients.keys[].key_sha256` takes.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A fresh key and its hash: `ak-` and 32 bytes from the operating system's random number
/// generator in 43 base-62 digits. Fails only when the OS has no randomness to give.
pub fn new_key() -> Result<(String, String), String> {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let key = format!("{KEY_PREFIX}{}", base62(random));
    let hash = hash_key(&key);
    Ok((key, hash))
}

/// The 256-bit big-endian number in `bytes` as exactly [`KEY_DIGITS`] base-62 digits (a
/// bijection, so every digit string is as likely as the random bytes).
fn base62(mut bytes: [u8; KEY_RANDOM_BYTES]) -> String {
    let mut digits = [0u8; KEY_DIGITS];
    for slot in digits.iter_mut().rev() {
        // One long division of the whole number by 62.
        let mut rem = 0u32;
        for byte in bytes.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = BASE62[rem as usize];
    }
    String::from_utf8_lossy(&digits).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, key: &str) -> KeyEntry {
        KeyEntry {
            name: name.to_owned(),
            key_sha256: hash_key(key),
            rpm: 10,
            tpm: 0,
            daily_tokens: 0,
        }
    }

    #[test]
    fn lookup_finds_the_entry_of_the_token_and_nothing_else() {
        let table = KeyTable::new(vec![entry("a", "ak-one"), entry("b", "ak-two")]).expect("valid");
        assert_eq!(table.lookup(b"ak-one").map(|k| k.name.as_str()), Some("a"));
        assert_eq!(table.lookup(b"ak-two").map(|k| k.name.as_str()), Some("b"));
        assert_eq!(table.lookup(b"ak-on").map(|k| &k.name), None);
        assert_eq!(table.lookup(b"").map(|k| &k.name), None);
        assert_eq!(table.lookup(b"ak-one").map(|k| k.limits.rpm), Some(10));
        assert!(KeyTable::default().lookup(b"ak-one").is_none());
    }

    #[test]
    fn lookup_scans_a_large_table() {
        let entries: Vec<_> = (0..100)
            .map(|i| entry(&format!("k{i}"), &format!("ak-{i}")))
            .collect();
        let table = KeyTable::new(entries).expect("valid");
        assert_eq!(table.len(), 100);
        for i in [0, 1, 57, 99] {
            let token = format!("ak-{i}");
            assert_eq!(
                table.lookup(token.as_bytes()).map(|k| k.name.clone()),
                Some(format!("k{i}"))
            );
        }
        assert!(table.lookup(b"ak-100").is_none());
    }

    #[test]
    fn hashes_are_checked_and_never_echoed() {
        let mut bad = entry("a", "x");
        bad.key_sha256 = "abc".to_owned();
        let err = KeyTable::new(vec![bad]).expect_err("short hash");
        assert!(err.starts_with("clients.keys[0].key_sha256 (a):"), "{err}");
        assert!(!err.contains("abc"), "{err}");

        let mut bad = entry("a", "x");
        bad.key_sha256 = "g".repeat(64);
        assert!(KeyTable::new(vec![bad]).is_err());

        let mut upper = entry("a", "x");
        upper.key_sha256 = upper.key_sha256.to_uppercase();
        let table = KeyTable::new(vec![upper]).expect("hex in either case");
        assert!(table.lookup(b"x").is_some());
    }

    #[test]
    fn names_and_hashes_must_be_unique() {
        let err = KeyTable::new(vec![entry("a", "x"), entry("a", "y")]).expect_err("name twice");
        assert_eq!(err, "clients.keys[1].name: a is used twice");
        let err = KeyTable::new(vec![entry("a", "x"), entry("b", "x")]).expect_err("key twice");
        assert_eq!(err, "clients.keys[1].key_sha256 (b): the same key as a");
        let err = KeyTable::new(vec![entry(" ", "x")]).expect_err("empty name");
        assert_eq!(err, "clients.keys[0].name: must not be empty");
    }

    #[test]
    fn bearer_takes_the_token_of_the_bearer_scheme_in_any_case() {
        assert_eq!(bearer(b"Bearer ak-1"), Some(&b"ak-1"[..]));
        assert_eq!(bearer(b"bearer ak-1"), Some(&b"ak-1"[..]));
        assert_eq!(bearer(b"BEARER   ak-1  "), Some(&b"ak-1"[..]));
        assert_eq!(
            bearer(b"  Bearer\tak-1"),
            None,
            "the scheme ends with a space"
        );
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn new_keys_are_prefixed_random_and_hash_to_what_they_print() {
        let (key, hash) = new_key().expect("OS randomness");
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(key.len(), KEY_PREFIX.len() + KEY_DIGITS);
        assert!(key[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(hash, hash_key(&key));
        assert_eq!(hash.len(), 64);
        let (other, _) = new_key().expect("OS randomness");
        assert_ne!(key, other);
    }

    #[test]
    fn base62_is_fixed_width_and_exact() {
        assert_eq!(base62([0; 32]), "0".repeat(KEY_DIGITS));
        let mut one = [0u8; 32];
        one[31] = 61;
        assert_eq!(base62(one).as_bytes()[KEY_DIGITS - 1], b'z');
        one[31] = 62;
        assert!(base62(one).ends_with("10"));
        // 2^256 − 1 still fits 43 digits (62^43 > 2^256).
        assert!(!base62([0xff; 32]).starts_with('0'));
    }

    #[test]
    fn hashes_differing_in_any_one_byte_are_different() {
        let base = [0x5au8; 32];
        assert!(bool::from(same_hash(&words(&base), &words(&base))));
        for i in 0..32 {
            let mut other = base;
            other[i] ^= 0x01;
            assert!(
                !bool::from(same_hash(&words(&base), &words(&other))),
                "byte {i}"
            );
        }
    }

    #[test]
    fn hash_key_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let key = ClientKey {
            name: "n".to_owned(),
            hash: [7; 32],
            limits: Limits::default(),
        };
        assert!(!format!("{key:?}").contains("0707"));
    }
}
