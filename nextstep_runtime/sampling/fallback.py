"""The one way a faster path (the compiled flow head, CUDA graphs of the token step) gives way to the reference path:
the first failure it may fall back from switches it off, with one warning that says what happens now and how to skip
the attempt; any other failure (out of memory, an accelerator fault) reaches the caller. The warning carries the
error's text, never the error itself: a handler that keeps log records (ComfyUI's log view) would keep its frames,
and with them a run's KV cache."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


class Fallback:
    """A faster path that falls back to the reference for good once it has failed in a way `accepts` allows."""

    def __init__(self, what: str, consequence: str, accepts: Callable[[BaseException], bool]) -> None:
        self.what, self.consequence, self.accepts = what, consequence, accepts
        self.failure: str | None = None
        """Why the faster path is off (every later call takes the reference path), or None."""

    def fail(self, reason: str) -> None:
        self.failure = reason
        log.warning("NextStep: %s (%s); %s", self.what, reason, self.consequence)

    def run(self, fast: Callable[[], T], reference: Callable[[], T]) -> T:
        """fast(), or reference() when the faster path is off or fails as `accepts` allows."""
        if self.failure is not None:
            return reference()
        try:
            return fast()
        except Exception as exc:  # noqa: BLE001 - sorted by `accepts`; what it does not accept is raised
            if not self.accepts(exc):
                raise
            self.fail(f"{type(exc).__name__}: {first_line(exc)}")
        return reference()
