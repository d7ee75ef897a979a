//! `arkgate cache stats|clear`: asks a running arkgate's admin listener (`GET /cache`,
//! `DELETE /cache[?model=NAME]`) over plain HTTP/1.1, at the `admin.addr` of the given config
//! file, with `Authorization: Bearer <token>` when that config has an `admin.token_file`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::CacheAction;
use crate::config::{read_token_file, Config};

/// How long connecting, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status for an unusable configuration (as `arkgate -t`).
const EXIT_BAD_CONFIG: u8 = 64;

/// Runs one `arkgate cache` command: prints the admin listener's JSON answer, or why not.
pub fn run(action: &CacheAction) -> ExitCode {
    let (conf, method, target) = match action {
        CacheAction::Stats { conf } => (conf, "GET", "/cache".to_string()),
        CacheAction::Clear { conf, model } => (conf, "DELETE", clear_target(model.as_deref())),
    };
    let (addr, token) = match admin_of(conf) {
        Ok(found) => found,
        Err(why) => {
            eprintln!("arkgate cache: {why}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match request(addr, method, &target, token.as_deref()) {
        Ok((status, body)) if (200..300).contains(&status) => {
            println!("{}", body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "arkgate cache: the admin listener answered {status}: {}",
                body.trim_end()
            );
            ExitCode::FAILURE
        }
        Err(why) => {
            eprintln!("arkgate cache: admin listener at {addr}: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The admin address and token of the config file at `conf`.
fn admin_of(conf: &std::path::Path) -> Result<(SocketAddr, Option<String>), String> {
    let cfg = Config::from_file(conf).map_err(|e| format!("invalid configuration: {e}"))?;
    let addr = cfg
        .admin_addr
        .ok_or_else(|| format!("{} has no admin listener (admin.addr: ~)", conf.display()))?;
    let token = cfg
        .admin_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok((addr, token))
}

/// `/cache`, or `/cache?model=NAME` with the name percent-encoded.
fn clear_target(model: Option<&str>) -> String {
    let Some(model) = model else {
        return "/cache".to_string();
    };
    let mut target = String::from("/cache?model=");
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            target.push(b as char);
        } else {
            target.push_str(&format!("%{b:02X}"));
        }
    }
    target
}

/// One request on a fresh connection (`Connection: close`): the status and the body.
fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    parse_response(&answer)
}

/// The status and body of a `Content-Length` (or close-delimited) HTTP/1.1 response.
fn parse_response(answer: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not an HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("the answer has no status")?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_percent_encoded() {
        assert_eq!(clear_target(None), "/cache");
        assert_eq!(clear_target(Some("doubao-1.5")), "/cache?model=doubao-1.5");
        assert_eq!(clear_target(Some("a/b c")), "/cache?model=a%2Fb%20c");
    }

    #[test]
    fn responses_parse_into_status_and_body() {
        let r = parse_response(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nno\n");
        assert_eq!(r, Ok((401, "no\n".to_string())));
        assert!(parse_response(b"garbage").is_err());
    }
}
