"""Harness for the integration suite: run the real `tern` binary, talk to it.

What it does:
  * `Tern` starts `tern serve --config FILE` with its own temp data_dir and a
    listener on 127.0.0.1:0, parses the `listening on ADDR role=mx` line(s) from
    stdout, waits for `ready` with a deadline, and stops it with SIGTERM (then
    SIGKILL after a deadline).
  * `Raw` is a tiny line-oriented SMTP client over a plain socket, for the
    protocol-level tests (pipelining, BDAT, smuggling, limits) where smtplib
    would "help" by fixing our bytes.
  * `to_toml` writes the small TOML subset the config needs.

Invariants: never sleeps to wait for something; everything polls with a
deadline (`wait_until`). All traffic goes to 127.0.0.1 only.

What it does not do: it does not build the binary (scripts/test.sh does) and
it never skips a test because something is missing: a missing binary or
peer is an error.

Errors: start-up failures raise `TernStartError` with the server's stderr.
"""

from __future__ import annotations

import copy
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TERN_BIN = Path(os.environ.get("TERN_BIN", REPO_ROOT / "target" / "debug" / "tern"))
if not TERN_BIN.is_absolute():
    TERN_BIN = REPO_ROOT / TERN_BIN

HOSTNAME = "mx.test.example"
START_TIMEOUT = 20.0  # a debug build on a busy 2-core box can be slow to start
STOP_TIMEOUT = 10.0

LISTEN_RE = re.compile(r"^listening on (\S+) role=(\S+)\s*$")
QUEUED_RE = re.compile(r"queued as\s+<?([A-Za-z0-9._\-]+)>?")


class TernStartError(RuntimeError):
    pass


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Poll `pred()` until it returns a truthy value or `timeout` passes.

    Returns the truthy value. The short poll interval is a poll, not a wait
    for an event: the deadline is what bounds the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------- config


def default_config(data_dir: Path) -> dict:
    return {
        "hostname": HOSTNAME,
        "data_dir": str(data_dir),
        "listener": [{"address": "127.0.0.1:0", "role": "mx"}],
        "local": {
            "domains": ["example.test", "localhost"],
            "subaddress_separator": "+",
            "postmaster": "alice",
        },
        "user": [
            {"name": "alice", "addresses": ["alice@example.test"]},
            {"name": "bob", "addresses": ["bob@example.test"]},
            {"name": "carol", "addresses": ["carol@example.test"]},
            {"name": "jorg", "addresses": ["jörg@example.test"]},
        ],
        "aliases": {
            # one -> many, with alice twice (by name and by address): collapsed.
            "team@example.test": ["alice", "bob@example.test", "alice@example.test"],
        },
        "relay": {"trusted_networks": []},
        # No test mail leaves loopback: remote recipients go to a relay that
        # nobody listens on (they stay deferred) unless a test routes them.
        "route": {"relay": "[127.0.0.1]:1"},
        "limits": {"greeting_delay": "0s"},
        "log": {"level": "info", "format": "text"},
    }


def deep_merge(base: dict, over: dict) -> dict:
    """Merge `over` into a copy of `base`: dicts merge, anything else replaces.
    A value of None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else _toml_value(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: dict) -> str:
    """Top-level scalars first, then [tables] (nested dicts inline), then
    [[arrays of tables]] (lists of dicts)."""
    lines, tables, arrays = [], [], []
    for key, value in cfg.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{_toml_key(key)}]")
        for k, v in table.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for key, items in arrays:
        for item in items:
            lines.append(f"\n[[{_toml_key(key)}]]")
            for k, v in item.items():
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- server


class Tern:
    """One `tern serve` process over one data_dir (restartable on it)."""

    def __init__(self, workdir: Path, overrides: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config = deep_merge(default_config(self.data_dir), overrides or {})
        self.config_path = self.workdir / "tern.toml"
        self.config_path.write_text(to_toml(self.config), encoding="utf-8")
        self.proc: subprocess.Popen | None = None
        # Words put in front of the command line, e.g. ["prlimit",
        # "--fsize=1048576", "--"] to start the server under a limit.
        self.launcher: list[str] = []
        self.listeners: list[tuple[str, int, str]] = []
        self.starts = 0
        self._stdout_lines: queue.Queue = queue.Queue()

    # -- lifecycle

    @property
    def port(self) -> int:
        return self.listeners[0][1]

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"stderr.{self.starts}.log"

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> "Tern":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not TERN_BIN.exists():
            raise TernStartError(f"tern binary not found at {TERN_BIN} (cargo build -p tern)")
        self.starts += 1
        self.listeners = []
        self._stdout_lines = queue.Queue()
        err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [*self.launcher, str(TERN_BIN), "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=self.workdir,
        )
        err.close()
        threading.Thread(
            target=_pump_lines, args=(self.proc.stdout, self._stdout_lines), daemon=True
        ).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise TernStartError(f"no 'ready' within {timeout}s; stderr:\n{self.stderr()}")
            try:
                line = self._stdout_lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                rc = self.proc.wait()
                raise TernStartError(f"tern exited with {rc} before 'ready'; stderr:\n{self.stderr()}")
            m = LISTEN_RE.match(line)
            if m:
                host, _, port = m.group(1).rpartition(":")
                self.listeners.append((host.strip("[]"), int(port), m.group(2)))
            elif line.strip() == "ready":
                break
        if not self.listeners:
            raise TernStartError(f"'ready' without any 'listening on' line; stderr:\n{self.stderr()}")
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash test's weapon."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_after_kill(self) -> "Tern":
        self.kill()
        return self.start()

    # -- mailboxes

    def maildir(self, user: str) -> Path:
        for u in self.config.get("user", []):
            if u.get("name") == user and u.get("maildir"):
                return Path(u["maildir"])
        return self.data_dir / "mail" / user / "Maildir"

    def mail_files(self, user: str) -> list[Path]:
        new = self.maildir(user) / "new"
        try:
            return sorted(p for p in new.iterdir() if p.is_file() and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def mails(self, user: str) -> list[bytes]:
        return [p.read_bytes() for p in self.mail_files(user)]

    def wait_for_mail(self, user: str, n: int = 1, timeout: float = 15.0) -> list[bytes]:
        """Poll Maildir/new until it holds at least `n` files; return their bytes.
        More than `n` is the caller's business to assert."""
        try:
            wait_until(lambda: len(self.mail_files(user)) >= n, timeout, what=f"{n} mail(s) for {user}")
        except AssertionError as e:
            raise AssertionError(f"{e}; have {len(self.mail_files(user))}; stderr tail:\n"
                                 f"{self.stderr()[-3000:]}") from None
        return self.mails(user)

    # -- CLI

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(TERN_BIN), *args, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def queue_list(self) -> str:
        res = self.cli("queue", "list")
        assert res.returncode == 0, f"tern queue list failed: {res.stderr.decode(errors='replace')}"
        return res.stdout.decode("utf-8", errors="replace")

    def queue_show(self, msg_id: str) -> str:
        res = self.cli("queue", "show", msg_id)
        assert res.returncode == 0, f"tern queue show failed: {res.stderr.decode(errors='replace')}"
        return res.stdout.decode("utf-8", errors="replace")

    def connect(self, greet: bool = True, timeout: float = 10.0) -> "Raw":
        raw = Raw(self.port, timeout=timeout)
        if greet:
            raw.expect(220)
        return raw


