"""DKIM: keys made by `tern dkim generate`, messages signed by Tern's signer,
verified by an independent implementation.

The signer runs as `target/debug/examples/dkim-sign CONFIG DOMAIN` (built by
scripts/test.sh): the same `Signers::from_config` the server uses, so the keys
are the ones the config finds under <data_dir>/dkim. The verifier is
Debian's dkimpy (python3-dkim) under /usr/bin/python3, given the public keys
through its `dnsfunc` hook from the very records `tern dkim generate` or
`tern dns-records` printed (tests/integration/dkim_verify.py), or through the
suite's test DNS server.

Not here yet: signing inside a running server (the session does not call the
signer yet). `verify_with_dns` and `test_dns_zone` are ready for that test:
relay to a sink, then verify the received message against test-dns.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from testdns import DnsServer
from ternlib import REPO_ROOT, TERN_BIN, Tern

DKIM_SIGN_BIN = Path(
    os.environ.get("TERN_DKIM_SIGN_BIN", REPO_ROOT / "target" / "debug" / "examples" / "dkim-sign")
)
# dkimpy is installed for Debian's interpreter, which may not be the one
# running pytest (a pyenv python3 often comes first on PATH).
DEBIAN_PYTHON = "/usr/bin/python3"
VERIFY = Path(__file__).resolve().parent / "dkim_verify.py"

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@remote.example>\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q4.1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)

# Folded fields, tabs, runs of spaces, trailing white space, a field name in
# capitals, repeated Cc, and empty lines at the end of the body: what relaxed
# canonicalization has to get right.
ODD_MESSAGE = (
    b"FROM:   \"Alice  Example\"\r\n  <alice@example.test>  \r\n"
    b"Subject:\tfolded\r\n\tover   three\r\n lines\t\r\n"
    b"to: bob@remote.example\r\n"
    b"Cc: a@remote.example\r\n"
    b"Cc:    b@remote.example\r\n"
    b"Reply-To: <replies@example.test>\r\n"
    b"\r\n"
    b"  leading spaces\t and  tabs \t\r\n"
    b"\r\n"
    b"trailing empty lines follow \r\n"
    b"\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def dkimpy():
    """Debian's dkimpy, installed when missing (scripts/test.sh installs it
    too; this keeps a lone `pytest tests/integration/test_dkim.py` working)."""
    return dkimpy_available()


def dkimpy_available() -> str:
    """The interpreter that has dkimpy, installing python3-dkim if needed."""
    probe = [DEBIAN_PYTHON, "-c", "import dkim, nacl, dns.resolver"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        assert os.geteuid() == 0, "python3-dkim is missing and only root can install it"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdin=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3-dkim"],
                       check=True, env=env, stdin=subprocess.DEVNULL)
    assert subprocess.run(probe, capture_output=True).returncode == 0, "dkimpy not importable"
    return DEBIAN_PYTHON


def tern_cli(srv: Tern, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TERN_BIN), *args, "--config", str(srv.config_path)],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def generate(srv: Tern, domain: str = "example.test", *args: str) -> str:
    """`tern dkim generate`; returns the zone text it printed."""
    res = tern_cli(srv, "dkim", "generate", domain, *args)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res.stdout.decode()


def sign(srv: Tern, message: bytes, domain: str = "example.test") -> bytes:
    assert DKIM_SIGN_BIN.exists(), f"{DKIM_SIGN_BIN} missing (cargo build -p tern --example dkim-sign)"
    res = subprocess.run([str(DKIM_SIGN_BIN), str(srv.config_path), domain], input=message,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert res.stdout.endswith(message)
    return res.stdout


def _verify(python: str, tmp_path: Path, mode: str, source: str, message: bytes) -> list[dict]:
    msg_file = tmp_path / f"signed-{len(list(tmp_path.glob('signed-*')))}.eml"
    msg_file.write_bytes(message)
    res = subprocess.run([python, str(VERIFY), mode, source, str(msg_file)],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return [json.loads(line) for line in res.stdout.decode().splitlines()]


def verify(python: str, tmp_path: Path, zone: str, message: bytes) -> list[dict]:
    """dkimpy's verdict on each signature, keys taken from `zone` text."""
    zone_file = tmp_path / f"zone-{len(list(tmp_path.glob('zone-*')))}.txt"
    zone_file.write_text(zone)
    return _verify(python, tmp_path, "--zone", str(zone_file), message)


