"""Model and VAE configuration, read from the two config.json naming schemes of the released repos."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NextStepError
from .regular_files import open_regular


def parse_json(text: str | bytes, source: str) -> Any:
    """JSON text as Python values, any way it cannot be read (bad syntax or UTF-8, nesting too deep for the
    parser, a number too long to convert) a NextStepError naming `source`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NextStepError(f"{source} is nested too deeply to read; it is not a config this runtime reads") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise NextStepError(f"{source} is not valid JSON ({exc})") from None


MAX_JSON_BYTES = 64 * 2**20
"""Largest config or shard index read: a released config.json is a few KB, a shard index of a 14B model about
100 KB; a file far larger is not one of them and would only fill memory."""


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning missing, oversized, malformed or irregular files (a FIFO, a folder) into a
    NextStepError naming the file."""
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise NextStepError(f"{path} is {size / 2**20:.0f} MB; a config or shard index is at most "
                                    f"{MAX_JSON_BYTES // 2**20} MB, so this is not one")
            text = handle.read()
    except FileNotFoundError:
        raise NextStepError(f"{path} not found") from None
    except OSError as exc:  # no permission, a folder where the platform will not open one, ...
        raise NextStepError(f"{path} cannot be read ({exc.strerror or exc})") from None
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise NextStepError(f"{path} must hold a JSON object")
    return data


def _first(raw: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """The value of the first key present (1.1 name, then 1.0 name), else the default."""
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


WEIGHTS_FORMAT_KEY = "nextstep_weights"
"""config.json key a folder repacked by `convert` records its decoder weight storage under (see repack.py)."""
MAX_CONTEXT = 2**22
"""The longest context (max_position_embeddings) accepted, and so the longest prompt a plan may assume."""
DEFAULT_MAX_POSITIONS = 32768
"""Context length assumed when config.json has no `max_position_embeddings`: the native context of the
Qwen2.5 decoders NextStep is built on."""

_WHOLE_RANGES: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 2**16), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024), "head_dim": (1, 4096), "intermediate_size": (1, 2**20),
    "vocab_size": (1, 2**22), "max_position_embeddings": (1, MAX_CONTEXT), "num_channels": (1, 1024),
    "latent_channels": (1, 1024), "patch_size": (1, 64), "latent_patch_size": (1, 64), "genloss_width": (1, 2**16),
    "fm_head_dim": (1, 2**16), "genloss_depth": (1, 1024), "fm_head_layers": (1, 1024),
    "base_image_grid_size": (1, 4096),
}
"""The whole-number keys the runtime reads and the values it accepts: generous bounds around every released
NextStep model (NextStep-1-Large: 48 layers, hidden 5120, vocabulary 152k, context 32768), tight enough that a
typo or a damaged file is refused at once instead of building a network nobody could load."""
_NUMBER_RANGES: dict[str, tuple[float, float]] = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12)}
"""The real-number keys, each a positive finite number at most the bound."""
_FLAG_KEYS = ("attention_bias", "o_attention_bias", "mlp_bias", "use_gen_pos_embed", "use_2d_rope")
"""Keys that are JSON true or false: a string such as "no" would otherwise count as true."""
_TEXT_KEYS = ("hidden_act", "vae_name_or_path", WEIGHTS_FORMAT_KEY)
_TOKEN_ID_KEYS = ("boi", "eoi", "image_placeholder_id")


def _rope_theta(raw: dict[str, Any]) -> Any:
    """`rope_theta`, or where transformers 5 re-saves a config, `rope_parameters.rope_theta`; None if neither."""
    if raw.get("rope_theta") is not None:
        return raw["rope_theta"]
    parameters = raw.get("rope_parameters")
    return parameters.get("rope_theta") if isinstance(parameters, dict) else None


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole_in_range(source: str, key: str, value: Any, low: int, high: int) -> None:
    if not _is_whole(value):
        raise NextStepError(f"{source}: {key} is {_shown(value)} but must be a whole number from {low} to {high}")
    if not low <= value <= high:
        raise NextStepError(f"{source}: {key} is {_shown(value)}, outside the range this runtime accepts ({low} to "
                            f"{high})")


def _shown(value: Any) -> str:
    """A config value for a message, shortened (a number of 400 digits, a long list)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def check_model_values(raw: dict[str, Any], source: str) -> None:
    """Refuse values that cannot describe a network, naming the file and key, before anything is built from them:
    a value of the wrong JSON type (a string where true/false or a number is meant), a size outside the ranges above
    (0 heads, 10**400 layers), a head count that does not divide the hidden size, a special token outside the
    vocabulary. Keys that are absent or null are left to `ModelConfig.from_dict` (required, or a default)."""
    for key, (low, high) in _WHOLE_RANGES.items():
        if raw.get(key) is not None:
            _whole_in_range(source, key, raw[key], low, high)
    for key, (low, high) in _NUMBER_RANGES.items():
        value = _rope_theta(raw) if key == "rope_theta" else raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not low < value <= high):
            raise NextStepError(f"{source}: {key} is {_shown(value)} but must be a number above {low} and at most "
                                f"{high:g}")
    for key in _FLAG_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise NextStepError(f"{source}: {key} is {_shown(raw[key])} but must be true or false (JSON booleans, "
                                f"not strings)")
    for key in _TEXT_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise NextStepError(f"{source}: {key} is {_shown(raw[key])} but must be a string")
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    if hidden and heads and raw.get("head_dim") is None and hidden % heads:
        raise NextStepError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                            f"fix the head count or give head_dim explicitly")
    if heads and kv_heads and heads % kv_heads:
        raise NextStepError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                            f"{kv_heads}")
    vocab = raw.get("vocab_size")
    for key in _TOKEN_ID_KEYS:
        value = raw.get(key)
        if value is not None and vocab and (not _is_whole(value) or not 0 <= value < vocab):
            raise NextStepError(f"{source}: {key} is {_shown(value)} but must be a token id inside the vocabulary "
                                f"(0 to {vocab - 1}, vocab_size {vocab})")


