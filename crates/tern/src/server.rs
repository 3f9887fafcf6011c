//! `tern serve`: opens the spool, binds the listeners, starts the queue
//! manager and the accept loops, and shuts all of it down in order on
//! SIGTERM/SIGINT.
//!
//! Start-up order matters: the spool is recovered before any listener
//! accepts, so no session can commit into a half-scanned queue. Shutdown is
//! the reverse: stop accepting, let sessions finish or answer `421 4.3.2`,
//! stop the queue after its batch in hand, then close the spool (its
//! committer drains what is waiting).
//!
//! Errors: anything that prevents serving (bad data dir, port in use, a
//! spool that cannot be opened) is returned with a message naming the path or
//! address; the caller prints it and exits non-zero.

use crate::config::{LiveRuntime, Runtime};
use crate::control::{self, ControlRequest};
use crate::dkim::Signers;
use crate::egress::{Egress, MemoryCounters};
use crate::listener::{ConnectionLimits, accept_loop};
use crate::outbound::{self, AdminHandle, OutboundHandle, QueueOp};
use crate::queue;
use crate::reload::Reloader;
use crate::session::Context;
use crate::spool::{Spool, SpoolConfig};
use crate::tls::{ServerTls, TlsSource};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long open sessions get to finish after SIGTERM before we stop waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `config_path`: the file `runtime` came from (SIGHUP reads it again);
/// `None` for the embedded default.
pub async fn serve(runtime: Runtime, config_path: Option<PathBuf>) -> Result<(), String> {
    let embedded_default = config_path.is_none();
    let runtime = Arc::new(runtime);
    let live = Arc::new(LiveRuntime::from(runtime.clone()));
    crate::fsutil::create_dir_durable(&runtime.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", runtime.data_dir.display()))?;
    let spool_config = SpoolConfig {
        dir: runtime.spool.dir.clone(),
        segment_size: runtime.spool.segment_size,
        draft_memory_limit: runtime.spool.draft_memory_limit,
        compact_after: SpoolConfig::COMPACT_AFTER,
        commit_wait: runtime.spool.commit_wait,
    };
    let _lock = lock_spool(&runtime.spool.dir)?;
    let (spool, report) = Spool::open(spool_config)
        .map_err(|e| format!("cannot open spool {}: {e}", runtime.spool.dir.display()))?;
    info!(
        event = "spool.recovered",
        messages = report.messages,
        segments = report.segments,
        torn_tails_cut = report.torn_tails_cut,
        corrupt_segments = report.corrupt_segments.len(),
        dir = %runtime.spool.dir.display()
    );
    for path in &report.corrupt_segments {
        warn!(event = "spool.quarantined", path = %path.display(), "corrupt segment moved aside; its valid messages were recovered");
    }

    match raise_open_file_limit() {
        Ok(limit) => {
            let needed = (runtime.limits.max_connections as u64).saturating_add(FD_HEADROOM);
            if limit < needed {
                warn!(
                    event = "server.fd_limit",
                    limit,
                    max_connections = runtime.limits.max_connections,
                    "the open-file limit is below max_connections plus the spool's and delivery's own descriptors: connections past it cannot be accepted until others end"
                );
            }
        }
        Err(e) => warn!(event = "server.fd_limit", error = %e, "cannot read the open-file limit"),
    }

    let tls = Arc::new(
        ServerTls::load(TlsSource {
            files: runtime.tls_certificates.clone(),
            data_dir: runtime.data_dir.clone(),
            hostname: runtime.hostname.clone(),
        })
        .map_err(|e| format!("cannot set up TLS: {e}"))?,
    );
    info!(event = "tls.ready", names = ?tls.names());
    let dkim = Signers::from_config(&runtime.dkim).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        format!("cannot load the DKIM keys: {}", list.join("; "))
    })?;
    let accounts = crate::auth::Accounts::open(&runtime.auth)
        .map_err(|e| format!("cannot open the users file: {e}"))?;
    for (domain, selector, algorithm) in dkim.keys() {
        info!(event = "dkim.key", %domain, %selector, algorithm = algorithm.name());
    }

    let mut bound = Vec::new();
    for l in &runtime.listeners {
        let listener = TcpListener::bind(l.address).await.map_err(|e| {
            format!(
                "cannot listen on {} (listener role {}): {e}",
                l.address, l.role
            )
        })?;
        bound.push((listener, l.role));
    }
    let metrics_listener = match runtime.metrics {
        Some(address) => Some(crate::metrics::bind(address).await?),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let (outbound_handle, outbound_receiver) = OutboundHandle::channel();
    let (queue_handle, queue_task) = queue::start(
        live.clone(),
        spool.clone(),
        outbound_handle,
        shutdown.clone(),
    )
    .map_err(|e| format!("cannot start the delivery thread: {e}"))?;
    // The users file's hold marks are the breaker's record across restarts.
    let (tripped_tx, tripped_rx) = tokio::sync::mpsc::unbounded_channel();
    let egress = Arc::new(Egress::new(
        runtime.egress.clone(),
        Box::new(MemoryCounters::default()),
        Some(runtime.auth.users_file.clone()),
        Some(tripped_tx),
        Egress::held_in(&accounts.store().snapshot()),
    ));
    let (queue_admin, outbound_task) = outbound::start(
        runtime.clone(),
        spool.clone(),
        queue_handle.clone(),
        outbound_receiver,
        egress.clone(),
        tripped_rx,
        shutdown.clone(),
    )
    .map_err(|e| format!("cannot start outbound delivery: {e}"))?;
    // After the spool is ours (a socket nobody answers is taken for a dead
    // server's and replaced), before "ready" (scripts use it at once).
    let control_path = control::socket_path(&runtime.data_dir);
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(16);
    // Mail matters more than the administrator's socket: a path too long
    // for a Unix socket (about 100 octets) or an unwritable data folder
    // leaves `tern queue` reading the spool, and the server runs.
    let control_task = match control::serve(&control_path, control_tx, shutdown.clone()) {
        Ok(task) => Some(task),
        Err(e) => {
            warn!(event = "control.unavailable", path = %control_path.display(), error = %e, "tern queue cannot steer this server (list and show read the spool)");
            None
        }
    };
    if let Some(listener) = metrics_listener {
        let sources = crate::metrics::Sources {
            spool: Some(spool.clone()),
            queue: Some(queue_admin.clone()),
        };
        crate::metrics::start(listener, sources, shutdown.clone());
    }
    tokio::spawn(answer_queue_commands(control_rx, queue_admin.clone()));
    // Local injection (`tern sendmail`). As with the control socket, mail
    // from the network matters more: a socket that cannot be bound is
    // logged (local senders then exit 75 and try again) and the server runs.
    let sendmail = if runtime.sendmail.enabled {
        let default_folder = crate::config::default_socket(&runtime.data_dir);
        match crate::sendmail::bind(&runtime.sendmail.socket, default_folder.parent()) {
            Ok(listener) => {
                info!(event = "sendmail.listening", path = %listener.path().display());
                Some(listener)
            }
            Err(e) => {
                warn!(event = "sendmail.unavailable", key = "sendmail.socket", path = %runtime.sendmail.socket.display(), error = %e, "tern sendmail cannot reach this server (sendmail.enabled = false turns the socket off)");
                None
            }
        }
    } else {
        None
    };
    let ctx = Arc::new(Context {
        runtime: live.clone(),
        spool: spool.clone(),
        queue: queue_handle,
        shutdown: shutdown.clone(),
        free_space: Default::default(),
        tls: tls.clone(),
        dkim: Arc::new(dkim).into(),
        accounts,
        egress,
    });
    let limits = ConnectionLimits::new(
        runtime.limits.max_connections,
        runtime.limits.max_connections_per_ip,
    );
    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for (listener, role) in bound {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        println!("listening on {addr} role={role}");
        info!(event = "listener.start", address = %addr, role = %role);
        loops.push(tokio::spawn(accept_loop(
            listener,
            role,
            ctx.clone(),
            limits.clone(),
            tracker.clone(),
        )));
    }
    if let Some(listener) = sendmail {
        loops.push(tokio::spawn(listener.serve(ctx.clone(), tracker.clone())));
    }
    if embedded_default {
        print_test_hint(&runtime);
    }
    let reloader = Reloader {
        path: config_path,
        runtime: live,
        ctx: ctx.clone(),
        limits: limits.clone(),
        outbound: queue_admin,
    };
    let signals = Signals::install();
    println!("ready");

    Signals::stop_requested(signals, &reloader).await;
    info!(
        event = "server.shutdown",
        "stopping: no new connections, open sessions get 421"
    );
    shutdown.cancel();
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            event = "server.shutdown",
            "sessions still open after the grace period; their messages were not acknowledged"
        );
    }
    let _ = queue_task.await;
    let _ = outbound_task.await;
    if let Some(task) = control_task {
        let _ = task.await;
    }
    spool.close().await;
    info!(event = "server.stopped");
    Ok(())
}

