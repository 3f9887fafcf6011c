#!/usr/bin/env python3
"""Submission load generator for bench/submission.sh: SMTP with STARTTLS and AUTH PLAIN.

smtp-source speaks neither TLS nor AUTH, so this one does; the same code drives Tern and Postfix.
Python asyncio + ssl, spread over --procs worker processes (one event loop each) so that the
client is not the bottleneck on a 2-core machine. Every session is time-bounded (--secs) and
every read has a deadline (--timeout); nothing waits forever.

Modes (each prints `key=value` lines on stdout, notes on stderr, like benchlib.py):
  send    --sessions N sessions, each: connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, then messages
          (MAIL, RCPT, DATA, no pipelining, as smtp-source) of --size bytes whose From: is --from,
          for --secs from the moment all its sessions are logged in (so the rate leaves the logins
          out), then QUIT. PREFIX.msgs, PREFIX.acc (accepted msg/s), and with
          --sink-count FILE (an `smtp-sink -c` output) PREFIX.e2e: from the start until the sink
          has received every accepted message.
  login   --sessions N loops, each: connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT, until --secs
          have passed. PREFIX.logins, PREFIX.rate (successful logins/s), PREFIX.fail.
  spray   password spraying: --accounts FILE (one login per line), --passwords K wrong passwords
          each, round by round (every account once per round), each attempt from its own source
          address 127.A.B.C (a /24 of its own: per-IP and per-network limits never trigger, only
          the per-account ones can stop it), --sessions attempts at once. PREFIX.attempts and
          PREFIX.reply_CODE counts (535: checked and wrong; 454: refused, try later; 421: locked).

Exit status: 0 when the mode ran (its figures may include failures, counted), 1 on bad usage or
when no session could even start (the server is down).
"""

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import re
import ssl
import sys
import time

SINK_RE = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def note(msg):
    print(msg, file=sys.stderr, flush=True)


class SmtpError(Exception):
    pass


class Conn:
    def __init__(self, reader, writer, timeout):
        self.r, self.w, self.timeout = reader, writer, timeout

    async def reply(self):
        """One (possibly multi-line) reply: (code, text of the last line)."""
        while True:
            line = await asyncio.wait_for(self.r.readline(), self.timeout)
            if not line:
                raise SmtpError("connection closed")
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), line.decode(errors="replace").strip()

    async def cmd(self, text, want):
        self.w.write(text.encode() + b"\r\n")
        code, line = await self.reply()
        if code != want:
            raise SmtpError(f"{text.split()[0] if text else '?'}: {line}")
        return code, line


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_session(a, ctx, local_ip=None):
    """Connect, EHLO, STARTTLS, EHLO: a Conn over TLS."""
    kw = {"local_addr": (local_ip, 0)} if local_ip else {}
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", a.port, **kw), a.timeout)
    c = Conn(reader, writer, a.timeout)
    code, line = await c.reply()
    if code != 220:
        writer.close()
        raise SmtpError(f"greeting: {line}")
    await c.cmd("EHLO client.bench.test", 250)
    await c.cmd("STARTTLS", 220)
    await asyncio.wait_for(writer.start_tls(ctx, server_hostname="bench.test"), a.timeout)
    await c.cmd("EHLO client.bench.test", 250)
    return c


def auth_plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def close(c):
    try:
        c.w.write(b"QUIT\r\n")
        await asyncio.wait_for(c.reply(), 2)
    except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError):
        pass
    c.w.close()
    try:
        await asyncio.wait_for(c.w.wait_closed(), 2)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        pass


def make_message(sender, rcpt, size, n):
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {n}\r\n"
            f"Date: Sun, 06 Dec 2026 00:00:00 +0000\r\nMessage-ID: <bench.{n}.{os.getpid()}@bench.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    body = []
    left = max(size - len(head), 80)
    line = ("x" * 74) + "\r\n"
    while left > len(line):
        body.append(line)
        left -= len(line)
    body.append("y" * max(left - 2, 0) + "\r\n")
    return (head + "".join(body)).encode() + b".\r\n"


# ---------------------------------------------------------------- modes (one worker process)

