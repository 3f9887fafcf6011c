"""Server-side TLS against real clients: implicit TLS (RFC 8314) with Python's
ssl module, swaks --tlsc and openssl s_client; certificates chosen by SNI;
the self-signed default kept across restarts; SIGHUP reloading certificates
without dropping a connection; broken and stalled handshakes.

Certificates are made with the openssl command (Debian's openssl package).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path

from ternlib import HOSTNAME, TERN_BIN, Raw, wait_until

LISTENERS = {
    "listener": [
        {"address": "127.0.0.1:0", "role": "mx"},
        {"address": "127.0.0.1:0", "role": "smtps"},
    ]
}


PASSWORD = "tls test password"


def with_login(tern, overrides: dict):
    """A server whose smtps listener (submission over TLS: AUTH required)
    knows the login alice."""
    srv = tern(overrides, start=False)
    res = subprocess.run([str(TERN_BIN), "user", "add", "alice", "--config", str(srv.config_path)],
                         input=(PASSWORD + "\n").encode(), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return srv.start()


def port_of(srv, role: str) -> int:
    return next(p for _, p, r in srv.listeners if r == role)


def make_cert(dir: Path, stem: str, names: list[str]) -> tuple[Path, Path]:
    cert, key = dir / f"{stem}.crt", dir / f"{stem}.key"
    san = ",".join(f"DNS:{n}" for n in names)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def served_cert(port: int, name: str | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with no_verify().wrap_socket(raw, server_hostname=name) as tls:
            return tls.getpeercert(binary_form=True)


def test_implicit_tls_submission_with_smtplib_is_recorded_in_received(tern):
    srv = with_login(tern, LISTENERS)
    marker = uuid.uuid4().hex
    with smtplib.SMTP_SSL("127.0.0.1", port_of(srv, "smtps"), context=no_verify(), timeout=20) as c:
        c.ehlo("client.test")
        c.login("alice", PASSWORD)
        c.sendmail("alice@example.test", ["alice@example.test"],
                   f"From: <alice@example.test>\r\nSubject: tls {marker}\r\n\r\nbody {marker}\r\n")
        version = c.sock.version()
        cipher = c.sock.cipher()[0]
    (mail,) = srv.wait_for_mail("alice")
    head = mail.split(b"\r\n\r\n", 1)[0].decode()
    assert marker in mail.decode()
    assert " with ESMTPSA id " in head, head
    assert f"(using {version} with cipher" in head, (version, head)
    assert cipher, "the client negotiated a cipher"


def test_self_signed_certificate_is_made_once_for_the_host_name(tern):
    srv = tern(LISTENERS)
    cert = srv.data_dir / "tls" / "self-signed.crt"
    key = srv.data_dir / "tls" / "self-signed.key"
    assert cert.exists() and key.exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    served = served_cert(port_of(srv, "smtps"), HOSTNAME)
    assert served == der_of(cert)
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
                          capture_output=True, text=True, check=True).stdout
    assert f"DNS:{HOSTNAME}" in text, text
    srv.stop()
    srv.start()
    assert served_cert(port_of(srv, "smtps"), HOSTNAME) == der_of(cert), "kept, not made again"


def test_sni_chooses_the_certificate_and_sighup_reloads_without_dropping_sessions(tern, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    a_cert, a_key = make_cert(certs, "a", ["mail.a.test"])
    b_cert, b_key = make_cert(certs, "b", ["*.b.test"])
    srv = with_login(tern, {**LISTENERS, "tls": {"certificates": [
        {"cert": str(a_cert), "key": str(a_key)},
        {"cert": str(b_cert), "key": str(b_key)},
    ]}})
    port = port_of(srv, "smtps")
    assert served_cert(port, "mail.a.test") == der_of(a_cert)
    assert served_cert(port, "mx.b.test") == der_of(b_cert)
    assert served_cert(port, "unknown.test") == der_of(a_cert), "the first is the default"

    # A session open across the reload keeps working.
    open_session = smtplib.SMTP_SSL("127.0.0.1", port, context=no_verify(), timeout=20)
    open_session.ehlo("client.test")
    open_session.login("alice", PASSWORD)

    # A broken replacement is refused and the old certificate stays.
    a_key.write_text("not a key\n")
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_until(lambda: "config.reload_refused" in srv.stderr(), 15, what="reload refusal logged")
    assert "tls.certificates[0]" in srv.stderr()
    assert served_cert(port, "mail.a.test") == der_of(a_cert)

    new_cert, new_key = make_cert(certs, "new", ["mail.a.test"])
    shutil.copy(new_key, a_key)
    shutil.copy(new_cert, a_cert)
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_until(lambda: served_cert(port, "mail.a.test") == der_of(new_cert), 15,
               what="the new certificate served")
    code, _ = open_session.noop()
    assert code == 250
    open_session.sendmail("alice@example.test", ["alice@example.test"],
                          "From: <alice@example.test>\r\nSubject: across\r\n\r\nx\r\n")
    open_session.quit()
    srv.wait_for_mail("alice")


def test_swaks_and_openssl_speak_implicit_tls(tern):
    srv = with_login(tern, LISTENERS)
    port = port_of(srv, "smtps")
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed (scripts/test.sh installs it)"
    res = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(port), "--tlsc",
         "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", "alice@example.test", "--to", "alice@example.test", "--helo", "client.test",
         "--header", "From: <alice@example.test>"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "250 2.0.0 Ok: queued as" in out, out
    res = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-ign_eof"],
        input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True, timeout=60,
    )
    out = res.stdout.decode(errors="replace")
    assert out.startswith("220 "), out
    assert "221 " in out, out
    srv.wait_for_mail("alice")


def test_broken_and_stalled_handshakes_hurt_nobody(tern):
    srv = tern(LISTENERS)
    port = port_of(srv, "smtps")
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    garbage = socket.create_connection(("127.0.0.1", port), timeout=10)
    garbage.sendall(b"EHLO plain.text.is.not.tls\r\n" * 4)
    garbage.settimeout(10)
    # The server ends the broken handshake: EOF (or a reset), never a 220.
    try:
        data = garbage.recv(4096)
        while data and b"220" not in data:
            more = garbage.recv(4096)
            if not more:
                break
            data += more
        assert b"220" not in data
    except ConnectionResetError:
        pass
    garbage.close()
    # With one client stalled mid-handshake, others are served.
    assert served_cert(port, HOSTNAME)
    with Raw(port_of(srv, "mx")) as c:
        assert c.reply().code == 220
    stalled.close()
    assert "session.tls_failed" in wait_until(
        lambda: srv.stderr() if "session.tls_failed" in srv.stderr() else "", 15,
        what="failed handshake logged")


def test_check_config_names_a_certificate_that_does_not_load(tmp_path):
    from ternlib import TERN_BIN, default_config, to_toml
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, _ = make_cert(certs, "a", ["mail.a.test"])
    _, other_key = make_cert(certs, "b", ["mail.b.test"])
    cfg = default_config(tmp_path / "data")
    cfg["tls"] = {"certificates": [{"cert": str(cert), "key": str(other_key)}]}
    path = tmp_path / "tern.toml"
    path.write_text(to_toml(cfg))
    res = subprocess.run([str(TERN_BIN), "check-config", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0
    assert "tls.certificates[0]" in res.stdout + res.stderr, res.stdout + res.stderr


def test_starttls_on_mx_with_swaks_smtplib_and_openssl(tern):
    srv = tern()
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed (scripts/test.sh installs it)"
    res = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--tls",
         "--from", "s@remote.test", "--to", "alice@example.test", "--helo", "client.test",
         "--header", "Subject: swaks-starttls"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out + res.stderr.decode(errors="replace")
    assert "250 2.0.0 Ok: queued as" in out, out
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        code, _ = c.starttls(context=no_verify())
        assert code == 220
        c.ehlo("client.test")
        assert not c.has_extn("starttls"), "not offered twice"
        c.sendmail("s@remote.test", ["alice@example.test"], "Subject: smtplib-starttls\r\n\r\nx\r\n")
    res = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-starttls", "smtp",
         "-quiet", "-ign_eof"],
        input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True, timeout=60,
    )
    out = res.stdout.decode(errors="replace")
    assert "250" in out and "221 " in out, out
    mails = srv.wait_for_mail("alice", 2)
    for m in mails:
        head = m.split(b"\r\n\r\n", 1)[0].decode()
        assert " with ESMTPS id " in head and "(using TLSv1." in head, head


def test_commands_pipelined_after_starttls_never_run(tern):
    """CVE-2011-0411: whatever the client sent in the same write as STARTTLS
    is dropped, before and after the handshake."""
    srv = tern()
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    f = raw.makefile("rb")

    def reply():
        lines = []
        while True:
            line = f.readline()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] == b" ":
                return lines

    assert reply()[0].startswith(b"220")
    raw.sendall(b"EHLO client.test\r\n")
    assert any(b"STARTTLS" in l for l in reply())
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert reply()[0].startswith(b"220 2.0.0")
    tls = no_verify().wrap_socket(raw, server_hostname=HOSTNAME)
    tf = tls.makefile("rb")
    tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
    first = tf.readline()
    # No leftover reply to the injected MAIL/RCPT: the session starts afresh,
    # so RCPT without EHLO/MAIL is refused in sequence.
    assert first.startswith(b"503"), first
    tls.sendall(b"EHLO client.test\r\n")
    lines = []
    while True:
        line = tf.readline()
        lines.append(line)
        if line[3:4] == b" ":
            break
    assert lines[0].startswith(b"250"), lines
    assert not any(b"STARTTLS" in l for l in lines), lines
    tls.sendall(b"QUIT\r\n")
    assert tf.readline().startswith(b"221")
    tls.close()
    assert srv.queue_list().strip() == "queue is empty"
