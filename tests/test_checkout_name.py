"""The README's test command works in a checkout named like the pack (`ComfyUI-NextStep`, not a valid Python
package name), with the pack's ComfyUI entry point `__init__.py` at its root (tests/pack_root.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pytest_runs_in_a_checkout_named_like_the_pack(tmp_path: Path) -> None:
    checkout = tmp_path / "ComfyUI-NextStep"
    (checkout / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml", "tests/pack_root.py"):
        shutil.copy2(REPO / name, checkout / name)
    (checkout / "tests" / "test_probe.py").write_text("def test_probe():\n    assert True\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=checkout,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
