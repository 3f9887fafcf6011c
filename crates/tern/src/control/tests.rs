use super::*;
use serde_json::{Value, json};
use std::io::Read;
use std::os::unix::net::UnixStream as StdStream;

/// A server on a socket in a fresh tempdir whose requests are answered by
/// `answer`; returns the dir (keep it alive), the socket path, the shutdown
/// token and the server task.
async fn start(
    answer: impl Fn(ControlRequest) -> ControlReply + Send + 'static,
) -> (
    tempfile::TempDir,
    PathBuf,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    let (tx, mut rx) = mpsc::channel::<(ControlRequest, oneshot::Sender<ControlReply>)>(4);
    tokio::spawn(async move {
        while let Some((req, reply)) = rx.recv().await {
            let _ = reply.send(answer(req));
        }
    });
    let shutdown = CancellationToken::new();
    let task = serve(&path, tx, shutdown.clone()).unwrap();
    (dir, path, shutdown, task)
}

/// Sends raw bytes and returns the whole reply.
fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = StdStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    // The server may reset after its reply when input is left unread.
    let _ = s.read_to_end(&mut reply);
    String::from_utf8(reply).unwrap()
}

/// Runs the blocking client off the runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[test]
fn requests_travel_as_tagged_json() {
    assert_eq!(
        serde_json::to_value(ControlRequest::Flush { id: None }).unwrap(),
        json!({"command": "flush", "id": null})
    );
    assert_eq!(
        serde_json::from_str::<ControlRequest>(r#"{"command":"flush"}"#).unwrap(),
        ControlRequest::Flush { id: None }
    );
    assert_eq!(
        serde_json::to_value(ControlRequest::Show { id: "AB".into() }).unwrap(),
        json!({"command": "show", "id": "AB"})
    );
    assert_eq!(
        serde_json::to_value(ControlRequest::Destinations).unwrap(),
        json!({"command": "destinations"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reaches_the_responder_and_its_reply_comes_back() {
    let (_dir, path, shutdown, task) = start(|req| match req {
        ControlRequest::Hold { id } => Ok(json!({"affected": 1, "id": id})),
        ControlRequest::Delete { .. } => Err("no message 42 in the queue".into()),
        other => Ok(json!({"echo": format!("{other:?}")})),
    })
    .await;
    let p = path.clone();
    let held = blocking(move || request(&p, &ControlRequest::Hold { id: "42".into() })).await;
    assert_eq!(held.unwrap(), json!({"affected": 1, "id": "42"}));
    let p = path.clone();
    let deleted = blocking(move || request(&p, &ControlRequest::Delete { id: "42".into() })).await;
    match deleted {
        Err(ControlError::Server(e)) => assert_eq!(e, "no message 42 in the queue"),
        other => panic!("{other:?}"),
    }
    let p = path.clone();
    let listed = blocking(move || request(&p, &ControlRequest::List)).await;
    assert_eq!(listed.unwrap(), json!({"echo": "List"}));

    shutdown.cancel();
    task.await.unwrap();
    assert!(!path.exists(), "the socket is removed at shutdown");
    let p = path.clone();
    let after = blocking(move || request(&p, &ControlRequest::List)).await;
    assert!(
        matches!(after, Err(ControlError::NotRunning(_))),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_an_error_reply_and_the_server_goes_on() {
    let (_dir, path, _shutdown, _task) = start(|_| Ok(json!({"affected": 0}))).await;
    for bad in [
        &b"not json\n"[..],
        b"{\"command\":\"explode\"}\n",
        b"{\"command\":\"show\"}\n",
        b"\n",
        b"\xff\xfe\n",
        b"",
    ] {
        let p = path.clone();
        let reply = blocking(move || raw(&p, bad)).await;
        let v: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
        assert!(v["error"].is_string(), "{bad:?} -> {reply}");
        assert!(reply.ends_with('\n'));
    }
    // An unterminated line at end of input is still a request.
    let p = path.clone();
    let reply = blocking(move || {
        let mut s = StdStream::connect(&p).unwrap();
        s.write_all(br#"{"command":"list"}"#).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    })
    .await;
    assert_eq!(reply, "{\"ok\":{\"affected\":0}}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_line_is_refused() {
    let (_dir, path, _shutdown, _task) = start(|_| Ok(json!("should not get here"))).await;
    let p = path.clone();
    let reply = blocking(move || {
        let mut line = br#"{"command":"show","id":""#.to_vec();
        line.resize(MAX_REQUEST_LINE + 100, b'A');
        raw(&p, &line)
    })
    .await;
    assert!(
        reply.starts_with("{\"error\":\"request line longer than"),
        "{reply}"
    );
    // A line of exactly the limit, newline included, is read.
    let p = path.clone();
    let reply = blocking(move || {
        let mut line = br#"{"command":"list"}"#.to_vec();
        line.resize(MAX_REQUEST_LINE - 1, b' ');
        line.push(b'\n');
        raw(&p, &line)
    })
    .await;
    assert_eq!(reply, "{\"ok\":\"should not get here\"}\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_request_or_a_gone_manager_is_an_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    let (tx, mut rx) = mpsc::channel::<(ControlRequest, oneshot::Sender<ControlReply>)>(4);
    let shutdown = CancellationToken::new();
    let _task = serve(&path, tx, shutdown.clone()).unwrap();
    let p = path.clone();
    let pending = blocking(move || request(&p, &ControlRequest::List));
    let pending = tokio::spawn(pending);
    let (_, reply) = rx.recv().await.unwrap();
    drop(reply);
    match pending.await.unwrap() {
        Err(ControlError::Server(e)) => assert!(e.contains("dropped"), "{e}"),
        other => panic!("{other:?}"),
    }
    drop(rx);
    let p = path.clone();
    match blocking(move || request(&p, &ControlRequest::List)).await {
        Err(ControlError::Server(e)) => assert!(e.contains("not running"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_or_manager_meets_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    let (tx, mut rx) = mpsc::channel::<(ControlRequest, oneshot::Sender<ControlReply>)>(4);
    let shutdown = CancellationToken::new();
    let _task =
        serve_with_deadline(&path, tx, shutdown.clone(), Duration::from_millis(300)).unwrap();
    // A client that never finishes its line.
    let p = path.clone();
    let reply = blocking(move || {
        let mut s = StdStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"{\"command\":").unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r
    })
    .await;
    assert!(
        reply.starts_with("{\"error\":\"no complete request"),
        "{reply}"
    );
    // A manager that holds on to the request.
    let p = path.clone();
    let pending = tokio::spawn(blocking(move || request(&p, &ControlRequest::List)));
    let held = rx.recv().await.unwrap();
    match pending.await.unwrap() {
        Err(ControlError::Server(e)) => assert!(e.starts_with("no complete request"), "{e}"),
        other => panic!("{other:?}"),
    }
    drop(held);
}

#[test]
fn nothing_listening_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    assert!(matches!(
        request(&path, &ControlRequest::List),
        Err(ControlError::NotRunning(_))
    ));
    // A socket file left by a killed server: nothing accepts on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(matches!(
        request(&path, &ControlRequest::List),
        Err(ControlError::NotRunning(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (tx, _rx) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let task = serve(&path, tx, shutdown.clone()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // Only the socket is left in the directory: the private one is gone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("control.sock")]);

    // A second server must not take over a live socket.
    let (tx2, _rx2) = mpsc::channel(1);
    let err = serve(&path, tx2, CancellationToken::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    shutdown.cancel();
    task.await.unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(dir.path());
    std::fs::write(&path, b"precious").unwrap();
    let (tx, _rx) = mpsc::channel(1);
    assert!(serve(&path, tx, CancellationToken::new()).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn replies_are_parsed_strictly() {
    assert_eq!(parse_reply(b"{\"ok\":null}\n").unwrap(), Value::Null);
    assert!(matches!(parse_reply(b""), Err(ControlError::Protocol(_))));
    assert!(matches!(
        parse_reply(b"{\"ok\":1}"),
        Err(ControlError::Protocol(_))
    ));
    assert!(matches!(
        parse_reply(b"[1]\n"),
        Err(ControlError::Protocol(_))
    ));
    assert!(matches!(
        parse_reply(b"{\"error\":\"nope\"}\n"),
        Err(ControlError::Server(e)) if e == "nope"
    ));
}
