"""Reading weights from disk into a module built on the meta device, one tensor at a time.

Each tensor is read, converted to the target dtype/device and assigned, so peak host memory is the
converted model plus one source tensor (plus the open shard's mapping), never two full copies.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import NextStepError
from ..regular_files import open_regular, require_regular

POSITION_TABLE_KEY = "gen_pos_embed"
IGNORED_KEYS = (POSITION_TABLE_KEY, "lm_head.weight", "lm_head.bias")
"""Checkpoint tensors the network is not filled from: the text head (unused for images) and the position
buffer that older exports hold (read separately, and only when the config sets use_gen_pos_embed)."""

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 2**20
"""The safetensors format's own limit on a header's size."""
KEY_PREFIX = "model."
NAMED_UNKNOWN_KEYS = 8
"""Unknown tensor names spelled out in the warning; the rest are counted."""
FINITE_CHECK_ELEMENTS = 2**20
"""Values checked for NaN and infinity at a time, so the check's mask stays small beside a large tensor."""

log = logging.getLogger(__name__)

TensorSource = tuple[Path, str, Callable[[], torch.Tensor]]
"""(file, key as stored, a function that reads the tensor): what weight readers yield, one tensor at a time."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it (nothing of its data read)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors' name of the stored dtype (F32, BF16, F8_E4M3, U8, I32, ...)."""


def canonical_key(key: str) -> str:
    """Strip the `model.` prefix some re-exports add."""
    return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key


def open_safetensors(path: Path):
    """safe_open with a message that names the file when it is truncated or not a safetensors file."""
    try:
        return safe_open(str(require_regular(path)), framework="pt", device="cpu")
    except FileNotFoundError:
        raise NextStepError(f"weights file {path} not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise NextStepError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
                            f"corrupt: download it again") from None


