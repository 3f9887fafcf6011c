"""Submission (RFC 6409) with real clients: swaks, Python smtplib, msmtp and a
SCRAM-SHA-256 client (scramp) against `submission` (STARTTLS) and `smtps`
(implicit TLS) listeners; AUTH only over TLS and never on `mx`; AUTH before
MAIL; a user sends only as their own addresses (envelope and From:); login
failures are refused and locked out before any hash.

Logins are made with `tern user add` (password on stdin) before the server
starts.
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import socket
import ssl
import subprocess
import uuid

import pytest

from ternlib import TERN_BIN, wait_until

PASSWORD = "correct horse battery"

LISTENERS = {
    "listener": [
        {"address": "127.0.0.1:0", "role": "mx"},
        {"address": "127.0.0.1:0", "role": "submission"},
        {"address": "127.0.0.1:0", "role": "smtps"},
    ],
}


def port_of(srv, role: str) -> int:
    return next(p for _, p, r in srv.listeners if r == role)


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def user_cmd(srv, *args: str, secret: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(TERN_BIN), "user", *args, "--config", str(srv.config_path)],
                         input=(secret + "\n").encode() if secret is not None else b"",
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res


@pytest.fixture
def msa(tern):
    """A server with mx, submission and smtps listeners and the login alice
    (addresses from the main config: alice@example.test; the alias team@
    reaches her too)."""
    def start(extra: dict | None = None):
        srv = tern({**LISTENERS, **(extra or {})}, start=False)
        user_cmd(srv, "add", "alice", secret=PASSWORD)
        srv.start()
        return srv
    return start


def message(sender: str, marker: str, to: str = "bob@example.test") -> str:
    return f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n\r\nhello {marker}\r\n"


def test_smtplib_starttls_login_sends_and_received_says_esmtpsa(msa):
    srv = msa()
    marker = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", port_of(srv, "submission"), timeout=30) as c:
        c.ehlo("laptop.test")
        assert not c.has_extn("auth"), "AUTH is offered over TLS only"
        c.starttls(context=no_verify())
        c.ehlo("laptop.test")
        mechs = c.esmtp_features["auth"].split()
        assert {"PLAIN", "LOGIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"} <= set(mechs), mechs
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.test", ["bob@example.test"], message("alice@example.test", marker))
    (mail,) = srv.wait_for_mail("bob")
    head = mail.split(b"\r\n\r\n", 1)[0].decode()
    assert " with ESMTPSA id " in head, head
    assert "\r\nDate: " in "\r\n" + head and "\r\nMessage-ID: <" in "\r\n" + head, "added (RFC 6409 §8)"
    assert "session.authenticated" in srv.stderr()


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_auth_over_starttls_and_implicit_tls(msa, mech):
    srv = msa()
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed (scripts/test.sh installs it)"
    for tls_flag, role in (("--tls", "submission"), ("--tlsc", "smtps")):
        res = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(port_of(srv, role)), tls_flag,
             "--auth", mech, "--auth-user", "alice", "--auth-password", PASSWORD,
             "--from", "alice@example.test", "--to", "bob@example.test",
             "--header", f"From: <alice@example.test>"],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        out = res.stdout.decode(errors="replace")
        assert res.returncode == 0, out + res.stderr.decode(errors="replace")
        assert "235 2.7.0" in out and "250 2.0.0 Ok: queued as" in out, out
    srv.wait_for_mail("bob", 2)


def test_smtps_with_smtplib_ssl(msa):
    srv = msa()
    with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
        c.login("alice", PASSWORD)
        c.sendmail("alice+lists@example.test", ["bob@example.test"],
                   message("alice+lists@example.test", "tagged"))
    srv.wait_for_mail("bob")


def test_msmtp_as_a_real_mail_client(msa, tmp_path):
    srv = msa()
    msmtp = shutil.which("msmtp")
    assert msmtp, "msmtp is not installed (scripts/test.sh installs it)"
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\n"
        "tls on\ntls_starttls on\ntls_certcheck off\n"
        "account tern\nhost 127.0.0.1\n"
        f"port {port_of(srv, 'submission')}\n"
        "auth plain\nuser alice\n"
        f"password {PASSWORD}\n"
        "from alice@example.test\n"
        "account default : tern\n"
    )
    rc.chmod(0o600)
    res = subprocess.run([msmtp, "-C", str(rc), "bob@example.test"],
                         input=message("alice@example.test", "msmtp").encode(),
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    (mail,) = srv.wait_for_mail("bob")
    assert b"Subject: msmtp" in mail


def test_scram_sha_256_with_an_independent_client(msa):
    import scramp
    srv = msa()
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    with smtplib.SMTP("127.0.0.1", port_of(srv, "submission"), timeout=30) as c:
        c.ehlo("laptop.test")
        c.starttls(context=no_verify())
        c.ehlo("laptop.test")
        first = base64.b64encode(client.get_client_first().encode()).decode()
        code, challenge = c.docmd("AUTH", f"SCRAM-SHA-256 {first}")
        assert code == 334, (code, challenge)
        client.set_server_first(base64.b64decode(challenge).decode())
        code, challenge = c.docmd(base64.b64encode(client.get_client_final().encode()).decode())
        assert code == 334, (code, challenge)
        client.set_server_final(base64.b64decode(challenge).decode())  # verifies the server
        code, text = c.docmd("")
        assert code == 235, (code, text)
        c.sendmail("alice@example.test", ["bob@example.test"], message("alice@example.test", "scram"))
    srv.wait_for_mail("bob")


def test_auth_rules_mx_plaintext_and_before_mail(msa):
    srv = msa()
    with smtplib.SMTP("127.0.0.1", port_of(srv, "mx"), timeout=30) as c:
        c.ehlo("laptop.test")
        c.starttls(context=no_verify())
        c.ehlo("laptop.test")
        assert not c.has_extn("auth"), "never on mx"
    with smtplib.SMTP("127.0.0.1", port_of(srv, "submission"), timeout=30) as c:
        c.ehlo("laptop.test")
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode())
        assert code == 538 and b"5.7.11" in text, (code, text)
        code, text = c.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530 and b"5.7.0" in text, (code, text)
        c.starttls(context=no_verify())
        c.ehlo("laptop.test")
        code, text = c.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530, (code, text)
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"bob\0alice\0" + PASSWORD.encode()).decode())
        assert code == 535 and b"5.7.8" in text, ("authzid differs from the login", code, text)
        code, text = c.docmd("AUTH", "NTLM")
        assert code == 504, (code, text)
        code, text = c.docmd("AUTH", "LOGIN")
        assert code == 334
        code, text = c.docmd("*")
        assert code == 501, ("cancelled", code, text)
        code, text = c.docmd("AUTH", "PLAIN !!notbase64!!")
        assert code == 501, (code, text)


def test_a_user_sends_only_as_themselves(msa):
    srv = msa()
    with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
        c.login("alice", PASSWORD)
        # Envelope: bob's address is not hers.
        code, text = c.docmd("MAIL", "FROM:<bob@example.test>")
        assert code == 553 and b"5.7.1" in text, (code, text)
        c.rset()
        code, _ = c.docmd("MAIL", "FROM:<>")
        assert code == 553
        c.rset()
        # Header: her envelope, bob's From:.
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("alice@example.test", ["carol@example.test"], message("bob@example.test", "forged"))
        assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error
        # Two From: fields, one hers.
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("alice@example.test", ["carol@example.test"],
                       "From: <alice@example.test>\r\nFrom: <bob@example.test>\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 550
        # Her alias (team@ reaches her mailbox) is hers.
        c.sendmail("team@example.test", ["carol@example.test"], message("team@example.test", "alias"))
        # Authenticated: she may relay to other domains (queued for delivery).
        assert c.sendmail("alice@example.test", ["someone@elsewhere.test"],
                          message("alice@example.test", "relay", "someone@elsewhere.test")) == {}
    (mail,) = srv.wait_for_mail("carol")
    assert b"Subject: alias" in mail
    assert "elsewhere.test" in srv.queue_list()


def auth_plain(srv, password: str) -> tuple[int | str, bytes]:
    """One AUTH PLAIN on a fresh implicit-TLS connection: (code, text), or
    ("closed", b"") when the server hangs up."""
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
            c.ehlo("laptop.test")
            token = base64.b64encode(b"\0alice\0" + password.encode()).decode()
            return c.docmd("AUTH", f"PLAIN {token}")
    except smtplib.SMTPServerDisconnected:
        return "closed", b""


def test_wrong_passwords_are_refused_then_the_client_is_locked_out(msa):
    srv = msa({"auth": {"max_failures_per_ip": 3, "account_retry_interval": "0s"}})
    codes = [auth_plain(srv, f"wrong password {i}")[0] for i in range(5)]
    assert codes[:3] == [535, 535, 535], codes
    assert set(codes[3:]) <= {421, "closed"}, codes
    # The right password from the locked address waits for the lockout too.
    assert auth_plain(srv, PASSWORD)[0] in (421, "closed")
    log = srv.stderr()
    assert "auth.login" in log and PASSWORD not in log and "wrong password" not in log
    assert log.count("refused before any hash") >= 3


def test_guessing_an_account_from_strangers_costs_one_try_per_interval(msa):
    """Password spraying stays under per-client limits, so each account also
    takes one attempt per interval from networks that never logged in to it:
    the next guesses are refused (454 4.7.0) without computing a hash."""
    srv = msa()
    assert auth_plain(srv, "guess one")[0] == 535
    code, text = auth_plain(srv, "guess two")
    assert code == 454 and b"4.7.0" in text, (code, text)
    assert auth_plain(srv, PASSWORD)[0] == 454, "the interval holds for the right password too"


def test_a_lockout_ends_by_itself(msa):
    srv = msa({"auth": {"max_failures_per_ip": 2, "lockout": "1s", "account_retry_interval": "0s"}})
    assert [auth_plain(srv, f"bad {i}")[0] for i in range(2)] == [535, 535]
    assert auth_plain(srv, PASSWORD)[0] in (421, "closed"), "locked"
    # Polled with a deadline: the lockout lasts 1 s.
    wait_until(lambda: auth_plain(srv, PASSWORD)[0] == 235, 10, interval=0.3,
               what="the right password accepted once the lockout is over")


def test_app_passwords_log_in_and_revocation_is_picked_up_without_a_restart(msa):
    srv = msa()
    res = user_cmd(srv, "app-password", "add", "alice", "phone")
    app = next(w for w in res.stdout.decode().split() if w.count("-") == 4)
    with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
        c.login("alice", app)
    assert "app-password:phone" in srv.stderr()
    user_cmd(srv, "app-password", "revoke", "alice", "phone")

    def refused() -> bool:
        try:
            with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
                c.login("alice", app)
            return False
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code == 535
    wait_until(refused, 10, interval=0.3, what="the revoked app password refused")


def test_submission_ports_greet_at_once_while_mx_waits(msa):
    """The early-talker delay is for mx: a mail client on a submission port
    does not pay it on every connection."""
    import time
    srv = msa({"limits": {"greeting_delay": "2s"}})
    for role in ("submission", "smtps"):
        start = time.monotonic()
        if role == "smtps":
            with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, role), context=no_verify(), timeout=30):
                pass
        else:
            with smtplib.SMTP("127.0.0.1", port_of(srv, role), timeout=30):
                pass
        assert time.monotonic() - start < 1.5, role
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port_of(srv, "mx"), timeout=30):
        pass
    assert time.monotonic() - start >= 1.9


def test_received_can_leave_the_submitting_client_out(msa):
    srv = msa({"submission": {"received_client_address": False}})
    with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=30) as c:
        c.ehlo("home-laptop.test")
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.test", ["bob@example.test"], message("alice@example.test", "private"))
    (mail,) = srv.wait_for_mail("bob")
    head = mail.split(b"\r\n\r\n", 1)[0].decode()
    ours = head[head.index("Received: "):]
    ours = ours[:ours.index(";")]
    assert "home-laptop" not in ours and "127.0.0.1" not in ours, ours
    assert "with ESMTPSA" in ours and "(using TLSv1." in ours, ours


def test_channel_binding_is_offered_only_where_it_can_work(msa):
    """SCRAM-SHA-256-PLUS binds to the RFC 9266 tls-exporter, which needs
    TLS 1.3: a TLS 1.2 session is not offered it, and gets 504 if it asks."""
    srv = msa()
    ctx = no_verify()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", port_of(srv, "submission"), timeout=30) as c:
        c.ehlo("laptop.test")
        c.starttls(context=ctx)
        assert c.sock.version() == "TLSv1.2"
        c.ehlo("laptop.test")
        mechs = c.esmtp_features["auth"].split()
        assert "SCRAM-SHA-256-PLUS" not in mechs and "SCRAM-SHA-256" in mechs, mechs
        code, _ = c.docmd("AUTH", "SCRAM-SHA-256-PLUS")
        assert code == 504
        c.login("alice", PASSWORD)
