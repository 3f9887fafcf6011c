"""A DNS server on loopback for the integration tests: runs the Rust example
`target/debug/examples/test-dns` (built by scripts/test.sh) on a zone given
as text, so tests that deliver by MX never ask the internet.

Zone format (see crates/tern/src/dns/testserver.rs): one entry a line,
`NAME TYPE DATA`, types A, AAAA, MX, CNAME, and the behaviours SERVFAIL,
REFUSED, TIMEOUT (never answered) and EXISTS (a name without records);
a name with no entry is NXDOMAIN.

    with DnsServer(tmp_path, "example.test MX 10 mx1.example.test\\n"
                             "mx1.example.test A 127.0.0.2\\n") as dns:
        dns.addr        # "127.0.0.1:PORT", for Tern's name server setting
        query(dns.addr, "example.test", MX)   # -> (rcode, answer count)

Invariants: listens on 127.0.0.1 only; the server exits when its standard
input closes, so a test that dies never leaves it running.
Errors: a missing binary or a server that does not report its address in
time raises `DnsStartError` with its stderr.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DNS_BIN = Path(
    os.environ.get("TERN_TEST_DNS_BIN", REPO_ROOT / "target" / "debug" / "examples" / "test-dns")
)
START_TIMEOUT = 10.0

A, NS, CNAME, MX, AAAA = 1, 2, 5, 15, 28
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5


class DnsStartError(RuntimeError):
    pass


class DnsServer:
    def __init__(self, workdir: Path, zone: str, bind: str = "127.0.0.1:0"):
        self.bind = bind  # a fixed "127.0.0.1:PORT" restarts a server on its old port
        self.zone_path = Path(workdir) / "test.zone"
        self.zone_path.write_text(zone)
        self.stderr_path = Path(workdir) / "test-dns.stderr"
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def start(self) -> "DnsServer":
        if not TEST_DNS_BIN.exists():
            raise DnsStartError(
                f"{TEST_DNS_BIN} not found (cargo build -p tern --example test-dns)"
            )
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [str(TEST_DNS_BIN), str(self.zone_path), self.bind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not line or not line[0].strip():
            self.stop()
            raise DnsStartError(f"test-dns did not start: {self.stderr_path.read_text()}")
        self.addr = line[0].decode().strip()
        return self

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def query(addr: str, name: str, qtype: int, timeout: float = 2.0) -> tuple[int, int]:
    """One UDP query; returns (rcode, number of answer records)."""
    host, port = addr.rsplit(":", 1)
    qid = random.randrange(1 << 16)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.strip(".").split("."))
    packet = header + labels + b"\0" + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, int(port)))
        while True:
            reply = s.recv(4096)
            if struct.unpack(">H", reply[:2])[0] == qid:
                break
    flags, _, answers = struct.unpack(">HHH", reply[2:8])
    return flags & 0xF, answers
