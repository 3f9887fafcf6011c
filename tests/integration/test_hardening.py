"""Hostile input through a real socket: NUL in content, chunks over the size
limit, junk command floods, first lines that are not SMTP, forbidden octets
in commands, and forged Authentication-Results fields.

Each test checks the exact reply (code + RFC 3463 enhanced code), whether the
session goes on or is closed (and how fast), and what reaches the mailbox.
"""

import subprocess
import time

import pytest

from ternlib import HOSTNAME, TERN_BIN, header_values, queued_id

SMUGGLED = b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n"


def open_transaction(c, rcpt="alice@example.test"):
    c.ehlo()
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250


def send_sentinel(c, rcpt="alice@example.test", text=b"sentinel"):
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert c.cmd("DATA").code == 354
    return queued_id(c.cmd(b"Subject: sentinel\r\n\r\n" + text + b"\r\n."))


def only_the_sentinel(srv, user="alice"):
    mails = srv.wait_for_mail(user, 1)
    assert len(mails) == 1 and b"sentinel" in mails[0], mails
    assert all(b"\0" not in m for m in mails)


# A downstream server that drops NULs would see an end of data in each.
NUL_VARIANTS = {
    "nul_before_dot": b"\r\n\0.\r\n",
    "nul_after_dot": b"\r\n.\0\r\n",
    "nul_in_line": b"\r\nli\0ne\r\n",
}


@pytest.mark.parametrize("sep", list(NUL_VARIANTS.values()), ids=list(NUL_VARIANTS))
def test_nul_in_data_is_refused_at_the_real_end(tern, sep):
    srv = tern()
    with srv.connect() as c:
        open_transaction(c)
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: nul\r\n\r\nbefore" + sep + SMUGGLED + b"\r\n.\r\n")
        c.expect(550, "5.6.0")
        # Exactly one reply: the smuggled commands were message text.
        assert c.cmd("RCPT TO:<bob@example.test>").code == 503
        assert c.no_pending_reply()
        send_sentinel(c)
    only_the_sentinel(srv)
    assert srv.mails("bob") == []


def test_nul_in_bdat_is_refused(tern):
    srv = tern()
    with srv.connect() as c:
        open_transaction(c)
        chunk = b"Subject: nul\r\n\r\nbody\0\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        c.expect(550, "5.6.0")
        send_sentinel(c)
    only_the_sentinel(srv)


def test_nul_strip_delivers_the_message_without_them(tern):
    srv = tern({"limits": {"nul": "strip"}})
    with srv.connect() as c:
        open_transaction(c)
        assert c.cmd("DATA").code == 354
        queued_id(c.cmd(b"Subject: n\0ul\r\n\r\nbo\0dy\r\n\0.\r\nend\r\n."))
    mails = srv.wait_for_mail("alice", 1)
    assert b"\0" not in mails[0]
    assert mails[0].endswith(b"Subject: nul\r\n\r\nbody\r\n.\r\nend\r\n") or \
        mails[0].endswith(b"Subject: nul\n\nbody\n.\nend\n"), mails[0]


