"""kill -9: every 250-acknowledged message is delivered exactly once, byte for byte.

Under load: four loader threads send messages (each with a unique marker and
a deterministic body) over their own SMTP sessions while the server is
SIGKILLed five times (and, in the storm, many more times at random moments)
and restarted on the same data_dir (a new port each time). Afterwards:
  * every message that got a 250 is in the recipient's Maildir/new,
  * every file in Maildir/new is a complete message we really sent (no
    partial message anywhere, nothing invented),
  * no message is there twice, however many kills hit its delivery (a
    redelivery after a crash finds the earlier copy by its name),
  * nothing is left behind in tmp/ once the queue is empty.

Right after a 250: one message at a time, SIGKILL the moment its 250
arrives or its first copy appears in new/ (when the delivery is in flight),
sometimes let a mail reader move the copies to cur/, restart, and check the
message arrived exactly once, 50 times over.
"""

import os
import random
import re
import smtplib
import threading
import time

from ternlib import split_mail, wait_until

KILLS = 5
STORM_KILLS = 30
STORM_MAX_ACKS = 6  # a storm kill comes after 0 to this many acks
KILLS_AFTER_250 = 50
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


def queue_is_empty(srv) -> bool:
    return srv.queue_list().strip() == "queue is empty"


def read_copies(srv, user: str) -> None:
    """What a mail reader does with new mail: moves it to cur/, marked seen."""
    box = srv.maildir(user)
    (box / "cur").mkdir(exist_ok=True)
    for f in srv.mail_files(user):
        f.rename(box / "cur" / f"{f.name}:2,S")


def delivered(srv, user: str) -> dict[str, list[tuple[str, bytes]]]:
    """marker -> [(file name, bytes)] of every copy in the user's Maildir
    (new/ and cur/)."""
    seen: dict[str, list[tuple[str, bytes]]] = {}
    cur = srv.maildir(user) / "cur"
    read = sorted(cur.iterdir()) if cur.exists() else []
    for f in srv.mail_files(user) + read:
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue  # moved to cur/ meanwhile: counted there
        m = MARKER_RE.search(data)
        assert m, f"{f.name}: not a message the loader sent (partial?): {data[:300]!r}"
        seen.setdefault(m.group(1).decode(), []).append((f.name, data))
    return seen


def check_exactly_once(srv, acked: set[str], attempted: dict[str, tuple[bytes, list[str]]]) -> tuple[int, int]:
    """Waits until every acknowledged message is delivered and the queue is
    empty (so no delivery is still to come), stops the server, and asserts
    that every copy is complete and there is exactly one per recipient.
    Returns (duplicate copies, lost copies), both 0 when it returns."""
    expected: dict[str, set[str]] = {"alice": set(), "bob": set()}
    for marker in acked:
        for rcpt in attempted[marker][1]:
            expected[rcpt.split("@")[0]].add(marker)
    try:
        for user, want in expected.items():
            wait_until(lambda: want <= set(delivered(srv, user)), 60,
                       what=f"all {len(want)} acknowledged messages for {user}")
    except AssertionError:
        pass  # counted as losses below, with the numbers
    wait_until(lambda: queue_is_empty(srv), 60, what="an empty queue")
    assert srv.stop() == 0

    duplicates, lost, left_over, problems = 0, 0, 0, []
    for user, want in expected.items():
        seen = delivered(srv, user)
        lost += len(want - set(seen))
        for marker, copies in seen.items():
            assert marker in attempted, marker
            msg, rcpts = attempted[marker]
            assert f"{user}@example.test" in rcpts, (user, marker)
            _, sent_body = split_mail(msg)
            for name, data in copies:
                # Complete and exact: the delivered body equals the sent body.
                _, body = split_mail(data)
                assert body in (sent_body, sent_body.replace(b"\r\n", b"\n")), f"{name} differs from what was sent"
            if len(copies) > 1:
                duplicates += len(copies) - 1
                problems.append(f"{user}: {marker} delivered {len(copies)}x: {[n for n, _ in copies]}")
        if want - set(seen):
            problems.append(f"{user}: lost {sorted(want - set(seen))[:5]}")
        # An interrupted delivery's tmp/ file is removed by the next attempt,
        # and every message has had its last attempt once the queue is empty.
        tmp = srv.maildir(user) / "tmp"
        left = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
        if left:
            left_over += len(left)
            problems.append(f"{user}: tmp/ holds {left[:5]}")
    print(f"crash test: {len(acked)} acked of {len(attempted)} attempted, "
          f"{duplicates} duplicate copies, {lost} lost copies, {left_over} files left in tmp/")
    assert not problems, "\n".join(problems[:20])
    return duplicates, lost


