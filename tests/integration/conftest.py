"""pytest fixtures for the Tern integration suite.

`tern` is a factory fixture: `tern()` or `tern({"limits": {...}})` starts a
real `tern serve` on 127.0.0.1:0 with its own temp data_dir and config (the
overrides are deep-merged into `ternlib.default_config`), waits for `ready`,
and returns a `ternlib.Tern` exposing `.port`, `.data_dir`, `.maildir(user)`,
`.queue_list()`, `.queue_show(id)`, `.wait_for_mail(user, n, timeout)`,
`.connect()`. Every server started through it is stopped at teardown
(SIGTERM, SIGKILL after a deadline), and its stderr is attached to failures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ternlib  # noqa: E402


@pytest.fixture
def tern(tmp_path, request):
    started: list[ternlib.Tern] = []

    def start(config_overrides: dict | None = None, start: bool = True) -> ternlib.Tern:
        srv = ternlib.Tern(tmp_path / f"tern{len(started)}", config_overrides)
        started.append(srv)
        if start:
            srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the tail of each server's stderr to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        factory = item.funcargs.get("tern") if hasattr(item, "funcargs") else None
        if factory is None:
            return
        tmp = item.funcargs.get("tmp_path")
        if tmp is None:
            return
        for log in sorted(Path(tmp).glob("tern*/stderr.*.log")):
            text = log.read_text(errors="replace")[-4000:]
            report.sections.append((f"tern stderr {log.parent.name}/{log.name}", text))
