"""Outbound delivery end to end: the real `tern` relays to receivers found
through a real DNS server on loopback (testdns), and the receivers are the
scripted peer (smtpeer), Postfix's smtp-sink and Dovecot's LMTP server.

Every Tern here trusts 127.0.0.0/8 for relaying, asks only the test DNS
server, contacts MX hosts on one port P that is free on every loopback
address the test uses (127.0.0.2, 127.0.0.3, ...), and retries after 1 s,
then 2 s: retries are made fast by configuration, never waited for with a
sleep. Every wait polls with a deadline.

Covers: relay by MX (exact bytes, one Received: added), smtp-sink for one
message and for 100 recipients across 5 domains, backup MX, implicit MX,
envelope parameters (BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT), 421 at the
greeting, a smarthost with AUTH, STARTTLS (opportunistic, required,
verified), greylisted recipients, transactions of at most 50 recipients and
452 "too many recipients", local + remote + alias recipients of one
message, the null sender, dot stuffing of BDAT-received content, what the
peer cannot take (8BITMIME, SMTPUTF8, SIZE), a DNS timeout that holds up no
other domain, connection reuse, null MX, NXDOMAIN, SERVFAIL then fixed, 4xx
then success, a connection cut mid-data, one refused recipient of three, a
1,000,000-octet line (no line limit by default; folded), LMTP to the scripted peer and to a real Dovecot, a
restart with a full queue, kill -9 during delivery, SIGTERM while a peer
hangs.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from smtpeer import Peer, make_cert
from ternlib import HOSTNAME, Raw, header_values, wait_until
from testdns import DnsServer

SENDER = "alice@example.test"  # local: bounces to it land in alice's Maildir, not at a peer

ZONE = """
remote.test        MX 10 mx1.remote.test
mx1.remote.test    A 127.0.0.2
backup.test        MX 10 mx1.backup.test
backup.test        MX 20 mx2.backup.test
mx1.backup.test    A 127.0.0.2
mx2.backup.test    A 127.0.0.3
amx.test           A 127.0.0.4
nullmx.test        MX 0 .
nullmx.test        A 127.0.0.2
broken.test        SERVFAIL
"""
ZONE += "".join(f"d{i}.test MX 10 mx.d{i}.test\nmx.d{i}.test A 127.0.0.{10 + i}\n" for i in range(1, 6))
FIXED = ZONE.replace("broken.test        SERVFAIL", "broken.test MX 10 mx1.remote.test")


def free_port(hosts: list[str]) -> int:
    """A TCP port nobody listens on at any of `hosts` (checked by binding)."""
    for _ in range(100):
        socks = []
        try:
            s = socket.socket()
            s.bind((hosts[0], 0))
            socks.append(s)
            port = s.getsockname()[1]
            for h in hosts[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no common free port on {hosts}")


MX_HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"] + [f"127.0.0.{10 + i}" for i in range(1, 6)]


@pytest.fixture
def dns(tmp_path):
    with DnsServer(tmp_path, ZONE) as server:
        yield server


@pytest.fixture
def mx_port():
    return free_port(MX_HOSTS)


@pytest.fixture
def peers():
    started: list = []
    yield started
    for p in started:
        p.stop()


def outbound(tern, dns, port, extra: dict | None = None, start: bool = True):
    cfg = {
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
        "delivery": {"retry_initial": "1s", "retry_max": "2s"},
        "dns": {"nameservers": [dns.addr], "timeout": "1s", "attempts": 1},
        # ternlib's default relay (nobody listening) is replaced by MX delivery.
        "route": {"relay": None, "mx_port": port},
        "outbound": {"connect_timeout": "2s"},
    }
    for key, value in (extra or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return tern(cfg, start=start)


def make_msg(marker: str, to: str = "someone@remote.test", body: str = "") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: outbound {marker}\r\n"
        f"Message-ID: <{marker}@example.test>\r\n"
        f"\r\n"
        f"Hello, this is {marker}.\r\n"
        f".a line that starts with a dot\r\n"
        f"{body}"
        f"last line\r\n"
    ).encode()


def send(srv, rcpts: list[str], msg: bytes | None = None, marker: str | None = None) -> bytes:
    msg = msg or make_msg(marker or uuid.uuid4().hex, rcpts[0])
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail(SENDER, rcpts, msg) == {}
    return msg


def send_many(srv, rcpt: str, n: int) -> list[str]:
    markers = [f"m{i:03d}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        for m in markers:
            assert s.sendmail(SENDER, [rcpt], make_msg(m, rcpt)) == {}
    return markers


def queue_empty(srv, timeout: float = 20.0) -> None:
    try:
        wait_until(lambda: "queue is empty" in srv.queue_list(), timeout, interval=0.1, what="empty queue")
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{srv.queue_list()}\nstderr tail:\n{srv.stderr()[-3000:]}") from None


def results(srv, status: str) -> list[str]:
    """The outbound `delivery.result` log lines with this status (not the
    Maildir deliveries, such as a bounce to the local sender)."""
    return [ln for ln in srv.stderr().splitlines()
            if "delivery.result" in ln and f'status="{status}"' in ln and 'route="maildir"' not in ln]


def bounce_for(srv, rcpt: str) -> str:
    """The one bounce the local sender got, checked to report `rcpt` only."""
    (bounce,) = srv.wait_for_mail("alice", 1)
    text = bounce.decode("utf-8", errors="replace")
    assert re.findall(r"^Final-Recipient: rfc822; ?(\S+)", text, re.M) == [rcpt], text[:2000]
    assert re.search(r"^Action: failed", text, re.M), text[:2000]
    return text


def marker_of(data: bytes) -> str:
    m = re.search(rb"Message-ID: <([^@>]+)@", data)
    assert m, data[:300]
    return m.group(1).decode()


def assert_relayed(data: bytes, original: bytes) -> None:
    """What the peer got: one Received: of ours prepended, then the original."""
    assert data.endswith(original), data[-300:]
    added = data[: len(data) - len(original)]
    assert added.startswith(b"Received: "), added
    received = header_values(added + b"\r\n", "Received")
    assert len(received) == 1 and f"by {HOSTNAME}" in received[0], received


# ------------------------------------------------------------- smtp-sink


class Sink:
    """Postfix's smtp-sink on ADDR:PORT dumping every transaction to a file."""

    def __init__(self, workdir: Path, host: str, port: int):
        self.dir = Path(workdir) / f"sink-{host}"
        self.dir.mkdir(parents=True)
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "root", "-d", f"{self.dir}/%M.", f"{host}:{port}", "100"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: _listening(host, port) or self.proc.poll() is not None, 10, what="smtp-sink")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def sink_rcpts(dump: bytes) -> list[str]:
    return re.findall(r"^X-Rcpt-Args: <([^>]*)>", dump.decode(errors="replace"), re.M)


