"""Crash points for the crash-safety tests (tests/test_crash_safety.py).

With ``VSPEMU_TEST_CRASH_AT=<name>[,<name>...]`` in its environment, a storage-system process exits at once
(``os._exit(9)``: nothing flushed or closed, as with ``kill -9``) when it reaches a crash point of that name.
Without the variable a crash point does nothing. Nothing but the tests sets it.
"""

from __future__ import annotations

import os

_AT = frozenset(filter(None, os.environ.get("VSPEMU_TEST_CRASH_AT", "").split(",")))


def crash_point(name: str) -> None:
    if name in _AT:
        os._exit(9)
