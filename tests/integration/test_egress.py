"""Per-user egress limits and the circuit breaker, with smtplib as the mail
client and the scripted peer (smtpeer) as the remote server.

Small limits and short windows come from `[submission]`; logins are made with
`tern user add` before the server starts and use AUTH PLAIN in plain text on
loopback (`auth.plaintext_on_loopback`: TLS is not what is tested here).

Covers: the messages-per-hour limit answers 451 4.7.1 and recovers when the
window slides; recipients per hour and new recipients per day; local
recipients never count; a per-user override (`tern user limits`); the
breaker trips on hammering, holds the user's queued mail (HELD in `tern queue
list`) while another user's mail is delivered, refuses their logins and
sessions, and `tern user release` lets the mail go and the user log in again;
remote refusals trip it too; a release while the server is stopped lets the
mail go at the next start.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import time
import uuid

import pytest

from smtpeer import Peer
from ternlib import TERN_BIN, wait_until

PASSWORD = "correct horse battery"


def user_cmd(srv, *args: str, secret: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(TERN_BIN), "user", *args, "--config", str(srv.config_path)],
                         input=(secret + "\n").encode() if secret is not None else b"",
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res


def port_of(srv, role: str) -> int:
    return next(p for _, p, r in srv.listeners if r == role)


@pytest.fixture
def peers():
    started: list = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def msa(tern, peers):
    """A server with a submission listener, logins alice and bob, relaying
    remote mail to a scripted peer; `submission` settings from the test."""
    def start(submission: dict, extra: dict | None = None):
        peer = Peer("127.0.0.1", 0).start()
        peers.append(peer)
        cfg = {
            "listener": [
                {"address": "127.0.0.1:0", "role": "mx"},
                {"address": "127.0.0.1:0", "role": "submission"},
            ],
            "auth": {"plaintext_on_loopback": True},
            "route": {"relay": f"[127.0.0.1]:{peer.port}"},
            "delivery": {"retry_initial": "1s", "retry_max": "1s"},
            "submission": submission,
            **(extra or {}),
        }
        srv = tern(cfg, start=False)
        user_cmd(srv, "add", "alice", secret=PASSWORD)
        user_cmd(srv, "add", "bob", secret=PASSWORD)
        srv.start()
        return srv, peer
    return start


def login(srv, user: str) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", port_of(srv, "submission"), local_hostname="laptop.test", timeout=30)
    c.ehlo("laptop.test")
    c.login(user, PASSWORD)
    return c


def message(sender: str, to: str, marker: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.test>\r\n\r\nhello {marker}\r\n").encode()


def submit(c: smtplib.SMTP, sender: str, rcpts: list[str]) -> str:
    marker = uuid.uuid4().hex
    assert c.sendmail(sender, rcpts, message(sender, rcpts[0], marker)) == {}
    return marker


def mail_reply(c: smtplib.SMTP, sender: str) -> tuple[int, bytes]:
    code, text = c.mail(sender)
    if code == 250:
        c.rset()
    return code, text


def delivered_markers(peer) -> list[str]:
    return [t.data.decode(errors="replace") for t in peer.received()]


def user_entry(srv, name: str) -> dict:
    res = user_cmd(srv, "list", "--json")
    return next(u for u in json.loads(res.stdout) if u["name"] == name)


def test_messages_per_hour_answer_451_and_recover(msa):
    srv, peer = msa({"max_messages_per_hour": 2, "rate_window": "3s", "breaker_factor": 100})
    with login(srv, "alice") as c:
        submit(c, "alice@example.test", ["one@remote.test"])
        submit(c, "alice@example.test", ["two@remote.test"])
        code, text = mail_reply(c, "alice@example.test")
        assert code == 451 and text.startswith(b"4.7.1"), (code, text)
        # Bob is not affected by Alice's count.
        with login(srv, "bob") as b:
            submit(b, "bob@example.test", ["three@remote.test"])
        # The window slides: after it, Alice may send again.
        wait_until(lambda: mail_reply(c, "alice@example.test")[0] == 250, 10, interval=0.5,
                   what="the messages limit to recover")
        submit(c, "alice@example.test", ["four@remote.test"])
    peer.wait_for(4)
    assert "egress.breaker_tripped" not in srv.stderr()


def test_recipient_limits_count_only_remote_recipients(msa):
    srv, peer = msa({"max_recipients_per_hour": 3, "max_new_recipients_per_day": 100,
                     "breaker_factor": 100})
    with login(srv, "alice") as c:
        # Local recipients (and an alias of local ones) never count.
        submit(c, "alice@example.test", ["bob@example.test", "carol@example.test", "team@example.test"])
        for _ in range(3):
            submit(c, "alice@example.test", ["bob@example.test", "carol@example.test"])
        c.mail("alice@example.test")
        for r in ["a@remote.test", "b@remote.test", "c@remote.test"]:
            assert c.rcpt(r)[0] == 250
        code, text = c.rcpt("d@remote.test")
        assert code == 451 and text.startswith(b"4.7.1") and b"recipients per hour" in text, text
        # The session goes on: a local recipient is still taken, and the
        # message goes to the three accepted.
        assert c.rcpt("bob@example.test")[0] == 250
        code, _ = c.data(message("alice@example.test", "a@remote.test", uuid.uuid4().hex))
        assert code == 250
    peer.wait_for(1)
    srv.wait_for_mail("bob", 5)


def test_new_recipients_per_day_and_a_per_user_override(msa):
    srv, peer = msa({"max_new_recipients_per_day": 2, "breaker_factor": 100})
    with login(srv, "alice") as c:
        submit(c, "alice@example.test", ["x@remote.test", "y@remote.test"])
        # Writing again to the same correspondents is fine ...
        submit(c, "alice@example.test", ["X@remote.test"])
        # ... a third new one is not.
        assert c.mail("alice@example.test")[0] == 250
        code, text = c.rcpt("z@remote.test")
        assert code == 451 and b"new recipients per day" in text, text
        c.rset()
    # Bob's own limit is higher, set while the server runs.
    user_cmd(srv, "limits", "bob", "--new-recipients-per-day", "5")
    with login(srv, "bob") as b:
        submit(b, "bob@example.test", ["p@remote.test", "q@remote.test", "r@remote.test", "s@remote.test"])
    peer.wait_for(3)


def test_breaker_holds_the_users_mail_until_release(msa):
    srv, peer = msa({"max_messages_per_hour": 2, "breaker_factor": 2})
    peer.rcpt_replies["later@remote.test"] = "451 4.3.0 try again later"
    with login(srv, "alice") as c:
        m1 = submit(c, "alice@example.test", ["later@remote.test"])
        m2 = submit(c, "alice@example.test", ["later@remote.test"])
        assert mail_reply(c, "alice@example.test")[0] == 451  # 3 of the 4 that trip
        code, text = mail_reply(c, "alice@example.test")
        assert code == 451 and b"held" in text, text
        # The session stays refused.
        code, text = mail_reply(c, "alice@example.test")
        assert code == 451 and b"held" in text, text
    wait_until(lambda: "egress.breaker_tripped" in srv.stderr(), 5, what="the breaker's log line")
    line = next(ln for ln in srv.stderr().splitlines() if "egress.breaker_tripped" in ln)
    assert "alice" in line and "message attempts" in line, line
    wait_until(lambda: user_entry(srv, "alice")["held"] is not None, 5, what="the users file mark")
    # The peer would now take the mail, but Alice's stays held ...
    peer.rcpt_replies.clear()
    with login(srv, "bob") as b:
        mb = submit(b, "bob@example.test", ["friend@remote.test"])
    (got,) = peer.wait_for(1)
    assert mb.encode() in got.data
    time.sleep(3)  # three retry intervals
    assert len(peer.received()) == 1
    listing = srv.queue_list()
    assert listing.count("HELD") == 2, listing
    # ... and she cannot log in.
    with pytest.raises(smtplib.SMTPException) as refused:
        login(srv, "alice")
    assert "454" in str(refused.value) or "4.7.0" in str(refused.value), refused.value
    res = user_cmd(srv, "release", "alice")
    out = res.stdout.decode()
    assert "released alice" in out and "2 queued message(s) released" in out, out
    got = peer.wait_for(3)
    data = b"".join(t.data for t in got)
    assert m1.encode() in data and m2.encode() in data
    assert "egress.released" in srv.stderr()
    assert user_entry(srv, "alice")["held"] is None
    # Logged in again, with fresh counters.
    with login(srv, "alice") as c:
        submit(c, "alice@example.test", ["again@remote.test"])
    peer.wait_for(4)


def test_remote_refusals_trip_the_breaker(msa):
    srv, peer = msa({"breaker_remote_rejects": 3})
    for r in ["a", "b", "c"]:
        peer.rcpt_replies[f"{r}@remote.test"] = "550 5.1.1 no such user"
    with login(srv, "alice") as c:
        submit(c, "alice@example.test", ["a@remote.test", "b@remote.test", "c@remote.test"])
        wait_until(lambda: "egress.breaker_tripped" in srv.stderr(), 15, what="the breaker")
        code, text = mail_reply(c, "alice@example.test")
        assert code == 451 and b"held" in text, text
    assert "refused by remote servers" in next(
        ln for ln in srv.stderr().splitlines() if "egress.breaker_tripped" in ln)
    # The bounce to Alice is local and her mailbox still gets it.
    srv.wait_for_mail("alice", 1)
    user_cmd(srv, "release", "alice")
    with login(srv, "alice") as c:
        submit(c, "alice@example.test", ["fine@remote.test"])
    peer.wait_for(1)


def test_release_while_stopped_lets_the_mail_go_at_the_next_start(msa):
    srv, peer = msa({"max_messages_per_hour": 1, "breaker_factor": 2})
    peer.rcpt_replies["later@remote.test"] = "451 4.3.0 try again later"
    with login(srv, "alice") as c:
        marker = submit(c, "alice@example.test", ["later@remote.test"])
        assert mail_reply(c, "alice@example.test")[0] == 451
    wait_until(lambda: user_entry(srv, "alice")["held"] is not None, 5, what="the users file mark")
    peer.rcpt_replies.clear()
    srv.stop()
    # Held across a restart.
    srv.start()
    time.sleep(2)
    assert peer.received() == []
    assert "HELD" in srv.queue_list()
    srv.stop()
    out = user_cmd(srv, "release", "alice").stdout.decode()
    assert "not running" in out, out
    srv.start()
    (got,) = peer.wait_for(1)
    assert marker.encode() in got.data


def test_a_transaction_under_way_when_the_breaker_trips_is_refused_at_data(msa):
    srv, peer = msa({"max_recipients_per_hour": 1, "breaker_factor": 2})
    with login(srv, "alice") as c:
        assert c.mail("alice@example.test")[0] == 250
        assert c.rcpt("a@remote.test")[0] == 250
        code, text = c.rcpt("b@remote.test")
        assert code == 451 and b"held" in text, text
        code, text = c.docmd("DATA")
        assert code == 451 and b"held" in text, (code, text)
    time.sleep(1)
    assert peer.received() == []
    assert "recipient attempts" in next(
        ln for ln in srv.stderr().splitlines() if "egress.breaker_tripped" in ln)
