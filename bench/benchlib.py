#!/usr/bin/env python3
"""Helpers for bench/run.sh: load runs, Maildir polling, PSS sums, fsync counts, the final table.

Each subcommand prints machine-readable `key=value` lines on stdout (run.sh appends them to the
results file) and human notes on stderr. Nothing here starts a server; run.sh owns every server
process and stops it. Every wait is a poll with a deadline, never an open-ended sleep.

Subcommands:
  freeport                          print a free TCP port on 127.0.0.1 (bind to 0, close).
  load ...                          run smtp-source (optionally calibrated to a target duration) and,
                                    when --maildir is given, wait until every message is delivered
                                    (--sink-count FILE: until an `smtp-sink -c` has received them).
  pss --root PID [--name N]         sum Pss (KiB) of PID and all its descendants (/proc/*/smaps_rollup).
  synccount FILE                    count fsync-family calls in a plain `strace -f -o FILE` trace.
  waitquiet FILE --quiet S          wait until FILE stops growing for S seconds (deadline bounded).
  sinkcount FILE [--prefix P]       the last counters (sessions ended, messages) of `smtp-sink -c`.
  count DIR                         number of entries in DIR.
  tree PID                          print PID and its live descendants, one per line.
  relaytable RESULTS                the table of bench/relay.sh (Tern, Postfix, ratio, target).
  table RESULTS                     print the final comparison table from key=value lines
                                    (medians when a key repeats, one value per round).

Errors: a failed smtp-source, a missed deadline or an unreadable file exits non-zero with a
one-line reason on stderr, so run.sh can record the figure as unavailable and move on.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import time

SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs")
SYNC_RE = re.compile(r"\b(" + "|".join(SYNC_CALLS) + r")\(")


def note(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_dir(path):
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


SINK_RE = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def sink_counters(path):
    """The last (sessions, messages) counter line of an `smtp-sink -c` output file, (0, 0) if none.

    smtp-sink -c rewrites one line ("sess=S quit=Q mesg=M\\r") whenever a session ends, a QUIT is
    received or a message's final "." arrives: mesg counts messages received, sess sessions
    (connections) that have ended. Only the file's tail is read, so polling it stays cheap."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256))
            tail = f.read()
    except FileNotFoundError:
        return 0, 0
    found = SINK_RE.findall(tail)
    if not found:
        return 0, 0
    sess, _quit, mesg = found[-1]
    return int(sess), int(mesg)


def counter_of(args):
    """What a batch waits for: Maildir entries (--maildir) or messages at a sink (--sink-count)."""
    if args.maildir:
        return args.maildir, lambda: count_dir(args.maildir)
    if getattr(args, "sink_count", None):
        return args.sink_count, lambda: sink_counters(args.sink_count)[1]
    return None, None


def wait_count(path, target, deadline, count=None):
    """Poll until `count()` (default: entries in `path`) reaches `target`; return the time it
    did, or None at the deadline."""
    count = count or (lambda: count_dir(path))
    while True:
        n = count()
        if n >= target:
            return time.monotonic()
        if time.monotonic() > deadline:
            note(f"deadline: {path} holds {n}, expected {target}")
            return None
        time.sleep(0.02)


