"""Fault injection for the reliability tests: `LLMC_TEST_KILL_AT=<point>` makes the process SIGKILL
itself when it reaches that named point (e.g. `block:3`, `save`), the way a crash or an OOM
killer would stop it. Unset (always, outside tests) this does nothing."""

from __future__ import annotations

import os
import signal

ENV = "LLMC_TEST_KILL_AT"


def kill_point(point: str) -> None:
    """SIGKILL this process if the environment names `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
