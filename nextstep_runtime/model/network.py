"""The NextStep network: embeddings, decoder stack, image projectors and flow head.

Attribute names mirror the checkpoint keys (`embed_tokens`, `layers.N`, `norm`, `image_in_projector`,
`image_out_projector`, `image_head.net`) so weights load by name. `lm_head` is not built: image
generation never reads it, and on the 14B model it is 3 GB.

A loaded model has a placement (model/placement.py, set by the loader): which device and dtype each range of layers
runs in. The decoder runs range by range (`run_range`), so a token's work can be captured per device.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from itertools import islice

import torch
from torch import nn

from ..config import ModelConfig
from ..devices import residual_dtype
from ..errors import NextStepError
from .attention import FlashAttention
from .backbone import DecoderLayer, KVCache, RMSNorm, rotary_tables
from .flow_head import FlowHead
from .placement import INPUT_PARTS, Placement


class NextStepModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.image_in_projector = nn.Linear(config.token_dim, config.hidden_size)
        self.image_out_projector = nn.Linear(config.hidden_size, config.hidden_size)
        self.image_head = FlowHead(config.token_dim, config.hidden_size, config.head_width, config.head_depth)
        # [tokens, hidden] position table of `use_gen_pos_embed` models (see positions.py), set by the loader
        self.register_buffer("gen_pos_embed", None, persistent=False)
        self.placement: Placement | None = None
        """Where each range of layers runs and in which dtype (set by the loader, fixed from then on)."""
        self.float32_fits: bool | None = None
        """Whether the planner found this load fits its devices in float32 (None: unknown, or no range computes in
        float16): the fix a float16 overflow names (devices.float16_overflow_fix)."""
        self.source = "the model"
        """The folder the weights came from (set by the loader), for messages."""

    @property
    def dtype(self) -> torch.dtype:
        """The run device's compute dtype: the flow head's and the sampling buffers'."""
        return self.placement.run_dtype

    @property
    def device(self) -> torch.device:
        """The run device, where the flow head, the sampling buffers and the outputs are: the placement's, whether or
        not a host has moved the weights off it for now."""
        return self.placement.run_device

    def parts_by_device(self) -> list[tuple[torch.device, list[nn.Module]]]:
        """The network's modules grouped by the device the placement puts them on, one group per distinct device in
        order: what a host moves off and back onto each device."""
        groups: dict[torch.device, list[nn.Module]] = {device: [] for device in self.placement.devices}
        for layer_range in self.placement.ranges:
            groups[layer_range.device] += islice(self.layers, layer_range.start, layer_range.stop)
        for name, module in self.named_children():
            if name != "layers":
                device = self.placement.input_device if name in INPUT_PARTS else self.placement.run_device
                groups[device].append(module)
        return list(groups.items())

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        c = self.config
        ranges = [(r.device, r.count, r.dtype) for r in self.placement.ranges]
        return KVCache(ranges, rows, c.num_key_value_heads, capacity, c.head_dim)

    def embed_prompt(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings, with placeholder positions replaced by projected input-image tokens.

        `image_tokens` [n_placeholders_total, token_dim] are consumed in row-major order of the
        placeholder positions, i.e. raster order, image by image, row by row.
        """
        input_ids = input_ids.to(self.placement.input_device)
        embeds = self.embed_tokens(input_ids)
        slots = input_ids == self.config.image_placeholder_id
        given = 0 if image_tokens is None else image_tokens.shape[0]
        placeholders = int(slots.sum())
        if placeholders != given:
            raise NextStepError(f"the prompt holds {placeholders} image placeholder tokens but {given} input-image "
                                f"tokens were given; do not type <|image_placeholder|> in a prompt (use <image>)")
        if image_tokens is not None:
            embeds[slots] = self.image_in_projector(image_tokens.to(embeds.device, embeds.dtype))
        return embeds

    def embed_image_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed sampled tokens [rows, token_dim] back as the next input position [rows, 1, hidden]."""
        return self.image_in_projector(tokens.to(self.placement.input_device, self.placement.input_dtype))[:, None]

    def run_range(self, index: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                  mask: torch.Tensor | None, cache_position: torch.Tensor | None,
                  flash: FlashAttention | None) -> torch.Tensor:
        """Range `index`'s decoder layers over hidden states `x` [rows, seq, hidden] at `positions` [rows, seq],
        handed over to the range's device and residual dtype (devices.residual_dtype: float32 on float16 ranges),
        writing their keys and values to the cache (as the prefix, or at `cache_position` for one image token); `mask`
        None: causal."""
        layer_range = self.placement.ranges[index]
        device = layer_range.device
        x = x.to(device, residual_dtype(layer_range.dtype))
        cos, sin = rotary_tables(positions.to(device), self.config.head_dim, self.config.rope_theta, layer_range.dtype)
        mask = None if mask is None else mask.to(device)
        cache_position = None if cache_position is None else cache_position.to(device)
        for layer in islice(self.layers, layer_range.start, layer_range.stop):
            x = layer(x, cos, sin, cache, cache_position, mask, flash)
        return x

    def condition(self, hidden: torch.Tensor, position_offset: torch.Tensor | None = None) -> torch.Tensor:
        """The image condition of the last position's hidden states [rows, hidden]:
        `image_out_projector(norm(hidden) + position_offset)` (the offset: the next image token's `gen_pos_embed`
        row, for models that use one). The norm reads the hidden states in their residual dtype (a float32 stream
        would overflow if cast to float16 first)."""
        hidden = self.norm(hidden.to(self.placement.run_device), self.placement.run_dtype)
        if position_offset is not None:
            hidden = hidden + position_offset
        return self.image_out_projector(hidden)


@functools.lru_cache(maxsize=8)
def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor the network of `config` holds, by name: the network built on the meta device with
    one decoder layer, whose shapes every layer has (building all 48, or a deep model's 512, takes seconds of Python
    for a planner that answers a web page)."""
    with torch.device("meta"):
        model = NextStepModel(replace(config, num_hidden_layers=1))
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("layers.0."):
            shapes.update({f"layers.{index}.{name[9:]}": tuple(tensor.shape)
                           for index in range(config.num_hidden_layers)})
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes
