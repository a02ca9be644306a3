"""ComfyUI entry point of ComfyUI-NextStep (loaded from custom_nodes/ComfyUI-NextStep/).

ComfyUI imports this file as a package named after its path, so the pack's own modules are reached with
relative imports. The bundled runtime is registered as the top-level `nextstep_runtime` without putting
the pack folder on sys.path: that folder also holds `nodes/`, which would shadow ComfyUI's own `nodes`
module for every other pack.
"""

import importlib.util
import sys
from pathlib import Path

RUNTIME = "nextstep_runtime"


def _register_bundled_runtime() -> None:
    """Import the runtime shipped next to this file, so the pack works without being pip-installed."""
    if RUNTIME in sys.modules:
        return
    package_dir = Path(__file__).resolve().parent / RUNTIME
    spec = importlib.util.spec_from_file_location(RUNTIME, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[RUNTIME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[RUNTIME]
        raise


_register_bundled_runtime()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402  (needs the runtime above)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
