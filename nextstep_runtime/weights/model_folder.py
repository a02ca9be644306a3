"""A NextStep model folder, resolved once: everything the runtime reads about it, each answered in one place.

A folder on disk, or a Hugging Face repo id from the local cache (hub.py), becomes one `ModelFolder`. Loading,
the memory planner, `convert`, the nodes and the server routes all ask it, and nothing else opens a model
folder's config.json or its safetensors headers, so they all see the same folder. The config is read when it is
opened (a folder without a readable config.json is refused at once); the weight files and their headers (and
with them an AutoRound/GPTQ export's stored format), the tokenizer files and the VAE when first asked, and then
kept.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator

from ..config import WEIGHTS_FORMAT_KEY, ModelConfig, read_json
from ..errors import NextStepError
from ..model.network import checkpoint_shapes
from ..regular_files import open_regular, require_regular
from .checkpoint import IGNORED_KEYS, TensorHeader, TensorSource, iter_safetensors, read_headers
from .gptq import QUANTIZATION_KEY, GPTQConfig, PackedLinear, find_packed_linears
from .hub import CacheScan, resolve_model_source, scan_model_cache
from .modes import FLOAT_WEIGHTS, GPTQ_PACKED, STORED_FORMATS
from .vae_files import VAEFiles

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
BUNDLED_VAE_FOLDER = "vae"
TOKENIZER_JSON = "tokenizer.json"
BPE_TOKENIZER_FILES = ("vocab.json", "merges.txt")
"""The byte-level BPE files some repos ship instead of tokenizer.json."""
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""Files transformers reads beside the tokenizer files when present."""
SAFETENSORS_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn"}