# ------------------------------------------------------------- tests


def test_relay_by_mx_arrives_byte_identical(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1)
    assert tx.mail_from == SENDER
    assert tx.rcpt_addresses == ["someone@remote.test"]
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert len(peer.received()) == 1
    assert len(results(srv, "delivered")) == 1


def test_relay_to_smtp_sink(tern, dns, mx_port, tmp_path):
    sink = Sink(tmp_path, "127.0.0.2", mx_port)
    try:
        srv = outbound(tern, dns, mx_port)
        original = send(srv, ["someone@remote.test"])
        queue_empty(srv)
        (dump,) = wait_until(sink.dumps, 10, what="smtp-sink dump")
    finally:
        sink.stop()
    assert sink_rcpts(dump) == ["someone@remote.test"]
    assert re.search(rf"^X-Mail-Args: <{SENDER}>", dump.decode(), re.M), dump[:400]
    # smtp-sink stores LF line ends and adds its own headers first.
    text = dump.replace(b"\r\n", b"\n")
    assert original.replace(b"\r\n", b"\n") in text, text
    assert f"by {HOSTNAME}".encode() in text


def test_hundred_recipients_five_domains_smtp_sink(tern, dns, mx_port, tmp_path):
    sinks = {i: Sink(tmp_path, f"127.0.0.{10 + i}", mx_port) for i in range(1, 6)}
    try:
        srv = outbound(tern, dns, mx_port)
        rcpts = [f"user{n:02d}@d{n % 5 + 1}.test" for n in range(100)]
        send(srv, rcpts)
        queue_empty(srv, 30)
        got = {i: wait_until(lambda s=s: s.dumps(), 10, what="dumps") for i, s in sinks.items()}
    finally:
        for s in sinks.values():
            s.stop()
    seen = []
    for i, dumps in got.items():
        # 20 recipients per domain, at most 50 a transaction: one transaction.
        assert len(dumps) == 1, (i, [sink_rcpts(d) for d in dumps])
        rc = sink_rcpts(dumps[0])
        assert all(r.endswith(f"@d{i}.test") for r in rc), rc
        seen += rc
    assert sorted(seen) == sorted(rcpts)


def test_primary_mx_down_backup_mx_gets_it(tern, dns, mx_port, peers):
    backup = Peer("127.0.0.3", mx_port).start()
    peers.append(backup)
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@backup.test"])
    (tx,) = backup.wait_for(1)
    assert_relayed(tx.data, original)
    queue_empty(srv)


def test_implicit_mx_from_a_record(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.4", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@amx.test"])
    (tx,) = peer.wait_for(1)
    assert tx.rcpt_addresses == ["someone@amx.test"]
    assert_relayed(tx.data, original)
    queue_empty(srv)


