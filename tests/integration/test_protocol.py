"""Protocol features over raw sockets and smtplib: PIPELINING (RFC 2920),
CHUNKING/BDAT (RFC 3030), SMTPUTF8 (RFC 6531), 8BITMIME (RFC 6152), DSN
parameters (RFC 3461), and the basic error replies of RFC 5321."""

import smtplib
import uuid

import pytest

from ternlib import ehlo_keywords, ends_with_original, header_values, queued_id, split_mail

EXPECTED_EXTENSIONS = {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"}


def test_greeting_and_ehlo_extensions(tern):
    srv = tern()
    with srv.connect(greet=False) as c:
        g = c.expect(220)
        assert g.lines[0].startswith("mx.test.example"), g
        r = c.ehlo()
        assert r.lines[0].startswith("mx.test.example"), r
        kw = ehlo_keywords(r)
        assert EXPECTED_EXTENSIONS <= set(kw), kw
        assert kw["SIZE"] == "26214400", kw
        q = c.cmd("QUIT")
        assert q.code == 221 and q.enhanced == "2.0.0", q
        assert c.is_closed()


def test_helo_then_mail(tern):
    srv = tern()
    with srv.connect() as c:
        r = c.cmd("HELO client.test")
        assert r.code == 250 and r.lines[0].startswith("mx.test.example"), r
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250


def test_pipelining_one_write_replies_in_order(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(
            b"MAIL FROM:<sender@remote.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\n"
            b"RCPT TO:<bob@example.test>\r\n"
            b"DATA\r\n"
        )
        c.expect(250, "2.1.0")
        c.expect(250, "2.1.5")
        c.expect(550, "5.1.1")
        c.expect(250, "2.1.5")
        c.expect(354)
        body = b"Subject: pipelined\r\n\r\npipelined body\r\n"
        # RFC 2920: after the data, the next group may follow in the same write.
        c.send(body + b".\r\nRSET\r\nNOOP\r\n")
        queued_id(c.expect(250, "2.0.0"))
        c.expect(250)  # RSET
        c.expect(250)  # NOOP
    for user in ("alice", "bob"):
        (mail,) = srv.wait_for_mail(user, 1)
        assert ends_with_original(mail, body)


def test_pipelining_two_transactions_back_to_back(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        txn = (b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n")
        c.send(txn)
        c.expect(250), c.expect(250), c.expect(354)
        c.send(b"Subject: one\r\n\r\n1\r\n.\r\n" + txn)
        c.expect(250, "2.0.0")
        c.expect(250), c.expect(250), c.expect(354)
        c.send(b"Subject: two\r\n\r\n2\r\n.\r\nQUIT\r\n")
        c.expect(250, "2.0.0")
        c.expect(221)
    mails = srv.wait_for_mail("carol", 2)
    assert sorted(split_mail(m)[1] for m in mails) == [b"1\r\n", b"2\r\n"] or \
        sorted(split_mail(m)[1] for m in mails) == [b"1\n", b"2\n"]


def bdat_session(srv, chunks: list[bytes], last_empty: bool) -> tuple[bytes, str]:
    """Send `chunks` with BDAT, each chunk in the same packet as its command."""
    with srv.connect() as c:
        kw = ehlo_keywords(c.ehlo())
        assert "CHUNKING" in kw
        c.send(b"MAIL FROM:<sender@remote.test> BODY=BINARYMIME\r\nRCPT TO:<alice@example.test>\r\n"
               if "BINARYMIME" in kw else
               b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
        c.expect(250), c.expect(250)
        qid = None
        for i, chunk in enumerate(chunks):
            final = (not last_empty) and i == len(chunks) - 1
            c.send(f"BDAT {len(chunk)}{' LAST' if final else ''}\r\n".encode() + chunk)
            r = c.expect(250)
            if final:
                qid = queued_id(r)
        if last_empty:
            c.send(b"BDAT 0 LAST\r\n")
            qid = queued_id(c.expect(250, "2.0.0"))
        assert c.cmd("NOOP").code == 250
    return b"".join(chunks), qid


def test_bdat_chunks_then_bdat_0_last(tern):
    srv = tern()
    # A lone "." line and leading dots are plain data in BDAT (RFC 3030 §2):
    # no dot-stuffing, no end marker. Chunk borders split a CRLF on purpose.
    chunks = [b"Subject: bdat\r\n\r\nline one\r", b"\n.\r\n..two dots\r\n", (b"x" * 98 + b"\r\n") * 30, b"end\r\n"]
    msg, _ = bdat_session(srv, chunks, last_empty=True)
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg), mail[-200:]
    assert b"\n.\r\n..two dots" in mail or b"\n.\n..two dots" in mail


def test_bdat_last_on_data_chunk(tern):
    srv = tern()
    chunks = [b"Subject: bdat2\r\n\r\n", b"only body\r\n"]
    msg, _ = bdat_session(srv, chunks, last_empty=False)
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg)


def test_bdat_without_rcpt_is_503_and_data_is_discarded(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        # RFC 3030 §2: the chunk must still be read (and dropped) so the
        # session stays in sync; the 12 bytes below look like commands, and
        # a server that ran them would answer 221 and hang up.
        c.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n")
        r = c.reply()
        assert r.code in (503, 554), r
        assert c.cmd("NOOP").code == 250


def test_smtputf8_local_part_delivered(tern):
    srv = tern()
    msg = "From: <jörg@remote.test>\r\nTo: <jörg@example.test>\r\nSubject: grüße\r\n\r\nHallo Jörg ✓\r\n".encode()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.has_extn("smtputf8")
        refused = s.sendmail("jörg@remote.test", ["jörg@example.test"], msg,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    (mail,) = srv.wait_for_mail("jorg", 1)
    assert ends_with_original(mail, msg)
    assert header_values(mail, "Delivered-To") == ["jörg@example.test"]
    assert "jörg@remote.test" in header_values(mail, "Return-Path")[0]


@pytest.mark.parametrize("where", ["mail", "rcpt"])
def test_utf8_address_without_smtputf8_is_553_5_6_7(tern, where):
    # RFC 6531 §3.7.4.1 / RFC 3463 5.6.7: non-ASCII address without SMTPUTF8.
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        if where == "mail":
            c.send("MAIL FROM:<jörg@remote.test>\r\n")
            c.expect(553, "5.6.7")
        else:
            assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
            c.send("RCPT TO:<jörg@example.test>\r\n")
            c.expect(553, "5.6.7")
        assert c.cmd("RSET").code == 250


def test_8bitmime_body_byte_exact(tern):
    srv = tern()
    high = bytes(b for b in range(0x80, 0x100))
    msg = (b"Subject: eight bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=latin1\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + high + b"\r\n\xe9t\xe9 \xff\xfe\r\n")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.has_extn("8bitmime")
        assert s.sendmail("sender@remote.test", ["bob@example.test"], msg, mail_options=["BODY=8BITMIME"]) == {}
    (mail,) = srv.wait_for_mail("bob", 1)
    assert ends_with_original(mail, msg)


def test_dsn_parameters_accepted_and_shown_in_queue(tern):
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    envid = "QQ" + uuid.uuid4().hex[:10]
    with srv.connect() as c:
        c.ehlo()
        c.send(f"MAIL FROM:<sender@remote.test> RET=HDRS ENVID={envid}\r\n")
        c.expect(250, "2.1.0")
        r = c.cmd("RCPT TO:<dave@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;dave@remote.test")
        assert r.code == 250, r
        r = c.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER")
        assert r.code == 250, r
        assert c.cmd("DATA").code == 354
        qid = queued_id(c.cmd(b"Subject: dsn\r\n\r\ndsn body\r\n."))
    srv.wait_for_mail("alice", 1)
    show = srv.queue_show(qid)
    low = show.lower()
    assert envid.lower() in low, show
    assert "hdrs" in low, show
    assert "success" in low and "failure" in low, show
    assert "rfc822;dave@remote.test" in low, show
    assert "never" in low, show
    assert "dsn body" in show, show


def test_orcpt_spellings_of_one_utf8_address_are_stored_alike(tern):
    """RFC 6533 §3: raw UTF-8 (with SMTPUTF8) and \\x{HEX} escapes (without)
    name the same original recipient; the queue holds it decoded both times."""
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    shows = []
    for mail_params, orcpt in [(" SMTPUTF8", "utf-8;j\xc3\xb6rg@remote.test"),
                               ("", "utf-8;j\\x{F6}rg@remote.test")]:
        with srv.connect() as c:
            c.ehlo()
            assert c.cmd(f"MAIL FROM:<s@remote.test>{mail_params}").code == 250
            r = c.cmd(b"RCPT TO:<dave@remote.test> ORCPT=" + orcpt.encode("latin-1"))
            assert r.code == 250, r
            assert c.cmd("DATA").code == 354
            qid = queued_id(c.cmd(b"Subject: orcpt\r\n\r\nbody\r\n."))
        shows.append(srv.queue_show(qid))
    for show in shows:
        assert "utf-8;j\u00f6rg@remote.test" in show, show
        assert "\\x{" not in show, show


@pytest.mark.parametrize("line", [
    "MAIL FROM:<s@remote.test> RET=BOGUS",
    "MAIL FROM:<s@remote.test> NOTIFY=SUCCESS",  # NOTIFY belongs to RCPT
])
def test_bad_dsn_parameters_on_mail(tern, line):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd(line)
        assert r.code in (501, 555), r
        assert r.enhanced and r.enhanced.startswith("5."), r


def test_vrfy_252(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd("VRFY alice")
        assert r.code == 252, r
        assert r.enhanced and r.enhanced.startswith("2."), r


def test_unknown_command_500(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        r = c.cmd("FROBNICATE now")
        # RFC 3463: 5.5.x is a protocol/command status (5.5.1 or 5.5.2 in practice).
        assert r.code == 500 and r.enhanced and r.enhanced.startswith("5.5."), r
        assert c.cmd("NOOP").code == 250


@pytest.mark.parametrize("seq", [
    ["RCPT TO:<alice@example.test>"],
    ["DATA"],
    ["MAIL FROM:<s@remote.test>", "DATA"],
    ["MAIL FROM:<s@remote.test>", "MAIL FROM:<s@remote.test>"],
    ["BDAT 0 LAST"],
])
def test_out_of_order_503(tern, seq):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        for line in seq[:-1]:
            assert c.cmd(line).code == 250
        r = c.cmd(seq[-1])
        # RFC 5321 §3.3: DATA after MAIL with no accepted RCPT may also be
        # answered 554 "no valid recipients".
        codes = (503, 554) if seq == ["MAIL FROM:<s@remote.test>", "DATA"] else (503,)
        assert r.code in codes and r.enhanced and r.enhanced.startswith("5.5."), r
        assert c.cmd("RSET").code == 250


def test_mail_before_helo_is_503(tern):
    srv = tern()
    with srv.connect() as c:
        r = c.cmd("MAIL FROM:<s@remote.test>")
        assert r.code == 503, r


@pytest.mark.parametrize("line,code", [
    ("MAIL FROM:<s@remote.test> FOO=BAR", 555),
    ("RCPT TO:<alice@example.test> FOO=BAR", 555),
    ("MAIL FROM:<s@remote.test> SIZE=abc", 501),
    ("MAIL FROM:s@remote.test@", 501),
    ("MAIL FROM:<not an address>", 501),
    ("MAIL TO:<s@remote.test>", 501),
    ("RCPT TO:", 501),
])
def test_bad_parameters(tern, line, code):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        if line.startswith("RCPT"):
            assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        r = c.cmd(line)
        assert r.code == code, (line, r)
        assert r.enhanced and r.enhanced.startswith("5."), r
        assert c.cmd("NOOP").code == 250


def test_data_after_bdat_is_503(tern):
    # RFC 3030 §3: DATA after BDAT in the same transaction is out of sequence.
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        c.send(b"BDAT 5\r\nabc\r\n")
        c.expect(250)
        r = c.cmd("DATA")
        assert r.code == 503, r


@pytest.mark.parametrize("line", ["EHLO", "HELO"])
def test_helo_without_domain_501(tern, line):
    srv = tern()
    with srv.connect() as c:
        r = c.cmd(line)
        # No enhanced code required: none was negotiated yet (RFC 2034 §3).
        assert r.code == 501, r
        assert c.cmd("EHLO client.test").code == 250


def test_rset_clears_transaction(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd("DATA").code == 503
        assert c.cmd("RCPT TO:<alice@example.test>").code == 503


def test_client_disconnect_mid_data_delivers_nothing(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        queued_id(c.cmd(b"Subject: whole\r\n\r\nsentinel\r\n."))
    mails = srv.wait_for_mail("alice", 1)
    assert len(mails) == 1 and b"sentinel" in mails[0], mails


def test_many_parallel_sessions(tern):
    """16 concurrent smtplib sessions, 5 messages each, all delivered once."""
    import threading

    srv = tern()
    errors = []

    def client(n):
        try:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
                for i in range(5):
                    msg = f"Subject: p{n}-{i}\r\nMessage-ID: <p{n}-{i}@t>\r\n\r\nparallel {n}-{i}\r\n".encode()
                    assert s.sendmail("s@remote.test", ["bob@example.test"], msg) == {}
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    mails = srv.wait_for_mail("bob", 80, timeout=30)
    ids = sorted(header_values(m, "Message-ID")[0] for m in mails)
    assert ids == sorted(f"<p{n}-{i}@t>" for n in range(16) for i in range(5))


def test_content_before_354_is_refused_and_the_session_closed(tern):
    """RFC 2920 §3.1: DATA ends a command group. Content sent with it would
    otherwise be parsed as commands depending on packet boundaries."""
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
               b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\n\r\n.\r\n")
        c.expect(250, "2.1.0")
        c.expect(250, "2.1.5")
        c.expect(554, "5.5.0")
        assert c.is_closed()
    with srv.connect() as c:  # the server itself is fine
        c.ehlo()
        assert c.cmd("NOOP").code == 250


def test_refused_data_needs_a_new_mail(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n")
        c.expect(250, "2.1.0")
        c.expect(550, "5.1.1")
        r = c.reply()
        assert r.code in (503, 554) and r.enhanced.startswith("5."), r
        c.send(b"RCPT TO:<alice@example.test>\r\n")
        c.expect(503, "5.5.1")  # RCPT: the transaction is gone
        c.send(b"DATA\r\n")
        c.expect(503, "5.5.1")
        c.cmd("MAIL FROM:<s@remote.test>")
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250


def test_bdat_after_helo_is_refused(tern):
    srv = tern()
    with srv.connect() as c:
        assert c.cmd("HELO client.test").code == 250
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        c.send(b"BDAT 4 LAST\r\nQUIT")
        c.expect(503, "5.5.1")
        assert c.cmd("NOOP").code == 250  # the 4 octets were swallowed, not run


def test_utf8_helo_stays_out_of_ascii_headers(tern):
    srv = tern()
    with srv.connect() as c:
        assert c.cmd("EHLO ünï.test".encode()).code == 250
        c.cmd("MAIL FROM:<s@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: ascii\r\n\r\nbody\r\n.\r\n")
        c.expect(250, "2.0.0")
    (mail,) = srv.wait_for_mail("alice", 1)
    headers, _ = split_mail(mail)
    assert headers.isascii(), headers
    assert b"from [127.0.0.1] ([127.0.0.1])" in headers, headers


def test_content_pipelined_after_a_refused_data_is_not_run(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
               b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        c.expect(250, "2.1.0")
        c.expect(550, "5.1.1")
        c.expect(554, "5.5.0")
        assert c.is_closed()


def test_utf8_ehlo_name_is_not_echoed(tern):
    # RFC 5321 §4.1.1.1: the EHLO greeting text is 7-bit.
    srv = tern()
    with srv.connect() as c:
        r = c.cmd("EHLO ünï.test".encode())
        assert r.code == 250, r
        assert all(line.isascii() for line in r.lines), r


@pytest.mark.parametrize("name", ["WIN_PC", "host_1.client.test", "client.test.", "  client.test"])
def test_helo_names_deployed_clients_send_are_accepted(tern, name):
    srv = tern()
    with srv.connect() as c:
        assert c.cmd(f"EHLO {name}").code == 250
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: helo\r\n\r\nbody\r\n.\r\n")
        c.expect(250, "2.0.0")
    (mail,) = srv.wait_for_mail("alice", 1)
    headers, _ = split_mail(mail)
    assert f"from {name.strip()} ([127.0.0.1])".encode() in headers, headers


def test_lf_terminated_command_is_answered_at_once(tern):
    # A bare LF never ends a command (RFC 5321 §2.3.8), but the client gets
    # its error now instead of waiting for a CRLF until the timeout.
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        c.send(b"NOOP\n")
        c.expect(500, "5.5.2")
        # Nothing up to the next CRLF runs, not even a valid command.
        c.send(b"MAIL FROM:<s@remote.test>\r\n")
        c.expect(500, "5.5.2")
        assert c.cmd("NOOP").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 503  # that MAIL never ran


@pytest.mark.parametrize("mail_params, orcpt, code", [
    ("", "rfc822;j\xc3\xb6rg@remote.test", 501),
    ("", "utf-8;j\xc3\xb6rg@remote.test", 501),
    ("", "utf-8;j\\x{F6}rg@remote.test", 250),  # utf-8-addr-xtext: 7-bit, no SMTPUTF8 needed
    ("", "utf-8;j\\x{D800}rg@remote.test", 501),  # a surrogate is no code point
    (" SMTPUTF8", "utf-8;j\xc3\xb6rg@remote.test", 250),
    (" SMTPUTF8", "rfc822;j\xc3\xb6rg@remote.test", 501),
])
def test_orcpt_utf8_only_as_rfc6533_allows(tern, mail_params, orcpt, code):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<s@remote.test>{mail_params}").code == 250
        r = c.cmd(b"RCPT TO:<alice@example.test> ORCPT=" + orcpt.encode("latin-1"))
        assert r.code == code, r
        if code == 501:
            assert r.enhanced == "5.5.4", r
