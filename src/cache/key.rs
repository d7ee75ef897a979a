//! What a request's cache key is made of, and which requests have one.
//!
//! The key is a SHA-256 over length-prefixed parts, in a fixed order: a version tag, the path,
//! the scope (a hash of the client's credential, or "global"), the transform fingerprint (what
//! arkgate does to the request before sending it), the stream flag, and the body as canonical
//! JSON. Two requests share a key exactly when all of these are equal.
//!
//! # Canonical JSON
//! Object keys are sorted (by their UTF-8 bytes), insignificant whitespace is dropped, strings
//! are written with the minimal escapes (so `"\u0041"` and `"A"` are equal), and numbers are
//! compared by value as serde_json reads them: integers that fit `i64`/`u64` exactly, everything
//! else as the nearest `f64`. An f64 with no fractional part that fits `i64` or `u64` is written
//! as that integer, so `1`, `1.0`, `1e0` and `10e-1` are one number, `1e17` is
//! `100000000000000000`, and `-0.0` is `0`. Two numbers
//! that differ only beyond f64 precision (17 significant digits) count as equal; the upstream
//! reads them as f64 too. An object with a repeated key keeps the last value, as serde_json does.

use std::fmt;

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

/// Domain tag hashed first, so a future change of the key layout never matches old entries.
const KEY_VERSION: &[u8] = b"arkgate-cache-key-v1";
/// Domain tag of the credential hash.
const SCOPE_VERSION: &[u8] = b"arkgate-cache-scope-v1";
/// 2^63 and 2^64: a whole f64 below these converts to `i64`/`u64` without rounding.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// A cache key: the SHA-256 of a request's parts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The key of a request: `path` as the client sent it (query included, if the caller keeps
    /// it), the `scope`, the `transform` fingerprint, whether it streams, and its JSON body.
    pub fn compute(
        path: &str,
        scope: &Scope,
        transform: &[u8],
        stream: bool,
        body: &Value,
    ) -> Self {
        let mut canonical = Vec::with_capacity(1024);
        write_canonical(body, &mut canonical);
        Self::from_canonical(path, scope, transform, stream, &canonical)
    }

    /// Like [`CacheKey::compute`], with the body already in canonical form.
    pub fn from_canonical(
        path: &str,
        scope: &Scope,
        transform: &[u8],
        stream: bool,
        canonical_body: &[u8],
    ) -> Self {
        let mut h = Sha256::new();
        part(&mut h, KEY_VERSION);
        part(&mut h, path.as_bytes());
        match scope {
            Scope::Global => part(&mut h, b"global"),
            Scope::Credential(hash) => {
                part(&mut h, b"credential");
                part(&mut h, hash);
            }
        }
        part(&mut h, transform);
        part(&mut h, if stream { b"stream" } else { b"whole" });
        part(&mut h, canonical_body);
        Self(h.finalize().into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

/// One length-prefixed part: 8 bytes of little-endian length, then the bytes.
fn part(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Whose entries a request may see.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every client shares entries (`cache.scope: global`).
    Global,
    /// Only clients with the same credential (`cache.scope: api_key`); holds a SHA-256 of it,
    /// never the credential.
    Credential([u8; 32]),
}

impl Scope {
    /// The scope of a client presenting `credential` (e.g. the bearer token's bytes).
    pub fn for_credential(credential: &[u8]) -> Self {
        let mut h = Sha256::new();
        part(&mut h, SCOPE_VERSION);
        part(&mut h, credential);
        Self::Credential(h.finalize().into())
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("Global"),
            // Only a short prefix of the hash: enough to tell scopes apart in a test failure.
            Self::Credential(h) => write!(f, "Credential({}…)", hex::encode(&h[..4])),
        }
    }
}

/// The body as canonical JSON (see the module doc).
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // serde_json's map is sorted unless some crate enables `preserve_order`: sort anyway.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

fn write_number(n: &Number, out: &mut Vec<u8>) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        if f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&f) {
            // A whole f64 in range is exactly that i64; `-0.0` becomes 0.
            out.extend_from_slice((f as i64).to_string().as_bytes());
        } else if f.fract() == 0.0 && (0.0..TWO_POW_64).contains(&f) {
            out.extend_from_slice((f as u64).to_string().as_bytes());
        } else {
            // Shortest representation that reads back as the same f64.
            out.extend_from_slice(
                Number::from_f64(f)
                    .map_or_else(|| "null".to_owned(), |n| n.to_string())
                    .as_bytes(),
            );
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // serde_json writes the minimal escapes; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Which cacheable endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `…/chat/completions`
    ChatCompletions,
    /// `…/completions` (legacy text completions)
    Completions,
    /// `…/embeddings`
    Embeddings,
}

