//! `tern serve`: binds the listeners, drops privileges, opens the spool,
//! starts the queue manager and the accept loops, and shuts all of it down
//! in order on SIGTERM/SIGINT.
//!
//! Start-up order matters. [`prepare`] runs before the async runtime
//! exists (one thread, see `privileges`): it binds every listener, the
//! metrics one included (ports below 1024 need root), creates the data
//! folders and hands them to `server.user`, reads the TLS and DKIM keys
//! (root-only files included), drops to `server.user`, and starts the
//! delivery thread, the one thread left with capabilities (`privileges`).
//! Only then does [`serve`] open the spool,
//! so every spool file is the dropped user's, and recovers it before any
//! listener accepts, so no session can commit into a half-scanned queue.
//! Shutdown is the reverse: stop accepting, let sessions finish or answer
//! `421 4.3.2`, stop the queue after its batch in hand, then close the
//! spool (its committer drains what is waiting). The service manager hears
//! `READY=1` just before "ready" is printed and `STOPPING=1` when the
//! drain starts (`service`).
//!
//! Errors: anything that prevents serving (bad data dir, port in use, a
//! spool that cannot be opened) is returned with a message naming the path or
//! address; the caller prints it and exits non-zero.

use crate::config::{LiveRuntime, Role, Runtime};
use crate::control::{self, ControlRequest};
use crate::deliver::worker::{DELIVERY_NICE, DeliveryThread};
use crate::dkim::Signers;
use crate::egress::{Egress, MemoryCounters};
use crate::listener::{ConnectionLimits, accept_loop};
use crate::outbound::{self, AdminHandle, OutboundHandle, QueueOp};
use crate::privileges::{self, Plan};
use crate::queue;
use crate::reload::Reloader;
use crate::service;
use crate::session::Context;
use crate::spool::{Spool, SpoolConfig};
use crate::tls::{ServerTls, TlsSource};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long open sessions get to finish after SIGTERM before we stop waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Mode of the data folder: other users may pass through (to reach
/// `<data_dir>/public/` and mailboxes kept below it) but not list it.
const DATA_DIR_MODE: u32 = 0o711;

/// What [`prepare`] got while it could: the bound listeners, the keys and
/// the delivery thread.
pub struct Prepared {
    listeners: Vec<(std::net::TcpListener, Role)>,
    /// `[metrics] address`: bound here as well, so a port below 1024 works.
    metrics: Option<std::net::TcpListener>,
    tls: ServerTls,
    dkim: Signers,
    delivery: DeliveryThread,
}

/// The start-up steps that need the privileges the server then gives up;
/// call with no other thread running (before the tokio runtime is built).
pub fn prepare(runtime: &Runtime) -> Result<Prepared, String> {
    let plan = Plan::for_runtime(runtime)?;
    let mut listeners = Vec::new();
    for l in &runtime.listeners {
        let listener = bind(l.address).map_err(|e| {
            format!(
                "cannot listen on {} (listener role {}): {e}",
                l.address, l.role
            )
        })?;
        listeners.push((listener, l.role));
    }
    let metrics = runtime.metrics.map(crate::metrics::bind).transpose()?;
    create_data_dir(&runtime.data_dir)?;
    crate::fsutil::create_dir_durable(&runtime.spool.dir).map_err(|e| {
        format!(
            "cannot create spool directory {}: {e}",
            runtime.spool.dir.display()
        )
    })?;
    let tls = ServerTls::load(TlsSource {
        files: runtime.tls_certificates.clone(),
        data_dir: runtime.data_dir.clone(),
        hostname: runtime.hostname.clone(),
    })
    .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let dkim = Signers::from_config(&runtime.dkim).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        format!("cannot load the DKIM keys: {}", list.join("; "))
    })?;
    if let Some(owner) = plan.new_owner() {
        hand_over_data(runtime, owner)?;
    }
    plan.apply()?;
    // Started after the drop, so it holds no more than what was kept, and
    // before the runtime, so that once this thread gives the rest up no
    // other thread (all made from this one later) holds anything.
    let delivery = DeliveryThread::start(DELIVERY_NICE)
        .map_err(|e| format!("cannot start the delivery thread: {e}"))?;
    privileges::leave_to_delivery_thread()?;
    Ok(Prepared {
        listeners,
        metrics,
        tls,
        dkim,
        delivery,
    })
}

