//! The command line: arkgate's own flags and subcommands, parsed with clap.
//!
//! With no subcommand, `arkgate` runs the proxy; its flags ([`RunArgs`]) keep the meaning of
//! Pingora's server flags and are handed to Pingora as an [`Opt`] by [`RunArgs::to_pingora_opt`].
//! Each subcommand is one [`Command`] variant, dispatched by one match arm in `main.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pingora::server::configuration::Opt;

use crate::bench::BenchArgs;

/// `arkgate [RUN FLAGS] [COMMAND]`.
#[derive(Debug, Parser)]
#[command(
    name = "arkgate",
    version,
    about = "arkgate: an edge proxy and AI gateway for OpenAI-compatible LLM APIs on Volcengine ARK.",
    long_about = "arkgate: an edge proxy and AI gateway for OpenAI-compatible LLM APIs on \
                  Volcengine ARK.\n\n\
                  Without a command it runs the gateway described by the YAML file given with \
                  -c: it forwards requests to the configured upstream, rewrites bodies while \
                  they stream, downgrades json_schema structured output for models that lack \
                  it, and answers failures with OpenAI-style JSON errors. Where the file asks \
                  for them it also balances and fails over between endpoints, caches \
                  deterministic answers, checks client keys and enforces request and token \
                  limits, and applies content policies.",
    after_help = "Examples:\n  \
                  arkgate -t -c /etc/arkgate/arkgate.yaml     check a configuration\n  \
                  arkgate -d -c /etc/arkgate/arkgate.yaml     run in the background\n  \
                  arkgate -u -d -c /etc/arkgate/arkgate.yaml  replace a running arkgate\n  \
                  arkgate bench http://127.0.0.1:8000/chat/completions -n 500 -c 8",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// How to run the gateway (ignored when a command is given).
    #[command(flatten)]
    pub run: RunArgs,

    /// A tool instead of the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The flags of a gateway run. Each one keeps the meaning of the Pingora server flag of the
/// same name, so service managers and upgrade scripts call arkgate as they would any Pingora
/// server.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// The arkgate YAML configuration to run (listeners, upstream, rules, server settings).
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    pub conf: Option<PathBuf>,

    /// Check the configuration (parse, validate, load certificates), report, and exit
    /// without listening: 0 when it is usable, 64 when it is not.
    #[arg(short = 't', long = "test")]
    pub test: bool,

    /// Detach and run in the background once the configuration is loaded; the pid goes to the
    /// configured pid file.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,

    /// Take over the listening sockets from a running arkgate (graceful upgrade): the old
    /// process hands them over on its upgrade socket and drains, so no connection is refused.
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,

    /// Accepted and ignored, so that a test runner's `--nocapture` reaching the binary is harmless.
    #[arg(long = "nocapture", hide = true)]
    pub nocapture: bool,
}

impl RunArgs {
    /// The same flags as Pingora's server options. `conf` is carried as given; the server
    /// builder decides what Pingora reads from it.
    pub fn to_pingora_opt(&self) -> Opt {
        Opt {
            upgrade: self.upgrade,
            daemon: self.daemon,
            nocapture: self.nocapture,
            test: self.test,
            conf: self.conf.as_ref().map(|p| p.to_string_lossy().into_owned()),
        }
    }
}

/// arkgate's tools. Adding one is a variant here and an arm in `main.rs`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load-test an OpenAI-compatible chat completions endpoint, optionally against a
    /// baseline URL to measure what the gateway adds.
    Bench(Box<BenchArgs>),
    /// Client keys: `new` prints a fresh random key and its key_sha256 for `clients.keys`;
    /// `hash` reads a key on stdin and prints its key_sha256.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// The response cache of a running arkgate: `stats` prints its counters, `clear` empties
    /// it (or one model's entries), over the admin listener named in the config file.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

/// What `arkgate cache` does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CacheAction {
    /// Print the cache's counters as JSON (backend, entries, hits, misses, bypasses, stores,
    /// errors), from `GET /cache` on the admin listener.
    Stats {
        /// The running arkgate's configuration (its admin.addr and admin.token_file).
        #[arg(short = 'c', long = "conf", value_name = "FILE")]
        conf: PathBuf,
    },
    /// Remove every entry this arkgate can reach (with Redis: the whole fleet's, under
    /// redis.key_prefix), or only one model's, with `DELETE /cache` on the admin listener.
    Clear {
        /// Remove only the entries of this model.
        #[arg(long, value_name = "NAME")]
        model: Option<String>,
        /// The running arkgate's configuration (its admin.addr and admin.token_file).
        #[arg(short = 'c', long = "conf", value_name = "FILE")]
        conf: PathBuf,
    },
}

/// What `arkgate key` does.
#[derive(Debug, Clone, Copy, clap::Subcommand)]
pub enum KeyAction {
    /// Print a new random client key and its SHA-256 (the key is shown once; store it safely).
    New,
    /// Read a key on stdin and print its SHA-256, for `clients.keys[].key_sha256`.
    Hash,
}

impl KeyAction {
    /// The word `arkgate::clients::key_command` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::New => "new",
            KeyAction::Hash => "hash",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("arkgate").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_map_one_to_one_onto_pingora_options() {
        let cli = parse(&["-u", "-d", "-c", "/etc/arkgate/arkgate.yaml"]);
        assert!(cli.command.is_none());
        let opt = cli.run.to_pingora_opt();
        assert!(opt.upgrade && opt.daemon && !opt.test && !opt.nocapture);
        assert_eq!(opt.conf.as_deref(), Some("/etc/arkgate/arkgate.yaml"));

        let opt = parse(&["--test", "--conf", "a.yaml", "--nocapture"])
            .run
            .to_pingora_opt();
        assert!(opt.test && opt.nocapture && !opt.upgrade && !opt.daemon);
        assert_eq!(opt.conf.as_deref(), Some("a.yaml"));
    }

    #[test]
    fn no_flags_means_no_config_file() {
        assert!(parse(&[]).run.conf.is_none());
    }

    #[test]
    fn run_flags_do_not_mix_with_a_command() {
        let err = Cli::try_parse_from(["arkgate", "-t", "bench", "http://127.0.0.1:1/x"]);
        assert!(err.is_err(), "run flags before a command must be refused");
    }

    #[test]
    fn cache_commands_take_a_config_file() {
        let cli = parse(&["cache", "clear", "--model", "m", "-c", "a.yaml"]);
        let Some(Command::Cache {
            action: CacheAction::Clear { model, conf },
        }) = cli.command
        else {
            panic!("cache clear not parsed");
        };
        assert_eq!(
            (model.as_deref(), conf.to_str()),
            (Some("m"), Some("a.yaml"))
        );
        assert!(Cli::try_parse_from(["arkgate", "cache", "stats"]).is_err());
    }

    #[test]
    fn bench_takes_its_own_dash_c() {
        let cli = parse(&["bench", "http://127.0.0.1:1/chat/completions", "-c", "3"]);
        let Some(Command::Bench(b)) = cli.command else {
            panic!("bench not parsed");
        };
        assert_eq!(b.run.connections, 3);
        assert!(cli.run.conf.is_none());
    }
}
