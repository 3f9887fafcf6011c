"""Local delivery and recipient policy, driven by Python's smtplib.

Covers: one message to one user lands as exactly one Maildir file with
Return-Path, Delivered-To, Tern's Received: and the original bytes; aliases
(one → many, duplicates collapsed); subaddress; catch-all; postmaster; unknown
user 550 5.1.1; relay denied 550 5.7.1; relay from a trusted network is queued
for outbound delivery (deferred: the test relay does not listen).
"""

import re
import smtplib
import time
import uuid

import pytest

from ternlib import HOSTNAME, ends_with_original, header_values, queued_id, split_mail, to_toml, wait_until


def make_msg(marker: str, to: str = "alice@example.test") -> bytes:
    return (
        f"From: Sender <sender@remote.test>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: test {marker}\r\n"
        f"Message-ID: <{marker}@remote.test>\r\n"
        f"\r\n"
        f"Hello, this is {marker}.\r\n"
        f"..a line that starts with a dot (stuffed on the wire)\r\n"
        f"last line\r\n"
    ).encode()


def smtp(srv) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=15)
    s.ehlo()
    return s


def send(srv, rcpts, marker=None, sender="sender@remote.test"):
    marker = marker or uuid.uuid4().hex
    msg = make_msg(marker, rcpts[0] if rcpts else "x@example.test")
    with smtp(srv) as s:
        refused = s.sendmail(sender, rcpts, msg)
    assert refused == {}
    return marker, msg


def test_smtplib_local_delivery_headers_and_bytes(tern):
    srv = tern()
    with smtp(srv) as s:
        assert s.has_extn("pipelining") and s.has_extn("enhancedstatuscodes")
        marker = uuid.uuid4().hex
        msg = make_msg(marker)
        code, _ = s.mail("sender@remote.test")
        assert code == 250
        code, text = s.rcpt("alice@example.test")
        assert code == 250, text
        code, text = s.data(msg)
        assert code == 250, text
        assert text.startswith(b"2.0.0 Ok: queued as "), text
        qid = text.split()[-1].decode()

    (mail,) = srv.wait_for_mail("alice", 1)
    # Give any (wrong) second copy the same chance to appear: a second
    # message to bob, delivered after it, proves the queue moved on.
    send(srv, ["bob@example.test"])
    srv.wait_for_mail("bob", 1)
    assert len(srv.mails("alice")) == 1

    assert mail.startswith(b"Return-Path: <sender@remote.test>"), mail[:200]
    assert header_values(mail, "Delivered-To") == ["alice@example.test"]
    received = header_values(mail, "Received")
    assert len(received) == 1, received
    assert f"by {HOSTNAME}" in received[0], received[0]
    # RFC 5321 §4.4 ID clause: the queue ID of the 250 reply and the logs.
    assert f" id {qid}" in " ".join(received[0].split()), received[0]
    # Prepended headers come before the original header block, in order.
    head, _ = split_mail(mail)
    assert head.find(b"Return-Path:") < head.find(b"Delivered-To:") < head.find(b"Received:") < head.find(b"From:")
    # The original message, dot-unstuffed, is there byte for byte.
    assert ends_with_original(mail, msg), mail
    assert b"\n..a line that starts with a dot" in mail  # unstuffed exactly once


def test_alias_one_to_many_duplicates_collapsed(tern):
    srv = tern()
    marker, msg = send(srv, ["team@example.test"])
    alice = srv.wait_for_mail("alice", 1)
    bob = srv.wait_for_mail("bob", 1)
    # Proof that the queue is done with the message before counting copies.
    send(srv, ["alice@example.test"], marker="after")
    alice = srv.wait_for_mail("alice", 2)
    assert len(alice) == 2, "alias listed alice twice: must be delivered once"
    assert sum(marker.encode() in m for m in alice) == 1
    assert len(bob) == 1 and ends_with_original(bob[0], msg)


def test_alias_and_direct_recipient_collapse(tern):
    srv = tern()
    marker, _ = send(srv, ["team@example.test", "alice@example.test", "alice+x@example.test"])
    srv.wait_for_mail("bob", 1)
    srv.wait_for_mail("alice", 1)
    send(srv, ["alice@example.test"], marker="after")
    alice = srv.wait_for_mail("alice", 2)
    assert sum(marker.encode() in m for m in alice) == 1, "one file per local mailbox"