/// A listening socket with the options tokio's own `bind` sets (address
/// reuse, so a restart need not wait out TIME_WAIT; a deep backlog for
/// bursts), non-blocking for the runtime that takes it over.
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    /// tokio's backlog for `TcpListener::bind`.
    const BACKLOG: i32 = 1024;
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Creates the data folder (mode [`DATA_DIR_MODE`]) with any missing
/// ancestors; an existing one is left as it is.
fn create_data_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |e: std::io::Error| format!("cannot create data_dir {}: {e}", dir.display());
    if dir.is_dir() {
        return Ok(());
    }
    crate::fsutil::create_dir_durable(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DATA_DIR_MODE)).map_err(failed)
}

/// Root dropping to `server.user`: the server's own files under the data
/// folder become that user's (an earlier run as root, or `tern user` before
/// `server.user` was set, left them root's). A Maildir under the data
/// folder that is still root's (from such a run) goes to its configured
/// owner, else to that user; any other Maildir is left alone.
fn hand_over_data(runtime: &Runtime, owner: (u32, u32)) -> Result<(), String> {
    let data_dir = &runtime.data_dir;
    let given = |path: &Path, e: std::io::Error| {
        format!("cannot give {} to server.user: {e}", path.display())
    };
    // Everything below is walked from this descriptor, never through a
    // link (see `privileges::hand_over`): once the folder is server.user's,
    // that user can change what its names lead to.
    let top = crate::fsutil::open_dir(data_dir)
        .map_err(|e| format!("cannot open data_dir {}: {e}", data_dir.display()))?;
    let stat = crate::fsutil::stat_fd(&top)
        .map_err(|e| format!("cannot open data_dir {}: {e}", data_dir.display()))?;
    // One made by a root-run `tern user` (mode 0700) gets the search bits
    // the server gives its own; changed while it is still root's.
    if stat.st_uid == 0 && stat.st_mode & DATA_DIR_MODE != DATA_DIR_MODE {
        let mode = (stat.st_mode & 0o7777) | DATA_DIR_MODE;
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(top.as_raw_fd(), mode) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!(
                "cannot open up data_dir {}: {e}",
                data_dir.display()
            ));
        }
    }
    if (stat.st_uid, stat.st_gid) != owner {
        privileges::chown_fd(&top, owner).map_err(|e| given(data_dir, e))?;
    }
    let mut trees = vec![
        (runtime.spool.dir.clone(), true),
        (data_dir.join("tls"), true),
        (data_dir.join("mail"), false),
    ];
    let users_file = &runtime.auth.users_file;
    if users_file.starts_with(data_dir) {
        trees.push((users_file.clone(), false));
        let mut lock = users_file.clone().into_os_string();
        lock.push(".lock");
        trees.push((lock.into(), false));
    }
    for (path, recursive) in trees {
        privileges::hand_over(&top, data_dir, &path, owner, recursive)
            .map_err(|e| given(&path, e))?;
    }
    let mail_root = data_dir.join("mail");
    for user in runtime.users.values() {
        if !user.maildir.starts_with(&mail_root) {
            continue;
        }
        let target = (
            user.access.owner.unwrap_or(owner.0),
            user.access.group.unwrap_or(owner.1),
        );
        hand_over_mailbox(&top, data_dir, &user.maildir, owner, target)
            .map_err(|e| format!("cannot give {} to its owner: {e}", user.maildir.display()))?;
    }
    Ok(())
}

