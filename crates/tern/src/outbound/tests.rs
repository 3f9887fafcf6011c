//! The manager over a real spool and real sockets: a relay that refuses
//! connections (the recipient waits, and says why), then one that takes
//! the mail; the administrator's hold, release, flush and delete.

use super::*;
use crate::spool::tests::wait_until;
use crate::spool::{Recipient, SpoolConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn runtime(dir: &std::path::Path, relay: &str) -> Arc<Runtime> {
    runtime_with(dir, relay, "")
}

/// `delivery` adds keys to `[delivery]`.
fn runtime_with(dir: &std::path::Path, relay: &str, delivery: &str) -> Arc<Runtime> {
    let toml = format!(
        "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [local]\ndomains = [\"example.test\"]\n[[user]]\nname = \"alice\"\n\
         addresses = [\"alice@example.test\"]\n[delivery]\nretry_initial = \"1s\"\n\
         retry_max = \"1s\"\n{delivery}[route]\nrelay = \"{relay}\"\n[outbound]\ntls = \"none\"\n\
         connect_timeout = \"2s\"\n",
        dir.display()
    );
    Arc::new(crate::config::parse(&toml, dir).unwrap())
}

fn remote_envelope(rcpts: &[&str]) -> Envelope {
    let mut env = crate::spool::tests::envelope(0);
    env.recipients = rcpts
        .iter()
        .map(|a| Recipient {
            address: a.to_string(),
            original: a.to_string(),
            orcpt: None,
            notify: None,
            route: Route::Remote,
            status: RcptStatus::Pending,
        })
        .collect();
    // The shared test envelope is from 2023: long past the give-up time.
    env.received_at = chrono::Utc::now().timestamp();
    env
}

/// A minimal receiving server: accepts every message, counts them.
async fn sink() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 sink ESMTP\r\n").await.ok();
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        b"250 2.0.0 queued\r\n"
                    } else {
                        match line.get(..4).map(|v| v.to_ascii_uppercase()).as_deref() {
                            Some("RCPT") if line.contains("nobody") => {
                                b"550 5.1.1 <nobody>: no such user\r\n"
                            }
                            Some("EHLO") => b"250-sink\r\n250 8BITMIME\r\n",
                            Some("DATA") => {
                                in_data = true;
                                b"354 go\r\n"
                            }
                            Some("QUIT") => {
                                w.write_all(b"221 bye\r\n").await.ok();
                                return;
                            }
                            _ => b"250 2.0.0 ok\r\n",
                        }
                    };
                    w.write_all(reply).await.ok();
                }
            });
        }
    });
    (port, count)
}