/// What the cache needs to know about a cacheable request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cacheability {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `"stream": true`: the answer is an SSE stream (a separate entry from the whole answer).
    pub stream: bool,
    /// The `model` field, for clearing one model's entries; empty when absent.
    pub model: String,
}

/// Whether a POST of JSON `body` to `path` may be answered from the cache: chat and text
/// completions with `temperature` present and 0, and embeddings always. `path` is matched by
/// its last segments (`/api/v3/chat/completions` is a chat completion); the query, if any, is
/// ignored here.
pub fn cacheable(path: &str, body: &Value) -> Option<Cacheability> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = path.trim_end_matches('/');
    let endpoint = if path.ends_with("/chat/completions") {
        Endpoint::ChatCompletions
    } else if path.ends_with("/completions") {
        Endpoint::Completions
    } else if path.ends_with("/embeddings") {
        Endpoint::Embeddings
    } else {
        return None;
    };
    let object = body.as_object()?;
    if endpoint != Endpoint::Embeddings {
        let temperature = object.get("temperature")?.as_f64()?;
        if temperature != 0.0 {
            return None;
        }
    }
    let stream = endpoint != Endpoint::Embeddings
        && object.get("stream").and_then(Value::as_bool) == Some(true);
    let model = object
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Some(Cacheability {
        endpoint,
        stream,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("test JSON")
    }

    fn key(path: &str, scope: &Scope, transform: &[u8], stream: bool, body: &str) -> CacheKey {
        CacheKey::compute(path, scope, transform, stream, &parse(body))
    }

    fn canon(text: &str) -> String {
        String::from_utf8(canonical_json(&parse(text))).expect("utf-8")
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = key(
            "/chat/completions",
            &Scope::Global,
            b"",
            false,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let b = key(
            "/chat/completions",
            &Scope::Global,
            b"",
            false,
            "{ \"messages\" : [ { \"content\":\"hi\", \"role\":\"user\" } ],\n\t\"temperature\": 0 ,\"model\": \"m\" }",
        );
        assert_eq!(a, b);
    }

    #[test]
    fn canonical_form_is_sorted_and_compact() {
        assert_eq!(
            canon(r#"{ "b": [1, {"z": null, "a": true}], "a": "x\u0041\n" }"#),
            r#"{"a":"xA\n","b":[1,{"a":true,"z":null}]}"#
        );
        assert_eq!(canon(r#"{"é":1,"e":2,"f":3}"#), r#"{"e":2,"f":3,"é":1}"#);
    }

    #[test]
    fn numbers_compare_by_value() {
        for same in ["1", "1.0", "1e0", "10e-1", "0.1e1", "1.000"] {
            assert_eq!(canon(same), "1", "{same}");
        }
        assert_eq!(canon("-0.0"), "0");
        assert_eq!(canon("0.5"), canon("5e-1"));
        assert_eq!(canon("0.30000000000000004"), "0.30000000000000004");
        assert_ne!(canon("0.1"), canon("0.2"));
        assert_eq!(canon("18446744073709551615"), "18446744073709551615");
        assert_eq!(canon("-9223372036854775808"), "-9223372036854775808");
        assert_eq!(canon("1e300"), canon("1.0e300"));
        assert_eq!(canon("1e17"), "100000000000000000");
        assert_eq!(canon("1.8e19"), "18000000000000000000");
        let a = key(
            "/embeddings",
            &Scope::Global,
            b"",
            false,
            r#"{"x":[1,2.0]}"#,
        );
        let b = key(
            "/embeddings",
            &Scope::Global,
            b"",
            false,
            r#"{"x":[1.0,2]}"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn every_part_changes_the_key() {
        let body = r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        let base = key("/chat/completions", &Scope::Global, b"t1", false, body);
        let variants = [
            key("/completions", &Scope::Global, b"t1", false, body),
            key("/chat/completions?x=1", &Scope::Global, b"t1", false, body),
            key(
                "/chat/completions",
                &Scope::for_credential(b"k"),
                b"t1",
                false,
                body,
            ),
            key("/chat/completions", &Scope::Global, b"t2", false, body),
            key("/chat/completions", &Scope::Global, b"", false, body),
            key("/chat/completions", &Scope::Global, b"t1", true, body),
            key(
                "/chat/completions",
                &Scope::Global,
                b"t1",
                false,
                r#"{"model":"m2","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            key(
                "/chat/completions",
                &Scope::Global,
                b"t1",
                false,
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi "}]}"#,
            ),
            key(
                "/chat/completions",
                &Scope::Global,
                b"t1",
                false,
                r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"n":1}"#,
            ),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
        }
        // Array order is significant.
        assert_ne!(
            key(
                "/embeddings",
                &Scope::Global,
                b"",
                false,
                r#"{"input":["a","b"]}"#
            ),
            key(
                "/embeddings",
                &Scope::Global,
                b"",
                false,
                r#"{"input":["b","a"]}"#
            )
        );
    }

    #[test]
    fn parts_cannot_run_into_each_other() {
        // Without length prefixes these would hash the same bytes.
        let a = CacheKey::from_canonical("/a", &Scope::Global, b"bc", false, b"{}");
        let b = CacheKey::from_canonical("/ab", &Scope::Global, b"c", false, b"{}");
        assert_ne!(a, b);
    }

    #[test]
    fn scopes_separate_credentials() {
        let body = r#"{"input":"x"}"#;
        let k1 = key(
            "/embeddings",
            &Scope::for_credential(b"key-1"),
            b"",
            false,
            body,
        );
        let k1_again = key(
            "/embeddings",
            &Scope::for_credential(b"key-1"),
            b"",
            false,
            body,
        );
        let k2 = key(
            "/embeddings",
            &Scope::for_credential(b"key-2"),
            b"",
            false,
            body,
        );
        let global = key("/embeddings", &Scope::Global, b"", false, body);
        assert_eq!(k1, k1_again);
        assert_ne!(k1, k2);
        assert_ne!(k1, global);
        let shown = format!("{:?}", Scope::for_credential(b"sk-secret"));
        assert!(!shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn key_hex_is_64_characters() {
        let k = key("/embeddings", &Scope::Global, b"", false, "{}");
        assert_eq!(k.to_hex().len(), 64);
        assert!(format!("{k:?}").contains(&k.to_hex()));
    }

    #[test]
    fn chat_and_completions_need_temperature_zero() {
        let zero = json!({"model": "m", "temperature": 0, "messages": []});
        let c = cacheable("/api/v3/chat/completions", &zero).expect("cacheable");
        assert_eq!(c.endpoint, Endpoint::ChatCompletions);
        assert!(!c.stream);
        assert_eq!(c.model, "m");
        assert_eq!(
            cacheable(
                "/v1/completions",
                &json!({"temperature": 0.0, "prompt": "x"})
            )
            .map(|c| c.endpoint),
            Some(Endpoint::Completions)
        );
        assert!(cacheable(
            "/chat/completions",
            &json!({"temperature": 0.7, "messages": []})
        )
        .is_none());
        assert!(
            cacheable("/chat/completions", &json!({"messages": []})).is_none(),
            "absent temperature means the default, not 0"
        );
        assert!(cacheable("/chat/completions", &json!({"temperature": "0"})).is_none());
        assert!(cacheable("/chat/completions", &json!([1, 2])).is_none());
        assert!(cacheable("/models", &json!({"temperature": 0})).is_none());
    }

    #[test]
    fn embeddings_are_always_cacheable_and_streams_are_flagged() {
        let e = cacheable("/embeddings", &json!({"model": "emb", "input": "x"})).expect("ok");
        assert_eq!(e.endpoint, Endpoint::Embeddings);
        assert!(!e.stream);
        let s = cacheable(
            "/chat/completions/?trace=1",
            &json!({"model": "m", "temperature": 0, "stream": true}),
        )
        .expect("ok");
        assert!(s.stream);
    }
}
