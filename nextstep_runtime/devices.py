"""The devices the runtime runs on, and every rule that depends on one, as functions of plain values.

`DeviceTraits.of(device)` reads what decides the runtime's choices on a device (its type, a CUDA GPU's compute
capability, the macOS version under an Apple GPU, the torch version); the rules (the `auto` dtype, which weight
formats have kernels there, what compiles, which attention kernel runs) take those traits instead of asking torch
themselves, so one place holds each rule and the rules for GPUs and Macs this machine does not have are tested as
plain functions.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NextStepError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "2.13.0+cpu" -> (2, 13, 0), "14.2.1" -> (14, 2, 1); () when none."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


TORCH_VERSION = version_tuple(torch.__version__)[:2]
"""The running torch's (major, minor)."""
CUDA_BUILD = version_tuple(torch.version.cuda or "")[:2] or None
"""The CUDA version the running torch was built for (major, minor), e.g. (11, 8) for a `+cu118` wheel; None for a
torch without CUDA."""

BF16_CUDA_CAPABILITY = (8, 0)
"""bfloat16 tensor cores arrived with Ampere; older GPUs (Pascal, Volta, Turing) only emulate bfloat16, slowly, so
`torch.cuda.is_bf16_supported()` (which counts emulation, and asks the current GPU, not the model's) is no guide."""
BF16_MACOS = (14,)
"""Apple GPUs compute in bfloat16 from macOS 14 (Metal 3.1); ComfyUI 0.8.0 decides the same way
(comfy/model_management.py `should_use_bf16`: on MPS, `mac_version() < (14,)` -> no bfloat16, then float16 through
`should_use_fp16`, which is True on MPS)."""
INT4_CUDA_CAPABILITY = (8, 0)
"""torch's CUDA int4 kernel needs bfloat16 tensor cores: Ampere or newer."""
FP8_MATMUL_CAPABILITY = (8, 9)
"""`torch._scaled_mm` (the fused fp8 matmul) needs fp8 tensor cores: Ada (8.9) or Hopper (9.0) and newer."""
FLASH_ATTN_CAPABILITY = (8, 0)
"""flash-attn 2 runs on Ampere or newer only; it refuses older GPUs at the first call."""
INT4_TORCH = {"cuda": (2, 5), "cpu": (2, 6), "mps": (2, 5)}
"""The first torch whose int4 kernels take the nibbles this runtime packs on each device type:
`_convert_weight_to_int4pack` takes [N, K/2] uint8 on CUDA and Apple GPUs from 2.5 (pytorch/pytorch PR 129940, July
2024, which moved every device to that input; the MPS packing kernel itself came a month earlier, PR 128965), and the
CPU's own pair (`_convert_weight_to_int4pack_for_cpu`, `_weight_int4pack_mm_for_cpu`) exists from 2.6. The Apple GPU's
packed tensor has CUDA's 4-D shape, but holds the bytes row-major with the two nibbles of each swapped, not CUDA's
tiling."""
INT4_CUDA_BUILD = (12, 0)
"""torch compiles its CUDA int4 kernel (`_weight_int4pack_mm`, aten/src/ATen/native/cuda/int4mm.cu) only for CUDA 12
or newer; a torch built for CUDA 11.8 raises "not available for build" at the first 4-bit matmul."""
COMPILE_TORCH = (2, 7)
"""torch.compile of the flow head sets `recompile_limit` and `accumulated_recompile_limit`, dynamo settings that
older torch names differently."""


