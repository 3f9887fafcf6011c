"""The loopback DNS server the outbound tests use answers as its zone says."""

import socket

import pytest

from testdns import (
    AAAA,
    MX,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    A,
    DnsServer,
    query,
)

ZONE = """
# comments and blank lines are fine
example.test        MX 10 mx1.example.test
example.test        MX 20 mx2.example.test
nullmx.test         MX 0 .
mx1.example.test    A 127.0.0.2
mx2.example.test    AAAA ::1
alias.example.test  CNAME mx1.example.test
broken.test         SERVFAIL
closed.test         REFUSED
slow.test           TIMEOUT
"""


def test_answers_records_errors_and_nodata(tmp_path):
    with DnsServer(tmp_path, ZONE) as dns:
        assert dns.addr.startswith("127.0.0.1:")
        assert query(dns.addr, "example.test", MX) == (NOERROR, 2)
        assert query(dns.addr, "nullmx.test", MX) == (NOERROR, 1)
        assert query(dns.addr, "MX1.example.test", A) == (NOERROR, 1)
        assert query(dns.addr, "mx2.example.test", AAAA) == (NOERROR, 1)
        # CNAME plus the target's address.
        assert query(dns.addr, "alias.example.test", A) == (NOERROR, 2)
        # NODATA: the name exists, no record of that type.
        assert query(dns.addr, "mx1.example.test", MX) == (NOERROR, 0)
        assert query(dns.addr, "nowhere.test", MX) == (NXDOMAIN, 0)
        assert query(dns.addr, "broken.test", MX) == (SERVFAIL, 0)
        assert query(dns.addr, "closed.test", A) == (REFUSED, 0)
        with pytest.raises(socket.timeout):
            query(dns.addr, "slow.test", MX, timeout=0.5)


def test_exits_when_stdin_closes_and_rejects_a_bad_zone(tmp_path):
    dns = DnsServer(tmp_path, ZONE).start()
    proc = dns.proc
    dns.stop()
    assert proc.returncode == 0

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(Exception) as err:
        DnsServer(bad, "example.test MX ten mx.example.test\n").start()
    assert "line 1" in str(err.value)
