"""Storage faults: a full disk, the free-space reserve, a file-size limit, a
file system that turns read-only or fails writes and syncs. What cannot be
stored gets 452 4.3.1 or 451 4.3.0 (never a 250), every acknowledged message
survives (delivered or still queued), and the server recovers by itself once
the storage does, without a restart.

The faults are real: a small tmpfs mounted for the test (root only, as in
CI), `prlimit --fsize`, and `faultfs.py`, a pass-through FUSE file system
that the test switches to fail with EROFS or EIO (see its docstring for why
a `mount -o remount,ro` cannot be used while the server runs).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ternlib import ehlo_keywords, queued_id, wait_until

FS_SIZE = "3m"
FAULTFS = Path(__file__).resolve().parent / "faultfs.py"


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def send(c, marker: str, size: int):
    """One transaction; returns ("ok", queue_id) or ("tempfail", reply)."""
    r = c.cmd("MAIL FROM:<sender@remote.test>")
    if r.code != 250:
        return "tempfail", r
    assert c.cmd("RCPT TO:<alice@example.test>").code == 250
    assert c.cmd("DATA").code == 354
    line = ("x" * 76 + "\r\n").encode()
    body = f"Subject: {marker}\r\n\r\n{marker}\r\n".encode() + line * (size // len(line))
    c.send(body + b".\r\n")
    r = c.reply()
    if r.code == 250:
        return "ok", queued_id(r)
    return "tempfail", r


def test_full_disk_tempfails_and_loses_nothing(tern, small_fs):
    srv = tern({
        "data_dir": str(small_fs),
        "limits": {"min_free_space": 1, "max_message_size": 4 * 1024 * 1024},
        "delivery": {"retry_initial": "1s", "retry_max": "2s"},
    })
    srv.data_dir = small_fs  # where the harness looks for Maildirs
    acked = {}
    tempfail = None
    with srv.connect() as c:
        c.ehlo()
        for i in range(40):
            outcome, value = send(c, f"fill-{i}", 400 * 1024)
            if outcome == "ok":
                acked[f"fill-{i}"] = value
            else:
                tempfail = value
                break
        assert tempfail is not None, "the 3 MiB file system never filled up"
        # Insufficient storage is a temporary failure with 4.3.1 (RFC 3463).
        assert tempfail.code == 452 and tempfail.enhanced == "4.3.1", tempfail
        # The same session still works.
        assert c.cmd("NOOP").code == 250
        assert c.cmd("RSET").code == 250

    def subjects():
        return {m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                for m in srv.mails("alice") if b"Subject: " in m}

    # Every acknowledged message is in the Maildir or still queued (its
    # delivery deferred by the full disk).
    assert acked, "nothing was accepted before the disk filled"
    queued = srv.queue_list()
    delivered_before = subjects()
    for marker, qid in acked.items():
        assert marker in delivered_before or qid in queued, (marker, qid, queued)

    # Make room: the messages already delivered are read by their owner.
    for f in srv.mail_files("alice"):
        f.unlink()

    def accepted_again():
        with srv.connect() as c:
            c.ehlo()
            outcome, _ = send(c, "after", 1024)
            return outcome == "ok"

    wait_until(accepted_again, 20, interval=0.5, what="a message accepted once space is back")
    # Deferred deliveries are retried and everything arrives. The owner keeps
    # reading (removing) new mail: the spool and the Maildirs share this 3 MiB
    # file system, and the spool's copies of the deferred messages stay until
    # they are delivered, so the room one read frees is what the next
    # delivery needs (a deferred message written on a disk the spool still
    # fills would wait for the administrator, as with any MTA).
    wanted = set(acked) | {"after"}
    seen = set(delivered_before)

    def read_new_mail():
        for f in srv.mail_files("alice"):
            data = f.read_bytes()
            if b"Subject: " in data:
                seen.add(data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode())
            f.unlink()
        return wanted <= seen

    wait_until(read_new_mail, 30, interval=0.2, what="every acknowledged message delivered")


def test_full_mailbox_disk_defers_then_delivers(tern, small_fs):
    """The spool is fine but the mailbox's disk is full: the message is
    accepted, its delivery deferred (never bounced, never lost), and
    delivered by a retry once there is space."""
    maildir = small_fs / "alice" / "Maildir"
    srv = tern({
        "user": [{"name": "alice", "addresses": ["alice@example.test"], "maildir": str(maildir)}],
        "local": {"postmaster": "alice"},
        "aliases": None,
        "delivery": {"retry_initial": "1s", "retry_max": "1s"},
    })
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # fill the mailbox file system completely
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with srv.connect() as c:
        c.ehlo()
        outcome, qid = send(c, "deferred-msg", 64 * 1024)
        assert outcome == "ok", qid
    wait_until(lambda: "deferred" in srv.queue_list(), 15, what="the delivery to be deferred")
    assert qid in srv.queue_list()
    assert srv.mail_files("alice") == []
    filler.unlink()
    (mail,) = srv.wait_for_mail("alice", 1, timeout=20)
    assert b"Subject: deferred-msg" in mail
    wait_until(lambda: qid not in srv.queue_list(), 15, what="the message to leave the queue")


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_mail_is_accepted_as_soon_as_space_returns(tern, small_fs):
    """The free-space figure is cached for the MAIL that it lets through; a
    figure below the reserve is measured again, so the MAIL right after
    space came back is accepted, not refused for another second."""
    reserve = 1024 * 1024
    srv = tern({"data_dir": str(small_fs), "limits": {"min_free_space": reserve}})
    srv.data_dir = small_fs  # where the harness looks for Maildirs
    ballast = small_fs / "ballast"
    with srv.connect() as c:
        c.ehlo()
        with open(ballast, "wb") as f:
            while free_bytes(small_fs) >= reserve // 2:
                f.write(b"\0" * 65536)
                f.flush()
        refused = c.cmd("MAIL FROM:<sender@remote.test>")
        assert (refused.code, refused.enhanced) == (452, "4.3.1"), refused
        # Within the second the refused figure stays cached for.
        ballast.unlink()
        assert free_bytes(small_fs) >= reserve
        accepted = c.cmd("MAIL FROM:<sender@remote.test>")
        assert accepted.code == 250, accepted
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: space-back\r\n\r\nhello\r\n.\r\n")
        c.expect(250)
    (mail,) = srv.wait_for_mail("alice", 1)
    assert b"Subject: space-back" in mail


FSIZE_LIMIT = 1024 * 1024


def test_file_size_limit_lowers_the_size_limit_and_the_server_lives_on(tern):
    """Started under `prlimit --fsize`: the SIZE Tern announces and enforces
    is lowered below the limit, so a message that could never be stored gets
    552 5.3.4 at once instead of being deferred until its sender gives up
    (SIGXFSZ is ignored and EFBIG handled for a limit lowered while running),
    messages that fit are accepted and delivered (spool segments roll before
    they reach the limit), and the process lives on."""
    srv = tern({"delivery": {"retry_initial": "1s", "retry_max": "2s"}}, start=False)
    srv.launcher = ["prlimit", f"--fsize={FSIZE_LIMIT}", "--"]
    srv.start()
    with srv.connect() as c:
        size = int(ehlo_keywords(c.ehlo())["SIZE"])
        assert 0 < size < FSIZE_LIMIT, size
        assert c.cmd(f"MAIL FROM:<s@remote.test> SIZE={FSIZE_LIMIT}").code == 552
        # Without SIZE=, the end of data says it.
        for marker, length in [("too-big", 2 * FSIZE_LIMIT), ("just-too-big", FSIZE_LIMIT - 100)]:
            outcome, reply = send(c, marker, length)
            assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        # Several that fit, together more than one segment can hold.
        accepted = []
        for i in range(4):
            outcome, qid = send(c, f"fits-{i}", 300 * 1024)
            assert outcome == "ok", qid
            accepted.append(f"fits-{i}")
        outcome, qid = send(c, "small", 1024)
        assert outcome == "ok", qid
        assert c.cmd("NOOP").code == 250
    assert srv.proc.poll() is None, "tern died under the file-size limit"
    mails = srv.wait_for_mail("alice", 5, timeout=30)
    subjects = {m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in mails}
    assert subjects == set(accepted) | {"small"}
    assert srv.proc.poll() is None


# --------------------------------------------------------------- faultfs


@pytest.fixture
def faulty_fs(tmp_path):
    """A faultfs mount (see faultfs.py); yields its mount point. The fault
    switch is `set_fault(mount, "erofs")` and so on. Ask for it before
    `tern`, so that the servers on it are stopped before it is unmounted."""
    probe = subprocess.run([sys.executable, "-c", "import fuse"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("fusepy (with libfuse2) is missing; scripts/test.sh step_deps installs it: "
                    + probe.stderr.strip().splitlines()[-1])
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: EIO/EROFS injection is covered by the "
                    "spool's own fault tests (spool::tests_faults)")
    backing, mnt = tmp_path / "backing", tmp_path / "faulty"
    backing.mkdir()
    mnt.mkdir()
    log = open(tmp_path / "faultfs.log", "wb")
    proc = subprocess.Popen([sys.executable, str(FAULTFS), str(backing), str(mnt)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: os.path.ismount(mnt) or proc.poll() is not None, 10,
                   what="the FUSE file system to mount")
    except AssertionError:
        pass
    if not os.path.ismount(mnt):
        proc.kill()
        proc.wait()
        why = (tmp_path / "faultfs.log").read_text(errors="replace").strip()[-500:]
        pytest.skip(f"cannot mount a FUSE file system here ({why or 'no reason given'}): "
                    "EIO/EROFS injection is covered by the spool's own fault tests "
                    "(spool::tests_faults)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def set_fault(mnt, command: str) -> None:
    (mnt / ".faultfs").write_text(command)


def on_faulty_fs(mnt) -> dict:
    """Overrides that put the spool and alice's Maildir on the faulty fs."""
    return {
        "spool": {"dir": str(mnt / "spool"), "segment_size": 1024 * 1024},
        "user": [{"name": "alice", "addresses": ["alice@example.test"],
                  "maildir": str(mnt / "alice" / "Maildir")}],
        "local": {"postmaster": "alice"},
        "aliases": None,
        "delivery": {"retry_initial": "1s", "retry_max": "1s"},
    }


