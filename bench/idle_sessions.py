#!/usr/bin/env python3
"""Open N SMTP sessions, read each greeting, send EHLO, then hold them all open (idle).

Used by bench/run.sh to measure memory per idle session. Protocol: once every session that could
be opened is past its EHLO reply, print `open=<count>` and `failed=<count>` on stdout and flush, then
hold until stdin reaches EOF (run.sh closes it after reading PSS), then close everything.

Invariants: at most --parallel handshakes are in flight at once, so a server that spawns a
process per connection (Postfix) is not flooded past its listen backlog; each handshake has a
deadline (--timeout), and the whole opening phase has one too (--total-timeout), so this never
hangs. It does not send mail and does not retry a failed connection.
Errors: a connection that fails, times out or gets a non-2xx reply counts as failed, not fatal.
"""

import argparse
import asyncio
import resource
import sys


async def handshake(host, port, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        greeting = await asyncio.wait_for(read_reply(reader), timeout)
        if not greeting.startswith("2"):
            raise ConnectionError(f"greeting {greeting!r}")
        writer.write(b"EHLO idle.bench.test\r\n")
        await writer.drain()
        ehlo = await asyncio.wait_for(read_reply(reader), timeout)
        if not ehlo.startswith("2"):
            raise ConnectionError(f"EHLO reply {ehlo!r}")
    except BaseException:
        writer.close()
        raise
    return writer


async def read_reply(reader):
    """Read one (possibly multi-line, RFC 5321 section 4.2.1) reply; return its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by server")
        text = line.decode("latin-1")
        if len(text) < 4 or text[3] != "-":
            return text


async def main_async(args):
    sem = asyncio.Semaphore(args.parallel)
    writers, failures = [], []

    async def one():
        async with sem:
            try:
                writers.append(await handshake(args.host, args.port, args.timeout))
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                failures.append(str(e) or type(e).__name__)

    tasks = [asyncio.create_task(one()) for _ in range(args.count)]
    done, pending = await asyncio.wait(tasks, timeout=args.total_timeout)
    for t in pending:
        t.cancel()
    failures.extend(["not opened before the total deadline"] * len(pending))
    if failures:
        print(f"idle_sessions: first failure: {failures[0]}", file=sys.stderr)
    print(f"open={len(writers)}", flush=True)
    print(f"failed={len(failures)}", flush=True)
    # Hold until run.sh closes our stdin; reading it in a thread keeps the loop free.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--parallel", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--total-timeout", type=float, default=180.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 100
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
