"""pytest plugin (named in pyproject's addopts): collect the repository root as a plain folder, not a package.

Why: the root holds ComfyUI's entry point `__init__.py`, so pytest would treat the checkout as a Python package
and import that file, under the checkout folder's name, before any test. A checkout named like the pack
(`ComfyUI-NextStep`) is no valid package name, and the relative imports of the entry point then fail every
test's setup. The tests load the pack the way ComfyUI does instead (nodes_pack.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path == parent.config.rootpath:
        return pytest.Dir.from_parent(parent, path=path)
    return None
