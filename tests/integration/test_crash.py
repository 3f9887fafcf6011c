"""kill -9 under load: every 250-acknowledged message survives, byte for byte.

Four loader threads send messages (each with a unique marker and a
deterministic body) over their own SMTP sessions while the server is
SIGKILLed five times and restarted on the same data_dir (a new port each
time). Afterwards:
  * every message that got a 250 is in the recipient's Maildir/new,
  * every file in Maildir/new is a complete message we really sent (no
    partial message anywhere, nothing invented),
  * duplicates only for messages acknowledged before a kill (their delivery
    may have been in flight); a message acknowledged by the last process,
    which is never killed, is delivered exactly once.
"""

import random
import re
import smtplib
import threading
import time

from ternlib import split_mail, wait_until

KILLS = 5
WORKERS = 4
ACKS_PER_PHASE = 40
PHASE_TIMEOUT = 20.0


def build_message(marker: str) -> bytes:
    rnd = random.Random(marker)
    lines = []
    for _ in range(rnd.randint(2, 400)):
        lines.append("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(rnd.randint(0, 76))))
    body = "\r\n".join(lines)
    return (f"From: <loader@remote.test>\r\nSubject: crash {marker}\r\nMessage-ID: <{marker}@loader.test>\r\n\r\n"
            f"marker {marker}\r\n{body}\r\nend {marker}\r\n").encode()


def recipients(marker_seq: int) -> list[str]:
    return ["alice@example.test"] if marker_seq % 3 else ["alice@example.test", "bob@example.test"]


class Loader:
    def __init__(self, port: int):
        self.port = port
        self.generation = 0  # bumped after each restart (i.e. after each kill)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.attempted: dict[str, tuple[bytes, list[str]]] = {}
        self.acked: dict[str, int] = {}  # marker -> generation read before sending
        self.errors = 0
        self.threads = [threading.Thread(target=self.worker, args=(w,), daemon=True) for w in range(WORKERS)]

    def ack_count(self, generation: int) -> int:
        with self.lock:
            return sum(1 for g in self.acked.values() if g == generation)

    def worker(self, wid: int) -> None:
        seq = 0
        while not self.stop.is_set():
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="loader.test", timeout=5)
            except (OSError, smtplib.SMTPException):
                # The server is down between a kill and its restart: retry
                # until the test stops us (bounded by the phase deadlines).
                self.stop.wait(0.02)
                continue
            try:
                while not self.stop.is_set():
                    seq += 1
                    marker = f"w{wid}s{seq}r{random.randrange(1 << 30):08x}"
                    msg, rcpts = build_message(marker), recipients(seq)
                    with self.lock:
                        self.attempted[marker] = (msg, rcpts)
                        generation = self.generation
                    s.sendmail("loader@remote.test", rcpts, msg)
                    with self.lock:
                        self.acked[marker] = generation
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.errors += 1
            finally:
                try:
                    s.close()
                except OSError:
                    pass


MARKER_RE = re.compile(rb"Message-ID: <([^@>]+)@loader\.test>")


def test_kill_9_under_load_loses_nothing(tern):
    srv = tern()
    loader = Loader(srv.port)
    for t in loader.threads:
        t.start()
    t_start = time.monotonic()
    try:
        for kill in range(KILLS):
            gen = loader.generation
            wait_until(lambda: loader.ack_count(gen) >= ACKS_PER_PHASE, PHASE_TIMEOUT,
                       what=f"{ACKS_PER_PHASE} acks before kill {kill + 1}")
            srv.kill()
            srv.start()
            with loader.lock:
                loader.port = srv.port
                loader.generation += 1
        final = loader.generation
        wait_until(lambda: loader.ack_count(final) >= ACKS_PER_PHASE, PHASE_TIMEOUT,
                   what="acks from the final server process")
    finally:
        loader.stop.set()
        for t in loader.threads:
            t.join(timeout=15)
    assert not any(t.is_alive() for t in loader.threads)

    with loader.lock:
        acked = dict(loader.acked)
        attempted = dict(loader.attempted)
    expected = {"alice": set(), "bob": set()}
    for marker in acked:
        for rcpt in attempted[marker][1]:
            expected[rcpt.split("@")[0]].add(marker)

    def delivered(user):
        seen = {}
        for f in srv.mail_files(user):
            data = f.read_bytes()
            m = MARKER_RE.search(data)
            assert m, f"{f.name}: not a message the loader sent (partial?): {data[:300]!r}"
            seen.setdefault(m.group(1).decode(), []).append((f, data))
        return seen

    for user, want in expected.items():
        wait_until(lambda: want <= set(delivered(user)), 60,
                   what=f"all {len(want)} acknowledged messages for {user}")

    for user, want in expected.items():
        for marker, copies in delivered(user).items():
            assert marker in attempted, marker
            msg, rcpts = attempted[marker]
            assert f"{user}@example.test" in rcpts, (user, marker)
            for f, data in copies:
                # Complete and exact: the delivered body equals the sent body.
                _, body = split_mail(data)
                _, sent_body = split_mail(msg)
                assert body in (sent_body, sent_body.replace(b"\r\n", b"\n")), f"{f.name} differs from what was sent"
            if acked.get(marker) == final:
                assert len(copies) == 1, f"{marker} acked by the never-killed process but delivered {len(copies)}x"
            else:
                assert len(copies) <= KILLS + 1, (marker, len(copies))
        # Nothing partial lying in new/ or cur/ (tmp/ is Maildir scratch).
        cur = srv.maildir(user) / "cur"
        if cur.exists():
            assert not [p for p in cur.iterdir()], "nobody reads this Maildir: cur/ must stay empty"

    dup = sum(len(c) - 1 for user in expected for c in delivered(user).values())
    print(f"crash test: {len(acked)} acked of {len(attempted)} attempted, {loader.errors} session errors, "
          f"{dup} duplicate copies, {KILLS} kills")
    assert srv.stop() == 0
    total = sum(len(v) for v in expected.values())
    assert total >= ACKS_PER_PHASE * (KILLS + 1)
    assert time.monotonic() - t_start < 120
