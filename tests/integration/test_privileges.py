"""Tern started as root drops to `server.user`, and its Maildirs belong to the
mail-store user, so a real Dovecot running as that user reads them over IMAP.

The tests create system users of their own (useradd, removed afterwards): a
server user and a mail-store user. Everything lives under a temp folder that
those users can pass through (pytest's own tmp folders are root's, mode 0700).

What is checked:
  * the running server's ids and capabilities in /proc/PID/status (and `ps`):
    the server user; CAP_CHOWN and CAP_DAC_OVERRIDE kept only because the
    mailboxes have another owner, and held (permitted and in force) by the
    delivery thread alone: every other thread, the main one included, has
    not even them permitted (/proc/PID/task/*/status);
  * owners and modes of the data folder, spool and Maildir on disk;
  * a private Dovecot IMAP (mail processes as the mail-store user) fetches
    the very bytes Tern wrote, and moves the message to cur/ (it can write);
  * bad input: a server.user or a mailbox owner that does not exist is a
    start-up and check-config error naming the key; an unprivileged start
    that cannot give files away refuses to start; root without server.user
    warns;
  * `tern user add` and `tern dkim generate` run as root leave their files to
    server.user.
"""

from __future__ import annotations

import grp
import imaplib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from ternlib import TERN_BIN, Tern, TernStartError, deep_merge, default_config, to_toml, wait_until

