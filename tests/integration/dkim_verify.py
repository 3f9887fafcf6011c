"""Verifies every DKIM-Signature of a message with dkimpy (Debian's
python3-dkim), an implementation independent of Tern's signer.

Run with Debian's /usr/bin/python3 (where python3-dkim is installed; the
suite's own interpreter may be another one):

    dkim_verify.py --zone ZONE_FILE MESSAGE_FILE
    dkim_verify.py --dns 127.0.0.1:PORT MESSAGE_FILE

--zone: the public keys come from zone text as `tern dkim generate` or
`tern dns-records` prints it (`NAME IN TXT "part" "part"` lines; `;`
comments), handed to dkimpy through its `dnsfunc` hook: no DNS at all.
--dns: dkimpy asks that name server (the suite's test-dns, for the
end-to-end tests through a running server) with dnspython.

Prints one JSON object per signature, top first: index, d, s, a, ok.
Exit status 0 when it could check, whatever the verdicts; 2 on bad usage.
"""

import json
import re
import sys

import dkim

ZONE_LINE = re.compile(r'^(\S+)\s+(?:\d+\s+)?IN\s+TXT\s+(.*)$', re.IGNORECASE)


def read_zone(path):
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            m = ZONE_LINE.match(line)
            if not m:
                continue
            name = m.group(1).rstrip(".").lower()
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(2))
            records[name] = "".join(parts).encode()
    return records


def zone_dnsfunc(records):
    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip(".").lower())

    return lookup


def server_dnsfunc(addr):
    import dns.resolver

    host, _, port = addr.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)

    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout)
        except Exception:
            return None
        for rdata in answer:
            return b"".join(rdata.strings)
        return None

    return lookup


def signature_tags(message, index):
    """d=, s= and a= of the index-th DKIM-Signature, for the report."""
    d = dkim.DKIM(message)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    tags = dkim.util.parse_tag_value(sigs[index])
    return {k: tags.get(k.encode(), b"").decode() for k in ("d", "s", "a")}


def main(argv):
    if len(argv) != 3 or argv[0] not in ("--zone", "--dns"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, source, message_path = argv
    dnsfunc = zone_dnsfunc(read_zone(source)) if mode == "--zone" else server_dnsfunc(source)
    with open(message_path, "rb") as f:
        message = f.read()
    d = dkim.DKIM(message, minkey=1024)
    count = sum(1 for (k, _) in d.headers if k.lower() == b"dkim-signature")
    for index in range(count):
        try:
            ok = bool(dkim.DKIM(message, minkey=1024).verify(idx=index, dnsfunc=dnsfunc))
            error = ""
        except dkim.DKIMException as e:
            ok, error = False, str(e)
        report = {"index": index, "ok": ok, "error": error}
        report.update(signature_tags(message, index))
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
