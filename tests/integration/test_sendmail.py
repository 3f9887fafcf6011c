"""Local injection: `tern sendmail` and the binary run as `sendmail`, handing
mail to the running server over its Unix socket (<data_dir>/public/submit.sock).

Real peers: Debian's bsd-mailx (which runs the program its `sendmail` variable
names, set in a MAILRC file, here a `sendmail` symlink to the tern binary) and
s-nail (`-S mta=` the tern binary; s-nail calls it with argv[0] "sendmail").
The tests run the command with `-C` or `TERN_CONFIG` pointing at the test
server's config, and check what lands in the Maildirs byte for byte where it
matters. The non-root sender rule runs the command as `nobody` (skipped when
the suite does not run as root: only root can change its uid).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from ternlib import TERN_BIN, to_toml, wait_until

ALIASES = {
    "team@example.test": ["alice", "bob@example.test", "alice@example.test"],
    "root@example.test": ["alice"],
}


def start(tern, overrides: dict | None = None, start: bool = True):
    over = {"aliases": ALIASES}
    over.update(overrides or {})
    return tern(over, start=start)


def sendmail(srv, *args, data: bytes = b"", program=None, env=None, via_c=True, user=None):
    """Runs `tern sendmail [-C config] ARGS` (or `program ARGS`) with `data` on stdin."""
    argv = [str(program)] if program else [str(TERN_BIN), "sendmail"]
    if via_c:
        argv += ["-C", str(srv.config_path)]
    full_env = dict(os.environ)
    full_env.pop("TERN_CONFIG", None)
    full_env.pop("NAME", None)
    full_env.update(env or {})
    return subprocess.run(
        argv + list(args),
        input=data,
        capture_output=True,
        timeout=30,
        env=full_env,
        user=user,
    )


def out(res) -> str:
    return (res.stdout + res.stderr).decode("utf-8", errors="replace")


def header_and_body(mail: bytes) -> tuple[bytes, bytes]:
    header, _, body = mail.partition(b"\r\n\r\n")
    return header + b"\r\n", body


def field(mail: bytes, name: str) -> list[str]:
    """Values of header field `name` (unfolded)."""
    header, _ = header_and_body(mail)
    text = header.decode("utf-8", errors="replace").replace("\r\n\t", " ").replace("\r\n ", " ")
    prefix = name.lower() + ":"
    return [line[len(prefix):].strip() for line in text.split("\r\n") if line.lower().startswith(prefix)]


def test_socket_is_public_in_a_public_folder(tern):
    srv = start(tern)
    sock = srv.data_dir / "public" / "submit.sock"
    assert sock.is_socket()
    assert sock.stat().st_mode & 0o777 == 0o666
    assert (srv.data_dir / "public").stat().st_mode & 0o777 == 0o755


def test_t_takes_to_cc_bcc_and_bcc_disappears(tern):
    srv = start(tern)
    msg = (
        "To: Alice <alice>, team@example.test\n"
        "Cc: \"Carol, C.\" <carol@example.test>\n"
        "Bcc: jörg@example.test,\n  bob\n"
        "Subject: t test\n"
        "\n"
        "hello\n"
    ).encode()
    res = sendmail(srv, "-t", "-oi", data=msg)
    assert res.returncode == 0, out(res)
    assert res.stdout == b"" and res.stderr == b"", out(res)
    for user in ["alice", "bob", "carol", "jorg"]:
        [mail] = srv.wait_for_mail(user, 1)
        header, body = header_and_body(mail)
        assert b"bcc:" not in header.lower(), mail
        if user != "jorg":  # jörg's copy names jörg in its Delivered-To:
            assert "jörg".encode() not in header, mail
        assert body == b"hello\r\n"
        # Unqualified header addresses get the origin domain, as with Postfix.
        assert field(mail, "To") == ['"Alice" <alice@example.test>, <team@example.test>']
        # The uid the kernel reported, with the protocol as RFC 6531 §4.3
        # names it (jörg's address made the transaction SMTPUTF8).
        received = field(mail, "Received")[0]
        assert received.startswith(f"from local (uid {os.getuid()}) by {srv.config['hostname']} (Tern) with UTF8SMTP id ")
        # The server adds what cron-like senders leave out.
        assert len(field(mail, "Date")) == 1 and len(field(mail, "Message-ID")) == 1
    log = srv.stderr()
    assert f'client="local" uid={os.getuid()}' in log, log[-2000:]


def test_t_adds_the_argument_recipients_and_qualifies_root(tern):
    srv = start(tern)
    res = sendmail(srv, "-t", "bob", data=b"To: carol\nSubject: both\n\nx\n")
    assert res.returncode == 0, out(res)
    srv.wait_for_mail("bob", 1)
    srv.wait_for_mail("carol", 1)
    # "root" is root@example.test (the first local domain), an alias of alice.
    res = sendmail(srv, "root", data=b"Subject: to root\n\nfor root\n")
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("alice", 1)
    assert field(mail, "Subject") == ["to root"]


def test_f_F_and_i_with_a_line_of_a_single_dot(tern):
    srv = start(tern)
    body = b"first\n.\n..two dots\n.leading\nlast\n"
    res = sendmail(srv, "-i", "-f", "cron@example.test", "-F", "Cron Daemon", "alice", data=b"Subject: dots\n\n" + body)
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("alice", 1)
    assert field(mail, "Return-Path") == ["<cron@example.test>"]
    assert field(mail, "From") == ['"Cron Daemon" <cron@example.test>']
    assert field(mail, "Received")[0].startswith(f"from local (uid {os.getuid()}) by {srv.config['hostname']} (Tern) with ESMTP id ")
    assert header_and_body(mail)[1] == body.replace(b"\n", b"\r\n")
    # Without -i the lone dot ends the message, as in Sendmail; -fADDR attached.
    res = sendmail(srv, "-fother@example.test", "bob", data=b"Subject: cut\n\nbefore\n.\nafter\n")
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("bob", 1)
    assert header_and_body(mail)[1] == b"before\r\n"
    assert field(mail, "Return-Path") == ["<other@example.test>"]


def test_lf_message_arrives_with_the_same_body_bytes(tern):
    srv = start(tern)
    lines = [
        "Subject: bytes",
        "From: Jörg <jorg@example.test>",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Grüße aus Köln",
        "\ttabbed line  with trailing spaces  ",
        "x" * 900,
        "",
        "",
        "end",
    ]
    raw = ("\n".join(lines) + "\n").encode()
    res = sendmail(srv, "alice@example.test", data=raw)
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("alice", 1)
    expected_body = raw.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    assert header_and_body(mail)[1] == expected_body
    # The message's own From: is kept; none is added.
    assert field(mail, "From") == ["Jörg <jorg@example.test>"]


def test_progress_bars_and_nuls_from_a_cron_job_are_delivered_not_refused(tern):
    """curl, wget and rsync print bare CRs; a stray NUL happens too. The
    report still arrives (bare CR as a line end, NUL removed)."""
    srv = start(tern)
    raw = b"Subject: backup\n\n  10%\r  50%\r 100%\ndone\x00 ok\n"
    res = sendmail(srv, "alice@example.test", data=raw)
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("alice", 1)
    assert header_and_body(mail)[1] == b"  10%\r\n  50%\r\n 100%\r\ndone ok\r\n"


def test_one_user_over_the_session_cap_gets_421_and_exit_75(tern):
    """A uid holds at most limits.max_connections_per_ip sessions at once; one
    more is refused like a client over the cap on the network, and the
    command says try again later."""
    srv = start(tern, {"limits": {"max_connections_per_ip": 1}})
    held = socket.socket(socket.AF_UNIX)
    held.settimeout(10)
    held.connect(str(srv.data_dir / "public" / "submit.sock"))
    try:
        assert held.recv(512).startswith(b"220"), "the first session is served"
        res = sendmail(srv, "alice@example.test", data=b"Subject: over\n\nx\n")
        assert res.returncode == 75, out(res)
        assert "421" in out(res) and "4.7.0" in out(res), out(res)
    finally:
        held.close()
    res = wait_until(lambda: (r := sendmail(srv, "alice@example.test",
                                             data=b"Subject: after\n\nx\n")).returncode == 0 and r,
                     10, what="a session once the held one closed")
    assert b"Subject: after" in srv.wait_for_mail("alice", 1)[0]


def test_bs_speaks_smtp_on_stdin_and_stdout(tern):
    srv = start(tern)
    proc = subprocess.Popen(
        [str(TERN_BIN), "sendmail", "-C", str(srv.config_path), "-bs"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )

    def reply() -> str:
        """One (possibly multi-line) reply, as the client reads it."""
        lines = []
        while True:
            line = proc.stdout.readline().decode()
            assert line.endswith("\r\n"), (lines, line)
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def say(line: bytes) -> str:
        proc.stdin.write(line)
        proc.stdin.flush()
        return reply()

    try:
        assert reply().startswith("220 ")
        assert say(b"EHLO script.example\r\n").startswith("250-")
        assert say(b"MAIL FROM:<app@example.test>\r\n").startswith("250 ")
        # Scripts write LF line ends; Sendmail and Postfix take them.
        assert say(b"RCPT TO:<bob@example.test>\n").startswith("250 ")
        assert say(b"DATA\r\n").startswith("354 ")
        assert say(b"Subject: bs\n\nvia -bs\n.\n").startswith("250 ")
        assert say(b"QUIT\r\n").startswith("221 ")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [mail] = srv.wait_for_mail("bob", 1)
    assert header_and_body(mail)[1] == b"via -bs\r\n"
    assert field(mail, "Return-Path") == ["<app@example.test>"]


def test_exit_status_when_the_server_is_not_running(tern):
    srv = start(tern, start=False)
    res = sendmail(srv, "alice", data=b"Subject: x\n\ny\n")
    assert res.returncode == 75, out(res)
    sock = str(srv.data_dir / "public" / "submit.sock")
    assert "not running" in out(res) and sock in out(res), out(res)
    res = sendmail(srv, "-bs", data=b"QUIT\r\n")
    assert res.returncode == 75, out(res)


def test_exit_status_for_a_bad_flag_and_an_unknown_recipient(tern):
    srv = start(tern)
    res = sendmail(srv, "-Q", "alice", data=b"x\n")
    assert res.returncode == 64, out(res)
    assert "-Q" in out(res)
    res = sendmail(srv, data=b"Subject: nobody\n\nx\n")
    assert res.returncode == 64, out(res)
    # One recipient unknown: nothing is sent, not even to alice.
    res = sendmail(srv, "alice", "nosuchuser", data=b"Subject: unknown\n\nx\n")
    assert res.returncode == 67, out(res)
    assert "nosuchuser@example.test" in out(res) and "5.1.1" in out(res), out(res)
    res = sendmail(srv, "bob", data=b"Subject: after\n\nx\n")
    assert res.returncode == 0, out(res)
    srv.wait_for_mail("bob", 1)
    assert srv.mail_files("alice") == []


def test_help_lists_the_flags():
    res = subprocess.run([str(TERN_BIN), "sendmail", "--help"], capture_output=True, timeout=30)
    assert res.returncode == 0
    text = res.stdout.decode()
    for flag in ["-t", "-f ADDR", "-F NAME", "-i, -oi", "-bs", "-bp", "-oe", "-C FILE"]:
        assert flag in text, flag
    res = subprocess.run([str(TERN_BIN), "--help"], capture_output=True, timeout=30)
    assert "sendmail" in res.stdout.decode()


def symlink(tmp_path: Path, name: str = "sendmail") -> Path:
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(TERN_BIN)
    return link


def test_invoked_as_sendmail_through_a_symlink(tern, tmp_path):
    srv = start(tern)
    link = symlink(tmp_path)
    res = sendmail(
        srv, "-oem", "-oi", "carol", data=b"Subject: symlink\n\nvia the name\n",
        program=link, via_c=False, env={"TERN_CONFIG": str(srv.config_path)},
    )
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("carol", 1)
    assert header_and_body(mail)[1] == b"via the name\r\n"
    # mailq (and -bp) list the queue.
    res = sendmail(srv, "-bp", program=link, via_c=False, env={"TERN_CONFIG": str(srv.config_path)})
    assert res.returncode == 0, out(res)


def test_bsd_mailx_sends_through_tern_sendmail(tern, tmp_path):
    mailx = shutil.which("bsd-mailx")
    assert mailx, "bsd-mailx is not installed (scripts/test.sh step_deps installs it)"
    srv = start(tern)
    link = symlink(tmp_path)
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={link}\n")
    env = dict(os.environ, MAILRC=str(mailrc), TERN_CONFIG=str(srv.config_path), HOME=str(tmp_path))
    res = subprocess.run(
        [mailx, "-s", "from mailx", "-c", "bob", "alice"],
        input=b"hello from mailx\n.\nafter a dot line\n",
        capture_output=True, timeout=30, env=env, cwd=tmp_path,
    )
    assert res.returncode == 0, out(res)
    for user in ["alice", "bob"]:
        [mail] = srv.wait_for_mail(user, 1)
        assert field(mail, "Subject") == ["from mailx"]
        # mailx itself stops reading at the lone dot; what it sent arrives.
        assert header_and_body(mail)[1].startswith(b"hello from mailx\r\n")
        assert field(mail, "Received")[0].startswith(f"from local (uid {os.getuid()})")
    assert not (tmp_path / "dead.letter").exists()


def test_s_nail_sends_through_tern_as_mta(tern, tmp_path):
    snail = shutil.which("s-nail")
    assert snail, "s-nail is not installed (scripts/test.sh step_deps installs it)"
    srv = start(tern)
    env = dict(os.environ, TERN_CONFIG=str(srv.config_path), HOME=str(tmp_path))
    res = subprocess.run(
        # argv[0] of the MTA is "sendmail" (s-nail's mta-argv0 default).
        [snail, "-n", "-S", f"mta={TERN_BIN}", "-S", "sendwait", "-s", "from s-nail", "carol"],
        input=b"s-nail body\n.\nline after the dot\n",
        capture_output=True, timeout=30, env=env, cwd=tmp_path,
    )
    assert res.returncode == 0, out(res)
    [mail] = srv.wait_for_mail("carol", 1)
    # s-nail passes -i: the dot line is text.
    assert header_and_body(mail)[1] == b"s-nail body\r\n.\r\nline after the dot\r\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="running the command as another user needs root")
def test_another_user_is_named_by_uid_and_held_to_own_sender(tern):
    # Folders a user other than root can reach: pytest's are root's alone.
    public = Path(tempfile.mkdtemp(prefix="tern-sm-", dir="/tmp"))
    try:
        public.chmod(0o755)
        sock = public / "submit.sock"
        srv = start(tern, {"sendmail": {"socket": str(sock), "sender": "own"}})
        config = public / "tern.toml"
        config.write_text(to_toml(srv.config))
        config.chmod(0o644)
        wait_until(sock.is_socket, 10, what="the sendmail socket")
        import pwd
        nobody = pwd.getpwnam("nobody")

        def as_nobody(*args, data):
            return subprocess.run(
                [str(TERN_BIN), "sendmail", "-C", str(config), *args],
                input=data, capture_output=True, timeout=30, user=nobody.pw_uid, group=nobody.pw_gid,
                extra_groups=[], cwd="/",
            )

        res = as_nobody("-f", "alice@example.test", "bob", data=b"Subject: forged\n\nx\n")
        assert res.returncode == 77, out(res)
        assert "553" in out(res), out(res)
        res = as_nobody("bob", data=b"Subject: own\n\nx\n")
        assert res.returncode == 0, out(res)
        [mail] = srv.wait_for_mail("bob", 1)
        assert field(mail, "Return-Path") == ["<nobody@example.test>"]
        assert field(mail, "From") == ["<nobody@example.test>"]
        assert field(mail, "Received")[0].startswith(f"from local (uid {nobody.pw_uid})")
        assert f'uid={nobody.pw_uid}' in srv.stderr()
    finally:
        shutil.rmtree(public, ignore_errors=True)
