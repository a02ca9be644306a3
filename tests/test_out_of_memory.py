"""Running out of memory mid-run (here: the host allocator under an address-space limit) is one clear error,
and the loaded model stays usable: the next run gives the same image as before the failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from goldens import TINY_MODEL

PROBE = Path(__file__).parent / "out_of_memory_probe.py"


def test_host_allocator_failure_is_a_clear_error_and_the_model_stays_usable() -> None:
    result = subprocess.run([sys.executable, str(PROBE), str(TINY_MODEL)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    message = report["message"]
    assert message is not None, "the oversized run did not fail under the address-space limit"
    assert message.startswith("out of memory on cpu during sampling (an allocation of "), message
    assert "make the batch or the image smaller" in message
    assert report["identical"]