async fn commit(spool: &Spool, env: Envelope) -> MsgId {
    let mut d = spool.draft();
    d.write(b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
    spool.commit(env, d).await.unwrap()
}

struct Running {
    spool: Spool,
    admin: AdminHandle,
    notify: OutboundHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn run(dir: &std::path::Path, relay: &str, spool: Option<Spool>) -> Running {
    run_with(runtime(dir, relay), spool).await
}

async fn run_with(runtime: Arc<Runtime>, spool: Option<Spool>) -> Running {
    let spool = match spool {
        Some(s) => s,
        None => {
            Spool::open(SpoolConfig::new(runtime.spool.dir.clone()))
                .unwrap()
                .0
        }
    };
    let shutdown = CancellationToken::new();
    let (notify, receiver) = OutboundHandle::channel();
    let worker =
        crate::deliver::worker::DeliveryThread::start(crate::deliver::worker::DELIVERY_NICE)
            .unwrap();
    let (queue, _local) = crate::queue::start(
        Arc::new(crate::config::LiveRuntime::from(runtime.clone())),
        spool.clone(),
        worker,
        notify.clone(),
        shutdown.clone(),
    );
    let (tripped_tx, tripped) = tokio::sync::mpsc::unbounded_channel();
    let egress = Arc::new(crate::egress::Egress::new(
        runtime.egress.clone(),
        Box::new(crate::egress::MemoryCounters::default()),
        None,
        Some(tripped_tx),
        Vec::new(),
    ));
    let (admin, task) = start(
        runtime,
        spool.clone(),
        queue,
        receiver,
        egress,
        tripped,
        shutdown.clone(),
    )
    .unwrap();
    Running {
        spool,
        admin,
        notify,
        shutdown,
        task,
    }
}

fn wait_reason(list: &serde_json::Value) -> Option<String> {
    list["messages"][0]["recipients"][0]["wait"]["reason"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_relay_defers_and_says_why_and_the_administrator_steers() {
    let tmp = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, the connect is refused at once.
    let r = run(tmp.path(), "[127.0.0.1]:1", None).await;
    let id = commit(&r.spool, remote_envelope(&["bob@remote.test"])).await;
    r.notify.notify(id);
    wait_until(|| {
        matches!(
            r.spool.get(id).map(|e| e.recipients[0].status.clone()),
            Some(RcptStatus::Deferred { .. })
        )
    })
    .await;
    let list = r.admin.request(QueueOp::List).await.unwrap();
    let rcpt = &list["messages"][0]["recipients"][0];
    assert_eq!(rcpt["status"], "deferred", "{list}");
    assert_eq!(rcpt["destination"], "relay:[127.0.0.1]:1");
    assert!(
        rcpt["last_reply"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{list}"
    );
    assert!(
        matches!(
            wait_reason(&list).as_deref(),
            Some("unreachable" | "in_flight" | "due")
        ),
        "{list}"
    );
    let dests = r.admin.request(QueueOp::Destinations).await.unwrap();
    assert_eq!(
        dests["destinations"][0]["destination"],
        "relay:[127.0.0.1]:1"
    );

    // Hold: it stays held, also in the file a restart reads.
    let held = r.admin.request(QueueOp::Hold(id)).await.unwrap();
    assert_eq!(held["affected"], 1);
    let list = r.admin.request(QueueOp::List).await.unwrap();
    assert!(
        matches!(wait_reason(&list).as_deref(), Some("held" | "in_flight")),
        "{list}"
    );
    assert_eq!(list["messages"][0]["held"], true);
    assert_eq!(
        admin::load_held(&admin::held_path(tmp.path())),
        BTreeSet::from([id])
    );
    let released = r.admin.request(QueueOp::Release(id)).await.unwrap();
    assert_eq!(released["affected"], 1);
    assert!(admin::load_held(&admin::held_path(tmp.path())).is_empty());

    // Delete: gone from the spool, no bounce.
    let deleted = r.admin.request(QueueOp::Delete(id)).await.unwrap();
    assert_eq!(deleted["affected"], 1);
    assert!(r.spool.get(id).is_none());
    assert!(r.spool.live().is_empty());
    let again = r.admin.request(QueueOp::Delete(id)).await.unwrap();
    assert_eq!(again["affected"], 0);
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_mail_reaches_the_relay_once_it_listens_and_leaves_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, count) = sink().await;
    // First a relay that is down; the queued mail survives a restart of
    // the manager onto a working relay (routes are decided per attempt).
    let r = run(tmp.path(), "[127.0.0.1]:1", None).await;
    let ids = [
        commit(&r.spool, remote_envelope(&["a@one.test", "b@one.test"])).await,
        commit(&r.spool, remote_envelope(&["c@two.test"])).await,
    ];
    for id in ids {
        r.notify.notify(id);
    }
    wait_until(|| {
        ids.iter().all(|id| {
            r.spool.get(*id).is_some_and(|e| {
                e.recipients
                    .iter()
                    .all(|r| matches!(r.status, RcptStatus::Deferred { .. }))
            })
        })
    })
    .await;
    r.shutdown.cancel();
    r.task.await.unwrap();
    let r = run(tmp.path(), &format!("[127.0.0.1]:{port}"), Some(r.spool)).await;
    let flushed = r.admin.request(QueueOp::Flush(None)).await.unwrap();
    assert_eq!(flushed["affected"], 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !r.spool.live().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            r.spool.live()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One transaction per message: both recipients of the first in one.
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
    r.shutdown.cancel();
    r.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_bounces_to_the_local_sender_and_the_others_are_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, count) = sink().await;
    let r = run(tmp.path(), &format!("[127.0.0.1]:{port}"), None).await;
    let mut env = remote_envelope(&["a@far.test", "nobody@far.test", "b@far.test"]);
    env.sender = "alice@example.test".into();
    env.ret = Some("HDRS".into());
    let id = commit(&r.spool, env).await;
    r.notify.notify(id);
    let new = tmp.path().join("mail/alice/Maildir/new");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let bounce = loop {
        let files: Vec<_> = std::fs::read_dir(&new).map_or(Vec::new(), |d| d.flatten().collect());
        if let Some(f) = files.first() {
            break std::fs::read(f.path()).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no bounce");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    wait_until(|| r.spool.live().is_empty()).await;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    let text = String::from_utf8_lossy(&bounce);
    assert!(text.starts_with("Return-Path: <>\r\n"), "{text}");
    assert!(text.contains("report-type=\"delivery-status\""), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; nobody@far.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("550 5.1.1 <nobody>: no such user"), "{text}");
    assert!(
        !text.contains("Final-Recipient: rfc822; a@far.test"),
        "{text}"
    );
    r.shutdown.cancel();
    r.task.await.unwrap();
}

/// Every file in alice's Maildir/new, read, oldest name first.
fn alice_mail(dir: &std::path::Path) -> Vec<String> {
    let new = dir.join("mail/alice/Maildir/new");
    let mut names: Vec<_> =
        std::fs::read_dir(&new).map_or(Vec::new(), |d| d.flatten().map(|e| e.path()).collect());
    names.sort();
    names
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_deferral_brings_one_delay_notice_then_the_bounce_at_the_give_up_time() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = runtime_with(
        tmp.path(),
        "[127.0.0.1]:1",
        "delay_notice = \"1s\"\ngive_up = \"3s\"\n",
    );
    let r = run_with(runtime, None).await;
    let mut env = remote_envelope(&["far@away.test"]);
    env.sender = "alice@example.test".into();
    let id = commit(&r.spool, env).await;
    r.notify.notify(id);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !alice_mail(tmp.path())
        .iter()
        .any(|m| m.contains("Action: failed"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no bounce: {:?}",
            alice_mail(tmp.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(|| r.spool.live().is_empty()).await;
    let mail = alice_mail(tmp.path());
    let delays: Vec<_> = mail
        .iter()
        .filter(|m| m.contains("Action: delayed"))
        .collect();
    assert_eq!(delays.len(), 1, "{mail:?}");
    assert!(delays[0].contains("Will-Retry-Until:"), "{}", delays[0]);
    assert!(delays[0].contains("Status: 4."), "{}", delays[0]);
    let bounce = mail.iter().find(|m| m.contains("Action: failed")).unwrap();
    assert!(bounce.contains("5.4.7"), "{bounce}");
    assert!(bounce.contains("cannot connect"), "{bounce}");
    assert_eq!(mail.len(), 2, "{mail:?}");
    r.shutdown.cancel();
    r.task.await.unwrap();
}

/// The relay's credentials go to the relay only: a per-domain SMTP
/// transport (here a server that offers no AUTH) takes its mail without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_domain_transport_does_not_get_the_relay_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, count) = sink().await;
    let toml = format!(
        "hostname = \"mx.test\"\ndata_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [local]\ndomains = [\"example.test\"]\n[[user]]\nname = \"alice\"\n\
         [delivery]\nretry_initial = \"1s\"\nretry_max = \"1s\"\n\
         [route]\nrelay = \"[127.0.0.1]:1\"\nrelay_username = \"u\"\nrelay_password = \"p\"\n\
         relay_auth_without_tls = true\n[route.transports]\n\"far.test\" = \"[127.0.0.1]:{port}\"\n\
         [outbound]\ntls = \"none\"\n",
        tmp.path().display()
    );
    let runtime = Arc::new(crate::config::parse(&toml, tmp.path()).unwrap());
    let r = run_with(runtime, None).await;
    let id = commit(&r.spool, remote_envelope(&["bob@far.test"])).await;
    r.notify.notify(id);
    wait_until(|| r.spool.live().is_empty()).await;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    r.shutdown.cancel();
    r.task.await.unwrap();
}
