"""Tern under a service manager: the shipped systemd unit and the sd_notify
protocol.

  * `systemd-analyze verify` accepts dist/tern.service (checked on a copy whose
    commands point at the binary under test, since /usr/local/bin/tern need
    not exist here), and `systemd-analyze security` rates its hardening;
  * with NOTIFY_SOCKET pointing at a datagram socket this test binds (a path,
    and an abstract '@' address), Tern sends READY=1 only once its listeners
    accept and its spool takes mail, RELOADING=1 then READY=1 around SIGHUP,
    and STOPPING=1 on SIGTERM; a start that fails never says READY=1.
"""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ternlib import REPO_ROOT, TERN_BIN, LISTEN_RE, Tern, wait_until

UNIT = REPO_ROOT / "dist" / "tern.service"
# Hardening the unit must keep: systemd-analyze security's "OK" band ends at 5.
MAX_EXPOSURE = 5.0


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is missing (scripts/test.sh step_deps installs the systemd package)")
    return path


def _unit_for_binary(tmp_path: Path) -> Path:
    """The shipped unit with its commands pointing at the binary under test."""
    text = UNIT.read_text()
    assert "/usr/local/bin/tern " in text
    copy = tmp_path / "tern.service"
    copy.write_text(text.replace("/usr/local/bin/tern ", f"{TERN_BIN.resolve()} "))
    return copy


def _settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_the_unit_verifies_and_is_hardened(tmp_path):
    analyze = _systemd_analyze()
    unit = _unit_for_binary(tmp_path)
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tern.service" not in res.stdout + res.stderr, res.stdout + res.stderr

    settings = _settings(UNIT.read_text())
    assert settings["Type"] == "notify"
    assert settings["ExecStart"] == "/usr/local/bin/tern serve --config /etc/tern/tern.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert "/var/lib/tern" in settings["ReadWritePaths"].split()
    assert settings["PrivateTmp"] == "yes"
    assert set(settings["CapabilityBoundingSet"].split()) == {
        "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE"}
    # Started as root: tern drops to server.user itself.
    assert "User" not in settings

    res = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tern\.service: ([0-9.]+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_verify_names_a_broken_unit(tmp_path):
    # The check above can fail: a unit whose command does not exist is named.
    analyze = _systemd_analyze()
    broken = tmp_path / "tern.service"
    broken.write_text(UNIT.read_text().replace("/usr/local/bin/tern ", f"{tmp_path}/no-such-tern "))
    res = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "no-such-tern" in res.stdout + res.stderr


# ----------------------------------------------------------------- sd_notify


class Manager:
    """The service manager's side: a datagram socket that collects what the
    server says, and the server started with NOTIFY_SOCKET naming it."""

    def __init__(self, tmp_path: Path, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"tern-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)

    def start(self, srv: Tern) -> subprocess.Popen:
        err = open(srv.stderr_path, "wb")
        proc = subprocess.Popen(
            [str(TERN_BIN), "serve", "--config", str(srv.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=srv.workdir,
            env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": self.address},
        )
        err.close()
        return proc

    def next(self, timeout: float = 20.0) -> str | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_after_listeners_accept_then_reloading_and_stopping(tmp_path, abstract):
    manager = Manager(tmp_path, abstract)
    srv = Tern(tmp_path / "tern")
    proc = manager.start(srv)
    try:
        assert manager.next() == "READY=1", srv.stderr()
        # By then the spool was recovered and every accept loop started
        # (logged before the notification; stderr is unbuffered).
        log = srv.stderr()
        assert 'event="spool.recovered"' in log and 'event="listener.start"' in log, log
        # Told ready: the listener accepts and a message is taken at once.
        # Its address was printed before the notification was sent.
        line = proc.stdout.readline().decode().strip()
        m = LISTEN_RE.match(line)
        assert m, line
        port = int(m.group(1).rpartition(":")[2])
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("a@remote.test", ["alice@example.test"], b"Subject: up\r\n\r\nready\r\n")
        assert proc.stdout.readline().strip() == b"ready"

        proc.send_signal(signal.SIGHUP)
        reloading = manager.next()
        assert reloading and reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading
        usec = int(reloading.rpartition("=")[2])
        assert abs(usec / 1e6 - time.monotonic()) < 60
        assert manager.next() == "READY=1"

        proc.send_signal(signal.SIGTERM)
        assert manager.next() == "STOPPING=1"
        assert proc.wait(30) == 0
        assert manager.next(timeout=0.2) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.close()


def test_a_failed_start_never_says_ready(tmp_path):
    manager = Manager(tmp_path, abstract=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    srv = Tern(tmp_path / "tern", {"listener": [{"address": f"127.0.0.1:{busy.getsockname()[1]}"}]})
    proc = manager.start(srv)
    try:
        assert proc.wait(30) != 0
        assert "cannot listen" in srv.stderr()
        assert manager.next(timeout=0.2) is None
    finally:
        busy.close()
        manager.close()


def test_without_a_manager_nothing_is_sent(tern):
    # The ordinary start (no NOTIFY_SOCKET) still comes up and stops cleanly.
    srv = tern()
    wait_until(lambda: srv.proc.poll() is None, 1)
    assert "service.notify_failed" not in srv.stderr()
    assert srv.stop() == 0
    assert "service.notify_failed" not in srv.stderr()