class ModelFolder:
    """A NextStep model folder; open one with `ModelFolder.open`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_path = path / CONFIG_NAME
        if not holds_model_config(path):
            raise NextStepError(f"{path} has no {CONFIG_NAME}; point at a NextStep model folder ({CONFIG_NAME}, "
                                f"model*.safetensors, tokenizer files)")
        self.raw_config: dict[str, Any] = read_json(self.config_path)
        self.config = ModelConfig.from_dict(self.raw_config, str(self.config_path))
        self.repacked_format: str = self.raw_config.get(WEIGHTS_FORMAT_KEY, FLOAT_WEIGHTS)
        """What `convert` recorded it repacked the decoder's linear weights as (`float` where it did not)."""
        if self.repacked_format not in STORED_FORMATS:
            raise NextStepError(f"{self.config_path}: {WEIGHTS_FORMAT_KEY}={self.repacked_format!r} is not one of "
                                f"{', '.join(STORED_FORMATS)}; convert the model again with this version")
        self.gptq: GPTQConfig | None = None
        """The `quantization_config` of an AutoRound/GPTQ export (checked once, here), else None."""
        if self.raw_config.get(QUANTIZATION_KEY) is not None:
            if WEIGHTS_FORMAT_KEY in self.raw_config:
                raise NextStepError(f"{self.config_path} has both {WEIGHTS_FORMAT_KEY} and {QUANTIZATION_KEY}; a "
                                    f"folder is either repacked by convert or an AutoRound/GPTQ export, not both")
            self.gptq = GPTQConfig.from_config(self.raw_config[QUANTIZATION_KEY], str(self.config_path))

    @cached_property
    def stored_format(self) -> str:
        """How the decoder's linear weights are stored (modes.py): `fp8`/`int4` for folders repacked by `convert`,
        `gptq` for an AutoRound/GPTQ export that holds packed layers (its headers are read to tell), else `float`
        (an export whose every layer stayed float included)."""
        if self.gptq is not None:
            return GPTQ_PACKED if self.packed_linears else FLOAT_WEIGHTS
        return self.repacked_format

    @cached_property
    def weights_description(self) -> str:
        """What the decoder's weights are stored as, in words: the float dtype the headers name (`float32` for the
        released repos, `bfloat16` for a converted copy), or the repacked or 4-bit format."""
        if self.stored_format == GPTQ_PACKED:
            return "int4 (GPTQ-packed)"
        if self.stored_format != FLOAT_WEIGHTS:
            return f"{self.stored_format} (repacked)"
        dtypes = [header.dtype for name, header in self.tensors.items() if name.startswith("layers.")]
        stored = max(set(dtypes), key=dtypes.count) if dtypes else "unknown"
        return SAFETENSORS_DTYPE_NAMES.get(stored, stored)

    @classmethod
    def open(cls, source: "str | Path | ModelFolder") -> "ModelFolder":
        """A folder path, or a repo id (`org/name[@revision]`) from the Hugging Face cache; an open folder as is."""
        if isinstance(source, ModelFolder):
            return source
        if Path(source).is_file():
            raise NextStepError(f"{source} is a file; give the model folder that holds {CONFIG_NAME} (the whole "
                                f"Hugging Face repo folder)")
        return cls(resolve_model_source(source))

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @cached_property
    def weight_map(self) -> dict[str, str] | None:
        """The shard index's tensor key -> shard file name, None for a single-file model."""
        index = self.path / INDEX_NAME
        if not index.exists():
            return None
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise NextStepError(f"{index} has no weight_map")
        return weight_map

    @cached_property
    def weight_files(self) -> tuple[Path, ...]:
        """The safetensors files: the shards named by the index, or the single file."""
        index = self.path / INDEX_NAME
        if self.weight_map is not None:
            files = [self.path / _shard_name(name, index) for name in dict.fromkeys(self.weight_map.values())]
            for path in files:
                if not path.exists():
                    raise NextStepError(f"shard {path.name} named by {index.name} is missing from {self.path}; "
                                        f"download it again")
                require_regular(path)
            return tuple(files)
        single = self.path / SINGLE_WEIGHTS_NAME
        if single.exists():
            return (require_regular(single),)
        raise NextStepError(f"no weights in {self.path}: expected {SINGLE_WEIGHTS_NAME} or {INDEX_NAME} with its "
                            f"shards")

    @cached_property
    def tensors(self) -> dict[str, TensorHeader]:
        """Every tensor of the weights by canonical name (no `model.` prefix), from the headers alone; of a tensor
        stored twice, the copy the index names (checkpoint.read_headers)."""
        return read_headers(list(self.weight_files), self.weight_map)

    def tensor_sources(self) -> Iterator[TensorSource]:
        """The weights' tensors to read, one at a time: each of `tensors` once, the copies it left out skipped."""
        chosen = {(header.file, header.key) for header in self.tensors.values()}
        return (source for source in iter_safetensors(list(self.weight_files)) if source[:2] in chosen)

    @cached_property
    def packed_linears(self) -> dict[str, PackedLinear]:
        """The linears an AutoRound/GPTQ export holds packed (gptq.py), by name: decided per layer by the tensors
        present, since `extra_config` need not list every float layer. Empty for other folders. A linear stored both
        packed and as a float `.weight` is refused: which one is meant cannot be told."""
        if self.gptq is None:
            return {}
        packed = find_packed_linears(self.tensors)
        for name, linear in packed.items():
            float_copy = self.tensors.get(f"{name}.weight")
            if float_copy is not None:
                implied = checkpoint_shapes(self.config).get(f"{name}.weight")
                shape = f"the [out, in] = {list(implied)} weight" if implied else "no such layer"
                raise NextStepError(f"{name} is stored twice: packed ({linear.qweight.key} in {linear.qweight.file}) "
                                    f"and as the float {float_copy.key} {list(float_copy.shape)} in {float_copy.file} "
                                    f"({self.config_path} implies {shape}); a layer is stored one way: remove one, or "
                                    f"download the model again")
        return packed

    def parameter_count(self) -> int:
        """Values of the tensors the loader reads (the text head and other ignored tensors left out)."""
        return sum(math.prod(header.shape) for name, header in self.tensors.items() if name not in IGNORED_KEYS)

    def block_counts(self) -> tuple[int, int]:
        """(decoder layers, flow-head blocks) present in the weights, from their names."""
        layers, head_blocks = set(), set()
        for name in self.tensors:
            parts = name.split(".")
            if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
                layers.add(int(parts[1]))
            elif parts[:3] == ["image_head", "net", "res_blocks"] and len(parts) > 3 and parts[3].isdigit():
                head_blocks.add(int(parts[3]))
        return len(layers), len(head_blocks)

    def check_block_counts(self) -> None:
        """The weights hold as many decoder layers and flow-head blocks as the config says: checked from the tensor
        names before anything is built from the config (a network of the config's size, on the meta device or not,
        is built only for weights that can fill it)."""
        found_layers, found_depth = self.block_counts()
        if found_layers != self.config.num_hidden_layers:
            raise NextStepError(f"{self.config_path} says num_hidden_layers={self.config.num_hidden_layers} but the "
                                f"weights hold {found_layers} decoder layers")
        if found_depth != self.config.head_depth:
            raise NextStepError(f"{self.config_path} says the flow head has {self.config.head_depth} blocks "
                                f"(genloss_depth/fm_head_layers) but the weights hold {found_depth}")

    @cached_property
    def tokenizer_files(self) -> tuple[Path, ...]:
        """tokenizer.json when present, else the byte-level BPE's vocab.json and merges.txt (the files transformers
        reads beside them checked to be regular files too)."""
        for name in TOKENIZER_SIDE_FILES:
            if (self.path / name).exists():
                require_regular(self.path / name)
        if (self.path / TOKENIZER_JSON).exists():
            return (require_regular(self.path / TOKENIZER_JSON),)
        if all((self.path / name).exists() for name in BPE_TOKENIZER_FILES):
            return tuple(require_regular(self.path / name) for name in BPE_TOKENIZER_FILES)
        raise NextStepError(f"{self.path} has no tokenizer: expected {TOKENIZER_JSON}, or "
                            f"{' and '.join(BPE_TOKENIZER_FILES)}; copy the tokenizer files of the Hugging Face repo "
                            f"into the model folder")

    @cached_property
    def vae(self) -> VAEFiles:
        """The VAE the config's `vae_name_or_path` names, relative to the folder; when that names nothing on disk (a
        hub id such as `stepfun-ai/...`, or a path on the machine that exported the model), the folder's own
        `vae/` if present."""
        named = self.raw_config.get("vae_name_or_path") or BUNDLED_VAE_FOLDER
        candidate = Path(named) if Path(named).is_absolute() else self.path / named
        bundled = self.path / BUNDLED_VAE_FOLDER
        return VAEFiles.locate(bundled if not candidate.exists() and bundled.exists() else candidate)