def test_subaddress(tern):
    srv = tern()
    marker, msg = send(srv, ["alice+tag@example.test"])
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg)


def test_subaddress_disabled_means_unknown(tern):
    srv = tern({"local": {"subaddress_separator": ""}})
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("alice+tag@example.test")
    assert (code, text[:5]) == (550, b"5.1.1"), (code, text)


def test_catch_all(tern):
    srv = tern({"local": {"catch_all": {"example.test": "carol"}}})
    marker, msg = send(srv, ["whoever-this-is@example.test"])
    (mail,) = srv.wait_for_mail("carol", 1)
    assert ends_with_original(mail, msg)
    assert srv.mails("alice") == []


@pytest.mark.parametrize("rcpt", ["postmaster", "postmaster@example.test", "postmaster@localhost",
                                  "PostMaster@example.test", "postmaster@[127.0.0.1]",
                                  "postmaster@[IPv6:::ffff:127.0.0.1]"])
def test_postmaster(tern, rcpt):
    # RFC 5321 §4.5.1: <postmaster> and postmaster@domain must be accepted;
    # the local part "postmaster" is case-insensitive.
    srv = tern()
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt(rcpt)
        assert code == 250, (rcpt, code, text)
        msg = make_msg("pm")
        code, text = s.data(msg)
        assert code == 250, text
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg)


def test_our_address_literal_holds_only_postmaster(tern):
    # Our own literal names this host: other local parts there are unknown,
    # never relayed (that would loop back to us); another host's literal is
    # a relay like any other domain.
    srv = tern()
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("alice@[127.0.0.1]")
        assert code == 550 and text.startswith(b"5.1.1"), text
        code, text = s.rcpt("postmaster@[127.0.0.2]")
        assert code == 550 and text.startswith(b"5.7.1"), text
    # Even a trusted client cannot relay to our own literal: it would come
    # straight back.
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("alice@[127.0.0.1]")
        assert code == 550 and text.startswith(b"5.1.1"), text
        code, text = s.rcpt("someone@[127.0.0.2]")
        assert code == 250, text


def test_postmaster_accepted_from_null_sender(tern):
    srv = tern()
    with smtp(srv) as s:
        code, _ = s.mail("<>")
        assert code == 250
        code, text = s.rcpt("postmaster")
        assert code == 250, text


def test_unknown_local_user(tern):
    srv = tern()
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1"), (code, text)
        # The transaction continues with a good recipient.
        code, text = s.rcpt("bob@example.test")
        assert code == 250, text
        code, text = s.data(make_msg("partial"))
        assert code == 250, text
    srv.wait_for_mail("bob", 1)


def test_relay_denied_for_untrusted_loopback(tern):
    srv = tern()
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("someone@remote.test")
        assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
        code, _ = s.docmd("DATA")
        # RFC 5321 §3.3: all RCPTs rejected → 503 or 554 ("no valid recipients").
        assert code in (503, 554)


def test_relay_accepted_from_trusted_network_waits_in_queue(tern):
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("carol@remote.test")
        assert code == 250, text
        code, text = s.rcpt("alice@example.test")
        assert code == 250, text
        code, text = s.data(make_msg("relay", "carol@remote.test"))
        assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[-1].strip("<>")
    srv.wait_for_mail("alice", 1)

    def rcpt_line(listing, rcpt):
        return next((ln for ln in listing.splitlines() if rcpt in ln), "")

    # The Maildir file lands before the delivery is recorded: poll the queue.
    listing = wait_until(
        lambda: (lambda out: out if "delivered" in rcpt_line(out, "alice@example.test").lower() else None)(
            srv.queue_list()), 10, what="alice recorded as delivered")
    assert qid in listing, listing
    head = listing[listing.index(qid):].splitlines()[0]
    assert "sender@remote.test" in head and re.search(r"\bage\b", head) and re.search(r"\bsize\b", head), head
    assert re.search(r"waiting for outbound delivery|deferred", rcpt_line(listing, "carol@remote.test").lower()), listing


def test_domain_is_case_insensitive(tern):
    # RFC 5321 §2.4: domain names are case-insensitive.
    srv = tern()
    marker, msg = send(srv, ["alice@EXAMPLE.Test"])
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg)


def test_catch_all_only_for_its_domain(tern):
    srv = tern({"local": {"catch_all": {"example.test": "carol"}}})
    with smtp(srv) as s:
        s.mail("sender@remote.test")
        code, text = s.rcpt("whoever@localhost")
        assert (code, text[:5]) == (550, b"5.1.1"), (code, text)