def test_envelope_parameters_are_relayed(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    rcpt = "jörg@remote.test"
    original = make_msg("params", body="8-bit: ünïcödé\r\n")
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.mail(SENDER, ["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=env+2Bid"])[0] == 250
        assert s.rcpt(rcpt, ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;orig+2Bone@remote.test"])[0] == 250
        assert s.data(original)[0] == 250
    (tx,) = peer.wait_for(1)
    assert tx.rcpt_addresses == [rcpt]
    assert {"BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=env+2Bid"} <= set(tx.mail_params), tx.mail_params
    assert {"NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;orig+2Bone@remote.test"} == set(tx.rcpts[0][1]), tx.rcpts
    assert_relayed(tx.data, original)
    queue_empty(srv)


def test_421_slow_down_at_greeting_is_retried(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.fail_connections = (2, "421 4.7.0 Too many connections, slow down")
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1, 20)
    assert tx.conn == 3
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert len(peer.received()) == 1


def test_smarthost_with_auth(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.3", mx_port, auth=("tern", "s3cret")).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"route": {
        "relay": f"127.0.0.3:{mx_port}", "relay_username": "tern", "relay_password": "s3cret",
        "relay_auth_without_tls": True}})
    original = send(srv, ["someone@remote.test"])  # its MX, 127.0.0.2, is not asked
    (tx,) = peer.wait_for(1)
    assert tx.auth == "tern"
    assert_relayed(tx.data, original)
    queue_empty(srv)


def test_starttls_offered_opportunistic_delivers_once(tern, dns, mx_port, peers, tmp_path):
    peer = Peer("127.0.0.2", mx_port, cert=make_cert(tmp_path, "mx1.remote.test")).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"outbound": {"tls": "opportunistic"}})
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1)
    assert tx.tls  # the self-signed certificate is not checked
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert len(peer.received()) == 1


def test_starttls_required_delivers_encrypted(tern, dns, mx_port, peers, tmp_path):
    peer = Peer("127.0.0.2", mx_port, cert=make_cert(tmp_path, "mx1.remote.test")).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"outbound": {"tls": "require"}})
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1)
    assert tx.tls
    assert_relayed(tx.data, original)
    queue_empty(srv)


@pytest.mark.parametrize("cert_name, delivered", [("mx1.remote.test", True), ("other.test", False)])
def test_starttls_verify_checks_the_mx_name(tern, dns, mx_port, peers, tmp_path, cert_name, delivered):
    cert = make_cert(tmp_path, cert_name)
    peer = Peer("127.0.0.2", mx_port, cert=cert).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"outbound": {"tls": "verify", "tls_ca_file": str(cert[2])}})
    send(srv, ["someone@remote.test"])
    if delivered:
        (tx,) = peer.wait_for(1)
        assert tx.tls
        queue_empty(srv)
    else:
        (line,) = wait_until(lambda: results(srv, "deferred"), 15, what="deferred")
        assert "someone@remote.test" in line and "reply=4" in line, line
        assert peer.received() == []


def test_greylisted_recipient_is_retried_alone(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.rcpt_replies["b@remote.test"] = "450 4.7.1 greylisted, come back later"
    peer.on_transaction = lambda tx: peer.rcpt_replies.clear()  # then accepted
    srv = outbound(tern, dns, mx_port)
    send(srv, ["a@remote.test", "b@remote.test"])
    queue_empty(srv)
    assert [t.rcpt_addresses for t in peer.received()] == [["a@remote.test"], ["b@remote.test"]]
    (deferred,) = results(srv, "deferred")
    assert "b@remote.test" in deferred and "450 4.7.1 greylisted" in deferred


def test_lmtp_temporary_failure_of_one_recipient_is_retried_alone(tern, dns, peers):
    peer = Peer("127.0.0.1", 0, lmtp=True).start()
    peers.append(peer)
    peer.lmtp_replies["b@lmtp.test"] = "452 4.2.2 mailbox full"
    seen = []

    def second_time_accept(tx):
        seen.append(tx)
        if len(seen) > 1:
            peer.lmtp_replies.clear()

    peer.on_transaction = second_time_accept
    srv = outbound(tern, dns, 25, {"route": {"transports": {"lmtp.test": f"lmtp:[127.0.0.1]:{peer.port}"}}})
    send(srv, ["a@lmtp.test", "b@lmtp.test"])
    queue_empty(srv)
    assert [t.delivered for t in peer.received()] == [["a@lmtp.test"], ["b@lmtp.test"]]
    assert peer.received()[1].rcpt_addresses == ["b@lmtp.test"]


def test_more_than_fifty_recipients_go_in_transactions_of_fifty(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"limits": {"max_recipients": 200}})
    rcpts = [f"u{i:03d}@remote.test" for i in range(120)]
    send(srv, rcpts)
    queue_empty(srv)
    txs = peer.received()
    assert sorted(len(t.rcpts) for t in txs) == [20, 50, 50]
    assert sorted(a for t in txs for a in t.rcpt_addresses) == rcpts