def subjects_of(srv, user="alice") -> set:
    return {m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for m in srv.mails(user) if b"Subject: " in m}


@pytest.mark.parametrize("fault", ["erofs", "eio"])
def test_failing_storage_tempfails_then_recovers_by_itself(faulty_fs, tern, fault):
    """The spool's and the mailbox's file system turns read-only (or fails
    every write with EIO) under the running server: new messages get 451
    4.3.0, a message accepted before stays queued; once it works again, the
    very next message is accepted and everything accepted is delivered,
    without a restart."""
    srv = tern(on_faulty_fs(faulty_fs))
    with srv.connect() as c:
        c.ehlo()
        assert send(c, "before", 1024)[0] == "ok"
    srv.wait_for_mail("alice", 1)
    # Only the mailbox is read-only: accepted, its delivery deferred.
    set_fault(faulty_fs, f"{fault} alice/")
    with srv.connect() as c:
        c.ehlo()
        outcome, deferred_id = send(c, "deferred", 1024)
        assert outcome == "ok", deferred_id
    wait_until(lambda: "deferred" in srv.queue_list(), 15, what="the delivery to be deferred")
    # Now the spool too.
    set_fault(faulty_fs, fault)
    with srv.connect() as c:
        c.ehlo()
        for marker in ("refused-1", "refused-2"):
            outcome, reply = send(c, marker, 1024)
            assert outcome == "tempfail" and (reply.code, reply.enhanced) == (451, "4.3.0"), reply
        assert c.cmd("NOOP").code == 250
        set_fault(faulty_fs, "ok")
        outcome, qid = send(c, "after", 1024)
        assert outcome == "ok", qid
    assert srv.proc.poll() is None
    wait_until(lambda: subjects_of(srv) >= {"before", "deferred", "after"}, 20,
               what="every accepted message delivered")
    assert subjects_of(srv) == {"before", "deferred", "after"}
    assert len(srv.mail_files("alice")) == 3, "one copy each, none twice"
    wait_until(lambda: deferred_id not in srv.queue_list(), 15, what="the queue to drain")