def _pump_lines(stream, out: queue.Queue) -> None:
    """Drain the server's stdout forever (so it can never block on a full
    pipe); None marks EOF."""
    for raw in iter(stream.readline, b""):
        out.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    out.put(None)


# --------------------------------------------------------------------- raw SMTP


class Reply:
    def __init__(self, code: int, lines: list[str]):
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """RFC 3463 / RFC 2034 enhanced status code of the first line, if any."""
        m = re.match(r"^([245]\.\d{1,3}\.\d{1,3})(\s|$)", self.lines[0] if self.lines else "")
        return m.group(1) if m else None

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class Raw:
    """A plain socket SMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from server within deadline")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def readline(self, timeout: float | None = None) -> bytes | None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\r\n" not in self.buf:
            if not self._fill(deadline):
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self, timeout: float | None = None) -> Reply:
        """One complete (possibly multi-line, RFC 5321 §4.2.1) reply."""
        lines: list[str] = []
        code = None
        while True:
            line = self.readline(timeout)
            if line is None:
                raise ConnectionError(f"connection closed mid-reply (got {lines!r})")
            text = line.decode("utf-8", errors="replace")
            m = re.match(r"^(\d{3})([ -]?)(.*)$", text)
            assert m, f"malformed reply line {text!r}"
            code = int(m.group(1))
            lines.append(m.group(3))
            if m.group(2) != "-":
                return Reply(code, lines)

    def expect(self, code: int, enhanced: str | None = None, timeout: float | None = None) -> Reply:
        r = self.reply(timeout)
        assert r.code == code, f"expected {code}, got {r!r}"
        if enhanced is not None:
            assert r.enhanced == enhanced, f"expected {code} {enhanced}, got {r!r}"
        return r

    def ehlo(self, name: str = "client.test") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within
        `timeout`, with nothing else unread in between."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.buf:
                    return False
                if not self._fill(deadline):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (TimeoutError, socket.timeout):
            return False

    def no_pending_reply(self) -> bool:
        """True when no unread reply bytes are buffered right now."""
        return not self.buf


def ehlo_keywords(reply: Reply) -> dict[str, str]:
    """EHLO reply lines after the first → {KEYWORD: params} (RFC 5321 §4.1.1.1)."""
    out = {}
    for line in reply.lines[1:]:
        key, _, params = line.partition(" ")
        out[key.upper()] = params
    return out


def split_mail(data: bytes) -> tuple[bytes, bytes]:
    """A delivered file → (header block, body). Works for CRLF and LF files."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i], data[i + len(sep):]
    return data, b""


def header_values(data: bytes, name: str) -> list[str]:
    """All values of header `name` (unfolded) in the delivered file's header block."""
    head, _ = split_mail(data)
    text = head.decode("utf-8", errors="replace").replace("\r\n", "\n")
    unfolded = re.sub(r"\n[ \t]+", " ", text)
    prefix = name.lower() + ":"
    return [ln[len(prefix):].strip() for ln in unfolded.split("\n") if ln.lower().startswith(prefix)]


def ends_with_original(delivered: bytes, original: bytes) -> bool:
    """The delivered file ends with the original message bytes, either as sent
    (CRLF) or with every CRLF turned into LF (the usual Maildir convention).
    Exact byte comparison either way."""
    return delivered.endswith(original) or delivered.endswith(original.replace(b"\r\n", b"\n"))


def queued_id(reply: Reply) -> str:
    m = QUEUED_RE.search(reply.text)
    assert m, f"no queue ID in {reply!r}"
    return m.group(1)