def read_header(path: Path) -> tuple[list[TensorHeader], dict[str, str]]:
    """The tensors a safetensors file holds and its metadata, from its JSON header alone (an 8-byte length, then the
    JSON), read directly: the file is never mapped, so a file larger than this machine's memory plans in
    milliseconds, and a truncated one is named before anything else reads it."""
    def unreadable(reason: object) -> NextStepError:
        return NextStepError(f"{path} is not a readable safetensors file ({reason}); it may be truncated or corrupt: "
                             f"download it again")

    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(HEADER_LENGTH_BYTES)
            length = int.from_bytes(prefix, "little") if len(prefix) == HEADER_LENGTH_BYTES else -1
            text = handle.read(length) if 2 <= length <= min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES) else None
    except FileNotFoundError:
        raise NextStepError(f"weights file {path} not found") from None
    except OSError as exc:
        raise unreadable(exc) from None
    if text is None:
        raise unreadable(f"a header of {length} bytes in a file of {size}")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, or nested too deep to parse
        raise unreadable(f"its header is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise unreadable("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors, data_end = [], 0
    for key, entry in header.items():
        try:
            shape = tuple(int(side) for side in entry["shape"])
            start, stop = (int(offset) for offset in entry["data_offsets"])
            tensors.append(TensorHeader(path, key, shape, str(entry["dtype"])))
        except (KeyError, TypeError, ValueError):
            raise unreadable(f"the entry of tensor {key!r} in its header is malformed") from None
        if min(shape, default=0) < 0 or not 0 <= start <= stop:
            raise unreadable(f"tensor {key!r} has shape {list(shape)} at bytes {start}..{stop}")
        data_end = max(data_end, stop)
    if HEADER_LENGTH_BYTES + length + data_end > size:
        raise unreadable(f"its tensors need {HEADER_LENGTH_BYTES + length + data_end} bytes but the file has {size}")
    return tensors, metadata if isinstance(metadata, dict) else {}


def read_headers(files: list[Path], weight_map: Mapping[str, str] | None = None) -> dict[str, TensorHeader]:
    """Every tensor of `files` by canonical name, from the headers alone, each once. A tensor stored twice (`X` and
    `model.X`, or one key in two shards) is the copy the shard index's `weight_map` names, where it names exactly
    one; otherwise the folder is ambiguous and refused, naming both copies: which one the official loader would
    take depends on the order it happens to read them, and they need not be equal."""
    copies: dict[str, list[TensorHeader]] = {}
    for path in files:
        for header in read_header(path)[0]:
            copies.setdefault(canonical_key(header.key), []).append(header)
    chosen = {}
    for name, found in copies.items():
        if len(found) > 1:
            named = [header for header in found if (weight_map or {}).get(header.key) == header.file.name]
            if len(named) != 1:
                places = " and ".join(f"as {header.key!r} in {header.file}" for header in found)
                index = "" if weight_map is None else f", and the shard index names {'both' if named else 'neither'}"
                raise NextStepError(f"tensor {name} is stored {len(found)} times: {places}{index}; a model folder "
                                    f"holds each tensor once: remove the extra copy, or download the model again")
            found = named
        chosen[name] = found[0]
    return chosen


def iter_safetensors(files: list[Path]) -> Iterator[TensorSource]:
    """Yield (file, key, loader) for every tensor, one shard open at a time."""
    for path in files:
        with open_safetensors(path) as handle:
            for key in handle.keys():
                def load(handle=handle, key=key, path=path) -> torch.Tensor:
                    try:
                        return handle.get_tensor(key)
                    except (SafetensorError, OSError, RuntimeError) as exc:
                        raise NextStepError(f"{path}: cannot read tensor {key!r} ({exc}); the file may be "
                                            f"truncated or corrupt: download it again") from None
                yield path, key, load


def check_finite_weights(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a float tensor holding NaN or infinite values, naming its file: one such weight turns every image
    into NaN, and after a whole run nothing would say where it came from. A pass over a tensor being read anyway."""
    if not tensor.is_floating_point():
        return
    for chunk in tensor.reshape(-1).split(FINITE_CHECK_ELEMENTS):
        if chunk.element_size() == 1:  # float8 has no isfinite kernel; float16 keeps its NaN
            chunk = chunk.to(torch.float16)
        if not bool(torch.isfinite(chunk).all()):
            raise NextStepError(f"{path}: tensor {key!r} holds NaN or infinite values; the weights are damaged (or "
                                f"were exported broken): download or export the model again")


def expected_shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in module.state_dict(keep_vars=True).items()}


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        owner._buffers[attr] = value


def load_weights(module: nn.Module, tensors: Iterator[TensorSource],
                 dtype: torch.dtype, device: torch.device, source: str,
                 shape_hint: Callable[[str], str] = lambda name: "",
                 convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None) -> None:
    """Fill a meta-device `module` from `tensors`, checking every name and shape.

    Tensors the network has no place for (e.g. `rotary_emb.inv_freq` buffers of some exports) are skipped
    unread with one warning naming them, as Hugging Face loading does; a missing tensor is an error.
    `convert(name, tensor)` may replace the default dtype conversion and return several entries for
    one checkpoint tensor (fp8 storage adds its scale).
    """
    shapes = expected_shapes(module)
    loaded: set[str] = set()
    unknown: list[str] = []
    for name, tensor in checked_tensors(tensors, shapes, source, unknown, shape_hint):
        values = convert(name, tensor) if convert else {name: tensor.to(device=device, dtype=dtype)}
        del tensor
        for target, value in values.items():
            _assign(module, target, value)
            loaded.add(target)
    report_unknown_and_missing(unknown, set(shapes) - loaded, f"weights for {source}")


def checked_tensors(tensors: Iterator[TensorSource], shapes: dict[str, torch.Size],
                    source: str, unknown: list[str],
                    shape_hint: Callable[[str], str] = lambda name: "") -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) for each checkpoint tensor with a place in `shapes`, read one at a time and
    refused with a message naming the file when its shape differs from what `source` implies or it holds NaN or
    infinite values. The keys of
    the others are appended to `unknown`, unread (IGNORED_KEYS are dropped silently)."""
    for path, key, load in tensors:
        name = canonical_key(key)
        if name in IGNORED_KEYS:
            continue
        if name not in shapes:
            unknown.append(key)
            continue
        tensor = load()
        if tensor.shape != shapes[name]:
            raise shape_error(path, key, tuple(tensor.shape), source, tuple(shapes[name]), shape_hint(name))
        check_finite_weights(path, key, tensor)
        yield name, tensor


def shape_error(path: Path, key: str, shape: tuple[int, ...], source: str, expected: tuple[int, ...],
                hint: str = "") -> NextStepError:
    """The one message for a tensor whose shape is not the one its config implies, naming the file and the keys."""
    return NextStepError(f"{path}: tensor {key!r} has shape {list(shape)} but {source} implies {list(expected)}{hint}")


def report_unknown_and_missing(unknown: list[str], missing: set[str], what: str) -> None:
    """One warning naming the unknown tensors (skipped, as Hugging Face loading does); an error naming the
    missing ones."""
    if unknown:
        shown = ", ".join(unknown[:NAMED_UNKNOWN_KEYS])
        more = f" and {len(unknown) - NAMED_UNKNOWN_KEYS} more" if len(unknown) > NAMED_UNKNOWN_KEYS else ""
        log.warning("%s: skipped %d unknown tensor(s) that NextStep does not use: %s%s", what, len(unknown),
                    shown, more)
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NextStepError(f"{what} are missing tensors: {shown}")