/// A Maildir below `<data_dir>/mail` that is still root's goes to `target`
/// (its owner), and the folders between `<data_dir>/mail` and it that are
/// still root's go to server.user (`owner`); any other is left alone. Each
/// folder is reached from `top` by descriptor, never through a link: a
/// link on the way leaves that mailbox as it is (logged).
fn hand_over_mailbox(
    top: &std::fs::File,
    data_dir: &Path,
    maildir: &Path,
    owner: (u32, u32),
    target: (u32, u32),
) -> std::io::Result<()> {
    let Ok(below) = maildir.strip_prefix(data_dir) else {
        return Ok(());
    };
    let mut dir = top.try_clone()?;
    let mut path = data_dir.to_path_buf();
    let parts: Vec<_> = below.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let std::path::Component::Normal(part) = part else {
            return Ok(());
        };
        path.push(part);
        let name = crate::fsutil::c_name(part)?;
        if i + 1 == parts.len() {
            let root_owned = crate::fsutil::stat_at(&dir, &name).map(|st| st.st_uid == 0);
            return match root_owned {
                Ok(true) => privileges::hand_over_at(&dir, &name, &path, target, true),
                Ok(false) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
        }
        dir = match crate::fsutil::open_dir_at(&dir, &name) {
            Ok(next) => next,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if crate::fsutil::is_symlink_error(&e) => {
                warn!(event = "server.hand_over_skipped", path = %path.display(), "a symbolic link on the way to a Maildir: the mailbox is left as it is");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // <data_dir>/mail itself was handed over with the other trees.
        if i > 0 && crate::fsutil::stat_fd(&dir)?.st_uid == 0 {
            privileges::chown_fd(&dir, owner)?;
        }
    }
    Ok(())
}

/// `config_path`: the file `runtime` came from (SIGHUP reads it again);
/// `None` for the embedded default.
pub async fn serve(
    runtime: Runtime,
    prepared: Prepared,
    config_path: Option<PathBuf>,
) -> Result<(), String> {
    let embedded_default = config_path.is_none();
    let mut runtime = runtime;
    fit_to_storage(&mut runtime);
    let runtime = Arc::new(runtime);
    let live = Arc::new(LiveRuntime::from(runtime.clone()));
    let Prepared {
        listeners,
        metrics,
        tls,
        dkim,
        delivery,
    } = prepared;
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

    let tls = Arc::new(tls);
    info!(event = "tls.ready", names = ?tls.names());
    let accounts = crate::auth::Accounts::open(&runtime.auth)
        .map_err(|e| format!("cannot open the users file: {e}"))?;
    for (domain, selector, algorithm) in dkim.keys() {
        info!(event = "dkim.key", %domain, %selector, algorithm = algorithm.name());
    }

    let mut bound = Vec::new();
    for (listener, role) in listeners {
        let listener = TcpListener::from_std(listener)
            .map_err(|e| format!("cannot listen (listener role {role}): {e}"))?;
        bound.push((listener, role));
    }
    let metrics_listener = match metrics {
        Some(listener) => Some(
            TcpListener::from_std(listener).map_err(|e| format!("cannot listen (metrics): {e}"))?,
        ),
        None => None,
    };

    let shutdown = CancellationToken::new();
    let (outbound_handle, outbound_receiver) = OutboundHandle::channel();
    let (queue_handle, queue_task) = queue::start(
        live.clone(),
        spool.clone(),
        delivery,
        outbound_handle,
        shutdown.clone(),
    );
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
    service::tell(service::READY);
    println!("ready");

    Signals::stop_requested(signals, &reloader).await;
    service::tell(service::STOPPING);
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

/// Lowers `limits.max_message_size` below the file-size limit, if the
/// process has one, and says so.
pub(crate) fn fit_to_storage(runtime: &mut Runtime) {
    let configured = runtime.limits.max_message_size;
    if let Some(largest) = runtime.fit_to_storage() {
        warn!(
            event = "limits.max_message_size_capped",
            configured,
            largest,
            "the process's file-size limit (ulimit -f, LimitFSIZE=) is below limits.max_message_size: larger messages get 552 5.3.4"
        );
    }
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
/// The folder was made by [`prepare`].
fn lock_spool(dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
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
                    service::tell(&service::reloading());
                    // Refusals are logged by the reloader, key by key.
                    let _ = reloader.reload().await;
                    service::tell(service::READY);
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