DOVECOT = "/usr/sbin/dovecot"
# CAP_CHOWN is capability 0, CAP_DAC_OVERRIDE 1.
MAILBOX_CAPS = (1 << 0) | (1 << 1)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="creating users and dropping privileges needs root (CI runs as root)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def accounts():
    """Two fresh system users with their own groups: (server, mail store)."""
    tag = uuid.uuid4().hex[:8]
    names = [f"ternsrv{tag}", f"ternmail{tag}"]
    made = []
    try:
        for name in names:
            subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home",
                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                check=True, capture_output=True,
            )
            made.append(name)
        yield tuple(pwd.getpwnam(n) for n in names)
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def world():
    """A folder every user may pass through, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tern-priv-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _status(pid: int | str, task: str | None = None) -> dict[str, str]:
    path = Path(f"/proc/{pid}") / (f"task/{task}" if task else "") / "status"
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _capabilities_by_thread(pid: int) -> dict[str, list[tuple[int, int]]]:
    """(permitted, effective) of every thread of `pid`, by thread name."""
    threads: dict[str, list[tuple[int, int]]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        st = _status(pid, task.name)
        threads.setdefault(st["Name"], []).append((int(st["CapPrm"], 16), int(st["CapEff"], 16)))
    return threads


def _only_delivery_holds_the_mailbox_caps(pid: int) -> None:
    threads = _capabilities_by_thread(pid)
    assert threads.pop("tern-deliver") == [(MAILBOX_CAPS, MAILBOX_CAPS)], threads
    assert threads, "no other thread seen"
    assert all(caps == (0, 0) for each in threads.values() for caps in each), threads


def _owner_mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


def _server(world: Path, overrides: dict) -> Tern:
    return Tern(world / "tern", overrides)


def _send(srv: Tern, rcpt: str, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
        c.sendmail("sender@remote.test", [rcpt], body)


# ----------------------------------------------------------------- the drop


def test_root_drops_to_server_user_and_dovecot_reads_the_mail(accounts, world):
    server, store = accounts
    srv = _server(world, {
        "server": {"user": server.pw_name},
        "mailbox": {"owner": store.pw_name, "file_mode": 0o600, "dir_mode": 0o700},
    }).start()
    try:
        pid = srv.proc.pid
        # Who it runs as: every id of the server user; the main thread
        # (whose status this is) gave even the kept capabilities up.
        st = _status(pid)
        assert st["Uid"].split() == [str(server.pw_uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(server.pw_gid)] * 4, st["Gid"]
        assert st["Groups"].split() == [str(server.pw_gid)], st["Groups"]
        assert int(st["CapEff"], 16) == 0, st
        assert int(st["CapPrm"], 16) == 0, st
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0, st
        # Nor can an exec bring any other back.
        assert int(st["CapBnd"], 16) == MAILBOX_CAPS, st
        ps = subprocess.run(["ps", "-o", "user:40=,group:40=", "-p", str(pid)],
                            capture_output=True, text=True, check=True)
        assert ps.stdout.split() == [server.pw_name, server.pw_name], ps.stdout

        body = (b"From: sender@remote.test\r\nTo: alice@example.test\r\n"
                b"Subject: privileges " + uuid.uuid4().hex.encode() + b"\r\n\r\n"
                b"Read me through Dovecot.\r\n")
        _send(srv, "alice@example.test", body)
        (stored,) = srv.wait_for_mail("alice")
        assert stored.endswith(body)

        # Only the delivery thread has the mailbox capabilities, even as
        # permitted: no session thread could raise them.
        _only_delivery_holds_the_mailbox_caps(pid)

        # On disk: Tern's folders are the server user's, the Maildir the store's.
        data = srv.data_dir
        s, m = server.pw_name, store.pw_name
        assert _owner_mode(data) == (s, s, 0o711)
        assert _owner_mode(data / "spool") == (s, s, 0o700)
        assert all(p.lstat().st_uid == server.pw_uid for p in (data / "spool").rglob("*"))
        assert _owner_mode(data / "mail") == (s, s, 0o711)
        assert _owner_mode(data / "mail" / "alice") == (s, s, 0o711)
        maildir = srv.maildir("alice")
        for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
            assert _owner_mode(folder) == (m, m, 0o700), folder
        (path,) = srv.mail_files("alice")
        assert _owner_mode(path) == (m, m, 0o600)

        fetched = _read_over_imap(world, data / "mail", store)
        assert fetched == stored
        # Dovecot, as the mail-store user, could move it on (new/ -> cur/).
        assert srv.mail_files("alice") == []
        (seen,) = list((maildir / "cur").iterdir())
        assert seen.read_bytes() == stored and seen.stat().st_uid == store.pw_uid
    finally:
        srv.stop()


def _read_over_imap(world: Path, mail: Path, store: pwd.struct_passwd) -> bytes:
    """Starts a private Dovecot whose mail processes run as the mail-store
    user and returns the first INBOX message of alice as IMAP FETCH gives it."""
    base = world / "dovecot"
    base.mkdir()
    port = _free_port()
    conf = base / "dovecot.conf"
    conf.write_text(f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{mail}/%u/Maildir
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid={store.pw_uid} gid={store.pw_gid}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, 15, what="dovecot imap")
        assert proc.poll() is None, proc.stderr.read()
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        try:
            typ, _ = imap.login("alice", "secret")
            assert typ == "OK"
            typ, count = imap.select("INBOX")
            log = (base / "dovecot.log").read_text(errors="replace") if (base / "dovecot.log").exists() else ""
            assert typ == "OK" and count == [b"1"], (typ, count, log)
            typ, parts = imap.fetch("1", "(BODY[])")
            assert typ == "OK", parts
            return parts[0][1]
        finally:
            imap.logout()
    finally:
        proc.terminate()
        proc.wait(10)


def test_without_another_owner_no_capability_survives(accounts, world):
    server, _store = accounts
    srv = _server(world, {"server": {"user": server.pw_name}}).start()
    try:
        st = _status(srv.proc.pid)
        assert st["Uid"].split() == [str(server.pw_uid)] * 4
        assert int(st["CapPrm"], 16) == 0 and int(st["CapEff"], 16) == 0, st
        _send(srv, "bob@example.test", b"Subject: plain\r\n\r\nhi\r\n")
        srv.wait_for_mail("bob")
        (path,) = srv.mail_files("bob")
        assert _owner_mode(path) == (server.pw_name, server.pw_name, 0o600)
    finally:
        srv.stop()


def test_a_root_owned_data_folder_is_handed_over(accounts, world):
    # A first run as root (no server.user) leaves everything root's; the
    # next start with server.user set takes it over and delivers, bob's
    # Maildir going to the server user and carol's to her configured owner.
    server, store = accounts
    srv = _server(world, {}).start()
    for rcpt in ("bob@example.test", "carol@example.test"):
        _send(srv, rcpt, b"Subject: one\r\n\r\n1\r\n")
    srv.wait_for_mail("bob")
    srv.wait_for_mail("carol")
    assert "server.running_as_root" in srv.stderr()
    assert srv.stop() == 0
    assert srv.data_dir.stat().st_uid == 0
    srv.config["server"] = {"user": server.pw_name}
    srv.config["user"][2]["owner"] = store.pw_name
    srv.config_path.write_text(to_toml(srv.config))
    srv.start()
    try:
        assert "server.running_as_root" not in srv.stderr()
        assert srv.data_dir.stat().st_uid == server.pw_uid
        for sub in ("spool", "tls", "mail/bob"):
            tree = srv.data_dir / sub
            assert all(p.lstat().st_uid == server.pw_uid for p in [tree, *tree.rglob("*")]), sub
        carol = srv.maildir("carol")
        assert all(p.lstat().st_uid == store.pw_uid for p in [carol, *carol.rglob("*")])
        assert (srv.data_dir / "mail" / "carol").stat().st_uid == server.pw_uid
        for rcpt in ("bob@example.test", "carol@example.test"):
            _send(srv, rcpt, b"Subject: two\r\n\r\n2\r\n")
        srv.wait_for_mail("bob", 2)
        srv.wait_for_mail("carol", 2)
    finally:
        srv.stop()


def _free_privileged_port() -> int:
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def test_a_metrics_port_below_1024_is_bound_before_the_drop(accounts, world):
    server, _store = accounts
    port = _free_privileged_port()
    srv = _server(world, {
        "server": {"user": server.pw_name},
        "metrics": {"address": f"127.0.0.1:{port}"},
    }).start()
    try:
        assert _status(srv.proc.pid)["Uid"].split() == [str(server.pw_uid)] * 4
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0], answer[:200]
        assert b"tern_" in answer
    finally:
        srv.stop()


def test_links_planted_by_server_user_never_lead_the_hand_over_outside(accounts, world):
    # server.user holds the data folder between runs and may plant links
    # in it; root hands the folder over again at the next start and must
    # not give away what the links point to.
    server, store = accounts
    srv = _server(world, {"server": {"user": server.pw_name}}).start()
    _send(srv, "bob@example.test", b"Subject: one\r\n\r\n1\r\n")
    srv.wait_for_mail("bob")
    assert srv.stop() == 0
    outside = world / "etc"
    (outside / "Maildir" / "new").mkdir(parents=True)
    (outside / "passwd").write_text("root's\n")
    (outside / "Maildir" / "new" / "letter").write_text("root's\n")
    data = srv.data_dir
    (data / "spool" / "folder").symlink_to(outside)
    (data / "spool" / "file").symlink_to(outside / "passwd")
    (data / "tls" / "deep").mkdir()
    (data / "tls" / "deep" / "link").symlink_to(outside)
    # A root-owned Maildir reached through a link in place of mail/bob.
    shutil.move(data / "mail" / "bob", world / "bob-moved")
    (data / "mail" / "bob").symlink_to(outside)
    # Everything root's again, as after a run without server.user.
    for p in [data, *data.rglob("*")]:
        os.lchown(p, 0, 0)
    srv.config["mailbox"] = {"owner": store.pw_name}
    srv.config_path.write_text(to_toml(srv.config))
    srv.start()
    try:
        assert (data / "spool").stat().st_uid == server.pw_uid
        assert (data / "tls" / "deep").stat().st_uid == server.pw_uid
        for p in [outside, *outside.rglob("*")]:
            assert p.lstat().st_uid == 0 and p.lstat().st_gid == 0, p
        assert "server.hand_over_skipped" in srv.stderr()
    finally:
        srv.stop()


def test_root_run_commands_leave_their_files_to_server_user(accounts, world):
    server, _store = accounts
    srv = _server(world, {"server": {"user": server.pw_name}})
    res = subprocess.run(
        [str(TERN_BIN), "user", "add", "alice", "--address", "alice@example.test",
         "--config", str(srv.config_path)],
        input=b"a long enough password\n", capture_output=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    users = srv.data_dir / "users.toml"
    assert users.stat().st_uid == server.pw_uid and stat.S_IMODE(users.stat().st_mode) == 0o600
    res = subprocess.run(
        [str(TERN_BIN), "dkim", "generate", "example.test", "--config", str(srv.config_path)],
        capture_output=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    keys = list((srv.data_dir / "dkim").rglob("*"))
    assert keys and all(p.stat().st_uid == server.pw_uid for p in keys), keys
    assert stat.S_IMODE(srv.data_dir.stat().st_mode) == 0o700
    # The dropped server opens both, and its data folder gets its usual mode.
    srv.start()
    try:
        assert "dkim.key" in srv.stderr()
        assert _owner_mode(srv.data_dir) == (server.pw_name, server.pw_name, 0o711)
    finally:
        srv.stop()


# ----------------------------------------------------------------- bad input


def _check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TERN_BIN), "check-config", str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("overrides, expected", [
    ({"server": {"user": "no-such-tern-user"}}, 'server.user: no such user "no-such-tern-user"'),
    ({"server": {"user": "root", "group": "no-such-tern-group"}},
     'server.group: no such group "no-such-tern-group"'),
    ({"mailbox": {"owner": "no-such-tern-owner"}}, 'mailbox.owner: no such user "no-such-tern-owner"'),
])
def test_accounts_that_do_not_exist_are_named_at_start_and_by_check_config(world, overrides, expected):
    srv = _server(world, overrides)
    with pytest.raises(TernStartError) as failed:
        srv.start()
    assert expected in str(failed.value)
    res = _check_config(srv.config_path)
    assert res.returncode == 1 and expected in res.stderr, res.stderr


def test_a_users_mailbox_owner_that_does_not_exist_is_named(world):
    cfg = default_config(world / "data")
    cfg["user"][1]["owner"] = "no-such-tern-owner"
    path = world / "tern.toml"
    path.write_text(to_toml(cfg))
    res = _check_config(path)
    assert res.returncode == 1
    assert 'user[1].owner: no such user "no-such-tern-owner"' in res.stderr, res.stderr


def _as_user(user: pwd.struct_passwd, *args: str) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "--inh-caps=-all", *args]


def test_unprivileged_start_runs_as_itself_and_refuses_what_it_cannot_do(accounts, world):
    server, store = accounts
    srv = _server(world, {})
    shutil.chown(srv.workdir, server.pw_name, server.pw_name)
    # Another owner for the mailboxes, and no way to give files away.
    cfg = dict(srv.config, mailbox={"owner": store.pw_name})
    refused = srv.workdir / "refused.toml"
    refused.write_text(to_toml(cfg))
    res = subprocess.run(_as_user(server, str(TERN_BIN), "serve", "--config", str(refused)),
                         capture_output=True, text=True, timeout=60, cwd=srv.workdir)
    assert res.returncode != 0
    assert "CAP_CHOWN" in res.stderr and "server.user" in res.stderr, res.stderr
    assert not (srv.data_dir / "spool").exists()
    # Without it, it simply runs as the user that started it.
    proc = subprocess.Popen(_as_user(server, str(TERN_BIN), "serve", "--config", str(srv.config_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=srv.workdir)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.decode())
            if line.strip() == b"ready":
                break
        assert lines and lines[-1].strip() == "ready", (lines, proc.stderr.read() if proc.poll() else "")
        st = _status(proc.pid)
        assert st["Uid"].split() == [str(server.pw_uid)] * 4
        assert int(st["CapPrm"], 16) == 0, st
        assert srv.data_dir.stat().st_uid == server.pw_uid
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_units_capability_bounding_set_is_enough(accounts, world):
    # systemd is not running here, so the unit's limits are applied by hand:
    # its CapabilityBoundingSet= (without CAP_SETPCAP tern cannot cut the
    # bounding set itself) and NoNewPrivileges=. Root under them must still
    # bind, hand its folders over, drop, and give mail to the store user.
    from test_service import UNIT, _settings

    server, store = accounts
    bounding = _settings(UNIT.read_text())["CapabilityBoundingSet"].split()
    allowed = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in bounding])
    srv = _server(world, {
        "server": {"user": server.pw_name},
        "mailbox": {"owner": store.pw_name},
    })
    err = open(srv.stderr_path, "wb")
    proc = subprocess.Popen(
        ["setpriv", f"--bounding-set={allowed}", "--no-new-privs",
         str(TERN_BIN), "serve", "--config", str(srv.config_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=srv.workdir,
    )
    err.close()
    try:
        port = None
        for line in proc.stdout:
            text = line.decode().strip()
            if text.startswith("listening on "):
                port = int(text.split()[2].rpartition(":")[2])
            if text == "ready":
                break
        assert port, srv.stderr()
        st = _status(proc.pid)
        assert st["Uid"].split() == [str(server.pw_uid)] * 4, srv.stderr()
        assert int(st["CapPrm"], 16) == 0 and int(st["CapEff"], 16) == 0, st
        _only_delivery_holds_the_mailbox_caps(proc.pid)
        assert st["NoNewPrivs"] == "1"
        srv.listeners = [("127.0.0.1", port, "mx")]
        _send(srv, "alice@example.test", b"Subject: unit\r\n\r\nunder the unit's limits\r\n")
        srv.wait_for_mail("alice")
        (path,) = srv.mail_files("alice")
        assert path.stat().st_uid == store.pw_uid
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_a_reload_after_the_drop_keeps_root_only_keys_and_applies_the_rest(accounts, world):
    """The unit's setup: a private key only root may read, loaded before the
    drop. SIGHUP (now running as server.user) cannot read it again: the
    loaded certificate stays and the rest of the new config applies."""
    server, _store = accounts
    keys = world / "keys"
    keys.mkdir(mode=0o700)
    cert, key = keys / "cert.pem", keys / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=mx.test.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = _server(world, {"server": {"user": server.pw_name},
                          "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]}}).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.mail("sender@remote.test")[0] == 250
            assert c.rcpt("dave@example.test")[0] == 550
        users = srv.config["user"] + [{"name": "dave", "addresses": ["dave@example.test"]}]
        srv.config = deep_merge(srv.config, {"user": users})
        srv.config_path.write_text(to_toml(srv.config), encoding="utf-8")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config.reloaded" in srv.stderr(), 15, what="the reload")
        assert "tls.reload_kept" in srv.stderr()
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.starttls()[0] == 220  # the certificate loaded at start-up
            c.ehlo("client.test")
            assert c.mail("sender@remote.test")[0] == 250
            assert c.rcpt("dave@example.test")[0] == 250
    finally:
        srv.stop()
