//! A DNS server on loopback for integration tests: serves the zone file
//! given on the command line (format: `src/dns/testserver.rs`), prints the
//! address it listens on (`127.0.0.1:PORT`) as its first line of output,
//! and runs until killed or until its standard input closes, so a test
//! that dies does not leave it behind.
//!
//! Usage: `test-dns ZONE_FILE [ADDRESS]`; ADDRESS defaults to
//! `127.0.0.1:0` (a free port, the same for UDP and TCP).
//!
//! Not part of the daemon: it needs `hickory-server`, a dev-dependency.

#[path = "../src/dns/testserver.rs"]
mod testserver;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use tokio::io::AsyncReadExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (zone_path, bind) = match args.as_slice() {
        [zone] => (zone, "127.0.0.1:0"),
        [zone, bind] => (zone, bind.as_str()),
        _ => {
            eprintln!("usage: test-dns ZONE_FILE [ADDRESS]");
            return ExitCode::from(2);
        }
    };
    let bind: SocketAddr = match bind.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("test-dns: bad address {bind:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let zone = match std::fs::read_to_string(zone_path)
        .map_err(|e| e.to_string())
        .and_then(|text| testserver::Zone::parse(&text))
    {
        Ok(zone) => zone,
        Err(e) => {
            eprintln!("test-dns: {zone_path}: {e}");
            return ExitCode::from(2);
        }
    };
    let server = match testserver::TestDns::start(zone, bind).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("test-dns: cannot listen on {bind}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{}", server.addr())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    // Runs until standard input reaches end of file (or fails).
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buffer).await {
        if n == 0 {
            break;
        }
    }
    ExitCode::SUCCESS
}
