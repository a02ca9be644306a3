"""Repacking a model folder: its weights rewritten once as bf16, fp8 or 4-bit, so later loads read the smaller
form and convert nothing (the released float32 shards are 56 GB; fp8 about 15 GB, int4 about 9 GB).

Streams tensor by tensor: each source tensor is read, converted and added to the output shard being filled,
which is written once it would pass the shard size; peak memory is about one source shard (mapped) plus one
output shard. Quantised tensors are stored in a device-neutral form (int4.py, fp8.py) and packed for the
run device at load time. The format is recorded in config.json (`nextstep_weights`), which the loader reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..errors import NextStepError
from ..model.network import NextStepModel
from .checkpoint import TensorSource, checked_tensors, expected_shapes, report_unknown_and_missing
from .gptq import QUANTIZATION_KEY
from .loading import model_shape_hint
from .model_folder import BUNDLED_VAE_FOLDER, CONFIG_NAME, INDEX_NAME, WEIGHTS_FORMAT_KEY, ModelFolder
from .modes import FLOAT_WEIGHTS, GPTQ_PACKED
from .schemes import STORED_DTYPE, is_layer_linear, scheme_for

MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's customary shard limit (5 GB)."""
COPIED_SUFFIXES = (".json", ".txt", ".model")
"""Top-level files copied besides the weights: config, tokenizer (json, vocab/merges, sentencepiece) files."""

log = logging.getLogger(__name__)


CONVERTED_FORMATS = {"bf16": "full", "fp8": "fp8", "int4": "int4"}
"""What `convert --weights` writes -> the weight storage (weights/modes.py) the folder then loads in."""


def _converted(folder: ModelFolder, tensors: Iterator[TensorSource],
               weights: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a folder repacked as `weights` holds, one source tensor at a time: the decoder's linear weights as
    the scheme stores them (weights/schemes.py), everything else in STORED_DTYPE."""
    with torch.device("meta"):
        shapes = expected_shapes(NextStepModel(folder.config))
    scheme = scheme_for(CONVERTED_FORMATS[weights])
    unknown: list[str] = []
    seen = set()
    for name, tensor in checked_tensors(tensors, shapes, str(folder.config_path), unknown,
                                        model_shape_hint(folder.config)):
        seen.add(name)
        owner, _, attr = name.rpartition(".")
        if attr == "weight" and is_layer_linear(owner, folder.config):
            yield from scheme.stored_tensors(owner, tensor).items()
        else:
            yield name, tensor.to(STORED_DTYPE)
    report_unknown_and_missing(unknown, set(shapes) - seen, f"convert: the weights in {folder.path}")


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], destination: Path, max_shard_bytes: int) -> list[Path]:
    """Fill shards up to `max_shard_bytes`, writing each as soon as it is full; then name them and the index.
    Returns the weight files written."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        path = destination / f"partial-{len(written):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total += size
    if shard:
        flush()
    if len(written) == 1:
        return [written[0][0].rename(destination / "model.safetensors")]
    weight_map, shards = {}, []
    for index, (path, names) in enumerate(written):
        final = f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
        shards.append(path.rename(destination / final))
        weight_map.update(dict.fromkeys(names, final))
    (destination / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    return shards


def convert_folder(source: str | Path | ModelFolder, destination: str | Path, weights: str,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `destination`: `source`'s model with the decoder's linear weights stored as `weights`
    (bf16, fp8 or int4), its config (with the format recorded), tokenizer files and vae/ (never code)."""
    destination = Path(destination)
    if weights not in CONVERTED_FORMATS:
        raise NextStepError(f"unknown weight format {weights!r}; choose {', '.join(CONVERTED_FORMATS)}")
    folder = ModelFolder.open(source)
    if folder.stored_format == GPTQ_PACKED and weights == "int4":
        raise NextStepError(f"{folder.path} holds 4-bit GPTQ-packed weights (an AutoRound or GPTQ export), which load "
                            f"as they are with int4 weights (memory int4 or auto); there is nothing to convert")
    if folder.stored_format == GPTQ_PACKED:
        raise NextStepError(f"{folder.path} holds 4-bit GPTQ-packed weights (an AutoRound or GPTQ export), not the "
                            f"original ones, so it cannot become {weights}; convert the original model folder instead")
    if folder.stored_format != FLOAT_WEIGHTS:
        raise NextStepError(f"{folder.path} is already repacked ({folder.stored_format}); convert the original model "
                            f"folder instead")
    tensors = folder.tensor_sources()  # no weights: refused before anything is written
    if destination.exists() and any(destination.iterdir()):
        raise NextStepError(f"{destination} exists and is not empty; choose a new folder")
    destination.mkdir(parents=True, exist_ok=True)
    shards = _write_shards(_converted(folder, tensors, weights), destination, max_shard_bytes)
    for item in folder.path.iterdir():
        if item.is_file() and item.suffix in COPIED_SUFFIXES and item.name not in (CONFIG_NAME, INDEX_NAME):
            shutil.copyfile(item, destination / item.name)
    vae = folder.path / BUNDLED_VAE_FOLDER
    if vae.is_dir():
        shutil.copytree(vae, destination / BUNDLED_VAE_FOLDER, ignore=shutil.ignore_patterns("*.py", "__pycache__"),
                        copy_function=shutil.copyfile)
    recorded = {**folder.raw_config, "torch_dtype": "bfloat16"}
    recorded.pop(QUANTIZATION_KEY, None)  # an export whose layers all stayed float: no longer a quantised one
    if weights != "bf16":
        recorded[WEIGHTS_FORMAT_KEY] = weights
    (destination / CONFIG_NAME).write_text(json.dumps(recorded, indent=2))
    mode = (destination / CONFIG_NAME).stat().st_mode & 0o777
    for shard in shards:  # safetensors writes its files private (0600); give them the mode new files get here
        shard.chmod(mode)