def test_nul_option_is_checked(tern):
    srv = tern({"limits": {"nul": "allow"}}, start=False)
    r = subprocess.run([str(TERN_BIN), "check-config", str(srv.config_path)],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert b"limits.nul" in r.stdout + r.stderr


def test_a_bdat_chunk_over_the_size_limit_is_refused_at_once(tern):
    srv = tern({"limits": {"max_message_size": 10000}})
    with srv.connect() as c:
        open_transaction(c)
        start = time.monotonic()
        c.send(b"BDAT 4294967296 LAST\r\n")
        c.expect(552, "5.3.4", timeout=5)
        assert c.is_closed()
        assert time.monotonic() - start < 5
    # A client that sends its chunk without waiting still reads the answer:
    # the server drains what follows its reply instead of resetting.
    with srv.connect() as c:
        open_transaction(c)
        c.send(b"BDAT 4294967296 LAST\r\n" + b"x" * (256 * 1024))
        c.expect(552, "5.3.4", timeout=5)
        assert c.is_closed()
    # The limit itself is fine, and the server goes on.
    with srv.connect() as c:
        open_transaction(c)
        chunk = b"Subject: sentinel\r\n\r\n" + (b"x" * 98 + b"\r\n") * 90
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        queued_id(c.expect(250))
    only_the_sentinel(srv)


def test_junk_commands_are_bounded(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        # The default is Postfix's: 100 commands that make no progress.
        mix = [b"NOOP", b"RSET", b"VRFY alice", b"HELP"]
        c.send(b"".join(mix[i % 4] + b"\r\n" for i in range(100)))
        for _ in range(100):
            assert c.reply().code in (250, 252, 214)
        c.send(b"NOOP\r\n")
        c.expect(421, "4.7.0")
        assert c.is_closed()


def test_junk_count_starts_again_after_a_delivered_message(tern):
    srv = tern({"limits": {"max_junk_commands": 10, "max_errors": 100}})
    with srv.connect() as c:
        c.ehlo()
        for _ in range(3):
            for _ in range(8):
                assert c.cmd("NOOP").code == 250
            send_sentinel(c)
        for _ in range(10):
            assert c.cmd("XYZZY").code == 500
        c.send(b"NOOP\r\n")
        c.expect(421, "4.7.0")
        assert c.is_closed()


CLIENT_HELLO = bytes.fromhex(
    "16030100c8010000c40303" + "ab" * 32 + "00" + "0004130113020100" + "0097" + "00" * 151
)


@pytest.mark.parametrize("first", [CLIENT_HELLO, b"\x80\x2e\x01\x00\x02\x00\x15", b"\x00\x01\x02\x03\xff"],
                         ids=["tls_client_hello", "sslv2_hello", "binary"])
def test_a_binary_first_line_gets_one_reply_and_a_quick_close(tern, first):
    srv = tern()
    with srv.connect() as c:
        start = time.monotonic()
        c.send(first)
        r = c.reply(timeout=5)
        assert 500 <= r.code < 600, r
        assert c.is_closed(timeout=5)
        assert time.monotonic() - start < 5
    with srv.connect() as c:
        c.ehlo()
        send_sentinel(c)
    only_the_sentinel(srv)


def test_an_http_request_gets_one_reply_and_a_close(tern):
    srv = tern()
    with srv.connect() as c:
        c.send(b"POST / HTTP/1.1\r\nHost: mx\r\nContent-Length: 20\r\n\r\nMAIL FROM:<a@b>\r\n\r\n")
        r = c.reply(timeout=5)
        assert 500 <= r.code < 600, r
        assert c.is_closed(timeout=5)


@pytest.mark.parametrize("line, code, enhanced", [
    (b"NOOP\0", 501, "5.5.2"),
    (b"NO\rOP", 501, "5.5.2"),
    (b"MAIL FROM:<se\0nder@remote.test>", 501, "5.1.7"),
    (b"MAIL FROM:<sender@remote.test\r>", 501, "5.1.7"),
    (b"MAIL FROM:<sender@remote.test>>", 501, "5.1.7"),
])
def test_forbidden_octets_in_a_command_get_501(tern, line, code, enhanced):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(line + b"\r\n")
        c.expect(code, enhanced)
        assert c.cmd("NOOP").code == 250


@pytest.mark.parametrize("line, enhanced", [
    (b"RCPT TO:<al\0ice@example.test>", "5.1.3"),
    (b"RCPT TO:<alice@example.test\r>", "5.1.3"),
    (b"RCPT TO:<alice@example.test>>", "5.1.3"),
    (b"RCPT TO:<alice@example.test> NOTIFY=\0NEVER", "5.5.4"),
])
def test_forbidden_octets_in_a_recipient_get_501(tern, line, enhanced):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        c.send(line + b"\r\n")
        c.expect(501, enhanced)
        # The transaction goes on.
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250


def test_forged_authentication_results_are_removed(tern):
    srv = tern()
    with srv.connect() as c:
        open_transaction(c)
        assert c.cmd("DATA").code == 354
        queued_id(c.cmd(
            b"Authentication-Results: " + HOSTNAME.encode() + b"; spf=pass\r\n\tdkim=pass header.d=bank.test\r\n"
            b"Authentication-Results: other.test; spf=fail\r\n"
            b"Authentication-Results: (forged) " + HOSTNAME.upper().encode() + b" 1; dmarc=pass\r\n"
            b"Subject: forged\r\n"
            b"\r\n"
            b"Authentication-Results: " + HOSTNAME.encode() + b"; in the body stays\r\n."
        ))
    mail = srv.wait_for_mail("alice", 1)[0]
    results = header_values(mail, "Authentication-Results")
    assert results == ["other.test; spf=fail"], results
    assert header_values(mail, "Subject") == ["forged"]
    assert b"in the body stays" in mail
    assert b"dkim=pass" not in mail


def test_a_bdat_with_a_tab_never_runs_its_chunk_as_commands(tern):
    srv = tern()
    with srv.connect() as c:
        open_transaction(c)
        chunk = SMUGGLED + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
        c.send(b"BDAT\t%d LAST\r\n" % len(chunk) + chunk)
        c.expect(501, "5.5.4")
        assert c.is_closed()
    with srv.connect() as c:
        c.ehlo()
        send_sentinel(c)
    only_the_sentinel(srv)
    assert srv.mails("bob") == []


def test_empty_chunks_and_recipients_past_the_limit_are_bounded(tern):
    srv = tern({"limits": {"max_junk_commands": 10, "max_recipients": 1}})
    for command, code in [(b"BDAT 0", 250), (b"RCPT TO:<bob@example.test>", 452)]:
        with srv.connect() as c:
            open_transaction(c)
            c.send((command + b"\r\n") * 11)
            for _ in range(10):
                assert c.reply().code == code
            c.expect(421, "4.7.0")
            assert c.is_closed()
