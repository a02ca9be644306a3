"""The NextStep network: embeddings, decoder stack, image projectors and flow head.

Attribute names mirror the checkpoint keys (`embed_tokens`, `layers.N`, `norm`, `image_in_projector`,
`image_out_projector`, `image_head.net`) so weights load by name. `lm_head` is not built: image
generation never reads it, and on the 14B model it is 3 GB.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import NextStepError
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
        """The layers' devices when split over several (set by the loader); None: every part on one device."""

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """The run device: where the flow head, the sampling buffers and the outputs are (the last device of a
        split)."""
        return self.norm.weight.device

    @property
    def input_device(self) -> torch.device:
        """Where prompts and fed-back tokens enter (the first device of a split)."""
        return self.embed_tokens.weight.device

    def parts_by_device(self) -> list[tuple[torch.device, list[nn.Module]]]:
        """The network's modules grouped by the device each range of the placement puts them on, in order (one group
        when it is not split): what a host moves off and back onto each device (model/placement.py says which part
        goes where)."""
        if self.placement is None:
            return [(self.device, [self])]
        groups = [(layer_range.device, list(islice(self.layers, layer_range.start, layer_range.stop)))
                  for layer_range in self.placement.ranges]
        for name, module in self.named_children():
            if name != "layers":
                groups[0 if name in INPUT_PARTS else -1][1].append(module)
        return groups

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        c = self.config
        ranges = ([(self.device, c.num_hidden_layers)] if self.placement is None else
                  [(layer_range.device, layer_range.count) for layer_range in self.placement.ranges])
        return KVCache(ranges, rows, c.num_key_value_heads, capacity, c.head_dim, self.dtype)

    def embed_prompt(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings, with placeholder positions replaced by projected input-image tokens.

        `image_tokens` [n_placeholders_total, token_dim] are consumed in row-major order of the
        placeholder positions, i.e. raster order, image by image, row by row.
        """
        input_ids = input_ids.to(self.input_device)
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
        return self.image_in_projector(tokens.to(self.input_device, self.dtype))[:, None]

    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
               cache_position: torch.Tensor | None = None,
               position_offset: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder over new positions and write them to the cache (as the prefix, or at
        `cache_position` for one image token); returns the last position's image condition
        `image_out_projector(norm(hidden) + position_offset)` [rows, hidden] (the offset: the next image
        token's `gen_pos_embed` row, for models that use one)."""
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        x = embeds
        if self.placement is None:
            for layer in self.layers:
                x = layer(x, cos, sin, cache, cache_position, mask)
        else:
            for layer_range in self.placement.ranges:  # hand the hidden states (and the step's inputs) over
                device = layer_range.device
                x, cos, sin = x.to(device), cos.to(device), sin.to(device)
                mask = None if mask is None else mask.to(device)
                cache_position = None if cache_position is None else cache_position.to(device)
                for layer in islice(self.layers, layer_range.start, layer_range.stop):
                    x = layer(x, cos, sin, cache, cache_position, mask)
        hidden = self.norm(x[:, -1])
        if position_offset is not None:
            hidden = hidden + position_offset
        return self.image_out_projector(hidden)
