//! The `tern` command line: `serve`, `check-config`, `queue
//! list|show|flush|hold|release|delete|destinations`, `dkim generate`,
//! `dns-records`, `user` (in `tern::auth::cli`) and `sendmail` (in
//! `tern::sendmail`, also run when the binary is called `sendmail`).

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern::config::{self, ConfigError, Runtime};
use tern::control::{self, ControlError, ControlRequest, render};
use tern::spool::{self, Envelope, MsgId};

/// mimalloc: per-thread free lists suit a server whose sessions allocate
/// and free small buffers on every command (glibc malloc was ~5% of CPU
/// under load).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tern: a durable SMTP mail server.
///
/// Without a config file, `tern serve` runs on an embedded default: it
/// listens on 127.0.0.1:2525, serves Prometheus metrics on
/// http://127.0.0.1:9525/metrics, keeps its data in ./tern-data, accepts mail
/// for me@localhost (and postmaster) and prints how to send a test message.
#[derive(Parser)]
#[command(name = "tern", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mail server until SIGTERM/SIGINT. Prints "listening on ADDR role=ROLE"
    /// per listener ("metrics on URL" for [metrics]) and then "ready" on stdout; logs go to stderr (level from the
    /// config's [log] section, overridden by the TERN_LOG environment variable).
    /// Started as root, it binds its listeners and reads its keys, then drops to
    /// server.user (see tern.example.toml, [server]). Under a service manager
    /// (NOTIFY_SOCKET set, systemd Type=notify) it reports READY=1 once it
    /// accepts mail and STOPPING=1 when it drains.
    /// SIGHUP reads the config file again and puts it in force without dropping a
    /// connection, all or nothing ([spool], [server], [auth], [log], [metrics],
    /// [sendmail] and the listeners need a restart; a new data_dir refuses the reload);
    /// a config that does not validate is refused and the running one stays.
    Serve {
        /// TOML config file (see tern.example.toml); without it, the embedded default
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: prints "ok", or every error, TOML syntax and unknown
    /// keys included, as FILE:LINE: KEY: MESSAGE (exit 1)
    CheckConfig {
        /// TOML config file
        file: PathBuf,
    },
    /// Inspect and steer the queue. Asks the running server over its control
    /// socket (<data_dir>/control.sock, for the server's user and root only);
    /// when the server is not running, `list` and `show` read the spool from
    /// disk instead, and the other commands exit with status 75
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// DKIM signing keys: the server signs mail from a domain with every key
    /// found under <dkim.dir>/DOMAIN/ (see tern.example.toml, [dkim])
    Dkim {
        #[command(subcommand)]
        command: tern::dkim::cli::DkimCommand,
    },
    /// Print the DNS records DOMAIN needs (MX, SPF, DKIM, DMARC, MTA-STS,
    /// TLS-RPT) in zone-file syntax; values to fill in are marked PLACEHOLDER
    DnsRecords {
        /// The mail domain
        domain: String,
        /// TOML config file (for hostname and the DKIM keys); without it, the
        /// embedded default
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Manage SMTP submission logins and app passwords
    ///
    /// They are kept in the users file (auth.users_file, default
    /// <data_dir>/users.toml, mode 0600); the server's login check re-reads it
    /// at the next login after a change. Passwords are read from a prompt without
    /// echo (asked twice), or from the first line of stdin when it is not a
    /// terminal, never from the command line. Exit status: 0 done, 1 bad usage
    /// or unknown user, 66 import file unreadable, 74 users file unreadable or
    /// unwritable
    User {
        #[command(subcommand)]
        command: tern::auth::cli::UserCommand,
    },
    /// Hand a message on stdin to the running server, as sendmail(8) does
    ///
    /// Takes sendmail's flags (-t, -f, -F, -i/-oi, -bs, -bp...; `tern
    /// sendmail --help` lists them). Also what the binary does when called
    /// `sendmail` (a symlink /usr/sbin/sendmail -> tern). Exit status from
    /// sysexits.h: 0 queued, 75 server not running
    #[command(disable_help_flag = true)]
    Sendmail {
        /// sendmail's options, then the recipients
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// One block per queued message: ID, age, size, sender, and per recipient
    /// its state, destination, attempts, last reply and why it waits
    List {
        #[command(flatten)]
        common: QueueArgs,
    },
    /// Envelope details, then the message itself (not with --json)
    Show {
        /// Queue ID as printed by `queue list` and in the 250 reply
        id: String,
        #[command(flatten)]
        common: QueueArgs,
    },
    /// Attempt delivery now: one message, or every waiting recipient
    Flush {
        /// Queue ID; without it, the whole queue
        id: Option<String>,
        #[command(flatten)]
        common: QueueArgs,
    },
    /// Stop outbound delivery attempts for a message until it is released (its local copies are still delivered)
    Hold {
        /// Queue ID
        id: String,
        #[command(flatten)]
        common: QueueArgs,
    },
    /// Let a held message be attempted again
    Release {
        /// Queue ID
        id: String,
        #[command(flatten)]
        common: QueueArgs,
    },
    /// Remove a message from the queue, without a bounce to its sender
    Delete {
        /// Queue ID
        id: String,
        #[command(flatten)]
        common: QueueArgs,
    },
    /// One row per outbound destination: queued, in flight and window, rate,
    /// failures, next start or probe, last success and last error
    Destinations {
        #[command(flatten)]
        common: QueueArgs,
    },
}

#[derive(clap::Args)]
struct QueueArgs {
    /// TOML config file; without it, the embedded default (./tern-data)
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Print the reply as pretty-printed JSON (see README) instead of text
    #[arg(long)]
    json: bool,
}

/// EX_TEMPFAIL (sysexits.h): the server is not running, try again later.
const EXIT_NOT_RUNNING: u8 = 75;

fn main() -> ExitCode {
    // sendmail's options are not clap's (`-oi`, `-fADDR`): its command
    // line goes to its own parser, whichever name it came under.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let program = args
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    match (program.as_str(), args.get(1).map(String::as_str)) {
        ("sendmail", _) => return sendmail(args[1..].to_vec()),
        ("mailq", _) => {
            return sendmail(
                std::iter::once("-bp".to_string())
                    .chain(args[1..].iter().cloned())
                    .collect(),
            );
        }
        (_, Some("sendmail")) => return sendmail(args[2..].to_vec()),
        _ => {}
    }
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
        Command::Queue { command } => queue(command),
        Command::User { command } => tern::auth::cli::run(command),
        Command::Dkim {
            command: tern::dkim::cli::DkimCommand::Generate(args),
        } => dkim_generate(&args),
        Command::DnsRecords { domain, config } => dns_records(&domain, config.as_deref()),
        Command::Sendmail { args } => sendmail(args),
    }
}

fn sendmail(args: Vec<String>) -> ExitCode {
    match tern::sendmail::run(args) {
        tern::sendmail::Action::Done(code) => code,
        tern::sendmail::Action::ListQueue(config) => queue_list(&QueueArgs {
            config,
            json: false,
        }),
    }
}

fn dkim_generate(args: &tern::dkim::cli::GenerateArgs) -> ExitCode {
    let runtime = match load_runtime(args.config.as_deref()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    tern::privileges::commands_hand_over_to(&runtime);
    match tern::dkim::cli::generate(
        &runtime,
        &args.domain,
        args.selector.as_deref(),
        args.algorithm,
        args.force,
        chrono::Utc::now(),
    ) {
        Ok(generated) => {
            emit(&generated.records);
            for note in &generated.notes {
                eprintln!("tern: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("tern: {message}");
            ExitCode::FAILURE
        }
    }
}

fn dns_records(domain: &str, config: Option<&Path>) -> ExitCode {
    let runtime = match load_runtime(config) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match tern::dkim::cli::dns_records(&runtime, domain, chrono::Utc::now()) {
        Ok((records, notes)) => {
            emit(&records);
            for note in &notes {
                eprintln!("tern: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("tern: {message}");
            ExitCode::FAILURE
        }
    }
}

fn report_config_errors(file: &Path, errors: &[ConfigError]) -> ExitCode {
    // `file:line: key: message`, the form editors and grep jump to.
    for e in errors {
        match e.line {
            Some(line) => eprintln!("{}:{line}: {}: {}", file.display(), e.key, e.message),
            None => eprintln!("{}: {}: {}", file.display(), e.key, e.message),
        }
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
    ignore_file_size_signal();
    let runtime = match load_runtime(path) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    init_tracing(&runtime);
    // Binding, reading root-only keys and dropping to server.user happen
    // before the runtime starts its threads (see tern::privileges).
    let prepared = match tern::server::prepare(&runtime) {
        Ok(prepared) => prepared,
        Err(message) => {
            eprintln!("tern: {message}");
            return ExitCode::FAILURE;
        }
    };
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
    match tokio.block_on(tern::server::serve(
        runtime,
        prepared,
        path.map(Path::to_path_buf),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tern: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A write past the file-size limit (`ulimit -f`, `prlimit --fsize`) raises
/// SIGXFSZ, whose default action kills the process and every session with
/// it. Ignored, the write fails with `EFBIG` instead, which the spool answers
/// like a full disk (`452 4.3.1`) and Maildir delivery defers. Set first,
/// before the runtime starts any thread.
fn ignore_file_size_signal() {
    // SAFETY: changes one signal's disposition to SIG_IGN; no handler runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
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

fn queue(command: QueueCommand) -> ExitCode {
    match command {
        QueueCommand::List { common } => queue_list(&common),
        QueueCommand::Show { id, common } => queue_show(&common, &id),
        QueueCommand::Flush { id, common } => {
            let id = match id.as_deref().map(parse_id).transpose() {
                Ok(id) => id,
                Err(code) => return code,
            };
            steer(
                &common,
                ControlRequest::Flush {
                    id: id.map(|i| i.to_string()),
                },
                id,
                "flushed",
            )
        }
        QueueCommand::Hold { id, common } => {
            steer_one(&common, &id, "held", |id| ControlRequest::Hold { id })
        }
        QueueCommand::Release { id, common } => steer_one(&common, &id, "released", |id| {
            ControlRequest::Release { id }
        }),
        QueueCommand::Delete { id, common } => {
            steer_one(&common, &id, "deleted", |id| ControlRequest::Delete { id })
        }
        QueueCommand::Destinations { common } => queue_destinations(&common),
    }
}

fn parse_id(text: &str) -> Result<MsgId, ExitCode> {
    text.parse::<MsgId>().map_err(|_| {
        eprintln!("tern: {:?} is not a queue ID", render::sanitize(text));
        ExitCode::FAILURE
    })
}

/// Asks the server of `runtime`.
fn ask(runtime: &Runtime, req: &ControlRequest) -> Result<Value, ControlError> {
    control::request(&control::socket_path(&runtime.data_dir), req)
}

/// Writes to stdout, ignoring a closed pipe (`tern queue list | head`).
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn emit_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => emit(&(text + "\n")),
        Err(e) => eprintln!("tern: cannot print the reply: {e}"),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// For `list` and `show`: an error that leaves the spool as the best view.
fn fall_back_to_spool(e: &ControlError) -> bool {
    match e {
        ControlError::NotRunning(_) => true,
        ControlError::Server(_) => false,
        other => {
            eprintln!("tern: {other}; reading the queue from disk instead (no live state)");
            true
        }
    }
}

/// For the commands only the running server can answer.
fn not_running(runtime: &Runtime) -> ExitCode {
    eprintln!(
        "tern: tern is not running (nothing listens on {}); start it, or pass the --config it \
         runs with",
        control::socket_path(&runtime.data_dir).display()
    );
    ExitCode::from(EXIT_NOT_RUNNING)
}

/// Exit status for a failure to reach a server that should be there.
fn failed(e: &ControlError) -> ExitCode {
    eprintln!("tern: {}", render::sanitize(&e.to_string()));
    match e {
        ControlError::Timeout => ExitCode::from(EXIT_NOT_RUNNING),
        _ => ExitCode::FAILURE,
    }
}

fn queue_list(args: &QueueArgs) -> ExitCode {
    let runtime = match load_runtime(args.config.as_deref()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let reply = match ask(&runtime, &ControlRequest::List) {
        Ok(v) => v,
        Err(e) if fall_back_to_spool(&e) => match read_queue(&runtime) {
            Ok(messages) => json!({
                "messages": messages
                    .iter()
                    .map(|(id, envelope)| render::message_json(*id, envelope, false))
                    .collect::<Vec<_>>()
            }),
            Err(code) => return code,
        },
        Err(e) => return failed(&e),
    };
    if args.json {
        emit_json(&reply);
    } else {
        emit(&render::render_list(&reply, now()));
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

fn queue_show(args: &QueueArgs, id_text: &str) -> ExitCode {
    let runtime = match load_runtime(args.config.as_deref()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let id = match parse_id(id_text) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let message = match ask(&runtime, &ControlRequest::Show { id: id.to_string() }) {
        Ok(v) if v.is_object() => v,
        Ok(_) => {
            eprintln!("tern: no message {id} in the queue");
            return ExitCode::FAILURE;
        }
        Err(e) if fall_back_to_spool(&e) => {
            let messages = match read_queue(&runtime) {
                Ok(m) => m,
                Err(code) => return code,
            };
            let Some((_, envelope)) = messages.iter().find(|(m, _)| *m == id) else {
                eprintln!("tern: no message {id} in the queue");
                return ExitCode::FAILURE;
            };
            render::message_json(id, envelope, true)
        }
        Err(e) => return failed(&e),
    };
    if args.json {
        emit_json(&message);
        return ExitCode::SUCCESS;
    }
    emit(&render::render_show(&message, now()));
    match spool::read_body_read_only(&runtime.spool.dir, id) {
        Ok(body) => {
            let body = String::from_utf8_lossy(&body);
            // The body is the sender's: on a terminal its escape sequences
            // would run; into a pipe or file it goes as stored.
            let body = if std::io::stdout().is_terminal() {
                render::sanitize_multiline(&body)
            } else {
                body.into_owned()
            };
            emit(&format!("--- message ---\n{body}\n"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern: cannot read message {id}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn steer_one(
    args: &QueueArgs,
    id_text: &str,
    done: &str,
    request: impl FnOnce(String) -> ControlRequest,
) -> ExitCode {
    match parse_id(id_text) {
        Ok(id) => steer(args, request(id.to_string()), Some(id), done),
        Err(code) => code,
    }
}

/// Sends a mutating request; `id` is the message it names, if any.
fn steer(args: &QueueArgs, request: ControlRequest, id: Option<MsgId>, done: &str) -> ExitCode {
    let runtime = match load_runtime(args.config.as_deref()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let reply = match ask(&runtime, &request) {
        Ok(v) => v,
        Err(ControlError::NotRunning(_)) => return not_running(&runtime),
        Err(e) => return failed(&e),
    };
    if args.json {
        emit_json(&reply);
    }
    match (render::affected(&reply), id) {
        (Some(0), Some(id)) => {
            eprintln!("tern: no message {id} in the queue");
            ExitCode::FAILURE
        }
        (Some(n), _) => {
            if !args.json {
                match (n, id) {
                    (0, None) => emit("nothing to flush\n"),
                    (_, Some(id)) => emit(&format!("{done} {id}\n")),
                    (n, None) => emit(&format!("{done} {n} message(s)\n")),
                }
            }
            ExitCode::SUCCESS
        }
        (None, _) => {
            eprintln!("tern: the server's reply has no \"affected\" count");
            ExitCode::FAILURE
        }
    }
}

fn queue_destinations(args: &QueueArgs) -> ExitCode {
    let runtime = match load_runtime(args.config.as_deref()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match ask(&runtime, &ControlRequest::Destinations) {
        Ok(v) if args.json => {
            emit_json(&v);
            ExitCode::SUCCESS
        }
        Ok(v) => {
            emit(&render::render_destinations(&v, now()));
            ExitCode::SUCCESS
        }
        Err(ControlError::NotRunning(_)) => not_running(&runtime),
        Err(e) => failed(&e),
    }
}