def verify_with_dns(python: str, tmp_path: Path, dns_addr: str, message: bytes) -> list[dict]:
    """dkimpy's verdict on each signature, keys asked from a name server."""
    return _verify(python, tmp_path, "--dns", dns_addr, message)


def test_dns_zone(zone: str) -> str:
    """Zone text as tern prints it -> entries for the suite's test-dns
    (`NAME TXT text`), so a test can serve the DKIM keys it generated."""
    out = []
    for line in zone.splitlines():
        m = re.match(r'^(\S+)\s+IN\s+TXT\s+(.*)$', line)
        if m:
            text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(2)))
            out.append(f"{m.group(1)} TXT {text}")
    return "\n".join(out) + "\n"


test_dns_zone.__test__ = False  # a helper, not a test


def verdicts(results: list[dict]) -> list[tuple[str, bool]]:
    return [(r["a"], r["ok"]) for r in results]


def test_rsa_and_ed25519_signatures_verify_with_dkimpy(tmp_path, dkimpy):
    srv = Tern(tmp_path)
    zone = generate(srv)
    assert len([l for l in zone.splitlines() if " IN TXT " in l]) == 2
    signed = sign(srv, MESSAGE)
    results = verify(dkimpy, tmp_path, zone, signed)
    assert verdicts(results) == [("rsa-sha256", True), ("ed25519-sha256", True)], results
    assert {r["d"] for r in results} == {"example.test"}
    # The RSA record is longer than one 255-octet string and was split.
    rsa_line = next(l for l in zone.splitlines() if "k=rsa" in l)
    assert rsa_line.count('"') == 4, rsa_line


@pytest.mark.parametrize("algorithm,expected", [("rsa", "rsa-sha256"), ("ed25519", "ed25519-sha256")])
def test_one_algorithm_with_a_chosen_selector(tmp_path, dkimpy, algorithm, expected):
    srv = Tern(tmp_path)
    zone = generate(srv, "example.test", "--algorithm", algorithm, "--selector", "s1")
    assert zone.count("s1._domainkey.example.test. IN TXT") == 1, zone
    results = verify(dkimpy, tmp_path, zone, sign(srv, MESSAGE))
    assert verdicts(results) == [(expected, True)], results
    assert results[0]["s"] == "s1"


def test_odd_white_space_and_folding_verify_and_survive_relaxed_changes(tmp_path, dkimpy):
    srv = Tern(tmp_path)
    zone = generate(srv)
    signed = sign(srv, ODD_MESSAGE)
    assert verdicts(verify(dkimpy, tmp_path, zone, signed)) == [("rsa-sha256", True), ("ed25519-sha256", True)]
    # What relays may do in transit, and relaxed canonicalization forgives:
    # re-fold a field, change white space runs and field-name case, add
    # trailing empty lines.
    changed = (signed.replace(b"to: bob@remote.example", b"To:\r\n bob@remote.example   ")
               .replace(b"and  tabs", b"and \t tabs"))
    changed += b"\r\n\r\n"
    assert changed != signed
    assert verdicts(verify(dkimpy, tmp_path, zone, changed)) == [("rsa-sha256", True), ("ed25519-sha256", True)]


