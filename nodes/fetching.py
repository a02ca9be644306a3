"""A released model picked in a loader before it is on disk is fetched when the workflow runs: into
models/nextstep/<name>/ (VAE included), with ComfyUI's progress bar in bytes and its Cancel button, which keeps what
arrived for the next run (nextstep_runtime/weights/fetch.py)."""

from __future__ import annotations

import logging

from nextstep_runtime.weights.fetch import fetch_model
from nextstep_runtime.weights.released import RELEASED_MODELS

from . import catalog, host

log = logging.getLogger("NextStep")


def fetch_if_absent(model_name: str) -> None:
    """Fetch released model `model_name` into its folder when it is not complete on disk; nothing for any other name."""
    if model_name not in catalog.absent_released_models():
        return
    sink = None

    def progress(done: int, total: int) -> None:
        nonlocal sink
        host.check_interrupt()  # raising here stops the transfer; what arrived stays for the next run
        sink = sink or host.progress_sink(total)
        sink(done, total, None)

    fetch_model(RELEASED_MODELS[model_name], catalog.fetch_folder(model_name), progress,
                announce=lambda line: log.info("NextStep: %s", line))
    log.info("NextStep: %s is complete in %s", model_name, catalog.fetch_folder(model_name))
