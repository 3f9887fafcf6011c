"""Real third-party clients against the real daemon: swaks, curl, smtp-source.

Each client must get its 250 and the message must land in the Maildir with
its body intact. A missing client is an error (scripts/test.sh installs them),
never a skip.
"""

import shutil
import subprocess
import uuid

import pytest

from ternlib import ends_with_original, split_mail


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    assert path, f"{name} is not installed (scripts/test.sh installs it)"
    return path


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_swaks(tern, pipeline):
    srv = tern()
    marker = uuid.uuid4().hex
    args = [
        tool("swaks"), "--server", "127.0.0.1", "--port", str(srv.port),
        "--helo", "client.test",
        "--from", "sender@remote.test", "--to", "alice@example.test",
        "--header", f"Subject: swaks {marker}",
        "--body", f"body marker {marker}",
    ]
    if pipeline:
        args.append("--pipeline")
    res = subprocess.run(args, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "250 2.0.0 Ok: queued as" in out, out
    if pipeline:
        assert "PIPELINING" in out
    (mail,) = srv.wait_for_mail("alice", 1)
    _, body = split_mail(mail)
    assert f"body marker {marker}".encode() in body
    assert f"Subject: swaks {marker}".encode() in mail


def test_swaks_unknown_user_fails(tern):
    srv = tern()
    res = subprocess.run(
        [tool("swaks"), "--server", "127.0.0.1", "--port", str(srv.port),
         "--from", "sender@remote.test", "--to", "nobody@example.test"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode != 0
    assert "550 5.1.1" in out, out


def test_curl_upload(tern, tmp_path):
    srv = tern()
    marker = uuid.uuid4().hex
    msg = (
        f"From: <sender@remote.test>\r\nTo: <bob@example.test>\r\nSubject: curl {marker}\r\n\r\n"
        f"curl body {marker}\r\n.leading dot line\r\nend\r\n"
    ).encode()
    f = tmp_path / "msg.eml"
    f.write_bytes(msg)
    res = subprocess.run(
        [tool("curl"), "-sS", "--max-time", "30", f"smtp://127.0.0.1:{srv.port}/client.test",
         "--mail-from", "sender@remote.test", "--mail-rcpt", "bob@example.test",
         "--upload-file", str(f)],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    (mail,) = srv.wait_for_mail("bob", 1)
    assert ends_with_original(mail, msg), mail


def test_curl_relay_denied(tern, tmp_path):
    srv = tern()
    f = tmp_path / "msg.eml"
    f.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    res = subprocess.run(
        [tool("curl"), "-sS", "--max-time", "30", f"smtp://127.0.0.1:{srv.port}",
         "--mail-from", "sender@remote.test", "--mail-rcpt", "x@remote.test",
         "--upload-file", str(f)],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    # curl exit 55 = "Failed sending network data" / RCPT failed.
    assert res.returncode != 0
    assert "550" in res.stderr.decode(errors="replace")


def test_smtp_source_many_messages(tern):
    """Postfix's smtp-source: 20 messages over 4 parallel sessions."""
    srv = tern()
    n = 20
    res = subprocess.run(
        [tool("smtp-source"), "-c", "-m", str(n), "-s", "4", "-l", "2000",
         "-f", "sender@remote.test", "-t", "carol@example.test",
         f"127.0.0.1:{srv.port}"],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    mails = srv.wait_for_mail("carol", n, timeout=30)
    assert len(mails) == n
    for m in mails:
        assert m.startswith(b"Return-Path: <sender@remote.test>")
        _, body = split_mail(m)
        assert len(body) >= 2000 * 0.9, len(body)