def test_tampered_messages_fail(tmp_path, dkimpy):
    srv = Tern(tmp_path)
    zone = generate(srv)
    signed = sign(srv, MESSAGE)
    both_fail = [("rsa-sha256", False), ("ed25519-sha256", False)]
    body = signed.replace(b"are attached", b"are not attached")
    assert verdicts(verify(dkimpy, tmp_path, zone, body)) == both_fail
    subject = signed.replace(b"Quarterly numbers", b"Quarterly numbers!!")
    assert verdicts(verify(dkimpy, tmp_path, zone, subject)) == both_fail
    # A second From: above the signed one: over-signing listed From once
    # more than the message had it, so the verifier takes the added one.
    second_from = signed.replace(b"From: Alice", b"From: CEO <ceo@example.test>\r\nFrom: Alice", 1)
    assert verdicts(verify(dkimpy, tmp_path, zone, second_from)) == both_fail
    # A relay adding its Received: field breaks nothing.
    received = b"Received: from mx.example.test by mx.remote.example; Sun, 6 Dec 2026\r\n" + signed
    assert verdicts(verify(dkimpy, tmp_path, zone, received)) == [("rsa-sha256", True), ("ed25519-sha256", True)]


def test_dns_records_print_every_record_and_the_keys_that_verify(tmp_path, dkimpy):
    srv = Tern(tmp_path)
    generate(srv)
    res = tern_cli(srv, "dns-records", "example.test")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    records = res.stdout.decode()
    names = [l.split()[0] for l in records.splitlines() if l and not l.startswith(";")]
    assert names[0:2] == ["example.test.", "example.test."]
    assert "example.test. IN MX 10 mx.test.example." in records
    assert 'example.test. IN TXT "v=spf1 mx -all"' in records
    assert sum(1 for n in names if n.endswith("._domainkey.example.test.")) == 2
    for prefix in ("_dmarc.example.test.", "_mta-sts.example.test.", "_smtp._tls.example.test."):
        assert prefix in names, names
    assert records.count("; PLACEHOLDER") == 3
    # The DKIM records dns-records prints are the keys the signer uses.
    results = verify(dkimpy, tmp_path, records, sign(srv, MESSAGE))
    assert verdicts(results) == [("rsa-sha256", True), ("ed25519-sha256", True)]
    # A domain without keys says how to make them.
    res = tern_cli(srv, "dns-records", "nokeys.test")
    assert res.returncode == 0
    assert "tern dkim generate nokeys.test" in res.stdout.decode()


def test_keys_served_by_the_test_dns_server_verify(tmp_path, dkimpy):
    """The way the end-to-end test will find the keys: over DNS."""
    srv = Tern(tmp_path)
    zone = generate(srv)
    with DnsServer(tmp_path, test_dns_zone(zone)) as dns:
        results = verify_with_dns(dkimpy, tmp_path, dns.addr, sign(srv, MESSAGE))
    assert verdicts(results) == [("rsa-sha256", True), ("ed25519-sha256", True)], results


def test_generate_writes_private_files_and_refuses_to_overwrite(tmp_path):
    srv = Tern(tmp_path)
    generate(srv, "example.test", "--selector", "s1")
    folder = srv.data_dir / "dkim" / "example.test"
    keys = sorted(p.name for p in folder.iterdir())
    assert keys == ["s1-ed25519.key", "s1-rsa.key"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    for path in (folder, folder.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    before = (folder / "s1-rsa.key").read_bytes()
    res = tern_cli(srv, "dkim", "generate", "example.test", "--selector", "s1")
    assert res.returncode == 1
    assert b"s1-rsa.key exists" in res.stderr and b"--force" in res.stderr
    assert (folder / "s1-rsa.key").read_bytes() == before
    res = tern_cli(srv, "dkim", "generate", "example.test", "--selector", "s1-rsa", "--algorithm", "rsa",
                   "--force")
    assert res.returncode == 0, res.stderr
    assert (folder / "s1-rsa.key").read_bytes() != before


def test_check_config_names_a_bad_key_and_the_server_starts_with_good_ones(tmp_path, tern):
    srv = tern(start=False)
    generate(srv)
    res = subprocess.run([str(TERN_BIN), "check-config", str(srv.config_path)], capture_output=True)
    assert res.returncode == 0, res.stderr
    bad = srv.data_dir / "dkim" / "example.test" / "broken.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    res = subprocess.run([str(TERN_BIN), "check-config", str(srv.config_path)], capture_output=True)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "DKIM key broken for example.test" in err and str(bad) in err, err
    bad.unlink()
    srv.start()