def test_452_too_many_recipients_sends_the_rest_later(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.max_rcpts = 10
    srv = outbound(tern, dns, mx_port)
    rcpts = [f"u{i:03d}@remote.test" for i in range(25)]
    send(srv, rcpts)
    queue_empty(srv)
    txs = peer.received()
    assert all(len(t.rcpts) <= 10 for t in txs)
    assert sorted(a for t in txs for a in t.rcpt_addresses) == rcpts  # each exactly once


def test_local_remote_and_alias_recipients_of_one_message(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.fail_transactions = (1, "451 4.3.0 try again")
    srv = outbound(tern, dns, mx_port, {"aliases": {"fwd@example.test": ["bob", "fwd@remote.test"]}})
    original = send(srv, ["carol@example.test", "someone@remote.test", "fwd@example.test"])
    srv.wait_for_mail("carol", 1)
    srv.wait_for_mail("bob", 1)
    txs = peer.wait_for(1, 20)
    queue_empty(srv)
    assert sorted(a for t in peer.received() for a in t.rcpt_addresses) == ["fwd@remote.test",
                                                                            "someone@remote.test"]
    for tx in txs:
        assert tx.mail_from == SENDER
        assert_relayed(tx.data, original)
    # The local copies were made once, the remote retry did not repeat them.
    assert len(srv.mails("carol")) == 1 and len(srv.mails("bob")) == 1


def test_null_sender_is_relayed_as_null(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.mail("")[0] == 250 and s.rcpt("someone@remote.test")[0] == 250
        assert s.data(make_msg("null-sender"))[0] == 250
    (tx,) = peer.wait_for(1)
    assert tx.mail_from == ""
    queue_empty(srv)


def test_content_received_by_bdat_with_a_dot_line_is_stuffed_for_data(tern, dns, mx_port, peers):
    # BDAT carries "<CRLF>.<CRLF>" as plain text; a peer without CHUNKING
    # gets DATA, where that line must be stuffed, not end the message.
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.extensions.remove("CHUNKING")
    srv = outbound(tern, dns, mx_port)
    body = (b"From: <alice@example.test>\r\nSubject: dots\r\nMessage-ID: <dots@example.test>\r\n\r\n"
            b"line\r\n.\r\nMAIL FROM:<evil@example.net>\r\n..two\r\n.\r\n")
    with Raw(srv.port) as r:
        r.expect(220)
        r.ehlo()
        r.cmd("MAIL FROM:<alice@example.test>")
        r.cmd("RCPT TO:<someone@remote.test>")
        r.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
        r.expect(250)
    (tx,) = peer.wait_for(1)
    queue_empty(srv)
    assert not tx.bdat and tx.rcpt_addresses == ["someone@remote.test"]
    assert_relayed(tx.data, body)
    assert len(peer.received()) == 1 and not any(c.startswith("MAIL FROM:<evil") for c in peer.commands)


@pytest.mark.parametrize("missing, mail_params, rcpt, body, reply", [
    ("8BITMIME", ["BODY=8BITMIME"], "someone@remote.test", "8-bit: \u00fc\r\n", "554 5.6.3"),
    ("SMTPUTF8", ["SMTPUTF8"], "j\u00f6rg@remote.test", "", "550 5.6.7"),
    ("SIZE", [], "someone@remote.test", "y" * 900 + "\r\n", "552 5.3.4"),
])
def test_what_the_peer_cannot_take_fails_without_being_sent(tern, dns, mx_port, peers, missing,
                                                            mail_params, rcpt, body, reply):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.extensions = [e for e in peer.extensions if not e.startswith(missing)]
    if missing == "SIZE":
        peer.extensions.append("SIZE 500")
    srv = outbound(tern, dns, mx_port)
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        s.ehlo()
        assert s.mail(SENDER, mail_params)[0] == 250 and s.rcpt(rcpt)[0] == 250
        assert s.data(make_msg("cannot", body=body))[0] == 250
    queue_empty(srv)
    (failed,) = results(srv, "failed")
    assert f"reply={reply}" in failed, failed
    assert not any(c.startswith(("MAIL", "DATA", "BDAT")) for c in peer.commands), peer.commands


def test_dns_timeout_of_one_domain_does_not_hold_up_another(tern, tmp_path, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    with DnsServer(tmp_path, ZONE + "slow.test TIMEOUT\n") as dns:
        srv = outbound(tern, dns, mx_port, {"dns": {"timeout": "5s"}})
        send(srv, ["someone@slow.test"])
        send(srv, ["someone@remote.test"])
        peer.wait_for(1, 4)
        assert results(srv, "deferred") == []  # slow.test is still being looked up


def test_one_connection_carries_several_messages(tern, dns, mx_port, peers):
    # One connection at a time to the destination and a slow peer: messages
    # pile up behind the first, and max_messages_per_connection (100) lets
    # the open connection carry them instead of a new session each.
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.data_delay = 0.1
    srv = outbound(tern, dns, mx_port, {"outbound": {"window_initial": 1, "window_max": 1}})
    send_many(srv, "someone@remote.test", 10)
    peer.wait_for(10, 20)
    queue_empty(srv)
    assert peer.connections < 10, f"{peer.connections} connections for 10 messages"
    # An idle connection waits a moment (2 s) for more before its QUIT.
    wait_until(lambda: sum(1 for c in peer.commands if c == "QUIT") == peer.connections, 10,
               what="a QUIT for every connection")


def _session_of_ten(tern, dns, mx_port, peer):
    """10 messages behind one connection at a time (window 1) to a slow peer."""
    peer.data_delay = 0.05
    srv = outbound(tern, dns, mx_port, {"outbound": {"window_initial": 1, "window_max": 1}})
    return srv, send_many(srv, "someone@remote.test", 10)


def test_421_at_end_of_data_mid_session_loses_and_repeats_nothing(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    calls = []

    def third_is_told_to_slow_down(tx):
        calls.append(tx)
        return "421 4.7.0 Too many connections, slow down" if len(calls) == 3 else None

    peer.on_transaction = third_is_told_to_slow_down
    srv, markers = _session_of_ten(tern, dns, mx_port, peer)
    queue_empty(srv)
    got = [marker_of(t.data) for t in peer.received()]
    assert sorted(got) == sorted(markers)
    assert peer.connections >= 2


def test_connection_lost_mid_session_strands_no_message(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.cut_data = {3}  # the third transaction of the session is cut
    srv, markers = _session_of_ten(tern, dns, mx_port, peer)
    queue_empty(srv, 6)  # the cut message is due again after 1 s
    got = [marker_of(t.data) for t in peer.received()]
    assert sorted(got) == sorted(markers)


def test_bounce_to_a_remote_sender_goes_out_from_the_null_sender(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail("sender@remote.test", ["x@nowhere.test"], make_msg("bounce-out")) == {}
    (tx,) = peer.wait_for(1)
    queue_empty(srv)
    assert tx.mail_from == "" and tx.rcpt_addresses == ["sender@remote.test"]
    assert b"Final-Recipient: rfc822; x@nowhere.test" in tx.data, tx.data[:2000]


def test_undeliverable_bounce_becomes_one_double_bounce(tern, dns, mx_port):
    srv = outbound(tern, dns, mx_port)
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail("sender@nowhere2.test", ["x@nowhere.test"], make_msg("double")) == {}
    queue_empty(srv)
    (double,) = srv.wait_for_mail("alice", 1)  # alice is the postmaster
    assert re.search(rb"^Subject: .*double bounce", double, re.M | re.I), double[:600]
    assert len(results(srv, "failed")) == 2  # the message, then its bounce; nothing more


def test_null_mx_fails_at_once(tern, dns, mx_port, peers):
    # The domain's A record points at a peer: a null MX must not fall back to it.
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    send(srv, ["someone@nullmx.test"])
    queue_empty(srv)
    (line,) = wait_until(lambda: results(srv, "failed"), 10, what="failed result")
    assert "someone@nullmx.test" in line and "reply=550" in line, line
    assert not results(srv, "deferred")
    assert re.search(r"^Status: 5\.1\.10", bounce_for(srv, "someone@nullmx.test"), re.M)
    assert peer.received() == [] and peer.connections == 0


def test_nxdomain_fails_permanently(tern, dns, mx_port):
    srv = outbound(tern, dns, mx_port)
    send(srv, ["someone@nowhere.test"])
    queue_empty(srv)
    (line,) = results(srv, "failed")
    assert "someone@nowhere.test" in line and "reply=550" in line, line
    assert not results(srv, "deferred")
    bounce_for(srv, "someone@nowhere.test")


def test_servfail_defers_until_the_zone_is_fixed(tern, dns, mx_port, peers, tmp_path):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@broken.test"])
    wait_until(lambda: "deferred after" in srv.queue_list(), 15, interval=0.1, what="deferred")
    assert "someone@broken.test" in srv.queue_list()
    assert peer.received() == [] and not results(srv, "failed")
    # Same port, fixed zone: Tern's next retry asks again.
    port = dns.port
    dns.stop()
    fixed_dir = tmp_path / "fixed"
    fixed_dir.mkdir()
    with DnsServer(fixed_dir, FIXED, bind=f"127.0.0.1:{port}"):
        (tx,) = peer.wait_for(1, 20)
        assert_relayed(tx.data, original)
        queue_empty(srv)


def test_4xx_twice_then_delivered_exactly_once(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.fail_transactions = (2, "451 4.3.0 try again")
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1, 20)
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert peer.failed == 2 and len(peer.received()) == 1
    deferred = results(srv, "deferred")
    assert len(deferred) == 2 and all("451 4.3.0 try again" in d for d in deferred), deferred


def test_connection_cut_mid_data_is_retried(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.cut_data = 1
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1, 20)
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert peer.attempts == 2 and len(peer.received()) == 1
    assert len(results(srv, "deferred")) == 1


def test_one_of_three_recipients_refused(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.rcpt_replies["b@remote.test"] = "550 5.1.1 <b@remote.test>: no such user"
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["a@remote.test", "b@remote.test", "c@remote.test"])
    (tx,) = peer.wait_for(1)
    assert tx.rcpt_addresses == ["a@remote.test", "c@remote.test"]
    assert_relayed(tx.data, original)
    queue_empty(srv)
    (failed,) = results(srv, "failed")
    assert "b@remote.test" in failed and "550 5.1.1 <b@remote.test>: no such user" in failed, failed
    assert len(results(srv, "delivered")) == 2
    bounce = bounce_for(srv, "b@remote.test")
    assert "Diagnostic-Code: smtp; 550 5.1.1 <b@remote.test>: no such user" in bounce, bounce[:2000]


def test_million_octet_line_is_folded_not_cut(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv = outbound(tern, dns, mx_port)
    original = send(srv, ["someone@remote.test"], make_msg("long", body="x" * 1_000_000 + "\r\n"))
    (tx,) = peer.wait_for(1, 30)
    queue_empty(srv)
    lines = tx.data.split(b"\r\n")
    assert lines[-1] == b"" and max(len(ln) for ln in lines) <= 998
    # Each break is CRLF SP (as Postfix): joining the " x..." continuations
    # back without their space gives the original's lines whole.
    joined: list[bytes] = []
    for ln in lines[:-1]:
        if joined and ln.startswith(b" ") and not ln[1:].strip(b"x") and not joined[-1].strip(b"x"):
            joined[-1] += ln[1:]
        else:
            joined.append(ln)
    assert b"\r\n".join(joined) + b"\r\n" == tx.data[: tx.data.index(b"From: ")] + original


def test_lmtp_transport_one_recipient_refused(tern, dns, peers):
    peer = Peer("127.0.0.1", 0, lmtp=True).start()
    peers.append(peer)
    peer.lmtp_replies["b@lmtp.test"] = "550 5.1.1 <b@lmtp.test>: unknown"
    srv = outbound(tern, dns, 25, {"route": {"transports": {"lmtp.test": f"lmtp:[127.0.0.1]:{peer.port}"}}})
    original = send(srv, ["a@lmtp.test", "b@lmtp.test"])
    (tx,) = peer.wait_for(1)
    assert tx.delivered == ["a@lmtp.test"]
    assert tx.data.endswith(original)
    assert any(c.startswith("LHLO ") for c in peer.commands)
    queue_empty(srv)
    (failed,) = results(srv, "failed")
    assert "b@lmtp.test" in failed and "550 5.1.1" in failed, failed
    (delivered,) = results(srv, "delivered")
    assert "a@lmtp.test" in delivered


DOVECOT = "/usr/sbin/dovecot"


def test_dovecot_lmtp_into_its_maildir(tern, dns):
    # Its own world under a directory Dovecot's unprivileged users can enter.
    base = Path(tempfile.mkdtemp(prefix="tern-dovecot-"))
    base.chmod(0o755)
    port = free_port(["127.0.0.1"])
    mail = base / "mail"
    mail.mkdir()
    shutil.chown(mail, "nobody", "nogroup")
    conf = base / "dovecot.conf"
    conf.write_text(f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:{mail}/%u/Maildir
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%u
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening("127.0.0.1", port) or proc.poll() is not None, 15, what="dovecot")
        assert proc.poll() is None, proc.stderr.read()
        srv = outbound(tern, dns, 25, {"route": {"transports": {"example.test": f"lmtp:[127.0.0.1]:{port}"}}})
        original = send(srv, ["bob@example.test"])
        queue_empty(srv)
        new = mail / "bob@example.test" / "Maildir" / "new"
        (path,) = wait_until(lambda: list(new.glob("*")) if new.exists() else [], 10, what="dovecot mail")
        data = path.read_bytes()
        assert data.replace(b"\r\n", b"\n").endswith(original.replace(b"\r\n", b"\n")), data[-300:]
        assert srv.mail_files("bob") == []
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_restart_with_full_queue_loses_nothing(tern, dns, mx_port):
    srv = outbound(tern, dns, mx_port)
    markers = send_many(srv, "someone@remote.test", 50)
    # The destination counts as dead after outbound.dead_after (5) refused
    # connections; from then on one message at a time probes it and the
    # others wait, untried ("waiting for outbound delivery").
    wait_until(lambda: srv.queue_list().count("deferred after") >= 5, 20, interval=0.1,
               what="5 deferred")
    listing = srv.queue_list()
    assert listing.count("<someone@remote.test>") == 50, listing
    assert srv.stop() == 0
    with Peer("127.0.0.2", mx_port) as peer:
        srv.start()
        peer.wait_for(50, 30)
        queue_empty(srv)
        got = sorted(marker_of(tx.data) for tx in peer.received())
    assert got == sorted(markers)


def test_sigkill_during_delivery_loses_nothing(tern, dns, mx_port, record_property):
    with Peer("127.0.0.2", mx_port) as peer:
        peer.data_delay = 0.2
        srv = outbound(tern, dns, mx_port)
        markers = send_many(srv, "someone@remote.test", 30)
        peer.wait_for(12, 20)
        srv.kill()
        before = len(peer.received())
        assert before < 30, "all delivered before the kill: nothing was tested"
        srv.start()
        wait_until(lambda: set(markers) <= {marker_of(t.data) for t in peer.received()}, 30,
                   interval=0.1, what="all 30 markers")
        queue_empty(srv)
        got = [marker_of(t.data) for t in peer.received()]
    duplicates = len(got) - len(set(got))
    record_property("duplicates", duplicates)
    print(f"kill -9 after {before} of 30 delivered: {duplicates} duplicate(s)")
    assert set(got) == set(markers)


def test_sigterm_is_prompt_while_a_peer_hangs(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.data_delay = 600  # never answers the end of data (until stopped)
    srv = outbound(tern, dns, mx_port)
    markers = send_many(srv, "someone@remote.test", 1)
    wait_until(lambda: peer.attempts == 1, 10, what="data sent")
    started = time.monotonic()
    code = srv.stop(timeout=20)  # SIGTERM, SIGKILL after 20 s
    waited = time.monotonic() - started
    # Tern gives attempts in flight 10 s (outbound DRAIN_GRACE), then drops them.
    # Whatever the outcome, the message is not lost.
    peer.data_delay = 0
    srv.start()
    wait_until(lambda: markers[0] in {marker_of(t.data) for t in peer.received()}, 15, what="delivery")
    assert code == 0, f"tern needed SIGKILL: still running {waited:.1f}s after SIGTERM"
    assert waited < 15, f"SIGTERM took {waited:.1f}s"


def test_smarthost_with_auth_and_required_tls(tern, dns, mx_port, peers, tmp_path):
    cert = make_cert(tmp_path, "relay.test")
    peer = Peer("127.0.0.3", mx_port, auth=("tern", "s3cret"), cert=cert).start()
    peers.append(peer)
    password = tmp_path / "relay.password"
    password.write_text("s3cret\n")
    srv = outbound(tern, dns, mx_port, {"route": {
        "relay": f"[127.0.0.3]:{mx_port}", "relay_tls": "require",
        "relay_username": "tern", "relay_password_file": str(password)}})
    original = send(srv, ["someone@remote.test"])
    (tx,) = peer.wait_for(1)
    assert tx.tls and tx.auth == "tern"
    assert_relayed(tx.data, original)
    queue_empty(srv)


def test_smarthost_requiring_tls_that_is_not_offered_defers_and_says_why(tern, dns, mx_port, peers):
    peer = Peer("127.0.0.3", mx_port).start()  # no certificate: no STARTTLS
    peers.append(peer)
    srv = outbound(tern, dns, mx_port, {"route": {
        "relay": f"[127.0.0.3]:{mx_port}", "relay_tls": "require"}})
    send(srv, ["someone@remote.test"])
    listing = wait_until(lambda: (lambda out: out if "TLS" in out else None)(srv.queue_list()), 10,
                         what="the queue saying TLS was not offered")
    assert "deferred" in listing.lower(), listing
    assert peer.received() == []
    res = srv.cli("queue", "list", "--json")
    assert res.returncode == 0, res.stderr
    rcpt = json.loads(res.stdout)["messages"][0]["recipients"][0]
    assert rcpt["wait"]["reason"] in ("tls_required", "in_flight", "due"), rcpt
    assert "TLS" in rcpt["last_reply"], rcpt


def test_fallback_relay_takes_what_no_mx_host_would(tern, dns, mx_port, peers):
    # remote.test's MX (127.0.0.2) is down; the fallback relay takes the mail.
    fallback = Peer("127.0.0.4", mx_port).start()
    peers.append(fallback)
    srv = outbound(tern, dns, mx_port, {"route": {"fallback_relay": f"[127.0.0.4]:{mx_port}"}})
    original = send(srv, ["someone@remote.test"])
    (tx,) = fallback.wait_for(1)
    assert_relayed(tx.data, original)
    queue_empty(srv)
    assert "delivery.fallback_relay" in srv.stderr()


def test_throttling_destination_slows_down_and_recovers(tern, dns, mx_port, peers):
    # The first transactions are told "rate limited": the destination's
    # window is halved (tern queue destinations shows it throttled), and
    # every message still arrives once.
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    peer.fail_transactions = (3, "451 4.7.1 Rate limited, try again later")
    srv = outbound(tern, dns, mx_port, {"outbound": {"window_initial": 4, "window_max": 8}})
    markers = send_many(srv, "someone@remote.test", 12)

    def throttled():
        res = srv.cli("queue", "destinations", "--json")
        if res.returncode != 0:
            return None
        for d in json.loads(res.stdout)["destinations"]:
            if d["destination"] == "mx:remote.test" and d["throttled"] >= 1:
                return d
        return None

    d = wait_until(throttled, 10, what="the destination marked throttled")
    assert d["window"] < 4, d
    queue_empty(srv, 30)
    got = sorted(marker_of(t.data) for t in peer.received())
    assert got == sorted(markers)


def test_hold_release_delete_while_running(tern, dns, mx_port, peers):
    # Nothing listens at remote.test's MX: the messages wait.
    srv = outbound(tern, dns, mx_port)
    send_many(srv, "someone@remote.test", 2)
    ids = wait_until(lambda: (lambda out: re.findall(r"^([0-9A-F]{16})\b", out, re.M) or None)(
        srv.queue_list()), 10, what="two queue IDs")
    assert len(ids) == 2, ids
    keep, drop = ids
    assert srv.cli("queue", "hold", keep).returncode == 0
    shown = json.loads(srv.cli("queue", "show", keep, "--json").stdout)
    assert shown["held"] is True, shown
    assert srv.cli("queue", "delete", drop).returncode == 0
    assert drop not in srv.queue_list()
    assert srv.cli("queue", "delete", drop).returncode == 1  # no such message any more
    # A hold survives a restart.
    assert srv.stop() == 0
    peer = Peer("127.0.0.2", mx_port).start()
    peers.append(peer)
    srv.start()
    assert json.loads(srv.cli("queue", "show", keep, "--json").stdout)["held"] is True
    assert srv.cli("queue", "flush").returncode == 0
    assert peer.received() == []
    assert srv.cli("queue", "release", keep).returncode == 0
    assert srv.cli("queue", "flush", keep).returncode == 0
    (tx,) = peer.wait_for(1, 20)
    queue_empty(srv)
    assert len(peer.received()) == 1  # the deleted one never went


def test_mail_from_a_trusted_client_is_dkim_signed_and_verifies_at_the_sink(tern, dns, mx_port, tmp_path):
    """Keys from `tern dkim generate` are found without configuration; mail a
    trusted client sends From: our domain leaves signed, and Debian's dkimpy
    verifies what smtp-sink received, the public keys served by a DNS server."""
    from test_dkim import DEBIAN_PYTHON, dkimpy_available, generate, test_dns_zone, verify_with_dns
    dkimpy_available()
    srv = outbound(tern, dns, mx_port, start=False)
    zone = generate(srv)
    srv.start()
    assert "event=\"dkim.key\"" in srv.stderr()
    sink = Sink(tmp_path, "127.0.0.2", mx_port)
    try:
        send(srv, ["someone@remote.test"])
        queue_empty(srv)
        (dump,) = wait_until(sink.dumps, 10, what="smtp-sink dump")
    finally:
        sink.stop()
    received = dump.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert received.count(b"DKIM-Signature:") == 2, received[:2000]
    (tmp_path / "dkim-dns").mkdir()
    with DnsServer(tmp_path / "dkim-dns", test_dns_zone(zone)) as keys:
        results = verify_with_dns(DEBIAN_PYTHON, tmp_path, keys.addr, received)
    assert [(r["a"], r["ok"]) for r in results] == [("rsa-sha256", True), ("ed25519-sha256", True)], results


def test_mail_from_strangers_is_not_signed(tern, dns, mx_port, tmp_path):
    """Only our own users' mail is signed: a stranger sending to a local user
    with From: our domain gets no signature of ours on it."""
    from test_dkim import generate
    srv = outbound(tern, dns, mx_port, {"relay": {"trusted_networks": []}}, start=False)
    generate(srv)
    srv.start()
    send(srv, ["bob@example.test"])
    (mail,) = srv.wait_for_mail("bob")
    assert b"DKIM-Signature:" not in mail
