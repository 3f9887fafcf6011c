"""SIGHUP reloads the config without dropping a connection: users, aliases,
domains, limits and routes change for what starts afterwards; a config that
does not validate is refused with its keys logged, and the running one stays.
"""

import signal
import socket

from smtpeer import Peer
from ternlib import deep_merge, to_toml, wait_until


def reload(srv, over: dict, outcome: str = "config.reloaded") -> str:
    """Rewrites the config with `over` merged in, sends SIGHUP and waits for
    the reload's outcome to be logged; returns the log."""
    before = srv.stderr().count(outcome)
    srv.config = deep_merge(srv.config, over)
    srv.config_path.write_text(to_toml(srv.config), encoding="utf-8")
    srv.proc.send_signal(signal.SIGHUP)
    return wait_until(lambda: srv.stderr().count(outcome) > before and srv.stderr(), 15,
                      what=f"{outcome} in the log")


def rcpt(srv, address: str) -> int:
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        return c.cmd(f"RCPT TO:<{address}>").code


def send(c, rcpt_to: str, body: bytes = b"hello") -> None:
    assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt_to}>").code == 250
    assert c.cmd("DATA").code == 354
    assert c.cmd(b"Subject: reload\r\n\r\n" + body + b"\r\n.").code == 250


NEW_USERS = {
    "local": {"domains": ["example.test", "localhost", "new.test"]},
    "user": [
        {"name": "alice", "addresses": ["alice@example.test"]},
        {"name": "bob", "addresses": ["bob@example.test"]},
        {"name": "carol", "addresses": ["carol@example.test"]},
        {"name": "jorg", "addresses": ["jörg@example.test"]},
        {"name": "dave", "addresses": ["dave@new.test"]},
    ],
    "aliases": {"sales@example.test": ["dave"]},
    "limits": {"max_message_size": 2000},
}


def test_users_aliases_domains_and_limits_change_without_dropping_a_connection(tern):
    srv = tern()
    assert rcpt(srv, "dave@new.test") == 550
    open_session = srv.connect()
    open_session.ehlo()
    reload(srv, NEW_USERS)

    # New sessions get the new config.
    assert rcpt(srv, "dave@new.test") == 250
    assert rcpt(srv, "sales@example.test") == 250
    with srv.connect() as c:
        ehlo = c.ehlo()
        assert "SIZE 2000" in ehlo.text, ehlo
        assert c.cmd("MAIL FROM:<s@remote.test> SIZE=3000").code == 552
        send(c, "sales@example.test")
    assert b"Subject: reload" in srv.wait_for_mail("dave", 1)[0]

    # The session open across the reload goes on, on the config it began with.
    send(open_session, "alice@example.test", b"\r\n".join([b"x" * 60] * 50))
    open_session.cmd("QUIT")
    open_session.close()
    assert len(srv.wait_for_mail("alice", 1)[0]) > 3000


def test_a_config_that_does_not_validate_is_refused_and_the_running_one_stays(tern):
    srv = tern()
    reload(srv, NEW_USERS)
    log = reload(srv, {"limits": {"max_recipients": 0, "no_such_key": 1},
                       "aliases": {"loop@example.test": ["loop@example.test"]}},
                 outcome="config.reload_refused")
    refused = [line for line in log.splitlines() if "config.reload_refused" in line]
    for key in ["limits.no_such_key", "limits.max_recipients"]:
        assert any(key in line and "line=" in line for line in refused), refused
    assert srv.proc.poll() is None
    assert rcpt(srv, "dave@new.test") == 250  # the last good config
    assert rcpt(srv, "loop@example.test") == 550


def test_a_certificate_that_does_not_load_refuses_the_whole_reload(tern, tmp_path):
    srv = tern()
    missing = tmp_path / "absent.pem"
    over = deep_merge(NEW_USERS, {"tls": {"certificates": [
        {"cert": str(missing), "key": str(missing)}]}})
    log = reload(srv, over, outcome="config.reload_refused")
    assert "tls.certificates[0]" in log
    # Nothing of it was applied: not the users either.
    assert rcpt(srv, "dave@new.test") == 550
    assert rcpt(srv, "alice@example.test") == 250


def test_changes_that_need_a_restart_are_logged_and_the_rest_applies(tern):
    srv = tern()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        other_port = s.getsockname()[1]
    log = reload(srv, deep_merge(NEW_USERS, {
        "listener": [{"address": f"127.0.0.1:{other_port}", "role": "mx"}]}))
    assert any("config.reload_needs_restart" in line and "listener" in line
               for line in log.splitlines()), log
    assert rcpt(srv, "dave@new.test") == 250  # on the port it listened on before


def test_a_new_route_takes_queued_mail_to_the_new_relay(tern):
    with socket.socket() as s:
        s.bind(("127.0.0.3", 0))
        port = s.getsockname()[1]
    peer = Peer("127.0.0.3", port).start()
    try:
        # Relays to [127.0.0.1]:1 at first, where nobody listens.
        srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
        with srv.connect() as c:
            c.ehlo()
            send(c, "someone@remote.test")
        wait_until(lambda: "someone@remote.test" in srv.queue_list(), 10, what="queued")
        reload(srv, {"route": {"relay": f"127.0.0.3:{port}"}})
        res = srv.cli("queue", "flush")
        assert res.returncode == 0, res
        (tx,) = peer.wait_for(1, 20)
        assert tx.rcpt_addresses == ["someone@remote.test"]
    finally:
        peer.stop()
