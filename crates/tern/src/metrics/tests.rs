use super::*;
use std::collections::HashSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The value of one series (`name{labels}` exactly as exposed), 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_exposition_is_prometheus_text_with_every_series_from_zero() {
    let text = Sources::default().render().await;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP tern_") || rest.starts_with("TYPE tern_"),
                "{line}"
            );
            continue;
        }
        let (series, v) = line.rsplit_once(' ').expect(line);
        assert!(series.starts_with("tern_"), "{line}");
        assert!(v.parse::<f64>().is_ok(), "{line}");
    }
    assert!(text.contains("# TYPE tern_connections_accepted_total counter\n"));
    assert!(text.contains("# TYPE tern_sessions_open gauge\n"));
    assert!(text.contains("# TYPE tern_spool_commit_duration_seconds histogram\n"));
    assert!(text.contains("tern_spool_commit_duration_seconds_bucket{le=\"+Inf\"}"));
    assert!(text.contains("tern_received_bytes_total "));
    for reason in Refusal::all() {
        let series = format!(
            "tern_messages_refused_total{{reason=\"{}\"}}",
            reason.name()
        );
        assert!(text.contains(&series), "{series} missing");
    }
    for (role, _) in Role::NAMES {
        assert!(text.contains(&format!(
            "tern_connections_refused_total{{role=\"{role}\"}}"
        )));
    }
    assert!(
        text.contains("tern_delivery_attempts_total{destination=\"relay\",outcome=\"failed\"}")
    );
    // Without a running server there is nothing live to read.
    assert!(!text.contains("tern_spool_fsyncs"));
    assert!(!text.contains("tern_queue_recipients"));
}

#[tokio::test]
async fn counters_move_by_what_happened() {
    let sources = Sources::default();
    let before = sources.render().await;
    let peer: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    connection_accepted(Role::Submission);
    bytes_received(100);
    bytes_received(23);
    message_refused(1, peer, None, Refusal::Content(ContentError::TooManyHops));
    message_refused(1, peer, None, Refusal::Content(ContentError::TooManyHops));
    delivery(DeliveryClass::Lmtp, DeliveryOutcome::Deferred);
    spool_commit(Duration::from_millis(3), 7);
    login(false);
    let after = sources.render().await;
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        moved("tern_connections_accepted_total{role=\"submission\"}"),
        1.0
    );
    assert_eq!(moved("tern_received_bytes_total"), 123.0);
    assert_eq!(moved("tern_messages_refused_total{reason=\"loop\"}"), 2.0);
    assert_eq!(
        moved("tern_delivery_attempts_total{destination=\"lmtp\",outcome=\"deferred\"}"),
        1.0
    );
    assert_eq!(moved("tern_logins_total{outcome=\"failure\"}"), 1.0);
    assert!(moved("tern_spool_commit_records_count") >= 1.0);
    assert!(moved("tern_spool_commit_records_bucket{le=\"8\"}") >= 1.0);
    assert!(moved("tern_spool_commit_duration_seconds_sum") >= 0.003);
}

#[test]
fn the_open_session_gauge_follows_the_guards() {
    // Other tests may hold sessions open at the same time: compare with a
    // count taken while ours are held.
    let a = OpenSession::new();
    let b = OpenSession::new();
    let held = METRICS.sessions_open.get();
    assert!(held >= 2);
    drop(a);
    drop(b);
    assert!(METRICS.sessions_open.get() <= held - 2);
}

#[test]
fn refusal_names_are_distinct_label_values() {
    let names: Vec<&str> = Refusal::all().map(Refusal::name).collect();
    let unique: HashSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    for n in names {
        assert!(n.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{n}");
    }
    let full = io::Error::from_raw_os_error(libc::ENOSPC);
    assert_eq!(Refusal::storage(&full), Refusal::StorageFull);
    let big = io::Error::from_raw_os_error(libc::EFBIG);
    assert_eq!(Refusal::storage(&big), Refusal::StorageFull);
    let eio = io::Error::from_raw_os_error(libc::EIO);
    assert_eq!(Refusal::storage(&eio), Refusal::StorageError);
    assert_eq!(
        Refusal::spool(&SpoolError::Io(io::Error::from_raw_os_error(libc::EDQUOT))),
        Refusal::StorageFull
    );
}

#[test]
fn destinations_are_classed_by_their_route_kind() {
    assert_eq!(
        DeliveryClass::of_destination("mx:example.org"),
        DeliveryClass::Mx
    );
    assert_eq!(
        DeliveryClass::of_destination("relay:[192.0.2.1]:587"),
        DeliveryClass::Relay
    );
    assert_eq!(
        DeliveryClass::of_destination("lmtp:unix:/run/dovecot/lmtp"),
        DeliveryClass::Lmtp
    );
}

#[tokio::test]
async fn only_get_on_the_metrics_path_is_served() {
    let sources = Sources::default();
    let ok = respond(&Method::GET, "/metrics", &sources).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        ok.headers()[CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let head = respond(&Method::HEAD, "/metrics", &sources).await;
    assert_eq!(head.status(), StatusCode::OK);
    for path in ["/", "/metrics/", "/favicon.ico", "/metricsx"] {
        let r = respond(&Method::GET, path, &sources).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let post = respond(&Method::POST, "/metrics", &sources).await;
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()[ALLOW], "GET, HEAD");
}

async fn endpoint() -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, Sources::default(), shutdown.clone()));
    (addr, shutdown)
}

/// Sends `pieces` one write at a time, then reads the whole response.
async fn exchange(addr: SocketAddr, pieces: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    for p in pieces {
        s.write_all(p).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(SCRAPE_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("response within the scrape timeout")
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn scrapes_over_http_split_and_concurrent() {
    let (addr, shutdown) = endpoint().await;
    // A request head that arrives in pieces.
    let r = exchange(
        addr,
        &[b"GET /met", b"rics HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"],
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(
        r.contains("# TYPE tern_messages_accepted_total counter"),
        "{r}"
    );
    let r = exchange(addr, &[b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
    assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    let r = exchange(addr, &[b"NOT HTTP AT ALL\r\n\r\n"]).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let scrapes: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(exchange(
                addr,
                &[b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"],
            ))
        })
        .collect();
    for s in scrapes {
        let r = s.await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_off_without_blocking_others() {
    let (addr, shutdown) = endpoint().await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    // Others are served meanwhile.
    let r = exchange(addr, &[b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SCRAPE_TIMEOUT + Duration::from_secs(5), async {
        slow.read_to_end(&mut rest).await
    })
    .await
    .expect("the server closes a stalled request");
    // Closed (maybe with a 408), never answered with metrics.
    let _ = read;
    assert!(!String::from_utf8_lossy(&rest).contains("tern_"));
    assert!(started.elapsed() <= SCRAPE_TIMEOUT + Duration::from_secs(1));
    shutdown.cancel();
}

#[tokio::test]
async fn an_address_in_use_is_an_error_naming_the_key() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = bind(addr).unwrap_err();
    assert!(
        err.starts_with(&format!("metrics.address: cannot listen on {addr}: ")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
}