def _shard_name(name: object, index: Path) -> str:
    """A shard file named by the index, which must lie inside the model folder: a path that leaves it (`..`, an
    absolute path) would read some other file on the machine as this model's weights. Judged by the name alone, not
    by where a symlink points (the Hugging Face cache links every file into its blobs/ folder)."""
    if not isinstance(name, str) or not name:
        raise NextStepError(f"{index} names a shard {name!r}; shard names are file names inside the model folder")
    path = PureWindowsPath(name)  # both separators, drives and roots, as any platform may have written it
    if path.root or path.drive or ".." in path.parts:
        raise NextStepError(f"{index} names the shard {name!r}, outside the model folder; weight files must lie inside "
                            f"it: download the model again")
    return name


def holds_model_config(path: Path) -> bool:
    """Whether `path` is laid out as a model folder (it holds config.json); reads nothing."""
    return (path / CONFIG_NAME).is_file()


def is_nextstep_folder(path: Path) -> bool:
    """Whether `path` holds a NextStep config.json (it names the image tokens: boi, image_placeholder_id); cheap
    enough for listing folders, and never raises."""
    try:
        with open_regular(path / CONFIG_NAME) as handle:
            config = json.loads(handle.read())
    except (OSError, ValueError, RecursionError):  # NextStepError (not a regular file) is a ValueError
        return False
    return isinstance(config, dict) and "boi" in config and "image_placeholder_id" in config


def cached_nextstep_repos(scan: CacheScan | None = None) -> dict[str, Path]:
    """Repo id -> snapshot folder of every NextStep model in the Hugging Face cache, or in a `scan` of it already
    made (hub.scan_model_cache)."""
    return {repo: snapshot for repo, snapshot in (scan or scan_model_cache()).repos.items()
            if is_nextstep_folder(snapshot)}
