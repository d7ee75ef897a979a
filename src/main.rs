//! The `arkgate` binary: parse the command line, load the config (exit 64 when it is unusable),
//! build the server, run.

use std::process::ExitCode;

use pingora::server::configuration::Opt;

/// Exit status for an unusable configuration (EX_USAGE / EX_CONFIG family, as sysexits uses).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    if let Some(code) = arkgate::clients::run_key_command_from_args() {
        return code;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let opt = Opt::parse_args();
    let Some(path) = opt.conf.clone() else {
        eprintln!("invalid configuration: no config file given (use -c FILE)");
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    let test_only = opt.test;
    let built = arkgate::Config::from_file(std::path::Path::new(&path))
        .and_then(|cfg| arkgate::server::build_server(cfg, opt));
    let mut server = match built {
        Ok(s) => s,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if test_only {
        println!("configuration {path} is valid");
        return ExitCode::SUCCESS;
    }
    server.bootstrap();
    server.run_forever()
}