def _reject_unimplemented(raw: dict[str, Any], source: str) -> None:
    """Fields that would change the computation in ways the runtime does not implement: refuse them rather
    than silently compute something else."""
    if raw.get("use_2d_rope"):
        raise NextStepError(f"{source} sets use_2d_rope: true (2-D rotary positions for image tokens), which this "
                            f"runtime does not implement; only models with use_2d_rope false are supported")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 writes rope_parameters instead of rope_scaling
        scaling = raw.get(key)
        if scaling is not None and not (isinstance(scaling, dict)
                                        and scaling.get("rope_type", scaling.get("type")) == "default"):
            raise NextStepError(f"{source} sets {key} {scaling!r}, which this runtime does not implement; only "
                                f"models with default rotary positions are supported")
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise NextStepError(f"{source} sets hidden_act {activation!r}; this runtime implements the silu MLP of "
                            f"every NextStep release only")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, projector and flow-head hyper-parameters of a NextStep model folder."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    o_attention_bias: bool
    mlp_bias: bool
    vocab_size: int
    boi: int
    eoi: int
    image_placeholder_id: int
    latent_channels: int = 16
    latent_patch_size: int = 2
    head_width: int = 1536
    head_depth: int = 12
    max_positions: int = DEFAULT_MAX_POSITIONS
    use_gen_pos_embed: bool = False
    """Add a 2-D sin-cos table row to each image token's condition (see model/positions.py)."""
    base_image_grid_size: int | None = None
    """Side of that table when the config names it; else the checkpoint's table or the official 32."""

    @property
    def token_dim(self) -> int:
        """Values per image token: a patch x patch square of every latent channel."""
        return self.latent_channels * self.latent_patch_size**2

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Accept the 1.0 (`fm_head_*`, `latent_*`) and 1.1 (`genloss_*`, `num_channels`) schemes. A key set to null
        counts as absent: its default, or for a required key the error naming it."""
        raw = {key: value for key, value in raw.items() if value is not None}
        check_model_values(raw, source)
        _reject_unimplemented(raw, source)
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            attention_bias = bool(raw.get("attention_bias", True))
            o_bias = raw.get("o_attention_bias")
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                intermediate_size=int(raw["intermediate_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw) or 1e6),
                attention_bias=attention_bias,
                o_attention_bias=attention_bias if o_bias is None else bool(o_bias),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                vocab_size=int(raw["vocab_size"]),
                boi=int(raw["boi"]),
                eoi=int(raw["eoi"]),
                image_placeholder_id=int(raw["image_placeholder_id"]),
                latent_channels=int(_first(raw, ("num_channels", "latent_channels"), 16)),
                latent_patch_size=int(_first(raw, ("patch_size", "latent_patch_size"), 2)),
                head_width=int(_first(raw, ("genloss_width", "fm_head_dim"), 1536)),
                head_depth=int(_first(raw, ("genloss_depth", "fm_head_layers"), 12)),
                max_positions=int(raw.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS),
                use_gen_pos_embed=bool(raw.get("use_gen_pos_embed", False)),
                base_image_grid_size=None if raw.get("base_image_grid_size") is None
                else int(raw["base_image_grid_size"]),
            )
        except KeyError as exc:
            raise NextStepError(f"{source} lacks the required key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise NextStepError(f"{source} has a value of the wrong type ({exc})") from None


RELEASED_VAE_CONFIG: dict[str, Any] = {
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "in_channels": 3,
    "out_ch": 3,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "encoder_norm": True,
    "psz": 2,
}
"""The released f8ch16 tokenizer's values, used for a single-file VAE that carries no config."""


