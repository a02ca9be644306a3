"""Subprocess probe for test_load_memory: load a model folder into a dtype and report host memory.

Prints JSON: RSS before loading, peak RSS during loading (VmHWM, reset first), and the loaded size.
Run as its own process so nothing else in the test session inflates the peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_runtime.loading import load_model  # noqa: E402
from nextstep_runtime.pipeline import DTYPES  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    folder, dtype = Path(sys.argv[1]), DTYPES[sys.argv[2]]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    model = load_model(folder, dtype, "cpu")
    peak = _status_kb("VmHWM")
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "loaded_mb": loaded / 2**20}))


if __name__ == "__main__":
    main()
