"""The Prometheus endpoint (`[metrics] address`), scraped with curl and read
with prometheus_client's own text-format parser, and the log line every
refused or aborted message gets.

Traffic is real (smtplib where it sends the bytes we mean, `Raw` where it
would "fix" them: smtplib turns a bare LF into CRLF), and every assertion is
on how far a counter moved between two scrapes, so nothing depends on what
an earlier part of the test did.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ternlib import TernStartError, deep_merge, wait_until

METRICS_START_RE = re.compile(r"metrics\.start.*address=(\S+)")
MAX_SIZE = 10000


def metrics_url(srv) -> str:
    m = wait_until(lambda: METRICS_START_RE.search(srv.stderr()), 10, what="metrics.start logged")
    return f"http://{m.group(1)}/metrics"


def curl(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", "--write-out", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=20,
    )


def scrape(url: str) -> dict:
    """Every sample as {(name, ((label, value), ...)): value}."""
    res = curl(url)
    assert res.returncode == 0, res.stderr
    body, _, status = res.stdout.rpartition("\n")
    assert status == "200", res.stdout
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def config() -> dict:
    return {
        "metrics": {"address": "127.0.0.1:0"},
        "limits": {"max_message_size": MAX_SIZE},
        # Loopback may relay here: a remote recipient goes to the relay
        # nobody listens on ([127.0.0.1]:1) and is deferred.
        "relay": {"trusted_networks": ["127.0.0.1/32"]},
    }


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\n".encode()
        + body
    )


def send_traffic(srv) -> dict:
    """One accepted message, two too large (by their content, and by the
    SIZE= declared at MAIL), one with a bare LF, one refused recipient, one
    client gone mid-DATA, one remote recipient. Returns what
    it sent, for the assertions."""
    accepted = message("accepted")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as s:
        s.ehlo("client.test")
        refused = s.sendmail("sender@remote.test", ["alice@example.test"], accepted)
        assert refused == {}
        # A refused recipient (nobody by that name) and a good one.
        s.mail("sender@remote.test")
        code, _ = s.rcpt("nobody@example.test")
        assert code == 550
        # Too large: no SIZE= on MAIL (sendmail would add it and be refused
        # at MAIL), so the content itself is over the limit.
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(message("big", (b"x" * 70 + b"\r\n") * (MAX_SIZE // 50)))
        assert (code, text[:5]) == (552, b"5.3.4"), (code, text)
        # Too large by its SIZE= (sendmail declares it): refused at MAIL.
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("sender@remote.test", ["alice@example.test"], b"x" * (MAX_SIZE + 1))
        assert e.value.smtp_code == 552
        # A remote recipient: relayed (and deferred: nothing listens there).
        s.sendmail("sender@remote.test", ["someone@remote.test"], message("remote"))
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: bare\r\n\r\nline one\nline two\r\n.\r\n")
        c.expect(550, "5.5.2")
        assert c.cmd("QUIT").code == 221
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: cut\r\n\r\nhalf a mess")
    # Closed mid-DATA: wait until the server saw it.
    wait_until(lambda: 'reason="client_gone"' in srv.stderr(), 10, what="client_gone logged")
    return {"accepted": accepted, "connections": 3}


def test_counters_move_by_the_traffic_sent(tern):
    srv = tern(config())
    url = metrics_url(srv)
    before = scrape(url)
    # Every reason is there from the start, at 0.
    for reason in ["bare_lf", "too_large", "line_too_long", "loop", "storage_full", "client_gone"]:
        assert ("tern_messages_refused_total", (("reason", reason),)) in before, reason
    sent = send_traffic(srv)
    srv.wait_for_mail("alice", 1)

    def settled():
        now = scrape(url)
        ok = (
            value(now, "tern_delivery_attempts_total", destination="maildir", outcome="delivered")
            - value(before, "tern_delivery_attempts_total", destination="maildir", outcome="delivered") >= 1
            and value(now, "tern_delivery_attempts_total", destination="relay", outcome="deferred")
            - value(before, "tern_delivery_attempts_total", destination="relay", outcome="deferred") >= 1
            and value(now, "tern_sessions_open") == 0
        )
        return now if ok else None

    after = wait_until(settled, 20, interval=0.2, what="deliveries counted and sessions closed")

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tern_connections_accepted_total", role="mx") == sent["connections"]
    assert moved("tern_connections_refused_total", role="mx") == 0
    assert moved("tern_messages_accepted_total") == 2  # local and remote
    assert moved("tern_messages_refused_total", reason="too_large") == 2
    assert moved("tern_messages_refused_total", reason="bare_lf") == 1
    assert moved("tern_messages_refused_total", reason="client_gone") == 1
    assert moved("tern_messages_refused_total", reason="storage_full") == 0
    assert moved("tern_recipients_refused_total") == 1
    assert moved("tern_received_bytes_total") >= len(sent["accepted"]) + MAX_SIZE
    assert moved("tern_delivery_attempts_total", destination="maildir", outcome="delivered") == 1
    assert moved("tern_delivery_attempts_total", destination="relay", outcome="deferred") == 1
    assert moved("tern_delivery_attempts_total", destination="mx", outcome="delivered") == 0
    # Two messages committed (and delivery outcomes since): each in a synced batch.
    assert moved("tern_spool_commit_records_count") >= 2
    assert moved("tern_spool_commit_records_sum") >= 2
    assert moved("tern_spool_commit_duration_seconds_count") >= 2
    assert moved("tern_spool_commit_duration_seconds_bucket", le="+Inf") >= 2
    assert moved("tern_spool_fsyncs_total") >= 1
    # The remote recipient waits for its retry; nothing else is queued.
    assert value(after, "tern_queue_recipients", state="deferred") == 1
    assert value(after, "tern_queue_recipients", state="queued") == 0
    assert value(after, "tern_queue_recipients", state="held") == 0
    assert value(after, "tern_queue_recipients", state="in_flight") == 0
    # The relayed message is still in the spool; the local one is finished.
    assert value(after, "tern_spool_messages") == 1


def test_the_log_names_each_refusal_reason(tern):
    srv = tern(config())
    send_traffic(srv)
    lines = [l for l in srv.stderr().splitlines() if "message.refused" in l]
    for reason in ["too_large", "bare_lf", "client_gone"]:
        # One event with the session, the client and the queue ID the
        # message's Received: field had.
        assert any(
            f'reason="{reason}"' in l and "session_id=" in l and "client=127.0.0.1:" in l and "queue_id=" in l
            for l in lines
        ), f"no message.refused with reason={reason} and its IDs:\n" + "\n".join(lines)
    # Refused at MAIL for its SIZE=: no content, so no queue ID yet.
    assert any('reason="too_large"' in l and "queue_id=" not in l for l in lines), "\n".join(lines)
    # A refused recipient alone does not refuse a message.
    assert len(lines) == 4, "\n".join(lines)
    assert "message.aborted" not in srv.stderr()


def test_only_the_metrics_path_is_served(tern):
    srv = tern(config())
    url = metrics_url(srv)
    res = curl(url.replace("/metrics", "/"))
    assert res.returncode == 0 and res.stdout.endswith("\n404"), res.stdout
    res = subprocess.run(["curl", "--silent", "--head", "--max-time", "10", url],
                         capture_output=True, text=True, timeout=20)
    assert res.stdout.startswith("HTTP/1.1 200"), res.stdout
    assert "text/plain; version=0.0.4" in res.stdout, res.stdout


def test_a_metrics_address_in_use_is_a_startup_error_naming_the_key(tern):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = tern({"metrics": {"address": f"127.0.0.1:{port}"}}, start=False)
        with pytest.raises(TernStartError) as e:
            srv.start()
    assert f"metrics.address: cannot listen on 127.0.0.1:{port}: Address already in use" in str(e.value)
    assert srv.proc.returncode not in (0, None)


def test_a_full_spool_counts_and_logs_storage_full(tern):
    # A free-space reserve no disk has: every MAIL meets a full spool.
    srv = tern(deep_merge(config(), {"limits": {"min_free_space": 2 ** 62}}))
    url = metrics_url(srv)
    before = scrape(url)
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<sender@remote.test>")
        assert (r.code, r.enhanced) == (452, "4.3.1"), r
    after = scrape(url)
    assert value(after, "tern_messages_refused_total", reason="storage_full") - value(
        before, "tern_messages_refused_total", reason="storage_full"
    ) == 1
    assert value(after, "tern_messages_accepted_total") == value(before, "tern_messages_accepted_total")
    wait_until(lambda: 'reason="storage_full"' in srv.stderr(), 10, what="storage_full logged")


def test_connections_over_the_limit_count_as_refused_and_sessions_as_open(tern):
    srv = tern(deep_merge(config(), {"limits": {"max_connections_per_ip": 1}}))
    url = metrics_url(srv)
    before = scrape(url)
    with srv.connect() as first:
        first.ehlo()
        assert value(scrape(url), "tern_sessions_open") == 1
        with srv.connect(greet=False) as second:
            second.expect(421, "4.7.0")
    after = wait_until(
        lambda: (lambda s: s if value(s, "tern_sessions_open") == 0 else None)(scrape(url)),
        10,
        interval=0.1,
        what="the session closed",
    )
    assert value(after, "tern_connections_refused_total", role="mx") - value(
        before, "tern_connections_refused_total", role="mx"
    ) == 1
    assert value(after, "tern_connections_accepted_total", role="mx") - value(
        before, "tern_connections_accepted_total", role="mx"
    ) == 1
