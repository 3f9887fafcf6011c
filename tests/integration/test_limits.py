"""Every configured limit, exercised through a real socket.

Each test checks the exact reply (code + RFC 3463 enhanced code), whether the
session survives or is closed, and that nothing over the limit is delivered.
"""

import resource
import time
from pathlib import Path

from ternlib import Raw, queued_id, wait_until


def start_data(c, rcpt="alice@example.test"):
    c.ehlo()
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert c.cmd("DATA").code == 354


def prove_nothing_delivered(srv, user="alice"):
    """Deliver a sentinel to `user` and check it is the only file there."""
    with srv.connect() as c:
        start_data(c, f"{user}@example.test")
        queued_id(c.cmd(b"Subject: sentinel\r\n\r\nsentinel\r\n."))
    mails = srv.wait_for_mail(user, 1)
    assert len(mails) == 1 and b"sentinel" in mails[0], mails


def test_command_line_too_long_one_500_then_usable(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(b"NOOP " + b"x" * 10000 + b"\r\n")
        c.expect(500, "5.5.2")
        # Exactly one reply for the whole long line: the next reply is NOOP's.
        r = c.cmd("NOOP")
        assert r.code == 250, r
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250


def test_command_line_limit_is_configurable(tern):
    srv = tern({"limits": {"max_command_line": 512}})
    with srv.connect() as c:
        c.ehlo()
        # NOOP takes an optional string (RFC 5321 §4.1.1.9): a cheap long line.
        assert c.cmd("NOOP " + "a" * 400).code == 250
        c.send(b"NOOP " + b"a" * 600 + b"\r\n")
        c.expect(500, "5.5.2")
        assert c.cmd("NOOP").code == 250


def test_text_line_too_long(tern):
    # Off by default (test_long_lines.py); an administrator may set one.
    srv = tern({"limits": {"max_text_line": 1000}})
    with srv.connect() as c:
        start_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\nshort\r\n.\r\n")
        # A content error, not a command syntax error (500 5.5.2 would say so).
        c.expect(554, "5.6.0")
        assert c.cmd("RSET").code == 250
    prove_nothing_delivered(srv)


def test_text_line_exactly_1000_is_fine(tern):
    srv = tern({"limits": {"max_text_line": 1000}})
    with srv.connect() as c:
        start_data(c)
        # RFC 5321 §4.5.3.1.6: 1000 octets including the CRLF.
        queued_id(c.cmd(b"Subject: edge\r\n\r\n" + b"z" * 998 + b"\r\n."))
    (mail,) = srv.wait_for_mail("alice", 1)
    assert b"z" * 998 in mail


def test_size_declared_at_mail_552(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<sender@remote.test> SIZE=26214401")
        assert r.code == 552 and r.enhanced == "5.3.4", r
        assert c.cmd("MAIL FROM:<sender@remote.test> SIZE=1000").code == 250


def test_size_exceeded_during_data_552(tern):
    srv = tern({"limits": {"max_message_size": 10000}})
    with srv.connect() as c:
        kw = c.ehlo()
        assert "SIZE 10000" in kw.lines, kw
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: big\r\n\r\n" + (b"b" * 98 + b"\r\n") * 300 + b".\r\n")
        c.expect(552, "5.3.4")
        assert c.cmd("RSET").code == 250
    prove_nothing_delivered(srv)
    # The refused message is logged under the ID its Received: header had.
    wait_until(lambda: "message.refused" in srv.stderr(), 10, what="message.refused logged")
    line = next(l for l in srv.stderr().splitlines() if "message.refused" in l)
    assert "queue_id=" in line and 'reason="too_large"' in line, line


def test_size_exceeded_in_bdat_552(tern):
    srv = tern({"limits": {"max_message_size": 10000}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        chunk = (b"c" * 78 + b"\r\n") * 100  # 8000 bytes in legal lines
        c.send(b"BDAT 8000\r\n" + chunk)
        c.expect(250)
        c.send(b"BDAT 8000 LAST\r\n" + chunk)
        c.expect(552, "5.3.4")
        assert c.cmd("NOOP").code == 250
    prove_nothing_delivered(srv)


def test_too_many_recipients_452(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        # 100 distinct recipients that all map to alice (subaddresses).
        c.send(b"".join(f"RCPT TO:<alice+{i}@example.test>\r\n".encode() for i in range(100)))
        for i in range(100):
            r = c.reply()
            assert r.code == 250, (i, r)
        r = c.cmd("RCPT TO:<alice+100@example.test>")
        assert r.code == 452 and r.enhanced == "4.5.3", r
        assert c.cmd("DATA").code == 354
        queued_id(c.cmd(b"Subject: many\r\n\r\nhundred\r\n."))
    srv.wait_for_mail("alice", 1)
    prove_alone = srv.mails("alice")
    assert len(prove_alone) == 1, "100 addresses of one mailbox: one file"


def test_max_errors_421_and_close(tern):
    srv = tern({"limits": {"max_errors": 5}})
    with srv.connect() as c:
        c.ehlo()
        errors = 0
        for _ in range(10):
            r = c.cmd("FROBNICATE")
            if r.code == 421:
                break
            assert r.code == 500, r
            errors += 1
        assert r.code == 421 and r.enhanced == "4.7.0", r
        assert errors in (4, 5), errors  # the 5th error itself or the one after it
        assert c.is_closed()


def test_errors_are_forgiven_after_a_message_but_refused_recipients_are_not(tern):
    # A sender with stale addresses in every message of a long session keeps
    # going (the error count restarts at each accepted message); a prober
    # slipping a message to postmaster between guesses is cut off.
    srv = tern({"limits": {"max_errors": 3, "max_rejected_recipients": 5}})
    with srv.connect() as c:
        c.ehlo()
        for round_no in range(2):
            assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
            for i in range(2):
                r = c.cmd(f"RCPT TO:<gone{round_no}{i}@example.test>")
                assert r.code == 550 and r.enhanced == "5.1.1", r
            assert c.cmd("RCPT TO:<postmaster>").code == 250
            assert c.cmd("DATA").code == 354
            queued_id(c.cmd(b"Subject: round\r\n\r\nbody\r\n."))
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        r = c.cmd("RCPT TO:<gone-again@example.test>")
        assert r.code == 550, r
        r = c.reply()
        assert r.code == 421 and r.enhanced == "4.7.0" and "rejected recipients" in r.text, r
        assert c.is_closed()


def test_command_timeout_421_and_close(tern):
    srv = tern({"limits": {"command_timeout": "1s"}})
    with srv.connect() as c:
        c.ehlo()
        t0 = time.monotonic()
        r = c.reply(timeout=10)
        elapsed = time.monotonic() - t0
        assert r.code == 421 and r.enhanced == "4.4.2", r
        assert 0.8 <= elapsed <= 5, elapsed
        assert c.is_closed()


def test_data_timeout_421(tern):
    srv = tern({"limits": {"data_timeout": "1s"}})
    with srv.connect() as c:
        start_data(c)
        c.send(b"Subject: stalled\r\n\r\npartial")
        r = c.reply(timeout=10)
        assert r.code == 421 and r.enhanced == "4.4.2", r
        assert c.is_closed()
    prove_nothing_delivered(srv)


def test_max_connections_per_ip_421(tern):
    srv = tern({"limits": {"max_connections_per_ip": 2}})
    a, b = srv.connect(), srv.connect()
    try:
        with Raw(srv.port) as third:
            r = third.reply()
            assert r.code == 421 and r.enhanced == "4.7.0", r
            assert third.is_closed()
        a.close()

        # The slot frees once the server notices the close: poll for it.
        def fourth_gets_220():
            with Raw(srv.port) as c:
                return c.reply().code == 220
        wait_until(fourth_gets_220, 10, what="a freed connection slot")
        assert b.cmd("NOOP").code == 250
    finally:
        a.close()
        b.close()


def test_max_connections_421(tern):
    srv = tern({"limits": {"max_connections": 2}})
    a, b = srv.connect(), srv.connect()
    try:
        with Raw(srv.port) as third:
            r = third.reply()
            assert r.code == 421 and r.enhanced == "4.7.0", r
            assert third.is_closed()
    finally:
        a.close()
        b.close()


def test_mail_loop_554(tern):
    srv = tern()
    hops = b"".join(f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n".encode()
                    for i in range(101))
    with srv.connect() as c:
        start_data(c)
        c.send(hops + b"Subject: loop\r\n\r\nround and round\r\n.\r\n")
        c.expect(554, "5.4.6")
        assert c.cmd("RSET").code == 250
    prove_nothing_delivered(srv)


def test_some_received_headers_are_fine(tern):
    srv = tern()
    hops = b"".join(f"Received: from hop{i}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n".encode() for i in range(10))
    with srv.connect() as c:
        start_data(c)
        queued_id(c.cmd(hops + b"Subject: ok\r\n\r\nfine\r\n."))
    (mail,) = srv.wait_for_mail("alice", 1)
    assert mail.count(b"Received:") == 11


def test_early_talker_554_and_close(tern):
    srv = tern({"limits": {"greeting_delay": "500ms"}})
    with Raw(srv.port) as c:
        c.send(b"EHLO impatient.test\r\n")
        r = c.reply(timeout=10)
        assert r.code == 554, r
        assert c.is_closed()
    # A patient client gets the greeting after the delay.
    t0 = time.monotonic()
    with Raw(srv.port) as c:
        c.expect(220, timeout=10)
        assert time.monotonic() - t0 >= 0.4
        assert c.cmd("EHLO patient.test").code == 250


def test_min_free_space_452(tern):
    srv = tern({"limits": {"min_free_space": 2 ** 62}})
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd("MAIL FROM:<sender@remote.test>")
        assert r.code == 452 and r.enhanced == "4.3.1", r



def trickle(c, byte: bytes, budget: float):
    """Sends one byte every 0.2 s (the pause doubles as the wait for a
    reply) until the server answers or `budget` seconds pass; returns the
    first reply line and when it came."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget:
        try:
            c.send(byte)
        except OSError:
            break
        try:
            line = c.readline(timeout=0.2)
        except TimeoutError:
            continue
        if line is not None:
            return line, time.monotonic() - t0
    return c.readline(timeout=1), time.monotonic() - t0


def test_trickled_command_line_still_times_out(tern):
    """A client that sends one byte at a time (slowloris) gets no more time
    than an idle one: the command timeout runs from our last reply."""
    srv = tern({"limits": {"command_timeout": "1s"}})
    with srv.connect() as c:
        c.ehlo()
        line, elapsed = trickle(c, b"N", budget=6)
        assert line is not None and line.startswith(b"421 4.4.2"), line
        assert elapsed < 4, elapsed
        assert c.is_closed()


def test_trickled_message_data_times_out(tern):
    srv = tern({"limits": {"data_timeout": "1s"}})
    with srv.connect() as c:
        start_data(c)
        line, elapsed = trickle(c, b"x", budget=6)
        assert line is not None and line.startswith(b"421 4.4.2"), line
        assert elapsed < 4, elapsed
        assert c.is_closed()
    prove_nothing_delivered(srv)


def test_slow_but_steady_message_data_is_not_cut(tern):
    """Each 64 KiB of message data earns a new data_timeout: a large message
    from a slow client arrives even when the whole takes longer than one
    timeout."""
    srv = tern({"limits": {"data_timeout": "1s"}})
    block = (("y" * 78 + "\r\n") * 900).encode()  # ~70 KiB
    with srv.connect() as c:
        start_data(c)
        t0 = time.monotonic()
        c.send(b"Subject: slow\r\n\r\n")
        for _ in range(3):
            c.send(block)
            time.sleep(0.7)  # pacing the slow client, not waiting for a result
        c.send(b".\r\n")
        r = c.reply(timeout=10)
        assert r.code == 250, r
        assert time.monotonic() - t0 > 1.5  # longer than one data_timeout in total
    srv.wait_for_mail("alice", 1)


def test_the_open_file_limit_is_raised_to_the_hard_limit(tern):
    # Each session is a descriptor: a soft limit of 1024 (the usual default)
    # would cap a server configured for more connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        srv = tern({"limits": {"max_connections": 1_000_000}})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    in_force = line.split()[3]
    want = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if want != "unlimited":
        assert in_force == want, line
    # Still short of max_connections (plus 256 of headroom): said at start-up.
    if hard != resource.RLIM_INFINITY and hard < 1_000_256:
        wait_until(lambda: "server.fd_limit" in srv.stderr(), 5, what="fd-limit warning")