def smtp_source(args, msgs):
    """One smtp-source run of `msgs` messages; returns (t_start, t_end) or raises."""
    cmd = [
        args.smtp_source, "-s", str(args.sessions), "-m", str(msgs), "-l", str(args.size),
        "-M", "client.bench.test", "-f", args.sender, "-t", args.rcpt, "-C", "5",
    ]
    if args.reuse:
        cmd.append("-d")  # keep the connection: many messages per session
    cmd.append(f"127.0.0.1:{args.port}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    t1 = time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return t0, t1


def run_batch(args, msgs):
    """Send `msgs`, then wait for delivery when a Maildir is watched; return (acc/s, e2e/s|None)."""
    path, count = counter_of(args)
    base = count() if count else 0
    t0, t1 = smtp_source(args, msgs)
    acc = msgs / (t1 - t0)
    if not count:
        return acc, None
    done = wait_count(path, base + msgs, t1 + args.timeout, count)
    if done is None:
        raise RuntimeError("messages not all delivered before the deadline")
    return acc, msgs / (done - t0)


def cmd_load(args):
    msgs = args.msgs
    if msgs is None:
        # Calibrate: a short warm-up batch gives the rate, then size the real batch to last about
        # --target-secs, so fast and slow servers are both measured for a comparable time.
        cal = max(args.sessions * 5, 100)
        while True:
            t0 = time.monotonic()
            acc, _ = run_batch(args, cal)
            # A batch under a second is dominated by start-up: grow it so the rate is meaningful.
            if time.monotonic() - t0 >= 1.0 or cal >= args.max_msgs // 4:
                break
            cal *= 4
        msgs = int(min(max(acc * args.target_secs, args.min_msgs), args.max_msgs))
        note(f"  calibration: {cal} msgs at {acc:.0f}/s -> measuring {msgs} msgs")
    acc, e2e = run_batch(args, msgs)
    p = args.prefix
    print(f"{p}.msgs={msgs}")
    print(f"{p}.acc={acc:.1f}")
    if e2e is not None:
        print(f"{p}.e2e={e2e:.1f}")
    note(f"  {p}: {msgs} msgs, accepted {acc:.1f}/s" + (f", end-to-end {e2e:.1f}/s" if e2e else ""))


def descendants(root):
    """PID `root` and all its live descendants, from the ppid field of /proc/*/stat."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: the ppid is the 2nd field after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_of(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass  # the process exited between listing and reading: it no longer uses memory
    return 0


def comm_of(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cmd_pss(args):
    pids = descendants(args.root)
    total = sum(pss_of(p) for p in pids)
    print(f"{args.prefix}.pss_kib={total}")
    print(f"{args.prefix}.procs={len(pids)}")
    if args.name:
        named = [p for p in pids if comm_of(p) == args.name]
        print(f"{args.prefix}.{args.name}_procs={len(named)}")
        print(f"{args.prefix}.{args.name}_pss_kib={sum(pss_of(p) for p in named)}")


def sync_count(path):
    n = 0
    with open(path, errors="replace") as f:
        for line in f:
            # Skip "<... fsync resumed>" continuations: the call was counted at "unfinished".
            if "resumed>" in line:
                continue
            if SYNC_RE.search(line):
                n += 1
    return n


def cmd_synccount(args):
    print(sync_count(args.file))


def cmd_waitquiet(args):
    """Wait until FILE has not grown for --quiet seconds (the server finished its syncs)."""
    deadline = time.monotonic() + args.timeout
    last_size, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = os.path.getsize(args.file) if os.path.exists(args.file) else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change >= args.quiet:
            return 0
        time.sleep(0.05)
    note(f"waitquiet: {args.file} still growing at the deadline")
    return 1


def cmd_count(args):
    print(count_dir(args.dir))


ROWS = [
    ("accepted msg/s, 4 KiB, 20 sessions, reused", "acc4k.acc", True),
    ("accepted msg/s, 100 KiB, 20 sessions, reused", "acc100k.acc", True),
    ("end-to-end msg/s (in Maildir), 4 KiB", "acc4k.e2e", True),
    ("end-to-end msg/s (in Maildir), 100 KiB", "acc100k.e2e", True),
    ("accepted msg/s, 4 KiB, 1 msg/connection", "conn4k.acc", True),
    ("fsyncs per message (accept+deliver)", "fsync.per_msg", False),
    ("PSS KiB per idle session", "idle.per_session_kib", False),
    ("idle sessions measured", "idle.sessions", None),
]


def fmt(v):
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def fmt_ratio(r):
    # Small ratios (memory per session) need more digits than "0.00x" to say anything.
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.4f}x"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return fmt_ratio(a / b)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def outlier_warnings(vals):
    """Rounds in which a server ran at under half (or over twice) its own median rate. A run
    that slow usually means the machine stalled during it (smtp-sink once fell from 12,610 to
    1,672 msg/s between rounds of one run), and the ratios of that round say little."""
    out = []
    for label, key, higher in ROWS:
        if not higher:
            continue
        for srv, name in (("sink", "smtp-sink"), ("postfix", "Postfix"), ("tern", "Tern")):
            xs = vals.get(f"{srv}.{key}", [])
            m = median(xs)
            if len(xs) < 3 or not m:
                continue
            for i, x in enumerate(xs, 1):
                if x < m / 2 or x > m * 2:
                    out.append(f"WARNING: round {i}: {name}, {label}: {x:,.0f}/s against a median "
                               f"of {m:,.0f}/s; that round's ratios say little.")
    if out:
        out.append("")
    return out


def cmd_table(args):
    """Medians over rounds (a key repeats once per round). A ratio is the median of the
    per-round ratios when both servers have one value per round (each pair was measured minutes
    apart, so the machine's drift cancels), else the ratio of the medians."""
    vals = {}
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                try:
                    vals.setdefault(k, []).append(float(v))
                except ValueError:
                    pass

    def paired(key, a, b):
        xs, ys = vals.get(f"{a}.{key}", []), vals.get(f"{b}.{key}", [])
        if len(xs) > 1 and len(xs) == len(ys) and all(ys):
            return [x / y for x, y in zip(xs, ys)]
        return None

    def ratio_of(key, a, b):
        per_round = paired(key, a, b)
        if per_round:
            return fmt_ratio(median(per_round))
        return ratio(median(vals.get(f"{a}.{key}", [])), median(vals.get(f"{b}.{key}", [])))

    rounds = max((len(v) for k, v in vals.items() if k.endswith(".acc4k.acc")), default=0)
    head = ["figure", "smtp-sink", "Postfix", "Tern", "Tern/Postfix", "Tern/smtp-sink"]
    rows = [head]
    for label, key, _higher_better in ROWS:
        s, p, t = (median(vals.get(f"{srv}.{key}", [])) for srv in ("sink", "postfix", "tern"))
        if key == "idle.sessions":
            rows.append([label, fmt(s), fmt(p), fmt(t), "", ""])
            continue
        rows.append([label, fmt(s), fmt(p), fmt(t), ratio_of(key, "tern", "postfix"),
                     ratio_of(key, "tern", "sink")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    if rounds > 1:
        print(f"Rates are medians of {rounds} rounds (sink, Postfix, Tern in turn, each round); "
              "ratios are medians of the per-round ratios:")
        for label, key, higher in ROWS:
            if not higher:
                continue
            for other, name in (("postfix", "Postfix"), ("sink", "smtp-sink")):
                per_round = paired(key, "tern", other)
                if per_round:
                    print(f"  {label}, Tern/{name}: " + " ".join(fmt_ratio(r) for r in per_round))
        print()
        for line in outlier_warnings(vals):
            print(line)
    n = median(vals.get("postfix.idle.after.smtpd_procs", []))
    kib = median(vals.get("postfix.idle.after.smtpd_pss_kib", []))
    if n and kib:
        print(f"Postfix: {n:,.0f} smtpd processes, {kib / n:,.0f} KiB PSS each on average.")
    print("Ratios > 1 favour Tern for rates; for fsyncs and PSS lower is better (ratio < 1 favours Tern).")


RELAY_ROWS = [
    # label, key, kind, target (text)
    ("relay msg/s end to end, 4 KiB", "relay4k.e2e", "rate", ">= 4x Postfix"),
    ("relay msg/s end to end, 100 KiB", "relay100k.e2e", "rate", ">= 3x Postfix"),
    ("accepted msg/s, 4 KiB (smtp-source exit)", "relay4k.acc", "rate", ""),
    ("accepted msg/s, 100 KiB (smtp-source exit)", "relay100k.acc", "rate", ""),
    ("fsyncs per relayed msg, strace batch", "fsync.per_msg", "low", "<= 0.5"),
    ("fsyncs per relayed msg, perf, 4 KiB run", "relay4k.fsync_per_msg", "low", "<= 0.5"),
    ("fsyncs per relayed msg, perf, 100 KiB run", "relay100k.fsync_per_msg", "low", "<= 0.5"),
    ("msgs per connection at the sink, 4 KiB", "relay4k.msgs_per_conn", "high", ">= 100"),
    ("msgs per connection at the sink, 100 KiB", "relay100k.msgs_per_conn", "high", ">= 100"),
    ("msgs per connection, server's log (all)", "log.msgs_per_conn", "high", ""),
    ("fast destination alone, msg/s", "fastalone.e2e", "rate", ""),
    ("fast destination beside slow one, msg/s", "fastmixed.e2e", "rate", ""),
    ("fast destination kept, % of alone", "fast.kept_pct", "high", ">= 95%"),
    ("slow destination msgs during fast run", "slow.msgs_during_fast", None, ""),
    ("slow dest. connections open at start/end", "slow.conns", None, ""),
]


def cmd_relaytable(args):
    """The table of bench/relay.sh from its key=value results (last value of each key)."""
    vals = {}
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                try:
                    vals[k] = float(v)
                except ValueError:
                    pass
    kept_rounds = {}
    for srv in ("tern", "postfix"):
        g = vals.get
        if srv == "tern" and g("tern.log.relay_conns"):
            vals["tern.log.msgs_per_conn"] = g("tern.log.relay_msgs", 0) / g("tern.log.relay_conns")
        if srv == "postfix" and g("postfix.log.relay_new_conns"):
            vals["postfix.log.msgs_per_conn"] = (g("postfix.log.relay_sent", 0)
                                                 / g("postfix.log.relay_new_conns"))
        # Rounds of the fast/slow pair: the rates shown are the rounds' means, the kept share
        # the mean of each round's own ratio (each pair ran back to back, so drift cancels).
        pairs = []
        for r in range(1, 100):
            a, m = g(f"{srv}.fastalone.r{r}.e2e"), g(f"{srv}.fastmixed.r{r}.e2e")
            if a is None and m is None:
                break
            if a and m is not None:
                pairs.append((a, m))
        if pairs:
            vals[f"{srv}.fastalone.e2e"] = sum(a for a, _ in pairs) / len(pairs)
            vals[f"{srv}.fastmixed.e2e"] = sum(m for _, m in pairs) / len(pairs)
            vals[f"{srv}.fast.kept_pct"] = 100.0 * sum(m / a for a, m in pairs) / len(pairs)
            kept_rounds[srv] = " ".join(f"{100.0 * m / a:.0f}%" for a, m in pairs)
    head = ["figure", "Tern", "Postfix", "Tern/Postfix", "target"]
    rows = [head]
    for label, key, kind, target in RELAY_ROWS:
        if key == "slow.conns":
            cells = [
                "n/a" if vals.get(f"{s}.slow.conns_at_start") is None else
                f"{vals[f'{s}.slow.conns_at_start']:.0f}/{vals.get(f'{s}.slow.conns_at_end', 0):.0f}"
                for s in ("tern", "postfix")]
            rows.append([label, *cells, "", ""])
            continue
        t, p = vals.get(f"tern.{key}"), vals.get(f"postfix.{key}")
        if key == "fast.kept_pct":
            cells = [fmt(t) + "%" if t is not None else "n/a", fmt(p) + "%" if p is not None else "n/a"]
        else:
            cells = [fmt(t), fmt(p)]
        r = "" if kind is None or key == "fast.kept_pct" else ratio(t, p)
        rows.append([label, *cells, r, target])
        if key.startswith("relay") and key.endswith(".e2e"):
            ceil = vals.get("sink." + key.replace("relay", "ceil"))
            if ceil:
                pct = lambda v: "n/a" if v is None else f"{100 * v / ceil:.0f}%"
                rows.append(["  ceiling: smtp-source straight to the sink", fmt(ceil), fmt(ceil),
                             "", ""])
                rows.append(["  relay rate as % of that ceiling", pct(t), pct(p), "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()
    for srv in ("tern", "postfix"):
        ms = [f"{k.split('.', 1)[1]}={vals[k]:.0f}" for k in sorted(vals)
              if k.startswith(srv + ".") and (k.endswith(".msgs") or "sink_" in k or ".log.relay" in k)]
        print(f"{srv}: " + " ".join(ms))
    for srv, rounds in kept_rounds.items():
        print(f"{srv}: fast destination kept per round: {rounds}")
    print("Rates: first message sent until the sink has received every message (smtp-sink -c).")
    print("Msgs per connection at the sink: messages / sessions ended, counted once no connection is open.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeport")
    lp = sub.add_parser("load")
    lp.add_argument("--port", type=int, required=True)
    lp.add_argument("--prefix", required=True)
    lp.add_argument("--size", type=int, required=True)
    lp.add_argument("--sessions", type=int, default=20)
    lp.add_argument("--msgs", type=int)
    lp.add_argument("--target-secs", type=float, default=10.0)
    lp.add_argument("--min-msgs", type=int, default=200)
    lp.add_argument("--max-msgs", type=int, default=60000)
    lp.add_argument("--reuse", action="store_true")
    lp.add_argument("--maildir")
    lp.add_argument("--sink-count", help="smtp-sink -c output: wait until it counts the batch")
    lp.add_argument("--timeout", type=float, default=120.0)
    lp.add_argument("--sender", default="load@client.bench.test")
    lp.add_argument("--rcpt", default="bench@bench.test")
    lp.add_argument("--smtp-source", default="smtp-source")
    pp = sub.add_parser("pss")
    pp.add_argument("--root", type=int, required=True)
    pp.add_argument("--prefix", required=True)
    pp.add_argument("--name")
    sp = sub.add_parser("synccount")
    sp.add_argument("file")
    wp = sub.add_parser("waitquiet")
    wp.add_argument("file")
    wp.add_argument("--quiet", type=float, default=1.5)
    wp.add_argument("--timeout", type=float, default=60.0)
    trp = sub.add_parser("tree")
    trp.add_argument("pid", type=int)
    scp = sub.add_parser("sinkcount")
    scp.add_argument("file")
    scp.add_argument("--prefix", default="sink")
    rtp = sub.add_parser("relaytable")
    rtp.add_argument("results")
    cp = sub.add_parser("count")
    cp.add_argument("dir")
    tp = sub.add_parser("table")
    tp.add_argument("results")
    args = ap.parse_args()
    try:
        if args.cmd == "freeport":
            print(free_port())
        elif args.cmd == "load":
            cmd_load(args)
        elif args.cmd == "pss":
            cmd_pss(args)
        elif args.cmd == "synccount":
            cmd_synccount(args)
        elif args.cmd == "waitquiet":
            return cmd_waitquiet(args)
        elif args.cmd == "tree":
            print("\n".join(str(p) for p in descendants(args.pid)))
        elif args.cmd == "sinkcount":
            sess, mesg = sink_counters(args.file)
            print(f"{args.prefix}.sess={sess}")
            print(f"{args.prefix}.mesg={mesg}")
        elif args.cmd == "count":
            cmd_count(args)
        elif args.cmd == "table":
            cmd_table(args)
        elif args.cmd == "relaytable":
            cmd_relaytable(args)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        note(f"benchlib {args.cmd}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
