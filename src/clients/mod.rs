//! Who the clients are: the keys they present ([`keys`]), the upstream key sent on their behalf
//! ([`read_upstream_key`]), and the `arkgate key` command that makes and hashes keys
//! ([`key_command`]).
//!
//! A request's bearer token is looked up by its SHA-256 in a [`KeyTable`]; a request without a
//! token, or with one matching no entry, is answered 401 `invalid_api_key`. The upstream never
//! sees the client's token: the configured ARK key replaces it.

pub mod gate;
pub mod keys;

use std::fmt;
use std::io::{BufRead, Write};
use std::path::Path;

pub use self::gate::{ClientKeys, KeyRecord, Today};
pub use self::keys::{bearer, hash_key, new_key, ClientKey, KeyEntry, KeyTable};

/// The OpenAI error code for a missing or unknown client key.
pub const INVALID_API_KEY: &str = "invalid_api_key";

/// The upstream key read from `clients.upstream_key_file`.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    /// The key, trimmed.
    pub secret: String,
    /// A warning for the caller to log, when the file is readable by more than its owner.
    pub warning: Option<String>,
}

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamKey")
            .field("secret", &"<redacted>")
            .field("warning", &self.warning)
            .finish()
    }
}

/// Reads the upstream key file: its content trimmed, which must not be empty. A file whose mode
/// lets its group or others read or write it comes back with a warning (the key still works, so
/// a deployment is not broken by a loose `chmod`). Errors name the path, never the content.
pub fn read_upstream_key(path: &Path) -> Result<UpstreamKey, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("clients.upstream_key_file: cannot read {shown}: {e}"))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("clients.upstream_key_file: {shown} is empty"));
    }
    if secret.contains(['\r', '\n']) {
        return Err(format!(
            "clients.upstream_key_file: {shown} holds more than one line"
        ));
    }
    Ok(UpstreamKey {
        secret: secret.to_owned(),
        warning: mode_warning(path),
    })
}

#[cfg(unix)]
fn mode_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "clients.upstream_key_file: {} has mode {mode:04o}; other users can read the key \
             (chmod 600 it)",
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn mode_warning(_path: &Path) -> Option<String> {
    None
}

/// `arkgate key new`: prints a fresh key and, on the next line, the `key_sha256` to configure.
/// `arkgate key hash`: reads a key from the first line of `input` and prints its `key_sha256`.
/// `args` are the words after `key`. Errors are one line for stderr.
pub fn key_command(
    args: &[String],
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), String> {
    let write_err = |e: std::io::Error| format!("cannot write: {e}");
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["new"] => {
            let (key, hash) = new_key()?;
            writeln!(out, "key:        {key}").map_err(write_err)?;
            writeln!(out, "key_sha256: {hash}").map_err(write_err)?;
            Ok(())
        }
        ["hash"] => {
            let mut line = String::new();
            input
                .read_line(&mut line)
                .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
            let key = line.trim();
            if key.is_empty() {
                return Err("no key on stdin".to_owned());
            }
            writeln!(out, "{}", hash_key(key)).map_err(write_err)
        }
        _ => Err("usage: arkgate key new | arkgate key hash < keyfile".to_owned()),
    }
}

/// Runs `arkgate key …` when the process was started so (`argv[1] == "key"`), and returns its
/// exit status; `None` for any other command line, which the server's parser then reads.
pub fn run_key_command_from_args() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("key") {
        return None;
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout();
    Some(match key_command(&args[1..], &mut input, &mut out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arkgate key: {e}");
            std::process::ExitCode::from(64)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn run(args: &[&str], input: &str) -> Result<String, String> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let mut out = Vec::new();
        key_command(&args, &mut input.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn key_new_prints_a_key_and_its_hash() {
        let out = run(&["new"], "").expect("new");
        let mut lines = out.lines();
        let key = lines
            .next()
            .and_then(|l| l.strip_prefix("key:        "))
            .expect("key line");
        let hash = lines
            .next()
            .and_then(|l| l.strip_prefix("key_sha256: "))
            .expect("hash line");
        assert!(key.starts_with("ak-"));
        assert_eq!(hash, hash_key(key));
    }

    #[test]
    fn key_hash_reads_one_line_of_stdin() {
        assert_eq!(
            run(&["hash"], "abc\n").expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
        assert_eq!(run(&["hash"], "  \n"), Err("no key on stdin".to_owned()));
        assert!(run(&["rotate"], "")
            .expect_err("unknown")
            .starts_with("usage:"));
        assert!(run(&[], "").is_err());
    }

    #[test]
    fn the_upstream_key_is_trimmed_and_loose_modes_warn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ark.key");
        std::fs::write(&path, "  sk-upstream-secret \n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = read_upstream_key(&path).expect("readable");
        assert_eq!(key.secret, "sk-upstream-secret");
        assert_eq!(key.warning, None);
        assert!(!format!("{key:?}").contains("secret-"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let key = read_upstream_key(&path).expect("readable");
        let warning = key.warning.expect("0644 warns");
        assert!(warning.contains("0644"), "{warning}");
        assert!(!warning.contains("sk-upstream"), "{warning}");
    }

    #[test]
    fn an_unusable_upstream_key_file_is_an_error_without_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ark.key");
        std::fs::write(&path, " \n").expect("write");
        let err = read_upstream_key(&path).expect_err("empty");
        assert!(err.ends_with("is empty"), "{err}");
        std::fs::write(&path, "sk-one\nsk-two\n").expect("write");
        let err = read_upstream_key(&path).expect_err("two lines");
        assert!(!err.contains("sk-"), "{err}");
        let err = read_upstream_key(&dir.path().join("missing")).expect_err("missing");
        assert!(err.contains("cannot read"), "{err}");
    }
}
