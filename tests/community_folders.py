"""The AutoRound / GPTQ 4-bit fixtures (tests/fixtures/autoround, made with the real auto-round: see its
PROVENANCE.md) as complete model folders, and their tensors read plainly for checking the loader against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from goldens import FIXTURES, TINY_MODEL
from reference_quantization import dequantize_gptq
from safetensors.torch import load_file, save_file

AUTOROUND = FIXTURES / "autoround"
FOLDERS = ("sym-g32", "asym-g32", "sym-g128-padded", "sharded-prefixed-sym-g64", "gptq-sym-g32")
"""Every fixture: symmetric and asymmetric packings, a group larger than the inputs (padded), a sharded bf16 source
with a `model.` prefix, and the plain GPTQ export."""
SHIPPED_CODE = ("configuration_nextstep.py", "modeling_nextstep.py")
"""The remote-code shim gptq-sym-g32 ships (it made the export; nothing here may import it)."""
DECODER_LINEARS = {f"layers.{layer}.{name}" for layer in range(2) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")}


def community_folder(name: str, target: Path) -> Path:
    """A writable, complete copy of fixture `name` at `target`: its files plus the tiny model's vae/, which
    auto-round had copied byte for byte and the committed fixtures leave out."""
    shutil.copytree(AUTOROUND / name, target)
    shutil.copytree(TINY_MODEL / "vae", target / "vae")
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, by name without the `model.` prefix."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({key.removeprefix("model."): value for key, value in load_file(path).items()})
    return tensors


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def zero_offset(folder: Path) -> int:
    """What a stored zero point lacks, by the packing's documented convention (not the runtime's code)."""
    config = quantization_config(folder)
    return 0 if config.get("packing_format") == "auto_round" else 1


def reference_weights(folder: Path, in_features: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every packed linear of the folder dequantised plainly (reference_quantization.py): name -> W [out, in]."""
    tensors = folder_tensors(folder)
    return {name: dequantize_gptq(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                                  in_features[name], zero_offset(folder))
            for name in (key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))}


def padded_rows(folder: Path, name: str, in_features: int) -> torch.Tensor:
    """The input rows a packed linear pads beyond `in_features`, dequantised plainly ([out, 0] where none)."""
    tensors = folder_tensors(folder)
    qweight = tensors[f"{name}.qweight"]
    full = dequantize_gptq(qweight, tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], qweight.shape[0] * 8,
                           zero_offset(folder))
    return full[:, in_features:].t()


def rewrite_tensors(folder: Path, changes: dict[str, torch.Tensor | None]) -> None:
    """Replace, add (a tensor) or remove (None) tensors of a single-file folder."""
    tensors = load_file(folder / "model.safetensors")
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, folder / "model.safetensors")


def edit_quantization_config(folder: Path, **changes) -> None:
    """Change keys of config.json's quantization_config (None deletes one)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config["quantization_config"].pop(key, None)
        else:
            config["quantization_config"][key] = value
    path.write_text(json.dumps(config, indent=2))