async def send_session(a, ctx, st, stats, msg):
    """Log in, wait until every session of this process has (st["ready"]), then send until
    st["t0"] + --secs: the message rate does not include the logins (Dovecot's argon2id alone
    can take seconds for 20 sessions)."""
    c = None
    try:
        c = await open_session(a, ctx)
        await c.cmd(auth_plain(a.user, a.password), 235)
    except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError) as e:
        stats["fail"] += 1
        note(f"  send: login: {e}")
        c = None
    st["n"] += 1
    if st["n"] >= st["want"] and not st["ready"].is_set():
        # Every process's sessions logged in (a barrier across the processes, at most
        # --timeout): all windows start together, so the end-to-end time is one window's.
        try:
            await asyncio.get_running_loop().run_in_executor(None, st["barrier"].wait, a.timeout)
        except Exception:  # threading.BrokenBarrierError: go on alone
            pass
        st["t0"], st["wall0"] = time.monotonic(), time.time()
        st["ready"].set()
    try:
        await asyncio.wait_for(st["ready"].wait(), a.timeout * 3)
    except asyncio.TimeoutError:
        if not st["ready"].is_set():
            st["t0"], st["wall0"] = time.monotonic(), time.time()
            st["ready"].set()
    deadline = st["t0"] + a.secs
    sent = 0
    while time.monotonic() < deadline and (not a.count or sent < a.count):
        sent += 1
        try:
            if c is None:
                c = await open_session(a, ctx)
                await c.cmd(auth_plain(a.user, a.password), 235)
            await c.cmd(f"MAIL FROM:<{a.sender}>", 250)
            await c.cmd(f"RCPT TO:<{a.rcpt}>", 250)
            await c.cmd("DATA", 354)
            c.w.write(msg)
            code, line = await c.reply()
            if code != 250:
                raise SmtpError(f"end of DATA: {line}")
            stats["ok"] += 1
        except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError) as e:
            stats["fail"] += 1
            if stats["fail"] <= 3:
                note(f"  send: {e}")
            if c is not None:
                await close(c)
                c = None
            await asyncio.sleep(0.05)
    if c is not None:
        await close(c)


async def login_session(a, ctx, deadline, stats):
    while time.monotonic() < deadline:
        c = None
        try:
            c = await open_session(a, ctx)
            await c.cmd(auth_plain(a.user, a.password), 235)
            stats["ok"] += 1
        except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError) as e:
            stats["fail"] += 1
            if stats["fail"] <= 3:
                note(f"  login: {e}")
            await asyncio.sleep(0.05)
        if c is not None:
            await close(c)


def spray_ip(i):
    """Attempt i's source address: 127.A.B.C, a /24 (127.A.B) of its own for i < 62,500."""
    return f"127.{1 + i % 250}.{(i // 250) % 250}.{1 + (i // 62500) % 250}"


async def spray_attempt(a, ctx, i, login, password, stats):
    c = None
    try:
        c = await open_session(a, ctx, local_ip=spray_ip(i))
        c.w.write(auth_plain(login, password).encode() + b"\r\n")
        code, _ = await c.reply()
        stats[f"reply_{code}"] = stats.get(f"reply_{code}", 0) + 1
    except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError) as e:
        stats["fail"] += 1
        if stats["fail"] <= 3:
            note(f"  spray: {e}")
    if c is not None:
        await close(c)


async def run_worker(a, idx, start_at, out, barrier):
    ctx = tls_context()
    stats = {"ok": 0, "fail": 0}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    deadline = t0 + a.secs
    mine = [s for s in range(a.sessions) if s % a.procs == idx]
    if a.mode == "send":
        msg = make_message(a.sender, a.rcpt, a.size, idx)
        st = {"n": 0, "want": len(mine), "ready": asyncio.Event(), "t0": t0, "wall0": time.time(),
              "barrier": barrier}
        await asyncio.gather(*(send_session(a, ctx, st, stats, msg) for _ in mine))
        stats["secs"] = max(time.monotonic() - st["t0"], 1e-6)
        stats["wall0"] = st["wall0"]
    elif a.mode == "login":
        await asyncio.gather(*(login_session(a, ctx, deadline, stats) for _ in mine))
    else:  # spray: this worker takes attempts i with i % procs == idx
        accounts = [l.strip() for l in open(a.accounts) if l.strip()]
        sem = asyncio.Semaphore(max(1, len(mine)))
        rounds = [[(r * len(accounts) + k, login, f"Spring2026!{r}")
                   for k, login in enumerate(accounts) if (r * len(accounts) + k) % a.procs == idx]
                  for r in range(a.passwords)]

        async def one(i, login, pw):
            async with sem:
                await spray_attempt(a, ctx, i, login, pw, stats)
        for r, batch in enumerate(rounds):
            if r and a.round_gap > 0:
                await asyncio.sleep(a.round_gap)
            await asyncio.gather(*(one(*x) for x in batch))
    stats.setdefault("secs", time.monotonic() - t0)
    out.send(stats)