def test_a_failed_fsync_is_never_acknowledged_nor_resurrected(faulty_fs, tern):
    """The spool's fdatasync fails (EIO) while its writes succeed: the
    message gets 451 4.3.0, so does the next one while syncs still fail;
    once syncs work the next message is accepted, and after a crash and
    restart the records whose sync failed are not delivered."""
    srv = tern(on_faulty_fs(faulty_fs))
    with srv.connect() as c:
        c.ehlo()
        assert send(c, "before", 1024)[0] == "ok"
        set_fault(faulty_fs, "syncfail spool/")
        for marker in ("unsynced-1", "unsynced-2"):
            outcome, reply = send(c, marker, 1024)
            assert outcome == "tempfail" and (reply.code, reply.enhanced) == (451, "4.3.0"), reply
        set_fault(faulty_fs, "ok")
        outcome, qid = send(c, "after", 1024)
        assert outcome == "ok", qid
    wait_until(lambda: subjects_of(srv) >= {"before", "after"}, 20, what="both delivered")
    srv.restart_after_kill()
    with srv.connect() as c:
        c.ehlo()
        assert send(c, "after-restart", 1024)[0] == "ok"
    # Recovered messages are delivered at start-up, before or with this one.
    wait_until(lambda: "after-restart" in subjects_of(srv), 20, what="the new message")
    wait_until(lambda: srv.queue_list().strip() == "queue is empty", 15,
               what="the queue to drain")
    assert subjects_of(srv) == {"before", "after", "after-restart"}
    assert len(srv.mail_files("alice")) == 3, "one copy each, none twice"


