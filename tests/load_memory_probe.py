"""Subprocess probe for the memory tests: load a model folder into a dtype (`FOLDER DTYPE [fp8|int4]`), or
repack one (`convert SRC DST WEIGHTS MAX_SHARD_BYTES`), and report host memory.

Prints JSON: RSS before, peak RSS during the work (VmHWM, reset first), and the loaded size when loading.
Run as its own process so nothing else in the test session inflates the peak. The same work is done once on the
tiny fixture model first, and the peak reset after it: what the first use of a code path costs (library pages
faulted in, allocator arenas, thread pools; about 15-70 MB, depending on the torch build) is then part of the
baseline, and the measured growth is what the work itself holds.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TINY_MODEL = Path(__file__).resolve().parent / "fixtures" / "tiny-nextstep"

from model_folders import load_on  # noqa: E402

from nextstep_runtime import DTYPES  # noqa: E402
from nextstep_runtime.weights.repack import convert_folder  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load(folder: Path, dtype: str, weights: str) -> float:
    """Load `folder` and return the loaded model's size in MB."""
    model = load_on(folder, DTYPES[dtype], "full" if weights == "bf16" else weights)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def main() -> None:
    if sys.argv[1] == "convert":
        source, destination, weights, max_shard = sys.argv[2:6]
        with tempfile.TemporaryDirectory() as scratch:
            convert_folder(TINY_MODEL, Path(scratch) / "warm-up", weights)
        work = partial(convert_folder, source, destination, weights, max_shard_bytes=int(max_shard))
    else:
        folder, dtype = Path(sys.argv[1]), sys.argv[2]
        weights = sys.argv[3] if len(sys.argv) > 3 else "bf16"
        _load(TINY_MODEL, dtype, weights)
        work = partial(_load, folder, dtype, weights)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    report = {"rss_before_mb": _status_kb("VmRSS") / 1024}
    loaded = work()
    if loaded is not None:
        report["loaded_mb"] = loaded
    report["peak_mb"] = _status_kb("VmHWM") / 1024
    print(json.dumps(report))


if __name__ == "__main__":
    main()
