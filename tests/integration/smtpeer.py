"""A scripted SMTP/LMTP server for the outbound tests: the receiving peer.

    peer = Peer("127.0.0.2", port).start()      # or Peer(..., lmtp=True)
    peer.rcpt_replies["bad@remote.test"] = "550 5.1.1 no such user"
    peer.fail_transactions = (2, "451 4.3.0 try again")
    ...
    txs = peer.wait_for(1, timeout=15)          # list of Transaction
    peer.stop()

It speaks ESMTP with PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
ENHANCEDSTATUSCODES, CHUNKING (BDAT) and DSN; STARTTLS when given a
certificate (`make_cert`), AUTH PLAIN/LOGIN when given credentials. Each
accepted transaction is recorded (`Transaction`) with its data exactly as
unstuffed. Rules (plain attributes, set before the client connects):
  greeting               the 220 line (a 4xx/5xx one is sent, then close)
  fail_connections       (n, reply): the first n connections get `reply` as
                         greeting and are closed
  fail_transactions      (n, reply): the first n transactions get `reply` at
                         the end of data (a 421 also closes the connection)
  cut_data               n: the first n transactions are cut (connection
                         closed) in the middle of their content; or a set
                         of transaction numbers (1-based) to cut
  rcpt_replies           {address: reply} at RCPT
  lmtp_replies           {address: reply} after data, LMTP mode
  data_delay             seconds before the reply to the end of data
  max_rcpts              recipients per transaction; beyond: 452 4.5.3
  extensions             the EHLO keywords offered (default EXTENSIONS)
  on_transaction         callable(tx) -> reply or None (None: the default)

Invariants: one thread per connection, every shared state under one lock;
`wait_for` polls with a deadline. Binds the address it is given only.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

EXTENSIONS = ["PIPELINING", "SIZE 104857600", "8BITMIME", "SMTPUTF8",
              "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]


def make_cert(workdir: Path, name: str) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for `name` signed by it:
    (cert, key, ca_cert). Peer takes (cert, key); Tern's tls_ca_file the CA."""
    d = Path(workdir)
    ca, ca_key = d / f"{name}-ca.crt", d / f"{name}-ca.key"
    cert, key, csr, ext = d / f"{name}.crt", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-days", "2", "-keyout", str(ca_key), "-out", str(ca),
        "-subj", f"/CN=Test CA for {name}")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key, ca


@dataclass
class Transaction:
    conn: int                       # 1-based connection number on this peer
    helo: str = ""
    mail_from: str = ""
    mail_params: list[str] = field(default_factory=list)
    rcpts: list[tuple[str, list[str]]] = field(default_factory=list)  # accepted ones
    data: bytes = b""
    tls: bool = False
    auth: str | None = None
    bdat: bool = False
    delivered: list[str] = field(default_factory=list)  # LMTP: accepted after data

    @property
    def rcpt_addresses(self) -> list[str]:
        return [a for a, _ in self.rcpts]


class _Closed(Exception):
    pass