def worker_main(a, idx, start_at, conn, barrier):
    try:
        asyncio.run(run_worker(a, idx, start_at, conn, barrier))
    except Exception as e:  # reported to the parent: a dead worker must not hang it
        conn.send({"error": repr(e)})


def sink_messages(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256))
            found = SINK_RE.findall(f.read())
    except FileNotFoundError:
        return 0
    return int(found[-1][2]) if found else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("send", "login", "spray"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="")
    ap.add_argument("--from", dest="sender", default="bench@bench.test")
    ap.add_argument("--rcpt", default="sink@relay.test")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--secs", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--count", type=int, default=0, help="send: at most this many per session")
    ap.add_argument("--sink-count")
    ap.add_argument("--sink-timeout", type=float, default=120.0)
    ap.add_argument("--accounts")
    ap.add_argument("--passwords", type=int, default=3)
    ap.add_argument("--round-gap", type=float, default=0.0)
    a = ap.parse_args()
    if a.mode == "spray":
        if not a.accounts:
            ap.error("spray needs --accounts")
        a.secs = 1e9  # bounded by the attempts, each with its own deadlines
    a.procs = max(1, min(a.procs, a.sessions))
    base = sink_messages(a.sink_count) if a.sink_count else 0
    start_at = time.time() + 0.3
    pipes, procs = [], []
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(a.procs)
    for i in range(a.procs):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker_main, args=(a, i, start_at, w, barrier), daemon=True)
        p.start()
        pipes.append(r)
        procs.append(p)
    t_start = time.monotonic() + max(0.0, start_at - time.time())
    limit = (a.timeout * 5 + a.secs + 30) if a.mode != "spray" else 3600
    results = []
    for r, p in zip(pipes, procs):
        if r.poll(max(1.0, limit - (time.monotonic() - t_start))):
            results.append(r.recv())
        else:
            note("a worker missed its deadline")
            p.kill()
    t_end = time.monotonic()
    for p in procs:
        p.join(5)
    errors = [x["error"] for x in results if "error" in x]
    for e in errors:
        note(f"worker failed: {e}")
    results = [x for x in results if "error" not in x]
    if not results:
        return 1
    tot = {}
    for x in results:
        for k, v in x.items():
            if k not in ("secs", "wall0"):
                tot[k] = tot.get(k, 0) + v
    secs = max(x["secs"] for x in results)
    p = a.prefix
    if a.mode == "send":
        # Each process timed its own run from the moment its sessions were all logged in.
        acc = sum(x["ok"] / x["secs"] for x in results)
        print(f"{p}.msgs={tot['ok']}")
        print(f"{p}.fail={tot['fail']}")
        print(f"{p}.acc={acc:.1f}")
        line = f"  {p}: {tot['ok']} msgs in {secs:.1f}s, accepted {acc:.1f}/s, {tot['fail']} failed"
        if a.sink_count and tot["ok"]:
            deadline = t_end + a.sink_timeout
            while sink_messages(a.sink_count) - base < tot["ok"] and time.monotonic() < deadline:
                time.sleep(0.02)
            got = sink_messages(a.sink_count) - base
            if got >= tot["ok"]:
                e2e = tot["ok"] / (time.time() - min(x["wall0"] for x in results))
                print(f"{p}.e2e={e2e:.1f}")
                line += f", end-to-end {e2e:.1f}/s"
            else:
                note(f"  {p}: the sink has {got} of {tot['ok']} messages at the deadline")
        note(line)
        return 0 if tot["ok"] else 1
    if a.mode == "login":
        print(f"{p}.logins={tot['ok']}")
        print(f"{p}.fail={tot['fail']}")
        print(f"{p}.rate={tot['ok'] / secs:.1f}")
        note(f"  {p}: {tot['ok']} logins in {secs:.1f}s, {tot['ok'] / secs:.1f}/s, {tot['fail']} failed")
        return 0 if tot["ok"] else 1
    n = sum(v for k, v in tot.items() if k.startswith("reply_")) + tot["fail"]
    print(f"{p}.attempts={n}")
    print(f"{p}.secs={t_end - t_start:.1f}")
    for k in sorted(tot):
        if k.startswith("reply_") or k == "fail":
            print(f"{p}.{k}={tot[k]}")
    note(f"  {p}: {n} attempts in {t_end - t_start:.1f}s: "
         + " ".join(f"{k}={v}" for k, v in sorted(tot.items()) if k != "ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