@dataclass(frozen=True)
class DeviceTraits:
    """What the runtime's rules need to know about a device."""

    type: str
    """"cpu", "cuda" or "mps" (an Apple GPU)."""
    capability: tuple[int, int] | None = None
    """A CUDA GPU's compute capability; None for other devices, and for a GPU that is only planned for (`plan
    --gpu-memory` on a machine without it), which is then assumed current (bfloat16, every kernel present)."""
    macos: tuple[int, ...] | None = None
    """The macOS version under an Apple GPU; None elsewhere."""
    torch_version: tuple[int, ...] = TORCH_VERSION
    """The torch whose kernels run there (major, minor)."""
    cuda_build: tuple[int, ...] | None = CUDA_BUILD
    """The CUDA version that torch was built for (CUDA_BUILD); None: not a CUDA build."""

    @classmethod
    def of(cls, device: torch.device | str) -> "DeviceTraits":
        device = torch.device(device)
        if device.type == "cuda":
            return cls("cuda", torch.cuda.get_device_capability(device))
        if device.type == "mps":
            return cls("mps", macos=version_tuple(platform.mac_ver()[0]) or None)
        return cls(device.type)

    def describe(self) -> str:
        if self.type == "cuda" and self.capability is not None:
            return f"a CUDA GPU of compute capability {self.capability[0]}.{self.capability[1]}"
        if self.type == "mps":
            return "an Apple GPU (MPS)"
        return "a CUDA GPU" if self.type == "cuda" else f"the {self.type.upper()}"

    def capability_below(self, needed: tuple[int, int]) -> bool:
        """A known CUDA capability below `needed` (a planned GPU of unknown capability is not)."""
        return self.capability is not None and self.capability < needed


PLANNED_GPU = DeviceTraits("cuda")
"""A CUDA GPU this machine does not have, planned for by size alone."""
PLANNED_MAC = DeviceTraits("mps", macos=BF16_MACOS)
"""An Apple GPU this machine does not have, planned for by size alone (a current macOS assumed)."""


def planned_traits(device: torch.device) -> DeviceTraits:
    """What the rules assume of a device planned for by size alone: a current GPU of its kind."""
    return PLANNED_MAC if device.type == "mps" else PLANNED_GPU if device.type == "cuda" else DeviceTraits(device.type)

MEMINFO = Path("/proc/meminfo")
"""Linux's host memory figures; macOS and Windows have none (psutil reads theirs)."""


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of host RAM: Linux's MemAvailable and MemTotal, else psutil's figures where it is
    importable (ComfyUI installs it; the runtime does not depend on it), else None."""
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return _psutil_memory()
    kib = {name: rest.split()[0] for name, _, rest in (line.partition(":") for line in lines) if rest.split()}
    if "MemAvailable" in kib and "MemTotal" in kib:
        return int(kib["MemAvailable"]) * 1024, int(kib["MemTotal"]) * 1024
    return None


def _psutil_memory() -> tuple[int, int] | None:
    try:
        import psutil
    except ImportError:
        return None
    memory = psutil.virtual_memory()
    return int(memory.available), int(memory.total)


def _torch_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def _current_cuda_index() -> int:
    """The index `cuda` stands for: the current CUDA device where there is one, else 0 (a GPU only planned for)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def parse_device(name: str) -> torch.device:
    """A device name (cpu, cuda, cuda:N, mps) as one torch.device, of a known kind: `cuda` becomes the indexed current
    GPU (`cuda:0`), since torch.device("cuda") != torch.device("cuda:0") and ComfyUI compares devices with ==. Whether
    the device exists is resolve_device's check."""
    try:
        device = torch.device(name.strip())
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise NextStepError(f"unknown device {name.strip()!r}; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", _current_cuda_index())
    return device


