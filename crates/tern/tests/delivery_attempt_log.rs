//! The `delivery.attempt` log event, in a process of its own: the subscriber
//! is global, so no other test's events (or cached call-site interest) mix in.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern::deliver::smtp::{SmtpSettings, TlsMode, deliver};
use tern::route::{Delivery, Host, Routes, Target, Transport};
use tern_proto::client::{Message, Recipient};
use tern_proto::{MailParams, RcptParams, parse_forward_path, parse_reverse_path};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A log writer the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A server that takes one message on one connection and says yes to all.
async fn agreeable_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        stream.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
        let mut in_data = false;
        loop {
            let mut line = Vec::new();
            if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let reply: &[u8] = if in_data {
                if line != b".\r\n" {
                    continue;
                }
                in_data = false;
                b"250 2.0.0 queued\r\n"
            } else if line.starts_with(b"DATA") {
                in_data = true;
                b"354 go on\r\n"
            } else if line.starts_with(b"QUIT") {
                let _ = stream.write_all(b"221 2.0.0 bye\r\n").await;
                return;
            } else {
                b"250 ok\r\n"
            };
            stream.write_all(reply).await.unwrap();
        }
    });
    addr
}

#[tokio::test]
async fn every_connection_attempt_is_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .init();

    let good = agreeable_server().await;
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let delivery = Delivery {
        destination: Routes::default().destination("example.test"),
        transport: Transport::Smtp,
        hosts: vec![Host {
            name: "mx.test".into(),
            preference: None,
            target: Target::Tcp(vec![refused, good]),
        }],
    };
    let message = Message {
        from: parse_reverse_path("<sender@tern.test>").unwrap().0,
        params: MailParams::default(),
        recipients: vec![Recipient {
            to: parse_forward_path("<a@example.test>").unwrap().0,
            params: RcptParams::default(),
        }],
        content: bytes::Bytes::from_static(b"x\r\n"),
    };
    let settings = SmtpSettings {
        helo_name: "out.tern.test".into(),
        connect_timeout: Duration::from_secs(10),
        tls: TlsMode::None,
        ..SmtpSettings::default()
    };
    deliver(&delivery, &[message], &settings).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
        .filter(|f| f["event"] == "delivery.attempt")
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["outcome"], "failed");
    assert_eq!(events[0]["address"], refused.to_string());
    assert!(
        events[0]["reply"]
            .as_str()
            .unwrap()
            .starts_with("451 4.4.1 ")
    );
    assert_eq!(events[1]["outcome"], "ok");
    assert_eq!(events[1]["address"], good.to_string());
    assert_eq!(events[1]["messages"], 1);
    for e in &events {
        assert_eq!(e["destination"], "mx:example.test");
        assert_eq!(e["host"], "mx.test");
        assert_eq!(e["transport"], "smtp");
        assert!(e["duration_ms"].is_u64());
        assert_eq!(e["tls"], "none");
    }
}
