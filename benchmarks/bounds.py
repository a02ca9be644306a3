"""What one image token's work needs at the least on this machine: the arithmetic and memory-traffic bound that
bench_generate.py prints next to the measured milliseconds per token.

The machine's rates are measured in-process, on the benchmark's own threads: a large matmul for the arithmetic
rate, sums over a buffer far larger than the caches for memory bandwidth, and over a buffer the size of the flow
head's per-step weights for the bandwidth from cache (they are read again at every solver step and stay cached).
A phase takes at least max(operations / arithmetic rate, bytes / bandwidth); the bounds are sums of phases:

- decoder, one token through every layer: the layers' matmuls on every guidance row (2 x rows x weights) and
  attention over the whole cache; every layer weight and the cache read once from memory.
- flow head: the adaLN modulations of all S steps (one batched matmul per block) with their weights read once
  from memory, then S solver steps of the head's MLPs on every guidance row with their weights read from cache.

Elementwise work is left out (it is a few percent of either), so a real run can approach a bound but not reach it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from nextstep_runtime.model.flow_head import FlowNet
from nextstep_runtime.model.network import NextStepModel


@dataclass(frozen=True)
class MachineRates:
    """Measured rates: matmul operations per second, bytes per second from memory and from cache."""

    flops: float
    memory_bytes_per_s: float
    cache_bytes_per_s: float

    @classmethod
    def measure(cls, dtype: torch.dtype, cached_bytes: int) -> "MachineRates":
        """Rates on the CPU in `dtype`; `cached_bytes`: the size of the working set that stays in cache."""
        size = 1024
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        flops = 2 * size**3 / _best_seconds(lambda: torch.mm(a, b))
        big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MB: far beyond any cache
        small = torch.ones(max(cached_bytes // 4, 1), dtype=torch.float32)
        return cls(flops, big.nbytes / _best_seconds(big.sum), small.nbytes / _best_seconds(small.sum))

    def as_dict(self) -> dict[str, float]:
        return {"matmul_gflops": round(self.flops / 1e9, 1), "memory_gb_s": round(self.memory_bytes_per_s / 1e9, 1),
                "cache_gb_s": round(self.cache_bytes_per_s / 1e9, 1)}


def _best_seconds(fn, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights as stored: parameters and buffers (packed fp8 or 4-bit weights, scales)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())


def _weight_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def _weight_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def head_step_modules(head: FlowNet) -> list[torch.nn.Module]:
    """The parts of the flow head that run at every solver step (the adaLN modulations run once per token)."""
    blocks = [module for block in head.res_blocks for module in (block.in_ln, block.mlp)]
    return [head.input_proj, *blocks, head.final_layer.linear]


def head_bound_ms(head: FlowNet, rows: int, batch: int, steps: int, rates: MachineRates) -> float:
    """The flow head's least milliseconds per token: modulations, then `steps` solver steps on `rows` guidance
    rows (`batch` tokens)."""
    modulation_modules = [head.cond_embed, *(block.adaLN_modulation for block in head.res_blocks),
                          head.final_layer.adaLN_modulation]
    modulation_ops = 2 * rows * (head.cond_embed.weight.numel()
                                 + steps * _weight_count(*modulation_modules[1:]))
    modulations = max(modulation_ops / rates.flops, _weight_bytes(*modulation_modules) / rates.memory_bytes_per_s)
    step_modules = head_step_modules(head)
    step_ops = 2 * (rows * _weight_count(*step_modules) - (rows - batch) * head.input_proj.weight.numel())
    step = max(step_ops / rates.flops, _weight_bytes(*step_modules) / rates.cache_bytes_per_s)
    return 1000 * (modulations + steps * step)


def decoder_bound_ms(model: NextStepModel, rows: int, cache_length: int, rates: MachineRates) -> float:
    """The decoder's least milliseconds for one token on `rows` guidance rows with `cache_length` cached
    positions (attention spans the whole fixed-size cache). Operations from the config (stored fp8 or 4-bit
    weights do the same matmuls), bytes as stored (what the layers really read)."""
    c = model.config
    attention_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer_weights = 2 * c.hidden_size * attention_width + 2 * c.hidden_size * kv_width
    layer_weights += 3 * c.hidden_size * c.intermediate_size
    attention_ops = 2 * 2 * rows * attention_width * cache_length
    ops = c.num_hidden_layers * (2 * rows * layer_weights + attention_ops)
    cache_bytes = c.num_hidden_layers * 2 * rows * kv_width * cache_length * model.embed_tokens.weight.element_size()
    traffic = sum(_stored_bytes(layer) for layer in model.layers) + cache_bytes
    return 1000 * max(ops / rates.flops, traffic / rates.memory_bytes_per_s)


def bounds(model: NextStepModel, rows: int, batch: int, steps: int, cache_length: int) -> dict:
    """The benchmark's bound figures: the machine's rates, and the head's and the decoder's least ms per token."""
    head = model.image_head.net
    dtype = head.input_proj.weight.dtype
    rates = MachineRates.measure(dtype, _weight_bytes(*head_step_modules(head)))
    return {"machine_rates": rates.as_dict(),
            "ms_per_token_head_bound": round(head_bound_ms(head, rows, batch, steps, rates), 3),
            "ms_per_token_backbone_bound": round(decoder_bound_ms(model, rows, cache_length, rates), 3)}


def spread(times: list[float], scale: float = 1.0) -> list[float]:
    """[min, median, max] of `times` times `scale`, rounded: each figure's spread."""
    return [round(scale * value, 4) for value in (min(times), statistics.median(times), max(times))]
