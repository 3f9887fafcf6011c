"""Messages are never lost to long lines, and Delivered-To names the address
that was delivered to.

Covers: swaks sending to 150 recipients (its To: line is one line of 4 KB)
accepted with no line limit configured (the default), each copy in the
Maildir byte for byte what swaks sent after our trace fields; a 5,000-octet
body line and a 2,000-octet header line without white space delivered locally
byte for byte; a configured `limits.max_text_line` answered 554 5.6.0 with
the session going on; a 40 MiB line held to the size limit (552 5.3.4, the
server's peak memory does not grow with it); relaying to the scripted peer (smtpeer) folds: no line
over 998 octets, the long header field unfolds back to the original, and the
body line comes back when the CRLF SP breaks are joined; LMTP (into a store)
gets the long lines whole; a message Tern DKIM-signs with long lines still
verifies (Debian's dkimpy) where the peer received it; Delivered-To with a
+tag, the client's case, aliases to an address and to a bare user name.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import uuid

import pytest

from smtpeer import Peer
from ternlib import ends_with_original, header_values, queued_id, split_mail, wait_until
from testdns import DnsServer
# peers is a fixture; outbound starts a Tern that relays by MX.
from test_outbound import free_port, outbound, peers, queue_empty  # noqa: F401

ZONE = """
remote.test        MX 10 mx1.remote.test
mx1.remote.test    A 127.0.0.2
"""

TRACE_FIELDS = {b"return-path", b"delivered-to", b"received"}


@pytest.fixture
def dns(tmp_path):
    with DnsServer(tmp_path, ZONE) as server:
        yield server


def send(srv, sender: str, rcpts: list[str], msg: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as s:
        assert s.sendmail(sender, rcpts, msg) == {}


def added_fields(mail: bytes, original: bytes) -> list[bytes]:
    """The names of the fields in front of `original` in a delivered copy,
    which must end with `original` byte for byte (CRLF, or LF in the file)."""
    assert ends_with_original(mail, original), mail[-300:]
    tail = original if mail.endswith(original) else original.replace(b"\r\n", b"\n")
    prefix = mail[: len(mail) - len(tail)].replace(b"\r\n", b"\n")
    return [ln.split(b":", 1)[0].lower() for ln in prefix.split(b"\n") if ln and ln[:1] not in b" \t"]


def unfold(data: bytes) -> bytes:
    """RFC 5322 §2.2.3: a CRLF followed by white space is removed."""
    return re.sub(rb"\r\n(?=[ \t])", b"", data)


def long_message(sender: str, marker: str) -> tuple[bytes, bytes, bytes, bytes]:
    """(message, its 4 KB To: line, its 2,000-octet X-Token: line, its
    5,000-octet body line), lines without their CRLF."""
    to = b"To: " + b", ".join(f"<list-member-{i:03d}@remote.test>".encode() for i in range(150))
    token = b"X-Token: " + b"t" * 1991
    body_line = b"b" * 4000 + b" and words " + b"w" * 989
    msg = (f"From: <{sender}>\r\n".encode() + to + b"\r\n" + token + b"\r\n"
           + f"Subject: long lines {marker}\r\nMessage-ID: <{marker}@example.test>\r\n".encode()
           + b"\r\nfirst line\r\n" + body_line + b"\r\n.dot line\r\nlast line\r\n")
    return msg, to, token, body_line


def test_swaks_150_recipients_long_to_line_delivered_byte_identical(tern, tmp_path):
    srv = tern({"limits": {"max_recipients": 200}})
    rcpts = [f"{user}+list-{i:03d}@example.test" for i in range(50) for user in ("alice", "bob", "carol")]
    args = ["--from", "sender@remote.test", "--to", ",".join(rcpts),
            # Fixed, so that --dump-mail shows exactly what is sent.
            "--header", "Date: Sun, 06 Dec 2026 07:00:00 +0000",
            "--header", "Message-Id: <swaks-long-to@remote.test>",
            "--header", "Subject: 150 recipients on one To: line"]
    dump = subprocess.run(["swaks", "--dump-mail", *args], capture_output=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    original = dump.stdout
    # --dump-mail prints the message with its last LF chomped.
    if original.endswith(b"\r"):
        original += b"\n"
    to_line = next(ln for ln in original.split(b"\r\n") if ln.startswith(b"To: "))
    assert len(to_line) > 3500, len(to_line)
    run = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--helo", "client.test", *args],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]
    assert b"250 2.0.0 Ok: queued as" in run.stdout, run.stdout[-2000:]
    for user in ("alice", "bob", "carol"):
        (mail,) = srv.wait_for_mail(user, 1)
        assert sorted(added_fields(mail, original)) == sorted(TRACE_FIELDS), mail[:500]
        # The first recipient that reached the mailbox, tag and all.
        assert header_values(mail, "Delivered-To") == [f"{user}+list-000@example.test"]


def test_long_body_and_header_lines_delivered_locally_byte_identical(tern):
    srv = tern()
    msg, to, token, body_line = long_message("sender@remote.test", uuid.uuid4().hex)
    send(srv, "sender@remote.test", ["bob@example.test"], msg)
    (mail,) = srv.wait_for_mail("bob", 1)
    assert sorted(added_fields(mail, msg)) == sorted(TRACE_FIELDS)
    for line in (to, token, body_line):
        assert line in mail.replace(b"\r\n", b"\n").split(b"\n")


def test_a_configured_line_limit_refuses_554_and_the_session_goes_on(tern):
    srv = tern({"limits": {"max_text_line": 1000}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: too long\r\n\r\n" + b"y" * 1001 + b"\r\n.\r\n")
        c.expect(554, "5.6.0")
        assert c.cmd("RSET").code == 250
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        queued_id(c.cmd(b"Subject: fits\r\n\r\n" + b"z" * 998 + b"\r\n."))
    (mail,) = srv.wait_for_mail("alice", 1)
    assert b"Subject: fits" in mail and b"z" * 998 in mail


def peak_rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_one_huge_line_is_bounded_by_the_message_size_limit(tern):
    # No line limit, so only the size limit stands between a 40 MiB line and
    # memory: the server's peak resident size must not grow with the line.
    srv = tern({"limits": {"max_message_size": 1 << 20}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        before = peak_rss_kib(srv.proc.pid)
        c.send(b"Subject: huge\r\n\r\n")
        chunk = b"x" * (1 << 20)
        for _ in range(40):
            c.send(chunk)
        c.send(b"\r\n.\r\n")
        c.expect(552, "5.3.4", timeout=60)
        grown = peak_rss_kib(srv.proc.pid) - before
        assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB for a 40 MiB line"
        assert c.cmd("RSET").code == 250


def test_relay_folds_long_lines_to_998(tern, dns, peers):
    port = free_port(["127.0.0.2"])
    peer = Peer("127.0.0.2", port).start()
    peers.append(peer)
    srv = outbound(tern, dns, port)
    msg, to, token, body_line = long_message("sender@remote.test", uuid.uuid4().hex)
    send(srv, "sender@remote.test", ["someone@remote.test"], msg)
    (tx,) = peer.wait_for(1, 30)
    queue_empty(srv)
    lines = tx.data.split(b"\r\n")
    assert lines[-1] == b"" and max(len(ln) for ln in lines) <= 998, max(len(ln) for ln in lines)
    head, body = tx.data.split(b"\r\n\r\n", 1)
    fields = unfold(head).split(b"\r\n")
    # Folded at white space: unfolding gives the To: field back exactly.
    assert to in fields, [f[:60] for f in fields]
    # No white space to fold at: broken with CRLF SP, still one field whose
    # value only gained those spaces.
    (tok,) = [f for f in fields if f.startswith(b"X-Token:")]
    assert tok.replace(b" ", b"") == token.replace(b" ", b"")
    # The body line broken as Postfix does (CRLF SP): joined back, it is whole.
    assert body.replace(b"\r\n ", b"") == msg.split(b"\r\n\r\n", 1)[1]
    assert b"\r\n.dot line\r\n" in body


def test_lmtp_into_a_store_keeps_long_lines_whole(tern, dns, peers):
    peer = Peer("127.0.0.1", 0, lmtp=True).start()
    peers.append(peer)
    srv = outbound(tern, dns, 25, {"route": {"transports": {"lmtp.test": f"lmtp:[127.0.0.1]:{peer.port}"}}})
    msg, _, _, _ = long_message("sender@remote.test", uuid.uuid4().hex)
    send(srv, "sender@remote.test", ["a@lmtp.test"], msg)
    (tx,) = peer.wait_for(1, 30)
    assert tx.delivered == ["a@lmtp.test"]
    assert tx.data.endswith(msg)


def test_signed_message_with_long_lines_verifies_where_it_was_relayed(tern, dns, peers, tmp_path):
    from test_dkim import DEBIAN_PYTHON, dkimpy_available, generate, test_dns_zone, verify_with_dns
    dkimpy_available()
    port = free_port(["127.0.0.2"])
    peer = Peer("127.0.0.2", port).start()
    peers.append(peer)
    srv = outbound(tern, dns, port, start=False)
    zone = generate(srv)
    srv.start()
    msg, to, _, _ = long_message("alice@example.test", uuid.uuid4().hex)
    send(srv, "alice@example.test", ["someone@remote.test", "bob@example.test"], msg)
    (tx,) = peer.wait_for(1, 30)
    queue_empty(srv)
    received = tx.data
    assert received.count(b"DKIM-Signature:") == 2, received[:3000]
    assert max(len(ln) for ln in received.split(b"\r\n")) <= 998
    assert to in unfold(received).split(b"\r\n")
    (tmp_path / "dkim-dns").mkdir()
    with DnsServer(tmp_path / "dkim-dns", test_dns_zone(zone)) as keys:
        results = verify_with_dns(DEBIAN_PYTHON, tmp_path, keys.addr, received)
        # The local copy is the same signed, folded message.
        (local,) = srv.wait_for_mail("bob", 1)
        crlf = local.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        local_results = verify_with_dns(DEBIAN_PYTHON, tmp_path, keys.addr, crlf)
    assert [(r["a"], r["ok"]) for r in results] == [("rsa-sha256", True), ("ed25519-sha256", True)], results
    assert [(r["a"], r["ok"]) for r in local_results] == [("rsa-sha256", True), ("ed25519-sha256", True)]


# ------------------------------------------------------------ Delivered-To


@pytest.mark.parametrize("rcpt,user,delivered_to", [
    # The address as given: its +tag and the case of its local part.
    ("alice+lists@example.test", "alice", "alice+lists@example.test"),
    ("Alice+Lists@EXAMPLE.test", "alice", "Alice+Lists@example.test"),
    ("Bob@example.test", "bob", "Bob@example.test"),
    # An alias: the address it expanded to.
    ("info@example.test", "carol", "carol@example.test"),
    # An alias to a bare user name: the name at the alias's domain (Postfix
    # appends $myorigin), not the user's own first address.
    ("sales@example.test", "bob", "bob@example.test"),
    ("sales@localhost", "bob", "bob@localhost"),
    ("Sales+X@localhost", "bob", "bob@localhost"),
])
def test_delivered_to_names_the_address_delivered_to(tern, rcpt, user, delivered_to):
    srv = tern({"aliases": {"info@example.test": ["carol@example.test"],
                            "sales@example.test": ["bob"], "sales@localhost": ["bob"]}})
    msg = f"From: <sender@remote.test>\r\nSubject: {rcpt}\r\n\r\nhi\r\n".encode()
    send(srv, "sender@remote.test", [rcpt], msg)
    (mail,) = srv.wait_for_mail(user, 1)
    assert header_values(mail, "Delivered-To") == [delivered_to]
    assert added_fields(mail, msg).count(b"delivered-to") == 1
