"""SMTP smuggling (CVE-2023-51764 family): a fake end-of-data made of bare LF
or bare CR, followed by a whole smuggled transaction, then the real CRLF.CRLF.

Under the default `bare_lf = "reject"`: exactly one reply for the whole
thing (550 5.5.2, sent after the *real* end of data), no message ever
delivered for it (neither the outer one nor the smuggled one), and the
session still works afterwards. Under `bare_lf = "normalize"`: one message,
whose body contains the smuggled commands as plain text.
"""

import pytest

from ternlib import queued_id

SMUGGLED = (
    b"MAIL FROM:<evil@remote.test>\r\n"
    b"RCPT TO:<bob@example.test>\r\n"
    b"DATA\r\n"
    b"From: <evil@remote.test>\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled body\r\n"
)

VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
}


def outer_message(sep: bytes) -> bytes:
    return b"From: <sender@remote.test>\r\nSubject: outer\r\n\r\nouter body" + sep + SMUGGLED + b".\r\n"


def open_data(c):
    c.ehlo()
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd("RCPT TO:<alice@example.test>").code == 250
    assert c.cmd("DATA").code == 354


def send_clean(c, rcpt: str, text: bytes) -> str:
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert c.cmd("DATA").code == 354
    return queued_id(c.cmd(b"Subject: clean\r\n\r\n" + text + b"\r\n."))


@pytest.mark.parametrize("sep", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_rejected(tern, sep):
    srv = tern()
    with srv.connect() as c:
        open_data(c)
        c.send(outer_message(sep))
        c.expect(550, "5.5.2")
        # Exactly one reply: the next one must be RSET's own 250, not a
        # leftover 250/354 from the smuggled commands.
        r = c.cmd("RSET")
        assert r.code == 250 and r.enhanced == "2.0.0", r
        assert c.no_pending_reply()
        # The session still works: a clean message to both mailboxes.
        send_clean(c, "alice@example.test", b"clean one")
        send_clean(c, "bob@example.test", b"clean two")
    alice = srv.wait_for_mail("alice", 1)
    bob = srv.wait_for_mail("bob", 1)
    assert len(alice) == 1 and b"clean one" in alice[0] and b"outer body" not in alice[0], alice
    assert len(bob) == 1 and b"clean two" in bob[0] and b"smuggled" not in bob[0], bob


@pytest.mark.parametrize("sep", list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_normalized_is_one_message(tern, sep):
    srv = tern({"limits": {"bare_lf": "normalize"}})
    with srv.connect() as c:
        open_data(c)
        c.send(outer_message(sep))
        qid = queued_id(c.expect(250, "2.0.0"))
        r = c.cmd("NOOP")
        assert r.code == 250, r
        assert c.no_pending_reply()
        # A sentinel to bob: the only thing bob may ever get.
        send_clean(c, "bob@example.test", b"sentinel")
    (mail,) = srv.wait_for_mail("alice", 1)
    assert b"outer body" in mail
    # The smuggled transaction is body text of the one message.
    assert b"MAIL FROM:<evil@remote.test>" in mail, mail
    assert b"RCPT TO:<bob@example.test>" in mail
    assert b"smuggled body" in mail
    # Bare CR/LF were normalised to CRLF (or LF in an LF-only Maildir file):
    # no lone CR may survive into the mailbox.
    assert b"\r" not in mail.replace(b"\r\n", b""), mail
    bob = srv.wait_for_mail("bob", 1)
    assert len(bob) == 1 and b"sentinel" in bob[0], bob
    assert qid


def test_bare_lf_in_headers_rejected_by_default(tern):
    srv = tern()
    with srv.connect() as c:
        open_data(c)
        c.send(b"Subject: bare\nX-Other: y\r\n\r\nbody\r\n.\r\n")
        c.expect(550, "5.5.2")
        assert c.cmd("NOOP").code == 250


@pytest.mark.parametrize("bdat", [b"BDAT {n} FOO", b"BDAT {n} LAST LAST", b"BDAT {n} \xff"])
def test_a_malformed_bdat_still_frames_its_chunk(tern, bdat):
    """RFC 3030 §2: the chunk follows a BDAT whatever the reply. A BDAT
    refused for its syntax must swallow its chunk: a transaction hidden in
    the chunk never runs."""
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        chunk = SMUGGLED + b".\r\n"
        c.send(bdat.replace(b"{n}", str(len(chunk)).encode()) + b"\r\n" + chunk)
        r = c.reply()
        assert r.code in (500, 501), r
        # Exactly one reply for BDAT and its chunk, and the transaction is gone.
        assert c.cmd("RCPT TO:<bob@example.test>").code == 503
        assert c.no_pending_reply()
        send_clean(c, "bob@example.test", b"sentinel")
    bob = srv.wait_for_mail("bob", 1)
    assert len(bob) == 1 and b"sentinel" in bob[0] and b"smuggled" not in bob[0], bob
    assert srv.mails("alice") == []


def test_a_bdat_without_a_readable_size_ends_the_session(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        c.send(b"BDAT 0x40\r\n" + SMUGGLED + b".\r\n")
        c.expect(501, "5.5.4")
        assert c.is_closed()
    with srv.connect() as c:
        c.ehlo()
        send_clean(c, "bob@example.test", b"sentinel")
    bob = srv.wait_for_mail("bob", 1)
    assert len(bob) == 1 and b"smuggled" not in bob[0], bob