@pytest.mark.parametrize("fault", ["eio", "erofs", "syncfail"])
def test_failing_mailbox_storage_defers_then_delivers(faulty_fs, tern, fault):
    """The spool is fine but the mailbox's file system fails: the message is
    accepted, its delivery deferred (never marked delivered, never lost),
    and delivered by a retry once the storage works again."""
    maildir = faulty_fs / "alice" / "Maildir"
    srv = tern({
        "user": [{"name": "alice", "addresses": ["alice@example.test"], "maildir": str(maildir)}],
        "local": {"postmaster": "alice"},
        "aliases": None,
        "delivery": {"retry_initial": "1s", "retry_max": "1s"},
    })
    with srv.connect() as c:
        c.ehlo()
        assert send(c, "warm-up", 1024)[0] == "ok"
    srv.wait_for_mail("alice", 1)
    set_fault(faulty_fs, fault)
    with srv.connect() as c:
        c.ehlo()
        outcome, qid = send(c, "deferred-msg", 4 * 1024)
        assert outcome == "ok", qid
    wait_until(lambda: "deferred" in srv.queue_list(), 15, what="the delivery to be deferred")
    assert "deferred-msg" not in subjects_of(srv)
    set_fault(faulty_fs, "ok")
    wait_until(lambda: "deferred-msg" in subjects_of(srv), 20, what="the retry to deliver")
    wait_until(lambda: qid not in srv.queue_list(), 15, what="the message to leave the queue")
    assert len(srv.mail_files("alice")) == 2
