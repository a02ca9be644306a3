"""The pack as ComfyUI loads it (its root __init__.py imported as a package), plus the fixture models laid
out as a ComfyUI models folder, for the node tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from goldens import TINY_MODEL, TINY_VAE_FILE

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = TINY_MODEL.name
VAE_FILE = TINY_VAE_FILE.name
PACK_MODULE = "comfyui_nextstep_under_test"


def load_pack() -> ModuleType:
    """Import the pack through its entry point under a package name, as ComfyUI's custom-node loader does."""
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_MODULE]


def run_node(name: str, *args, **kwargs):
    """Run a node of the pack the way ComfyUI's executor does and return its outputs."""
    cls = load_pack().NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(*args, **kwargs)


def install_fixture_models(models_dir: Path) -> Path:
    """models_dir/nextstep/tiny-nextstep/ and models_dir/vae/tiny-nextstep-vae.safetensors, registered as
    search folders with the pack's host adapter."""
    host = importlib.import_module(f"{load_pack().__name__}.nodes.host")
    for key, source in ((host.MODEL_FOLDER_KEY, TINY_MODEL), (host.VAE_FOLDER_KEY, TINY_VAE_FILE)):
        (models_dir / key).mkdir(parents=True, exist_ok=True)
        (models_dir / key / source.name).symlink_to(source)
        host.add_model_folder(key, str(models_dir / key))
    return models_dir
