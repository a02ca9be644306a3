"""Subprocess probe for the memory tests: load a model folder into a dtype (`FOLDER DTYPE [fp8|int4]`), or
repack one (`convert SRC DST WEIGHTS MAX_SHARD_BYTES`), and report host memory.

Prints JSON: RSS before, peak RSS during the work (VmHWM, reset first), and the loaded size when loading.
Run as its own process so nothing else in the test session inflates the peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_runtime.pipeline import DTYPES  # noqa: E402
from nextstep_runtime.weights.loading import load_model  # noqa: E402
from nextstep_runtime.weights.repack import convert_folder  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    report = {"rss_before_mb": before / 1024}
    if sys.argv[1] == "convert":
        convert_folder(sys.argv[2], sys.argv[3], sys.argv[4], max_shard_bytes=int(sys.argv[5]))
    else:
        weights = sys.argv[3] if len(sys.argv) > 3 else "bf16"
        model = load_model(Path(sys.argv[1]), DTYPES[sys.argv[2]], "cpu", fp8=weights == "fp8", int4=weights == "int4")
        report["loaded_mb"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    report["peak_mb"] = _status_kb("VmHWM") / 1024
    print(json.dumps(report))


if __name__ == "__main__":
    main()
