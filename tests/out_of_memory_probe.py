"""Subprocess probe for test_out_of_memory: a run that the host allocator cannot serve, under an address-space
limit, must end in a NextStepError, and the same loaded pipeline must then give the same image as before.

Prints JSON: the error message (or null) and whether the image after the failure equals the one before it.
Run as its own process: the limit (RLIMIT_AS) holds for the rest of the process.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nextstep_runtime import GenerationSettings, NextStepError, NextStepPipeline  # noqa: E402

HEADROOM = 48 * 2**20
"""Address space left above what the process holds after a small run: plenty for another small run, far too
little for 64 images of 512x512 (their KV cache and noise alone take hundreds of MB)."""


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


def main() -> None:
    loaded = NextStepPipeline.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
    # A host that cannot tell its free memory (the check is skipped): the failure must come from the allocator,
    # as it does when another process takes the memory after the check.
    pipe = NextStepPipeline(loaded.model, loaded.tokenizer, loaded.normalization, loaded.vae,
                            free_memory=lambda device: None)
    small = GenerationSettings(width=32, height=32, steps=2, seed=3)
    before = pipe.generate("a fox", small).images
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    message = None
    try:
        pipe.generate("a fox", GenerationSettings(width=512, height=512, batch=64, steps=28))
    except NextStepError as exc:
        message = str(exc)
    after = pipe.generate("a fox", small).images
    print(json.dumps({"message": message, "identical": bool(torch.equal(before, after))}))


if __name__ == "__main__":
    main()