_VAE_WHOLE_RANGES: dict[str, tuple[int, int]] = {"ch": (1, 4096), "num_res_blocks": (1, 64), "z_channels": (1, 1024),
                                                  "in_channels": (1, 16), "out_ch": (1, 16), "psz": (1, 64)}
"""The VAE's whole-number keys and the values accepted (the released VAE: ch 128, 2 blocks, 16 channels, psz 2)."""
MAX_VAE_LEVELS, MAX_VAE_MULTIPLIER = 8, 64


def check_vae_values(merged: dict[str, Any], source: str) -> None:
    """Refuse VAE layouts that cannot be built (an empty or non-positive `ch_mult`, zero channels, sizes far
    beyond any VAE), values of the wrong JSON type and latent scalings that would turn every image into NaN,
    naming the config and key."""
    for key, (low, high) in _VAE_WHOLE_RANGES.items():
        if merged[key] is not None or key != "psz":  # psz null: no patchify
            _whole_in_range(source, key, merged[key], low, high)
    ch_mult = merged["ch_mult"]
    if (not isinstance(ch_mult, (list, tuple)) or not 1 <= len(ch_mult) <= MAX_VAE_LEVELS
            or not all(_is_whole(m) and 1 <= m <= MAX_VAE_MULTIPLIER for m in ch_mult)):
        raise NextStepError(f"{source}: ch_mult is {_shown(ch_mult)} but must be a list of 1 to {MAX_VAE_LEVELS} "
                            f"whole numbers from 1 to {MAX_VAE_MULTIPLIER}")
    for key in ("scaling_factor", "shift_factor"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NextStepError(f"{source}: {key} is {_shown(value)} but must be a finite number")
    if merged["scaling_factor"] == 0:
        raise NextStepError(f"{source}: scaling_factor is 0; latents are divided by it")
    if not isinstance(merged["encoder_norm"], bool):
        raise NextStepError(f"{source}: encoder_norm is {_shown(merged['encoder_norm'])} but must be true or false")


@dataclass(frozen=True)
class VAEConfig:
    """The Flux-style autoencoder's layout plus the latent scaling the model was trained with."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    encoder_norm: bool = True
    psz: int | None = 2
    """Latent patch the encoder's norm groups (psz x psz x z values); null: no patchify, one position each."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "VAEConfig":
        """Take the keys the network needs; training-only keys (resolution, deterministic) are ignored."""
        merged = {**RELEASED_VAE_CONFIG, **raw}
        check_vae_values(merged, source)
        try:
            return cls(
                ch=int(merged["ch"]),
                ch_mult=tuple(int(m) for m in merged["ch_mult"]),
                num_res_blocks=int(merged["num_res_blocks"]),
                z_channels=int(merged["z_channels"]),
                in_channels=int(merged["in_channels"]),
                out_ch=int(merged["out_ch"]),
                scaling_factor=float(merged["scaling_factor"]),
                shift_factor=float(merged["shift_factor"]),
                encoder_norm=bool(merged["encoder_norm"]),
                psz=None if merged["psz"] is None else int(merged["psz"]),
            )
        except (TypeError, ValueError) as exc:
            raise NextStepError(f"{source}: bad VAE config value ({exc})") from None
