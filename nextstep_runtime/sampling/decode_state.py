"""The decoder's state over one call: the KV cache of every guidance row, which cached keys are real (not left
padding), and the decoder's two kinds of work on them: the prompt's prefill, and one image token through one range
of layers (model/placement.py). Each device keeps its own copy of the key mask and slot indices, so a range's work
reads nothing from another device."""

from __future__ import annotations

import torch

from ..devices import float16_overflow_fix
from ..errors import NonFiniteResult
from ..model.attention import FlashAttention
from ..model.backbone import prefix_attention_mask
from ..model.network import NextStepModel
from ..model.positions import condition_offsets
from .prompt import PromptRows


class DecodeState:
    def __init__(self, model: NextStepModel, rows: PromptRows, image_tokens: int,
                 kernels: tuple[FlashAttention | None, ...]) -> None:
        """`kernels`: each range's attention kernel (attention.attention_kernels)."""
        self.model, self.kernels = model, kernels
        self.groups = rows.groups
        self.row_count, self.prefill_len = rows.input_ids.shape
        capacity = self.prefill_len + image_tokens - 1
        self.padded = bool((rows.attention_mask == 0).any())
        valid = torch.ones((self.row_count, capacity), dtype=torch.bool)
        valid[:, : self.prefill_len] = rows.attention_mask.bool()
        devices = model.placement.devices
        self.key_valid = {device: valid.to(device) for device in devices}
        self.slots = {device: torch.arange(capacity, device=device) for device in devices}
        self.cache = model.new_cache(self.row_count, capacity)
        table = model.gen_pos_embed
        self.offsets = None if table is None else condition_offsets(table, image_tokens)

    def prefill(self, rows: PromptRows, image_tokens: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt rows through every range into the cache; returns the condition of the first image token
        [R, hidden]. Hidden states that overflowed (float16) stop the run here, before the image's tokens are
        sampled from them."""
        model, length = self.model, self.prefill_len
        x = model.embed_prompt(rows.input_ids, image_tokens)
        positions = torch.arange(length).expand(self.row_count, -1)
        for index, layer_range in enumerate(model.placement.ranges):
            valid = self.key_valid[layer_range.device][:, :length]
            mask = prefix_attention_mask(valid) if self.padded else None
            x = model.run_range(index, x, positions, self.cache, mask, None, self.kernels[index])
        check_prefill_finite(model, x)
        return model.condition(x[:, -1], None if self.offsets is None else self.offsets[:1])

    def feed_range(self, index: int, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One token's hidden states [R, 1, hidden] through range `index`, written to the cache at `position` ([1]
        long, on the range's device). Attention spans the whole cache, slots after `position` masked."""
        device = self.model.placement.ranges[index].device
        mask = (self.key_valid[device] & (self.slots[device] <= position))[:, None, None, :]
        return self.model.run_range(index, x, position.expand(self.row_count, 1), self.cache, mask, position,
                                    self.kernels[index])

    def condition(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The condition of the token after the one fed at `position` ([1] long, on the run device), from the last
        range's output; its index `position - prefill_len + 1` is computed on the device for graph replay."""
        offset = None if self.offsets is None else self.offsets.index_select(0, position - (self.prefill_len - 1))
        return self.model.condition(x[:, -1], offset)


def check_prefill_finite(model: NextStepModel, hidden: torch.Tensor) -> None:
    """Refuse the prompt's hidden states [R, P, hidden] when they hold NaN or inf (one host sync per call): in float16
    the decoder can overflow despite its float32 residual stream, and every image token would then be NaN, found only
    by the latents check after the whole loop. The error names the fix: float32 where the planner says it fits, else a
    device that computes in bfloat16."""
    if bool(torch.isfinite(hidden).all()):
        return
    raise NonFiniteResult(f"the decoder's hidden states overflowed to NaN or inf in the prompt's prefill (computing in "
                          f"{model.placement.describe_dtypes()}), so every image token would be NaN; "
                          f"{non_finite_fix(model)}")


def non_finite_fix(model: NextStepModel) -> str:
    """What to do about NaN or inf out of `model`: on float16 ranges an overflow (devices.float16_overflow_fix),
    elsewhere broken weights, which the loader's check cannot see once they are loaded (changed in memory, say)."""
    if any(layer_range.dtype == torch.float16 for layer_range in model.placement.ranges):
        return float16_overflow_fix(model.float32_fits)
    return f"the weights of {model.source} are likely broken: load it again, or fetch its files anew"
