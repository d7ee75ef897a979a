//! The command line as a user meets it: help and version texts in arkgate's words, and the
//! run flags that service files and upgrade scripts rely on (`-t -c FILE` and its exit codes).

use std::process::{Command, Output, Stdio};

use arkgate::cli::Cli;
use clap::CommandFactory;

/// Sentences from Pingora's own flag help, which must not leak into ours.
const PINGORA_SENTENCES: &[&str] = &[
    "This is the base set of command line arguments for a pingora-based service",
    "This flag is useful for upgrading service",
    "Whether this server should try to upgrade from a running old server",
    "Whether this server should run in the background",
    "Test the configuration and exit",
    "The path to the configuration file.",
    "Not actually used",
    "pingora",
];

/// Runs `arkgate <args>` to completion (every case here exits by itself at once).
fn arkgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arkgate"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("OPENAI_API_KEY", "sk-from-the-environment")
        .stdin(Stdio::null())
        .output()
        .expect("run arkgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect()
}

#[test]
fn help_describes_arkgate_and_every_subcommand_in_its_own_words() {
    assert!(subcommands().contains(&"bench".to_string()));
    for flag in ["--help", "-h"] {
        let out = arkgate(&[flag]);
        assert!(out.status.success(), "{flag}: {:?}", out.status);
        let text = stdout(&out);
        assert!(text.contains("arkgate"), "{flag}: {text}");
        assert!(text.contains("Volcengine ARK"), "{flag}: {text}");
        for sub in subcommands() {
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(&sub)),
                "{flag}: subcommand {sub} not listed:\n{text}"
            );
        }
        for flag_name in ["--conf", "--test", "--daemon", "--upgrade"] {
            assert!(
                text.contains(flag_name),
                "{flag}: {flag_name} missing:\n{text}"
            );
        }
        assert!(text.contains("graceful upgrade"), "{flag}: {text}");
        for sentence in PINGORA_SENTENCES {
            assert!(
                !text.to_lowercase().contains(&sentence.to_lowercase()),
                "{flag}: Pingora's text {sentence:?} in:\n{text}"
            );
        }
    }
}

#[test]
fn every_subcommand_has_help_of_its_own() {
    for sub in subcommands().into_iter().filter(|s| s != "help") {
        let out = arkgate(&[&sub, "--help"]);
        assert!(out.status.success(), "{sub} --help: {:?}", out.status);
        assert!(
            stdout(&out).contains(&format!("arkgate {sub}")),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn bench_help_lists_its_options_and_hides_the_key_from_the_environment() {
    let text = stdout(&arkgate(&["bench", "--help"]));
    for option in [
        "--baseline",
        "--requests",
        "--duration",
        "--connections",
        "--model",
        "--prompt",
        "--body-file",
        "--stream",
        "--api-key",
        "--header",
        "--rounds",
        "--json",
        "compare",
    ] {
        assert!(text.contains(option), "{option} missing:\n{text}");
    }
    assert!(text.contains("OPENAI_API_KEY"), "{text}");
    assert!(
        !text.contains("sk-from-the-environment"),
        "the key was printed:\n{text}"
    );
}

#[test]
fn version_prints_name_and_version() {
    for flag in ["--version", "-V"] {
        let out = arkgate(&[flag]);
        assert!(out.status.success());
        assert_eq!(stdout(&out).trim(), "arkgate 0.1.0", "{flag}");
    }
}

#[test]
fn config_test_accepts_the_shipped_config_and_exits_0() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/arkgate.yaml");
    let out = arkgate(&["-t", "-c", path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("is valid"), "{}", stdout(&out));
}

#[test]
fn config_test_rejects_a_bad_config_with_one_line_and_exit_64() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "listen: []\nno_such_key: 1\n").expect("write config");
    let out = arkgate(&["--test", "--conf", path.to_str().expect("UTF-8")]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("invalid configuration:"), "{stderr}");
    assert!(lines[0].contains("no_such_key"), "{stderr}");
}

#[test]
fn running_without_a_config_file_exits_64() {
    let out = arkgate(&["-t"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-c FILE"));
}

#[test]
fn run_flags_cannot_be_mixed_with_a_subcommand() {
    let out = arkgate(&["-t", "bench", "http://127.0.0.1:1/chat/completions"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", out);
}
