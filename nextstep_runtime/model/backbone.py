"""The Qwen2-style causal decoder that reads text and image tokens, with a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import FlashAttention, attend


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in float32 whatever the compute dtype, as the official model does; the result is
    cast to `dtype` (default: the input's) before the weight scales it, so a float32 residual stream
    (devices.residual_dtype) is normalised into the float16 its matmuls take."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype or x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [rows, seq, head_dim] for rotate-half RoPE, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [rows, heads, seq, head_dim] by tables [rows, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for all guidance rows, allocated once for the whole image.

    The prompt is written as a prefix; each image token is written in place at a position held in a
    device tensor, and attention then runs over the whole (fixed-size) cache with unwritten slots
    masked. Shapes never change inside the token loop, so one token's work can be captured as a CUDA
    graph. The cache starts zeroed: masked slots must hold finite numbers (0 x NaN is NaN).

    One tensor of keys and one of values per range of layers (`ranges`: each range's device, layer count and dtype,
    in order): each layer's cache lives on its layer's device, in its range's dtype.
    """

    def __init__(self, ranges: list[tuple[torch.device, int, torch.dtype]], rows: int, kv_heads: int, capacity: int,
                 head_dim: int) -> None:
        self.keys = [torch.zeros((count, rows, kv_heads, capacity, head_dim), dtype=dtype, device=device)
                     for device, count, dtype in ranges]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        """Per range: [its layers, rows, kv_heads, capacity, head_dim]."""
        self.layer_keys = [layer for keys in self.keys for layer in keys.unbind(0)]
        self.layer_values = [layer for values in self.values for layer in values.unbind(0)]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in (*self.keys, *self.values))

    def store(self, layer: int, position: torch.Tensor | None, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [R, kv_heads, n, d]: as the prefix when `position` is None (returning the
        prefix), else at `position` ([1] long tensor, n = 1) (returning the whole cache)."""
        layer_keys, layer_values = self.layer_keys[layer], self.layer_values[layer]
        if position is None:
            length = keys.shape[2]
            layer_keys[:, :, :length] = keys
            layer_values[:, :, :length] = values
            return layer_keys[:, :, :length], layer_values[:, :, :length]
        layer_keys.index_copy_(2, position, keys)
        layer_values.index_copy_(2, position, values)
        return layer_keys, layer_values


class Attention(nn.Module):
    """Grouped-query self-attention; q/k/v biases per config, o bias only with `o_attention_bias`."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=config.o_attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                position: torch.Tensor | None, mask: torch.Tensor | None, flash: FlashAttention | None) -> torch.Tensor:
        rows, seq, _ = x.shape
        q = self.q_proj(x).view(rows, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(rows, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(rows, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        keys, values = cache.store(self.layer_index, position, k, v)
        out = attend(q, keys, values, mask, flash)
        return self.o_proj(out.transpose(1, 2).reshape(rows, seq, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + MLP(norm(h))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                position: torch.Tensor | None, mask: torch.Tensor | None,
                flash: FlashAttention | None = None) -> torch.Tensor:
        """`x`: the residual stream, in devices.residual_dtype of the compute dtype (float32 beside float16 matmuls);
        the attention and the MLP compute in the dtype of the rotary tables `cos`/`sin`, the compute dtype, which
        the norms hand them. `flash`: flash-attn's kernel where its range runs it (attention.attention_kernels), else
        None: SDPA."""
        compute = cos.dtype
        x = x + self.self_attn(self.input_layernorm(x, compute), cos, sin, cache, position, mask, flash)
        return x + self.mlp(self.post_attention_layernorm(x, compute))


def prefix_attention_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Boolean mask [rows, 1, seq, seq] for the prompt: causal, padded keys hidden.

    A padding query would otherwise see no key at all (NaN in SDPA); it is allowed to see itself so its
    values stay finite. Real positions never attend to padding, so their results are unaffected.
    """
    seq = key_valid.shape[1]
    index = torch.arange(seq, device=key_valid.device)
    allowed = (index[None, :] <= index[:, None])[None] & key_valid[:, None, :].bool()
    allowed |= torch.eye(seq, dtype=torch.bool, device=key_valid.device)[None]
    return allowed[:, None]