def check_present(device: torch.device) -> torch.device:
    """Refuse a device this machine does not have, naming what it has."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NextStepError(f"device {device} was asked for but no CUDA GPU is available here; run on the CPU "
                                f"instead (device cpu)")
        if device.index >= torch.cuda.device_count():
            raise NextStepError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} "
                                f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        reason = ("this torch was built without it" if not torch.backends.mps.is_built()
                  else "it needs a Mac with Apple silicon and macOS 12.3 or newer")
        raise NextStepError(f"device {device} (an Apple GPU) was asked for but MPS is not available here ({reason}); "
                            f"run on the CPU instead (device cpu)")
    return device


def resolve_device(name: str) -> torch.device:
    """`auto` picks a CUDA GPU (the current one), else an Apple GPU, else the CPU; otherwise cpu, cuda, cuda:N or mps
    (parse_device), which must exist on this machine."""
    if name.strip() == "auto":
        if torch.cuda.is_available():
            return parse_device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return check_present(parse_device(name))


def bf16_native(traits: DeviceTraits) -> bool:
    """Whether the device computes in bfloat16 at full speed: CUDA GPUs of compute capability 8.0+ (Ampere or
    newer), Apple GPUs from macOS 14, the CPU (slowly, but exactly)."""
    if traits.type == "cuda":
        return not traits.capability_below(BF16_CUDA_CAPABILITY)
    if traits.type == "mps":
        return traits.macos is not None and traits.macos >= BF16_MACOS
    return True


def auto_dtype(traits: DeviceTraits) -> torch.dtype:
    """A GPU's fast half precision: bfloat16 where native (see bf16_native), float16 on older CUDA GPUs and macOS;
    float32 on the CPU, where half precision saves memory but not time."""
    if traits.type in ("cuda", "mps"):
        return torch.bfloat16 if bf16_native(traits) else torch.float16
    return torch.float32


def residual_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of the decoder's residual stream (the hidden states between layers, which the norms read) beside
    matmuls in `compute`: float32 when they run in float16, else the same. Qwen2-class models carry activations of
    several 10^4 in a few channels of the residual stream (trained in bfloat16, whose range is float32's); in float16
    (largest value 65504) their sum overflows to inf and every later token is NaN. llama.cpp keeps every activation
    between its float16 matmuls in float32 the same way, and flash-attn / Mamba offer `residual_in_fp32` for the same
    reason; Qwen's maintainers advise bfloat16 or float32 for their float16 NaN reports (QwenLM/Qwen2 issues 721,
    826). Each norm hands its attention or MLP an input in `compute` (normalised values are small), so the weights and
    the matmuls stay float16: the cost is the float32 hidden states and two casts per layer."""
    return torch.float32 if compute == torch.float16 else compute


BF16_DEVICES = "an NVIDIA GPU of the Ampere generation or newer, or a Mac on macOS 14 or newer"
"""Where bfloat16 is native (bf16_native), as a user reads it."""


def float16_overflow_fix(float32_fits: bool | None) -> str:
    """What to do when a float16 run overflows even with the float32 residual stream: float32 where the planner says
    the model fits the devices in it (`float32_fits`; None: unknown), else a device that computes in bfloat16."""
    if float32_fits is False:
        return (f"float32 does not fit these devices: run on one that computes in bfloat16 ({BF16_DEVICES}) or on "
                f"the CPU")
    fits = "which fits these devices" if float32_fits else "if it fits (`plan --dtype float32` tells)"
    return f"load the model with dtype float32, {fits}, or run on a device that computes in bfloat16 ({BF16_DEVICES})"


def vae_dtype(compute: torch.dtype) -> torch.dtype:
    """The VAE's dtype beside a model computing in `compute`: the same, except float16, which this VAE family
    overflows in (its activations pass 65504, so images come out NaN/black; ComfyUI never runs it in float16
    either): float32 then, as on every GPU float16 is chosen for (no native bfloat16)."""
    return torch.float32 if compute == torch.float16 else compute


def resolve_dtype(name: str, traits: DeviceTraits) -> torch.dtype:
    """A dtype name, or `auto` (see auto_dtype), for a device with `traits`."""
    if name == "auto":
        return auto_dtype(traits)
    if name not in DTYPES:
        raise NextStepError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def plans_memory(traits: DeviceTraits) -> bool:
    """Whether `memory auto` chooses a weight mode from the device's memory: on GPUs (CUDA, and Apple GPUs, whose share
    of the Mac's memory is their limit); on the CPU it loads the full model (the smaller modes save memory there, not
    time)."""
    return traits.type in ("cuda", "mps")


def fp8_refusal(traits: DeviceTraits) -> str | None:
    """Why float8 weights cannot load here, or None. Apple GPUs have no float8 type: the first weight would fail
    to move there, after others had."""
    if traits.type == "mps":
        return "fp8 weights do not run on Apple GPUs (MPS has no float8 type); use memory int4 or full"
    return None


def fp8_matmul_fused(traits: DeviceTraits) -> bool:
    """Whether fp8 weights multiply as one fused fp8 matmul (`torch._scaled_mm`) here; elsewhere they are
    dequantised to the activation dtype first."""
    return (traits.type == "cuda" and traits.capability is not None and hasattr(torch, "_scaled_mm")
            and not traits.capability_below(FP8_MATMUL_CAPABILITY))