def test_custom_maildir_path(tern, tmp_path):
    box = tmp_path / "elsewhere" / "Maildir"
    srv = tern({"user": [
        {"name": "alice", "addresses": ["alice@example.test"], "maildir": str(box)},
        {"name": "bob", "addresses": ["bob@example.test"]},
    ], "aliases": None})
    assert srv.maildir("alice") == box
    marker, msg = send(srv, ["alice@example.test"])
    (mail,) = srv.wait_for_mail("alice", 1)
    assert ends_with_original(mail, msg)
    assert not (srv.data_dir / "mail" / "alice").exists()


def test_mail_for_a_removed_user_stays_queued_and_is_written_nowhere(tern):
    """A message accepted for a user who is then removed from the config is
    kept (deferred), never written under the working directory or anywhere
    else, and listed by `tern queue list`."""
    srv = tern({"user": [{"name": "alice", "addresses": ["alice@example.test"]},
                         {"name": "bob", "addresses": ["bob@example.test"], "maildir": "/proc/no-such-maildir"}],
                "aliases": None,
                "delivery": {"retry_initial": "1s", "retry_max": "1s"}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: for bob\r\n\r\nbody\r\n.\r\n")
        qid = queued_id(c.expect(250, "2.0.0"))
    wait_until(lambda: "deferred" in srv.queue_list(), 15, what="bob's delivery deferred")
    srv.stop()
    # bob leaves; the server restarts and retries.
    srv.config["user"] = [{"name": "alice", "addresses": ["alice@example.test"]}]
    srv.config_path.write_text(to_toml(srv.config), encoding="utf-8")
    srv.start()
    wait_until(lambda: "no longer configured" in srv.queue_list(), 15, what="a retry for the removed user")
    assert qid in srv.queue_list()
    for name in ("new", "tmp", "cur"):
        assert not (srv.workdir / name).exists(), f"{name}/ created in the working directory"


def test_a_deferred_delivery_waits_for_its_retry(tern):
    # retry 1s/1s: the delay minus jitter is under a second, and must not be
    # rounded down to "now" (that retried thousands of times a second).
    srv = tern({"user": [{"name": "alice", "addresses": ["alice@example.test"]},
                         {"name": "bob", "addresses": ["bob@example.test"], "maildir": "/proc/no-such-maildir"}],
                "aliases": None,
                "delivery": {"retry_initial": "1s", "retry_max": "1s"}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<s@remote.test>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: for bob\r\n\r\nbody\r\n.\r\n")
        queued_id(c.expect(250, "2.0.0"))

    def deferrals():
        return srv.stderr().count('"deferred"') + srv.stderr().count("status=deferred")

    wait_until(lambda: deferrals() >= 1, 15, what="bob's first deferral")
    first = deferrals()
    # An observation window, not a wait for a condition: at one retry a
    # second, 3 s hold at most 4 more attempts.
    time.sleep(3)
    assert deferrals() - first <= 4, f"{deferrals() - first} retries in 3 s"
    assert deferrals() - first >= 1, "no retry at all in 3 s"


RELAY_TRICKS = [
    "<user%elsewhere.test@example.test>",
    "<elsewhere.test!user@example.test>",
    "<\"user@elsewhere.test\"@example.test>",
    "<@example.test:user@elsewhere.test>",
    "<@example.test:user%elsewhere.test@example.test>",
    "<\"alice%elsewhere.test\"@EXAMPLE.TEST>",
    "<user@[192.0.2.77]>",
    "<@example.test,@other.test:\"a!b\"@example.test>",
]


@pytest.mark.parametrize("path", RELAY_TRICKS)
def test_open_relay_tricks_are_refused_and_nothing_is_queued(tern, path):
    """The classic relay tricks, through a local domain with a catch-all that
    would otherwise take anything: 550 5.7.1, and nothing queued."""
    srv = tern({"local": {"catch_all": {"example.test": "carol"}}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<spammer@remote.test>").code == 250
        r = c.cmd(f"RCPT TO:{path}")
        assert (r.code, r.enhanced) == (550, "5.7.1"), (path, r)
        assert c.cmd("DATA").code in (503, 554)
        assert c.cmd("QUIT").code == 221
    assert srv.queue_list().strip() == "queue is empty"
    assert srv.mails("carol") == []