/// Descriptors the server needs besides one per session: listeners, spool
/// segments, Maildir directories and copies of a delivery batch, logs.
const FD_HEADROOM: u64 = 256;

/// Raises the soft limit on open files to the hard one and returns the
/// limit in force. Every session holds a descriptor, and the usual soft
/// default (1024 from systemd and most shells) is below the default
/// `max_connections` plus what the spool and delivery need; the hard limit
/// is what the administrator allowed.
fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own. It fails (EPERM) when
        // the hard limit is above fs.nr_open: then the soft one stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(limit.rlim_max);
        }
    }
    Ok(limit.rlim_cur)
}

/// Takes an exclusive `flock` on `<spool>/lock` for the life of the server:
/// two servers appending to one spool would corrupt it, so the second one
/// refuses to start and says why. (`tern queue list` reads without it.)
fn lock_spool(dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    crate::fsutil::create_dir_durable(dir)
        .map_err(|e| format!("cannot create spool directory {}: {e}", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own; the lock lives as long as `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "spool {} is in use by another tern process (lock {}: {e})",
            dir.display(),
            path.display()
        ));
    }
    Ok(file)
}

fn print_test_hint(runtime: &Runtime) {
    let Some(listener) = runtime.listeners.first() else {
        return;
    };
    let addr = listener.address;
    let Some(user) = runtime.users.get(&runtime.postmaster) else {
        return;
    };
    println!(
        "embedded default: no config file; data in {}",
        runtime.data_dir.display()
    );
    println!("send a test message:");
    println!(
        "  swaks --server {} --port {} --from you@example.com --to {}",
        addr.ip(),
        addr.port(),
        user.primary_address
    );
    println!(
        "  or: curl smtp://{addr} --mail-from you@example.com --mail-rcpt {} --upload-file message.eml",
        user.primary_address
    );
    println!("it lands in {}/new/", user.maildir.display());
    if let Some(submission) = runtime
        .listeners
        .iter()
        .find(|l| l.role == crate::config::Role::Submission)
    {
        println!(
            "to submit with a login: tern user add {}, then swaks --server {} --port {} --tls --auth PLAIN --auth-user {} --from {} --to {}",
            user.name,
            submission.address.ip(),
            submission.address.port(),
            user.name,
            user.primary_address,
            user.primary_address
        );
    }
    if let Some(metrics) = runtime.metrics {
        println!(
            "Prometheus metrics: curl http://{metrics}{}",
            crate::metrics::PATH
        );
    }
}

/// The signals that stop the server (SIGTERM, SIGINT) and SIGHUP, which
/// reloads the TLS certificates: installed before "ready" is printed, so a
/// signal sent right after it never meets the default action (which kills
/// without a 421).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok(),
        })
    }

    async fn stop_requested(signals: Option<Signals>, reloader: &Reloader) {
        let Some(mut s) = signals else {
            // Without signal handlers we can only run until killed.
            std::future::pending::<()>().await;
            return;
        };
        loop {
            tokio::select! {
                _ = s.term.recv() => return,
                _ = s.int.recv() => return,
                Some(()) = async { s.hup.as_mut()?.recv().await } => {
                    info!(event = "server.sighup", "reloading the configuration");
                    // Refusals are logged by the reloader, key by key.
                    let _ = reloader.reload().await;
                }
            }
        }
    }
}

/// Hands `tern queue` commands from the control socket to the outbound
/// manager, which owns the queue's schedule.
async fn answer_queue_commands(
    mut rx: tokio::sync::mpsc::Receiver<(
        ControlRequest,
        tokio::sync::oneshot::Sender<control::ControlReply>,
    )>,
    admin: AdminHandle,
) {
    while let Some((request, reply)) = rx.recv().await {
        let answer = match queue_op(request) {
            Ok(op) => admin.request(op).await,
            Err(e) => Err(e),
        };
        let _ = reply.send(answer);
    }
}

fn queue_op(request: ControlRequest) -> Result<QueueOp, String> {
    let id = |text: &str| {
        text.parse()
            .map_err(|_| format!("{text:?} is not a queue ID"))
    };
    Ok(match request {
        ControlRequest::List => QueueOp::List,
        ControlRequest::Show { id: text } => QueueOp::Show(id(&text)?),
        ControlRequest::Flush { id: None } => QueueOp::Flush(None),
        ControlRequest::Flush { id: Some(text) } => QueueOp::Flush(Some(id(&text)?)),
        ControlRequest::Hold { id: text } => QueueOp::Hold(id(&text)?),
        ControlRequest::Release { id: text } => QueueOp::Release(id(&text)?),
        ControlRequest::Delete { id: text } => QueueOp::Delete(id(&text)?),
        ControlRequest::Destinations => QueueOp::Destinations,
        ControlRequest::ReleaseUser { name } => QueueOp::ReleaseUser(name),
    })
}