def count_new(srv, user: str) -> int:
    try:
        with os.scandir(srv.maildir(user) / "new") as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0


def new_copy_appears(srv, user: str, before: int, timeout: float) -> bool:
    """Busy-polls (no sleep: the point is to catch the first moment) until
    `user`'s Maildir/new holds more than `before` files; False at the
    deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_new(srv, user) > before:
            return True
    return False


def run_under_load(srv, loader: Loader, kills: int, acks_before_kill, aim=None, while_down=None) -> None:
    """Restarts `srv` after each of `kills` SIGKILLs, each coming once the
    current process acknowledged `acks_before_kill()` messages (and then
    `aim(kill)` returned; `while_down(kill)` runs between the kill and the
    restart), then lets the last process acknowledge ACKS_PER_PHASE more."""
    for t in loader.threads:
        t.start()
    try:
        for kill in range(kills):
            gen, need = loader.generation, acks_before_kill()
            wait_until(lambda: loader.ack_count(gen) >= need, PHASE_TIMEOUT,
                       what=f"{need} acks before kill {kill + 1}")
            if aim is not None:
                aim(kill)
            srv.kill()
            if while_down is not None:
                while_down(kill)
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


def test_kill_9_under_load_loses_and_duplicates_nothing(tern):
    srv = tern()
    loader = Loader(srv.port)
    t_start = time.monotonic()
    run_under_load(srv, loader, KILLS, lambda: ACKS_PER_PHASE)
    with loader.lock:
        acked, attempted = set(loader.acked), dict(loader.attempted)
    assert len(acked) >= ACKS_PER_PHASE * (KILLS + 1)
    check_exactly_once(srv, acked, attempted)
    assert time.monotonic() - t_start < 120


def test_kill_storm_loses_and_duplicates_nothing(tern):
    """Kills in quick succession, some right after start-up while the
    recovered messages are being delivered, most while new mail arrives,
    half of them aimed at a batch between its renames and its records."""
    srv = tern()
    loader = Loader(srv.port)
    rnd = random.Random()

    def aim(kill: int) -> None:
        # Every other kill waits for the next copy to appear in new/: its
        # batch is then between its renames and its DONE records.
        if kill % 2:
            new_copy_appears(srv, "alice", count_new(srv, "alice"), 5)

    def while_down(kill: int) -> None:
        # Now and then alice reads her mail: a copy the killed batch moved
        # into new/ is then in cur/ when its redelivery looks for it.
        if kill % 4 == 1:
            read_copies(srv, "alice")

    t_start = time.monotonic()
    run_under_load(srv, loader, STORM_KILLS, lambda: rnd.randint(0, STORM_MAX_ACKS), aim, while_down)
    with loader.lock:
        acked, attempted = set(loader.acked), dict(loader.attempted)
    check_exactly_once(srv, acked, attempted)
    assert time.monotonic() - t_start < 120


def test_kill_right_after_250_delivers_exactly_once(tern):
    """One message at a time, SIGKILLed the moment its 250 arrives, or (every
    other round) the moment its first copy shows up in new/: between the
    Maildir rename and the DONE record is where a copy used to be written
    twice. In some rounds alice reads her mail before the restart, so the
    earlier copy is in cur/ by then."""
    srv = tern()
    attempted: dict[str, tuple[bytes, list[str]]] = {}
    t_start = time.monotonic()
    for i in range(KILLS_AFTER_250):
        marker = f"k{i}r{random.randrange(1 << 30):08x}"
        msg, rcpts = build_message(marker), ["alice@example.test", "bob@example.test"]
        watched = "alice" if i % 4 == 1 else "bob"
        before = count_new(srv, watched)
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="loader.test", timeout=10) as s:
            s.sendmail("loader@remote.test", rcpts, msg)
            if i % 2:
                new_copy_appears(srv, watched, before, 10)
            srv.kill()
        attempted[marker] = (msg, rcpts)
        if i % 8 == 1:
            read_copies(srv, "alice")
        srv.start()
        # The restarted process finishes the killed one's delivery: exactly
        # one copy each, before the next message is sent.
        for user in ("alice", "bob"):
            wait_until(lambda: marker in delivered(srv, user), 15, what=f"{marker} for {user}")
        wait_until(lambda: queue_is_empty(srv), 15, what=f"{marker} finished")
        for user in ("alice", "bob"):
            copies = delivered(srv, user)[marker]
            assert len(copies) == 1, f"kill {i + 1}: {marker} delivered {len(copies)}x to {user}: " \
                                     f"{[n for n, _ in copies]}"
    check_exactly_once(srv, set(attempted), attempted)
    assert time.monotonic() - t_start < 120
