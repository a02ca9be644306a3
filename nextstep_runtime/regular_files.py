"""Model files are read only when they are regular files.

Opening a FIFO for reading waits until something writes to it, which may be never: a FIFO named
`model.safetensors.index.json` would hold a planning request, a doctor report or a whole ComfyUI route worker
forever. A device file would be read without end. So configs, shard indexes and weights are opened through
`open_regular`, which opens without waiting and refuses anything but a regular file at once, naming it; readers that
take a path (safetensors, torch.load, the tokenizer) check it first with `require_regular`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import NextStepError

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _refusal(path: Path, mode: int) -> NextStepError:
    kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
    return NextStepError(f"{path} is {kind}, not a regular file; a model's config, index and weights must be plain "
                         f"files: put the real file there")


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for binary reading, without ever waiting on it; a NextStepError naming it when it is not a
    regular file. Missing files raise FileNotFoundError, as open() does."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise _refusal(path, mode)
    return os.fdopen(descriptor, "rb")


def require_regular(path: Path) -> Path:
    """`path`, when it is a regular file (through symlinks); for readers that open the path themselves."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise _refusal(path, mode)
    return path
