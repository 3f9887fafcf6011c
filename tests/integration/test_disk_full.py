"""A full disk: messages that cannot be stored get 452 4.3.1 (never a 250),
every acknowledged message survives (delivered or still queued), and the
server keeps serving once space is back.

The data_dir is a small tmpfs mounted for this test (root only, as in CI).
"""

import subprocess

import pytest

from ternlib import queued_id, wait_until

FS_SIZE = "3m"


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
