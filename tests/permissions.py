"""Folders a user may not read, for tests of what the runtime does with them.

`chmod 000` blocks reads only for a process without root's privilege over files: tests often run as root (in
containers, in CI), where it blocks nothing. There the code under test runs in a child process that first enters
a new user namespace (`unshare(CLONE_NEWUSER)`): it keeps its uid, but no longer any privilege over files outside
that namespace, so permission bits apply to it as to any user. Where the kernel refuses user namespaces to root,
an unreadable folder cannot be made at all; that, and only that, skips the test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

CLONE_NEWUSER = 0x10000000


def _drop_file_privileges() -> None:
    """In the child, before it runs anything: a user namespace of its own, so root's override of file permissions
    no longer applies."""
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER) failed")


def unprivileged() -> Callable[[], None] | None:
    """The `preexec_fn` for a child that must be refused what `chmod 000` forbids: None when not root; skips the test
    where root cannot leave its privilege behind."""
    if os.geteuid() != 0:
        return None
    probe = subprocess.run([sys.executable, "-c", "import os; os.listdir('/proc/self')"],
                           preexec_fn=_drop_file_privileges, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root where user namespaces are refused: chmod 000 cannot make a folder unreadable")
    return _drop_file_privileges


@contextlib.contextmanager
def unreadable(*paths: Path) -> Iterator[None]:
    """`paths` with mode 000 for the duration (restored after, so pytest can remove them)."""
    modes = [path.stat().st_mode for path in paths]
    for path in paths:
        path.chmod(0)
    try:
        yield
    finally:
        for path, mode in zip(paths, modes):
            path.chmod(mode)


def run_unprivileged(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Python `code` in a child as an ordinary user would run it (see above), with the tests' import path."""
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join(filter(None, [str(tests.parent), str(tests), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": path, **(env or {})},
                          preexec_fn=unprivileged(), capture_output=True, text=True, timeout=300)