class _Conn:
    """Buffered line/byte reader over a (possibly TLS-wrapped) socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed()
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > 1 << 20:
                raise _Closed()
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, *replies: str) -> None:
        self.sock.sendall("".join(r + "\r\n" for r in replies).encode("utf-8"))


class Peer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, lmtp: bool = False,
                 cert: tuple[Path, ...] | None = None, auth: tuple[str, str] | None = None,
                 name: str = "peer.test"):
        self.host, self.port, self.lmtp, self.name = host, port, lmtp, name
        self.auth_credentials = auth
        self.tls_context = None
        if cert is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.greeting = f"220 {name} ESMTP scripted peer"
        self.fail_connections: tuple[int, str] = (0, "")
        self.fail_transactions: tuple[int, str] = (0, "")
        self.cut_data: int | set[int] = 0
        self.rcpt_replies: dict[str, str] = {}
        self.lmtp_replies: dict[str, str] = {}
        self.data_delay = 0.0
        self.max_rcpts = 1000
        self.extensions = list(EXTENSIONS)
        self.on_transaction = None
        self.lock = threading.Lock()
        self.connections = 0
        self.transactions: list[Transaction] = []  # accepted ones
        self.attempts = 0  # transactions whose content started (cut ones included)
        self.failed = 0  # transactions refused by fail_transactions
        self.commands: list[str] = []
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._stopping = threading.Event()

    # -- lifecycle

    def start(self) -> "Peer":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "Peer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- results (thread-safe)

    def received(self) -> list[Transaction]:
        with self.lock:
            return list(self.transactions)

    def wait_for(self, n: int, timeout: float = 15.0) -> list[Transaction]:
        """Polls until at least `n` transactions were accepted; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= n:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"peer {self.host}:{self.port}: {len(got)} of {n} "
                                     f"transaction(s) after {timeout}s; commands: "
                                     f"{self.commands[-20:]!r}")
            time.sleep(0.02)

    # -- serving

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            # Replies to a pipelined group go out one by one: without this,
            # Nagle and delayed ACKs add 40 ms to every transaction.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                number = self.connections
                self._socks.add(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn = _Conn(sock)
        try:
            self._session(conn, number)
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            with self.lock:
                self._socks.discard(sock)
            try:
                conn.sock.close()
            except OSError:
                pass

    def _log(self, line: str) -> None:
        with self.lock:
            self.commands.append(line)

    def _session(self, conn: _Conn, number: int) -> None:
        n, reply = self.fail_connections
        if number <= n:
            conn.send(reply)
            return
        conn.send(self.greeting)
        if not self.greeting.startswith("2"):
            return
        tls, auth, helo = False, None, ""
        tx: Transaction | None = None
        while True:
            raw = conn.line()
            text = raw.decode("utf-8", errors="replace")
            self._log(text if not text.upper().startswith("AUTH") else "AUTH ...")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "LHLO") if self.lmtp else verb in ("EHLO", "HELO"):
                helo, tx = arg, None
                exts = list(self.extensions)
                if self.tls_context is not None and not tls:
                    exts.append("STARTTLS")
                if self.auth_credentials is not None:
                    exts.append("AUTH PLAIN LOGIN")
                lines = [self.name] + exts
                conn.send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
            elif verb == "STARTTLS" and self.tls_context is not None and not tls:
                conn.send("220 2.0.0 go ahead")
                conn.sock = self.tls_context.wrap_socket(conn.sock, server_side=True)
                conn.buf, tls, helo, tx = b"", True, "", None
            elif verb == "AUTH" and self.auth_credentials is not None:
                auth = self._auth(conn, arg) or auth
            elif verb == "MAIL":
                words = arg.split(" ")
                tx = Transaction(conn=number, helo=helo, tls=tls, auth=auth,
                                 mail_from=_path(words[0]), mail_params=words[1:])
                conn.send("250 2.1.0 ok")
            elif verb == "RCPT" and tx is not None:
                words = arg.split(" ")
                address = _path(words[0])
                reply = self.rcpt_replies.get(address.lower(), "250 2.1.5 ok")
                if len(tx.rcpts) >= self.max_rcpts:
                    reply = "452 4.5.3 too many recipients"
                if reply.startswith("2"):
                    tx.rcpts.append((address, words[1:]))
                conn.send(reply)
            elif verb == "DATA" and tx is not None and tx.rcpts:
                conn.send("354 go ahead")
                tx.data = self._read_data(conn, tx)
                self._end_of_data(conn, tx)
                tx = None
            elif verb == "BDAT" and "CHUNKING" in self.extensions and tx is not None and tx.rcpts:
                size, _, last = arg.partition(" ")
                if self._cut(conn, tx):
                    return
                tx.bdat = True
                tx.data += conn.exactly(int(size))
                if last.upper() == "LAST":
                    self._end_of_data(conn, tx)
                    tx = None
                else:
                    conn.send(f"250 2.0.0 {size} octets")
            elif verb == "RSET":
                tx = None
                conn.send("250 2.0.0 ok")
            elif verb == "NOOP":
                conn.send("250 2.0.0 ok")
            elif verb == "QUIT":
                conn.send("221 2.0.0 bye")
                return
            else:
                conn.send("503 5.5.1 bad sequence of commands")

    def _auth(self, conn: _Conn, arg: str) -> str | None:
        mech, _, initial = arg.partition(" ")
        user, password = self.auth_credentials
        if mech.upper() == "PLAIN":
            if not initial:
                conn.send("334 ")
                initial = conn.line().decode()
            given = base64.b64decode(initial).split(b"\0")
            ok = len(given) == 3 and given[1].decode() == user and given[2].decode() == password
        elif mech.upper() == "LOGIN":
            conn.send("334 VXNlcm5hbWU6")
            u = base64.b64decode(conn.line()).decode()
            conn.send("334 UGFzc3dvcmQ6")
            p = base64.b64decode(conn.line()).decode()
            ok = (u, p) == (user, password)
        else:
            conn.send("504 5.5.4 unknown mechanism")
            return None
        conn.send("235 2.7.0 ok" if ok else "535 5.7.8 bad credentials")
        return user if ok else None

    def _cut(self, conn: _Conn, tx: Transaction) -> bool:
        """Counts an attempt; True (and the socket shut) when it is to be cut."""
        with self.lock:
            self.attempts += 1
            cut = (self.attempts in self.cut_data if isinstance(self.cut_data, set)
                   else self.attempts <= self.cut_data)
        if cut:
            conn.exactly(1)  # some content has arrived: cut in its middle
            conn.sock.shutdown(socket.SHUT_RDWR)
        return cut

    def _read_data(self, conn: _Conn, tx: Transaction) -> bytes:
        if self._cut(conn, tx):
            raise _Closed()
        lines = []
        while True:
            line = conn.line()
            if line == b".":
                return b"".join(lines)
            lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")

    def _end_of_data(self, conn: _Conn, tx: Transaction) -> None:
        if self.data_delay:
            self._stopping.wait(self.data_delay)
        reply = self.on_transaction(tx) if self.on_transaction else None
        with self.lock:
            n, failure = self.fail_transactions
            if reply is None and self.failed < n:
                self.failed += 1
                reply = failure
        if self.lmtp:
            replies = [self.lmtp_replies.get(a.lower(), reply or "250 2.0.0 delivered")
                       for a in tx.rcpt_addresses]
            tx.delivered = [a for a, r in zip(tx.rcpt_addresses, replies) if r.startswith("2")]
            if tx.delivered:
                self._record(tx)
            conn.send(*replies)
        else:
            reply = reply or "250 2.0.0 queued"
            if reply.startswith("2"):
                self._record(tx)
            conn.send(reply)
        if reply and reply.startswith("421"):
            raise _Closed()

    def _record(self, tx: Transaction) -> None:
        with self.lock:
            self.transactions.append(tx)


def _path(word: str) -> str:
    """`FROM:<a@b>` or `TO:<a@b>` → `a@b`."""
    _, _, rest = word.partition(":")
    return rest.strip().strip("<>")
