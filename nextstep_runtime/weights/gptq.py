"""4-bit checkpoints in the GPTQ packing that AutoRound and GPTQ exports use (W4A16): read as they are, and run in
the runtime's own int4 kernels.

This packing is the usual form of 4-bit LLM weights (transformers, vLLM and SGLang read it), and AutoRound
writes it for NextStep folders (`auto-round-rtn MODEL --model_free --scheme W4A16`). Each quantised linear
`<name>` is stored as:
`<name>.qweight` int32 [in_p / 8, out]: 8 codes per word along the input, least significant nibble first;
`<name>.qzeros` int32 [G, ceil(out / 8)]: zero points, packed along the output;
`<name>.scales` [G, out], and optionally `<name>.g_idx` [in]: the group of each input.
Here in_p is the input width rounded up to the group g = in_p / G; padded rows dequantise to 0. The weight is
W[j, i] = (q[i, j] - zero[i // g, j]) * scales[i // g, j]. GPTQ (v1) and auto-round's `auto_round:auto_gptq`
packing store zero - 1; auto-round's `auto_round` packing stores the zero point itself.

The int4 kernels (int4.py) compute (q - 8) * scale + zero_k per group. So a GPTQ layer maps onto them exactly,
with its codes and scales unchanged and zero_k = (8 - zero) * scale (exact in float32: a small integer times a
float16 scale). Each layer is packed once at load, in groups the kernels accept: the file's group, or a divisor
of it that also divides the input width. A group over padded inputs, or one larger than the kernels take, is
thus split into kernel groups that share its scale and zero. Packed linears outside the decoder (which int4
never covers), and decoder ones in groups the kernels cannot take (under 32), are dequantised to the compute
dtype instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from ..errors import NextStepError
from .checkpoint import IGNORED_KEYS, TensorHeader, TensorSource, canonical_key, check_finite_weights, open_safetensors
from .int4 import KERNEL_GROUP_SIZES, MIDPOINT, pack_nibbles

QUANTIZATION_KEY = "quantization_config"
"""The config.json entry (transformers' name) that describes how the weights are quantised."""
AUTO_ROUND_METHODS = ("auto-round", "intel/auto-round")
"""auto-round's quant_method names, current and older."""
STORED_ZERO_OFFSETS = {"auto_round:auto_gptq": 1, "auto_round:gptq": 1, "auto": 1, "auto_round": 0}
"""auto-round packing_format -> what a stored zero point lacks (auto-round's own reader treats `auto` and
`auto_round:gptq` as `auto_round:auto_gptq`, its default when the field is absent)."""
DEFAULT_PACKING = "auto_round:auto_gptq"
BITS = 4
CODES_PER_WORD = 32 // BITS
PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
SCALE_DTYPES = ("F16", "BF16", "F32")
DECODER_PREFIX = "layers."
"""The packed linears that run in the int4 kernels: the decoder's, as with `memory: int4`."""


@dataclass(frozen=True)
class GPTQConfig:
    """What a folder's `quantization_config` says about its packed weights, checked once when it is opened."""

    quant_method: str
    packing: str
    """auto-round's packing_format, or GPTQ's checkpoint_format."""
    sym: bool
    zero_offset: int
    """Added to a stored zero point to give the zero point."""

    @classmethod
    def from_config(cls, raw: Any, source: str) -> "GPTQConfig":
        """Parse `quantization_config`, refusing any variant the loader would not read exactly, and any field of the
        wrong JSON type (as config.json's own fields are), with one error that names the field and its value."""
        def refuse(field: str, value: Any, why: str) -> NextStepError:
            return NextStepError(f"{source}: {QUANTIZATION_KEY}.{field} is {value!r}; {why}")

        if not isinstance(raw, dict):
            raise NextStepError(f"{source}: {QUANTIZATION_KEY} must be a JSON object (got {raw!r})")
        _check_types(raw, FIELD_TYPES, "", refuse)
        method = raw.get("quant_method")
        sym = raw.get("sym", True)
        if method in AUTO_ROUND_METHODS:
            packing = raw.get("packing_format") or DEFAULT_PACKING
            if packing not in STORED_ZERO_OFFSETS:
                raise refuse("packing_format", packing, f"this runtime reads the {' and '.join(STORED_ZERO_OFFSETS)} "
                                                        f"packings (export again with --format auto_round)")
            offset = STORED_ZERO_OFFSETS[packing]
        elif method == "gptq":
            packing = raw.get("checkpoint_format") or "gptq"
            if packing not in ("gptq", "gptq_v2") or (packing == "gptq_v2" and sym is not True):
                raise refuse("checkpoint_format", packing, "this runtime reads GPTQ (v1) zero points, and GPTQ v2 "
                                                           "ones only for symmetric weights (sym true)")
            offset = 1 if packing == "gptq" else 0
        else:
            raise refuse("quant_method", method, "this runtime loads 4-bit GPTQ-packed weights (auto-round or gptq) "
                                                 "besides plain float checkpoints")
        if raw.get("bits") != BITS:
            raise refuse("bits", raw.get("bits"), f"only {BITS}-bit weights load (W4A16)")
        if raw.get("data_type", "int") != "int":
            raise refuse("data_type", raw["data_type"], "only integer weights load (W4A16)")
        act_bits = raw.get("act_bits")
        if isinstance(act_bits, int) and act_bits < 16:
            raise refuse("act_bits", act_bits, "quantised activations are not supported (W4A16 only)")
        if raw.get("desc_act") and not raw.get("static_groups"):
            raise refuse("desc_act", raw["desc_act"], "act-order (a permuted g_idx) is not supported; quantise "
                                                      "with desc_act false")
        if not isinstance(sym, bool):
            raise refuse("sym", sym, "it must be true or false")
        for layer, settings in (raw.get("extra_config") or {}).items():
            field = f"extra_config[{layer!r}]"
            if not isinstance(settings, dict):
                raise refuse(field, settings, "each entry must be a JSON object of the layer's settings, such as "
                                              '{"bits": 16}')
            _check_types(settings, LAYER_FIELD_TYPES, f"{field}.", refuse)
            bits = settings.get("bits", BITS)
            if bits < 16 and (bits != BITS or settings.get("data_type", "int") != "int"):
                raise refuse(field, settings, f"layers load as {BITS}-bit integers or as floats (bits 16) only")
        return cls(str(method), str(packing), sym, offset)


LAYER_FIELD_TYPES = {"bits": (int,), "group_size": (int,), "data_type": (str,), "sym": (bool,), "act_bits": (int,)}
"""The JSON types of the settings a `quantization_config` (and each of its `extra_config` entries) gives, where
present and not null; JSON true/false are never taken for numbers."""
FIELD_TYPES = {**LAYER_FIELD_TYPES, "quant_method": (str,), "packing_format": (str,), "checkpoint_format": (str,),
               "desc_act": (bool,), "static_groups": (bool,), "extra_config": (dict,)}
JSON_TYPE_NAMES = {int: "a whole number", str: "a text", bool: "true or false", dict: "a JSON object"}


def _check_types(settings: dict, types: Mapping[str, tuple[type, ...]], prefix: str, refuse) -> None:
    """Each field of `types` present in `settings` (and not null) is of its JSON type, else `refuse` names it."""
    for field, kinds in types.items():
        value = settings.get(field)
        if value is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise refuse(f"{prefix}{field}", value, f"it must be {' or '.join(JSON_TYPE_NAMES[kind] for kind in kinds)}")


@dataclass(frozen=True)
class PackedLinear:
    """One GPTQ-packed linear, as the safetensors headers describe it."""

    name: str
    qweight: TensorHeader
    qzeros: TensorHeader
    scales: TensorHeader
    g_idx: TensorHeader | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[0] * CODES_PER_WORD

    @property
    def group_size(self) -> int:
        return self.padded_in_features // self.scales.shape[0]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse a packing that does not hold the [out, in] weight the config implies."""
        out_features, in_features = shape
        group = self.group_size
        if self.out_features != out_features or not in_features <= self.padded_in_features < in_features + group:
            raise NextStepError(f"{self.qweight.file}: {self.qweight.key} packs a [{self.out_features}, "
                                f"{self.padded_in_features}] weight in groups of {group}, but config.json implies "
                                f"{list(shape)}; config.json and the weights disagree")

    def kernel_group(self, shape: tuple[int, ...]) -> int | None:
        """The group the int4 kernels use for this layer: the largest they accept that divides both the input
        width and the file's group, so that each kernel group lies inside one of the file's. None where none does
        (groups under 32)."""
        self.check_shape(shape)
        return next((size for size in KERNEL_GROUP_SIZES if shape[1] % size == 0 and self.group_size % size == 0),
                    None)

    def read(self, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [in_p, out] int32, zero points [G, out] int32, scales [G, out] float32), checked against the
        config: a trivial g_idx only, and zero points of 8 where the config says symmetric."""
        def get(header: TensorHeader) -> torch.Tensor:
            with open_safetensors(header.file) as handle:
                return handle.get_tensor(header.key)

        codes = unpack_words(get(self.qweight))
        zeros = unpack_words(get(self.qzeros).t()).t()[:, :self.out_features] + config.zero_offset
        scales = get(self.scales).float()
        check_finite_weights(self.scales.file, self.scales.key, scales)
        if self.g_idx is not None:
            g_idx = get(self.g_idx)
            if not torch.equal(g_idx.long(), torch.arange(len(g_idx)) // self.group_size):
                raise NextStepError(f"{self.g_idx.file}: {self.g_idx.key} is not i // {self.group_size} (act-order "
                                    f"weights); this runtime loads GPTQ weights quantised without act-order only")
        if config.sym and not bool((zeros == MIDPOINT).all()):
            raise NextStepError(f"{self.qzeros.file}: {self.qzeros.key} holds zero points other than {MIDPOINT} read "
                                f"as {config.quant_method} packing {config.packing!r}, but {QUANTIZATION_KEY} says "
                                f"sym true; the folder's config does not match its weights")
        return codes, zeros, scales

    def kernel_form(self, config: GPTQConfig, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(nibbles [out, in/2] uint8, scales_and_zeros [in/k, out, 2] float32) in the int4 kernels' form, k the
        kernel group: the same codes and scales, zero_k = (8 - zero) * scale."""
        group, in_features = self.kernel_group(shape), shape[1]
        codes, zeros, scales = self.read(config)
        file_group = torch.arange(0, in_features, group) // self.group_size
        scale = scales[file_group]
        zero = (MIDPOINT - zeros[file_group]).float() * scale
        return pack_nibbles(codes[:in_features].t()), torch.stack([scale, zero], dim=2).contiguous()

    def dequantized(self, config: GPTQConfig, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 weight [out, in] the packing stands for."""
        self.check_shape(shape)
        codes, zeros, scales = self.read(config)
        group = torch.arange(self.padded_in_features) // self.group_size
        return ((codes - zeros[group]).float() * scales[group])[:shape[1]].t().contiguous()


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 words -> [8 R, C] int32 codes: row 8 r + k is nibble k (least significant first) of row r."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    return ((words[:, None, :] >> shifts[None, :, None]) & (2**BITS - 1)).reshape(-1, words.shape[1])


def find_packed_linears(tensors: Mapping[str, TensorHeader]) -> dict[str, PackedLinear]:
    """Every linear the headers hold GPTQ-packed (a `.qweight`), by name, with its companion tensors checked."""
    packed = {}
    for name, qweight in tensors.items():
        if not name.endswith(".qweight"):
            continue
        owner = name.removesuffix(".qweight")
        parts = {part: tensors.get(f"{owner}.{part}") for part in PACKED_PARTS[1:]}
        for part in ("qzeros", "scales"):
            if parts[part] is None:
                raise NextStepError(f"{qweight.file}: {qweight.key} has no {owner}.{part} beside it; the weights are "
                                    f"incomplete: download them again")
        linear = PackedLinear(owner, qweight, parts["qzeros"], parts["scales"], parts["g_idx"])
        if not _well_formed(linear):
            qzeros, scales = linear.qzeros, linear.scales
            raise NextStepError(f"{qweight.file}: {owner} is not {BITS}-bit GPTQ-packed as this runtime reads it "
                                f"(qweight {qweight.dtype} {list(qweight.shape)}, qzeros {qzeros.dtype} "
                                f"{list(qzeros.shape)}, scales {scales.dtype} {list(scales.shape)})")
        packed[owner] = linear
    return packed


def _well_formed(linear: PackedLinear) -> bool:
    """Dtypes and shapes that fit together: qweight [in_p/8, out], qzeros [G, ceil(out/8)], scales [G, out]."""
    qweight, qzeros, scales = linear.qweight, linear.qzeros, linear.scales
    if (qweight.dtype, qzeros.dtype) != ("I32", "I32") or scales.dtype not in SCALE_DTYPES \
            or len(qweight.shape) != 2 or len(scales.shape) != 2 or not scales.shape[0]:
        return False
    groups, out_features = scales.shape[0], qweight.shape[1]
    return scales.shape[1] == out_features and qzeros.shape == (groups, -(-out_features // CODES_PER_WORD)) \
        and linear.padded_in_features % groups == 0


def int4_groups(packed: Mapping[str, PackedLinear], weight_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The packed linears that run in the int4 kernels -> their kernel group: the decoder's, where the kernels take
    their groups (the others are dequantised at load). `weight_shapes` maps `<linear>.weight` to the [out, in] shape
    the config implies. Loading and the memory planner both ask this."""
    groups = {name: linear.kernel_group(tuple(weight_shapes[f"{name}.weight"])) for name, linear in packed.items()
              if name.startswith(DECODER_PREFIX) and f"{name}.weight" in weight_shapes}
    return {name: group for name, group in groups.items() if group is not None}


def unpacked_tensors(tensors: Iterator[TensorSource], packed: Mapping[str, PackedLinear], config: GPTQConfig,
                     weight_shapes: Mapping[str, tuple[int, ...]],
                     groups: Mapping[str, int]) -> Iterator[TensorSource]:
    """The folder's tensors as the network takes them: a packed linear's four tensors are read together when its
    qweight comes, and it becomes the int4 kernel form (`<name>.weight` nibbles, `<name>.scales_and_zeros`) where
    `groups` names it, else its dequantised float `<name>.weight`. Packed tensors of no layer the network has
    pass as they are (reported as unknown); those of the unused text head are dropped."""
    for path, key, load in tensors:
        owner, _, part = canonical_key(key).rpartition(".")
        linear = packed.get(owner)
        weight = f"{owner}.weight"
        if linear is None or part not in PACKED_PARTS or (weight not in weight_shapes and weight not in IGNORED_KEYS):
            yield path, key, load
        elif part == "qweight" and owner in groups:
            kernel_form: list[tuple[torch.Tensor, torch.Tensor]] = []

            def read(index: int, linear: PackedLinear = linear, form: list = kernel_form) -> torch.Tensor:
                if not form:
                    form.append(linear.kernel_form(config, tuple(weight_shapes[f"{linear.name}.weight"])))
                return form[0][index]
            yield path, weight, lambda read=read: read(0)
            yield path, f"{owner}.scales_and_zeros", lambda read=read: read(1)
        elif part == "qweight" and weight in weight_shapes:
            yield path, weight, lambda linear=linear, shape=tuple(weight_shapes[weight]): linear.dequantized(config,
                                                                                                         shape)


def layers_stored_alike(groups: Mapping[str, int], layers: int) -> bool:
    """Whether every decoder layer has the same linears packed with the same groups (what streaming layers through
    shared device slots needs)."""
    def layout(index: int) -> set[tuple[str, int]]:
        prefix = f"{DECODER_PREFIX}{index}."
        return {(name.removeprefix(prefix), group) for name, group in groups.items() if name.startswith(prefix)}
    return all(layout(index) == layout(0) for index in range(layers))
