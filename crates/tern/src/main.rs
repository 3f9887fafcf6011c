//! The `tern` command line: `serve`, `check-config`, `queue list|show`.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern::config::{self, ConfigError, Runtime};
use tern::spool::{self, Envelope, MsgId, RcptStatus, Route};

/// mimalloc: per-thread free lists suit a server whose sessions allocate
/// and free small buffers on every command (glibc malloc was ~5% of CPU
/// under load).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tern: a durable SMTP mail server.
///
/// Without a config file, `tern serve` runs on an embedded default: it
/// listens on 127.0.0.1:2525, keeps its data in ./tern-data, accepts mail for
/// me@localhost (and postmaster) and prints how to send a test message.
#[derive(Parser)]
#[command(name = "tern", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mail server until SIGTERM/SIGINT. Prints "listening on ADDR role=ROLE"
    /// per listener and then "ready" on stdout; logs go to stderr (level from the
    /// config's [log] section, overridden by the TERN_LOG environment variable).
    /// SIGHUP does not reload the config (it is logged and ignored): restart.
    Serve {
        /// TOML config file (see tern.example.toml); without it, the embedded default
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: prints "ok", or every error with its key (exit 1)
    CheckConfig {
        /// TOML config file
        file: PathBuf,
    },
    /// Inspect the queue (works while the server runs; never modifies it)
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// One block per queued message: ID, age, size, sender, recipients with their state
    List {
        /// TOML config file; without it, the embedded default (./tern-data)
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Envelope details and the message itself
    Show {
        /// Queue ID as printed by `queue list` and in the 250 reply
        id: String,
        /// TOML config file; without it, the embedded default (./tern-data)
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(errors) => report_config_errors(&file, &errors),
        },
        Command::Queue { command } => match command {
            QueueCommand::List { config } => queue_list(config.as_deref()),
            QueueCommand::Show { id, config } => queue_show(config.as_deref(), &id),
        },
    }
}

fn report_config_errors(file: &Path, errors: &[ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("{}: {e}", file.display());
    }
    ExitCode::FAILURE
}

fn load_runtime(path: Option<&Path>) -> Result<Runtime, ExitCode> {
    match path {
        Some(p) => config::load(p).map_err(|errors| report_config_errors(p, &errors)),
        None => config::embedded_default()
            .map_err(|errors| report_config_errors(Path::new("(embedded default)"), &errors)),
    }
}

fn serve(path: Option<&Path>) -> ExitCode {
    let runtime = match load_runtime(path) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    init_tracing(&runtime);
    let tokio = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match tokio.block_on(tern::server::serve(runtime, path.is_none())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tern: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(runtime: &Runtime) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&runtime.log.level));
    // Colour codes only for a terminal: logs in files and journals stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if runtime.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn queue_list(path: Option<&Path>) -> ExitCode {
    let runtime = match load_runtime(path) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let messages = match read_queue(&runtime) {
        Ok(m) => m,
        Err(code) => return code,
    };
    if messages.is_empty() {
        println!("queue is empty");
    }
    let now = chrono::Utc::now().timestamp();
    for (id, envelope) in &messages {
        print_summary(*id, envelope, now);
    }
    ExitCode::SUCCESS
}

fn read_queue(runtime: &Runtime) -> Result<Vec<(MsgId, Envelope)>, ExitCode> {
    if !runtime.spool.dir.exists() {
        return Ok(Vec::new());
    }
    spool::scan_read_only(&runtime.spool.dir).map_err(|e| {
        eprintln!(
            "tern: cannot read the spool {}: {e}",
            runtime.spool.dir.display()
        );
        ExitCode::FAILURE
    })
}

fn print_summary(id: MsgId, envelope: &Envelope, now: i64) {
    let age = humantime::format_duration(std::time::Duration::from_secs(
        (now - envelope.received_at).max(0) as u64,
    ));
    println!(
        "{id}  age {age}  size {}  from <{}>",
        envelope.size, envelope.sender
    );
    for rcpt in &envelope.recipients {
        println!(
            "    <{}>  {}",
            rcpt.address,
            describe(&rcpt.route, &rcpt.status, now)
        );
    }
}

fn describe(route: &Route, status: &RcptStatus, now: i64) -> String {
    match (status, route) {
        (RcptStatus::Pending, Route::Remote) => "waiting for outbound delivery".into(),
        (RcptStatus::Pending, Route::Local { .. }) => "pending".into(),
        (RcptStatus::Delivered { reply, .. }, _) => format!("delivered ({reply})"),
        (
            RcptStatus::Deferred {
                reply,
                attempts,
                next_attempt,
                ..
            },
            _,
        ) => format!(
            "deferred after {attempts} attempt(s), next in {}s: {reply}",
            (next_attempt - now).max(0)
        ),
        (RcptStatus::Failed { reply, .. }, _) => format!("failed: {reply}"),
    }
}

fn queue_show(path: Option<&Path>, id_text: &str) -> ExitCode {
    let runtime = match load_runtime(path) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let Ok(id) = id_text.parse::<MsgId>() else {
        eprintln!("tern: {id_text:?} is not a queue ID");
        return ExitCode::FAILURE;
    };
    let messages = match read_queue(&runtime) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let Some((_, envelope)) = messages.iter().find(|(m, _)| *m == id) else {
        eprintln!("tern: no message {id} in the queue");
        return ExitCode::FAILURE;
    };
    let now = chrono::Utc::now().timestamp();
    print_summary(id, envelope, now);
    println!("client: {} (HELO {})", envelope.client_ip, envelope.helo);
    println!(
        "received: {}",
        chrono::DateTime::from_timestamp(envelope.received_at, 0)
            .map(|d| d.to_rfc2822())
            .unwrap_or_default()
    );
    println!(
        "smtputf8: {}  body: {}  ret: {}  envid: {}",
        envelope.smtputf8,
        envelope.body_type.as_deref().unwrap_or("-"),
        envelope.ret.as_deref().unwrap_or("-"),
        envelope.envid.as_deref().unwrap_or("-")
    );
    for rcpt in &envelope.recipients {
        println!(
            "recipient <{}>: rcpt-to <{}>  orcpt {}  notify {}",
            rcpt.address,
            rcpt.original,
            rcpt.orcpt.as_deref().unwrap_or("-"),
            rcpt.notify.as_deref().unwrap_or("-")
        );
    }
    match spool::read_body_read_only(&runtime.spool.dir, id) {
        Ok(body) => {
            println!("--- message ---");
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern: cannot read message {id}: {e}");
            ExitCode::FAILURE
        }
    }
}