def int4_refusal(traits: DeviceTraits, dtype: torch.dtype) -> str | None:
    """Why 4-bit weights cannot run here, or None: the torch version must have the device's kernel (INT4_TORCH); the
    CPU and Apple GPU kernels take float32, bf16 and fp16; the CUDA one needs a torch built for CUDA 12+
    (INT4_CUDA_BUILD), bfloat16 and compute capability 8.0+."""
    if traits.type not in INT4_TORCH:
        return f"4-bit weights run on the CPU, CUDA GPUs and Apple GPUs, not on {traits.type}"
    needed = INT4_TORCH[traits.type]
    if traits.torch_version < needed:
        return (f"4-bit weights on {traits.describe()} need torch {_torch_text(needed)} or newer (this is torch "
                f"{_torch_text(traits.torch_version)}); upgrade torch, or load the model in full or fp8")
    if traits.type == "cuda":
        if traits.cuda_build is not None and traits.cuda_build < INT4_CUDA_BUILD:
            return (f"4-bit weights on CUDA need a torch built for CUDA 12 or newer (this torch "
                    f"{_torch_text(traits.torch_version)} is built for CUDA {_torch_text(traits.cuda_build)}, whose "
                    f"builds leave torch's int4 kernel out); use memory fp8, stream layers (gpu_layers), or install a "
                    f"CUDA 12 build of torch (e.g. the cu121 or cu124 wheels)")
        if traits.capability_below(INT4_CUDA_CAPABILITY):
            return (f"4-bit weights on CUDA need a GPU of compute capability 8.0+ (Ampere or newer); this is "
                    f"{traits.describe()}")
        if dtype != torch.bfloat16:
            return f"4-bit weights on CUDA compute in bfloat16 (got {str(dtype).removeprefix('torch.')})"
    return None


def streaming_refusal(traits: DeviceTraits) -> str | None:
    """Why decoder layers cannot be streamed to this device from host RAM, or None. An Apple GPU shares the host's
    memory: streaming would hold every layer in RAM plus two copies, saving nothing."""
    if traits.type == "mps":
        return ("gpu_layers (layer streaming) saves nothing on an Apple GPU, which shares the host's memory; load "
                "every layer (gpu_layers -1 / leave --gpu-layers out) and use memory int4 to need less")
    return None


def compile_default(traits: DeviceTraits) -> bool:
    """Whether the flow head is compiled unless asked otherwise: on CUDA GPUs only. Not on the CPU, where the
    compiled head measured no faster than the eager one (compiled_step.py) after half a minute of compiling, nor on
    Apple GPUs, where inductor's backend is a prototype (it may fail, or compile slowly for little gain)."""
    return traits.type == "cuda"


def compile_version_refusal(torch_version: tuple[int, ...] = TORCH_VERSION) -> str | None:
    """Why this torch cannot compile the flow head, or None (see COMPILE_TORCH)."""
    if torch_version < COMPILE_TORCH:
        return (f"compiling the flow head needs torch {_torch_text(COMPILE_TORCH)} or newer (this is torch "
                f"{_torch_text(torch_version)})")
    return None


def sdpa_forms_scores(traits: DeviceTraits) -> bool:
    """Whether SDPA on this device forms the whole (queries x keys) score matrix even for contiguous inputs: on
    Apple GPUs (`_scaled_dot_product_attention_math_for_mps` returns it); CUDA's and the CPU's fused kernels work in
    tiles."""
    return traits.type == "mps"


def flash_attn_refusal(traits: DeviceTraits) -> str | None:
    """Why an importable flash-attn cannot run on this device, or None."""
    if traits.type != "cuda":
        return f"flash-attn runs on CUDA GPUs only, not on {traits.describe()}"
    if traits.capability_below(FLASH_ATTN_CAPABILITY):
        return (f"flash-attn 2 needs a GPU of compute capability 8.0+ (Ampere or newer); this is "
                f"{traits.describe()}")
    return None
