//! The `arkgate` binary: parse the command line, then either run a tool (`arkgate bench …`) or
//! load the config (exit 64 when it is unusable), build the server and run it.

use std::process::ExitCode;

use arkgate::cli::{Cli, Command, RunArgs};
use clap::Parser;

arkgate::global_allocator!();

/// Exit status for an unusable configuration (EX_USAGE / EX_CONFIG family, as sysexits uses).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        None => run_gateway(&cli.run),
        Some(Command::Bench(args)) => arkgate::bench::run(*args),
        Some(Command::Key { action }) => run_key(action),
        Some(Command::Cache { action }) => arkgate::cache::admin_client::run(&action),
    }
}

/// `arkgate key new|hash`: stdin and stdout only, no config.
fn run_key(action: arkgate::cli::KeyAction) -> ExitCode {
    let args = [action.as_str().to_string()];
    let mut input = std::io::stdin().lock();
    match arkgate::clients::key_command(&args, &mut input, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arkgate key: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// Loads the configuration and runs the gateway (or only checks it, with `-t`).
fn run_gateway(run: &RunArgs) -> ExitCode {
    let Some(path) = run.conf.clone() else {
        eprintln!("invalid configuration: no config file given (use -c FILE)");
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    let built = arkgate::Config::from_file(&path)
        .and_then(|cfg| arkgate::server::build_server(cfg, run.to_pingora_opt()));
    let mut server = match built {
        Ok(s) => s,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if run.test {
        println!("configuration {} is valid", path.display());
        return ExitCode::SUCCESS;
    }
    server.bootstrap();
    server.run_forever()
}
