"""The `tern` command line: check-config, serve with a bad config, graceful
shutdown on SIGTERM, and `queue list` / `queue show` for a relayed message."""

import re
import signal
import subprocess

import pytest

from ternlib import TERN_BIN, Tern, TernStartError, queued_id, to_toml, wait_until


def run(*args, timeout=30):
    return subprocess.run([str(TERN_BIN), *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def output(res) -> str:
    return (res.stdout + res.stderr).decode("utf-8", errors="replace")


def test_check_config_valid(tmp_path):
    srv = Tern(tmp_path)  # writes the suite's default config, does not start
    res = run("check-config", str(srv.config_path))
    assert res.returncode == 0, output(res)
    assert "ok" in res.stdout.decode().lower()


def test_check_config_minimal_file_is_valid(tmp_path):
    f = tmp_path / "empty.toml"
    f.write_text("# every key is optional\n")
    res = run("check-config", str(f))
    assert res.returncode == 0, output(res)


BAD_VALUES = [
    ({"limits": {"max_command_line": 100}}, "max_command_line"),  # must be >= 512
    ({"limits": {"bare_lf": "maybe"}}, "bare_lf"),
    ({"limits": {"command_timeout": "soon"}}, "command_timeout"),
    ({"limits": {"max_message_size": "big"}}, "max_message_size"),
    ({"listener": [{"address": "not-an-address", "role": "mx"}]}, "address"),
    ({"relay": {"trusted_networks": ["300.1.2.3/8"]}}, "trusted_networks"),
    ({"log": {"format": "xml"}}, "format"),
    ({"limits": {"no_such_limit": 1}}, "no_such_limit"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_check_config_bad_value_names_key(tmp_path, override, key):
    srv = Tern(tmp_path, override)
    res = run("check-config", str(srv.config_path))
    assert res.returncode == 1, output(res)
    assert key in output(res), output(res)


def test_check_config_missing_file(tmp_path):
    res = run("check-config", str(tmp_path / "absent.toml"))
    assert res.returncode != 0
    assert output(res).strip()


def test_check_config_not_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("hostname = \n[[[")
    res = run("check-config", str(f))
    assert res.returncode == 1, output(res)


def test_check_config_reports_every_error_with_its_key_and_line(tmp_path):
    """Syntax, unknown keys, wrong types and invalid values: one run lists them all."""
    f = tmp_path / "many.toml"
    f.write_text(
        'hostname = "mx.example.org"\n'      # 1
        "[limits]\n"                          # 2
        'max_errors = "many"\n'              # 3 wrong type
        "max_recipients = 0\n"               # 4 invalid value
        "bogus = 1\n"                        # 5 unknown key
        "[spool]\n"                          # 6
        "segment_size = = 3\n"               # 7 TOML syntax
        "[log]\n"                            # 8
        'format = "xml"\n'                   # 9 invalid value
    )
    res = run("check-config", str(f))
    assert res.returncode == 1, output(res)
    lines = res.stderr.decode().splitlines()
    for line_no, key in [(3, "limits.max_errors"), (4, "limits.max_recipients"), (5, "limits.bogus"),
                         (7, None), (9, "log.format")]:
        prefix = f"{f}:{line_no}: "
        hits = [l for l in lines if l.startswith(prefix) and (key is None or l.startswith(prefix + key + ": "))]
        assert hits, f"no error for line {line_no} ({key}) in:\n" + "\n".join(lines)


def serve_expecting_failure(config_path):
    """Runs `tern serve` that must refuse to start; returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([str(TERN_BIN), "serve", "--config", str(config_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_serve_with_bad_config_exits_nonzero(tmp_path):
    srv = Tern(tmp_path, {"limits": {"max_command_line": 100}})
    rc, out, err = serve_expecting_failure(srv.config_path)
    assert rc != 0
    assert b"ready" not in out
    assert b"max_command_line" in out + err, out + err


def test_sigterm_graceful_shutdown_421_and_exit_0(tern):
    srv = tern()
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        srv.proc.send_signal(signal.SIGTERM)
        r = c.reply(timeout=15)
        assert r.code == 421 and r.enhanced == "4.3.2", r
        assert c.is_closed()
    srv.proc.wait(timeout=15)
    assert srv.proc.returncode == 0, srv.stderr()


def test_restart_keeps_queue_and_port_0_changes(tern):
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test>").code == 250
        assert c.cmd("RCPT TO:<far@remote.test>").code == 250
        assert c.cmd("DATA").code == 354
        qid = queued_id(c.cmd(b"Subject: keep me\r\n\r\nkept\r\n."))
    assert srv.stop() == 0
    srv.start()
    assert qid in srv.queue_list()


def relayed(srv) -> str:
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<sender@remote.test> SIZE=200").code == 250
        assert c.cmd("RCPT TO:<far@remote.test>").code == 250
        assert c.cmd("RCPT TO:<near@elsewhere.test>").code == 250
        assert c.cmd("DATA").code == 354
        return queued_id(c.cmd(b"Subject: relayed via tern\r\n\r\nrelayed body line\r\n."))


def test_queue_list_and_show_relayed_message(tern):
    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    qid = relayed(srv)
    listing = wait_until(lambda: (lambda out: out if qid in out else None)(srv.queue_list()), 10,
                         what="message in queue list")
    block = listing[listing.index(qid):]
    assert "sender@remote.test" in block
    for rcpt in ("far@remote.test", "near@elsewhere.test"):
        line = next(ln for ln in block.splitlines() if rcpt in ln)
        assert re.search(r"waiting for outbound delivery|deferred", line.lower()), listing

    show = srv.queue_show(qid)
    assert qid in show
    assert "sender@remote.test" in show
    assert "far@remote.test" in show and "near@elsewhere.test" in show
    assert "Subject: relayed via tern" in show
    assert "relayed body line" in show
    assert "mx.test.example" in show  # Tern's own Received: header


def test_queue_show_unknown_id_fails(tern):
    srv = tern()
    res = srv.cli("queue", "show", "DOESNOTEXIST")
    assert res.returncode != 0
    assert output(res).strip()


def test_queue_list_empty(tern):
    srv = tern()
    res = srv.cli("queue", "list")
    assert res.returncode == 0, output(res)
    assert "@" not in res.stdout.decode(errors="replace")


def test_config_writer_roundtrip(tmp_path):
    """Guards the harness itself: the TOML we write is what we meant."""
    import tomllib

    cfg = {"a": 1, "t": {"x": ["y"], "m": {"k.j": "v"}}, "arr": [{"n": "a"}, {"n": "b"}]}
    assert tomllib.loads(to_toml(cfg)) == cfg


def test_second_server_on_the_same_spool_refuses_to_start(tern):
    first = tern()
    rc, out, err = serve_expecting_failure(first.config_path)
    assert rc != 0
    assert b"ready" not in out
    assert b"in use by another tern process" in err, err
    # The first one is unharmed.
    with first.connect() as c:
        assert c.cmd("NOOP").code == 250


def test_an_unreadable_spool_segment_is_named_at_start_up(tern):
    srv = tern(start=False)
    spool = srv.data_dir / "spool"
    spool.mkdir(parents=True)
    # Not a file at all: it cannot be read, and that is not "damage" to set
    # aside (a permission or a disk error may hide intact records).
    (spool / "00000009.log").mkdir()
    with pytest.raises(TernStartError) as failed:
        srv.start()
    assert "00000009.log" in str(failed.value), failed.value
    assert "panicked" not in str(failed.value)


def test_sighup_does_not_stop_the_server(tern):
    srv = tern()
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "server.sighup" in srv.stderr(), 5, what="the SIGHUP notice")
    assert srv.proc.poll() is None, "SIGHUP stopped the server"
    with srv.connect() as c:
        c.ehlo()
        assert c.cmd("NOOP").code == 250


def test_queue_commands_without_a_running_server(tern):
    """list/show read the spool from disk (same JSON shape as the server's,
    without live state); the commands that steer the queue exit 75."""
    import json

    srv = tern({"relay": {"trusted_networks": ["127.0.0.0/8"]}})
    qid = relayed(srv)
    assert srv.stop() == 0
    res = srv.cli("queue", "list", "--json")
    assert res.returncode == 0, output(res)
    listing = json.loads(res.stdout)
    msg = next(m for m in listing["messages"] if m["id"] == qid)
    assert msg["sender"] == "sender@remote.test"
    assert {r["address"] for r in msg["recipients"]} == {"far@remote.test", "near@elsewhere.test"}
    assert all(r["destination"] is None and r["wait"] is None for r in msg["recipients"])
    res = srv.cli("queue", "show", qid, "--json")
    assert res.returncode == 0, output(res)
    assert json.loads(res.stdout)["helo"]
    for args in (("flush",), ("hold", qid), ("release", qid), ("delete", qid), ("destinations",)):
        res = srv.cli("queue", *args)
        assert res.returncode == 75, (args, output(res))
        assert "not running" in output(res), output(res)
    assert qid in srv.queue_list()
